"""``cafe rotate DATA --model M --out FOLDER``: fit an embedding rotation on a data sample and save.

    cafe rotate corpus.jsonl --model path/to/cafe-checkpoint --out path/to/rotated --text-column text
    cafe rotate photos.parquet --model ... --out ... --image-column image --text-column caption --sample 4000

Embeds ``--sample`` rows of DATA (drawn at random with ``--seed``; all rows if there are fewer)
through `CafeForConditionalGeneration.fit_embedding_rotation`, which makes the first ``k``
dimensions of every embedding the ``k`` principal directions of that sample, and saves the rotated
checkpoint to ``--out``. Then ``cafe embed ... --truncate-dim 128`` or
``SentenceTransformer(out, truncate_dim=128)`` keeps the best 128 dimensions instead of the first
128 hidden units. Full-size similarities do not change. DATA and its columns are read as in
``cafe embed``; sample the rows you will embed (documents and queries alike), not evaluation labels.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from .embedding_job import add_data_arguments, check_data_arguments, datasets_progress_bars, row_inputs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cafe rotate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, help="folder to save the rotated checkpoint to")
    parser.add_argument(
        "--sample", type=int, default=2000, help="rows to fit on (default 2000; at least the hidden size)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the row sample")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def rotate_main(argv: list[str] | None = None) -> Path:
    args = _parser().parse_args(argv)
    check_data_arguments(args, "cafe rotate", "fit on")
    if args.sample < 1 or args.batch_size < 1:
        raise SystemExit("cafe rotate: --sample and --batch-size must be >= 1.")
    with datasets_progress_bars(args.progress):
        return _rotate(args)


def _rotate(args: argparse.Namespace) -> Path:
    import torch

    from .evaluation._common import load_any_dataset, require_columns
    from .modeling import CafeForConditionalGeneration

    dataset = load_any_dataset(args.data, split=args.split)
    columns = [c for c in (args.text_column, args.image_column) if c]
    require_columns(dataset, columns, hint="Name the columns with --text-column / --image-column.")
    rows = sorted(random.Random(args.seed).sample(range(len(dataset)), min(args.sample, len(dataset))))
    inputs = row_inputs(dataset.select(rows).select_columns(columns).to_dict(), args, rows)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The checkpoint's own dtype; the rotation itself is computed in float64 and saved in float32.
    model = CafeForConditionalGeneration.from_pretrained(args.model).to(device).eval()  # type: ignore[arg-type]
    model.fit_embedding_rotation(
        inputs, instruction=args.instruction, batch_size=args.batch_size, show_progress_bar=args.progress
    )
    model.save_pretrained(args.out)
    print(
        f"Fitted a rotation of {model.embedding_rotation.shape[0]} dimensions on {len(inputs)} rows; "
        f"saved to {args.out}.",
        file=sys.stderr,
    )
    return Path(args.out)
