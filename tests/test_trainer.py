"""CafeTrainer in depth on LLaVA-OneVision: Eq. 3, logging, parameter groups, LoRA, resume, CLI.

The backbone-dependent checks (one vision pass per image, no full-vocabulary logits, a few steps
lower the loss, `save_model` writes a vanilla checkpoint) run for every family in
tests/test_families_training.py.
"""

import pytest
import torch
from _training import first_batch, make_trainer, write_training_data
from PIL import Image

from cafe import CafeForConditionalGeneration


@pytest.fixture()
def data(tmp_path):
    return write_training_data(tmp_path)


def test_joint_loss_is_eq3(cafe_model, data, tmp_path):
    trainer = make_trainer(cafe_model, data, tmp_path, contrastive_weight=3.0, lm_weight=0.5)
    batch = first_batch(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(cafe_model, batch)
        out = cafe_model(cafe_batch=batch)
        con = trainer.loss.contrastive(out.query_embeds, out.doc_embeds, None, batch.query_groups, batch.doc_groups)
    assert loss.item() == pytest.approx(0.5 * out.lm_loss.item() + 3.0 * con.loss.item(), rel=1e-5)
    only_lm = make_trainer(cafe_model, data, tmp_path, compute_contrastive_loss=False)
    with torch.no_grad():
        assert only_lm.compute_loss(cafe_model, batch).item() == pytest.approx(out.lm_loss.item(), rel=1e-5)


def test_a_user_loss_plugs_in_without_editing_the_trainer(cafe_model, data, tmp_path):
    """`CafeTrainer(loss=...)`: a new contrastive objective is a `CafeLoss` subclass."""
    import torch.nn.functional as F

    from cafe import CafeLoss
    from cafe.losses import ContrastiveOutput

    class OneWayInfoNCE(CafeLoss):
        """Image->text InfoNCE only (no text->image term), fixed scale 10."""

        def contrastive_term(self, query, doc, negatives, query_groups, doc_groups, negative_groups):
            logits = 10.0 * query @ doc.T
            labels = torch.arange(len(query))
            loss = F.cross_entropy(logits, labels)
            acc = (logits.argmax(1) == labels).float().mean()
            return ContrastiveOutput(loss, acc, acc, torch.tensor(10.0))

    custom = make_trainer(
        cafe_model, data, tmp_path, max_steps=2, loss=OneWayInfoNCE(contrastive_weight=2.0, lm_weight=0.0)
    )
    assert isinstance(custom.loss, OneWayInfoNCE)
    batch = first_batch(custom)
    with torch.no_grad():
        out = cafe_model(cafe_batch=batch)
        got = custom.compute_loss(cafe_model, batch)
    expected = 2.0 * F.cross_entropy(10.0 * out.query_embeds @ out.doc_embeds.T, torch.arange(4))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    custom.train()
    assert custom.state.log_history[0]["logit_scale"] == pytest.approx(10.0)


def test_train_logs_cafe_metrics_and_param_groups(cafe_model, data, tmp_path):
    trainer = make_trainer(
        cafe_model,
        data,
        tmp_path,
        max_steps=2,
        gradient_accumulation_steps=2,
        vision_tower_learning_rate=2e-6,
        learning_rate=1e-5,
        activation_checkpointing=True,
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("loss_lm", "loss_con", "acc_q2d", "acc_d2q", "logit_scale", "data/lm_truncated"):
        assert key in logged
    assert logged["logit_scale"] == pytest.approx(20.0)
    lrs = {g["lr"] for g in trainer.optimizer.param_groups}
    vision_params = {id(p) for n, p in cafe_model.named_parameters() if "vision_tower" in n}
    for group in trainer.optimizer.param_groups:
        expected = 2e-6 if id(group["params"][0]) in vision_params else 1e-5
        assert group["initial_lr"] == expected
    assert lrs


def test_single_pair_batch_gives_clear_error(cafe_model, data, tmp_path):
    trainer = make_trainer(cafe_model, data, tmp_path, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="at least 2 pairs per batch"):
        trainer.compute_loss(cafe_model, first_batch(trainer))


def test_a_stock_model_or_a_missing_collator_is_named_with_the_fix(tiny_checkpoint, cafe_model, data, tmp_path):
    """Not an AttributeError from deep inside the trainer or the collator on the first batch."""
    from transformers import AutoModelForImageTextToText

    from cafe import CafeCollator, CafeTrainer, CafeTrainingArguments
    from cafe.training import load_records

    stock = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    with pytest.raises(TypeError, match=r"model= takes a CafeForConditionalGeneration, got .*from_pretrained\(path\)"):
        CafeCollator(cafe_model.processor, model=stock)
    args = CafeTrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(TypeError, match=r"CafeTrainer needs a CafeForConditionalGeneration .*got Llava"):
        CafeTrainer(model=stock, args=args, data_collator=CafeCollator(cafe_model.processor, model=cafe_model))
    with pytest.raises(TypeError, match=r"CafeTrainer needs data_collator=CafeCollator\(processor, model=model\)"):
        CafeTrainer(model=cafe_model, args=args, train_dataset=load_records(str(data[0])))


def test_an_lm_loss_that_cannot_happen_is_said(cafe_model, data, tmp_path, caplog):
    """The arguments ask for the LM loss, the collator builds no LM rows: a warning at construction,
    and the loss says so when a batch trains contrastively only."""
    import logging

    from cafe import CafeCollator, CafeTrainer, CafeTrainingArguments
    from cafe.training import load_records

    collator = CafeCollator(
        cafe_model.processor, model=cafe_model, image_folder=str(data[1]), compute_language_loss=False
    )
    args = CafeTrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=1)
    with caplog.at_level(logging.WARNING, logger="cafe.trainer"):
        trainer = CafeTrainer(
            model=cafe_model, args=args, train_dataset=load_records(str(data[0])), data_collator=collator
        )
    assert any("this run trains contrastively only" in r.getMessage() for r in caplog.records)
    with pytest.warns(UserWarning, match="The LM loss is on, but a batch has no LM sequences"):
        trainer.compute_loss(cafe_model, first_batch(trainer))


def test_a_plain_list_of_records_is_checked_before_step_1(cafe_model, data, tmp_path):
    """Trainer takes a list too: its bad records are named by their index before training starts."""
    from cafe import CafeCollator, CafeTrainer, CafeTrainingArguments
    from cafe.data.validation import DataValidationError
    from cafe.training import load_records

    records = load_records(str(data[0])).to_list()
    records[4] = {**records[4], "image": "nope.png"}
    records[5] = {**records[5], "image": " "}
    collator = CafeCollator(cafe_model.processor, model=cafe_model, image_folder=str(data[1]))
    args = CafeTrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=1)
    trainer = CafeTrainer(model=cafe_model, args=args, train_dataset=records, data_collator=collator)
    with pytest.raises(
        DataValidationError, match=r"(?s)#4: .*record 4 .*nope\.png.*#5: record 5 .*the image path is empty"
    ):
        trainer.train()
    # missing_images="skip" drops them up front, from the list as given (no Arrow round trip).
    collator = CafeCollator(cafe_model.processor, model=cafe_model, image_folder=str(data[1]), missing_images="skip")
    args.per_device_train_batch_size = 2
    trainer = CafeTrainer(model=cafe_model, args=args, train_dataset=records, data_collator=collator)
    trainer._check_training_data()
    assert trainer.train_dataset == records[:4] + records[6:]


