"""Type checks at the door: a bare string (or image, or dict) where a list is expected, a
non-positive batch size, a record key no layout knows, each rejected with an error that says what
to pass instead, before any work is done.
"""

import json

import pytest
import torch
from PIL import Image

from cafe.records import ImageRecordError, RecordError, RecordParser


class NoModel:
    """Stands in for a model in evaluation runners: the checks must fire before any encoding."""

    processor = object()
    device = "cpu"

    def encode(self, *args, **kwargs):
        raise AssertionError("the inputs should have been rejected before encoding")

    generate = encode


# ----------------------------------------------------------------------------- encode / get_embeddings
def test_encode_rejects_a_bare_string_for_texts(cafe_model):
    with pytest.raises(TypeError, match=r"texts=\['hello'\]"):
        cafe_model.encode(texts="hello")


def test_encode_rejects_a_single_image_for_images(cafe_model, images):
    with pytest.raises(TypeError, match=r"images=\[image\]"):
        cafe_model.encode(images=images[0])
    with pytest.raises(TypeError, match=r"images=\['cat.png'\]"):
        cafe_model.encode(images="cat.png")


def test_encode_still_takes_one_string_or_image_as_inputs(cafe_model, images):
    # `inputs` documents a single item as one input (one row out), which is never ambiguous.
    assert cafe_model.encode("hello").shape[0] == 1
    assert cafe_model.encode(images[0]).shape[0] == 1


@pytest.mark.parametrize("batch_size", [0, -2])
def test_encode_rejects_a_non_positive_batch_size(cafe_model, batch_size):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer.*got {batch_size}"):
        cafe_model.encode(["a", "b"], batch_size=batch_size)


def test_encode_rejects_a_non_integer_batch_size(cafe_model):
    with pytest.raises(TypeError, match="batch_size must be a positive integer"):
        cafe_model.encode(["a", "b"], batch_size=2.5)


def test_get_embeddings_rejects_a_single_unbatched_sequence(cafe_model):
    batch = cafe_model.processor(text=["a red square"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\].*input_ids\[None\]"):
        cafe_model.get_embeddings(batch["input_ids"][0], batch["attention_mask"][0])


def test_get_embeddings_rejects_lists_and_mismatched_masks(cafe_model):
    batch = cafe_model.processor(text=["a red square"])
    with pytest.raises(TypeError, match="return_tensors='pt'"):
        cafe_model.get_embeddings(batch["input_ids"], batch["attention_mask"])
    ids = torch.tensor(batch["input_ids"])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        cafe_model.get_embeddings(ids, torch.ones(1, ids.shape[1] + 1, dtype=torch.long))


# ----------------------------------------------------------------------------- records
@pytest.fixture()
def image_folder(tmp_path):
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "blue.png")
    return tmp_path


@pytest.fixture()
def parser(image_folder):
    return RecordParser(str(image_folder))


def test_negatives_as_a_bare_string_is_rejected(parser):
    with pytest.raises(RecordError, match=r"record 3: 'negatives' must be a list.*\"negatives\": \[\"neg\"\]"):
        parser({"query": "q", "positive": "p", "negatives": "neg"}, 3)


def test_negatives_as_a_single_dict_is_rejected(parser):
    with pytest.raises(RecordError, match="'negatives' must be a list"):
        parser({"image": "red.png", "text": "red", "negatives": {"image": "blue.png", "text": "blue"}})


def test_a_misspelt_key_is_rejected_with_the_known_keys(parser):
    with pytest.raises(
        RecordError, match=r"record 0: unknown key 'negatvies' \(did you mean 'negatives'\?\).*known keys"
    ):
        parser({"image": "red.png", "text": "red", "negatvies": ["blue"]})
    with pytest.raises(RecordError, match=r"unknown key 'imgae' \(did you mean 'image'\?\)"):
        parser({"imgae": "red.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]})


def test_metadata_keys_that_resemble_no_layout_key_are_kept_out_of_the_way(parser):
    # LLaVA-OneVision-Data's `data_source`, cafe's synthetic ground truth: not layout keys.
    example = parser(
        {
            "id": "a",
            "image": "red.png",
            "text": "red",
            "data_source": "coco",
            "boxes": [[0, 0, 1, 1]],
            "captions": ["red", "a red picture"],
            "pope": [],
        }
    )
    assert example.positive.text == "red"


def test_a_record_that_is_not_a_dict_is_rejected(parser):
    with pytest.raises(RecordError, match=r"record 2 is a str, not a dict.*list of records"):
        parser("image", 2)


def test_none_valued_keys_count_as_absent(parser):
    example = parser({"query": "q", "positive": "p", "image": None, "conversations": None, "text": None})
    assert example.query.text == "q" and example.positive.text == "p"


def test_mixed_record_layouts_in_one_json_file(image_folder):
    from cafe.training import load_records

    records = [
        {
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}],
        },
        {"image": "blue.png", "text": "a blue picture"},
        {"query": "a query", "positive": "its answer", "negatives": ["not it"]},
        {"query_text": "find the red one", "target_image": "red.png"},
    ]
    path = image_folder / "mixed.json"
    path.write_text(json.dumps(records))
    dataset = load_records(str(path))
    assert dataset[0]["query"] is None  # datasets fills the other layouts' columns with None
    parser = RecordParser(str(image_folder))
    examples = [parser(row, i) for i, row in enumerate(dataset)]
    assert [e.positive.text for e in examples[:3]] == ["red", "a blue picture", "its answer"]
    assert examples[3].positive.image is not None


