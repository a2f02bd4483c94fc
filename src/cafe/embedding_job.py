"""``cafe embed DATA --out vectors.parquet``: embed a data set in a batch job, resumably.

    cafe embed captions.jsonl --model path/to/cafe-checkpoint --out vectors.parquet --text-column caption
    cafe embed photos.parquet --model ... --out vectors.parquet --image-column image --id-column photo_id
    cafe embed pairs.json --model ... --out vectors.parquet --image-column image --text-column question \\
        --image-folder images/ --instruction "Represent the given image with the following question: "

DATA is anything `datasets` reads: a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, a
folder written by ``save_to_disk``, or a Hub data set id (``--split``). A row is embedded as its
text, its image (a path, relative ones joined to ``--image-folder``, or an image feature) or both,
through `CafeForConditionalGeneration.encode` (prompt prefix cache, length-sorted batches).

A null cell means "no text" / "no image" for that row (a row needs one of them); CSV files cannot
tell an empty cell from a null one, so an empty CSV text cell makes an image-only row.

The output is a Parquet file (written by `datasets`) with one row per input row, in order:
``row`` (the row's index in DATA), the ``--id-column`` if given, and ``embedding`` (a list of
float32: the full size, or ``--truncate-dim``).

Resumable by shard: rows are embedded in shards of ``--shard-size``, each written to
``<out>.shards/`` as soon as it is done (to a temporary name, then renamed, so a shard file is
always complete). A rerun of the same command skips the shards already there; a rerun with other
settings (model, data, columns, shard size, ...), or after the model folder or the data file was
rewritten (their files' sizes and times are recorded), stops with an error rather than mixing
vectors. Errors about a row (a missing or corrupt image, an empty text) name its row in DATA.
When every shard is there they are joined into ``--out`` and the shard folder is removed
(``--keep-shards`` keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# Batches per `encode` call inside a shard (see `_embed`).
CHUNK_BATCHES = 16


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
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
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
        # A path names a folder, not what is in it: a checkpoint rewritten in place (`cafe rotate
        # --out` the same folder, a new training run) or an edited data file must not resume into
        # shards embedded from the old one.
        "model_files": local_fingerprint(Path(args.model)),
        "data_files": local_fingerprint(data, skip=Path(args.out).with_name(Path(args.out).name + ".shards")),
        "text_column": args.text_column,
        "image_column": args.image_column,
        "image_folder": args.image_folder,
        "id_column": args.id_column,
        "instruction": args.instruction,
        "truncate_dim": args.truncate_dim,
        "dtype": args.dtype,
        "shard_size": args.shard_size,
    }


def local_fingerprint(path: Path, skip: Path | None = None) -> str | None:
    """A hash of the names, sizes and modification times of the files at ``path`` (a file or a
    folder, ``skip`` left out), or None when it is not local (a Hub id). Stat-based, not a content
    hash: cheap on a multi-GB checkpoint, and any rewrite changes it."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    skipped = skip.resolve() if skip is not None else None
    digest = hashlib.sha256()
    for file in files:
        if skipped is not None and file.resolve().is_relative_to(skipped):
            continue
        stat = file.stat()
        name = file.name if file == path else str(file.relative_to(path))
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def shard_path(folder: Path, index: int, count: int) -> Path:
    return folder / f"shard-{index:05d}-of-{count:05d}.parquet"


def check_data_arguments(args: argparse.Namespace, prog: str, purpose: str) -> None:
    """`add_data_arguments`' checks, before anything loads: a column to read, and a ``--model``
    folder that is there (otherwise transformers takes a missing one for a Hub id and fails on the
    repo-id format or the network)."""
    from .evaluation._common import looks_like_local_path

    if not (args.text_column or args.image_column):
        raise SystemExit(f"{prog}: give --text-column and/or --image-column (the columns to {purpose}).")
    if looks_like_local_path(args.model) and not Path(args.model).expanduser().exists():
        raise SystemExit(f"{prog}: no model folder at {args.model!r}. Give a CAFe checkpoint folder or a Hub id.")


def row_inputs(
    rows: dict[str, list[Any]], args: argparse.Namespace, row_numbers: Sequence[int]
) -> list[dict[str, Any]]:
    """The ``encode`` inputs of some rows of DATA (``row_numbers``: their indices in DATA):
    ``{"image": ..., "text": ...}`` dicts, images opened here so that an unusable one is reported by
    its row in DATA rather than by its place in a shard."""
    from .evaluation._common import resolve_image
    from .prompting import check_text, load_image

    inputs = []
    for i, row in enumerate(row_numbers):
        where = f"row {row} of {args.data}"
        item: dict[str, Any] = {}
        if args.text_column and rows[args.text_column][i] is not None:
            item["text"] = check_text(rows[args.text_column][i], where)
        if args.image_column and rows[args.image_column][i] is not None:
            image = rows[args.image_column][i]
            if isinstance(image, str) and not image.strip():
                raise ValueError(
                    f"Empty image path in column {args.image_column!r} for {where}: fill it in, or leave the cell "
                    "null for a row without an image."
                )
            item["image"] = load_image(resolve_image(image, args.image_folder), where)
        if not item:
            columns = [c for c in (args.text_column, args.image_column) if c]
            raise ValueError(f"The {where} has neither a text nor an image in {columns}: drop it or fill it in.")
        inputs.append(item)
    return inputs


def embed_main(argv: list[str] | None = None) -> Path:
    args = _parser().parse_args(argv)
    check_data_arguments(args, "cafe embed", "embed")
    if args.shard_size < 1 or args.batch_size < 1:
        raise SystemExit("cafe embed: --shard-size and --batch-size must be >= 1.")
    if args.truncate_dim is not None and args.truncate_dim < 1:
        raise SystemExit("cafe embed: --truncate-dim must be >= 1.")
    with datasets_progress_bars(args.progress):
        return _embed(args)


@contextlib.contextmanager
def datasets_progress_bars(enabled: bool) -> Iterator[None]:
    """`datasets`' own bars (loading, Parquet writing) on or off for the job, as ``--no-progress`` says."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _embed(args: argparse.Namespace) -> Path:
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
            # `encode` decodes every image it is given before the first batch, so a shard goes in
            # chunks of CHUNK_BATCHES batches: memory holds one chunk's images, not a shard's (4,096
            # decoded photos would be tens of GB). Length sorting then works within a chunk.
            chunk = CHUNK_BATCHES * args.batch_size
            vectors = torch.cat(
                [
                    model.encode(
                        row_inputs(
                            {key: values[i : i + chunk] for key, values in rows.items()},
                            args,
                            range(start + i, min(start + i + chunk, stop)),
                        ),
                        instruction=args.instruction,
                        batch_size=args.batch_size,
                        show_progress_bar=args.progress,
                        truncate_dim=args.truncate_dim,
                    )
                    for i in range(0, stop - start, chunk)
                ]
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
