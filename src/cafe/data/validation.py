"""Pre-flight check of a training data set: every record, before the first step.

`CafeCollator` checks a record only when its batch is built, so a missing image in record 50,000
would end a run hours in. `validate_records` runs the collator's own record checks (layout, text
fields, image files that exist, open and fit the size limit) over the whole data set up front, in
parallel and cached by `datasets`, and reports every bad record at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..records import ImageRecordError, RecordError, RecordParser, columns_read_by_parser

if TYPE_CHECKING:
    from datasets import Dataset, Features

logger = logging.getLogger(__name__)

# How many bad records an error message lists (all of them are in `DataValidationError.problems`).
MAX_LISTED = 20


@dataclass(frozen=True)
class RecordProblem:
    """Why one record cannot be used."""

    index: int  # position in the data set
    record_id: str | None  # the record's ``id`` column, if it has one
    reason: str
    image_problem: bool  # missing / unreadable / too large image: what ``missing_images="skip"`` drops

    def __str__(self) -> str:
        record_id = "" if self.record_id is None else f" (id {self.record_id!r})"
        return f"#{self.index}{record_id}: {self.reason}"


class DataValidationError(RecordError):
    """Some records of a data set cannot be used; ``problems`` lists every one of them."""

    def __init__(self, message: str, problems: list[RecordProblem]):
        super().__init__(message)
        self.problems = problems


def validate_records(
    dataset: Dataset,
    image_folder: str | os.PathLike | None = None,
    multimodal_input: bool = False,
    caption_prompt: str | None = "Describe the image.",
    missing_images: str = "raise",
    num_proc: int | None = None,
    max_image_pixels: int | None = None,
    load_from_cache_file: bool | None = None,
) -> Dataset:
    """Check every record of a training data set as `CafeCollator` will, before training starts.

    Each record goes through `cafe.records.RecordParser` with the collator's settings: its layout
    (unknown or misspelt keys, ``negatives`` that are not a list, ...), its text fields, and each
    of its images, which must exist, decode, and stay under the pixel limit. Every positive of a
    ``positives`` record is checked, not only the one training would draw.

    Contract (for `cafe train` and `CafeTrainer`, which call it before step 1):

    - Pass the collator's ``image_folder``, ``multimodal_input``, ``caption_prompt`` and
      ``missing_images``; then no batch built from the returned data set fails on a record, and
      ``missing_images="skip"`` never shortens a batch (the records it would skip are gone).
    - ``missing_images="raise"``: returns `dataset` itself if every record is usable, else raises
      `DataValidationError` listing the first 20 bad records (index, id, reason) and their total.
    - ``missing_images="skip"``: records whose image cannot be used are dropped (a warning gives
      their count) and the rest is returned, as ``dataset.select(...)`` (no data is copied).
      Any other problem (layout, text) still raises: skipping would hide a mistake in the data.
    - Run it on the main process only (``with training_args.main_process_first():`` lets the other
      ranks reuse its cache) and build the dataloader from the returned data set.

    Results are cached by `datasets` (for data sets backed by cache files, e.g. loaded from JSON)
    under a fingerprint of the data set, these arguments and the modification time of
    ``image_folder``; pass ``load_from_cache_file=False`` after editing image files in place.

    Args:
        dataset: A `datasets.Dataset` of raw records (e.g. `cafe.training.load_records`).
        image_folder: Folder that relative image paths are resolved against.
        multimodal_input, caption_prompt: As for `CafeCollator`.
        missing_images: ``"raise"`` or ``"skip"``.
        num_proc: Processes to check records in (`datasets.Dataset.map`); None = this one.
        max_image_pixels: Refuse images with more pixels (read from the file header, before
            decoding). Default: PIL's decompression-bomb limit only, which training applies too.
        load_from_cache_file: Passed to `datasets.Dataset.map`.

    Returns:
        The data set to train on.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"validate_records takes a datasets.Dataset, got {type(dataset).__name__}; wrap a list of records "
            "with datasets.Dataset.from_list(records), or load files with cafe.training.load_records(path)."
        )
    if missing_images not in ("raise", "skip"):
        raise ValueError(f"missing_images must be 'raise' or 'skip', got {missing_images!r}.")
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be a positive number of pixels or None, got {max_image_pixels}.")
    if len(dataset) == 0:
        raise ValueError("The data set has no records.")

    settings: dict[str, Any] = {
        "image_folder": None if image_folder is None else str(image_folder),
        "multimodal_input": multimodal_input,
        "caption_prompt": caption_prompt,
        "max_image_pixels": max_image_pixels,
        # Part of the cache fingerprint: adding, removing or renaming a file in the folder
        # changes its modification time, so a cached "all good" is not reused after that.
        "folder_mtime": _mtime(image_folder),
    }
    # Metadata columns (captions, boxes, ...) can be large, and the checks never read them: they
    # are not loaded, only named (for "fits no layout; it has keys ..." messages). At least one
    # column stays, so that the rows are there.
    read = columns_read_by_parser(dataset.column_names) or dataset.column_names[:1]
    settings["unread_columns"] = [name for name in dataset.column_names if name not in read]
    found = dataset.select_columns(read).map(
        _check_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"settings": settings},
        remove_columns=read,
        features=_problem_features(),
        num_proc=num_proc,
        load_from_cache_file=load_from_cache_file,
        desc="Validating records",
    )
    problems = [RecordProblem(row["index"], row["record_id"], row["reason"], row["image_problem"]) for row in found]
    bad = _bad_records(problems, len(dataset), missing_images)
    return dataset if not bad else dataset.select([i for i in range(len(dataset)) if i not in bad])


