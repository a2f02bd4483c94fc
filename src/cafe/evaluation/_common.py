"""Helpers shared by the evaluation modules: input checks, data set loading, greedy decoding."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..prompting import check_batch_size, check_sequence  # noqa: F401  (re-exported for the evaluation modules)

if TYPE_CHECKING:
    from datasets import Dataset


def check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Validate the cut-offs of a recall@K: a non-empty collection of integers >= 1."""
    if isinstance(ks, int):
        ks = (ks,)
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks is empty: pass at least one cut-off, e.g. ks=(1, 5, 10).")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"Each K must be an int, got {k!r} ({type(k).__name__}).")
        if k < 1:
            raise ValueError(f"K must be >= 1, got {k}.")
    return ks


def check_scores(scores: Any, name: str = "scores", ndim: int = 2) -> torch.Tensor:
    """A float tensor of ``ndim`` dimensions, non-empty and free of NaN."""
    scores = torch.as_tensor(scores)
    if scores.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(scores.shape)}.")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(scores.shape)}).")
    scores = scores.float()
    if torch.isnan(scores).any():
        # A NaN compares false with everything and would silently count as a miss or a hit.
        raise ValueError(f"{name} contains NaN; check the embeddings (e.g. a zero vector normalised).")
    return scores


def check_same_length(a: Sized, b: Sized, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}.")


def resolve_image(image: Any, image_root: str | os.PathLike | None) -> Any:
    """A PIL image as is; a relative path joined to ``image_root`` (absolute paths kept)."""
    if isinstance(image, (str, os.PathLike)) and image_root is not None and not Path(image).is_absolute():
        return str(Path(image_root) / image)
    return image


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` can only be a local path, not a Hub id (``"org/name"`` or ``"name"``)."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith("/")


def load_any_dataset(
    dataset: Any,
    split: str | None = "test",
    name: str | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """Turn a `datasets.Dataset`, a `DatasetDict`, a local path or a Hub id into a `Dataset`.

    Local ``.json``/``.jsonl``/``.parquet``/``.csv`` files load with the matching builder (their
    only split is ``train``), a folder written by ``save_to_disk`` with ``load_from_disk``, and
    anything else with ``datasets.load_dataset(dataset, name, split=split)``.
    """
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return dataset
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise KeyError(f"Split {split!r} not in the DatasetDict; available: {sorted(dataset)}.")
        return dataset[split]
    if not isinstance(dataset, (str, os.PathLike)):
        raise TypeError(
            f"Expected a datasets.Dataset, a DatasetDict, a local path or a Hub id, got {type(dataset).__name__}."
        )
    path = Path(dataset)
    builders = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
    if not path.exists() and (path.suffix in builders or looks_like_local_path(str(dataset))):
        # Otherwise `load_dataset` takes it for a Hub id and fails on the network, without saying
        # that the local file is missing.
        raise FileNotFoundError(f"No data file or folder at {str(dataset)!r} (looked in {path.resolve().parent}).")
    if path.is_file() and path.suffix in builders:
        return datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train", **load_kwargs)
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return load_any_dataset(datasets.load_from_disk(str(path)), split=split)
    return datasets.load_dataset(str(dataset), name, split=split, **load_kwargs)


def select_rows(dataset: Dataset, where: Mapping[str, Any] | None = None, limit: int | None = None) -> Dataset:
    """Rows whose columns equal ``where`` (e.g. ``{"split": "test"}``), then the first ``limit``.

    Only the filtered columns are read, so images are not decoded.
    """
    if where:
        missing = [column for column in where if column not in dataset.column_names]
        if missing:
            raise KeyError(f"Columns {missing} not in the dataset; available: {dataset.column_names}.")
        columns = {column: list(dataset[column]) for column in where}
        keep = [i for i in range(len(dataset)) if all(columns[c][i] == v for c, v in where.items())]
        dataset = dataset.select(keep)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}.")
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"No rows left to evaluate (where={dict(where or {})}, limit={limit}).")
    return dataset


def require_columns(dataset: Dataset, columns: Iterable[str], hint: str = "") -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise KeyError(f"Columns {missing} not in the dataset; available: {dataset.column_names}. {hint}".strip())


@contextmanager
def generation_mode(model: Any, tokenizer: Any) -> Iterator[None]:
    """Eval mode and left padding (a decoder-only batch continues after each row's last real
    token) for a block of ``generate`` calls; both are restored afterwards."""
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    try:
        yield
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)


def greedy_answers(model: Any, tokenizer: Any, inputs: Mapping[str, Any], max_new_tokens: int) -> list[str]:
    """Greedy ``generate`` on one left-padded batch; the decoded new tokens of each row, stripped."""
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    # With left padding every prompt ends at the same column.
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [answer.strip() for answer in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