def test_mixed_layouts_make_one_batch(image_folder, cafe_model):
    from cafe import CafeCollator
    from cafe.training import load_records

    records = [
        {
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}],
        },
        {"image": "blue.png", "text": "a blue picture"},
        {"query": "a query", "positive": "its answer"},
    ]
    path = image_folder / "mixed.json"
    path.write_text(json.dumps(records))
    collator = CafeCollator(cafe_model.processor, model=cafe_model, image_folder=str(image_folder))
    batch = collator(list(load_records(str(path))))
    assert len(batch.query) == 3 and len(batch.lm) == 2  # two LM sequences


def test_a_collator_given_one_record_instead_of_a_list(image_folder, cafe_model):
    from cafe import CafeCollator

    collator = CafeCollator(cafe_model.processor, model=cafe_model, image_folder=str(image_folder))
    with pytest.raises(RecordError, match=r"not a dict of fields; a collator takes a list of records"):
        collator({"image": "red.png", "text": "red"})


# ----------------------------------------------------------------------------- decompression bombs
@pytest.fixture()
def bomb(tmp_path, monkeypatch):
    """A 64x64 PNG with PIL's limit lowered below its size: what a >178-megapixel file does."""
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # error above 2 x 1000 pixels
    return tmp_path


def test_a_decompression_bomb_names_the_record_and_the_limit(bomb):
    parser = RecordParser(str(bomb))
    with pytest.raises(
        ImageRecordError, match=r"record 5 \(pair image\).*bomb\.png.*2 x PIL\.Image\.MAX_IMAGE_PIXELS = 2000"
    ):
        parser({"image": "bomb.png", "text": "x"}, 5)


def test_a_decompression_bomb_in_image_bytes_names_the_record(bomb):
    parser = RecordParser()
    data = (bomb / "bomb.png").read_bytes()
    with pytest.raises(ImageRecordError, match=r"record 1.*MAX_IMAGE_PIXELS"):
        parser({"image": {"bytes": data, "path": None}, "text": "x"}, 1)


def test_missing_images_skip_skips_a_decompression_bomb(bomb, cafe_model):
    from cafe import CafeCollator

    Image.new("RGB", (16, 16), (255, 0, 0)).save(bomb / "red.png")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(bomb / "blue.png")
    collator = CafeCollator(cafe_model.processor, model=cafe_model, image_folder=str(bomb), missing_images="skip")
    batch = collator(
        [{"image": "bomb.png", "text": "x"}, {"image": "red.png", "text": "red"}, {"image": "blue.png", "text": "blue"}]
    )
    assert batch.counts["skipped_records"] == 1 and len(batch.query) == 2


def test_a_lower_pixel_limit_is_checked_before_decoding(image_folder):
    parser = RecordParser(str(image_folder), max_image_pixels=100)
    with pytest.raises(ImageRecordError, match=r"16x16 = 256 pixels.*max_image_pixels=100"):
        parser({"image": "red.png", "text": "x"})


def test_missing_and_corrupt_images_are_image_record_errors(parser, image_folder):
    (image_folder / "bad.png").write_bytes(b"\x89PNG broken")
    for image in ("nowhere.png", "bad.png"):
        with pytest.raises(ImageRecordError):
            parser({"image": image, "text": "x"})
    with pytest.raises(RecordError) as info:  # a wrong type is the record's fault, not the image's
        parser({"image": 5, "text": "x"})
    assert not isinstance(info.value, ImageRecordError)


# ----------------------------------------------------------------------------- evaluation
def test_retrieval_rejects_bare_strings_and_single_images(images):
    from cafe.evaluation import caption_image_index, evaluate_retrieval

    with pytest.raises(TypeError, match=r"captions_per_image must be a list.*=\['a red picture'\]"):
        caption_image_index("a red picture")
    with pytest.raises(TypeError, match=r"images=\[image\]"):
        evaluate_retrieval(NoModel(), images[0], [["red"]])
    with pytest.raises(TypeError, match=r"captions_per_image must be a list"):
        evaluate_retrieval(NoModel(), [images[0]], "red")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        evaluate_retrieval(NoModel(), [images[0]], [["red"]], batch_size=0)


