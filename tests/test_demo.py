"""`cafe demo --quick`: the README's main job, end to end."""

import json

import pytest


@pytest.mark.slow
def test_cafe_demo_quick_runs_end_to_end(tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    from cafe.cli import main

    assert main(["demo", "--quick", "--output_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for column in ("before", "after"):
        assert {"text_to_image_recall@1", "image_to_text_recall@10", "pope_f1", "modality_gap"} <= set(report[column])
        assert all(0.0 <= value <= 2.0 for value in report[column].values())
    assert any("loss_con" in row for row in report["train_log"])
    assert (tmp_path / "modality_gap_before.png").stat().st_size > 0
    assert (tmp_path / "modality_gap_after.png").stat().st_size > 0
    # The checkpoint is a stock transformers checkpoint.
    LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "checkpoint")


@pytest.mark.slow
def test_cafe_demo_video_row(tmp_path):
    """`cafe demo --quick --video`: the clips join the training data and the table gets video rows."""
    from cafe.cli import main

    assert main(["demo", "--quick", "--video", "--output_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    video_rows = {"text_to_video_recall@1", "video_to_text_recall@10", "video_motion_accuracy"}
    for column in ("before", "after"):
        assert video_rows <= set(report[column]) and "text_to_image_recall@1" in report[column]
        assert all(0.0 <= report[column][name] <= 1.0 for name in video_rows)
    train = json.loads((tmp_path / "data" / "train-cafe.json").read_text())
    assert sum(bool(record.get("video")) for record in train) == 16
