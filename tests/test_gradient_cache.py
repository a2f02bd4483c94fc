"""`CachedCafeLoss` (GradCache) gives `CafeLoss`'s loss and gradients, the logit scale's included."""

import math

import pytest
import torch
from PIL import Image

from cafe import (
    CachedCafeLoss,
    CafeCollator,
    CafeForConditionalGeneration,
    CafeLoss,
    CafeTrainer,
    CafeTrainingArguments,
)
from cafe.collator import MiniBatchCollator
from cafe.losses import RandomState

COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255), (0, 0, 0)]
NAMES = ["red", "green", "blue", "yellow", "white", "black"]


def records(mined_negative: bool = True):
    out = []
    for rgb, name in zip(COLOURS, NAMES, strict=True):
        out.append(
            {
                "image": Image.new("RGB", (32, 32), rgb),
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the picture."},
                    {"from": "gpt", "value": f"a {name} picture" + " with more words" * (len(name) % 3)},
                ],
            }
        )
    out[1]["negatives"] = ["a purple picture"]
    if mined_negative:
        # Record 2's answer, as a mined negative: masked for query 2 only if the negatives' content
        # ids follow the negatives across mini-batches (records 0-1 and 2-3; the second has none).
        out[1]["negatives"].append(out[2]["conversations"][1]["value"])
    return out


def load(tiny_checkpoint, dropout=0.0):
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    if dropout:
        model.config.text_config.attention_dropout = dropout
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = dropout
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
    return model.train()


def grads(model, loss=None):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if loss is not None:
        out.update({f"loss.{n}": p.grad.clone() for n, p in loss.named_parameters() if p.grad is not None})
    return out


def zero(model, loss):
    model.zero_grad()
    loss.zero_grad()


def assert_same_grads(a, b, rel=1e-5):
    assert a.keys() == b.keys() and a
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        scale = b[name].abs().max().item()
        # 1e-7 absolute floor: some gradients are zero in exact arithmetic (a key bias under softmax).
        assert err <= rel * scale + 1e-7, (name, err, scale)


def collator(model):
    return CafeCollator(model.processor, model=model)


@pytest.mark.parametrize("with_lm", [True, False])
@pytest.mark.parametrize("learnable", [False, True])
def test_matches_one_full_batch_without_dropout(tiny_checkpoint, with_lm, learnable):
    """Same loss and same gradients, the logit scale's included when it is learnable."""
    model = load(tiny_checkpoint)
    weights = dict(lm_weight=1.0 if with_lm else 0.0, learnable_logit_scale=learnable)
    plain, cached = CafeLoss(**weights), CachedCafeLoss(mini_batch_size=2, **weights)
    cached.load_state_dict(plain.state_dict())
    recs = records()

    zero(model, plain)
    plain_out = plain(model, collator(model)(recs))
    plain_out.loss.backward()
    expected = grads(model, plain)
    if learnable:
        assert "loss.contrastive.log_logit_scale" in expected

    zero(model, cached)
    out = cached(model, MiniBatchCollator(collator(model), 2)(recs))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(plain_out.loss.item(), rel=1e-5)
    # 1e-5 of each gradient's scale: the two paths sum in different orders, and float32 sums split
    # over another number of threads (a busy machine) differ by ~1e-6; a wrong scale is >= 1e-2.
    assert_same_grads(grads(model, cached), expected, rel=1e-5)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_matches_plain_computation_with_dropout(tiny_checkpoint, share_prefix):
    """GradCache's re-forward must repeat its first pass exactly, dropout masks included."""
    model = load(tiny_checkpoint, dropout=0.2)
    loss = CachedCafeLoss(mini_batch_size=2, share_prefix=share_prefix)
    mini_batches = MiniBatchCollator(collator(model), 2)(records())

    # Plain: the same mini-batches (same dropout masks), every activation kept, one backward.
    torch.manual_seed(0)
    states = []
    with torch.no_grad():
        for mb in mini_batches:
            states.append(RandomState())
            model(cafe_batch=mb, cafe_share_prefix=share_prefix)
    outs = []
    for state, mb in zip(states, mini_batches, strict=True):
        with state.restored():
            outs.append(model(cafe_batch=mb, cafe_share_prefix=share_prefix))
    total = sum(mb.supervised_tokens for mb in mini_batches)
    lm = sum(o.lm_loss * mb.supervised_tokens / total for o, mb in zip(outs, mini_batches, strict=True))

    def cat(side):
        return torch.cat([getattr(o, f"{side}_embeds") for o in outs if getattr(o, f"{side}_embeds") is not None])

    con = loss.contrastive(
        cat("query"),
        cat("doc"),
        cat("negative"),
        torch.cat([mb.query_groups for mb in mini_batches]),
        torch.cat([mb.doc_groups for mb in mini_batches]),
        torch.cat([mb.negative_groups for mb in mini_batches if mb.negative_groups is not None]),
    )
    plain_loss = loss.lm_weight * lm + loss.contrastive_weight * con.loss
    model.zero_grad()
    plain_loss.backward()
    plain = grads(model)

    # Dropout really is on: another draw gives another loss.
    with torch.no_grad():
        assert model(cafe_batch=mini_batches[0]).lm_loss.item() != pytest.approx(outs[0].lm_loss.item(), rel=1e-6)

    torch.manual_seed(0)
    model.zero_grad()
    out = loss(model, mini_batches)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert_same_grads(grads(model), plain)


