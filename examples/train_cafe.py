"""CAFe fine-tuning script; the same flags as `cafe train` (see `python examples/train_cafe.py --help`).

A whole run can be one JSON or YAML file (keys = flag names), e.g. the paper recipe for
LLaVA-OneVision 0.5B on one process (see examples/configs/ for the 7B, accelerate and the
paper-scale recipes):

    python examples/train_cafe.py examples/configs/llava_ov_0.5b.json
"""

import sys

from cafe.training import train_main

if __name__ == "__main__":
    train_main(sys.argv[1:])
