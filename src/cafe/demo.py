"""`cafe demo`: CAFe end to end, offline, in a few minutes on a laptop CPU.

1. build the tiny LLaVA-OneVision checkpoint locally (or start from ``--model``);
2. generate the built-in synthetic shapes data (train / test, JSON + image folder), and with
   ``--video`` the built-in clips of moving shapes (one PNG per frame);
3. make the random tiny model a base VLM: LM-only steps on captions and yes/no questions, the
   stand-in for the pretrained VLM that CAFe starts from (skipped for ``--model``);
4. measure zero-shot retrieval (recall@K both ways), the attributes that greedy captions name
   (does generation survive the contrastive term?), the POPE-style probe (shown only for a model
   that answers yes or no) and the modality gap; with ``--video`` also text <-> video recall@K
   and the motion named by generated captions;
5. fine-tune with CAFe (``lm_weight * L_lm + contrastive_weight * L_con``) on the train split
   (images and clips mixed in every batch);
6. measure again, print a before / after table, save the checkpoint, the plots and a JSON report.

The base is a ~1M-parameter model trained for a minute: its zero-shot retrieval is at chance
and its captions name about half the attributes. The demo shows the pipeline and that CAFe adds
retrieval while the captions keep, not a real model's quality.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .data import write_synthetic_dataset
from .evaluation import evaluate_captions, evaluate_modality_gap, evaluate_pope, evaluate_retrieval
from .evaluation.pope import DEFAULT_POPE_PROMPT_SUFFIX

if TYPE_CHECKING:
    from .modeling import CafeForConditionalGeneration


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cafe demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="start from this checkpoint instead of building the tiny one")
    parser.add_argument("--output_dir", default="cafe-demo")
    parser.add_argument("--quick", action="store_true", help="small data and budget (about a minute)")
    parser.add_argument("--num_train", type=int, default=None)
    parser.add_argument("--num_test", type=int, default=None)
    parser.add_argument("--max_steps", type=int, default=None, help="CAFe fine-tuning steps")
    parser.add_argument(
        "--base_steps",
        type=int,
        default=None,
        help="LM-only steps that make the built tiny model a captioning VLM before CAFe (not with --model)",
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--contrastive_weight", type=float, default=10.0)
    parser.add_argument("--lm_weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--video", action="store_true", help="also train on and measure the built-in video clips")
    parser.add_argument("--num_train_clips", type=int, default=None)
    parser.add_argument("--num_test_clips", type=int, default=None)
    return parser


# Clips at the tiny model's input size (its processors resize frames to 32 px anyway).
CLIP_IMAGE_SIZE = 32


def clip_training_records(json_path: Path) -> list[dict]:
    """Demo video records: LM on the clip's conversation (description, motion question), contrast
    on its caption; the ground-truth fields are dropped (they differ from the images')."""
    records = json.loads(json_path.read_text())
    return [
        {"id": r["id"], "video": r["video"], "conversations": r["conversations"], "positives": [r["caption"]]}
        for r in records
    ]


def measure_video(
    model: CafeForConditionalGeneration, test_clips: list[dict], root: Path, ks: Iterable[int] = (1, 5, 10)
) -> dict:
    """Text <-> video recall@K and the motion accuracy of greedy captions on the test clips."""
    from .evaluation import evaluate_video_captions, evaluate_video_retrieval

    videos = [r["video"] for r in test_clips]
    retrieval = evaluate_video_retrieval(
        model, videos, [r["captions"] for r in test_clips], ks=ks, video_root=root, show_progress_bar=False
    )
    captions = evaluate_video_captions(
        model, videos, [r["attributes"]["motion"] for r in test_clips], video_root=root, show_progress_bar=False
    )
    return {
        **{k: v for k, v in retrieval.items() if "recall" in k},
        "video_motion_accuracy": captions["motion_accuracy"],
    }


def training_records(json_path: Path, extra: list[dict] | None = None) -> Path:
    """Demo training records: two conversations per train image, both contrasting it with its caption.

    * the description turn ("Describe the picture." -> caption), the turn the caption metric asks;
    * two POPE-style yes/no questions about the same image (one yes, one no, from its ``pope``
      list), with the probe's answer-format instruction as LLaVA's VQA data has it.

    The yes/no questions get a conversation of their own because, asked after the description,
    they can be answered by copying from it (and so can the data's other QA turns: colour, shape,
    count...), which teaches the tiny model to read its context rather than the image; those QA
    turns are left out for the same reason. Both records of an image carry the same contrastive
    pair, which the collator marks as one group (not as each other's negatives).
    The questions come from the train images, so the probe on the test images measures
    generalisation, not recall.
    """
    records = json.loads(json_path.read_text())
    out_records: list[dict] = []
    for record in records:
        describe = record["conversations"][:2]
        yes = next(q for q in record["pope"] if q["answer"] == "yes")
        no = next(q for q in record["pope"] if q["answer"] == "no")
        # The image token opens the first turn of each conversation; which question comes first
        # alternates, so the answer's position tells nothing.
        questions = [yes, no] if len(out_records) % 4 == 0 else [no, yes]
        yes_no = []
        for i, question in enumerate(questions):
            yes_no += [
                {
                    "from": "human",
                    "value": ("<image>\n" if i == 0 else "") + question["question"] + DEFAULT_POPE_PROMPT_SUFFIX,
                },
                {"from": "gpt", "value": question["answer"].capitalize() + "."},
            ]
        for suffix, conversation in (("describe", describe), ("yes-no", yes_no)):
            out_records.append(
                {
                    "id": f"{record['id']}-{suffix}",
                    "image": record["image"],
                    "conversations": conversation,
                    "positives": [record["caption"]],
                }
            )
    out_records += extra or []
    out = json_path.with_name(json_path.stem + "-cafe.json")
    out.write_text(json.dumps(out_records))
    return out


def pope_on_records(model: CafeForConditionalGeneration, records: list[dict], image_root: Path) -> dict:
    """The POPE-style probe on the yes/no questions (``pope``) of synthetic records."""
    questions = [q for r in records for q in r["pope"]]
    pope_images = [str(image_root / r["image"]) for r in records for _ in r["pope"]]
    # Yes/no answers: a few tokens are enough for the parser.
    return evaluate_pope(
        model,
        pope_images,
        [q["question"] for q in questions],
        [q["answer"] for q in questions],
        max_new_tokens=4,
        show_progress_bar=False,
    )


def measure(
    model: CafeForConditionalGeneration,
    test_records: list[dict],
    image_root: Path,
    plot_path: Path,
    ks: Iterable[int] = (1, 5, 10),
) -> dict:
    """Retrieval recall@K both ways, caption attribute accuracy, the POPE-style probe and the
    modality gap on synthetic test records."""
    images = [str(image_root / r["image"]) for r in test_records]
    retrieval = evaluate_retrieval(model, images, [r["captions"] for r in test_records], ks=ks, show_progress_bar=False)
    # Greedy captions of the description turn the training data teaches: does generation survive?
    captions = evaluate_captions(
        model,
        images,
        [r["attributes"] for r in test_records],
        [r["caption"] for r in test_records],
        batch_size=16,
        show_progress_bar=False,
    )
    pope = pope_on_records(model, test_records, image_root)
    gap = evaluate_modality_gap(
        model, images, [r["caption"] for r in test_records], plot_path=plot_path, show_progress_bar=False
    )
    return {
        **{k: v for k, v in retrieval.items() if "recall" in k},
        "caption_attribute_accuracy": captions["attribute_accuracy"],
        "pope_accuracy": pope["accuracy"],
        "pope_f1": pope["f1"],
        "pope_yes_ratio": pope["yes_ratio"],
        # The share of answers that are a yes or a no at all: POPE figures mean little below ~1.
        "pope_answered": 1.0 - pope["other_ratio"],
        "modality_gap": gap["modality_gap"],
    }


# Below this share of yes/no answers a model's POPE figures score the answer format, not
# hallucination (an untrained model answers "square square ..."), so the table leaves them out.
MIN_POPE_ANSWERED = 0.5


def before_after_table(before: dict, after: dict, min_pope_answered: float = MIN_POPE_ANSWERED) -> str:
    """The demo's before / after table; POPE figures only for a model answering yes/no often enough.

    A POPE cell is ``-`` when that model answered fewer than `min_pope_answered` of the questions
    with yes or no; when neither did, the POPE rows are left out. A line under the table says why.
    """
    answered = {"before": before.get("pope_answered", 1.0), "after": after.get("pope_answered", 1.0)}
    shown = {column: share >= min_pope_answered for column, share in answered.items()}
    rows = []
    for name in before:
        if name.startswith("pope_") and name != "pope_answered" and not any(shown.values()):
            continue
        cells = [
            "-" if name.startswith("pope_") and name != "pope_answered" and not shown[column] else f"{value:.3f}"
            for column, value in (("before", before[name]), ("after", after[name]))
        ]
        rows.append((name, *cells))
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'metric':<{width}}  {'before':>8}  {'after':>8}", "-" * (width + 20)]
    lines += [f"{name:<{width}}  {b:>8}  {a:>8}" for name, b, a in rows]
    hidden = [f"{answered[c]:.0%} ({c})" for c in ("before", "after") if not shown[c]]
    if hidden:
        where = "rows left out" if not any(shown.values()) else "'-' cells"
        lines.append(
            f"POPE {where}: the model answered only {' / '.join(hidden)} of the yes/no questions with yes or "
            f"no (< {min_pope_answered:.0%}), so its POPE figures would score the answer format, not hallucination."
        )
    return "\n".join(lines)


