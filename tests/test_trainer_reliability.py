"""CafeTrainer loses nothing and says what is wrong: data checked before step 1, no pickles in
saved folders, record sampling resumed exactly, a clear word on an incomplete checkpoint."""

import json

import pytest
from _training import make_trainer, write_training_data
from datasets import Dataset
from PIL import Image
from transformers import TrainerCallback

from cafe import CafeCollator, CafeForConditionalGeneration, CafeTrainer, CafeTrainingArguments
from cafe.data.validation import DataValidationError


@pytest.fixture()
def data(tmp_path):
    return write_training_data(tmp_path)


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def trainer_on(model, records, folder, tmp_path, missing_images="raise", **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    kwargs.update(overrides)
    collator = CafeCollator(model.processor, model=model, image_folder=str(folder), missing_images=missing_images)
    return CafeTrainer(
        model=model,
        args=CafeTrainingArguments(**kwargs),
        train_dataset=Dataset.from_list(records),
        data_collator=collator,
    )


def test_a_bad_record_anywhere_stops_the_run_before_step_1(cafe_model, data, tmp_path):
    path, folder = data
    records = json.loads(path.read_text())
    records[-1]["image"] = "gone.png"  # the last record: found at the end of an epoch otherwise
    records[3]["conversations"][1]["value"] = " "
    trainer = trainer_on(cafe_model, records, folder, tmp_path)
    counter = CountSteps()
    trainer.add_callback(counter)
    with pytest.raises(DataValidationError) as err:
        trainer.train()
    assert counter.steps == 0
    message = str(err.value)
    assert "gone.png" in message and "2 of 8 records" in message  # every problem at once


def test_skip_drops_bad_records_up_front_so_no_batch_is_short(cafe_model, data, tmp_path):
    path, folder = data
    records = json.loads(path.read_text())[:5]
    records[1]["image"] = "gone.png"
    trainer = trainer_on(cafe_model, records, folder, tmp_path, missing_images="skip")
    trainer.train()  # 4 usable records, batches of 2: never "needs at least 2 pairs"
    assert trainer.state.global_step == 2 and len(trainer.train_dataset) == 4


def test_fewer_records_than_one_batch_is_a_clear_error(cafe_model, data, tmp_path):
    path, folder = data
    records = json.loads(path.read_text())[:3]
    trainer = trainer_on(cafe_model, records, folder, tmp_path, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match=r"3 usable records, fewer than one batch.*lower per_device_train_batch_size"):
        trainer.train()


def test_saved_folders_hold_no_pickle(cafe_model, data, tmp_path):
    trainer = make_trainer(cafe_model, data, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-2"):
        assert not (folder / "training_args.bin").exists()
        args = json.loads((folder / "training_args.json").read_text())
        assert args["max_steps"] == 2
    # The checkpoint still resumes (it needs no pickled arguments).
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


def test_trainer_push_to_hub_goes_through_cafes_upload(cafe_model, data, tmp_path, monkeypatch):
    import cafe.hub

    pushed = {}
    monkeypatch.setattr(
        cafe.hub,
        "push_folder_to_hub",
        lambda folder, repo_id, **kwargs: pushed.update(folder=folder, repo_id=repo_id) or "ok",
    )
    trainer = make_trainer(cafe_model, data, tmp_path, max_steps=1, hub_model_id="someone/cafe-run")
    trainer.train()
    assert trainer.push_to_hub() == "ok"
    assert pushed["repo_id"] == "someone/cafe-run"
    assert not (tmp_path / "run" / "training_args.bin").exists()


def test_resume_with_positives_draws_what_the_uninterrupted_run_draws(tiny_checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    colours = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
    records = []
    for name, rgb in colours.items():
        Image.new("RGB", (32, 32), rgb).save(folder / f"{name}.png")
        records.append(
            {
                "image": f"{name}.png",
                "positives": [f"a {name} picture", f"{name}", f"the colour {name}", f"something {name} here"],
            }
        )

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    def run(output_dir, stop=False, resume=None):
        model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
        trainer = trainer_on(
            model,
            records,
            folder,
            tmp_path,
            output_dir=str(output_dir),
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            learning_rate=1e-3,
            seed=0,
            data_seed=0,
        )
        if stop:
            trainer.add_callback(StopAt2())
        trainer.train(resume_from_checkpoint=resume)
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    full = run(tmp_path / "full")
    run(tmp_path / "part", stop=True)
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert resumed[-2:] == pytest.approx(full[2:], rel=1e-5)


def test_an_incomplete_checkpoint_names_itself_and_the_fix(tiny_checkpoint, data, tmp_path):
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    trainer = make_trainer(model, data, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a save killed half-way
    fresh = make_trainer(CafeForConditionalGeneration.from_pretrained(tiny_checkpoint), data, tmp_path, max_steps=4)
    with pytest.raises(RuntimeError, match=r"checkpoint-2.*incomplete.*Delete"):
        fresh.train(resume_from_checkpoint=True)
