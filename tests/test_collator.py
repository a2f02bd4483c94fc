"""CafeCollator: record layouts, LM labels, truncation, bad input.

Tests that use the tiny checkpoint run once per backbone family (see tests/conftest.py).
"""

import json

import pytest
import torch
from PIL import Image

from cafe import CafeCollator
from cafe.records import RecordError
from cafe.testing import batch_image_count

pytestmark = pytest.mark.all_families

# How the model's own chat template starts an image (before the processor expands it).
IMAGE_START = {
    "llava_onevision": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|>",
}

COLOURS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


@pytest.fixture()
def image_folder(tmp_path):
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{name}.png")
    return tmp_path


def llava_record(name, index=0):
    return {
        "id": f"sample-{name}",
        "record_index": index,
        "image": f"{name}.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": f"a {name} picture"},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": name},
        ],
    }


@pytest.fixture()
def collator(cafe_model, image_folder):
    return CafeCollator(cafe_model.processor, model=cafe_model, image_folder=str(image_folder))


def test_lm_labels_cover_exactly_the_assistant_answers(collator, cafe_model, family):
    batch = collator([llava_record("red"), llava_record("blue")])
    tok = cafe_model.processor.tokenizer
    ids, labels = batch.lm.input_ids[0], batch.lm.labels[0]
    supervised = labels != -100
    assert torch.equal(labels[supervised], ids[supervised])
    # The supervised tokens are the two answers, each with its closing <|im_end|>, nothing else.
    assert tok.decode(ids[supervised]) == "a red picture<|im_end|>red<|im_end|>"
    image_id = cafe_model.config.image_token_id
    assert not supervised[ids == image_id].any()
    assert not supervised[batch.lm.attention_mask[0] == 0].any()
    rendered = tok.decode(ids[batch.lm.attention_mask[0].bool()])
    header = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert rendered.startswith(header + IMAGE_START[family])


def test_llava_records_pair_image_with_joined_answers(collator, cafe_model):
    batch = collator([llava_record("red"), llava_record("green")])
    tok = cafe_model.processor.tokenizer
    doc = tok.decode(batch.doc.input_ids[0][batch.doc.attention_mask[0].bool()])
    assert "<|im_start|>user\na red picture redCompress this sentence in one word:<|im_end|>" in doc
    assert cafe_model.config.image_token_id not in batch.doc.input_ids  # text side: no image tokens
    assert batch_image_count(batch) == 2  # each distinct image once
    assert batch.query.image_index.tolist() == [0, 1] and batch.lm.image_index.tolist() == [0, 1]


def test_all_layouts_in_one_batch(collator, image_folder):
    records = [
        llava_record("red"),
        {"image": "green.png", "text": "a green picture"},
        {"query": "a capital of France", "positive": "Paris", "negatives": ["Rome", {"text": "Berlin"}]},
        {"qry": "which colour?", "qry_image_path": "blue.png", "pos_text": "blue"},
        {"image": "yellow.png", "positives": ["yellow", "a yellow square"]},
    ]
    batch = collator(records)
    assert batch.query.input_ids.shape[0] == 5 and batch.doc.input_ids.shape[0] == 5
    assert batch.negative.input_ids.shape[0] == 2
    assert batch.lm.input_ids.shape[0] == 2  # LLaVA conversation + caption turn of the plain pair
    assert batch_image_count(batch) == 4


def test_identical_texts_share_a_group(collator):
    batch = collator(
        [
            {"image": "red.png", "text": "same"},
            {"image": "blue.png", "text": "same"},
            {"image": "red.png", "text": "other"},
        ]
    )
    assert batch.doc_groups[0] == batch.doc_groups[1] != batch.doc_groups[2]
    assert batch.query_groups[0] == batch.query_groups[2] != batch.query_groups[1]
    assert batch_image_count(batch) == 2  # the repeated image is encoded once


def test_a_hard_negative_shares_the_group_of_the_document_it_shows(collator):
    """A mined hard negative that is another row's document gets that document's content id."""
    batch = collator(
        [
            {"query": "a capital of France", "positive": "Paris", "negatives": ["Rome"]},
            {"query": "the capital of Italy", "positive": "Rome", "negatives": ["Paris", "Madrid"]},
        ]
    )
    assert batch.negative_groups.tolist() == [
        batch.doc_groups[1].item(),
        batch.doc_groups[0].item(),
        batch.negative_groups[2].item(),
    ]
    assert batch.negative_groups[2] not in batch.doc_groups


