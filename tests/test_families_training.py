"""The key CAFe training checks, once per backbone family (see tests/conftest.py).

tests/test_trainer.py covers the trainer in depth on LLaVA-OneVision; this suite checks, for every
family, what depends on the backbone: the training forward reuses one vision pass per image and
gives the same embeddings and LM loss as the inference path and the stock model, a few steps
lower the joint loss, and `save_model` writes a vanilla checkpoint.
"""

import json
from pathlib import Path

import pytest
import torch
from _training import first_batch, make_trainer, write_training_data
from PIL import Image

from cafe import CafeCollator
from cafe.testing import batch_image_count

pytestmark = [pytest.mark.all_families, pytest.mark.released_formats]


@pytest.fixture()
def data(tmp_path):
    return write_training_data(tmp_path, names=("red", "green", "blue", "yellow"))


def vision_module(model):
    return getattr(model.model, type(model).cafe_vision_modules[0])


def test_one_vision_pass_per_image_and_no_full_vocab_logits(cafe_model, data, tmp_path):
    trainer = make_trainer(cafe_model, data, tmp_path)
    batch = first_batch(trainer)
    assert batch_image_count(batch) == 4
    vision_rows, head_inputs = [], []
    h1 = vision_module(cafe_model).register_forward_hook(lambda m, i, o: vision_rows.append(i[0].shape[0]))
    h2 = cafe_model.lm_head.register_forward_hook(lambda m, i, o: head_inputs.append(tuple(i[0].shape)))
    try:
        trainer.compute_loss(cafe_model, batch).backward()
    finally:
        h1.remove(), h2.remove()
    pixels = batch.vision["pixel_values"]
    # One call over every distinct image once: LLaVA-OneVision stacks [images, crops, ...],
    # Qwen2-VL concatenates the images' patches [patches, dim].
    assert vision_rows == [pixels.shape[0] * pixels.shape[1] if pixels.ndim == 5 else pixels.shape[0]]
    supervised = int((batch.lm.labels[:, 1:] != -100).sum())
    assert head_inputs == [(supervised, cafe_model.config.text_config.hidden_size)]


def test_training_forward_equals_encode_and_the_stock_lm_loss(cafe_model, data):
    """Shared vision features + cafe's positions give what inference (`encode`) and the stock
    forward (its own vision pass and positions) give on the same inputs."""
    path, folder = data
    records = json.loads(path.read_text())
    collator = CafeCollator(cafe_model.processor, model=cafe_model, image_folder=str(folder))
    batch = collator(records)
    names = [Path(r["image"]).stem for r in records]
    images = [Image.open(folder / f"{name}.png").convert("RGB") for name in names]
    conversations = [collator.parser(record, i).conversation for i, record in enumerate(records)]
    template = cafe_model.cafe_settings.lm_chat_template  # the reference's format, not the checkpoint's
    prompts = [
        cafe_model.processor.apply_chat_template(c, chat_template=template, tokenize=False) for c in conversations
    ]
    stock_batch = cafe_model.processor(text=prompts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(stock_batch["input_ids"], batch.lm.input_ids)
    with torch.no_grad():
        out = cafe_model(cafe_batch=batch)
        encoded = cafe_model.encode(images)
        texts = cafe_model.encode([f"a {name} picture" for name in names])
        stock = type(cafe_model).backbone_class().forward(cafe_model, **stock_batch, labels=batch.lm.labels)
    assert (out.query_embeds - encoded).abs().max().item() <= 1e-5
    assert (out.doc_embeds - texts).abs().max().item() <= 1e-5
    assert out.lm_loss.item() == pytest.approx(stock.loss.item(), rel=1e-5)


def test_optimizer_steps_lower_the_joint_loss(cafe_model, data, tmp_path, checkpoint_format):
    trainer = make_trainer(cafe_model, data, tmp_path)
    batch = first_batch(trainer)
    with torch.no_grad():
        before = trainer.compute_loss(cafe_model, batch).item()
    # Released formats show each plain-coloured image as ~1.5k nearly identical tokens (anyres):
    # at random init the InfoNCE then overshoots at lr 1e-3 (measured: 20.8 -> 96.8 in one step),
    # and takes more, smaller steps.
    lr, steps = (1e-3, 8) if checkpoint_format == "tiny" else (1e-4, 16)
    optimizer = torch.optim.AdamW(cafe_model.parameters(), lr=lr)
    cafe_model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        trainer.compute_loss(cafe_model, batch).backward()
        optimizer.step()
    with torch.no_grad():
        after = trainer.compute_loss(cafe_model, batch).item()
    assert after < 0.9 * before


def test_save_model_writes_a_vanilla_checkpoint(cafe_model, stock_class, data, tmp_path):
    trainer = make_trainer(cafe_model, data, tmp_path, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == [stock_class.__name__]
    stock, info = stock_class.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in cafe_model.state_dict().items():
        assert torch.equal(stock.state_dict()[key], value), key


def test_the_logged_learning_rate_is_the_language_models(cafe_model, data, tmp_path):
    """Trainer logs its first parameter group's rate; on Qwen2-VL that group is the vision tower's.
    The logged rate is the one --learning_rate sets, whatever the group order."""
    trainer = make_trainer(
        cafe_model,
        data,
        tmp_path,
        max_steps=1,
        learning_rate=1e-5,
        vision_tower_learning_rate=2e-6,
        lr_scheduler_type="constant",
        per_device_train_batch_size=2,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {1e-5, 2e-6}
    assert trainer._get_learning_rate() == pytest.approx(1e-5)
