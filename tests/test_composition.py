"""`cafe.composition`: a LLaVA-OneVision built around a pretrained text-only LM keeps the LM.

The LM here is a tiny Llama from a config (the real use, examples/reproduce_real_lm.py, passes
SmolLM2-135M-Instruct); the tokenizer is a trained ChatML tokenizer without image tokens, as a
text-only LM's is.
"""

import json

import pytest
import torch
from PIL import Image

from cafe import CafeForConditionalGeneration
from cafe.composition import compose_llava_onevision
from cafe.testing import tiny_text_language_model

PROMPT = "<|im_start|>user\nwhat colour is the circle<|im_end|>\n<|im_start|>assistant\n"


def _text_lm(tie: bool):
    language_model, tokenizer = tiny_text_language_model(hidden_size=32, tie_word_embeddings=tie)
    assert "<image>" not in tokenizer.get_vocab()
    return language_model, tokenizer


@pytest.fixture(scope="module", params=[True, False], ids=["tied-head", "own-head"])
def composed(request, tmp_path_factory):
    language_model, tokenizer = _text_lm(tie=request.param)
    original_vocab = len(tokenizer)
    path = compose_llava_onevision(
        language_model,
        tokenizer,
        tmp_path_factory.mktemp("composed"),
        image_size=32,
        patch_size=8,
        vision_hidden_size=32,
        vision_layers=1,
        vision_heads=2,
    )
    return path, language_model, original_vocab


def test_the_composed_model_predicts_text_exactly_as_the_language_model(composed):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    path, language_model, vocab = composed
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = language_model(input_ids=ids).logits
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits[..., :vocab], expected)
    # The two new rows (<image>, <video>) start as the mean embedding: an average logit.
    assert logits.shape[-1] == vocab + 2
    rows = model.get_input_embeddings().weight
    torch.testing.assert_close(rows[vocab], rows[:vocab].mean(0))


def test_the_composed_checkpoint_is_a_stock_llava_onevision_that_sees_images(composed):
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    path, _, _ = composed
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config["text_config"]
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n")
    inputs = processor(images=[Image.new("RGB", (64, 48), "red")], text=[prompt], return_tensors="pt")
    image_tokens = int((inputs.input_ids == model.config.image_token_index).sum())
    assert image_tokens == 2 * 16 + 4  # base crop + one anyres tile of 4x4 patches, a newline per tile row
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs.input_ids.shape[1] + 3


def test_cafe_embeds_and_sentence_transformers_loads_the_composed_model(composed, tmp_path):
    from sentence_transformers import SentenceTransformer

    path, _, _ = composed
    model = CafeForConditionalGeneration.from_pretrained(path).eval()
    image = Image.new("RGB", (32, 32), "blue")
    vectors = model.encode([image, "two small red circles"])
    assert vectors.shape == (2, 32)
    model.save_pretrained(tmp_path)
    st_vectors = SentenceTransformer(str(tmp_path), device="cpu").encode([image, "two small red circles"])
    torch.testing.assert_close(torch.as_tensor(st_vectors), vectors.float(), atol=1e-4, rtol=1e-4)


def test_a_gguf_quantization_config_does_not_mark_the_model_quantised(tmp_path):
    language_model, tokenizer = _text_lm(tie=True)
    # What a GGUF load leaves on the de-quantised model's config.
    language_model.config.quantization_config = {"quant_method": "gguf", "dequantize": False}
    path = compose_llava_onevision(
        language_model, tokenizer, tmp_path, image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1
    )
    model = CafeForConditionalGeneration.from_pretrained(path)
    assert not getattr(model, "is_quantized", False)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())["text_config"]


def test_image_size_must_be_whole_patches(tmp_path):
    language_model, tokenizer = _text_lm(tie=True)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        compose_llava_onevision(language_model, tokenizer, tmp_path, image_size=30, patch_size=8)
