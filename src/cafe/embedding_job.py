"""``cafe embed DATA --out vectors.parquet``: embed a data set in a batch job, resumably.

    cafe embed captions.jsonl --model path/to/cafe-checkpoint --out vectors.parquet --text-column caption
    cafe embed photos.parquet --model ... --out vectors.parquet --image-column image --id-column photo_id
    cafe embed pairs.json --model ... --out vectors.parquet --image-column image --text-column question \\
        --image-folder images/ --instruction "Represent the given image with the following question: "

DATA is anything `datasets` reads: a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, a
folder written by ``save_to_disk``, or a Hub data set id (``--split``). A row is embedded as its
text, its image (a path, relative ones joined to ``--image-folder``, or an image feature) or both,
through `CafeForConditionalGeneration.encode` (prompt prefix cache, length-sorted batches).

The output is a Parquet file (written by `datasets`) with one row per input row, in order:
``row`` (the row's index in DATA), the ``--id-column`` if given, and ``embedding`` (a list of
float32: the full size, or ``--truncate-dim``).

Resumable by shard: rows are embedded in shards of ``--shard-size``, each written to
``<out>.shards/`` as soon as it is done (to a temporary name, then renamed, so a shard file is
always complete). A rerun of the same command skips the shards already there; a rerun with other
settings (model, data, columns, shard size, ...) stops with an error rather than mixing vectors.
When every shard is there they are joined into ``--out`` and the shard folder is removed
(``--keep-shards`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """DATA, the model and how a row becomes an `encode` input: shared by ``cafe embed`` and ``cafe rotate``."""
    parser.add_argument("data", help="a .json/.jsonl/.csv/.parquet file, a save_to_disk folder or a Hub data set id")
    parser.add_argument("--model", required=True, help="a CAFe checkpoint folder or Hub id")
    parser.add_argument("--text-column", default=None, help="column holding the texts")
    parser.add_argument("--image-column", default=None, help="column holding images or image paths")
    parser.add_argument("--image-folder", default=None, help="folder that relative image paths are relative to")
    parser.add_argument("--split", default="train", help="split of a Hub data set or a DatasetDict (default: train)")
    parser.add_argument("--instruction", default=None, help="task instruction placed before each text (MMEB style)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cafe embed",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, help="the Parquet file to write, e.g. vectors.parquet")
    parser.add_argument("--id-column", default=None, help="a column copied to the output next to each vector")
    parser.add_argument(
        "--truncate-dim",
        type=int,
        default=None,
        help="keep the first D dimensions (for a model trained with matryoshka_dims or rotated by `cafe rotate`)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=4096, help="rows per resumable shard")
    parser.add_argument("--dtype", default="auto", help='"auto", "bfloat16", "float16" or "float32"')
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--keep-shards", action="store_true", help="keep <out>.shards/ after joining")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two runs' shards interchangeable (checked on resume)."""
    data = Path(args.data)
    return {
        "data": str(data.resolve()) if data.exists() else args.data,
        "split": args.split,
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        "text_column": args.text_column,
        "image_column": args.image_column,
        "image_folder": args.image_folder,
        "id_column": args.id_column,
        "instruction": args.instruction,
        "truncate_dim": args.truncate_dim,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
    }


def shard_path(folder: Path, index: int, count: int) -> Path:
    return folder / f"shard-{index:05d}-of-{count:05d}.parquet"


def row_inputs(rows: dict[str, list[Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``encode`` inputs of a slice of rows: ``{"image": ..., "text": ...}`` dicts."""
    from .evaluation._common import resolve_image

    count = len(next(iter(rows.values())))
    inputs = []
    for i in range(count):
        item = {}
        if args.text_column:
            item["text"] = rows[args.text_column][i]
        if args.image_column:
            item["image"] = resolve_image(rows[args.image_column][i], args.image_folder)
        if all(value is None for value in item.values()):
            raise ValueError(f"Row {i} has neither a text nor an image in {sorted(item)}: drop it or fill it in.")
        inputs.append(item)
    return inputs


def embed_main(argv: list[str] | None = None) -> Path:
    args = _parser().parse_args(argv)
    if not (args.text_column or args.image_column):
        raise SystemExit("cafe embed: give --text-column and/or --image-column (the columns to embed).")
    if args.shard_size < 1 or args.batch_size < 1:
        raise SystemExit("cafe embed: --shard-size and --batch-size must be >= 1.")

    import datasets
    import torch

    from .evaluation._common import load_any_dataset, require_columns
    from .modeling import CafeForConditionalGeneration

    out = Path(args.out)
    shards = out.with_name(out.name + ".shards")
    settings = _settings(args)
    dataset = load_any_dataset(args.data, split=args.split)
    columns = [c for c in (args.text_column, args.image_column, args.id_column) if c]
    require_columns(dataset, columns, hint="Name the columns with --text-column / --image-column / --id-column.")
    settings["num_rows"] = len(dataset)
    count = max(1, math.ceil(len(dataset) / args.shard_size))

    shards.mkdir(parents=True, exist_ok=True)
    manifest = shards / MANIFEST
    if manifest.is_file():
        previous = json.loads(manifest.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise SystemExit(
                f"cafe embed: {shards} holds shards of another run ({', '.join(changed)} differ). Rerun with the same "
                f"settings to resume, or delete {shards} to start over."
            )
    else:
        manifest.write_text(json.dumps(settings, indent=1) + "\n")
    todo = [i for i in range(count) if not shard_path(shards, i, count).is_file()]
    if len(todo) < count:
        print(f"Resuming: {count - len(todo)} of {count} shards are done in {shards}.", file=sys.stderr)

    if todo:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        # transformers declares PreTrainedModel.to through functools.wraps(nn.Module.to), which mypy does not bind.
        model = CafeForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()  # type: ignore[arg-type]
        shard_bar = todo
        if args.progress:
            from tqdm.auto import tqdm

            shard_bar = tqdm(todo, desc="Shards", unit="shard")
        for index in shard_bar:
            start, stop = index * args.shard_size, min((index + 1) * args.shard_size, len(dataset))
            rows = dataset.select(range(start, stop)).select_columns(columns).to_dict()
            vectors = model.encode(
                row_inputs(rows, args),
                instruction=args.instruction,
                batch_size=args.batch_size,
                show_progress_bar=args.progress,
                truncate_dim=args.truncate_dim,
            )
            table = {"row": list(range(start, stop))}
            if args.id_column:
                table[args.id_column] = rows[args.id_column]
            table["embedding"] = vectors.numpy().tolist()
            features = datasets.Features(
                {
                    "row": datasets.Value("int64"),
                    **({args.id_column: dataset.features[args.id_column]} if args.id_column else {}),
                    "embedding": datasets.Sequence(datasets.Value("float32")),
                }
            )
            final = shard_path(shards, index, count)
            partial = final.with_suffix(".partial")
            datasets.Dataset.from_dict(table, features=features).to_parquet(str(partial))
            os.replace(partial, final)  # a shard file exists only once it is complete

    parts = [str(shard_path(shards, i, count)) for i in range(count)]
    joined = datasets.concatenate_datasets([datasets.Dataset.from_parquet(p) for p in parts])
    out.parent.mkdir(parents=True, exist_ok=True)
    joined.to_parquet(str(out))
    if not args.keep_shards:
        shutil.rmtree(shards)
    dim = len(joined[0]["embedding"]) if len(joined) else 0
    print(f"Wrote {len(joined)} vectors of {dim} dimensions to {out}.", file=sys.stderr)
    return out
