"""The released-format fixtures of `cafe.testing`: tiny models that process inputs like the released
checkpoints (chat template, image processor config, image token counts).

The expected strings and counts below are those of the released checkpoints, derived from their
templates and processor configs (see docs/backbones.md, "Released-format test fixtures"); they are
not read back from the fixtures.
"""

import time

import pytest
import torch

from cafe.testing import (
    LLAVA_HF_LLAVA_ONEVISION_CHAT_TEMPLATE,
    LLAVA_ONEVISION_IMAGE_GRID_PINPOINTS,
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN2_VL_CHAT_TEMPLATE,
    RELEASED_FORMAT_FAMILIES,
    TINY_FAMILIES,
    build_released_format_checkpoint,
)

SIZES = [(384, 384), (640, 480), (1024, 768), (1920, 1080)]  # (width, height), as PIL sizes them

# Image tokens one image expands to in a prompt (the processor's expansion of the placeholder).
IMAGE_TOKENS = {
    # llava-hf: 729 for the 384 px base crop, plus the anyres crops' 27x27 features per tile, unpadded
    # to the image's aspect ratio, with one newline feature per row (anyres_max_9 caps the grid).
    # 384x384: 729 + 27*27 + 27; 640x480: 2x2 tiles -> 729 + 40*54 + 40.
    "llava_onevision": {(384, 384): 1485, (640, 480): 2929, (1024, 768): 4725, (1920, 1080): 7269},
    # Qwen: smart_resize to multiples of 28 px within 3136..12845056 pixels, one token per 28x28 px:
    # 384x384 -> 392x392 = 14*14; 640x480 -> 644x476 = 23*17; 1024x768 -> 1036x756 = 37*27;
    # 1920x1080 -> 1932x1092 = 69*39.
    "qwen2_vl": {(384, 384): 196, (640, 480): 391, (1024, 768): 999, (1920, 1080): 2691},
    "qwen2_5_vl": {(384, 384): 196, (640, 480): 391, (1024, 768): 999, (1920, 1080): 2691},
}

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# One user turn with an image and "Hi", plus the generation prompt, as each released template renders it.
RENDERED_IMAGE_TURN = {
    "llava_onevision": "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n",
    "qwen2_vl": f"{QWEN_SYSTEM}<|im_start|>user\n{QWEN_IMAGE}Hi<|im_end|>\n<|im_start|>assistant\n",
    "qwen2_5_vl": f"{QWEN_SYSTEM}<|im_start|>user\n{QWEN_IMAGE}Hi<|im_end|>\n<|im_start|>assistant\n",
}
TEMPLATES = {
    "llava_onevision": LLAVA_HF_LLAVA_ONEVISION_CHAT_TEMPLATE,
    "qwen2_vl": QWEN2_VL_CHAT_TEMPLATE,
    "qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE,
}
PROCESSOR_CLASSES = {
    "llava_onevision": "LlavaOnevisionProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
}
STOCK_CLASSES = {
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
IMAGE_TURN = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]


@pytest.fixture(scope="session", params=RELEASED_FORMAT_FAMILIES)
def released_family(request):
    return request.param


@pytest.fixture(scope="session")
def released_checkpoint(released_family, _released_checkpoints):
    return _released_checkpoints(released_family)


@pytest.fixture(scope="session")
def released_processor(released_checkpoint):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(released_checkpoint)


def _photo(width, height):
    """A non-uniform RGB image of the given size (a gradient, so crops and patches differ)."""
    from PIL import Image

    return Image.linear_gradient("L").resize((width, height)).convert("RGB")


def test_every_family_has_a_released_format_fixture(tmp_path):
    assert RELEASED_FORMAT_FAMILIES == TINY_FAMILIES
    with pytest.raises(ValueError, match="No released-format builder"):
        build_released_format_checkpoint(tmp_path, "llava")


