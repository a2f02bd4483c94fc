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


@pytest.mark.parametrize("with_lm,rotation", [(True, None), (False, None), (True, "principal")])
def test_gradient_cache_gives_the_plain_matryoshka_loss_and_gradients(tiny_checkpoint, with_lm, rotation):
    """CachedCafeLoss caches the gradient of the whole Matryoshka sum w.r.t. the full embeddings
    (with a running principal basis: updated once per step, on the whole batch)."""
    model = load(tiny_checkpoint)
    kwargs = dict(lm_weight=1.0 if with_lm else 0.0, matryoshka_dims=DIMS, matryoshka_weights=[1.0, 1.0, 0.5, 0.5])
    if rotation:
        kwargs.update(matryoshka_rotation=True, matryoshka_rotation_method=rotation)
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
    if rotation:
        moment = cached.learned_rotation.second_moment
        assert moment.any() and torch.allclose(moment, plain.learned_rotation.second_moment, atol=1e-6)


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
    (args,) = HfArgumentParser(CafeTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "x", "--matryoshka_dims", "64", "8", "--matryoshka_rotation", "--use_cpu", "true"]
    )
    assert args.matryoshka_rotation and args.matryoshka_rotation_learning_rate == 1e-2
    assert args.matryoshka_rotation_method == "learned"
    (args,) = HfArgumentParser(CafeTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            "x",
            "--matryoshka_dims",
            "64",
            "8",
            "--matryoshka_rotation",
            "--use_cpu",
            "true",
            "--matryoshka_rotation_method",
            "principal",
            "--matryoshka_rotation_decay",
            "0.9",
        ]
    )
    assert (args.matryoshka_rotation_method, args.matryoshka_rotation_decay) == ("principal", 0.9)
    with pytest.raises(ValueError, match="matryoshka_rotation_method must be one of"):
        CafeTrainingArguments(output_dir="x", use_cpu=True, matryoshka_rotation_method="pca")
    with pytest.raises(ValueError, match="has no effect without matryoshka_rotation=True"):
        CafeTrainingArguments(output_dir="x", use_cpu=True, matryoshka_rotation_method="principal")
    with pytest.raises(ValueError, match="matryoshka_rotation_decay must be in"):
        CafeTrainingArguments(
            output_dir="x",
            use_cpu=True,
            matryoshka_dims=[64, 8],
            matryoshka_rotation=True,
            matryoshka_rotation_decay=1.5,
        )


# ---------------------------------------------------------------------- learned rotation
def _rotation_grad(loss, q, d):
    loss.learned_rotation.zero_grad()
    loss.contrastive_term(q, d, None, None, None).loss.backward()
    return loss.learned_rotation.parametrizations.weight.original.grad


def test_a_learned_rotation_starts_as_the_plain_loss_and_only_the_truncated_terms_train_it():
    torch.manual_seed(0)
    q, d, neg = torch.randn(6, 64), torch.randn(6, 64), torch.randn(2, 64)
    rotated = CafeLoss(matryoshka_dims=DIMS, matryoshka_rotation=True)
    assert torch.equal(rotated.rotation, torch.eye(64))
    plain = CafeLoss(matryoshka_dims=DIMS).contrastive_term(q, d, neg, None, None).loss
    assert rotated.contrastive_term(q, d, neg, None, None).loss.item() == pytest.approx(plain.item(), rel=1e-6)
    # Orthogonal: the full-size InfoNCE does not depend on it, the truncated ones do.
    full_only = CafeLoss(matryoshka_dims=[64], matryoshka_rotation=True)
    assert _rotation_grad(full_only, q, d).abs().max() < 1e-5
    assert _rotation_grad(rotated, q, d).abs().max() > 1e-2


