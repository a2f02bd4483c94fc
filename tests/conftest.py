import os

import pytest

# Tests never touch the network: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A stock tiny LLaVA-OneVision checkpoint folder (model + processor), built once per session."""
    from cafe.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava-ov"))


@pytest.fixture()
def cafe_model(tiny_checkpoint):
    from cafe import CafeForConditionalGeneration

    return CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture(scope="session")
def images():
    """A few small RGB images of different sizes and colours."""
    from PIL import Image

    return [
        Image.new("RGB", (40, 30), (255, 0, 0)),
        Image.new("RGB", (32, 32), (0, 128, 255)),
        Image.new("RGB", (24, 48), (20, 200, 20)),
    ]
