"""Causal-prefix sharing (`cafe.shared_prefix`): the image-embedding sequence rides in the LM pass.

Checked per backbone family: the shared forward gives the unshared forward's embeddings, LM loss
and gradients; the LLM runs fewer token positions; and every fallback (no pair, unsupported
attention kernel, a pair whose image differs) still gives the right answer.
"""

import json

import pytest
import torch
from _training import llm_token_positions, write_training_data

from cafe import CafeCollator
from cafe.shared_prefix import common_prefix_length, shared_prefix_attention_mask

pytestmark = [pytest.mark.all_families, pytest.mark.released_formats]


@pytest.fixture()
def data(tmp_path):
    return write_training_data(tmp_path, names=("red", "green", "blue", "yellow"))


def collate(model, data, records=None, **kwargs):
    path, folder = data
    records = records if records is not None else json.loads(path.read_text())
    return CafeCollator(model.processor, model=model, image_folder=str(folder), **kwargs)(records)


def forward_and_grads(model, batch, share_prefix):
    model.zero_grad()
    out = model.cafe_forward(batch, share_prefix=share_prefix)
    # A loss touching every output, so every gradient path is compared.
    loss = out.lm_loss + (out.query_embeds * out.doc_embeds.detach()).sum() + out.doc_embeds.sum() * 0.1
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_shared_forward_equals_separate_passes_with_gradients(cafe_model, data):
    batch = collate(cafe_model, data)
    assert (batch.query_lm_index == torch.arange(4)).all()
    cafe_model.train()
    shared, shared_grads = forward_and_grads(cafe_model, batch, share_prefix=True)
    separate, separate_grads = forward_and_grads(cafe_model, batch, share_prefix=False)
    assert (shared.query_embeds - separate.query_embeds).abs().max().item() <= 1e-5
    assert torch.equal(shared.doc_embeds, separate.doc_embeds)
    assert shared.lm_loss.item() == pytest.approx(separate.lm_loss.item(), rel=1e-5)
    assert shared_grads.keys() == separate_grads.keys()
    for name, grad in separate_grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_sharing_runs_fewer_llm_positions(cafe_model, data):
    batch = collate(cafe_model, data)
    shared = llm_token_positions(cafe_model, batch, share_prefix=True)
    separate = llm_token_positions(cafe_model, batch, share_prefix=False)
    # Each record's prefix (system turn, header, image tokens) is computed once instead of twice.
    query_len = batch.query.attention_mask.sum(1)
    assert shared < separate
    assert separate - shared >= int(query_len.sum()) // 2


def test_some_queries_shared_some_not(cafe_model, data):
    """A record without an LM sequence embeds its query separately; the rest still share."""
    path, _ = data
    records = json.loads(path.read_text())
    records[1] = {"image": records[1]["image"], "text": "a green picture"}  # a pair record: no conversation
    batch = collate(cafe_model, data, records=records, caption_prompt=None)
    pairs = batch.query_lm_index.tolist()
    assert pairs[1] == -1 and sum(p >= 0 for p in pairs) == 3
    with torch.no_grad():
        shared = cafe_model.cafe_forward(batch, share_prefix=True)
        separate = cafe_model.cafe_forward(batch, share_prefix=False)
    assert (shared.query_embeds - separate.query_embeds).abs().max().item() <= 1e-5
    assert shared.lm_loss.item() == pytest.approx(separate.lm_loss.item(), rel=1e-5)


def test_eager_attention_takes_the_additive_mask(cafe_model, data):
    batch = collate(cafe_model, data)
    with torch.no_grad():
        sdpa = cafe_model.cafe_forward(batch, share_prefix=True)
        cafe_model.set_attn_implementation("eager")
        eager = cafe_model.cafe_forward(batch, share_prefix=True)
    assert (sdpa.query_embeds - eager.query_embeds).abs().max().item() <= 1e-5
    assert eager.lm_loss.item() == pytest.approx(sdpa.lm_loss.item(), rel=1e-5)


def test_a_pair_showing_another_image_is_not_packed(cafe_model, data):
    """`query_lm_index` is a hint; a pair whose embedding suffix would hold image tokens (the
    prefix does not cover the query's image) is embedded separately, with the right image."""
    batch = collate(cafe_model, data)
    batch.query_lm_index = torch.tensor([1, 0, 3, 2])  # rows swapped: different images, same sizes or not
    with torch.no_grad():
        shared = cafe_model.cafe_forward(batch, share_prefix=True)
        separate = cafe_model.cafe_forward(batch, share_prefix=False)
    assert (shared.query_embeds - separate.query_embeds).abs().max().item() <= 1e-5


def test_attention_mask_of_a_packed_row():
    # LM part: 5 tokens, the first 3 shared; embedding suffix: 2 tokens; then 1 padding position.
    mask = shared_prefix_attention_mask(torch.tensor([5]), torch.tensor([3]), torch.tensor([7]), 8)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 1, 0, 0],  # suffix: the prefix, not the LM continuation
            [1, 1, 1, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 1],  # padding: itself only
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_common_prefix_length():
    assert common_prefix_length(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])) == 2
    assert common_prefix_length(torch.tensor([1, 2]), torch.tensor([1, 2, 3])) == 2
    assert common_prefix_length(torch.tensor([7]), torch.tensor([1])) == 0


def test_trainer_step_with_activation_checkpointing_matches(tiny_checkpoint, data, tmp_path):
    """Through `CafeTrainer` (its `share_prefix` argument), with activation checkpointing on: the
    packed pass needs no KV cache, so re-running layers in backward is safe."""
    from _training import first_batch, make_trainer

    from cafe import CafeForConditionalGeneration

    grads = {}
    for share in (True, False):
        model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
        trainer = make_trainer(model, data, tmp_path / str(share), share_prefix=share)
        model.activation_checkpointing_enable()  # what Trainer.train() does for activation_checkpointing=True
        assert model.is_activation_checkpointing
        model.train()
        loss = trainer.compute_loss(trainer.model, first_batch(trainer))
        loss.backward()
        grads[share] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-5)
    for name, grad in grads[False][1].items():
        assert torch.allclose(grads[True][1][name], grad, atol=1e-5, rtol=1e-4), name


def test_an_attention_kernel_without_masks_says_sharing_is_off(cafe_model, data, caplog, monkeypatch):
    """flash-attention / flex cannot take the packed row's 4-D mask: separate passes, and a warning."""
    import logging

    from transformers.utils import logging as hf_logging

    batch = collate(cafe_model, data)
    monkeypatch.setattr(cafe_model.model.language_model.config, "_attn_implementation", "flash_attention_2")
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            packed = cafe_model._pack_shared_prefix(batch, None, None)
    finally:
        hf_logging.disable_propagation()
    assert packed is None
    assert any(
        "Prefix sharing is off" in r.getMessage() and "flash_attention_2" in r.getMessage() for r in caplog.records
    )
