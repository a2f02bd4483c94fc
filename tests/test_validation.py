"""`validate_records` / `cafe validate`: every bad record of a data set found at once, before training."""

import json
import logging

import pytest
from datasets import Dataset
from PIL import Image

from cafe import CafeCollator
from cafe.data.validation import DataValidationError, validate_records
from cafe.training import load_records

COLOURS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def llava(image, answer="a picture"):
    return {
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": answer}],
    }


@pytest.fixture()
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (16, 16), rgb).save(images / f"{name}.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    return images


def write(tmp_path, records, name="train.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return load_records(str(path))


def good_records(n):
    names = list(COLOURS)
    return [dict(llava(f"{names[i % 4]}.png", f"picture {i}"), id=f"r{i}") for i in range(n)]


def test_good_data_comes_back_unchanged(tmp_path, folder):
    dataset = write(tmp_path, good_records(12))
    assert validate_records(dataset, image_folder=folder) is dataset


def test_every_bad_record_is_reported_at_once(tmp_path, folder):
    records = good_records(40)
    records[3]["image"] = "missing.png"
    records[7]["image"] = "broken.png"
    records[11]["conversations"][1]["value"] = "   "
    records[15] = {"id": "r15", "query": "q", "positive": "p", "negatives": "neg"}
    records[19] = {"id": "r19", "imgae": "red.png", "text": "red"}
    records[23] = {"id": "r23", "query": "q", "positives": ["fine", {"image": "missing-too.png"}]}
    dataset = write(tmp_path, records)
    with pytest.raises(DataValidationError) as info:
        validate_records(dataset, image_folder=folder)
    problems = info.value.problems
    assert [(p.index, p.record_id) for p in problems] == [
        (3, "r3"),
        (7, "r7"),
        (11, "r11"),
        (15, "r15"),
        (19, "r19"),
        (23, "r23"),
    ]
    assert [p.image_problem for p in problems] == [True, True, False, False, False, True]
    message = str(info.value)
    assert message.startswith("6 of 40 records cannot be used.")
    assert "missing.png" in message and "Corrupt" in message and "'negatives' must be a list" in message
    assert "did you mean 'image'" in message and "positive 1" in message and "missing_images='skip'" in message


def test_the_error_lists_the_first_twenty_and_counts_the_rest(tmp_path, folder):
    records = good_records(30)
    for record in records[:25]:
        record["image"] = "missing.png"
    with pytest.raises(DataValidationError) as info:
        validate_records(write(tmp_path, records), image_folder=folder)
    message = str(info.value)
    assert message.startswith("25 of 30 records cannot be used.")
    assert message.count("\n  #") == 20 and message.endswith("... and 5 more")
    assert len(info.value.problems) == 25


def test_skip_drops_records_with_image_problems_up_front(tmp_path, folder, caplog, cafe_model):
    records = good_records(10)
    records[2]["image"] = "missing.png"
    records[5]["image"] = "broken.png"
    dataset = write(tmp_path, records)
    with caplog.at_level(logging.WARNING, logger="cafe.data.validation"):
        kept = validate_records(dataset, image_folder=folder, missing_images="skip")
    assert kept["id"] == [f"r{i}" for i in range(10) if i not in (2, 5)]
    assert "Dropping 2 of 10 records" in caplog.text
    # The collator, with the same settings, now builds every batch in full.
    collator = CafeCollator(cafe_model.processor, model=cafe_model, image_folder=str(folder), missing_images="skip")
    batch = collator(list(kept.select(range(4))))
    assert batch.counts["skipped_records"] == 0 and len(batch.query) == 4


def test_skip_still_raises_for_problems_that_are_not_images(tmp_path, folder):
    records = good_records(6)
    records[1]["image"] = "missing.png"
    records[4]["conversations"] = "not a list"
    with pytest.raises(DataValidationError, match=r"^1 of 6 records cannot be used.*not image problems") as info:
        validate_records(write(tmp_path, records), image_folder=folder, missing_images="skip")
    assert [p.index for p in info.value.problems] == [4]
    assert "(1 records with image problems would be dropped.)" in str(info.value)


def test_decompression_bombs_and_the_pixel_limit(tmp_path, folder, monkeypatch):
    Image.new("RGB", (64, 64)).save(folder / "huge.png")
    records = good_records(4) + [dict(llava("huge.png"), id="huge")]
    dataset = write(tmp_path, records)
    with pytest.raises(DataValidationError, match=r"#4 \(id 'huge'\).*64x64 = 4096 pixels, over max_image_pixels=1000"):
        validate_records(dataset, image_folder=folder, max_image_pixels=1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    kept = validate_records(dataset, image_folder=folder, missing_images="skip", load_from_cache_file=False)
    assert len(kept) == 4


def test_parallel_check_finds_the_same_problems(tmp_path, folder):
    records = good_records(24)
    for i in (1, 9, 17, 22):
        records[i]["image"] = "missing.png"
    dataset = write(tmp_path, records)
    with pytest.raises(DataValidationError) as serial:
        validate_records(dataset, image_folder=folder, load_from_cache_file=False)
    with pytest.raises(DataValidationError) as parallel:
        validate_records(dataset, image_folder=folder, num_proc=2, load_from_cache_file=False)
    assert parallel.value.problems == serial.value.problems
    assert [p.index for p in parallel.value.problems] == [1, 9, 17, 22]


def test_results_are_cached_until_the_image_folder_changes(tmp_path, folder):
    dataset = write(tmp_path, good_records(8))

    def cache_files():
        from pathlib import Path

        return sorted(Path(dataset.cache_files[0]["filename"]).parent.glob("cache-*.arrow"))

    validate_records(dataset, image_folder=folder)
    first = cache_files()
    assert first
    validate_records(dataset, image_folder=folder)
    assert cache_files() == first  # same data, same arguments: the cached result
    (folder / "red.png").unlink()  # the folder changed: checked again, and the loss is found
    with pytest.raises(DataValidationError, match="red.png"):
        validate_records(dataset, image_folder=folder)


def test_metadata_columns_are_not_loaded_but_named(tmp_path, folder):
    records = good_records(3)
    records[1] = {"id": "r1", "picture": "red.png", "caption": "red"}
    with pytest.raises(
        DataValidationError,
        match=r"#1 .*fits no supported layout; it has keys \['caption', 'id', 'picture', 'record_index'\]",
    ):
        validate_records(write(tmp_path, records), image_folder=folder)


def test_in_memory_data_and_bad_arguments():
    dataset = Dataset.from_list([{"query": "q", "positive": "p"}, {"query": "q2", "positive": "p2"}])
    assert validate_records(dataset) is dataset
    with pytest.raises(TypeError, match="Dataset.from_list"):
        validate_records([{"query": "q", "positive": "p"}])
    with pytest.raises(ValueError, match="missing_images must be 'raise' or 'skip'"):
        validate_records(dataset, missing_images="ignore")


def test_cafe_validate_cli(tmp_path, folder, capsys):
    from cafe.cli import main

    good = tmp_path / "good.json"
    good.write_text(json.dumps(good_records(5)))
    assert main(["validate", str(good), "--image_folder", str(folder)]) == 0
    assert "5 of 5 records are usable" in capsys.readouterr().out

    records = good_records(5)
    records[3]["image"] = "missing.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    assert main(["validate", str(bad), "--image_folder", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "1 of 5 records cannot be used" in out and "#3 (id 'r3')" in out
    assert main(["validate", str(bad), "--image_folder", str(folder), "--missing_images", "skip"]) == 0
    assert "4 of 5 records are usable; 1 with image problems would be skipped" in capsys.readouterr().out
