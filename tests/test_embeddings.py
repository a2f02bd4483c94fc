"""get_embeddings / encode: pooling, padding, prompts, and bad input."""

import pytest
import torch

from cafe.prompting import build_embedding_batch, render_embedding_prompts, to_embedding_inputs

REFERENCE_IMAGE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nCompress this image in one word:<|im_end|>\n"
    "<|im_start|>assistant\n<|im_end|>"
)
REFERENCE_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\na red squareCompress this sentence in one word:<|im_end|>\n"
    "<|im_start|>assistant\n<|im_end|>"
)
REFERENCE_IMAGE_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nwhat colour is it?<|im_end|>\n"
    "<|im_start|>assistant\n<|im_end|>"
)


def test_prompts_equal_reference_strings(cafe_model, images):
    items = to_embedding_inputs([images[0], "a red square", {"image": images[0], "text": "what colour is it?"}])
    rendered = render_embedding_prompts(cafe_model.processor, items, cafe_model.embedding_chat_template)
    assert rendered == [REFERENCE_IMAGE, REFERENCE_TEXT, REFERENCE_IMAGE_TEXT]


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


def test_get_embeddings_reuses_precomputed_vision_features(cafe_model, images):
    batch = build_embedding_batch(
        cafe_model.processor, to_embedding_inputs(images=images[:2]), cafe_model.embedding_chat_template
    )
    with torch.no_grad():
        direct = cafe_model.get_embeddings(**batch)
        features = cafe_model.get_vision_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
            batch_num_images=batch.get("batch_num_images"),
        )
        reused = cafe_model.get_embeddings(batch["input_ids"], batch["attention_mask"], mm_encoder_outputs=features)
    torch.testing.assert_close(direct, reused)


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
