"""Serving-grade embedding: the shared-prefix KV cache and length-sorted batching in `encode`.

The cached path must give the uncached path's vectors (1e-5 in float32) on every family, with
either padding side, for images, texts and pairs, and must say so when it cannot be used.
"""

import logging
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from cafe.inference import EmbeddingPrefixCache, length_sorted_order, split_prefix
from cafe.prompting import build_embedding_batch, to_embedding_inputs

pytestmark = [pytest.mark.all_families, pytest.mark.released_formats]


def _inputs(images):
    return [
        "a short text",
        images[0],
        "a much longer text about a red square on the left of a blue circle on a white background",
        {"image": images[2], "text": "green"},
        images[1],
        "hi",
    ]


@contextmanager
def padding(model, side):
    tokenizer = model.processor.tokenizer
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


@contextmanager
def warnings_captured(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            yield
    finally:
        hf_logging.disable_propagation()


def _suffix_lengths(model):
    """Records the sequence length of every backbone call (to see that the cache was used)."""
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    return seen, handle


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_cached_prefix_equals_the_uncached_path(cafe_model, images, padding_side, caplog):
    items = to_embedding_inputs(_inputs(images))
    with padding(cafe_model, padding_side):
        batch = build_embedding_batch(cafe_model.processor, items, cafe_model.embedding_chat_template)
    # Forced on every batch (released-format images are ~1.5k tokens, where encode skips it).
    cache = EmbeddingPrefixCache(cafe_model.prefix_cache_for().prefix_ids, min_prefix_fraction=0)
    seen, handle = _suffix_lengths(cafe_model)
    try:
        with torch.inference_mode(), warnings_captured(caplog):
            plain = cafe_model.get_embeddings(**batch)
            cached = cafe_model.get_embeddings(**batch, prefix_cache=cache)
    finally:
        handle.remove()
    assert not [r for r in caplog.records if "prefix cache" in r.getMessage()]
    # The cached call ran the backbone on the suffixes only (the prefix's pass is 15 tokens).
    assert seen[0] == batch["input_ids"].shape[1]
    assert seen[-1] == batch["input_ids"].shape[1] - len(cache)
    assert (plain - cached).abs().max().item() <= 1e-5


def test_long_inputs_skip_the_cache_by_design(cafe_model, caplog):
    """Below min_prefix_fraction of a batch's tokens the cache would cost more than it saves."""
    long_text = " ".join(["red square"] * 200)
    batch = build_embedding_batch(
        cafe_model.processor, to_embedding_inputs([long_text]), cafe_model.embedding_chat_template
    )
    seen, handle = _suffix_lengths(cafe_model)
    try:
        with torch.inference_mode(), caplog.at_level(logging.INFO):
            from transformers.utils import logging as hf_logging

            hf_logging.enable_propagation()
            try:
                skipped = cafe_model.get_embeddings(**batch, prefix_cache=True)
            finally:
                hf_logging.disable_propagation()
            forced = EmbeddingPrefixCache(cafe_model.prefix_cache_for().prefix_ids, min_prefix_fraction=0)
            cached = cafe_model.get_embeddings(**batch, prefix_cache=forced)
    finally:
        handle.remove()
    assert seen[0] == batch["input_ids"].shape[1]  # no cache
    assert seen[-1] == batch["input_ids"].shape[1] - len(forced)
    assert any("Long inputs embed without the shared-prefix cache" in r.getMessage() for r in caplog.records)
    assert (skipped - cached).abs().max().item() <= 1e-5


def test_encode_uses_the_cache_by_default_and_matches(cafe_model, images):
    inputs = _inputs(images)
    plain = cafe_model.encode(inputs, batch_size=3, use_prefix_cache=False)
    cached = cafe_model.encode(inputs, batch_size=3)
    assert (plain - cached).abs().max().item() <= 1e-5
    (cache,) = cafe_model._cafe_prefix_caches.values()
    assert cache.builds == 1  # once per model state, not per batch or call
    cafe_model.encode(inputs[:2])
    assert cache.builds == 1


def test_prefix_is_the_system_turn_and_user_header(cafe_model):
    cache = cafe_model.prefix_cache_for()
    text = cafe_model.processor.tokenizer.decode(cache.prefix_ids)
    assert text == f"<|im_start|>system\n{cafe_model.cafe_settings.system_prompt}<|im_end|>\n<|im_start|>user\n"


def test_bf16_cached_prefix_within_the_stated_tolerance(tiny_checkpoint, images):
    """The docstring's bf16 tolerance: max abs difference <= 1e-2 of unit-norm vectors, cosine >= 0.999."""
    from cafe import CafeForConditionalGeneration

    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).eval()
    batch = build_embedding_batch(model.processor, to_embedding_inputs(_inputs(images)), model.embedding_chat_template)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    forced = EmbeddingPrefixCache(model.prefix_cache_for().prefix_ids, min_prefix_fraction=0)
    with torch.inference_mode():
        plain = model.get_embeddings(**batch)
        cached = model.get_embeddings(**batch, prefix_cache=forced)
    assert (plain - cached).abs().max().item() <= 1e-2
    assert (plain * cached).sum(-1).min().item() >= 0.999