def test_a_learned_rotation_moves_the_information_into_the_prefix():
    """Pairs that differ only in their last 8 coordinates: the first 8 retrieve at chance until
    the rotation, trained by the 8-dimension term, turns those directions to the front."""
    torch.manual_seed(0)

    def pairs(n):
        signal = torch.randn(n, 8)
        noise = torch.randn(n, 56)
        return torch.cat([noise, signal], 1), torch.cat([torch.randn(n, 56), signal + 0.1 * torch.randn(n, 8)], 1)

    def recall_at_8(loss, q, d):
        q, d = (q, d) if loss is None else (q @ loss.rotation.T, d @ loss.rotation.T)
        q, d = F.normalize(q[:, :8], dim=-1), F.normalize(d[:, :8], dim=-1)
        return ((q @ d.T).argmax(-1) == torch.arange(len(q))).float().mean().item()

    loss = CafeLoss(matryoshka_dims=[64, 8], matryoshka_rotation=True)
    test_q, test_d = pairs(200)
    assert recall_at_8(None, test_q, test_d) < 0.05
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-2)
    for _ in range(300):
        q, d = pairs(32)
        optimizer.zero_grad()
        loss.contrastive_term(q, d, None, None, None).loss.backward()
        optimizer.step()
    assert recall_at_8(loss, test_q, test_d) > 0.95
    rotation = loss.rotation.double()
    assert (rotation @ rotation.T - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-4  # still orthogonal
    loss.reset_rotation()
    assert torch.allclose(loss.rotation, torch.eye(64))


def test_a_principal_rotation_is_the_running_principal_basis_of_the_training_embeddings():
    """``matryoshka_rotation_method="principal"``: no parameter, a statistic of the embeddings the
    loss trains on, updated in training mode only, that puts the high-variance directions first."""
    from cafe.losses import RunningPrincipalBasis
    from cafe.rotation import principal_rotation

    torch.manual_seed(0)
    scale = torch.ones(64)
    scale[-8:] = 4.0  # most of the vectors' length in the last 8 coordinates

    def pairs(n):
        signal = torch.randn(n, 64) * scale
        return signal, signal + torch.randn(n, 64)

    def recall_at_8(rotation, q, d):
        q, d = F.normalize((q @ rotation.T)[:, :8], dim=-1), F.normalize((d @ rotation.T)[:, :8], dim=-1)
        return ((q @ d.T).argmax(-1) == torch.arange(len(q))).float().mean().item()

    loss = CafeLoss(matryoshka_dims=[64, 8], matryoshka_rotation=True, matryoshka_rotation_method="principal")
    assert isinstance(loss.learned_rotation, RunningPrincipalBasis) and not list(loss.parameters())[1:]
    test_q, test_d = pairs(300)
    assert recall_at_8(torch.eye(64), test_q, test_d) < 0.5
    loss.eval()  # evaluation steps do not move the statistic
    loss.contrastive_term(*pairs(32), None, None, None)
    assert torch.equal(loss.rotation, torch.eye(64)) and not loss.learned_rotation.second_moment.any()
    loss.train()
    for _ in range(40):
        q, d = pairs(32)
        out = loss.contrastive_term(q, d, None, None, None)
    assert out.loss.requires_grad is False  # no parameter in play: inputs without grad give none
    assert recall_at_8(loss.rotation, test_q, test_d) > 0.9
    # The leading 8-dimensional subspace is the last 8 coordinates'.
    assert loss.rotation[:8, -8:].pow(2).sum().item() == pytest.approx(8.0, abs=0.2)

    # On one repeated batch the running statistic converges to that batch's second moment: the
    # basis `principal_rotation` fits (up to signs; the eigenvalues here are distinct).
    q, d = pairs(200)
    basis = RunningPrincipalBasis(64, decay=0.5)
    for _ in range(60):
        basis.update(q, d)
    fitted = principal_rotation(torch.cat([q, d]))
    assert torch.allclose((basis.weight @ fitted.T).abs()[:8, :8], torch.eye(8), atol=1e-3)

    # Folded into the model: the statistic moves into the new basis (diagonal there), the basis restarts.
    loss.reset_rotation()
    assert torch.equal(loss.rotation, torch.eye(64))
    moment = loss.learned_rotation.second_moment
    assert (moment - torch.diag(moment.diagonal())).abs().max() < 1e-5
    assert moment.diagonal()[:8].min() > moment.diagonal()[8:].max()
    with pytest.raises(ValueError, match="matryoshka_rotation_method must be one of"):
        CafeLoss(matryoshka_dims=[64, 8], matryoshka_rotation=True, matryoshka_rotation_method="pca")
    # A non-finite batch leaves the statistic as it was (a NaN would stay in the running sum for good).
    before = loss.learned_rotation.second_moment.clone()
    bad = torch.randn(4, 64)
    bad[1, 3] = float("nan")
    loss.learned_rotation.update(bad)
    assert torch.equal(loss.learned_rotation.second_moment, before)
    with pytest.raises(ValueError, match="matryoshka_rotation_decay must be in"):
        CafeLoss(
            matryoshka_dims=[64, 8],
            matryoshka_rotation=True,
            matryoshka_rotation_method="principal",
            matryoshka_rotation_decay=1.0,
        )


def test_a_principal_rotation_over_fewer_embeddings_than_its_width_says_so(caplog):
    from cafe.losses import RunningPrincipalBasis

    with caplog.at_level("WARNING"):
        RunningPrincipalBasis(64, decay=0.5).update(torch.randn(3, 64), torch.randn(3, 64))
    assert any("averages over about 12 embeddings" in r.getMessage() for r in caplog.records)


def test_a_learned_rotation_needs_the_sizes_and_the_full_width():
    with pytest.raises(ValueError, match="matryoshka_rotation=True needs matryoshka_dims"):
        CafeLoss(matryoshka_rotation=True)
    loss = CafeLoss(matryoshka_dims=[32, 8], matryoshka_rotation=True)
    with pytest.raises(ValueError, match="list the full size 64 in matryoshka_dims"):
        loss.contrastive_term(torch.randn(3, 64), torch.randn(3, 64), None, None, None)
    from cafe import CafeTrainingArguments

    with pytest.raises(ValueError, match="matryoshka_rotation=True needs matryoshka_dims"):
        CafeTrainingArguments(output_dir="x", use_cpu=True, matryoshka_rotation=True)


def _rotation_run(tiny_checkpoint, data, tmp_path, output_dir, **overrides):
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=4,
        matryoshka_dims=DIMS,
        matryoshka_rotation=True,
        matryoshka_rotation_learning_rate=0.05,
    )
    kwargs.update(overrides)
    return model, make_trainer(model, data, tmp_path, **kwargs)


