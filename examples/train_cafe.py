"""CAFe fine-tuning script; the same flags as `cafe train` (see `python examples/train_cafe.py --help`).

Paper recipe for LLaVA-OneVision 0.5B (one process; see examples/configs/ for the 7B and accelerate):

    python examples/train_cafe.py examples/configs/llava_ov_0.5b.json
"""

import sys

from cafe.training import train_main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if len(argv) == 1 and argv[0].endswith(".json"):
        # A whole run in one JSON file (keys = flag names).
        import json

        with open(argv[0]) as f:
            argv = [f"--{key}={value}" for key, value in json.load(f).items()]
    train_main(argv)