def test_weight_change_recomputes_the_prefix(cafe_model, images):
    inputs = ["a short text", "a much longer text about a red square", "hi"]
    before = cafe_model.encode(inputs)
    cache = cafe_model.prefix_cache_for()
    layer = cafe_model.model.language_model.layers[0]
    with torch.no_grad():
        layer.self_attn.k_proj.weight.mul_(1.5)  # in place, as an optimizer step
    after = cafe_model.encode(inputs)
    expected = cafe_model.encode(inputs, use_prefix_cache=False)
    assert cache.builds == 2
    assert (after - expected).abs().max().item() <= 1e-5
    assert (after - before).abs().max().item() > 1e-4


@pytest.mark.parametrize("fused", [True, False])
def test_an_optimizer_step_recomputes_the_prefix(cafe_model, fused):
    """A fused AdamW (Trainer's default, adamw_torch_fused) writes the weights without bumping
    their version counter; its step must still invalidate the cached prefix."""
    inputs = ["a short text", "a much longer text about a red square", "hi"]
    before = cafe_model.encode(inputs)
    weight = cafe_model.model.language_model.layers[0].self_attn.k_proj.weight
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=fused)
    weight.grad = torch.ones_like(weight)
    version = weight._version
    optimizer.step()
    assert fused == (weight._version == version)  # what the version counter alone would miss
    after = cafe_model.encode(inputs)
    assert (after - cafe_model.encode(inputs, use_prefix_cache=False)).abs().max().item() <= 1e-5
    assert (after - before).abs().max().item() > 1e-4


def test_dtype_change_gets_its_own_prefix(cafe_model, images):
    cafe_model.encode(["a text"])
    cache = cafe_model.prefix_cache_for()
    cafe_model.to(torch.bfloat16)
    cafe_model.encode(["a text"])
    assert cache.builds == 2


def test_with_gradients_it_says_so_and_runs_uncached(cafe_model, images, caplog):
    batch = build_embedding_batch(
        cafe_model.processor, to_embedding_inputs(["a text", "another text"]), cafe_model.embedding_chat_template
    )
    cafe_model.train()
    with warnings_captured(caplog):
        cached = cafe_model.get_embeddings(**batch, prefix_cache=True)
        cafe_model.get_embeddings(**batch, prefix_cache=True)
    plain = cafe_model.get_embeddings(**batch)
    messages = [r.getMessage() for r in caplog.records if "shared-prefix cache" in r.getMessage()]
    assert len(messages) == 1 and "gradients are enabled" in messages[0]  # once per model
    assert cached.requires_grad
    torch.testing.assert_close(cached, plain)


def test_an_input_that_breaks_the_prefix_runs_uncached_with_a_warning(cafe_model, caplog):
    """A batch whose row does not start with the prefix's tokens falls back, loudly."""
    batch = build_embedding_batch(
        cafe_model.processor, to_embedding_inputs(["a text", "b"]), cafe_model.embedding_chat_template
    )
    cache = EmbeddingPrefixCache(cafe_model.prefix_cache_for().prefix_ids.tolist()[:-1] + [0])
    with torch.inference_mode(), warnings_captured(caplog):
        cached = cafe_model.get_embeddings(**batch, prefix_cache=cache)
        plain = cafe_model.get_embeddings(**batch)
    torch.testing.assert_close(cached, plain)
    assert any("does not start with the prompt's prefix" in r.getMessage() for r in caplog.records)


def test_split_prefix_on_left_and_right_padding():
    prefix = torch.tensor([7, 8])
    right = torch.tensor([[7, 8, 1, 2, 3], [7, 8, 4, 0, 0]])
    right_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    left = torch.tensor([[7, 8, 1, 2, 3], [0, 0, 7, 8, 4]])
    left_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    for ids, mask in ((right, right_mask), (left, left_mask)):
        split = split_prefix(ids, mask, prefix)
        assert split.input_ids[0].tolist() == [1, 2, 3]
        assert split.input_ids[1, :1].tolist() == [4]
        assert split.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
        assert ids.gather(1, split.columns)[split.attention_mask.bool()].tolist() == [1, 2, 3, 4]
    assert "no longer than" in split_prefix(torch.tensor([[7, 8]]), torch.tensor([[1, 1]]), prefix)
    assert "does not start" in split_prefix(torch.tensor([[7, 9, 1]]), torch.tensor([[1, 1, 1]]), prefix)


