"""examples/reproduce_tradeoff.py --quick: the Table 7 run end to end, its cache and its plot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "reproduce_tradeoff.py"


@pytest.fixture(scope="module")
def tradeoff():
    spec = importlib.util.spec_from_file_location("cafe_reproduce_tradeoff_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_run_caches_every_run_and_resumes(tradeoff, tmp_path):
    result = tradeoff.main(["--quick", "--output_dir", str(tmp_path), "--seeds", "0", "1"])
    names = [name for name, _, _ in tradeoff.RATIOS]
    assert list(result["summaries"]) == names and all(len(result["runs"][name]) == 2 for name in names)
    for summary in result["summaries"].values():
        for key, _ in tradeoff.COLUMNS:
            stats = summary[key]
            assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["seeds"] == [0, 1] and saved["config"]["num_test"] == 16
    assert "| 1:10 (paper) |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"

    # A rerun with the same settings trains nothing: every metric comes from the cache.
    cached = sorted((tmp_path / "runs").glob("*.json"))
    assert len(cached) == 1 + 2 * len(names)
    stamps = [path.stat().st_mtime_ns for path in cached]
    again = tradeoff.main(["--quick", "--output_dir", str(tmp_path), "--seeds", "0", "1"])
    assert [path.stat().st_mtime_ns for path in cached] == stamps
    assert again["summaries"] == result["summaries"]

    # Another fine-tuning budget reuses the base but reruns the fine-tunes.
    base_stamp = (tmp_path / "runs" / "base.json").stat().st_mtime_ns
    tradeoff.main(["--quick", "--output_dir", str(tmp_path), "--seeds", "0", "--finetune_steps", "1"])
    assert (tmp_path / "runs" / "base.json").stat().st_mtime_ns == base_stamp
    assert json.loads((tmp_path / "runs" / "1-10-paper-seed0.json").read_text())["settings"]["steps"] == 1


def test_caption_records_keep_the_description_turn_and_every_caption(tradeoff, tmp_path):
    from cafe.data import write_synthetic_dataset

    paths = write_synthetic_dataset(tmp_path, num_train=3, num_test=1, num_captions=3)
    records = json.loads(tradeoff.caption_records(paths["train"]).read_text())
    source = json.loads(paths["train"].read_text())
    assert len(records) == 3
    for record, original in zip(records, source, strict=True):
        assert [turn["from"] for turn in record["conversations"]] == ["human", "gpt"]
        assert record["conversations"][1]["value"] == original["caption"]
        assert record["positives"] == original["captions"] and len(record["positives"]) == 3
