"""Table 7 of the CAFe paper in miniature: the alpha_lm : alpha_con trade-off, over seeds.

Protocol (mirrors the paper's):

1. train a small "base VLM" that already captions (LM loss only, standing in for the
   instruction-tuned LLaVA-OneVision the paper starts from), from a small randomly initialised
   LLaVA-OneVision built locally, on the built-in synthetic shapes data; save it (shared by every
   fine-tune, cached on disk);
2. from that checkpoint, with one compute budget, fine-tune at alpha_lm : alpha_con from 1:0
   (LM only) to 0:1 (contrastive only), the paper's 1:10 included, once per seed (the seed sets
   the batch order);
3. measure on held-out images: retrieval R@1 in both directions (three captions per image), at
   instance level (`cafe.evaluation.retrieval_recall`: only the query's own image / captions
   count) and at scene level (any image of the same drawn scene counts: the test set repeats
   scenes, see `group_recall_ceiling`), generation quality (caption attribute accuracy and exact
   match of greedy captions, `cafe.evaluation.caption_attribute_accuracy`) and the modality gap.
   (No POPE column: these models are only ever taught to caption, so they do not answer yes/no
   questions; `cafe demo` trains on them and shows the probe.)

    python examples/reproduce_tradeoff.py --output_dir runs/tradeoff           # ~1 h on 1 CPU thread
    python examples/reproduce_tradeoff.py --output_dir runs/tradeoff --quick   # a smoke run

Every finished (ratio, seed) is cached as JSON under ``<output_dir>/runs/`` (with the settings it
ran with) and skipped on a rerun with the same settings, so an interrupted run resumes. The table
is printed and written to ``<output_dir>/results.md`` / ``results.json``, the trade-off plot to
``<output_dir>/tradeoff.png``; the figures of the last full run are in docs/results.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cafe import CafeCollator, CafeForConditionalGeneration, CafeTrainer, CafeTrainingArguments
from cafe.data import write_synthetic_dataset
from cafe.evaluation import (
    caption_image_index,
    evaluate_captions,
    group_recall_ceiling,
    modality_gap,
    retrieval_recall,
)
from cafe.training import load_records

# alpha_lm : alpha_con, as in the paper's Table 7. The LM weight stays 1 wherever there is an LM
# term, so the ratios differ only in the contrastive weight. A single term's overall scale (0:1
# as 0:1 or 0:10) hardly matters under Adam; only gradient clipping sees it.
RATIOS = [
    ("1:0 (LM only)", 1.0, 0.0),
    ("10:1", 1.0, 0.1),
    ("1:1", 1.0, 1.0),
    ("1:10 (paper)", 1.0, 10.0),
    ("1:50", 1.0, 50.0),
    ("0:1 (contrastive only)", 0.0, 1.0),
]

# The table's columns: (key in the metrics, header).
COLUMNS = [
    ("t2i_R@1", "t2i R@1"),
    ("i2t_R@1", "i2t R@1"),
    ("scene_t2i_R@1", "scene t2i R@1"),
    ("scene_i2t_R@1", "scene i2t R@1"),
    ("caption_attribute_accuracy", "caption attr. acc."),
    ("caption_exact_match", "caption exact"),
    ("modality_gap", "modality gap"),
]


def build_small_model(path: Path, hidden_size: int, num_layers: int) -> Path:
    """A small LLaVA-OneVision (the tiny SigLIP of `cafe.testing`, a Qwen2 of `hidden_size` x
    `num_layers`) built from configs, randomly initialised and saved to `path`."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from cafe.testing import save_tiny_checkpoint, tiny_llava_onevision_config, tiny_llava_onevision_processor

    processor = tiny_llava_onevision_processor()
    config = tiny_llava_onevision_config(processor.tokenizer, hidden_size=hidden_size, num_layers=num_layers)
    return save_tiny_checkpoint(path, LlavaOnevisionForConditionalGeneration, config, processor, seed=0)


def caption_records(json_path: Path) -> Path:
    """Training records: LM on the description turn, contrast on the image's captions.

    Each record is one image with one turn, "Describe the picture." answered by its canonical
    caption, and its paraphrased captions as contrastive positives (one is drawn per use). The
    later question-answer turns of the synthetic conversations are left out on purpose: they can
    be copied from the caption before them, so they add LM loss that the image does not help
    with, and a model this small then settles on the text prior and never learns to look (its
    captions stay at the prior's ~0.33 attribute accuracy).
    """
    records = [
        {"id": r["id"], "image": r["image"], "conversations": r["conversations"][:2], "positives": r["captions"]}
        for r in json.loads(json_path.read_text())
    ]
    out = json_path.with_name(json_path.stem + "-captions.json")
    out.write_text(json.dumps(records))
    return out