def test_chat_template_renders_the_released_format(released_family, released_processor):
    processor = released_processor
    assert type(processor).__name__ == PROCESSOR_CLASSES[released_family]
    assert processor.chat_template == TEMPLATES[released_family]
    rendered = processor.apply_chat_template(IMAGE_TURN, add_generation_prompt=True)
    assert rendered == RENDERED_IMAGE_TURN[released_family]
    if released_family == "llava_onevision":
        # No system turn; images come first whatever their position in the content; assistant
        # text is rendered (inside {% generation %}) and closed like any turn.
        text_first = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}]}]
        assert processor.apply_chat_template(text_first) == "<|im_start|>user\n<image>\nHi<|im_end|>\n"
        dialogue = text_first + [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
        assert processor.apply_chat_template(dialogue) == (
            "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        )
    else:
        # The default system turn is replaced, not added to, by a given one; the image has no newline.
        with_system = [{"role": "system", "content": "Be brief."}] + IMAGE_TURN
        assert processor.apply_chat_template(with_system) == (
            f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{QWEN_IMAGE}Hi<|im_end|>\n"
        )


def test_processor_and_model_configs_are_the_released_ones(released_family, released_checkpoint, released_processor):
    from transformers import AutoConfig, LlavaOnevisionConfig, LlavaOnevisionImageProcessor

    image_processor = released_processor.image_processor
    config = AutoConfig.from_pretrained(released_checkpoint)
    assert config.model_type == released_family
    if released_family == "llava_onevision":
        assert (image_processor.size["height"], image_processor.size["width"]) == (384, 384)
        # The full default anyres grid (6x6 tiles of 384 px), in processor and model alike.
        assert image_processor.image_grid_pinpoints == LLAVA_ONEVISION_IMAGE_GRID_PINPOINTS
        assert LLAVA_ONEVISION_IMAGE_GRID_PINPOINTS == LlavaOnevisionImageProcessor.image_grid_pinpoints
        assert LLAVA_ONEVISION_IMAGE_GRID_PINPOINTS == LlavaOnevisionConfig().image_grid_pinpoints
        assert config.image_grid_pinpoints == LLAVA_ONEVISION_IMAGE_GRID_PINPOINTS
        assert list(image_processor.image_mean) == [0.5, 0.5, 0.5] and list(image_processor.image_std) == [0.5] * 3
        assert released_processor.num_image_tokens == 729
        assert released_processor.vision_feature_select_strategy == "full" == config.vision_feature_select_strategy
        assert released_processor.vision_aspect_ratio == "anyres_max_9" == config.vision_aspect_ratio
        assert config.vision_feature_layer == -1
        assert (config.vision_config.image_size, config.vision_config.patch_size) == (384, 14)
        assert config.text_config.max_position_embeddings == 32768
    else:
        patching = (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size)
        assert patching == (14, 2, 2)
        assert image_processor.size["shortest_edge"] == 56 * 56 == 3136
        assert image_processor.size["longest_edge"] == 28 * 28 * 16384 == 12845056
        vision = config.vision_config
        assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
        if released_family == "qwen2_5_vl":
            assert vision.window_size == 112
    assert config.image_token_id == released_processor.image_token_id


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_image_token_counts(released_family, released_processor, size):
    processor = released_processor
    width, height = size
    prompt = processor.apply_chat_template(IMAGE_TURN, add_generation_prompt=True)
    batch = processor(images=[_photo(width, height)], text=[prompt], return_tensors="pt")
    count = int((batch["input_ids"] == processor.image_token_id).sum())
    assert count == IMAGE_TOKENS[released_family][size]
    # The processor's own accounting (used by serving stacks to size prompts) agrees.
    assert processor._get_num_multimodal_tokens(image_sizes=[[height, width]])["num_image_tokens"] == [count]


def test_the_model_consumes_every_image_size(released_family, released_checkpoint, released_processor):
    """The stock forward checks that the image tokens and the vision features agree in number, so a
    fixture whose model geometry (patch, crop size, grid) did not match its processor would fail here."""
    import transformers

    model = getattr(transformers, STOCK_CLASSES[released_family]).from_pretrained(released_checkpoint).eval()
    prompt = released_processor.apply_chat_template(IMAGE_TURN, add_generation_prompt=True)
    for width, height in SIZES:
        batch = released_processor(images=[_photo(width, height)], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            logits = model(**batch).logits
        assert logits.shape[:2] == batch["input_ids"].shape
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_model_card_max_pixels_caps_large_images(family, _released_checkpoints):
    """The model cards' suggested ``max_pixels=1280*28*28`` (an opt-in, and the transformers class default)
    changes only the 1920x1080 count among the sizes above: 1932x1092 px is over the cap, 1036x756 is not."""
    from transformers import AutoProcessor

    image_processor = AutoProcessor.from_pretrained(_released_checkpoints(family)).image_processor
    capped = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    counts = {}
    for width, height in [(1024, 768), (1920, 1080)]:
        grid = image_processor(images=[_photo(width, height)], size=capped)["image_grid_thw"]
        counts[(width, height)] = int(grid.prod()) // 4
    assert counts == {(1024, 768): 999, (1920, 1080): 1222}  # 1920x1080 -> 1316x728 = 47*26


def test_loads_and_runs_a_640x480_image(released_family, released_checkpoint, released_processor):
    """Both the CAFe class and the stock class load every weight and run a real-size image, with
    equal logits; the stock forward checks that image tokens and vision features agree in number."""
    import transformers

    from cafe import CafeForConditionalGeneration

    stock_class = getattr(transformers, STOCK_CLASSES[released_family])
    cafe, info = CafeForConditionalGeneration.from_pretrained(released_checkpoint, output_loading_info=True)
    assert isinstance(cafe, stock_class)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    stock, info = stock_class.from_pretrained(released_checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    prompt = released_processor.apply_chat_template(IMAGE_TURN, add_generation_prompt=True)
    batch = released_processor(images=[_photo(640, 480)], text=[prompt], return_tensors="pt")
    n_image = IMAGE_TOKENS[released_family][(640, 480)]
    assert int((batch["input_ids"] == cafe.config.image_token_id).sum()) == n_image
    start = time.perf_counter()
    with torch.inference_mode():
        logits = cafe.eval()(**batch).logits
        stock_logits = stock.eval()(**batch).logits
    elapsed = time.perf_counter() - start
    assert logits.shape == (1, batch["input_ids"].shape[1], cafe.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, stock_logits)
    # Two forwards of a ~3k-token sequence through tiny widths take about a second on 2 cores; a
    # generous bound still catches a fixture that grew real widths.
    assert elapsed < 30, f"two forwards took {elapsed:.1f} s"


def test_encode_a_640x480_image(released_checkpoint):
    from cafe import CafeForConditionalGeneration

    model = CafeForConditionalGeneration.from_pretrained(released_checkpoint)
    embedding = model.encode([_photo(640, 480)])
    assert embedding.shape == (1, model.config.get_text_config().hidden_size)
    assert torch.isfinite(embedding).all()
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(1))