def test_lora_merged_and_unmerged_give_same_embeddings(cafe_model, data, tmp_path, caplog):
    from peft import LoraConfig, PeftModel, get_peft_model

    from cafe.training import LORA_TARGETS

    peft_model = get_peft_model(
        cafe_model, LoraConfig(r=4, lora_alpha=8, target_modules=rf".*language_model.*\.({'|'.join(LORA_TARGETS)})")
    )
    trainer = make_trainer(peft_model, data, tmp_path, max_steps=3, learning_rate=1e-2)
    trainer.train()
    base = peft_model.get_base_model()
    inputs = [
        Image.new("RGB", (32, 32), (255, 0, 0)),
        "a red picture",
        {"image": Image.new("RGB", (32, 32), (0, 0, 255)), "text": "blue"},
    ]
    adapter_emb = base.encode(inputs)
    with peft_model.disable_adapter():
        without_adapters = base.encode(inputs)
    # The adapters changed the model (otherwise this test would prove nothing).
    assert (adapter_emb - without_adapters).abs().max().item() > 1e-3
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged_emb = merged.encode(inputs)
    assert (adapter_emb - merged_emb).abs().max().item() <= 1e-5
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    # An adapter folder (here PEFT's own save: no cafe_settings.json) loads on top of its base model,
    # the adapter merged in, or held by a PeftModel.
    import logging

    with caplog.at_level(logging.WARNING, logger="cafe.modeling"):
        folded = CafeForConditionalGeneration.from_pretrained(tmp_path / "adapter")
    assert any("has no cafe_settings.json (an adapter saved by PEFT itself" in r.getMessage() for r in caplog.records)
    assert type(folded) is type(base) and (folded.encode(inputs) - merged_emb).abs().max().item() <= 1e-5
    assert folded.processor is not None  # the base model's, since the adapter folder has none
    adapted = CafeForConditionalGeneration.from_pretrained(tmp_path / "adapter", merge_adapter=False)
    assert isinstance(adapted, PeftModel) and (adapted.encode(inputs) - adapter_emb).abs().max().item() <= 1e-5
    adapter_config = tmp_path / "adapter" / "adapter_config.json"
    adapter_config.write_text(adapter_config.read_text().replace(str(base.name_or_path), str(tmp_path / "gone")))
    with pytest.raises(OSError, match=r"is a PEFT adapter on top of the base model '.*gone'"):
        CafeForConditionalGeneration.from_pretrained(tmp_path / "adapter")
    merged.save_pretrained(tmp_path / "merged")
    reloaded = CafeForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert (reloaded.encode(inputs) - merged_emb).abs().max().item() <= 1e-5


