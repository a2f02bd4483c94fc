"""Convert LLaVA-OneVision-Data (Hub parquet: ``id``, ``image``, ``conversations``, ...) to the
LLaVA training layout: one JSON file per subset plus an image folder.

Like the reference's ``prepare_data.py``, with the failure modes fixed and reported:

- ids that contain ``/`` or other path characters no longer create stray sub-folders (they are
  made safe for file names; the original id is kept in the record);
- ids that share a file name (duplicates, ids equal once made safe or up to case, an id equal to
  the suffixed name of another) no longer overwrite each other's image: every image gets a file
  name no other image of the subset has (a numeric suffix ``-1``, ``-2``, ... keeps them apart);
- images are written as PNG, which stores every PIL mode (RGBA / P / L / CMYK go through as RGB),
  instead of failing or silently dropping the alpha channel's pictures;
- records without an image stay, as text-only conversations, and are counted, never dropped;
- every count is returned and logged.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ConversionReport:
    json_path: Path
    records: int = 0
    images_written: int = 0
    without_image: int = 0
    renamed_ids: int = 0
    duplicate_ids: int = 0  # images whose file name got a suffix because another image had it
    problems: list[str] = field(default_factory=list)


def safe_file_stem(record_id: str) -> str:
    stem = _UNSAFE.sub("_", str(record_id)).strip("._")
    return stem or "record"


def convert_llava_onevision_data(
    dataset: Dataset | str | Path,
    output_dir: str | Path,
    subset: str,
    split: str = "train",
    max_records: int | None = None,
) -> ConversionReport:
    """Write ``{output_dir}/{subset}.json`` and ``{output_dir}/{subset}/*.png``.

    Args:
        dataset: A `datasets.Dataset`, or a Hub id / local folder of LLaVA-OneVision-Data
            (loaded with ``datasets.load_dataset(dataset, subset, split=split)``).
        output_dir: Where the JSON file and the image folder go; use it as ``--image_folder``.
        subset: Subset (config) name, e.g. ``"sharegpt4v(coco)"``; also the image sub-folder name.
        max_records: Convert only the first N records.
    """
    if isinstance(dataset, (str, Path)):
        from datasets import load_dataset

        dataset = load_dataset(str(dataset), subset, split=split)
    output_dir = Path(output_dir)
    folder_name = safe_file_stem(subset)
    image_dir = output_dir / folder_name
    image_dir.mkdir(parents=True, exist_ok=True)
    report = ConversionReport(json_path=output_dir / f"{folder_name}.json")
    # File names taken so far, case-folded: "Photo.png" and "photo.png" are one file on macOS and
    # Windows filesystems.
    taken: set[str] = set()
    records = []
    for index, row in enumerate(dataset):
        if max_records is not None and index >= max_records:
            break
        record_id = str(row.get("id", index))
        conversations = row.get("conversations")
        if not conversations:
            report.problems.append(f"row {index} (id {record_id!r}) has no conversations; skipped")
            continue
        record = {"id": record_id, "conversations": [{"from": t["from"], "value": t["value"]} for t in conversations]}
        if row.get("data_source"):
            record["data_source"] = row["data_source"]
        image = row.get("image")
        if image is None:
            report.without_image += 1
        else:
            stem = safe_file_stem(record_id)
            report.renamed_ids += stem != record_id
            if stem.casefold() in taken:
                report.duplicate_ids += 1
                # The first free suffix: a real id may already be "a-1", so a count of "a"s is not enough.
                stem = next(f"{stem}-{n}" for n in itertools.count(1) if f"{stem}-{n}".casefold() not in taken)
            taken.add(stem.casefold())
            relative = f"{folder_name}/{stem}.png"
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            image.save(output_dir / relative)
            record["image"] = relative
            report.images_written += 1
        records.append(record)
    report.records = len(records)
    report.json_path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    logger.info(
        "Converted %s: %d records, %d images, %d without image, %d ids renamed, %d duplicate ids, %d problems",
        subset,
        report.records,
        report.images_written,
        report.without_image,
        report.renamed_ids,
        report.duplicate_ids,
        len(report.problems),
    )
    for problem in report.problems:
        logger.warning(problem)
    return report


def convert_main(argv: list[str] | None = None) -> ConversionReport:
    """``cafe convert --dataset lmms-lab/LLaVA-OneVision-Data --subset "sharegpt4v(coco)" --output_dir data``"""
    import argparse

    parser = argparse.ArgumentParser(prog="cafe convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="lmms-lab/LLaVA-OneVision-Data", help="Hub id or local folder")
    parser.add_argument("--subset", required=True, help="subset (config) name")
    parser.add_argument("--split", default="train")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_records", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    report = convert_llava_onevision_data(args.dataset, args.output_dir, args.subset, args.split, args.max_records)
    print(
        f"Wrote {report.json_path} ({report.records} records, {report.images_written} images); "
        f"train with --data_path {report.json_path} --image_folder {args.output_dir}"
    )
    return report