def demo_main(argv: list[str] | None = None) -> dict:
    import torch

    from .collator import CafeCollator
    from .modeling import CafeForConditionalGeneration
    from .testing import build_tiny_checkpoint
    from .trainer import CafeTrainer, CafeTrainingArguments
    from .training import load_records

    args = _parser().parse_args(argv)
    num_train = args.num_train or (32 if args.quick else 384)
    num_test = args.num_test or (12 if args.quick else 64)
    max_steps = args.max_steps or (4 if args.quick else 800)
    # Only the tiny model built here needs to learn to caption first; a given --model is a VLM already.
    default_base_steps = 0 if args.model else (4 if args.quick else 800)
    base_steps = default_base_steps if args.base_steps is None else args.base_steps
    batch_size = min(args.batch_size, num_train)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.time()
    torch.manual_seed(args.seed)

    print(f"[1/6] model: {args.model or 'tiny LLaVA-OneVision built locally'}")
    model_path = args.model or build_tiny_checkpoint(output / "base", seed=args.seed)
    model = CafeForConditionalGeneration.from_pretrained(model_path)
    processor = model.processor
    if processor is None:
        raise ValueError(f"{model_path} has no processor files; the demo needs the model's processor.")

    print(f"[2/6] data: {num_train} train / {num_test} test synthetic shape images in {output / 'data'}")
    paths = write_synthetic_dataset(output / "data", num_train=num_train, num_test=num_test, seed=args.seed)
    test_records = json.loads(paths["test"].read_text())
    train_clips, test_clips = [], []
    if args.video:
        from .data import generate_clip_records, write_clip_records

        num_train_clips = args.num_train_clips or (16 if args.quick else 96)
        num_test_clips = args.num_test_clips or (8 if args.quick else 32)
        print(f"      + {num_train_clips} train / {num_test_clips} test clips of moving shapes")
        clip_paths = {
            split: write_clip_records(
                generate_clip_records(n, seed=args.seed, split=split, image_size=CLIP_IMAGE_SIZE),
                output / "data",
                split,
            )
            for split, n in (("train", num_train_clips), ("test", num_test_clips))
        }
        train_clips = clip_training_records(clip_paths["train"])
        test_clips = json.loads(clip_paths["test"].read_text())

    def measure_all(plot_path: Path) -> dict:
        result = measure(model, test_records, output / "data", plot_path)
        if test_clips:
            result.update(measure_video(model, test_clips, output / "data"))
        return result

    train_records = load_records(str(training_records(paths["train"], train_clips)))

    def fine_tune(name: str, steps: int, lm_weight: float, contrastive_weight: float) -> list[dict]:
        """`steps` steps of ``lm_weight * L_lm + contrastive_weight * L_con`` on the train records."""
        training_args = CafeTrainingArguments(
            output_dir=str(output / name),
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            learning_rate=args.learning_rate,
            vision_tower_learning_rate=args.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            contrastive_weight=contrastive_weight,
            lm_weight=lm_weight,
            compute_contrastive_loss=contrastive_weight > 0,
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            seed=args.seed,
            disable_tqdm=False,
        )
        trainer = CafeTrainer(
            model=model,
            args=training_args,
            train_dataset=train_records,
            data_collator=CafeCollator(
                processor,
                model=model,
                image_folder=str(output / "data"),
                compute_contrastive_loss=contrastive_weight > 0,
            ),
            processing_class=processor,
        )
        trainer.train()
        model.eval()
        return trainer.state.log_history

    base_log: list[dict] = []
    if base_steps:
        print(
            f"[3/6] base VLM: {base_steps} LM-only steps teach the random tiny model to caption and answer "
            "(what a pretrained VLM, CAFe's starting point, already does)"
        )
        base_log = fine_tune("base-run", base_steps, lm_weight=1.0, contrastive_weight=0.0)
    else:
        print(f"[3/6] base VLM: {model_path} as given")

    print("[4/6] zero-shot evaluation of the base")
    before = measure_all(output / "modality_gap_before.png")

    print(
        f"[5/6] CAFe fine-tuning: {max_steps} steps, batch {batch_size}, "
        f"alpha_lm={args.lm_weight}, alpha_con={args.contrastive_weight}"
    )
    cafe_log = fine_tune("run", max_steps, args.lm_weight, args.contrastive_weight)

    print("[6/6] evaluation after CAFe")
    after = measure_all(output / "modality_gap_after.png")
    checkpoint = output / "checkpoint"
    model.save_pretrained(checkpoint)

    print(before_after_table(before, after))
    report = {
        "before": before,
        "after": after,
        "config": {
            **vars(args),
            "num_train": num_train,
            "num_test": num_test,
            "max_steps": max_steps,
            "base_steps": base_steps,
        },
        "base_train_log": base_log,
        "train_log": cafe_log,
        "checkpoint": str(checkpoint),
        "seconds": round(time.time() - started, 1),
    }
    (output / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(
        f"Saved {checkpoint} (loads in transformers and sentence-transformers), plots and report.json "
        f"in {output} ({report['seconds']} s)"
    )
    return report