@pytest.mark.released_formats
@pytest.mark.parametrize("method", ["learned", "principal"])
def test_the_trainer_learns_the_rotation_and_the_checkpoint_serves_it(tiny_checkpoint, tmp_path, method):
    from sentence_transformers import SentenceTransformer

    data = write_training_data(tmp_path, names=("red", "green", "blue", "yellow"))
    model, trainer = _rotation_run(tiny_checkpoint, data, tmp_path, tmp_path / "run", matryoshka_rotation_method=method)
    items = ["a red picture", "a blue square", "green"]
    before = model.encode(items)
    trainer.train()
    # The learned rotation trains in its own optimizer group; the principal basis is no parameter.
    rotation_params = list(trainer.loss.learned_rotation.parameters())
    assert bool(rotation_params) == (method == "learned")
    rotation_groups = [
        group
        for group in trainer.optimizer.param_groups
        if any(p is q for p in group["params"] for q in rotation_params)
    ]
    assert len(rotation_groups) == (method == "learned")
    rotation = model.embedding_rotation
    assert rotation is not None and (rotation - torch.eye(64)).abs().max() > 1e-3  # it turned
    assert torch.allclose(trainer.loss.rotation, torch.eye(64))  # folded into the model, the loss restarts
    # Full size: the rotation changes no similarity.
    after = model.encode(items)
    with torch.no_grad():
        model.set_embedding_rotation(None)
        unrotated = model.encode(items)
        model.set_embedding_rotation(rotation)
    assert torch.allclose(after @ after.T, unrotated @ unrotated.T, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert (out / "2_Dense").is_dir()
    reloaded = CafeForConditionalGeneration.from_pretrained(out)
    assert torch.allclose(reloaded.embedding_rotation, rotation, atol=1e-6)
    st = SentenceTransformer(str(out), device="cpu", truncate_dim=8)
    served = st.encode(items, convert_to_tensor=True)
    assert torch.allclose(F.normalize(served, dim=-1), model.encode(items, truncate_dim=8), atol=1e-4)


@pytest.mark.parametrize("method", ["learned", "principal"])
def test_a_checkpoint_holds_the_rotation_of_its_step_and_resumes_it(tiny_checkpoint, tmp_path, method):
    data = write_training_data(tmp_path, names=("red", "green", "blue", "yellow"))
    saving = dict(save_strategy="steps", save_steps=2, learning_rate=1e-3, matryoshka_rotation_method=method)
    model, full = _rotation_run(tiny_checkpoint, data, tmp_path, tmp_path / "full", **saving)
    full.train()
    uninterrupted = model.embedding_rotation
    at_2 = CafeForConditionalGeneration.from_pretrained(tmp_path / "full" / "checkpoint-2").embedding_rotation
    assert at_2 is not None and not torch.allclose(at_2, uninterrupted, atol=1e-4)
    assert (at_2 - torch.eye(64)).abs().max() > 1e-3

    resumed_model, resumed = _rotation_run(tiny_checkpoint, data, tmp_path, tmp_path / "full", **saving)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert torch.allclose(resumed_model.embedding_rotation, uninterrupted, atol=1e-5)


def test_a_lora_adapter_folder_carries_the_learned_rotation(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    data = write_training_data(tmp_path, names=("red", "green", "blue", "yellow"))
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj"))
    trainer = make_trainer(
        peft_model,
        data,
        tmp_path,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        matryoshka_dims=DIMS,
        matryoshka_rotation=True,
        matryoshka_rotation_learning_rate=0.05,
    )
    trainer.train()
    # A checkpoint written mid-training holds the rotation of its step (learned, not yet folded in).
    from safetensors.torch import load_file

    at_1 = load_file(tmp_path / "run" / "checkpoint-1" / "cafe_embedding_rotation.safetensors")["rotation"]
    assert (at_1 - torch.eye(64)).abs().max() > 1e-3 and not torch.allclose(at_1, model.embedding_rotation, atol=1e-4)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "cafe_embedding_rotation.safetensors").is_file()
    loaded = CafeForConditionalGeneration.from_pretrained(tmp_path / "adapter")
    assert torch.allclose(loaded.embedding_rotation, model.embedding_rotation, atol=1e-6)
    items = ["a red picture", "green"]
    assert torch.allclose(loaded.encode(items, truncate_dim=8), model.encode(items, truncate_dim=8), atol=1e-4)


def test_a_passed_loss_without_the_rotation_says_the_argument_is_not_used(tiny_checkpoint, tmp_path, caplog):
    data = write_training_data(tmp_path, names=("red", "green", "blue", "yellow"))
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with caplog.at_level("WARNING"):
        make_trainer(
            model, data, tmp_path, loss=CafeLoss(matryoshka_dims=DIMS), matryoshka_dims=DIMS, matryoshka_rotation=True
        )
    assert any("learns no rotation: this run trains none" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        make_trainer(
            model,
            data,
            tmp_path,
            loss=CafeLoss(matryoshka_dims=DIMS, matryoshka_rotation=True),
            matryoshka_dims=DIMS,
            matryoshka_rotation=True,
            matryoshka_rotation_method="principal",
        )
    assert any("has a 'learned' rotation, which this run uses" in r.getMessage() for r in caplog.records)


def test_the_principal_basis_moves_on_training_steps_only(tiny_checkpoint, tmp_path):
    """CafeTrainer puts the loss in the model's mode: an evaluation step leaves the statistic alone."""
    from _training import first_batch

    data = write_training_data(tmp_path, names=("red", "green", "blue", "yellow"))
    model, trainer = _rotation_run(
        tiny_checkpoint, data, tmp_path, tmp_path / "run", matryoshka_rotation_method="principal"
    )
    batch = first_batch(trainer)
    statistic = trainer.loss.learned_rotation.second_moment
    model.eval()  # as Trainer's evaluation loop
    with torch.no_grad():
        trainer.compute_loss(model, batch)
    assert not statistic.any()
    model.train()  # as Trainer's training_step
    trainer.compute_loss(model, batch)
    assert statistic.any()
