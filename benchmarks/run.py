"""cafe benchmarks: speed and memory, cafe against the reference implementation's way, side by side.

    python benchmarks/run.py                 # headline CPU run, LLaVA-OneVision-0.5B shape, bf16
    python benchmarks/run.py --quick         # tiny checkpoint, seconds; checks the plumbing only
    python benchmarks/run.py --device cuda   # GPU mode (row 6): bf16, sdpa, CUDA events
    python benchmarks/run.py --rows 4        # GradCache memory vs contrastive batch size

Writes ``results.json`` and ``results.md`` to ``--out`` (default ``benchmarks/results/<device>[-quick]``).
See docs/benchmarks.md for the method, the recorded figures and how to read them.

Rows (one module each in rows/; report.py renders results.md, environment.py records the setup):
 1. training_step:  training step time, cafe / reference-style, same batch               goal <= 0.5
 2. embedding:      embedding throughput (images/s, texts/s), cafe batched / reference   goal >= 5x
 3. lm_loss_memory: LM-loss peak memory, long prompt, cafe / full-vocabulary logits      goal <= 0.5
 4. gradcache:      peak memory vs contrastive batch size with GradCache                 goal peak(64) <= 1.3 x peak(8)
 5. mfu:            achieved FLOP/s of the embedding forward / measured matmul FLOP/s    goal >= 50 % (CPU)
 6. gpu:            GPU mode: step time, samples/s, MFU                                  (needs --device cuda)
 7. prefix_cache:   embedding throughput, shared-prefix cache / none (texts, images);    goal >= 1.4x (texts)
                    length buckets / input order on mixed-length texts (information)
 8. rag_reuse:      RAG answer latency, reusing the question's embedding pass / anew     (reported)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H
import torch
import workload as W
from environment import environment, thread_probe
from report import markdown
from rows import (
    GOALS,
    ROW_NAMES,
    embedding,
    gc_between,
    gpu,
    gradcache,
    lm_loss_memory,
    log,
    mfu,
    prefix_cache,
    rag_reuse,
    set_full_gc,
    training_step,
)

SCHEMA_VERSION = 1
DEFAULTS = {
    #                 CPU headline               --quick (tiny)            --device cuda
    "train_pairs": {"cpu": 2, "quick": 4, "cuda": 8},
    "photo_size": {"cpu": (640, 480), "quick": 32, "cuda": (640, 480)},
    "caption_tokens": {"cpu": 160, "quick": 16, "cuda": 160},
    "embed_images": {"cpu": 2, "quick": 4, "cuda": 32},
    "embed_texts": {"cpu": 32, "quick": 8, "cuda": 256},
    "embed_batch": {"cpu": 16, "quick": 4, "cuda": 32},
    "text_tokens": {"cpu": 14, "quick": 8, "cuda": 14},
    "bucket_texts": {"cpu": 32, "quick": 8, "cuda": 256},
    "bucket_batch": {"cpu": 8, "quick": 4, "cuda": 32},
    "bucket_max_tokens": {"cpu": 500, "quick": 100, "cuda": 500},
    "answer_tokens": {"cpu": 8, "quick": 4, "cuda": 32},
    "lm_seq": {"cpu": 2048, "quick": 256, "cuda": 2048},
    "lm_supervised": {"cpu": 256, "quick": 32, "cuda": 256},
    "lm_batch": {"cpu": 1, "quick": 1, "cuda": 4},
    "warmup": {"cpu": 1, "quick": 1, "cuda": 3},
    "repeats": {"cpu": 2, "quick": 2, "cuda": 10},
    "train_repeats": {"cpu": 2, "quick": 2, "cuda": 10},
}


# ---------------------------------------------------------------------------------- context
class Bench:
    """Shared state: the model (built once), the processor, options, the matmul peak."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        self.spec = W.spec_for("tiny" if args.quick else "ov-0.5b", args.vision_layers, args.text_layers)
        self.floor_rss = H.rss_bytes()
        self._model = None
        self._processor = None
        self.matmul = None

    @property
    def model(self):
        if self._model is None:
            log(f"building model {self.spec.name} ({self.args.dtype}, {self.device}, attn={self.args.attn})")
            t0 = time.perf_counter()
            self._model, self._processor = W.build_model(self.spec, self.dtype, self.device, self.args.attn)
            if self.args.gradient_checkpointing:
                W.enable_checkpointing(self._model)
            log(f"  built in {time.perf_counter() - t0:.1f} s: {W.count_parameters(self._model)}")
        return self._model

    @property
    def processor(self):
        self.model  # noqa: B018 - builds both
        return self._processor

    def opt(self, name: str):
        value = getattr(self.args, name)
        if value is not None:
            return value
        mode = "quick" if self.args.quick else ("cuda" if self.device.startswith("cuda") else "cpu")
        return DEFAULTS[name][mode]

    def matmul_peak(self) -> dict:
        if self.matmul is None:
            self.matmul = self.measure_matmul_peak()
        return self.matmul

    def measure_matmul_peak(self) -> dict:
        """Best of square torch.mm at a couple of large sizes (the ceiling for MFU-style ratios)."""
        sizes = [512] if self.args.quick else ([8192] if self.device.startswith("cuda") else [2048, 4096])
        runs = [H.matmul_peak(self.device, self.dtype, n=n, repeats=3 if self.args.quick else 5) for n in sizes]
        best = max(runs, key=lambda r: r["tflops_best"])
        best = {**best, "by_size": {str(r["n"]): round(r["tflops_best"], 4) for r in runs}}
        log(f"matmul peak ({self.args.dtype}): {best['by_size']} TFLOP/s")
        return best

    def matmul_contestant(self) -> H.Contestant:
        """A large square torch.mm as a contestant: the ceiling timed inside a row's alternation."""
        n = 512 if self.args.quick else (8192 if self.device.startswith("cuda") else 4096)
        reps = 3
        a = torch.randn(n, n, device=self.device, dtype=self.dtype)
        b = torch.randn(n, n, device=self.device, dtype=self.dtype)

        def mm():
            for _ in range(reps):
                torch.mm(a, b)

        c = H.Contestant(f"torch.mm {n}^3 x{reps}", mm)
        c.flops = reps * 2 * n**3
        return c


