"""get_embeddings / encode: pooling, padding, prompts, and bad input.

Tests that use the tiny checkpoint run once per backbone family (see tests/conftest.py).
"""

import pytest
import torch

from cafe.modeling import last_token_pool
from cafe.prompting import build_embedding_batch, render_embedding_prompts, to_embedding_inputs

pytestmark = [pytest.mark.all_families, pytest.mark.released_formats]

# How one image appears in a prompt, as each family's own chat template writes it.
IMAGE = {
    "llava_onevision": "<image>\n",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}
REFERENCE_IMAGE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{image}Compress this image in one word:<|im_end|>\n"
    "<|im_start|>assistant\n<|im_end|>"
)
REFERENCE_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\na red squareCompress this sentence in one word:<|im_end|>\n"
    "<|im_start|>assistant\n<|im_end|>"
)
REFERENCE_IMAGE_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{image}what colour is it?<|im_end|>\n"
    "<|im_start|>assistant\n<|im_end|>"
)


def test_prompts_equal_reference_strings(cafe_model, family, images):
    items = to_embedding_inputs([images[0], "a red square", {"image": images[0], "text": "what colour is it?"}])
    rendered = render_embedding_prompts(cafe_model.processor, items, cafe_model.embedding_chat_template)
    image = IMAGE[family]
    assert rendered == [REFERENCE_IMAGE.format(image=image), REFERENCE_TEXT, REFERENCE_IMAGE_TEXT.format(image=image)]


def test_embedding_prompts_follow_the_models_own_chat_template(cafe_model, images):
    """The CAFe prompt is the model's own chat template applied to the embedding conversation
    (system, user turn with the image and the instruction, empty assistant turn), up to the pooled token."""
    processor = cafe_model.processor
    settings = cafe_model.cafe_settings
    cases = [
        ({"type": "image"}, None, settings.image_prompt),
        (None, "a red square", settings.text_prompt),
        ({"type": "image"}, "what colour is it?", settings.multimodal_prompt),
    ]
    for image, text, suffix in cases:
        content = ([image] if image else []) + [{"type": "text", "text": (text or "") + suffix}]
        conversation = [
            # List contents: llava-hf's template renders no plain-string content.
            {"role": "system", "content": [{"type": "text", "text": settings.system_prompt}]},
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": ""}]},
        ]
        own = processor.apply_chat_template(conversation, tokenize=False)
        item = to_embedding_inputs(
            [{"image": images[0], "text": text} if image and text else images[0] if image else text]
        )
        (rendered,) = render_embedding_prompts(processor, item, cafe_model.embedding_chat_template)
        assert own == rendered + "\n"


def test_pooled_token_is_the_final_im_end(cafe_model, images):
    batch = build_embedding_batch(
        cafe_model.processor, to_embedding_inputs([images[0], "hi"]), cafe_model.embedding_chat_template
    )
    im_end = cafe_model.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    last = batch["attention_mask"].sum(1) - 1  # right padding
    assert batch["input_ids"][torch.arange(2), last].tolist() == [im_end, im_end]


def test_embeddings_are_unit_norm_float32(cafe_model, images):
    emb = cafe_model.encode(images=images)
    assert emb.shape == (3, cafe_model.config.text_config.hidden_size)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_bf16_weights_give_float32_embeddings(tiny_checkpoint, images):
    from cafe import CafeForConditionalGeneration

    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    emb = model.encode([images[0], "a red square"])
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_same_embedding_alone_and_in_padded_mixed_batch(cafe_model, images, padding_side):
    cafe_model.processor.tokenizer.padding_side = padding_side
    try:
        inputs = [
            "a short text",
            images[0],
            "a much longer text about a red square on the left of a blue circle",
            {"image": images[2], "text": "green"},
            images[1],
        ]
        batched = cafe_model.encode(inputs, batch_size=len(inputs))
        alone = torch.cat([cafe_model.encode([item], batch_size=1) for item in inputs])
    finally:
        cafe_model.processor.tokenizer.padding_side = "right"
    assert (batched - alone).abs().max().item() <= 1e-5


