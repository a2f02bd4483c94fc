"""Table 7 of the CAFe paper in miniature: the alpha_lm : alpha_con trade-off.

Protocol (mirrors the paper's):

1. train a small "base VLM" that already captions and answers (LM loss only, like the
   instruction-tuned LLaVA-OneVision the paper starts from), from a small randomly initialised
   LLaVA-OneVision built locally, on the built-in synthetic shapes data; save it;
2. from that same checkpoint, with one compute budget and one batch order (same seed), fine-tune
   LM-only, contrastive-only and CAFe at several alpha_lm : alpha_con ratios (paper default 1:10);
3. measure on held-out images: retrieval R@1 in both directions (several captions per image),
   generation quality (caption attribute accuracy, exact match, POPE-style F1) and the modality gap.

    python examples/reproduce_tradeoff.py --output_dir runs/tradeoff           # ~20 min on 2 CPU cores
    python examples/reproduce_tradeoff.py --output_dir runs/tradeoff --quick   # a smoke run

The table is printed, written to ``<output_dir>/results.md`` / ``results.json``; the figures of
the last full run are in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import torch

from cafe import CafeCollator, CafeForConditionalGeneration, CafeTrainer, CafeTrainingArguments
from cafe.data import write_synthetic_dataset
from cafe.data.synthetic import COUNT_WORDS
from cafe.demo import measure, training_records
from cafe.evaluation import generate_answers
from cafe.training import load_records

# (name, lm_weight, contrastive_weight). Paper Table 7 varies alpha_lm : alpha_con.
VARIANTS = [
    ("LM only", 1.0, 0.0),
    ("contrastive only", 0.0, 10.0),
    ("CAFe 1:10 (paper)", 1.0, 10.0),
    ("CAFe 1:1", 1.0, 1.0),
    ("CAFe 1:50", 1.0, 50.0),
]


def build_small_model(path: Path, seed: int) -> Path:
    """A small LLaVA-OneVision (4-layer Qwen2, hidden 128) built from configs, saved to `path`."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from cafe.testing import save_tiny_checkpoint, tiny_llava_onevision_config, tiny_llava_onevision_processor

    processor = tiny_llava_onevision_processor()
    config = tiny_llava_onevision_config(processor.tokenizer, hidden_size=128, num_layers=4)
    return save_tiny_checkpoint(path, LlavaOnevisionForConditionalGeneration, config, processor, seed)


def train(model_path, data_json, image_folder, output_dir, lm_weight, contrastive_weight, steps, args):
    model = CafeForConditionalGeneration.from_pretrained(model_path)
    training_args = CafeTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        max_steps=steps,
        learning_rate=args.learning_rate,
        vision_tower_learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        lm_weight=lm_weight,
        contrastive_weight=contrastive_weight,
        compute_language_loss=lm_weight > 0,
        compute_contrastive_loss=contrastive_weight > 0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=args.bf16,
        seed=args.seed,
        data_seed=args.seed,
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
    model.save_pretrained(output_dir / "final")
    return output_dir / "final"


def caption_scores(captions: list[str], records: list[dict]) -> dict:
    """Attribute accuracy (colour, shape, size, position, count named correctly) and exact match."""
    correct, exact = 0, 0
    for text, record in zip(captions, records, strict=True):
        a = record["attributes"]
        text_l = text.lower()
        words = set(re.findall(r"[a-z]+", text_l))
        checks = [
            a["colour"] in words,
            a["shape"] in words or a["shape"] + "s" in words,
            a["size"] in words,
            all(w in words for w in a["position"].split("_")) if "_" in a["position"] else a["position"] in words,
            (COUNT_WORDS[a["count"]] in words) or (a["count"] == 1 and ("a" in words or "one" in words)),
        ]
        correct += sum(checks)
        exact += text.strip().rstrip(".").lower() == record["caption"].strip().rstrip(".").lower()
    return {"caption_attribute_accuracy": correct / (5 * len(records)), "caption_exact_match": exact / len(records)}


def evaluate(model_path, test_records, image_root: Path, plot_path: Path) -> dict:
    model = CafeForConditionalGeneration.from_pretrained(model_path).eval()
    metrics = measure(model, test_records, image_root, plot_path, ks=(1,))
    images = [str(image_root / r["image"]) for r in test_records]
    captions = generate_answers(
        model,
        images,
        ["Describe the picture."] * len(images),
        prompt_suffix="",
        max_new_tokens=24,
        show_progress_bar=False,
    )
    return {
        "t2i_R@1": metrics["text_to_image_recall@1"],
        "i2t_R@1": metrics["image_to_text_recall@1"],
        **caption_scores(captions, test_records),
        "pope_f1": metrics["pope_f1"],
        "modality_gap": metrics["modality_gap"],
        "example_caption": captions[0],
    }


def markdown_table(rows: dict[str, dict]) -> str:
    cols = ["t2i_R@1", "i2t_R@1", "caption_attribute_accuracy", "caption_exact_match", "pope_f1", "modality_gap"]
    header = "| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    return header + "".join(
        f"| {name} | " + " | ".join(f"{metrics[c]:.3f}" for c in cols) + " |\n" for name, metrics in rows.items()
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/tradeoff")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--base_steps", type=int, default=None)
    parser.add_argument("--finetune_steps", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast (faster on CPUs with bf16 matmul)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base_steps = args.base_steps or (4 if args.quick else 500)
    finetune_steps = args.finetune_steps or (2 if args.quick else 150)
    num_train, num_test = (64, 16) if args.quick else (1024, 64)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.time()

    paths = write_synthetic_dataset(
        out / "data", num_train=num_train, num_test=num_test, seed=args.seed, num_captions=3
    )
    train_json = training_records(paths["train"])
    test_records = json.loads(paths["test"].read_text())

    print(f"[base] LM-only pre-training of a small VLM, {base_steps} steps")
    init = build_small_model(out / "init", args.seed)
    base = train(init, train_json, out / "data", out / "base", 1.0, 0.0, base_steps, args)
    results = {"base (LM pre-trained)": evaluate(base, test_records, out / "data", out / "gap_base.png")}
    print(markdown_table(results))

    for name, lm_weight, con_weight in VARIANTS:
        print(f"[{name}] {finetune_steps} steps from base, alpha_lm={lm_weight}, alpha_con={con_weight}")
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        final = train(base, train_json, out / "data", out / slug, lm_weight, con_weight, finetune_steps, args)
        results[name] = evaluate(final, test_records, out / "data", out / f"gap_{slug}.png")
        print(markdown_table(results))

    table = markdown_table(results)
    seconds = time.time() - started
    config = {
        "base_steps": base_steps,
        "finetune_steps": finetune_steps,
        "num_train": num_train,
        "num_test": num_test,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "bf16": args.bf16,
        "seed": args.seed,
        "seconds": round(seconds),
    }
    (out / "results.json").write_text(json.dumps({"config": config, "results": results}, indent=1))
    (out / "results.md").write_text(table + f"\nconfig: {json.dumps(config)}\n")
    print(table)
    print(f"done in {seconds / 60:.1f} min; {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