def test_first_pass_keeps_no_graph(tiny_checkpoint):
    """Step 1 runs without gradient: the model's outputs there hold no autograd graph, and the
    vision tower runs twice per mini-batch in all (first pass, re-forward)."""
    model = load(tiny_checkpoint)
    loss = CachedCafeLoss(mini_batch_size=2)
    mini_batches = MiniBatchCollator(collator(model), 2)(records())
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda m, a, out: calls.append(torch.is_grad_enabled()))
    try:
        out = loss(model, mini_batches)
        assert calls == [False] * len(mini_batches)
        out.loss.backward()
    finally:
        hook.remove()
    assert calls == [False] * len(mini_batches) + [True] * len(mini_batches)


def test_trainer_step_equals_plain_with_gradient_accumulation(tiny_checkpoint, tmp_path):
    """Through Trainer (accumulation 2, learnable scale): the cached loss's backward hook gets the
    trainer's 1/accumulation scaling, so parameters after two optimizer steps match the plain run."""
    from datasets import Dataset

    for i, rgb in enumerate(COLOURS):
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"img{i}.png")
    dataset = Dataset.from_list(
        [{"image": f"img{i}.png", "text": f"a {name} picture"} for i, name in enumerate(NAMES)]
        + [{"image": f"img{i}.png", "text": f"the {name} one"} for i, name in enumerate(NAMES)]
    )

    def run(gradient_cache):
        model = load(tiny_checkpoint)
        args = CafeTrainingArguments(
            output_dir=str(tmp_path / f"run{gradient_cache}"),
            per_device_train_batch_size=3,
            gradient_accumulation_steps=2,
            max_steps=2,
            learning_rate=1e-2,
            optim="sgd",
            gradient_cache=gradient_cache,
            gradient_cache_mini_batch_size=1,
            learnable_logit_scale=True,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            seed=0,
            data_seed=0,
            vision_tower_learning_rate=None,
        )
        trainer = CafeTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=CafeCollator(model.processor, model=model, image_folder=str(tmp_path)),
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return model, trainer.loss, losses

    plain_model, plain_loss, plain_curve = run(False)
    cached_model, cached_loss, cached_curve = run(True)
    assert isinstance(cached_loss, CachedCafeLoss) and not isinstance(plain_loss, CachedCafeLoss)
    assert cached_curve == pytest.approx(plain_curve, rel=1e-4)
    scale_plain = plain_loss.contrastive.log_logit_scale.item()
    assert scale_plain != pytest.approx(math.log(20.0), abs=1e-6)  # it moved
    assert cached_loss.contrastive.log_logit_scale.item() == pytest.approx(scale_plain, abs=1e-6)
    plain_params = dict(plain_model.named_parameters())
    for name, param in cached_model.named_parameters():
        assert torch.allclose(param, plain_params[name], rtol=1e-4, atol=1e-6), name


def test_trainer_runs_with_gradient_cache(tiny_checkpoint, tmp_path):
    from datasets import Dataset

    model = load(tiny_checkpoint)
    dataset = Dataset.from_list([{"image": f"img{i}.png", "text": name} for i, name in enumerate(NAMES[:4])])
    for i, rgb in enumerate(COLOURS[:4]):
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"img{i}.png")
    args = CafeTrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=2,
        gradient_cache=True,
        gradient_cache_mini_batch_size=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = CafeTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=CafeCollator(model.processor, model=model, image_folder=str(tmp_path)),
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss", "loss_con", "loss_lm", "acc_q2d"} <= set(logged)


def test_mini_batch_larger_than_batch_is_an_error(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"gradient_cache_mini_batch_size \(16\) must be between 1 and per_device_train_batch_size \(8\)",
    ):
        CafeTrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=8,
            gradient_cache=True,
            gradient_cache_mini_batch_size=16,
            use_cpu=True,
        )