# ----------------------------------------------------------------------------- length buckets
def _mixed_lengths(images):
    words = "red green blue square circle triangle left right top bottom".split()
    texts = [" ".join(words[j % len(words)] for j in range(n)) for n in (3, 60, 1, 25, 120, 8, 40)]
    return texts[:3] + [images[0]] + texts[3:] + [{"image": images[1], "text": "a blue picture"}]


def test_length_buckets_give_the_unbucketed_vectors_in_input_order(cafe_model, images):
    inputs = _mixed_lengths(images)
    bucketed = cafe_model.encode(inputs, batch_size=3, sort_by_length=True)
    unbucketed = cafe_model.encode(inputs, batch_size=3, sort_by_length=False)
    one_by_one = torch.cat([cafe_model.encode([item], batch_size=1) for item in inputs])
    assert (bucketed - unbucketed).abs().max().item() <= 1e-5
    assert (bucketed - one_by_one).abs().max().item() <= 1e-5  # the input order is restored


def test_length_buckets_batch_similar_lengths_longest_first(cafe_model, images):
    inputs = _mixed_lengths(images)
    lengths_per_batch = {}
    for sort in (True, False):
        seen = []
        handle = cafe_model.model.register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.append(kwargs["attention_mask"].sum(1).tolist()),
            with_kwargs=True,
        )
        try:
            cafe_model.encode(inputs, batch_size=3, sort_by_length=sort, use_prefix_cache=False)
        finally:
            handle.remove()
        lengths_per_batch[sort] = seen
    padded = {sort: sum(len(b) * max(b) for b in batches) for sort, batches in lengths_per_batch.items()}
    assert padded[True] < padded[False]
    maxima = [max(b) for b in lengths_per_batch[True]]
    assert maxima == sorted(maxima, reverse=True)


def test_length_sorted_order_is_stable_longest_first():
    assert length_sorted_order([3, 10, 3, 7]) == [1, 3, 0, 2]


def test_truncate_dim_is_the_renormalised_prefix(cafe_model):
    full = cafe_model.encode(["a red square", "a blue circle"])
    short = cafe_model.encode(["a red square", "a blue circle"], truncate_dim=16)
    torch.testing.assert_close(short, torch.nn.functional.normalize(full[:, :16], dim=-1))
    with pytest.raises(ValueError, match="truncate_dim must be an integer between 1 and the embedding size"):
        cafe_model.encode(["x"], truncate_dim=10_000)
    with pytest.raises(ValueError, match=r"integer between 1 .* got 8\.5"):
        cafe_model.encode(["x"], truncate_dim=8.5)


def test_a_string_naming_an_image_file_is_that_image_as_in_sentence_transformers(cafe_model, tmp_path):
    """sentence-transformers embeds a bare string that names an existing image file as the image;
    cafe does the same, so the two agree on the same list. Other strings stay texts, image URLs
    (which cafe does not fetch) are refused."""
    path = tmp_path / "red.png"
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    image.save(path)
    from_path = cafe_model.encode([str(path), "a red square"])
    expected = cafe_model.encode([image, "a red square"])
    torch.testing.assert_close(from_path, expected)
    # A name that is not a file, or a file named as text, stays text.
    as_text = cafe_model.encode([str(tmp_path / "missing.png")])
    assert (as_text - expected[:1]).abs().max() > 1e-3
    torch.testing.assert_close(cafe_model.encode([{"text": str(path)}]), cafe_model.encode(texts=[str(path)]))
    assert (cafe_model.encode(texts=[str(path)]) - expected[:1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="image URL: cafe does not download"):
        cafe_model.encode(["https://example.com/cat.jpg"])


def test_images_of_several_sizes(cafe_model):
    """Images whose token counts differ are sorted by their expanded length, and still match."""
    images = [Image.new("RGB", size, (200, 40, 40)) for size in ((16, 64), (64, 64), (32, 16), (48, 40))]
    sorted_ = cafe_model.encode(images, batch_size=2)
    plain = cafe_model.encode(images, batch_size=2, sort_by_length=False, use_prefix_cache=False)
    assert (sorted_ - plain).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- embed, then generate
def test_generation_continues_from_the_embedded_prompt(cafe_model, images, caplog):
    """GritLM-style reuse: the answer prompt opens like the embedding prompt (system turn, header,
    image, question) and shows a second image after it; greedy tokens are those of plain generate,
    for every family (Qwen2-VL's M-RoPE positions included)."""
    from cafe.inference import embed_keeping_cache, generate_reusing_prefix

    question = {"image": images[0], "text": "what colour is it?"}
    with torch.inference_mode():
        embedded = embed_keeping_cache(cafe_model, question)
    torch.testing.assert_close(embedded.embedding, cafe_model.encode([question], use_prefix_cache=False)[0])
    for shown in ([images[0]], [images[0], images[2]]):
        content = [{"type": "image"}, {"type": "text", "text": question["text"]}]
        if len(shown) == 2:  # a retrieved image after the cached prefix: it goes through the vision tower
            content += [{"type": "text", "text": "\nLike this one:"}, {"type": "image"}]
        content.append({"type": "text", "text": "\nAnswer the question briefly."})
        prompt = cafe_model.processor.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=cafe_model.cafe_settings.lm_chat_template,
            add_generation_prompt=True,
        )
        batch = cafe_model.processor(images=shown, text=prompt, return_tensors="pt")
        # Scores, not only tokens: a random tiny model repeats one token whatever its positions.
        settings = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
        with torch.inference_mode(), warnings_captured(caplog):
            reused_out, reused = generate_reusing_prefix(cafe_model, embedded, batch, **settings)
            plain = cafe_model.generate(**batch, **settings)
        assert reused_out.sequences.tolist() == plain.sequences.tolist(), len(shown)
        for step_reused, step_plain in zip(reused_out.scores, plain.scores, strict=True):
            torch.testing.assert_close(step_reused, step_plain, atol=1e-5, rtol=1e-5)
        first_image = (batch["input_ids"][0] == cafe_model.config.image_token_id).nonzero()
        image_tokens = int((batch["input_ids"][0] == cafe_model.config.image_token_id).sum()) // len(shown)
        # system turn, header, the first image and the question came from the cache
        assert reused > int(first_image[0]) + image_tokens, len(shown)
        assert embedded.cache.get_seq_length() == embedded.input_ids.shape[1]  # the kept cache is untouched
    assert not any("without reusing" in r.getMessage() for r in caplog.records)