def test_truncation_never_cuts_image_tokens(cafe_model, image_folder):
    long_answer = " ".join(["red"] * 200)
    records = [
        {"image": "red.png", "text": long_answer, "record_index": 0},
        {"image": "blue.png", "text": "blue", "record_index": 1},
    ]
    n_image_tokens = int(
        (
            collator_for(cafe_model, image_folder, 4096)(records).lm.input_ids[1] == cafe_model.config.image_token_id
        ).sum()
    )
    # Long enough for every image block, too short for the long answer: cut after the image.
    batch = collator_for(cafe_model, image_folder, n_image_tokens + 40)(records)
    assert batch.lm.input_ids.shape[1] == n_image_tokens + 40
    assert int((batch.lm.input_ids[0] == cafe_model.config.image_token_id).sum()) == n_image_tokens
    assert (batch.counts["lm_truncated"], batch.counts["lm_dropped_image_cut"]) == (1, 0)
    # Shorter than the image block: that sequence leaves the LM batch, and it is counted.
    batch = collator_for(cafe_model, image_folder, n_image_tokens)(records)
    assert batch.counts["lm_dropped_image_cut"] == 2
    assert batch.lm is None and batch.query.input_ids.shape[0] == 2


@pytest.mark.released_formats
def test_a_conversation_cut_before_its_answer_leaves_the_lm_batch_with_a_warning(cafe_model, image_folder, caplog):
    """Kept, a row with no answer token left would add a 0 to the LM loss's mean without a word."""
    import logging

    question = "what is shown here " * 40
    records = [
        {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "yes"}], "query": "q one"},
        {"conversations": [{"from": "human", "value": "short?"}, {"from": "gpt", "value": "no"}], "query": "q two"},
    ]
    collator = collator_for(cafe_model, image_folder, 60)
    with caplog.at_level(logging.WARNING, logger="cafe.collator"):
        batch = collator(records)
    assert batch.counts["lm_dropped_answer_cut"] == 1 and batch.counts["lm_truncated"] == 0
    assert batch.lm.input_ids.shape[0] == 1 and (batch.lm.labels[0] != -100).any()
    assert batch.query.input_ids.shape[0] == 2  # both pairs still train contrastively
    assert any("no answer token is left" in r.getMessage() for r in caplog.records)


def collator_for(model, folder, max_length):
    return CafeCollator(model.processor, model=model, image_folder=str(folder), max_length=max_length)


def test_multimodal_input_mode(cafe_model, image_folder):
    collator = CafeCollator(
        cafe_model.processor, model=cafe_model, image_folder=str(image_folder), multimodal_input=True
    )
    batch = collator([llava_record("red"), llava_record("blue")])
    tok = cafe_model.processor.tokenizer
    query = tok.decode(batch.query.input_ids[0][batch.query.attention_mask[0].bool()])
    # The reference's query is the whole user side: every user turn's text, joined.
    assert query.endswith("Describe the picture. What colour is it?<|im_end|>\n<|im_start|>assistant\n<|im_end|>")
    assert "Compress" not in query and "Compress" not in tok.decode(batch.doc.input_ids[0])


# ----------------------------------------------------------------------------- bad input
def test_missing_image_names_record_and_path(collator):
    record = llava_record("red", index=7)
    record["image"] = "nowhere/missing.png"
    with pytest.raises(RecordError, match=r"record 7.*missing\.png"):
        collator([record, llava_record("blue")])


def test_missing_image_skip_policy_counts(cafe_model, image_folder):
    collator = CafeCollator(
        cafe_model.processor, model=cafe_model, image_folder=str(image_folder), missing_images="skip"
    )
    record = llava_record("red")
    record["image"] = "missing.png"
    batch = collator([record, llava_record("blue"), llava_record("green")])
    assert batch.counts["skipped_records"] == 1 and batch.query.input_ids.shape[0] == 2


def test_corrupt_image(collator, image_folder):
    (image_folder / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(RecordError, match="Corrupt or unreadable image"):
        collator([{"image": "bad.png", "text": "x"}, {"image": "red.png", "text": "y"}])


def test_empty_text(collator):
    with pytest.raises(RecordError, match="text is empty"):
        collator([{"image": "red.png", "text": "  "}, {"image": "blue.png", "text": "blue"}])


def test_unknown_layout_lists_expected_keys(collator):
    with pytest.raises(RecordError, match=r"fits no supported layout; it has keys \['caption', 'picture'\]"):
        collator([{"picture": "red.png", "caption": "x"}])


def test_json_and_image_folder_round_trip(cafe_model, image_folder, tmp_path):
    from cafe.training import load_records

    path = tmp_path / "train.json"
    records = [llava_record("red"), llava_record("blue")]
    for record in records:
        del record["record_index"]
    path.write_text(json.dumps(records))
    dataset = load_records(str(path))
    assert dataset["record_index"] == [0, 1]
    batch = CafeCollator(cafe_model.processor, model=cafe_model, image_folder=str(image_folder))(list(dataset))
    assert batch.lm.input_ids.shape[0] == 2