def validate_record_list(
    records: list,
    image_folder: str | os.PathLike | None = None,
    multimodal_input: bool = False,
    caption_prompt: str | None = "Describe the image.",
    missing_images: str = "raise",
    max_image_pixels: int | None = None,
) -> list:
    """`validate_records` for a plain list of records (`Trainer` takes one): the same checks and
    errors, on the records as given (an Arrow round trip would turn a video's frame array into
    nested lists). Returns the list itself, or without the records ``missing_images="skip"`` drops."""
    if missing_images not in ("raise", "skip"):
        raise ValueError(f"missing_images must be 'raise' or 'skip', got {missing_images!r}.")
    if not records:
        raise ValueError("The data set has no records.")
    settings = {
        "image_folder": None if image_folder is None else str(image_folder),
        "multimodal_input": multimodal_input,
        "caption_prompt": caption_prompt,
        "max_image_pixels": max_image_pixels,
    }
    found = _check_records(records, range(len(records)), settings)
    problems = [RecordProblem(*row) for row in zip(*found.values(), strict=True)]
    bad = _bad_records(problems, len(records), missing_images)
    return records if not bad else [record for i, record in enumerate(records) if i not in bad]


def _bad_records(problems: list[RecordProblem], total: int, missing_images: str) -> set[int]:
    """Raise `DataValidationError` for what cannot be skipped; else the indices to drop (with a warning)."""
    if not problems:
        return set()
    problems.sort(key=lambda problem: problem.index)
    fatal = problems if missing_images == "raise" else [p for p in problems if not p.image_problem]
    if fatal:
        raise DataValidationError(_report(fatal, total, missing_images, problems), fatal)
    logger.warning(
        "Dropping %d of %d records whose image cannot be used (missing_images='skip'); first: %s",
        len(problems),
        total,
        problems[0],
    )
    return {problem.index for problem in problems}


def _check_batch(batch: dict[str, list], indices: list[int], settings: dict[str, Any]) -> dict[str, list]:
    """`Dataset.map` function: one output row per bad record of the batch."""
    columns = list(batch)
    unread = dict.fromkeys(settings["unread_columns"], "<not loaded>")
    records = ({**unread, **{column: batch[column][row] for column in columns}} for row in range(len(indices)))
    return _check_records(records, indices, settings)