# ---------------------------------------------------------------------------------- main
def _photo_size(text: str) -> int | tuple[int, int]:
    """``640x480`` -> (640, 480); ``384`` -> 384 (square)."""
    if "x" in text:
        width, height = text.lower().split("x")
        return int(width), int(height)
    return int(text)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny checkpoint, seconds; checks the plumbing, not the claims")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    p.add_argument(
        "--rows",
        default=None,
        help="comma-separated rows to run (default: all; on CPU without --quick all but 4, which is "
        "reported as skipped: its 8..64-pair steps take another 20+ minutes, run it with --rows 4)",
    )
    p.add_argument("--out", default=None, help="output folder (results.json, results.md)")
    p.add_argument(
        "--threads",
        default="auto",
        help="CPU threads: a number, or 'auto' (1 with --quick, else the faster of 1 and torch's default "
        "in a matmul probe)",
    )
    p.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="activation checkpointing is on by default on both sides (the reference recipe uses it; "
        "without it the reference-style step of the 0.5B shape needs more than 20 GB on CPU)",
    )
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip torch.profiler tables")
    p.add_argument("--vision-layers", type=int, default=None, help="depth cut (results then say DEPTH-CUT)")
    p.add_argument("--text-layers", type=int, default=None, help="depth cut (results then say DEPTH-CUT)")
    for name in DEFAULTS:
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=_photo_size if name == "photo_size" else int,
            default=None,
            help=f"default {DEFAULTS[name]['cpu']} (CPU), {DEFAULTS[name]['quick']} (--quick), "
            f"{DEFAULTS[name]['cuda']} (cuda)",
        )
    p.add_argument("--gradcache-sizes", default="8,16,32,64")
    p.add_argument("--gradcache-mini-batch", type=int, default=4)
    p.add_argument("--gradcache-repeats", type=int, default=1)
    p.add_argument(
        "--gradcache-plain-max", type=int, default=16, help="largest batch also run without GradCache, for comparison"
    )
    p.add_argument("--gradcache-vision-layers", type=int, default=1, help="row 4 on CPU: depth cut (64-pair steps)")
    p.add_argument("--gradcache-text-layers", type=int, default=1, help="row 4 on CPU: depth cut (64-pair steps)")
    args = p.parse_args(argv)
    if args.quick:
        args.gradcache_sizes = "8,16" if args.gradcache_sizes == "8,16,32,64" else args.gradcache_sizes
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    H.tune_malloc()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda requested but torch.cuda.is_available() is False.", file=sys.stderr)
        return 2
    set_full_gc(not args.quick)
    probe = {}
    if not args.device.startswith("cuda"):
        if args.quick and args.threads == "auto":
            probe = {"matmul_tflops_by_threads": "not probed (--quick uses 1 thread)"}
            threads = 1
        else:
            probe = thread_probe(args, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])
            threads = probe["fastest"] if args.threads == "auto" else int(args.threads)
        torch.set_num_threads(threads)
        probe["chosen"] = threads
        log(f"threads: probe {probe['matmul_tflops_by_threads']} TFLOP/s -> using {threads}")
    cpu_headline = not args.quick and not args.device.startswith("cuda")
    rows_arg = args.rows or ("1,2,3,5,6,7,8" if cpu_headline else "1,2,3,4,5,6,7,8")
    wanted = {int(x) for x in rows_arg.split(",") if x.strip()}
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).resolve().parent
        / "results"
        / (args.device.split(":")[0] + ("-quick" if args.quick else ""))
    )
    out.mkdir(parents=True, exist_ok=True)

    bench = Bench(args)
    started = time.time()
    report = {"schema_version": SCHEMA_VERSION, "meta": environment(bench, argv), "rows": []}
    report["meta"]["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["meta"]["load_average_start"] = H.load_average()
    report["meta"]["thread_probe"] = probe
    report["meta"]["matmul_peak"] = bench.matmul_peak()
    if wanted - {4, 6}:
        report["meta"]["parameters"] = W.count_parameters(bench.model)
        report["meta"]["vocab_size"] = bench.model.config.text_config.vocab_size

    done: dict[int, dict] = {}

    def run_row(i: int, fn, *fn_args):
        if i not in wanted:
            return
        log(f"row {i}: {ROW_NAMES[i]}")
        t0 = time.perf_counter()
        try:
            row = fn(*fn_args)
        except Exception as err:  # noqa: BLE001 - a failed row is reported, the others still run
            row = {
                "status": "error",
                "goal_met": None,
                "result": {},
                "note": f"{type(err).__name__}: {err}",
                "error": traceback.format_exc(),
            }
            log(f"row {i} failed: {err}")
        row = {"id": i, "name": ROW_NAMES[i], "goal": GOALS[i], **row, "duration_s": round(time.perf_counter() - t0, 1)}
        done[i] = row
        report["rows"].append(row)
        _write(report, out, started)

    # Cheap rows first: their results are written (after every row) before the long training row.
    run_row(3, lm_loss_memory.run, bench)
    run_row(2, embedding.run, bench)
    run_row(7, prefix_cache.run, bench)
    run_row(8, rag_reuse.run, bench)
    run_row(5, mfu.run, bench, done.get(2))
    run_row(1, training_step.run, bench)
    run_row(6, gpu.run, bench, done.get(1))
    if 4 in wanted:
        bench._model = None  # free the main model first
        gc_between()
        run_row(4, gradcache.run, bench)
    elif args.rows is None and cpu_headline:
        report["rows"].append(
            {
                "id": 4,
                "name": ROW_NAMES[4],
                "goal": GOALS[4],
                "status": "skipped",
                "goal_met": None,
                "result": {},
                "note": gradcache.SKIPPED_NOTE,
            }
        )
    # The ceiling again at the end (background load drifts); row 5 uses the better of the two.
    end_peak = bench.measure_matmul_peak()
    report["meta"]["matmul_peak_end"] = end_peak
    if 5 in done and done[5]["status"] == "measured" and end_peak["tflops_best"] > bench.matmul["tflops_best"]:
        mfu.rerate(done[5], end_peak)
    report["rows"].sort(key=lambda r: r["id"])
    _write(report, out, started)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    print((out / "results.md").read_text())
    return 0


def _write(report: dict, out: Path, started: float) -> None:
    report["meta"]["duration_s"] = round(time.time() - started, 1)
    report["meta"]["load_average_end"] = H.load_average()
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
