"""What smaller vectors cost in retrieval: Matryoshka truncation and int8 / binary quantisation.

    python benchmarks/retrieval_cost.py            # ~25 minutes on 1 thread of a shared 2-core CPU
    python benchmarks/retrieval_cost.py --quick    # plumbing only (seconds-scale training)

On the built-in synthetic shapes data (`cafe.data.synthetic`, the data of ``cafe demo``), the same
tiny LLaVA-OneVision is trained twice with the demo's CAFe recipe (LM + contrastive, alpha_con 10,
alpha_lm 1, lr 2e-3, cosine): once with ``matryoshka_dims`` and once without. The test suite's
tiny model has a 64-wide LLM, too narrow to truncate, so this one is **wider: hidden 256**
(4 heads, 2 KV heads, MLP 512, 2 layers; same tiny vision tower, at 64 px so the shapes are more
than a few pixels wide), trained at sizes ``[256, 128, 64, 32]`` with weights 1/4 each (the
contrastive term keeps the scale of the run without Matryoshka). Each trained model is then
measured:

- retrieval recall@1 in both directions (text -> image, image -> text) on the test split at every
  size (the first ``d`` dimensions, re-normalised: ``encode(truncate_dim=d)``), and through
  sentence-transformers: ``SentenceTransformer(folder, truncate_dim=d)`` on the saved checkpoint;
- recall@1 of the full-size vectors quantised by sentence-transformers: float32, int8
  (``quantize_embeddings`` calibrated on the image embeddings, and ``encode(precision="int8")``
  which calibrates each call on its own batch), and binary (``precision="ubinary"``, Hamming
  distance);
- generation: the teacher-forced LM loss on the test split's conversations and the POPE-style
  yes/no probe on the test images (greedy answers), the generative half of the CAFe objective.

Writes ``results.json`` and ``results.md`` to ``--out`` (default
``benchmarks/results/retrieval-cost``); docs/sentence-transformers.md quotes the recorded run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F

HIDDEN = 256
DIMS = [256, 128, 64, 32]


def build_wide_tiny_checkpoint(path: Path, seed: int, image_size: int = 32) -> Path:
    from transformers import LlavaOnevisionForConditionalGeneration

    from cafe.testing import save_tiny_checkpoint, tiny_llava_onevision_config, tiny_llava_onevision_processor

    processor = tiny_llava_onevision_processor(image_size=image_size)
    config = tiny_llava_onevision_config(processor.tokenizer, image_size=image_size, hidden_size=HIDDEN)
    return save_tiny_checkpoint(path, LlavaOnevisionForConditionalGeneration, config, processor, seed)


def train(base: Path, data: dict, out: Path, args, matryoshka: bool):
    from cafe import CafeCollator, CafeForConditionalGeneration, CafeTrainer, CafeTrainingArguments
    from cafe.demo import training_records
    from cafe.training import load_records

    torch.manual_seed(args.seed)
    model = CafeForConditionalGeneration.from_pretrained(base)
    training_args = CafeTrainingArguments(
        output_dir=str(out / "run"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        vision_tower_learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        contrastive_weight=10.0,
        lm_weight=1.0,
        matryoshka_dims=DIMS if matryoshka else None,
        matryoshka_weights=args.matryoshka_weights if matryoshka else None,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
    )
    trainer = CafeTrainer(
        model=model,
        args=training_args,
        train_dataset=load_records(str(training_records(data["train"]))),
        data_collator=CafeCollator(model.processor, model=model, image_folder=str(data["folder"])),
        processing_class=model.processor,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    model.eval()
    folder = out / "checkpoint"
    model.save_pretrained(folder)
    return model, folder, seconds, trainer.state.log_history


def recall_at_1(scores: torch.Tensor, owners: torch.Tensor) -> dict[str, float]:
    """recall@1 (and @5) in both directions from a ``[captions, images]`` score matrix."""
    from cafe.evaluation.retrieval import retrieval_recall

    result = retrieval_recall(scores, owners, ks=(1, 5))
    return {
        "t2i_r1": result["text_to_image_recall@1"],
        "i2t_r1": result["image_to_text_recall@1"],
        "t2i_r5": result["text_to_image_recall@5"],
        "i2t_r5": result["image_to_text_recall@5"],
    }


def hamming_scores(texts: np.ndarray, images: np.ndarray) -> torch.Tensor:
    """Negative Hamming distance between packed bit vectors (``ubinary``): higher = closer."""
    t = np.unpackbits(texts, axis=1).astype(np.int32)
    i = np.unpackbits(images, axis=1).astype(np.int32)
    # Hamming = popcount(t xor i) = |t| + |i| - 2 t.i
    distance = t.sum(1, keepdims=True) + i.sum(1)[None] - 2 * t @ i.T
    return torch.from_numpy(-distance.astype(np.float32))


def heldout_lm_loss(model, test_json: Path, image_root: Path, batch_size: int = 16) -> float:
    """Teacher-forced next-token loss on the test split's conversations (the demo's record format:
    a description turn and yes/no questions), averaged over supervised tokens."""
    from cafe import CafeCollator
    from cafe.demo import training_records
    from cafe.training import load_records

    records = load_records(str(training_records(test_json)))
    collator = CafeCollator(model.processor, model=model, image_folder=str(image_root), compute_contrastive_loss=False)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(records), batch_size):
            batch = collator([records[i] for i in range(start, min(start + batch_size, len(records)))])
            total += model(cafe_batch=batch).lm_loss.item() * batch.supervised_tokens
            tokens += batch.supervised_tokens
    return total / tokens


def measure(model, folder: Path, images, captions_per_image, records, image_root: Path, args) -> dict:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.quantization import quantize_embeddings

    from cafe.demo import pope_on_records
    from cafe.evaluation.retrieval import caption_image_index

    captions, owners = caption_image_index(captions_per_image)
    image_emb = model.encode(images=images, batch_size=32, show_progress_bar=False)
    text_emb = model.encode(texts=captions, batch_size=32, show_progress_bar=False)
    by_dim = {}
    for dim in DIMS:
        t, i = F.normalize(text_emb[:, :dim], dim=-1), F.normalize(image_emb[:, :dim], dim=-1)
        by_dim[dim] = recall_at_1(t @ i.T, owners)

    # sentence-transformers on the saved folder: truncate_dim and precision.
    st_by_dim = {}
    for dim in (DIMS[0], args.st_check_dim):
        st = SentenceTransformer(str(folder), device="cpu", truncate_dim=dim if dim != DIMS[0] else None)
        st_images = st.encode(images, batch_size=32, convert_to_tensor=True)
        st_texts = st.encode(captions, batch_size=32, convert_to_tensor=True)
        st_by_dim[dim] = recall_at_1(st.similarity(st_texts, st_images), owners)
    st = SentenceTransformer(str(folder), device="cpu")
    st_images = st.encode(images, batch_size=32)
    st_texts = st.encode(captions, batch_size=32)
    precision = {"float32": recall_at_1(torch.from_numpy(st_texts @ st_images.T), owners)}
    # int8 with one calibration for both sides (the image corpus), as an index would store it:
    # scored by the codes' inner product (an int8 inner-product index) and by the decoded vectors'
    # cosine (what rescoring with the codes' buckets recovers).
    q_images = quantize_embeddings(st_images, "int8", calibration_embeddings=st_images)
    q_texts = quantize_embeddings(st_texts, "int8", calibration_embeddings=st_images)
    precision["int8, codes' inner product"] = recall_at_1(
        torch.from_numpy((q_texts.astype(np.int32) @ q_images.astype(np.int32).T).astype(np.float32)), owners
    )
    low, high = st_images.min(0), st_images.max(0)
    step = np.where(high > low, (high - low) / 255, 1)

    def decode(codes: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(low + (codes.astype(np.float32) + 128.5) * step)

    precision["int8, decoded (cosine)"] = recall_at_1(
        F.normalize(decode(q_texts), dim=-1) @ F.normalize(decode(q_images), dim=-1).T, owners
    )
    # encode(precision="int8") calibrates each call on its own batch: texts and images get different ranges.
    e_images = st.encode(images, batch_size=32, precision="int8")
    e_texts = st.encode(captions, batch_size=32, precision="int8")
    precision["int8, encode(precision=) per call"] = recall_at_1(
        torch.from_numpy((e_texts.astype(np.int32) @ e_images.astype(np.int32).T).astype(np.float32)), owners
    )
    b_images = st.encode(images, batch_size=32, precision="ubinary")
    b_texts = st.encode(captions, batch_size=32, precision="ubinary")
    precision["binary (Hamming)"] = recall_at_1(hamming_scores(b_texts, b_images), owners)
    bytes_per_vector = {name: DIMS[0] for name in precision}
    bytes_per_vector["float32"] = 4 * DIMS[0]
    bytes_per_vector["binary (Hamming)"] = DIMS[0] // 8

    pope = pope_on_records(model, records, image_root)
    return {
        "recall_by_dim": by_dim,
        "sentence_transformers_recall_by_dim": st_by_dim,
        "recall_by_precision": precision,
        "bytes_per_vector": bytes_per_vector,
        "pope": {k: pope[k] for k in ("accuracy", "f1", "yes_ratio")},
        "heldout_lm_loss": heldout_lm_loss(model, args.test_json, image_root),
    }


def markdown(report: dict) -> str:
    runs = report["runs"]
    trained = ", ".join(f"{name} {run['train_seconds']:.0f} s" for name, run in runs.items())
    lines = [
        "# Matryoshka and quantised vectors: retrieval cost on the built-in data",
        "",
        f"- Command: `{report['command']}`",
        f"- Model: tiny LLaVA-OneVision, **LLM hidden {HIDDEN}** (2 layers), sizes {DIMS}; {report['config']['max_steps']}"
        f" steps of batch {report['config']['batch_size']} on {report['config']['num_train']} synthetic records, "
        f"test {report['config']['num_test']} images x their captions; seed {report['config']['seed']}",
        f"- Matryoshka weights: {report['config']['matryoshka_weights']} (summing to 1: the contrastive term keeps "
        "the scale of the run without Matryoshka); images at "
        f"{report['config']['image_size']} px",
        f"- Wall time: {report['seconds']:.0f} s (training: {trained})",
        "",
        "## Recall@1 by embedding size (text->image / image->text)",
        "",
        "| size | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for dim in DIMS:
        cells = []
        for run in runs.values():
            r, full = run["recall_by_dim"][str(dim)], run["recall_by_dim"][str(DIMS[0])]
            rel = [r[k] / full[k] if full[k] else float("nan") for k in ("t2i_r1", "i2t_r1")]
            cells.append(
                f"{r['t2i_r1']:.3f} / {r['i2t_r1']:.3f} ({rel[0]:.0%} / {rel[1]:.0%} of full); "
                f"R@5 {r['t2i_r5']:.3f} / {r['i2t_r5']:.3f}"
            )
        lines.append(f"| {dim} | " + " | ".join(cells) + " |")
    lines += ["", "sentence-transformers, `SentenceTransformer(folder, truncate_dim=d)`:", ""]
    for name, run in runs.items():
        parts = [
            f"d={dim}: {r['t2i_r1']:.3f} / {r['i2t_r1']:.3f}"
            for dim, r in run["sentence_transformers_recall_by_dim"].items()
        ]
        lines.append(f"- {name}: " + "; ".join(parts))
    lines += [
        "",
        "## Recall@1 by precision, full size (sentence-transformers)",
        "",
        "| precision | bytes / vector | " + " | ".join(runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    first = next(iter(runs.values()))
    for precision, size in first["bytes_per_vector"].items():
        cells = [
            f"{run['recall_by_precision'][precision]['t2i_r1']:.3f} / {run['recall_by_precision'][precision]['i2t_r1']:.3f}"
            for run in runs.values()
        ]
        lines.append(f"| {precision} | {size} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Generation (test split: teacher-forced LM loss; POPE-style probe, greedy)",
        "",
        "| | held-out LM loss | POPE accuracy | F1 | yes ratio |",
        "|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        p = run["pope"]
        lines.append(
            f"| {name} | {run['heldout_lm_loss']:.3f} | {p['accuracy']:.3f} | {p['f1']:.3f} | {p['yes_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    global DIMS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "retrieval-cost"))
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-test", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument(
        "--matryoshka-weights",
        type=float,
        nargs="+",
        default=None,
        help="default: 1 / len(sizes) each, so the contrastive term keeps the scale of the run "
        "without Matryoshka (summed weights of 1 would multiply it by the number of sizes)",
    )
    parser.add_argument("--image-size", type=int, default=64, help="processor / vision tower image size (px)")
    parser.add_argument(
        "--dims",
        type=int,
        nargs="+",
        default=DIMS,
        help=f"Matryoshka sizes, the full size {HIDDEN} first (default {DIMS})",
    )
    parser.add_argument(
        "--st-check-dim", type=int, default=64, help="a truncated size also run in sentence-transformers"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine 2 threads ran a step 3x slower)",
    )
    args = parser.parse_args(argv)
    args.num_train = args.num_train or (32 if args.quick else 384)
    args.num_test = args.num_test or (12 if args.quick else 200)
    args.max_steps = args.max_steps or (4 if args.quick else 400)
    if args.dims[0] != HIDDEN or sorted(args.dims, reverse=True) != args.dims:
        parser.error(f"--dims must start with the full size {HIDDEN} and decrease, got {args.dims}")
    DIMS = list(args.dims)
    args.matryoshka_weights = args.matryoshka_weights or [1 / len(DIMS)] * len(DIMS)

    from cafe.data import write_synthetic_dataset

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Checkpoints and data go to a temporary folder; only the results are kept.
    work = Path(tempfile.mkdtemp(prefix="cafe-retrieval-cost-"))
    base = build_wide_tiny_checkpoint(work / "base", args.seed, args.image_size)
    paths = write_synthetic_dataset(work / "data", num_train=args.num_train, num_test=args.num_test, seed=args.seed)
    data = {"train": paths["train"], "folder": work / "data"}
    test = json.loads(paths["test"].read_text())
    args.test_json = paths["test"]
    images = [str(work / "data" / r["image"]) for r in test]
    captions = [r["captions"] for r in test]

    runs = {}
    for name, matryoshka in (("Matryoshka", True), ("no Matryoshka", False)):
        print(f"training: {name}", flush=True)
        model, folder, seconds, history = train(base, data, work / name.replace(" ", "-"), args, matryoshka)
        print(f"  {seconds:.0f} s; measuring", flush=True)
        result = measure(model, folder, images, captions, test, work / "data", args)
        result["train_seconds"] = seconds
        result["final_losses"] = (
            {k: v for k, v in history[-2].items() if k.startswith("loss")} if len(history) > 1 else {}
        )
        runs[name] = json.loads(json.dumps(result, default=float))
        print(json.dumps(runs[name]["recall_by_dim"]), flush=True)
    report = {
        "command": "python benchmarks/retrieval_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "dims": DIMS,
        "hidden": HIDDEN,
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    shutil.rmtree(work, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(report))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
