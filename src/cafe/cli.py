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


# What cafe raises for bad input (a missing or corrupt file, an empty text, an unknown column): their
# messages name the problem and the fix, so the console command prints just that, not the stack
# through datasets / PIL / torch above it. CAFE_TRACEBACK=1 shows the traceback.
USER_ERRORS = (FileNotFoundError, ValueError, KeyError)


def run() -> int:
    """The ``cafe`` console command: `main`, with bad-input errors printed as one line (exit status 1)."""
    import os

    try:
        return main()
    except USER_ERRORS as err:
        if os.environ.get("CAFE_TRACEBACK"):
            raise
        command = f"cafe {sys.argv[1]}" if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else "cafe"
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() quotes it
        print(f"{command}: error: {message}", file=sys.stderr)
        print("(set CAFE_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(run())
