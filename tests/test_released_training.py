"""Training on what users load: released chat templates, anyres image sizes, multimodal mode.

The released-format fixtures (`cafe.testing.build_released_format_checkpoint`) carry the released
checkpoints' chat templates and image processor configs; only widths and depths are tiny. A
640x480 photo is 2,929 image tokens for llava-hf LLaVA-OneVision and a 1920x1080 one 7,269.
"""

import json
import logging

import pytest
import torch
from _training import llm_token_positions
from PIL import Image

from cafe import CafeCollator, CafeForConditionalGeneration, CafeTrainer, CafeTrainingArguments
from cafe.configuration import CafeSettings
from cafe.shared_prefix import common_prefix_length
from cafe.testing import RELEASED_FORMAT_FAMILIES

SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def photo(width, height, seed):
    """A non-uniform RGB image (a gradient rotated per seed), so crops and patches differ."""
    return Image.linear_gradient("L").rotate(37 * seed).resize((width, height)).convert("RGB")


def photo_records():
    return [
        {
            "image": photo(640, 480, 1),
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the photo."},
                {"from": "gpt", "value": "a grey gradient"},
            ],
        },
        {
            "image": photo(1920, 1080, 2),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": "a wide gradient"},
            ],
        },
    ]


@pytest.fixture(scope="module", params=RELEASED_FORMAT_FAMILIES)
def released_model(request, _released_checkpoints):
    return CafeForConditionalGeneration.from_pretrained(_released_checkpoints(request.param)).eval()


def test_real_photos_keep_their_lm_rows_and_share_the_prefix(released_model, caplog):
    model = released_model
    with caplog.at_level(logging.WARNING, logger="cafe.collator"):
        batch = CafeCollator(model.processor, model=model)(photo_records())
    # Default max_length is the model's context length: no LM row dropped or cut, nothing to warn.
    assert batch.lm is not None and len(batch.lm) == 2
    assert batch.counts["lm_dropped_image_cut"] == 0 and batch.counts["lm_truncated"] == 0
    assert not [r for r in caplog.records if "max_length" in r.getMessage()]

    tokenizer, image_id = model.processor.tokenizer, model.config.image_token_id
    for row in range(2):
        lm_ids = batch.lm.input_ids[row][batch.lm.attention_mask[row].bool()]
        # The reference's LM format whatever the checkpoint's template: the system turn first.
        assert tokenizer.decode(lm_ids).startswith(SYSTEM_TURN)
        assert int((lm_ids == image_id).sum()) >= 391  # a real photo's worth (Qwen 640x480: 391; llava-hf: 2,929)
        query_row = int((batch.query_lm_index == row).nonzero())
        q_ids = batch.query.input_ids[query_row][batch.query.attention_mask[query_row].bool()]
        last_image_token = int((lm_ids == image_id).nonzero().max())
        assert common_prefix_length(lm_ids, q_ids) > last_image_token  # system, header, every image token

    shared = llm_token_positions(model, batch, share_prefix=True)
    separate = llm_token_positions(model, batch, share_prefix=False)
    image_tokens = int((batch.query.input_ids == image_id).sum())
    assert shared <= separate - image_tokens  # at least every query's image tokens run once, not twice


def test_the_lm_template_is_stored_in_the_checkpoint(released_model, tmp_path):
    model = released_model
    template = model.cafe_settings.lm_chat_template
    assert template and "You are a helpful assistant." in template
    # Generation keeps the checkpoint's own template (docs/backbones.md, "Using a released checkpoint").
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["cafe"]
    assert saved["lm_chat_template"] == template
    reloaded = CafeForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.processor.chat_template == model.processor.chat_template


def test_a_dropped_lm_row_is_said_once(released_model, caplog):
    model = released_model
    collator = CafeCollator(model.processor, model=model, max_length=256)  # shorter than any photo
    with caplog.at_level(logging.WARNING, logger="cafe.collator"):
        first = collator(photo_records())
        second = collator(photo_records())
    assert first.lm is None and second.lm is None  # both rows left the LM batch ...
    assert first.counts["lm_dropped_image_cut"] == 2 and first.query is not None  # ... their pairs stayed
    warnings = [r.getMessage() for r in caplog.records if "max_length=256" in r.getMessage()]
    assert len(warnings) == 1 and "contrastively only" in warnings[0] and "Raise max_length" in warnings[0]


def test_zero_supervised_tokens_is_an_error_naming_the_template(tiny_checkpoint):
    """An assistant header that the LM template does not produce would train on nothing."""
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    # transformers' processor tests use this older variant: "assistant " then "\n".
    older = model.cafe_settings.lm_chat_template.replace("'\\n' }}{%- if message", "' \\n' }}{%- if message")
    assert older != model.cafe_settings.lm_chat_template
    settings = CafeSettings.from_dict({**model.config.cafe, "lm_chat_template": older})
    collator = CafeCollator(model.processor, settings=settings, model=model)
    with pytest.raises(ValueError, match=r"No answer tokens found in 2 of 2 LM sequences.*assistant_header"):
        collator([{"image": photo(32, 32, 1), "text": "red"}, {"image": photo(32, 32, 2), "text": "blue"}])
    # The fix the message names: the header that template does produce.
    fixed = CafeCollator(model.processor, settings=settings, model=model, assistant_header="<|im_start|>assistant \n")
    batch = fixed([{"image": photo(32, 32, 1), "text": "red"}, {"image": photo(32, 32, 2), "text": "blue"}])
    assert batch.lm.supervised_tokens > 0


def test_multimodal_mode_end_to_end(tiny_checkpoint, tmp_path):
    """multimodal_input=True: the query joins every user turn, training writes the no-suffix prompts
    into config.cafe, and the saved model embeds with them in cafe and in sentence-transformers."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        photo(32, 32, i).save(images / f"{colour}.png")
        records.append(
            {
                "image": f"{colour}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour?"},
                    {"from": "gpt", "value": colour},
                    {"from": "human", "value": "And the shape?"},
                    {"from": "gpt", "value": "a square"},
                ],
            }
        )
    collator = CafeCollator(model.processor, model=model, image_folder=str(images), multimodal_input=True)
    batch = collator(records[:2])
    query = model.processor.tokenizer.decode(batch.query.input_ids[0][batch.query.attention_mask[0].bool()])
    assert "What colour? And the shape?<|im_end|>" in query and "Compress" not in query

    args = CafeTrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = CafeTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), data_collator=collator)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))

    reloaded = CafeForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    settings = reloaded.cafe_settings
    assert (settings.image_prompt, settings.text_prompt, settings.multimodal_prompt) == ("", "", "")
    assert "Compress" not in settings.embedding_chat_template
    assert settings.embedding_chat_template == collator.embedding_chat_template
    pair = {"image": photo(32, 32, 0), "text": "What colour? And the shape?"}
    # cafe's encode is what the collator trained: the query row of the first record.
    with torch.no_grad():
        trained = reloaded(cafe_batch=collator(records[:2]), cafe_share_prefix=False).query_embeds[0]
    cafe_vector = reloaded.encode([pair])[0]
    assert (cafe_vector - trained).abs().max().item() <= 1e-5
    st_vector = torch.from_numpy(SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode([pair]))[0]
    assert torch.nn.functional.cosine_similarity(st_vector, cafe_vector, dim=0).item() >= 0.9999
