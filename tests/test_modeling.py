"""CafeForConditionalGeneration: loading, parity with the stock class, vanilla checkpoints.

Tests that use the tiny checkpoint run once per backbone family (see tests/conftest.py).
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from cafe import CafeForConditionalGeneration, CafeSettings

pytestmark = pytest.mark.all_families

CAFE_CLASSES = {
    "llava_onevision": "CafeLlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "CafeQwen2VLForConditionalGeneration",
    "qwen2_5_vl": "CafeQwen2_5_VLForConditionalGeneration",
}
# A key of the published (hub) weight layout that transformers 5 renames on load and back on save.
PUBLISHED_KEYS = {
    "llava_onevision": "language_model.lm_head.weight",
    "qwen2_vl": "visual.merger.mlp.0.weight",
    "qwen2_5_vl": "model.embed_tokens.weight",
}
REPO_ROOT = Path(__file__).resolve().parents[1]


def _generation_batch(processor, image, question="describe the picture"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


def _assert_same_state_dict(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_loads_every_weight_of_a_stock_checkpoint(tiny_checkpoint, family, stock_class):
    model, info = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert type(model).__name__ == CAFE_CLASSES[family]
    assert isinstance(model, CafeForConditionalGeneration) and isinstance(model, stock_class)
    assert type(model).backbone_class() is stock_class
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    stock = stock_class.from_pretrained(tiny_checkpoint)
    _assert_same_state_dict(model, stock)


def test_logits_and_greedy_generate_match_stock_class(tiny_checkpoint, stock_class, images):
    cafe = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    stock = stock_class.from_pretrained(tiny_checkpoint).eval()
    batch = _generation_batch(cafe.processor, images[0])
    with torch.no_grad():
        assert torch.equal(cafe(**batch).logits, stock(**batch).logits)
    out_cafe = cafe.generate(**batch, max_new_tokens=12, do_sample=False)
    out_stock = stock.generate(**batch, max_new_tokens=12, do_sample=False)
    assert out_cafe.shape[1] > batch["input_ids"].shape[1]
    assert torch.equal(out_cafe, out_stock)


def test_save_with_cafe_loads_in_stock_classes(tiny_checkpoint, family, stock_class, tmp_path, images):
    cafe = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    cafe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family
    assert config["architectures"] == [stock_class.__name__]
    assert config["cafe"]["contrastive_temperature"] == 0.05
    assert not list(tmp_path.glob("*.py")), "a vanilla checkpoint carries no custom code"
    assert (tmp_path / "processor_config.json").exists() and (tmp_path / "tokenizer.json").exists()

    stock, info = stock_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_same_state_dict(cafe, stock)
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(auto) is stock_class
    _assert_same_state_dict(cafe, auto)

    # Same file layout as the stock class writes (the published keys, e.g. `language_model.lm_head`).
    from safetensors import safe_open

    with (
        safe_open(tmp_path / "model.safetensors", "pt") as saved,
        safe_open(tiny_checkpoint / "model.safetensors", "pt") as original,
    ):
        assert set(saved.keys()) == set(original.keys())
        assert PUBLISHED_KEYS[family] in saved.keys()


def test_save_with_stock_loads_in_cafe(tiny_checkpoint, stock_class, tmp_path):
    stock = stock_class.from_pretrained(tiny_checkpoint)
    stock.save_pretrained(tmp_path)
    cafe, info = CafeForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _assert_same_state_dict(cafe, stock)
    assert cafe.processor is None  # that folder has no processor; loading it is optional


def test_cafe_settings_round_trip(tiny_checkpoint, tmp_path):
    settings = CafeSettings(text_prompt="Summarize in one word:", contrastive_temperature=0.02)
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint, cafe_settings=settings)
    assert "Summarize in one word:" in model.embedding_chat_template
    model.save_pretrained(tmp_path)
    reloaded = CafeForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.cafe_settings == model.cafe_settings
    assert reloaded.cafe_settings.contrastive_temperature == 0.02
    # the generation config is not polluted by the contrastive temperature
    assert getattr(reloaded.generation_config, "temperature", None) in (None, 1.0)


def test_defaults_follow_the_reference(cafe_model):
    settings = cafe_model.cafe_settings
    assert settings.contrastive_temperature == 0.05
    assert settings.system_prompt == "You are a helpful assistant."
    assert settings.pooling == "last_token" and settings.normalize


def test_unsupported_backbone_gives_clear_error(tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    config = LlavaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        text_config=Qwen2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
    )
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    # A real image-text-to-text checkpoint (the Auto class takes it), just not a CAFe family.
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is LlavaForConditionalGeneration
    expected = r"does not support the backbone model_type 'llava'.*qwen2_5_vl.*docs/backbones.md"
    with pytest.raises(ValueError, match=expected):
        CafeForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=expected):
        CafeForConditionalGeneration.from_config(config)
    # The error points at a file that exists and says how to add a family.
    doc = (REPO_ROOT / "docs" / "backbones.md").read_text()
    for hook in ("cafe_image_placeholder", "get_vision_features", "select_vision_features", "embedding_position_ids"):
        assert hook in doc


def test_every_family_has_a_tiny_checkpoint_and_docs():
    from cafe.backbones import supported_model_types
    from cafe.testing import TINY_FAMILIES

    # tests/conftest.py runs the family suites over TINY_FAMILIES: a new family is tested once it has one.
    assert set(supported_model_types()) == set(TINY_FAMILIES)
    doc = (REPO_ROOT / "docs" / "backbones.md").read_text()
    for model_type in supported_model_types():
        assert f"`{model_type}`" in doc


def test_parameter_components_split_vision_projector_and_llm(cafe_model):
    components = {name: cafe_model.parameter_component(name) for name, _ in cafe_model.named_parameters()}
    assert set(components.values()) == {"vision", "projector", "llm"}
    for name, component in components.items():
        parts = name.split(".")
        in_projector = any(module in parts for module in type(cafe_model).cafe_projector_modules)
        in_vision = any(module in parts for module in type(cafe_model).cafe_vision_modules)
        assert component == ("projector" if in_projector else "vision" if in_vision else "llm"), name


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="contrastive_temperature must be > 0"):
        CafeSettings(contrastive_temperature=0)
    with pytest.raises(ValueError, match="Unknown CAFe settings"):
        CafeSettings.from_dict({"temperature": 0.05})