def train(
    model_path: Path,
    data_json: Path,
    image_folder: Path,
    output_dir: Path,
    lm_weight: float,
    contrastive_weight: float,
    steps: int,
    learning_rate: float,
    seed: int,
    args: argparse.Namespace,
) -> CafeForConditionalGeneration:
    """`steps` steps of ``lm_weight * L_lm + contrastive_weight * L_con`` from `model_path`; the trained model."""
    model = CafeForConditionalGeneration.from_pretrained(model_path)
    training_args = CafeTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        max_steps=steps,
        learning_rate=learning_rate,
        vision_tower_learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        lm_weight=lm_weight,
        contrastive_weight=contrastive_weight,
        compute_language_loss=lm_weight > 0,
        compute_contrastive_loss=contrastive_weight > 0,
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    trainer = CafeTrainer(
        model=model,
        args=training_args,
        train_dataset=load_records(str(data_json)),
        data_collator=CafeCollator(
            model.processor,
            model=model,
            image_folder=str(image_folder),
            compute_language_loss=lm_weight > 0,
            compute_contrastive_loss=contrastive_weight > 0,
        ),
        processing_class=model.processor,
    )
    trainer.train()
    return model.eval()


def scene(record: dict) -> tuple:
    """The drawn scene of a synthetic record: two images with the same scene share their captions."""
    return tuple(sorted(record["attributes"].items()))


def evaluate(model: CafeForConditionalGeneration, test_records: list[dict], image_root: Path) -> dict[str, Any]:
    """Retrieval (instance and scene level), caption scores and the modality gap."""
    images = [str(image_root / r["image"]) for r in test_records]
    captions, owners = caption_image_index([r["captions"] for r in test_records])
    # One embedding pass serves both recalls and the gap.
    image_embeddings = model.encode(images=images, batch_size=32, show_progress_bar=False).float()
    text_embeddings = model.encode(texts=captions, batch_size=32, show_progress_bar=False).float()
    scores = text_embeddings @ image_embeddings.T
    instance = retrieval_recall(scores, owners, ks=(1,))
    by_scene = retrieval_recall(scores, owners, ks=(1,), image_groups=[scene(r) for r in test_records])
    generated = evaluate_captions(
        model,
        images,
        [r["attributes"] for r in test_records],
        [r["caption"] for r in test_records],
        batch_size=32,
        show_progress_bar=False,
    )
    return {
        "t2i_R@1": instance["text_to_image_recall@1"],
        "i2t_R@1": instance["image_to_text_recall@1"],
        "scene_t2i_R@1": by_scene["text_to_image_recall@1"],
        "scene_i2t_R@1": by_scene["image_to_text_recall@1"],
        "caption_attribute_accuracy": generated["attribute_accuracy"],
        **{f"caption_{k}": v for k, v in generated.items() if k.endswith("_accuracy") and k != "attribute_accuracy"},
        "caption_exact_match": generated["exact_match"],
        "modality_gap": modality_gap(image_embeddings, text_embeddings),
        "example_captions": generated["captions"][:3],
    }


def _same_settings(path: Path, settings: dict) -> bool:
    return path.exists() and json.loads(path.read_text()).get("settings") == settings


def cached(path: Path, settings: dict, compute: Callable[[], dict]) -> dict:
    """``compute()``'s metrics, read from `path` if it holds a result of the same `settings`."""
    if _same_settings(path, settings):
        return json.loads(path.read_text())["metrics"]
    started = time.time()
    metrics = compute()
    metrics["seconds"] = round(time.time() - started, 1)
    path.write_text(json.dumps({"settings": settings, "metrics": metrics}, indent=1))
    return metrics


def summarise(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean, population std, min and max over seeds of every numeric metric."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {
        key: {
            "mean": statistics.fmean(run[key] for run in runs),
            "std": statistics.pstdev(run[key] for run in runs),
            "min": min(run[key] for run in runs),
            "max": max(run[key] for run in runs),
        }
        for key in keys
    }


