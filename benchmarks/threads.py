"""Do CPU threads matter? The cafe image-embedding forward of the 0.5B shape at 1 and at N threads.

    python benchmarks/threads.py [--threads 1,2] [--rounds 2] [--images 2]

Alternates the thread counts round by round (same process, same inputs) and times one batched
`get_embeddings` forward plus a 4096^3 bf16 torch.mm at each count. On a shared machine the
answer changes with the other jobs' load, so the load average is printed with the result.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H
import torch
import workload as W


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--images", type=int, default=2)
    args = p.parse_args(argv)
    counts = sorted({int(t) for t in args.threads.split(",")})

    from cafe.prompting import EmbeddingInput

    spec = W.spec_for("ov-0.5b")
    model, processor = W.build_model(spec, torch.bfloat16, "cpu")
    model.eval()
    items = [EmbeddingInput(image=im) for im in W.random_images(args.images, spec.image_size, seed=1)]
    batch = W.to_device(W.embedding_batches(processor, model, items, len(items))[0].data, "cpu", torch.bfloat16)
    a = torch.randn(4096, 4096, dtype=torch.bfloat16)

    def forward():
        with torch.inference_mode():
            model.get_embeddings(**batch)

    flops = H.count_flops_of(forward)  # also the warm-up
    times = {t: {"forward": [], "mm": []} for t in counts}
    print(f"load average before: {H.load_average()}", flush=True)
    for r in range(args.rounds):
        for t in counts if r % 2 == 0 else list(reversed(counts)):
            with H.num_threads(t):
                times[t]["forward"].append(H.time_call(forward, "cpu"))
                times[t]["mm"].append(H.time_call(lambda: torch.mm(a, a), "cpu"))
            print(
                f"round {r + 1} threads {t}: forward {times[t]['forward'][-1]:.2f} s, "
                f"mm {2 * 4096**3 / times[t]['mm'][-1] / 1e12:.3f} TFLOP/s",
                flush=True,
            )
    print(f"load average after: {H.load_average()}")
    print(f"\n| threads | embedding forward ({args.images} images) s | TFLOP/s | torch.mm 4096^3 TFLOP/s |")
    print("|---|---|---|---|")
    for t in counts:
        fwd = statistics.median(times[t]["forward"])
        mm = statistics.median(times[t]["mm"])
        print(f"| {t} | {fwd:.2f} | {flops / fwd / 1e12:.3f} | {2 * 4096**3 / mm / 1e12:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
