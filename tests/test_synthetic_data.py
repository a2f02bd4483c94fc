"""The synthetic shapes data set: determinism, ground truth that matches the pixels, layouts."""

import io
import json
import time

import pytest

from cafe.data import (
    CAPTION_TEMPLATES,
    Scene,
    SyntheticShapesConfig,
    generate_records,
    make_pope_dataset,
    make_synthetic_dataset,
    shape_interior_point,
    write_llava_json,
    write_synthetic_dataset,
)
from cafe.data.synthetic import DEFAULT_COLOURS


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def records():
    return generate_records(120, seed=7, num_captions=4)


# ------------------------------------------------------------------ determinism
def test_same_seed_gives_byte_identical_images_and_identical_text():
    first = generate_records(25, seed=3, num_captions=3)
    second = generate_records(25, seed=3, num_captions=3)
    for a, b in zip(first, second, strict=True):
        assert png_bytes(a["image"]) == png_bytes(b["image"])
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}


def test_sample_does_not_depend_on_how_many_are_generated():
    few, many = generate_records(4, seed=3), generate_records(30, seed=3)
    for a, b in zip(few, many[: len(few)], strict=True):  # the first 4 of 30 are the 4
        assert a["caption"] == b["caption"] and a["image"].tobytes() == b["image"].tobytes()


def test_seed_and_split_change_the_samples():
    base = [r["caption"] for r in generate_records(30, seed=0)]
    assert base != [r["caption"] for r in generate_records(30, seed=1)]
    assert base != [r["caption"] for r in generate_records(30, seed=0, split="test")]


def test_generation_is_fast():
    start = time.perf_counter()
    generate_records(300)
    # Typically ~0.05 s; the bound only catches an accidental slow path.
    assert time.perf_counter() - start < 3.0


# ------------------------------------------------------------------ text grammar
@pytest.mark.parametrize(
    ("scene", "caption"),
    [
        (Scene("circle", "red", "large", "left", 2), "two large red circles on the left"),
        (Scene("square", "blue", "small", "top", 1), "a small blue square at the top"),
        (Scene("triangle", "green", "large", "center", 3), "three large green triangles in the center"),
        (Scene("circle", "orange", "small", "bottom", 1), "a small orange circle at the bottom"),
    ],
)
def test_canonical_caption(scene, caption):
    assert scene.caption(0) == caption


def test_paraphrases_state_every_attribute_and_fix_articles():
    scene = Scene("circle", "orange", "large", "right", 1)
    captions = [scene.caption(t) for t in range(len(CAPTION_TEMPLATES))]
    assert len(set(captions)) == len(captions)
    assert "an orange circle of large size on the right" in captions
    assert "1 big orange circle in the right part of the image" in captions
    for caption in captions:
        assert "orange circle" in caption and "right" in caption
        assert "a orange" not in caption


def test_several_captions_per_image(records):
    for record in records:
        assert len(record["captions"]) == 4 == len(set(record["captions"]))
        assert record["captions"][0] == record["caption"] == Scene(**record["attributes"]).caption(0)