def markdown_table(base: dict, summaries: dict[str, dict], num_seeds: int) -> str:
    header = "| alpha_lm : alpha_con | " + " | ".join(title for _, title in COLUMNS) + " |\n"
    header += "|---|" + "---|" * len(COLUMNS) + "\n"
    rows = "| base (before fine-tuning) | " + " | ".join(f"{base[key]:.3f}" for key, _ in COLUMNS) + " |\n"
    for name, summary in summaries.items():
        # Mean over seeds, and the range (min-max) that the seeds span.
        cells = [
            f"{summary[key]['mean']:.3f} ({summary[key]['min']:.3f}-{summary[key]['max']:.3f})" for key, _ in COLUMNS
        ]
        rows += f"| {name} | " + " | ".join(cells) + " |\n"
    return header + rows + f"\nMean over {num_seeds} seeds (min-max in parentheses).\n"


def plot_tradeoff(base: dict, summaries: dict[str, dict], path: Path, ceiling: float) -> None:
    """Text -> image R@1 (scene level, and instance level under its `ceiling`) against caption
    attribute accuracy: one point per ratio, bars spanning the seeds (min-max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for axes, key, title in zip(panels, ("scene_t2i_R@1", "t2i_R@1"), ("scene level", "instance level"), strict=True):
        for name, summary in summaries.items():
            x, y = summary[key], summary["caption_attribute_accuracy"]
            axes.errorbar(
                x["mean"],
                y["mean"],
                xerr=[[x["mean"] - x["min"]], [x["max"] - x["mean"]]],
                yerr=[[y["mean"] - y["min"]], [y["max"] - y["mean"]]],
                fmt="o",
                capsize=3,
                label=name,
            )
            axes.annotate(name.split(" ")[0], (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 4))
        axes.scatter(base[key], base["caption_attribute_accuracy"], marker="*", s=120, c="k", label="base", zorder=3)
        if key == "t2i_R@1":
            axes.axvline(ceiling, color="grey", linestyle="--", label=f"instance ceiling {ceiling:.2f}")
        axes.set_xlim(-0.03, 1.03)
        axes.set_xlabel(f"text -> image R@1, {title}")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("caption attribute accuracy")
    panels[1].legend(fontsize="small", loc="lower left")
    figure.suptitle("alpha_lm : alpha_con trade-off (mean over seeds, bars: min-max)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def finetune_and_evaluate(
    base_path: Path, train_json: Path, test_records: list[dict], out: Path, name: str, lm_weight: float,
    contrastive_weight: float, seed: int, args: argparse.Namespace,
) -> dict:  # fmt: skip
    print(f"[{name}, seed {seed}] {args.finetune_steps} steps from the base", flush=True)
    model = train(
        base_path, train_json, out / "data", out / "finetune-run", lm_weight, contrastive_weight,
        args.finetune_steps, args.learning_rate, seed, args,
    )  # fmt: skip
    return evaluate(model, test_records, out / "data")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/tradeoff")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data, model and budgets, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="fine-tuning seeds (default: 0 1 2)")
    parser.add_argument("--num_train", type=int, default=None, help="train images (default 2048)")
    parser.add_argument("--num_test", type=int, default=None, help="test images (default 512)")
    parser.add_argument("--hidden_size", type=int, default=None, help="Qwen2 hidden size (default 128)")
    parser.add_argument("--num_layers", type=int, default=4, help="Qwen2 layers")
    parser.add_argument("--base_steps", type=int, default=None, help="base LM-only steps (default 1000)")
    parser.add_argument("--base_batch_size", type=int, default=16)
    # Above ~2e-3 this model never learns to look at the image (its captions stay at the text
    # prior), see docs/results.md.
    parser.add_argument("--base_learning_rate", type=float, default=1e-3)
    parser.add_argument("--finetune_steps", type=int, default=None, help="fine-tuning steps (default 400)")
    parser.add_argument("--batch_size", type=int, default=None, help="fine-tuning batch (default 32)")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="fine-tuning learning rate")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast (faster on CPUs with bf16 matmul)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds or ([0] if quick else [0, 1, 2])
    args.num_train = args.num_train or (64 if quick else 2048)
    args.num_test = args.num_test or (16 if quick else 512)
    args.hidden_size = args.hidden_size or (64 if quick else 128)
    args.base_steps = args.base_steps or (4 if quick else 1000)
    args.finetune_steps = args.finetune_steps or (2 if quick else 400)
    args.batch_size = args.batch_size or (8 if quick else 32)
    out = Path(args.output_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.time()

    paths = write_synthetic_dataset(out / "data", num_train=args.num_train, num_test=args.num_test, num_captions=3)
    train_json = caption_records(paths["train"])
    test_records = json.loads(paths["test"].read_text())

    # Every cached result records the settings it ran with; a rerun reuses only exact matches.
    base_settings = {
        "num_train": args.num_train,
        "num_test": args.num_test,
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "bf16": args.bf16,
        "steps": args.base_steps,
        "batch_size": args.base_batch_size,
        "learning_rate": args.base_learning_rate,
    }
    base_path = out / "base"
    base_record = out / "runs" / "base.json"
    if not (base_path / "config.json").exists() or not _same_settings(base_record, base_settings):
        base_record.unlink(missing_ok=True)
        print(f"[base] LM-only training of a small VLM, {args.base_steps} steps", flush=True)

    def train_base() -> dict:
        init = build_small_model(out / "init", args.hidden_size, args.num_layers)
        base_args = argparse.Namespace(**{**vars(args), "batch_size": args.base_batch_size})
        model = train(
            init, train_json, out / "data", out / "base-run", 1.0, 0.0, args.base_steps,
            args.base_learning_rate, 0, base_args,
        )  # fmt: skip
        model.save_pretrained(base_path)
        return evaluate(model, test_records, out / "data")

    base = cached(base_record, base_settings, train_base)
    print(f"[base] caption attribute accuracy {base['caption_attribute_accuracy']:.3f}", flush=True)

    # Seeds outermost: an interrupted run still has every ratio for the seeds it finished.
    results: dict[str, list[dict]] = {name: [] for name, _, _ in RATIOS}
    for seed in args.seeds:
        for name, lm_weight, contrastive_weight in RATIOS:
            settings = {
                "base": base_settings,
                "steps": args.finetune_steps,
                "batch_size": args.batch_size,
                "learning_rate": args.learning_rate,
                "lm_weight": lm_weight,
                "contrastive_weight": contrastive_weight,
                "seed": seed,
            }
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            run = functools.partial(
                finetune_and_evaluate, base_path, train_json, test_records, out, name, lm_weight,
                contrastive_weight, seed, args,
            )  # fmt: skip
            results[name].append(cached(out / "runs" / f"{slug}-seed{seed}.json", settings, run))
        done = {name: summarise(runs) for name, runs in results.items()}
        print(markdown_table(base, done, len(results[RATIOS[0][0]])), flush=True)

    summaries = {name: summarise(runs) for name, runs in results.items()}
    groups = [scene(r) for r in test_records]
    ceiling = group_recall_ceiling(groups, caption_image_index([r["captions"] for r in test_records])[1])
    table = markdown_table(base, summaries, len(args.seeds))
    config = {
        **{f"base_{k}" if k in ("steps", "batch_size", "learning_rate") else k: v for k, v in base_settings.items()},
        "finetune_steps": args.finetune_steps,
        "finetune_batch_size": args.batch_size,
        "finetune_learning_rate": args.learning_rate,
        "seeds": args.seeds,
        "distinct_test_scenes": len(set(groups)),
        "instance_R@1_ceiling": ceiling,
        # Training and evaluation time summed over the cached runs (whatever invocation ran them).
        "seconds": round(base["seconds"] + sum(r["seconds"] for runs in results.values() for r in runs)),
        "seconds_this_invocation": round(time.time() - started),
    }
    (out / "results.json").write_text(
        json.dumps({"config": config, "base": base, "summaries": summaries, "runs": results}, indent=1)
    )
    (out / "results.md").write_text(table + f"\nconfig: {json.dumps(config)}\n")
    plot_tradeoff(base, summaries, out / "tradeoff.png", ceiling["text_to_image_recall@1"])
    print(table)
    print(
        f"{config['distinct_test_scenes']} distinct scenes among {args.num_test} test images: instance-level R@1 "
        f"ceiling t2i {ceiling['text_to_image_recall@1']:.3f}, i2t {ceiling['image_to_text_recall@1']:.3f}"
    )
    print(f"{config['seconds'] / 60:.1f} min of runs; {out / 'results.md'}, {out / 'tradeoff.png'}")
    return {"config": config, "base": base, "summaries": summaries, "runs": results}


if __name__ == "__main__":
    main()