def test_lm_head_is_never_called(cafe_model, images):
    calls = []
    handle = cafe_model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    try:
        cafe_model.encode([images[0], "text", {"image": images[1], "text": "both"}])
    finally:
        handle.remove()
    assert calls == []


def _vision_inputs(batch):
    """The processor's image tensors of a batch (what `CafeCollator` hands `get_vision_features`)."""
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}


def test_get_embeddings_reuses_precomputed_vision_features(cafe_model, images):
    batch = build_embedding_batch(
        cafe_model.processor, to_embedding_inputs(images=images), cafe_model.embedding_chat_template
    )
    with torch.no_grad():
        direct = cafe_model.get_embeddings(**batch)
        features = cafe_model.get_vision_features(**_vision_inputs(batch))
        reused = cafe_model.get_embeddings(batch["input_ids"], batch["attention_mask"], mm_encoder_outputs=features)
        # The features of some of the images, in another order (as a training step selects them).
        alone = build_embedding_batch(
            cafe_model.processor, to_embedding_inputs(images=[images[2], images[0]]), cafe_model.embedding_chat_template
        )
        selected = cafe_model.select_vision_features(features, torch.tensor([2, 0]))
        subset = cafe_model.get_embeddings(alone["input_ids"], alone["attention_mask"], mm_encoder_outputs=selected)
    torch.testing.assert_close(direct, reused)
    torch.testing.assert_close(subset, direct[[2, 0]])


def test_get_embeddings_equal_the_backbones_own_forward(cafe_model, images):
    """Positions (1-D RoPE, M-RoPE) as the stock backbone computes them on a processor batch."""
    inputs = [images[0], "a red square", {"image": images[2], "text": "green"}, images[1]]
    batch = build_embedding_batch(cafe_model.processor, to_embedding_inputs(inputs), cafe_model.embedding_chat_template)
    with torch.no_grad():
        hidden = cafe_model.model(**batch, use_cache=False).last_hidden_state
        stock = torch.nn.functional.normalize(last_token_pool(hidden, batch["attention_mask"]).float(), dim=-1)
        ours = cafe_model.get_embeddings(**batch)
    assert (stock - ours).abs().max().item() <= 1e-5


def test_different_inputs_give_different_embeddings(cafe_model, images):
    emb = cafe_model.encode([images[0], images[1], "red", "blue"])
    sims = emb @ emb.T
    assert (sims - torch.eye(4)).abs().max() > 1e-3


def test_progress_bar_for_long_inputs(cafe_model, capsys):
    cafe_model.encode([f"text number {i}" for i in range(5)], batch_size=2)
    assert "Embedding" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input
def test_empty_input_list(cafe_model):
    with pytest.raises(ValueError, match="input list is empty"):
        cafe_model.encode([])


def test_images_and_texts_of_different_lengths(cafe_model, images):
    with pytest.raises(ValueError, match=r"different lengths \(2 vs 1\)"):
        cafe_model.encode(images=images[:2], texts=["only one"])


def test_non_image_object(cafe_model):
    with pytest.raises(TypeError, match=r"Expected a PIL.Image.Image .* got ndarray"):
        import numpy as np

        cafe_model.encode(images=[np.zeros((4, 4, 3))])


def test_empty_text(cafe_model):
    with pytest.raises(ValueError, match="Empty text for input 1"):
        cafe_model.encode(["fine", "   "])


def test_missing_and_corrupt_image_files(cafe_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        cafe_model.encode([{"image": tmp_path / "missing.png"}])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="Corrupt or unreadable image"):
        cafe_model.encode([{"image": str(broken)}])


def test_processor_with_other_image_token(cafe_model, images):
    processor = cafe_model.processor
    original = processor.image_token_id
    processor.image_token_id = original + 1
    try:
        with pytest.raises(ValueError, match="image token id .* does not match"):
            cafe_model.encode(images=images[:1])
    finally:
        processor.image_token_id = original


def test_missing_processor(tiny_checkpoint):
    from cafe import CafeForConditionalGeneration

    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint, load_processor=False)
    with pytest.raises(ValueError, match="No processor"):
        model.encode(["text"])