# ------------------------------------------------------------------ text agrees with the pixels
def test_drawn_pixels_agree_with_attributes(records):
    config = SyntheticShapesConfig()
    n = config.image_size
    for record in records:
        image, attrs, boxes = record["image"], record["attributes"], record["boxes"]
        assert image.size == (n, n) and image.mode == "RGB"
        assert len(boxes) == attrs["count"]
        colour = DEFAULT_COLOURS[attrs["colour"]]
        for box in boxes:
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 < n and 0 <= y0 < y1 < n
            assert x1 - x0 + 1 == round(config.sizes[attrs["size"]] * n)
            assert image.getpixel(shape_interior_point(attrs["shape"], box)) == colour
            # Corners tell the shapes apart: a square fills all four, a circle none, an apex-up
            # triangle only the bottom two.
            corners = [image.getpixel(p) == colour for p in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
            expected = {"square": [True] * 4, "circle": [False] * 4, "triangle": [False, False, True, True]}
            assert corners == expected[attrs["shape"]], (record["caption"], corners)
        xs = [(b[0] + b[2]) / 2 for b in boxes]
        ys = [(b[1] + b[3]) / 2 for b in boxes]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        where = {
            "left": mean_x < n / 3,
            "right": mean_x > 2 * n / 3,
            "top": mean_y < n / 3,
            "bottom": mean_y > 2 * n / 3,
            "center": n / 3 <= mean_x <= 2 * n / 3 and n / 3 <= mean_y <= 2 * n / 3,
        }
        assert where[attrs["position"]], (record["caption"], mean_x, mean_y)
        # Nothing but the background and the one shape colour is drawn.
        assert {rgb for _, rgb in image.getcolors()} == {config.background, colour}


def test_all_attribute_values_occur(records):
    seen = {key: {r["attributes"][key] for r in records} for key in ("shape", "colour", "size", "position", "count")}
    assert seen == {
        "shape": {"circle", "square", "triangle"},
        "colour": set(DEFAULT_COLOURS),
        "size": {"small", "large"},
        "position": {"left", "right", "top", "bottom", "center"},
        "count": {1, 2, 3},
    }


def test_conversations_answer_from_the_attributes(records):
    words = {1: "one", 2: "two", 3: "three"}
    where = {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
        "center": "in the center",
    }
    for record in records:
        turns, attrs = record["conversations"], record["attributes"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 6
        assert turns[0]["value"] == "<image>\nDescribe the picture." and turns[1]["value"] == record["caption"]
        answers = {
            turns[i]["value"].split()[0] + " " + turns[i]["value"].split()[1]: turns[i + 1]["value"]
            for i in range(2, 12, 2)
        }
        assert answers["What colour"] == attrs["colour"]
        assert answers["What shape"] == attrs["shape"]
        assert answers["How many"] == words[attrs["count"]]
        assert answers["Where is" if attrs["count"] == 1 else "Where are"] == where[attrs["position"]]
        assert answers["Is the" if attrs["count"] == 1 else "Are the"] == attrs["size"]


def test_qa_turns_can_be_switched_off():
    (record,) = generate_records(1, qa_turns=False)
    assert len(record["conversations"]) == 2


def test_pope_questions_are_balanced_and_true(records):
    config = SyntheticShapesConfig()
    frequent = [f"{c} {s}" for c, s in config.objects]
    for record in records:
        attrs = record["attributes"]
        present = f"{attrs['colour']} {attrs['shape']}"
        pope = record["pope"]
        assert [q["category"] for q in pope] == ["random"] * 2 + ["popular"] * 2 + ["adversarial"] * 2
        assert [q["answer"] for q in pope] == ["yes", "no"] * 3
        for q in pope:
            assert (q["object"] == present) == (q["answer"] == "yes")
            assert q["object"] in q["question"]
        popular = pope[3]["object"]
        assert popular in [o for o in frequent if o != present][:3]
        colour, shape = pope[5]["object"].split()
        assert colour == attrs["colour"] or shape == attrs["shape"]


# ------------------------------------------------------------------ datasets and files
def test_dataset_has_splits_and_image_feature():
    import datasets

    data = make_synthetic_dataset(num_train=12, num_test=5, seed=1, num_captions=2)
    assert set(data) == {"train", "test"}
    assert (len(data["train"]), len(data["test"])) == (12, 5)
    assert isinstance(data["train"].features["image"], datasets.Image)
    row = data["train"][3]
    expected = generate_records(12, seed=1, num_captions=2)[3]
    assert row["image"].convert("RGB").tobytes() == expected["image"].tobytes()
    assert row["captions"] == expected["captions"] and row["attributes"] == expected["attributes"]
    assert row["id"] == "train-000003" and data["test"][0]["id"] == "test-000000"


def test_pope_dataset_layout():
    recs = generate_records(3)
    pope = make_pope_dataset(recs)
    assert len(pope) == 18
    assert {"question", "answer", "category", "image"} <= set(pope.column_names)
    assert pope["answer"].count("yes") == 9
    assert pope[7]["image_source"] == recs[1]["id"]


def test_llava_json_round_trips_through_load_dataset(tmp_path):
    import datasets
    from PIL import Image

    recs = generate_records(6, seed=2, num_captions=2)
    path = write_llava_json(recs, tmp_path, split="train")
    raw = json.loads(path.read_text())
    assert list(raw[0])[:3] == ["id", "image", "conversations"]
    loaded = datasets.load_dataset("json", data_files=str(path), split="train")
    assert len(loaded) == 6
    for row, record in zip(loaded, recs, strict=True):
        assert row["id"] == record["id"]
        assert row["image"] == f"images/train/{record['id']}.png"
        assert row["conversations"] == record["conversations"]
        assert row["captions"] == record["captions"]
        assert row["attributes"] == record["attributes"]
        assert row["pope"] == record["pope"]
        with Image.open(tmp_path / row["image"]) as image:
            assert image.convert("RGB").tobytes() == record["image"].tobytes()


def test_write_synthetic_dataset_writes_both_splits(tmp_path):
    paths = write_synthetic_dataset(tmp_path, num_train=4, num_test=2)
    assert set(paths) == {"train", "test"}
    assert len(json.loads(paths["test"].read_text())) == 2
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 4


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_captions": 0},
        {"num_captions": len(CAPTION_TEMPLATES) + 1},
        {"max_count": 4},
        {"shapes": ("hexagon",)},
        {"positions": ()},
        {"background": DEFAULT_COLOURS["red"]},
        {"image_size": 16},
    ],
)
def test_bad_config_is_rejected(overrides):
    with pytest.raises(ValueError):
        generate_records(1, **overrides)
