"""MMEB (Massive Multimodal Embedding Benchmark) precision@1, in VLM2Vec's data layout.

Each MMEB subset is a table with one row per query::

    qry_text: str            query text (may hold Phi-3's "<|image_1|>" marker), "" if none
    qry_img_path: str        query image path relative to the image folder, "" if none
    tgt_text: list[str]      candidate texts ("" or a list of "" for image-only candidates)
    tgt_img_path: list[str]  candidate image paths ("" for text-only candidates)

Each query is scored against **its own** candidate list, whose first entry is the positive.
precision@1 is the fraction of queries whose positive scores highest. Tie rule: the positive must
score *strictly* higher than every other candidate (a tie counts against it). VLM2Vec takes
``argmax``, which resolves an exact tie in favour of index 0, i.e. of the positive; the strict
rule keeps a constant-output model at 0 instead of 100.

Scores are averaged per subset, then per meta-task (Classification, VQA, Retrieval, Visual
Grounding), per in-distribution / out-of-distribution group and over all subsets, as in the
paper's Table 3. Results are fractions in [0, 1].
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._common import (
    check_batch_size,
    check_scores,
    check_sequence,
    load_any_dataset,
    require_columns,
    resolve_image,
    select_rows,
)

if TYPE_CHECKING:
    from ..modeling import CafeForConditionalGeneration

MMEB_META_TASKS: dict[str, tuple[str, ...]] = {
    "Classification": (
        "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
        "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211",
    ),
    "VQA": (
        "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA",
        "Visual7W", "ScienceQA", "VizWiz", "GQA", "TextVQA",
    ),
    "Retrieval": (
        "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
        "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS",
    ),
    "Visual Grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}  # fmt: skip
# The 20 subsets whose training splits are in MMEB-train; the other 16 are out-of-distribution.
MMEB_IN_DISTRIBUTION: frozenset[str] = frozenset(
    {
        "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
        "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
        "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
        "MSCOCO",
    }
)  # fmt: skip
MMEB_SUBSETS: tuple[str, ...] = tuple(name for names in MMEB_META_TASKS.values() for name in names)

# VLM2Vec's data marks the image position with Phi-3-V's token; cafe places images itself.
PHI3_IMAGE_TOKEN = re.compile(r"<\|image_\d+\|>")


def precision_at_1_per_query(scores: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether each query's positive (candidate 0) strictly beats all its other candidates.

    Args:
        scores: ``[num_queries, num_candidates]`` tensor, or a sequence of ``num_queries`` 1-D
            tensors when candidate lists differ in length. Column / entry 0 is the positive.

    Returns:
        ``[num_queries]`` bool tensor. A query with a single candidate is a hit.
    """
    if isinstance(scores, torch.Tensor) or (len(scores) and not isinstance(scores[0], torch.Tensor)):
        scores = check_scores(scores, "scores")
        rows: Iterable[torch.Tensor] = scores
    else:
        if len(scores) == 0:
            raise ValueError("scores is empty: no queries.")
        rows = [check_scores(row, f"scores[{i}]", ndim=1) for i, row in enumerate(scores)]
    hits = []
    for row in rows:
        hits.append(bool(row.numel() == 1 or row[0] > row[1:].max()))
    return torch.tensor(hits, dtype=torch.bool)


