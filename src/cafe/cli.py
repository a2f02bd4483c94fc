"""The ``cafe`` command: ``cafe train ...`` (and the other subcommands as they land)."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("cafe.demo", "demo_main", "Offline end-to-end CAFe run on a tiny model and the built-in data."),
    "train": ("cafe.training", "train_main", "CAFe fine-tuning (HfArgumentParser flags; see `cafe train --help`)."),
    "convert": ("cafe.data.convert", "convert_main", "LLaVA-OneVision-Data subset -> JSON + image folder."),
    "validate": ("cafe.data.validation", "validate_main", "Check every record of a training data set before training."),
    "embed": ("cafe.embedding_job", "embed_main", "Embed a data set into a Parquet file of vectors (resumable)."),
    "rotate": ("cafe.rotation_job", "rotate_main", "Fit an embedding rotation on a data sample (for truncate_dim)."),
}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: cafe <command> [options]", "", "commands:"]
        lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, function, _ = COMMANDS[argv[0]]
    result = getattr(importlib.import_module(module), function)(argv[1:])
    # Commands that judge something (`validate`) return their exit status; the others return
    # what they made (a path, a report).
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    raise SystemExit(main())
