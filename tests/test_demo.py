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
        expected = {"text_to_image_recall@1", "image_to_text_recall@10", "caption_attribute_accuracy", "pope_f1"}
        assert expected | {"pope_answered", "modality_gap"} <= set(report[column])
        assert all(0.0 <= value <= 2.0 for value in report[column].values())
    assert any("loss_con" in row for row in report["train_log"])
    # The random tiny model is first made a base VLM with LM-only steps (no contrastive term).
    assert report["config"]["base_steps"] == 4
    assert any("loss_lm" in row for row in report["base_train_log"])
    assert not any("loss_con" in row for row in report["base_train_log"])
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


METRICS = {"text_to_image_recall@1": 0.1, "caption_attribute_accuracy": 0.5, "modality_gap": 1.0}


def test_table_leaves_out_pope_of_a_model_that_does_not_answer_yes_or_no():
    from cafe.demo import before_after_table

    before = {**METRICS, "pope_f1": 0.0, "pope_answered": 0.1}
    after = {**METRICS, "caption_attribute_accuracy": 0.75, "pope_f1": 0.8, "pope_answered": 0.9}
    lines = before_after_table(before, after).splitlines()
    assert lines[0].split() == ["metric", "before", "after"]
    assert lines[3].split() == ["caption_attribute_accuracy", "0.500", "0.750"]
    # The "before" model answers yes/no to 10 % of the questions: its POPE cell is hidden, with the reason.
    assert lines[5].split() == ["pope_f1", "-", "0.800"]
    assert lines[6].split() == ["pope_answered", "0.100", "0.900"]
    assert lines[-1].startswith("POPE '-' cells: the model answered only 10% (before) of the yes/no questions")

    # Neither model answers yes/no: no POPE figures, only the share answered and one line saying why.
    after["pope_answered"] = 0.2
    table = before_after_table(before, after)
    assert "pope_f1" not in table and "pope_answered" in table
    assert table.splitlines()[-1].startswith(
        "POPE rows left out: the model answered only 10% (before) / 20% (after) of the yes/no questions"
    )

    # Both answer: every figure shown, no note.
    table = before_after_table({**before, "pope_answered": 1.0}, {**after, "pope_answered": 0.5})
    rows = [line.split() for line in table.splitlines()[2:]]
    assert ["pope_f1", "0.000", "0.800"] in rows and len(rows) == 5 and "POPE" not in table


def test_training_records_keep_the_description_and_yes_no_questions_apart(tmp_path):
    """Each train image gives a description conversation and a yes/no one (one yes, one no); the
    QA turns that could be copied from the caption are left out; both contrast image <-> caption."""
    from cafe.data import write_synthetic_dataset
    from cafe.demo import training_records
    from cafe.evaluation.pope import DEFAULT_POPE_PROMPT_SUFFIX
    from cafe.training import load_records

    paths = write_synthetic_dataset(tmp_path, num_train=4, num_test=1, seed=0)
    source = json.loads(paths["train"].read_text())
    out = training_records(paths["train"])
    records = json.loads(out.read_text())
    assert len(records) == 2 * len(source)
    for image, (describe, yes_no) in zip(source, zip(records[::2], records[1::2], strict=True), strict=True):
        assert describe["image"] == yes_no["image"] == image["image"]
        assert describe["positives"] == yes_no["positives"] == [image["caption"]]
        assert describe["conversations"] == image["conversations"][:2]
        assert [turn["from"] for turn in yes_no["conversations"]] == ["human", "gpt"] * 2
        assert yes_no["conversations"][0]["value"].startswith("<image>\n")
        assert "<image>" not in yes_no["conversations"][2]["value"]
        assert all(turn["value"].endswith(DEFAULT_POPE_PROMPT_SUFFIX) for turn in yes_no["conversations"][::2])
        assert sorted(turn["value"] for turn in yes_no["conversations"][1::2]) == ["No.", "Yes."]
        asked = {
            turn["value"].removesuffix(DEFAULT_POPE_PROMPT_SUFFIX).removeprefix("<image>\n")
            for turn in yes_no["conversations"][::2]
        }
        assert asked <= {question["question"] for question in image["pope"]}
    # Which answer comes first alternates between images.
    assert {r["conversations"][1]["value"] for r in records[1::2]} == {"Yes.", "No."}
    assert len(load_records(str(out))) == len(records)  # the trainer's loader accepts them