def _check_records(records: Iterable[Any], indices: Iterable[int], settings: dict[str, Any]) -> dict[str, list]:
    """``index``, ``record_id``, ``reason``, ``image_problem`` of each record that `RecordParser` refuses."""
    parser = RecordParser(
        settings["image_folder"],
        settings["multimodal_input"],
        settings["caption_prompt"],
        max_image_pixels=settings["max_image_pixels"],
        hash_images=False,
    )
    out: dict[str, list] = {"index": [], "record_id": [], "reason": [], "image_problem": []}
    for record, index in zip(records, indices, strict=True):
        try:
            parser.check(record, index)
        except RecordError as err:
            out["index"].append(index)
            record_id = record.get("id") if isinstance(record, dict) else None
            out["record_id"].append(None if record_id is None else str(record_id))
            out["reason"].append(str(err))
            out["image_problem"].append(isinstance(err, ImageRecordError))
    return out


def _problem_features() -> Features:
    from datasets import Features, Value

    return Features(
        {
            "index": Value("int64"),
            "record_id": Value("string"),
            "reason": Value("string"),
            "image_problem": Value("bool"),
        }
    )


def _mtime(folder: str | os.PathLike | None) -> int | None:
    try:
        return os.stat(folder).st_mtime_ns if folder is not None else None
    except OSError:
        return None


def _report(fatal: list[RecordProblem], total: int, missing_images: str, problems: list[RecordProblem]) -> str:
    listed = "\n".join(f"  {problem}" for problem in fatal[:MAX_LISTED])
    more = f"\n  ... and {len(fatal) - MAX_LISTED} more" if len(fatal) > MAX_LISTED else ""
    images = sum(problem.image_problem for problem in fatal)
    if missing_images == "raise" and images:
        hint = (
            f" {images} of them are image problems (missing, unreadable or too large files): fix them, or pass "
            "missing_images='skip' to drop those records up front."
        )
    elif missing_images == "skip":
        skipped = len(problems) - len(fatal)
        hint = " These are not image problems, which missing_images='skip' would drop: fix the records." + (
            f" ({skipped} records with image problems would be dropped.)" if skipped else ""
        )
    else:
        hint = " Fix or remove these records."
    return f"{len(fatal)} of {total} records cannot be used.{hint}\n{listed}{more}"


def validate_main(argv: list[str] | None = None) -> int:
    """``cafe validate DATA --image_folder FOLDER``: check a training data set, print a summary.

    Exit status 0 when training can use the data (with ``--missing_images skip``: once the
    records with image problems are dropped), 1 otherwise.
    """
    import argparse
    import time

    from ..training import load_records

    parser = argparse.ArgumentParser(
        prog="cafe validate",
        description="Check every record of a training data set as `cafe train` would use it, and list the bad ones.",
    )
    parser.add_argument("data_path", help="JSON / JSONL file(s) (comma-separated), a saved dataset folder or a Hub id")
    parser.add_argument("--image_folder", default=None, help="folder that image paths are relative to")
    parser.add_argument("--multimodal_input", type=_bool, default=False)
    parser.add_argument("--caption_prompt", default="Describe the image.")
    parser.add_argument("--missing_images", choices=("raise", "skip"), default="raise")
    parser.add_argument("--num_proc", type=int, default=None, help="processes to check records in")
    parser.add_argument("--max_image_pixels", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    start = time.perf_counter()
    dataset = load_records(args.data_path)
    try:
        kept = validate_records(
            dataset,
            image_folder=args.image_folder,
            multimodal_input=args.multimodal_input,
            caption_prompt=args.caption_prompt,
            missing_images=args.missing_images,
            num_proc=args.num_proc,
            max_image_pixels=args.max_image_pixels,
        )
    except DataValidationError as err:
        print(f"{args.data_path}: {err}")
        return 1
    seconds = time.perf_counter() - start
    dropped = len(dataset) - len(kept)
    summary = f"{args.data_path}: {len(kept)} of {len(dataset)} records are usable"
    if dropped:
        summary += f"; {dropped} with image problems would be skipped (missing_images='skip')"
    print(f"{summary} ({seconds:.1f} s).")
    return 0


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected True or False, got {value!r}")


__all__ = ["DataValidationError", "RecordProblem", "validate_main", "validate_records"]