def test_a_video_in_the_shared_prefix_stops_the_reuse_with_a_warning(cafe_model, caplog):
    """A video's tensors go to generate whole, so the reused prefix ends before its first token,
    and the shorter reuse is said, not only counted; the answer is still plain generate's."""
    from cafe.data import generate_clip_records
    from cafe.inference import embed_keeping_cache, generate_reusing_prefix
    from cafe.video import frame_sampling, load_video

    clip = generate_clip_records(1, seed=1, image_size=48)[0]["video"]
    with torch.inference_mode():
        embedded = embed_keeping_cache(cafe_model, {"video": clip, "text": "what moves?"})
    video = load_video(clip, frame_sampling(cafe_model.processor, cafe_model.cafe_settings))
    prompt = cafe_model.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what moves?"}]}],
        chat_template=cafe_model.cafe_settings.lm_chat_template,
        add_generation_prompt=True,
    )
    batch = cafe_model.processor(
        text=[prompt], videos=[video.frames], video_metadata=[video.metadata], return_tensors="pt"
    )
    settings = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.inference_mode(), warnings_captured(caplog):
        reused_out, reused = generate_reusing_prefix(cafe_model, embedded, batch, **settings)
        plain = cafe_model.generate(**batch, **settings)
    first_video = int((batch["input_ids"][0] == cafe_model.config.video_token_id).nonzero()[0])
    assert 0 < reused <= first_video  # system turn and header from the cache, the video computed anew
    assert any("before the first video" in r.getMessage() for r in caplog.records)
    assert reused_out.sequences.tolist() == plain.sequences.tolist()
    for step_reused, step_plain in zip(reused_out.scores, plain.scores, strict=True):
        torch.testing.assert_close(step_reused, step_plain, atol=1e-5, rtol=1e-5)


def test_images_are_opened_chunk_by_chunk_with_the_same_vectors(cafe_model, tmp_path, monkeypatch):
    """A list of photos larger than memory: `encode` opens them a chunk of batches at a time.
    Same vectors, and an error still names the input's place in the whole list."""
    import cafe.modeling

    paths = []
    for i, size in enumerate(((16, 64), (64, 64), (32, 16), (48, 40), (24, 24))):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)).save(paths[-1])
    inputs = [*paths, "a red square"]
    whole = cafe_model.encode(inputs, batch_size=2)
    opened = []
    load = cafe.modeling.load_embedding_inputs
    monkeypatch.setattr(cafe.modeling, "ENCODE_CHUNK_BATCHES", 1)
    monkeypatch.setattr(
        cafe.modeling, "load_embedding_inputs", lambda items, *a, **k: opened.append(len(items)) or load(items, *a, **k)
    )
    chunked = cafe_model.encode(inputs, batch_size=2)
    assert opened == [2, 2, 2]
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="for input 4: "):
        cafe_model.encode([*paths[:4], {"image": str(tmp_path / "missing.png")}], batch_size=2)
    # Texts alone stay one chunk: the length sort sees all of them.
    opened.clear()
    cafe_model.encode(["a", "bb", "ccc", "dddd", "eeeee"], batch_size=2)
    assert opened == [5]
