"""One length rule: an embedding text over the limit gets the same vector in training, in
`encode` and in sentence-transformers (the cut is in the embedding template all three render)."""

import pytest
import torch
from PIL import Image

from cafe import CafeCollator, CafeForConditionalGeneration
from cafe.configuration import CafeSettings

WORDS = "red green blue circle square triangle small large left right top bottom".split()


def long_text(n_words):
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


def test_a_text_over_the_limit_gets_one_vector_on_every_path(tiny_checkpoint, tmp_path, caplog):
    import logging

    from sentence_transformers import SentenceTransformer

    model = CafeForConditionalGeneration.from_pretrained(
        tiny_checkpoint, cafe_settings=CafeSettings(max_text_chars=300)
    )
    model.eval()
    text = long_text(450)  # ~2,700 characters, 9x the limit
    assert len(text) > 8 * 300
    records = [
        {"image": Image.new("RGB", (32, 32), (255, 0, 0)), "text": text},
        {"image": Image.new("RGB", (32, 32), (0, 0, 255)), "text": "a blue square"},
    ]
    with caplog.at_level(logging.WARNING, logger="cafe.collator"):
        batch = CafeCollator(model.processor, model=model)(records)
    assert batch.counts["embedding_text_truncated"] == 1
    assert any("max_text_chars=300" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        trained = model(cafe_batch=batch).doc_embeds[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cafe.modeling"):
        encoded = model.encode([text, "a blue square"])[0]
    # encode says so too: two texts that differ only past the limit get one vector.
    assert any("1 text(s) are longer than max_text_chars=300" in r.getMessage() for r in caplog.records)
    assert (encoded - trained).abs().max().item() <= 1e-5
    # The cut is the limit's: the text cut by hand gives the same vector, the whole text would not.
    assert (model.encode([text[:300]])[0] - encoded).abs().max().item() <= 1e-6
    model.save_pretrained(tmp_path)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    st_vector = torch.from_numpy(st.encode([text]))[0]
    assert torch.nn.functional.cosine_similarity(st_vector, encoded, dim=0).item() >= 0.9999


def test_no_limit_and_a_prompt_past_the_context_is_a_clear_error(tiny_checkpoint):
    model = CafeForConditionalGeneration.from_pretrained(
        tiny_checkpoint, cafe_settings=CafeSettings(max_text_chars=None)
    )
    context = model.config.get_text_config().max_position_embeddings
    with pytest.raises(ValueError, match=r"longer than the model's context \(2048 positions\).*max_text_chars"):
        model.encode([long_text(context + 100)])


def test_max_text_chars_must_be_positive():
    with pytest.raises(ValueError, match="max_text_chars must be >= 1 or None"):
        CafeSettings(max_text_chars=0)


def test_a_dict_of_settings_overrides_only_what_it_names(tiny_checkpoint, tmp_path):
    """``cafe_settings={"max_text_chars": ...}`` (what encode's warning suggests) keeps the
    checkpoint's other settings; a `CafeSettings` replaces them all."""
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model.config.cafe = CafeSettings.from_dict({**model.config.cafe, "matryoshka_dims": [64, 16]}).to_dict()
    model.save_pretrained(tmp_path)
    merged = CafeForConditionalGeneration.from_pretrained(tmp_path, cafe_settings={"max_text_chars": 4096})
    assert merged.cafe_settings.max_text_chars == 4096 and merged.cafe_settings.matryoshka_dims == [64, 16]
    replaced = CafeForConditionalGeneration.from_pretrained(tmp_path, cafe_settings=CafeSettings(max_text_chars=4096))
    assert replaced.cafe_settings.matryoshka_dims is None
