import os

import pytest

# Tests never touch the network: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cafe.testing import TINY_FAMILIES  # after the offline switches above

# Every backbone family cafe supports, by model_type: each has a tiny checkpoint in `cafe.testing`
# (tests/test_modeling.py checks that the two lists agree).
FAMILIES = TINY_FAMILIES
DEFAULT_FAMILY = "llava_onevision"
CHECKPOINT_FORMATS = ("tiny", "released")
# The stock transformers class of each family: CAFe loads, generates and saves exactly like it.
STOCK_CLASSES = {
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "all_families: run each test that uses the tiny checkpoint once per backbone family "
        "(tests/conftest.py FAMILIES); unmarked tests use LLaVA-OneVision",
    )
    config.addinivalue_line(
        "markers",
        "released_formats: also run each test that uses the tiny checkpoint on the family's "
        "released-format fixture (the released chat template, image processor config and image "
        "token counts, tiny widths; cafe.testing.build_released_format_checkpoint)",
    )


def pytest_generate_tests(metafunc):
    """Tests marked ``all_families`` (a module's ``pytestmark``, a class or a test) that use the
    tiny checkpoint, directly or through `cafe_model`, run once per family; tests marked
    ``released_formats`` run on the tiny and on the released-format checkpoint of each."""
    if "family" in metafunc.fixturenames and metafunc.definition.get_closest_marker("all_families") is not None:
        metafunc.parametrize("family", FAMILIES, indirect=True)
    if "checkpoint_format" in metafunc.fixturenames and metafunc.definition.get_closest_marker("released_formats"):
        metafunc.parametrize("checkpoint_format", CHECKPOINT_FORMATS, indirect=True)


@pytest.fixture(scope="session")
def family(request):
    """The backbone family (``model_type``) of `tiny_checkpoint`."""
    return getattr(request, "param", DEFAULT_FAMILY)


@pytest.fixture(scope="session")
def checkpoint_format(request):
    """``"tiny"`` (32 px images, one anyres tile) or ``"released"`` (the released checkpoint's processing)."""
    return getattr(request, "param", "tiny")


@pytest.fixture(scope="session")
def _tiny_checkpoints(tmp_path_factory):
    """Builds each family's tiny checkpoint once per session (a family switch reuses the folder)."""
    from cafe.testing import build_tiny_checkpoint

    built = {}

    def get(family):
        if family not in built:
            built[family] = build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def _released_checkpoints(tmp_path_factory):
    """Builds each family's released-format checkpoint once per session."""
    from cafe.testing import build_released_format_checkpoint

    built = {}

    def get(family):
        if family not in built:
            built[family] = build_released_format_checkpoint(tmp_path_factory.mktemp(f"released-{family}"), family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(family, checkpoint_format, _tiny_checkpoints, _released_checkpoints):
    """A stock checkpoint folder (model + processor) of `family`, LLaVA-OneVision by default: the
    tiny one, or (``released_formats`` tests) the released-format one."""
    if checkpoint_format == "released":
        return _released_checkpoints(family)
    return _tiny_checkpoints(family)


@pytest.fixture(scope="session")
def stock_class(family):
    """The stock transformers class of `family`."""
    import transformers

    return getattr(transformers, STOCK_CLASSES[family])


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
