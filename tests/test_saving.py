"""`save_pretrained` replaces a folder only once a save is complete, and nothing of an earlier save
survives the new one.

Every check loads the folder the three ways users do (cafe, stock transformers,
sentence-transformers) and compares what loads with the model that was (or was not) saved.
"""

import json
import os

import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import LlavaOnevisionForConditionalGeneration

from cafe import CafeForConditionalGeneration

TEXT = "a red picture"


def _fingerprint(model) -> float:
    """A number that changes with any weight: the sum of every parameter."""
    return sum(float(p.detach().double().sum()) for p in model.parameters())


def _shifted(model):
    """The same model with every weight moved: a "newer" model to save over an older one."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    return model


@pytest.fixture()
def old(tiny_checkpoint):
    return CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


@pytest.fixture()
def new(tiny_checkpoint):
    return _shifted(CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)).eval()


def assert_folder_holds(folder, model):
    """cafe, stock transformers and sentence-transformers all load `model`'s weights from `folder`."""
    expected = _fingerprint(model)
    cafe = CafeForConditionalGeneration.from_pretrained(folder)
    assert _fingerprint(cafe) == pytest.approx(expected, abs=1e-6)
    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(folder)
    assert _fingerprint(stock) == pytest.approx(expected, abs=1e-6)
    st_vector = torch.from_numpy(SentenceTransformer(str(folder), device="cpu").encode([TEXT]))
    assert torch.allclose(st_vector, model.encode([TEXT]), atol=1e-5)


def assert_no_leftovers(folder):
    """Nothing but the folder itself in its parent: no staging or replaced copy left behind."""
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


# ----------------------------------------------------------------------------- interrupted saves
def _fail_weights(monkeypatch, model):
    import transformers.modeling_utils

    def truncated_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 16)  # what a full disk or a kill mid-write leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", truncated_write)


def _fail_processor(monkeypatch, model):
    def fail(*args, **kwargs):
        raise OSError("processor write failed")

    monkeypatch.setattr(model.processor, "save_pretrained", fail)


def _fail_sentence_transformers(monkeypatch, model):
    import cafe.export

    def half_written(save_directory, *args, **kwargs):
        (save_directory / "modules.json").write_text("[")
        raise OSError("sentence-transformers files: write failed")

    monkeypatch.setattr(cafe.export, "write_sentence_transformers_files", half_written)


def _fail_card(monkeypatch, model):
    import cafe.hub

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # an interruption is not an Exception, and must clean up too

    monkeypatch.setattr(cafe.hub, "write_model_card", fail)


def _fail_swap(monkeypatch, model):
    real_rename = os.rename

    def rename(src, dst):
        if ".saving-" in os.fspath(src):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize(
    "inject",
    [_fail_weights, _fail_processor, _fail_sentence_transformers, _fail_card, _fail_swap],
    ids=["weights", "processor", "sentence-transformers", "card", "swap"],
)
def test_a_failed_save_leaves_the_previous_folder_intact(old, new, tmp_path, monkeypatch, inject):
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with monkeypatch.context() as patch:
        inject(patch, new)
        with pytest.raises((OSError, KeyboardInterrupt)):
            new.save_pretrained(folder)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert_no_leftovers(folder)
    assert_folder_holds(folder, old)


def test_a_failed_first_save_leaves_no_folder(new, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    _fail_processor(monkeypatch, new)
    with pytest.raises(OSError, match="processor write failed"):
        new.save_pretrained(folder)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- stale files
def test_sharded_and_unsharded_saves_replace_each_other(old, new, tmp_path):
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    new.save_pretrained(folder, max_shard_size="100KB")
    assert not (folder / "model.safetensors").exists()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    assert_folder_holds(folder, new)

    old.save_pretrained(folder)
    assert not (folder / "model.safetensors.index.json").exists()
    assert list(folder.glob("model-*-of-*.safetensors")) == []
    assert_folder_holds(folder, old)
    assert_no_leftovers(folder)


def test_fewer_shards_leave_no_stale_shard(new, tmp_path):
    folder = tmp_path / "model"
    new.save_pretrained(folder, max_shard_size="100KB")
    many = {p.name for p in folder.glob("model-*.safetensors")}
    new.save_pretrained(folder, max_shard_size="300KB")
    few = {p.name for p in folder.glob("model-*.safetensors")}
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(few) < len(many) and few == set(index["weight_map"].values())


def test_a_merged_save_over_an_adapter_folder_loads_the_merged_model(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    folder = tmp_path / "model"
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    # Non-zero LoRA B matrices: the adapter changes the model from the start.
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(folder)
    assert (folder / "adapter_config.json").exists()

    merged = peft_model.merge_and_unload()
    merged.save_pretrained(folder)
    assert not (folder / "adapter_config.json").exists() and not (folder / "adapter_model.safetensors").exists()
    assert_folder_holds(folder, merged)


def test_an_earlier_saves_sentence_transformers_modules_do_not_survive(tiny_checkpoint, tmp_path):
    from cafe import CafeSettings

    folder = tmp_path / "model"
    CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).save_pretrained(folder)
    assert (folder / "2_Normalize").is_dir()
    unnormalised = CafeForConditionalGeneration.from_pretrained(
        tiny_checkpoint, cafe_settings=CafeSettings(normalize=False)
    )
    unnormalised.save_pretrained(folder)
    assert not (folder / "2_Normalize").exists()
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling"]


def test_files_that_are_not_part_of_a_model_save_are_kept(old, new, tmp_path):
    # What a Trainer output directory holds besides the model: checkpoints, logs, trainer state.
    folder = tmp_path / "run"
    old.save_pretrained(folder)
    os.chmod(folder, 0o750)
    (folder / "trainer_state.json").write_text('{"global_step": 2}')
    (folder / "optimizer.pt").write_bytes(b"optimizer")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out").write_text("scalars")
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "model.safetensors").write_bytes(b"weights of step 2")

    new.save_pretrained(folder)
    assert (folder / "trainer_state.json").read_text() == '{"global_step": 2}'
    assert (folder / "optimizer.pt").read_bytes() == b"optimizer"
    assert (folder / "runs" / "events.out").read_text() == "scalars"
    assert (folder / "checkpoint-2" / "model.safetensors").read_bytes() == b"weights of step 2"
    assert folder.stat().st_mode & 0o777 == 0o750
    assert_folder_holds(folder, new)
    assert_no_leftovers(folder)


