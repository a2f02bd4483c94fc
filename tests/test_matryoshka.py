"""Matryoshka embeddings inside the CAFe objective: the loss, its cached (GradCache) gradient, the
trainer wiring and the saved settings (config.cafe and the sentence-transformers config)."""

import json

import pytest
import torch
import torch.nn.functional as F
from _training import make_trainer, write_training_data
from test_gradient_cache import assert_same_grads, collator, grads, load, records, zero

from cafe import CachedCafeLoss, CafeForConditionalGeneration, CafeLoss, CafeSettings
from cafe.collator import MiniBatchCollator
from cafe.losses import ContrastiveLoss

DIMS = [64, 32, 16, 8]  # the tiny model's hidden size is 64


def test_matryoshka_term_is_the_weighted_sum_of_truncated_infonce():
    torch.manual_seed(0)
    q, d, neg = torch.randn(6, 64), torch.randn(6, 64), torch.randn(2, 64)
    groups = torch.tensor([0, 1, 2, 0, 3, 4])
    weights = [1.0, 0.5, 0.25, 2.0]
    loss = CafeLoss(matryoshka_dims=DIMS, matryoshka_weights=weights)
    out = loss.contrastive_term(q, d, neg, None, groups)
    plain = ContrastiveLoss(0.05)
    expected = sum(
        w * plain(F.normalize(q[:, :k], dim=-1), F.normalize(d[:, :k], dim=-1), neg[:, :k], None, groups).loss
        for k, w in zip(DIMS, weights, strict=True)
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert sorted(out.loss_by_dim) == sorted(DIMS)
    full = plain(q, d, neg, None, groups)
    assert out.accuracy_query_to_doc == full.accuracy_query_to_doc  # accuracies of the full size
    assert out.loss_by_dim[64].item() == pytest.approx(full.loss.item(), rel=1e-6)


def test_without_matryoshka_the_loss_is_unchanged():
    torch.manual_seed(0)
    q, d = torch.randn(4, 64), torch.randn(4, 64)
    assert CafeLoss().contrastive_term(q, d, None, None, None).loss_by_dim is None
    one = CafeLoss(matryoshka_dims=[64]).contrastive_term(q, d, None, None, None).loss
    assert one.item() == pytest.approx(CafeLoss().contrastive_term(q, d, None, None, None).loss.item(), rel=1e-7)


def test_only_the_truncated_dimensions_get_the_small_sizes_gradient():
    q = torch.randn(4, 64, requires_grad=True)
    d = torch.randn(4, 64)
    CafeLoss(matryoshka_dims=[8]).contrastive_term(q, d, None, None, None).loss.backward()
    assert q.grad[:, 8:].abs().max() == 0 and q.grad[:, :8].abs().max() > 0


def test_bad_settings_name_the_fix(caplog):
    with pytest.raises(ValueError, match="distinct positive sizes"):
        CafeLoss(matryoshka_dims=[64, 64])
    with pytest.raises(ValueError, match="one weight per size"):
        CafeLoss(matryoshka_dims=[64, 32], matryoshka_weights=[1.0])
    with pytest.raises(ValueError, match=r"exceed the embedding size 64"):
        CafeLoss(matryoshka_dims=[128, 64]).contrastive_term(torch.randn(3, 64), torch.randn(3, 64), None, None, None)
    with pytest.raises(ValueError, match="distinct positive sizes or None"):
        CafeSettings(matryoshka_dims=[0])


@pytest.mark.parametrize("with_lm", [True, False])
def test_gradient_cache_gives_the_plain_matryoshka_loss_and_gradients(tiny_checkpoint, with_lm):
    """CachedCafeLoss caches the gradient of the whole Matryoshka sum w.r.t. the full embeddings."""
    model = load(tiny_checkpoint)
    kwargs = dict(lm_weight=1.0 if with_lm else 0.0, matryoshka_dims=DIMS, matryoshka_weights=[1.0, 1.0, 0.5, 0.5])
    plain, cached = CafeLoss(**kwargs), CachedCafeLoss(mini_batch_size=2, **kwargs)
    # One hard negative: with the mined one too, a vision k_proj gradient of ~1e-2 lands 2e-7 off,
    # float noise just past the 1e-5 + 1e-7 bound (the masking itself is checked in test_gradient_cache).
    recs = records(mined_negative=False)

    zero(model, plain)
    plain_out = plain(model, collator(model)(recs))
    plain_out.loss.backward()
    expected = grads(model)
    # Matryoshka changes the objective (so the check below compares something).
    without = CafeLoss(lm_weight=kwargs["lm_weight"])(model, collator(model)(recs)).loss.item()
    assert without != pytest.approx(plain_out.loss.item(), rel=1e-3)

    zero(model, cached)
    out = cached(model, MiniBatchCollator(collator(model), 2)(recs))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(plain_out.loss.item(), rel=1e-5)
    assert out.contrastive.loss_by_dim.keys() == plain_out.contrastive.loss_by_dim.keys()
    assert_same_grads(grads(model), expected)


def test_trainer_wires_the_dims_and_saves_them(tiny_checkpoint, tmp_path):
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    data = write_training_data(tmp_path, names=("red", "green", "blue", "yellow"))
    trainer = make_trainer(model, data, tmp_path, max_steps=1, matryoshka_dims=DIMS, matryoshka_weights=[1, 1, 1, 1])
    assert trainer.loss.matryoshka_dims == tuple(DIMS)
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {f"loss_con@{dim}" for dim in DIMS} <= logged
    assert model.config.cafe["matryoshka_dims"] == DIMS
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["cafe"]["matryoshka_dims"] == DIMS
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_config["matryoshka_dims"] == DIMS
    assert "truncate_dim" not in st_config  # the full size stays the default
    assert CafeForConditionalGeneration.from_pretrained(out).cafe_settings.matryoshka_dims == DIMS


def test_matryoshka_dims_parse_from_the_command_line():
    from transformers import HfArgumentParser

    from cafe import CafeTrainingArguments

    (args,) = HfArgumentParser(CafeTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "x", "--matryoshka_dims", "896", "256", "64", "--use_cpu", "true"]
    )
    assert args.matryoshka_dims == [896, 256, 64]
