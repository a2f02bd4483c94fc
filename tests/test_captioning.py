"""Caption attribute accuracy (`cafe.evaluation.captioning`) on hand-written captions."""

import pytest

from cafe.data import generate_records
from cafe.evaluation import caption_attribute_accuracy, evaluate_captions
from cafe.evaluation.captioning import attribute_hits

RED_CIRCLE = {"colour": "red", "shape": "circle", "size": "small", "position": "left", "count": 1}
BLUE_SQUARES = {"colour": "blue", "shape": "square", "size": "large", "position": "top", "count": 2}
CHOICES = {
    "colour": ["red", "blue", "green"],
    "shape": ["circle", "square", "triangle"],
    "size": ["small", "large"],
    "position": ["left", "top", "center"],
    "count": [1, 2, 3],
}


@pytest.mark.parametrize(
    ("caption", "attributes", "expected"),
    [
        # The canonical caption names everything; "a" names a count of one.
        ("a small red circle on the left", RED_CIRCLE, dict.fromkeys(RED_CIRCLE, True)),
        ("One small red circle on the left.", RED_CIRCLE, dict.fromkeys(RED_CIRCLE, True)),
        # Plural nouns and digits.
        ("2 large blue squares at the top", BLUE_SQUARES, dict.fromkeys(BLUE_SQUARES, True)),
        # Wrong colour and count; the article of "a picture of" does not name one against "two".
        (
            "a picture of two small green circles on the left",
            RED_CIRCLE,
            {"colour": False, "shape": True, "size": True, "position": True, "count": False},
        ),
        # Naming the right value and a wrong one is wrong; an absent attribute is wrong.
        (
            "a red or blue circle",
            RED_CIRCLE,
            {"colour": False, "shape": True, "size": False, "position": False, "count": True},
        ),
        # Degenerate output: only the repeated shape word.
        (
            "square square square square",
            BLUE_SQUARES,
            {"colour": False, "shape": True, "size": False, "position": False, "count": False},
        ),
        # Whole words only: "centered" is not "center", "reddish" not "red".
        (
            "three reddish triangles centered",
            {"colour": "red", "shape": "triangle", "position": "center", "count": 3},
            {"colour": False, "shape": True, "position": False, "count": True},
        ),
    ],
)
def test_attribute_hits(caption, attributes, expected):
    assert attribute_hits(caption, attributes, CHOICES) == expected


def test_multi_word_values_need_every_word():
    attributes = {"position": "top_left"}
    choices = {"position": ["top_left", "top_right"]}
    assert attribute_hits("a circle at the top left", attributes, choices) == {"position": True}
    assert attribute_hits("a circle at the top", attributes, choices) == {"position": False}
    assert attribute_hits("a circle at the top right", attributes, choices) == {"position": False}


def test_caption_attribute_accuracy_hand_computed():
    captions = ["a small red circle on the left.", "two large blue circles at the top"]
    references = ["a small red circle on the left", "two large blue squares at the top"]
    metrics = caption_attribute_accuracy(captions, [RED_CIRCLE, BLUE_SQUARES], references, choices=CHOICES)
    assert metrics == pytest.approx(
        {
            "attribute_accuracy": 9 / 10,
            "colour_accuracy": 1.0,
            "shape_accuracy": 0.5,
            "size_accuracy": 1.0,
            "position_accuracy": 1.0,
            "count_accuracy": 1.0,
            # Case, a final period and spacing do not matter; a wrong word does.
            "exact_match": 0.5,
            "num_captions": 2,
        }
    )


def test_choices_default_to_the_values_seen():
    # "green" is no colour of the evaluated images, so naming it beside "red" is no conflict;
    # "red" is (the first image's), so naming it beside "blue" is.
    attributes = [{"colour": "red"}, {"colour": "blue"}]
    assert caption_attribute_accuracy(["red and green", "blue"], attributes)["colour_accuracy"] == 1.0
    assert caption_attribute_accuracy(["red and green", "red and blue"], attributes)["colour_accuracy"] == 0.5
    # Explicit choices replace the values seen.
    metrics = caption_attribute_accuracy(["red and green", "blue"], attributes, choices={"colour": ["green"]})
    assert metrics["colour_accuracy"] == 0.5


def test_synthetic_references_score_perfectly():
    # Every paraphrase of the built-in data names all five attributes (synonyms aside: template 3
    # says "little"/"big", which is no size word of the data, so only the other templates count).
    records = generate_records(60, num_captions=1)
    metrics = caption_attribute_accuracy(
        [r["caption"] for r in records], [r["attributes"] for r in records], [r["caption"] for r in records]
    )
    assert metrics["attribute_accuracy"] == metrics["exact_match"] == 1.0


@pytest.mark.parametrize(
    ("captions", "attributes", "error"),
    [
        ([], [], ValueError),
        (["a"], [], ValueError),
        ("a red circle", [RED_CIRCLE], TypeError),
        (["a red circle"], [{"colour": 1.5}], TypeError),
        (["a red circle"], [{"colour": "..."}], ValueError),
    ],
)
def test_caption_attribute_accuracy_bad_input(captions, attributes, error):
    with pytest.raises(error):
        caption_attribute_accuracy(captions, attributes)


def test_evaluate_captions_on_tiny_checkpoint(cafe_model):
    records = generate_records(3)
    result = evaluate_captions(
        cafe_model,
        [r["image"] for r in records],
        [r["attributes"] for r in records],
        [r["caption"] for r in records],
        max_new_tokens=6,
        show_progress_bar=False,
    )
    assert len(result["captions"]) == 3 and all(isinstance(c, str) for c in result["captions"])
    # The scores are those of the captions it returns.
    by_hand = caption_attribute_accuracy(result["captions"], [r["attributes"] for r in records])
    assert {k: result[k] for k in by_hand} == pytest.approx(by_hand)
