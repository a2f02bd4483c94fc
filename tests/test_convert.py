"""LLaVA-OneVision-Data -> JSON + image folder."""

import json

from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from cafe import CafeCollator
from cafe.data.convert import convert_llava_onevision_data
from cafe.training import load_records


def test_conversion_keeps_every_record_and_image(tmp_path, cafe_model):
    def conv(answer):
        return [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": answer}]

    rows = {
        "id": ["coco/0001.jpg", "coco/0001.jpg", "plain", "textonly"],
        "image": [
            PILImage.new("RGB", (20, 20), (255, 0, 0)),
            PILImage.new("RGBA", (20, 20), (0, 0, 255, 128)),
            PILImage.new("P", (20, 20)),
            None,
        ],
        "conversations": [
            conv("red"),
            conv("blue"),
            conv("black"),
            [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
        ],
        "data_source": ["sharegpt4v"] * 4,
    }
    features = Features(
        {
            "id": Value("string"),
            "image": Image(),
            "conversations": [{"from": Value("string"), "value": Value("string")}],
            "data_source": Value("string"),
        }
    )
    report = convert_llava_onevision_data(Dataset.from_dict(rows, features=features), tmp_path, "sharegpt4v(coco)")
    assert (report.records, report.images_written, report.without_image) == (4, 3, 1)
    assert report.duplicate_ids == 1 and report.renamed_ids == 2
    records = json.loads(report.json_path.read_text())
    assert [r["id"] for r in records] == rows["id"]  # original ids kept
    paths = [r.get("image") for r in records]
    assert (
        paths[:3]
        == ["sharegpt4v_coco/coco_0001.jpg.png", "sharegpt4v_coco/coco_0001.jpg-1.png", "sharegpt4v_coco/plain.png"]
        and paths[3] is None
    )
    assert PILImage.open(tmp_path / paths[1]).getpixel((0, 0))[:3] == (0, 0, 255)

    # The converted folder trains as is.
    dataset = load_records(str(report.json_path))
    batch = CafeCollator(cafe_model.processor, model=cafe_model, image_folder=str(tmp_path))(list(dataset)[:3])
    assert batch.vision["pixel_values"].shape[0] == 3
