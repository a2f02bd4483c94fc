"""The Hub upload never publishes pickles (``training_args.bin``, ``*.pt``, ``*.pkl``, ...).

Loading a pickle runs code, so a model repository should hold none; a CAFe checkpoint needs
none (weights are safetensors, settings JSON). ``HfApi.upload_folder`` is mocked: the mock applies
the ``allow_patterns`` / ``ignore_patterns`` it is given with huggingface_hub's own filter, so it
sees exactly the files that would go up.
"""

import pickle
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.utils import filter_repo_objects

from cafe.hub import push_folder_to_hub


@pytest.fixture()
def uploaded(monkeypatch):
    """Replace the Hub endpoints; ``uploaded["files"]`` lists what upload_folder would send."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        calls["files"] = list(
            filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


@pytest.fixture()
def trained_folder(cafe_model, tmp_path):
    """A saved checkpoint with what Trainer and users leave next to it."""
    folder = tmp_path / "final"
    cafe_model.save_pretrained(folder)
    torch.save({"learning_rate": 1e-5}, folder / "training_args.bin")  # Trainer._save
    torch.save({"state": {}}, folder / "optimizer.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    (folder / "notes.pkl").write_bytes(pickle.dumps({"note": 1}))
    (folder / "EXTRA.PT").write_bytes(pickle.dumps(1))
    (folder / "sub").mkdir()
    torch.save({}, folder / "sub" / "scheduler.pt")
    (folder / "vectors.bin").write_bytes(b"\x01\x02 raw float32 data, not a pickle")
    # A pickled copy of the weights next to the safetensors ones is merely left out.
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    return folder


def test_pickles_are_never_uploaded(trained_folder, uploaded, caplog):
    push_folder_to_hub(trained_folder, "someone/cafe")
    files = set(uploaded["files"])
    assert {"model.safetensors", "config.json", "README.md", "modules.json", "vectors.bin"} <= files
    left_out = {
        "training_args.bin",
        "pytorch_model.bin",
        "optimizer.pt",
        "rng_state.pth",
        "notes.pkl",
        "EXTRA.PT",
        "sub/scheduler.pt",
    }
    assert not files & left_out
    assert "training_args.bin" in caplog.text and "pickle" in caplog.text


def test_weights_stored_only_as_pickles_are_refused(tmp_path, uploaded):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*save_pretrained, which writes safetensors"):
        push_folder_to_hub(folder, "someone/old")
    assert "files" not in uploaded