def test_pope_rejects_bare_strings(images):
    from cafe.evaluation import evaluate_pope, generate_answers, pope_metrics, pope_metrics_by_category

    with pytest.raises(TypeError, match=r"predictions must be a list.*\['yes'\]"):
        pope_metrics("yes", ["yes", "no", "no"])
    with pytest.raises(TypeError, match=r"labels must be a list"):
        pope_metrics(["yes", "no", "no"], "yes")
    with pytest.raises(TypeError, match=r"categories must be a list"):
        pope_metrics_by_category(["yes"], ["yes"], "random")
    with pytest.raises(TypeError, match=r"questions must be a list"):
        generate_answers(NoModel(), [images[0]], "Is there a cat?")
    with pytest.raises(TypeError, match=r"images=\[image\]"):
        evaluate_pope(NoModel(), images[0], ["Is there a cat?"], ["no"])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        evaluate_pope(NoModel(), [images[0]], ["Is there a cat?"], ["no"], batch_size=-1)


def test_mmeb_rejects_bare_strings_and_a_single_row():
    from cafe.evaluation import evaluate_mmeb, evaluate_mmeb_subset, summarize_mmeb

    with pytest.raises(TypeError, match=r"subsets must be a list.*\['ImageNet-1K'\]"):
        evaluate_mmeb(NoModel(), {"ImageNet-1K": []}, subsets="ImageNet-1K")
    row = {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]}
    with pytest.raises(TypeError, match=r"rows must be a list.*\[row\]"):
        evaluate_mmeb_subset(NoModel(), row)
    with pytest.raises(TypeError, match=r"in_distribution must be a list"):
        summarize_mmeb({"ImageNet-1K": 0.5}, in_distribution="ImageNet-1K")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        evaluate_mmeb_subset(NoModel(), [row], batch_size=0)


def test_modality_gap_rejects_bare_strings(images):
    from cafe.evaluation import evaluate_modality_gap

    with pytest.raises(TypeError, match=r"texts must be a list.*\['a red picture'\]"):
        evaluate_modality_gap(NoModel(), [images[0]], "a red picture")
    with pytest.raises(TypeError, match=r"images=\[image\]"):
        evaluate_modality_gap(NoModel(), images[0], ["a red picture"])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        evaluate_modality_gap(NoModel(), [images[0]], ["a red picture"], batch_size=0)


@pytest.mark.parametrize(
    ("record", "ignored"),
    [
        ({"query": "q", "positive": "p", "image": "red.png"}, "'image'"),
        (
            {
                "image": "red.png",
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
                "text": "cap",
            },
            "'text'",
        ),  # noqa: E501
        (
            {
                "image": "red.png",
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
                "query": "x",
            },
            "'query'",
        ),  # noqa: E501
        ({"image": "red.png", "text": "red", "query_text": "q", "target_text": "t"}, "'query_text', 'target_text'"),
        ({"query_text": "q", "target_text": "t", "text": "red"}, "'text'"),
    ],
)
def test_a_record_mixing_two_layouts_is_refused_not_half_read(parser, record, ignored):
    """Training would use one layout's fields and drop the others without a word."""
    with pytest.raises(
        RecordError, match=rf"record 0 is read as a .* record, which does not use its {ignored}; .*split"
    ):
        parser(record)


def test_a_field_given_twice_is_refused(parser):
    with pytest.raises(RecordError, match=r"gives 'qry' and 'query_text', which name the same field \(query_text\)"):
        parser({"qry": "a", "query_text": "b", "target_text": "t"})
    with pytest.raises(RecordError, match="both 'positive' and 'positives'"):
        parser({"query": "q", "positive": "p", "positives": ["p1", "p2"]})


def test_a_conversation_turn_that_is_not_a_dict_is_named(parser):
    with pytest.raises(RecordError, match=r"record 0: turn 0 of 'conversations' is a str; each turn is a dict"):
        parser({"image": "red.png", "conversations": ["hello"]})


def test_a_hard_negative_identical_to_the_positive_is_refused(parser):
    """In-batch duplicates are masked; a hard negative equal to its own positive would push the
    query away from its answer."""
    with pytest.raises(RecordError, match=r"record 0: negative 1 is identical to the record's positive \('p1'\)"):
        parser({"query": "q", "positive": "p1", "negatives": ["other", "p1"]})
    with pytest.raises(RecordError, match="negative 0 is identical to the record's positive"):
        parser({"query": "q", "positives": ["p0", "p1"], "negatives": ["p1"]})
    parser({"query": "q", "positive": "p1", "negatives": ["p2"]})  # a different text is fine


def test_from_pretrained_names_a_missing_model_folder(tmp_path):
    from cafe import CafeForConditionalGeneration

    with pytest.raises(FileNotFoundError, match=r"No model folder at '.*/absent' .*check the path"):
        CafeForConditionalGeneration.from_pretrained(tmp_path / "absent")