def test_a_model_saved_back_into_the_folder_it_was_loaded_from_keeps_its_prompts(tiny_checkpoint, tmp_path):
    prompts = {"query": "Find the picture.", "document": ""}
    folder = tmp_path / "model"
    CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).save_pretrained(
        folder, sentence_transformers_prompts=prompts
    )
    model = _shifted(CafeForConditionalGeneration.from_pretrained(folder))
    model.save_pretrained(folder)
    assert json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"] == prompts
    assert_folder_holds(folder, model)


def test_saving_into_the_working_directory(new, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    monkeypatch.chdir(folder)
    new.save_pretrained(".")
    # The process stays in the folder (now the new one), not in the replaced copy.
    assert os.getcwd() == str(folder) and os.path.isfile("config.json")
    assert_folder_holds(folder, new)
    assert_no_leftovers(folder)


def test_a_non_main_process_writes_nothing(old, new, tmp_path):
    # Regression guard for distributed saves: only the writing rank touches the folder.
    folder = tmp_path / "model"
    old.save_pretrained(folder)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    new.save_pretrained(folder, is_main_process=False)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before
    assert_no_leftovers(folder)


def test_saving_into_a_file_path_is_an_error(new, tmp_path):
    path = tmp_path / "model"
    path.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file"):
        new.save_pretrained(path)
    assert path.read_text() == "not a folder"


# ----------------------------------------------------------------------------- cafe train's final/
def test_cafe_train_final_folder_holds_the_last_run_and_says_how_to_load_it(tiny_checkpoint, tmp_path, capsys):
    from _training import write_training_data
    from peft import PeftModel

    from cafe.cli import main

    path, images = write_training_data(tmp_path)
    output_dir, final = tmp_path / "out", tmp_path / "out" / "final"

    def train(merge: bool) -> str:
        capsys.readouterr()
        main(
            [
                "train",
                "--model_name_or_path",
                str(tiny_checkpoint),
                "--data_path",
                str(path),
                "--image_folder",
                str(images),
                "--output_dir",
                str(output_dir),
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "4",
                "--learning_rate",
                "1e-2",
                "--report_to",
                "none",
                "--use_cpu",
                "True",
                "--save_strategy",
                "no",
                "--use_lora",
                "True",
                "--merge_lora",
                str(merge),
                "--learnable_logit_scale",
                "True",
            ]
        )
        return capsys.readouterr().out

    base = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)

    printed = train(merge=False)
    assert (final / "adapter_config.json").exists()
    assert "LoRA adapter" in printed and str(tiny_checkpoint) in printed
    assert (
        f"CafeForConditionalGeneration.from_pretrained({str(final)!r})" in printed and "merge_adapter=False" in printed
    )
    # cafe's card over PEFT's placeholder, and the settings training changed (the learned temperature).
    card = (final / "README.md").read_text()
    assert "A LoRA adapter from a [CAFe]" in card and "More Information Needed" not in card
    assert "library_name: peft" in card and "merge_adapter=False" in card
    trained = json.loads((final / "cafe_settings.json").read_text())
    assert trained["learnable_logit_scale"] is True
    assert trained["contrastive_temperature"] != base.config.cafe["contrastive_temperature"]
    adapter_model = CafeForConditionalGeneration.from_pretrained(final)
    assert adapter_model.config.cafe == trained
    recipe = PeftModel.from_pretrained(CafeForConditionalGeneration.from_pretrained(tiny_checkpoint), final)
    assert (adapter_model.encode([TEXT]) - recipe.get_base_model().encode([TEXT])).abs().max() <= 1e-5

    # A merged run into the same output_dir: final/ is that run's merged model, no adapter on top.
    printed = train(merge=True)
    assert not (final / "adapter_config.json").exists() and not (final / "adapter_model.safetensors").exists()
    merged = CafeForConditionalGeneration.from_pretrained(final)
    assert not getattr(merged, "_hf_peft_config_loaded", False)
    assert _fingerprint(merged) != pytest.approx(_fingerprint(base), abs=1e-6)
    assert_folder_holds(final, merged)
    assert f"CafeForConditionalGeneration.from_pretrained({str(final)!r})" in printed

    # And back: an adapter run over a merged folder leaves no merged weights to load instead.
    printed = train(merge=False)
    assert not (final / "model.safetensors").exists() and not (final / "config.json").exists()
    # The printed recipe loads base + adapter.
    adapted = PeftModel.from_pretrained(CafeForConditionalGeneration.from_pretrained(tiny_checkpoint), final)
    assert (adapted.get_base_model().encode([TEXT]) - base.encode([TEXT])).abs().max() > 1e-4
    assert not list(output_dir.glob(".final.*"))
