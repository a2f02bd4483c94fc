"""`cafe convert` gives every image its own file, whatever the ids (duplicates, ids that look
like the de-duplicated name of another, ids equal up to case or to unsafe characters)."""

import json

import pytest
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from cafe.data.convert import convert_llava_onevision_data


def _convert(tmp_path, ids):
    conversation = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a picture"}]
    # Record i's image is filled with grey level 10 * i: which file holds which record is visible.
    rows = {
        "id": ids,
        "image": [PILImage.new("RGB", (8, 8), (10 * i,) * 3) for i in range(len(ids))],
        "conversations": [conversation] * len(ids),
    }
    features = Features(
        {
            "id": Value("string"),
            "image": Image(),
            "conversations": [{"from": Value("string"), "value": Value("string")}],
        }
    )
    report = convert_llava_onevision_data(Dataset.from_dict(rows, features=features), tmp_path, "subset")
    return report, json.loads(report.json_path.read_text())


@pytest.mark.parametrize(
    "ids",
    [
        ["a", "a", "a-1"],  # the second "a" used to be written as a-1.png, then overwritten
        ["a-1", "a", "a"],  # ... or to overwrite it
        ["x/y", "x_y", "x_y-1", "x?y"],  # equal once made safe for file names
        ["Photo", "photo"],  # one file on case-insensitive filesystems (macOS, Windows)
    ],
)
def test_every_record_keeps_its_own_image(tmp_path, ids):
    report, records = _convert(tmp_path, ids)
    paths = [record["image"] for record in records]
    assert len({path.casefold() for path in paths}) == len(ids)
    for i, path in enumerate(paths):
        assert PILImage.open(tmp_path / path).getpixel((0, 0)) == (10 * i,) * 3
    assert report.images_written == len(ids) == len(list((tmp_path / "subset").iterdir()))