def precision_at_1(scores: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """Fraction of queries whose positive (candidate 0) scores strictly highest; see the module doc."""
    return precision_at_1_per_query(scores).float().mean().item()


def summarize_mmeb(
    per_subset: Mapping[str, float],
    meta_tasks: Mapping[str, Sequence[str]] = MMEB_META_TASKS,
    in_distribution: Iterable[str] = MMEB_IN_DISTRIBUTION,
) -> dict[str, Any]:
    """Average per-subset precision@1 per meta-task, IND / OOD and overall (unweighted means).

    Args:
        per_subset: ``{subset name: precision@1}``.
        meta_tasks: ``{meta-task: subset names}``; subsets found in none go to meta-task ``"Other"``
            and count only towards ``"overall"``.
        in_distribution: Names of the in-distribution subsets; the other known subsets are OOD.

    Returns:
        ``{"per_subset", "per_meta_task", "in_distribution", "out_of_distribution", "overall"}``;
        groups with no evaluated subset are left out.
    """
    if not per_subset:
        raise ValueError("per_subset is empty: evaluate at least one subset.")
    check_sequence(in_distribution, "in_distribution", "subset names")
    for task, names in meta_tasks.items():
        check_sequence(names, f"meta_tasks[{task!r}]", "subset names")
    owner = {name: task for task, names in meta_tasks.items() for name in names}
    in_distribution = set(in_distribution)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    groups: dict[str, list[float]] = {}
    for name, value in per_subset.items():
        groups.setdefault(owner.get(name, "Other"), []).append(value)
    summary: dict[str, Any] = {
        "per_subset": dict(per_subset),
        "per_meta_task": {task: mean(values) for task, values in groups.items()},
        "overall": mean(list(per_subset.values())),
    }
    ind = [v for name, v in per_subset.items() if name in owner and name in in_distribution]
    ood = [v for name, v in per_subset.items() if name in owner and name not in in_distribution]
    if ind:
        summary["in_distribution"] = mean(ind)
    if ood:
        summary["out_of_distribution"] = mean(ood)
    return summary


def mmeb_item(text: str | None, image_path: str | None, image_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``model.encode`` input of one MMEB query or candidate (``{"image"?, "text"?}``)."""
    text = PHI3_IMAGE_TOKEN.sub("", text or "").strip()
    item: dict[str, Any] = {}
    if image_path:
        item["image"] = resolve_image(image_path, image_root)
    if text:
        item["text"] = text
    if not item:
        raise ValueError("An MMEB query or candidate has neither text nor image.")
    return item


def _candidates(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(text, image path)`` of a row's candidates; a string on one side is repeated (VLM2Vec's ``""``)."""
    texts, paths = row["tgt_text"], row["tgt_img_path"]
    if isinstance(texts, str) or texts is None:
        texts = [texts or ""] * (1 if isinstance(paths, str) or paths is None else len(paths))
    if isinstance(paths, str) or paths is None:
        paths = [paths or ""] * len(texts)
    if len(texts) != len(paths) or not texts:
        raise ValueError(f"tgt_text ({len(texts)}) and tgt_img_path ({len(paths)}) must be equally long and non-empty.")
    return list(zip(texts, paths, strict=True))


def evaluate_mmeb_subset(
    model: CafeForConditionalGeneration,
    rows: Any,
    image_root: str | os.PathLike | None = None,
    batch_size: int = 16,
    show_progress_bar: bool | None = None,
) -> float:
    """precision@1 of one MMEB subset.

    Args:
        model: A `CafeForConditionalGeneration` (anything with its ``encode``).
        rows: A `datasets.Dataset` or a list of dicts with the four MMEB columns.
        image_root: Folder the image paths are relative to (MMEB-eval's unpacked image archive).
        batch_size: Inputs per forward pass.
    """
    check_sequence(rows, "rows", "MMEB rows (a datasets.Dataset or a list of dicts)")
    check_batch_size(batch_size)
    if len(rows) == 0:
        raise ValueError("No rows to evaluate.")
    queries = [(row["qry_text"], row["qry_img_path"]) for row in rows]
    candidates = [_candidates(row) for row in rows]
    # Candidate pools overlap heavily across queries (e.g. the 1000 ImageNet class names), so each
    # distinct (text, image) is embedded once.
    unique = list(dict.fromkeys([*queries, *(c for cands in candidates for c in cands)]))
    position = {key: i for i, key in enumerate(unique)}
    embeddings = model.encode(
        [mmeb_item(text, path, image_root) for text, path in unique],
        batch_size=batch_size,
        show_progress_bar=show_progress_bar,
    ).float()
    scores = []
    for query, cands in zip(queries, candidates, strict=True):
        target = embeddings[[position[c] for c in cands]]  # [num_candidates, hidden]
        scores.append(target @ embeddings[position[query]])
    return precision_at_1(scores)


def evaluate_mmeb(
    model: CafeForConditionalGeneration,
    dataset: Any = "TIGER-Lab/MMEB-eval",
    subsets: Sequence[str] | None = None,
    split: str = "test",
    image_root: str | os.PathLike | None = None,
    batch_size: int = 16,
    max_queries: int | None = None,
    show_progress_bar: bool | None = None,
) -> dict[str, Any]:
    """precision@1 on MMEB subsets, summarised with `summarize_mmeb`.

    Args:
        model: A `CafeForConditionalGeneration`.
        dataset: A Hub id or local path with one configuration per subset (loaded as
            ``load_dataset(dataset, subset, split=split)``), or a mapping ``{subset: Dataset or
            list of row dicts}``.
        subsets: Subsets to run; default: the mapping's keys, or all 36 MMEB subsets.
        split: Split to load.
        image_root: Folder the image paths are relative to.
        batch_size: Inputs per forward pass.
        max_queries: Evaluate only the first ``max_queries`` rows of each subset (quick runs).
    """
    from tqdm.auto import tqdm

    if subsets is not None:
        check_sequence(subsets, "subsets", "subset names")
    check_batch_size(batch_size)
    if subsets is None:
        subsets = list(dataset) if isinstance(dataset, Mapping) else list(MMEB_SUBSETS)
    if not subsets:
        raise ValueError("No subsets to evaluate.")
    columns = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
    results = {}
    for subset in tqdm(subsets, desc="MMEB subsets", unit="subset", disable=len(subsets) == 1):
        if isinstance(dataset, Mapping):
            if subset not in dataset:
                raise KeyError(f"Subset {subset!r} not in the given mapping; available: {sorted(dataset)}.")
            rows = dataset[subset]
        else:
            rows = load_any_dataset(dataset, split=split, name=subset)
        if isinstance(rows, list):
            rows = rows[:max_queries] if max_queries is not None else rows
            missing = [c for c in columns if rows and c not in rows[0]]
            if missing:
                raise KeyError(f"Subset {subset!r} rows lack the MMEB keys {missing}.")
        else:
            require_columns(rows, columns, f"(subset {subset!r})")
            rows = select_rows(rows, limit=max_queries)
        results[subset] = evaluate_mmeb_subset(
            model, rows, image_root=image_root, batch_size=batch_size, show_progress_bar=show_progress_bar
        )
    return summarize_mmeb(results)
