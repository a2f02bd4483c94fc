"""GradCache gives the plain computation's loss and gradients."""

import pytest
import torch
from PIL import Image

from cafe import CafeCollator, CafeForConditionalGeneration, CafeTrainer, CafeTrainingArguments
from cafe.gradient_cache import MiniBatchCollator, RandomState, gradient_cache_step, supervised_tokens

COLOURS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255), (0, 0, 0)]
NAMES = ["red", "green", "blue", "yellow", "white", "black"]


def records():
    out = []
    for rgb, name in zip(COLOURS, NAMES):
        out.append({"image": Image.new("RGB", (32, 32), rgb), "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": f"a {name} picture" + " with more words" * (len(name) % 3)}]})
    out[1]["negatives"] = ["a purple picture"]
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


def make_trainer(model, tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=6, report_to=[], use_cpu=True,
                  save_strategy="no")
    kwargs.update(overrides)
    return CafeTrainer(model=model, args=CafeTrainingArguments(**kwargs),
                       data_collator=CafeCollator(model.processor, model=model))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        err = (a[name] - b[name]).abs().max().item(); scale = b[name].abs().max().item()
        # 1e-7 absolute floor: some gradients are zero in exact arithmetic (a key bias under softmax).
        assert err <= 1e-5 * scale + 1e-7, (name, err, scale)


def run_gradient_cache(trainer, model, mini_batches, share_prefix=True):
    args = trainer.args
    return gradient_cache_step(
        model, mini_batches,
        contrastive_fn=trainer._contrastive if args.compute_contrastive_loss else None,
        lm_weight=args.lm_weight if args.compute_language_loss else 0.0,
        contrastive_weight=args.contrastive_weight,
        backward=lambda t: t.backward(), no_sync=_Null, share_prefix=share_prefix,
    )


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("with_lm", [True, False])
def test_matches_one_full_batch_without_dropout(tiny_checkpoint, tmp_path, with_lm):
    model = load(tiny_checkpoint)
    trainer = make_trainer(model, tmp_path, compute_language_loss=with_lm)
    collator = trainer.data_collator
    recs = records()

    model.zero_grad()
    plain_loss = trainer.compute_loss(model, collator(recs))
    plain_loss.backward()
    plain = grads(model)

    model.zero_grad()
    result = run_gradient_cache(trainer, model, MiniBatchCollator(collator, 2)(recs)["mini_batches"])
    assert result.loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert_same_grads(grads(model), plain)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_matches_plain_computation_with_dropout(tiny_checkpoint, tmp_path, share_prefix):
    """GradCache's re-forward must repeat its first pass exactly, dropout masks included. With
    prefix sharing, query embeddings come out of the LM pass, so the first pass runs it too."""
    model = load(tiny_checkpoint, dropout=0.2)
    trainer = make_trainer(model, tmp_path)
    mini_batches = MiniBatchCollator(trainer.data_collator, 2)(records())["mini_batches"]
    args = trainer.args
    lm_keys = ("input_ids", "attention_mask", "labels", "lm_image_index")

    # Plain: the same mini-batches (same dropout masks), every activation kept, one backward.
    torch.manual_seed(0)
    states = []
    with torch.no_grad():
        for mb in mini_batches:
            states.append(RandomState())
            first = {k: v for k, v in mb.items() if k not in (("labels",) if share_prefix else lm_keys)}
            model(cafe_batch=first, cafe_share_prefix=share_prefix)
    outs = []
    for state, mb in zip(states, mini_batches):
        with state.restored():
            outs.append(model(cafe_batch=dict(mb), cafe_share_prefix=share_prefix))
    total = sum(supervised_tokens(mb) for mb in mini_batches)
    lm = sum(o.lm_loss * supervised_tokens(mb) / total for o, mb in zip(outs, mini_batches))
    cat = lambda side: torch.cat([getattr(o, f"{side}_embeds") for o in outs if getattr(o, f"{side}_embeds") is not None])
    con = trainer.contrastive_loss(cat("query"), cat("doc"), cat("negative"),
                                   torch.cat([mb["query_groups"] for mb in mini_batches]),
                                   torch.cat([mb["doc_groups"] for mb in mini_batches]))
    plain_loss = args.lm_weight * lm + args.contrastive_weight * con.loss
    model.zero_grad()
    plain_loss.backward()
    plain = grads(model)

    # Dropout really is on: another draw gives another loss.
    with torch.no_grad():
        assert model(cafe_batch=dict(mini_batches[0])).lm_loss.item() != pytest.approx(outs[0].lm_loss.item(), rel=1e-6)

    torch.manual_seed(0)
    model.zero_grad()
    result = run_gradient_cache(trainer, model, mini_batches, share_prefix=share_prefix)
    assert result.loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert_same_grads(grads(model), plain)


def test_first_pass_never_calls_the_lm_head(tiny_checkpoint, tmp_path):
    """The gradient-free first pass needs embeddings only: with prefix sharing it runs the LM
    sequences (the query embeddings come out of that pass) but not the vocabulary projection."""
    model = load(tiny_checkpoint)
    trainer = make_trainer(model, tmp_path)
    mini_batches = MiniBatchCollator(trainer.data_collator, 2)(records())["mini_batches"]
    calls = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: calls.append(torch.is_grad_enabled()))
    try:
        run_gradient_cache(trainer, model, mini_batches)
    finally:
        hook.remove()
    assert calls == [True] * len(mini_batches)  # the re-forwards with gradient only


def test_trainer_runs_with_gradient_cache(tiny_checkpoint, tmp_path):
    from datasets import Dataset

    model = load(tiny_checkpoint)
    dataset = Dataset.from_list([{"image": f"img{i}.png", "text": name} for i, name in enumerate(NAMES[:4])])
    for i, rgb in enumerate(COLOURS[:4]):
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"img{i}.png")
    args = CafeTrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
                                 gradient_cache=True, gradient_cache_mini_batch_size=2, logging_steps=1,
                                 report_to=[], use_cpu=True, save_strategy="no")
    trainer = CafeTrainer(model=model, args=args, train_dataset=dataset,
                          data_collator=CafeCollator(model.processor, model=model, image_folder=str(tmp_path)))
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss", "loss_con", "loss_lm", "acc_q2d"} <= set(logged)


def test_mini_batch_larger_than_batch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"gradient_cache_mini_batch_size \(16\) must be between 1 and per_device_train_batch_size \(8\)"):
        CafeTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_cache=True,
                              gradient_cache_mini_batch_size=16, use_cpu=True)