def test_resume_reproduces_the_loss_curve(tiny_checkpoint, data, tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        """Interrupts the run after `step` optimizer steps, as a crash would (checkpoint saved first)."""

        def __init__(self, step):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                control.should_training_stop = True

    def run(output_dir, resume=None, stop_at=None):
        model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
        trainer = make_trainer(
            model,
            data,
            tmp_path,
            output_dir=str(output_dir),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            per_device_train_batch_size=2,
        )
        if stop_at:
            trainer.add_callback(StopAt(stop_at))
        trainer.train(resume_from_checkpoint=resume)
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    full = run(tmp_path / "full")
    interrupted = run(tmp_path / "part", stop_at=2)
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert len(full) == 4 and interrupted == pytest.approx(full[:2], rel=1e-5)
    assert resumed[-2:] == pytest.approx(full[2:], rel=1e-4)


def test_cafe_train_cli_end_to_end(tiny_checkpoint, data, tmp_path):
    from cafe.cli import main

    path, folder = data
    code = main(
        [
            "train",
            "--model_name_or_path",
            str(tiny_checkpoint),
            "--data_path",
            str(path),
            "--image_folder",
            str(folder),
            "--output_dir",
            str(tmp_path / "cli"),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "4",
            "--con_weight",
            "5",
            "--compute_language_loss",
            "True",
            "--compute_contrastive_loss",
            "True",
            "--report_to",
            "none",
            "--use_cpu",
            "True",
            "--save_strategy",
            "no",
        ]
    )
    assert code == 0
    model = CafeForConditionalGeneration.from_pretrained(tmp_path / "cli" / "final")
    assert model.processor is not None
    emb = model.encode(["a red picture"])
    assert emb.shape == (1, model.config.text_config.hidden_size)


def test_every_trainable_parameter_gets_a_gradient(cafe_model, data, tmp_path):
    # A trainable parameter without gradient makes DDP (find_unused_parameters=False) skip the
    # all-reduce of its whole bucket; CafeTrainer freezes the backbone's unused ones.
    trainer = make_trainer(cafe_model, data, tmp_path)
    assert not any(p.requires_grad for n, p in cafe_model.named_parameters() if "vision_tower.head" in n)
    trainer.compute_loss(cafe_model, first_batch(trainer)).backward()
    assert [n for n, p in cafe_model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_saved_checkpoint_card_holds_the_training_settings(cafe_model, data, tmp_path):
    trainer = make_trainer(cafe_model, data, tmp_path, max_steps=1, contrastive_weight=7.0)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "contrastive_weight" in card and "7.0" in card


def test_resume_restores_the_learned_logit_scale_exactly(tiny_checkpoint, data, tmp_path):
    """The learned scale is training state: a resumed run continues from the saved value (not
    1/0.05) and ends exactly where the uninterrupted run ends."""
    import math

    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    def trainer_for(output_dir):
        model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
        return make_trainer(
            model,
            data,
            tmp_path,
            output_dir=str(output_dir),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            per_device_train_batch_size=2,
            learnable_logit_scale=True,
            learning_rate=5e-2,
        )

    full = trainer_for(tmp_path / "full")
    full.train()
    learned = full.loss.contrastive.log_logit_scale.item()
    assert learned != pytest.approx(math.log(20.0), abs=1e-4)
    part = trainer_for(tmp_path / "part")
    part.add_callback(StopAt())
    part.train()
    at_two = part.loss.contrastive.log_logit_scale.item()

    resumed = trainer_for(tmp_path / "part")
    checkpoint = str(tmp_path / "part" / "checkpoint-2")
    resumed.create_optimizer_and_scheduler(num_training_steps=4)
    resumed._load_optimizer_and_scheduler(checkpoint)
    assert resumed.loss.contrastive.log_logit_scale.item() == at_two  # exactly, before any step
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.loss.contrastive.log_logit_scale.item() == pytest.approx(learned, abs=1e-6)
    # The saved checkpoint states the temperature it was trained with.
    saved = CafeForConditionalGeneration.from_pretrained(tmp_path / "part" / "checkpoint-4", load_processor=False)
    assert saved.cafe_settings.contrastive_temperature == pytest.approx(1 / math.exp(learned), rel=1e-5)


def test_lora_merged_save_writes_the_learned_temperature(tiny_checkpoint, data, tmp_path):
    import math

    from cafe.training import DataArguments, ModelArguments, build_trainer, save_final_model

    path, folder = data
    model_args = ModelArguments(model_name_or_path=str(tiny_checkpoint), use_lora=True, lora_r=4, merge_lora=True)
    data_args = DataArguments(data_path=str(path), image_folder=str(folder))
    from cafe import CafeTrainingArguments

    training_args = CafeTrainingArguments(
        output_dir=str(tmp_path / "lora"),
        max_steps=3,
        learning_rate=5e-2,
        per_device_train_batch_size=4,
        learnable_logit_scale=True,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = build_trainer(model_args, data_args, training_args)
    trainer.train()
    learned_temperature = 1 / math.exp(trainer.loss.contrastive.log_logit_scale.item())
    assert learned_temperature != pytest.approx(0.05, rel=1e-4)
    save_final_model(trainer, model_args, str(tmp_path / "final"))
    merged = CafeForConditionalGeneration.from_pretrained(tmp_path / "final")
    assert merged.cafe_settings.contrastive_temperature == pytest.approx(learned_temperature, rel=1e-5)
    assert merged.cafe_settings.learnable_logit_scale
