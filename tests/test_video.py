"""Video: records, collator, one vision pass per video, embeddings, generation, prefix sharing.

Tests that use the tiny checkpoint run once per backbone family (see tests/conftest.py); the
parity tests also run on the released-format fixtures (real video token counts).
"""

import pytest
import torch
from PIL import Image

from cafe import CafeCollator, CafeForConditionalGeneration
from cafe.data import generate_clip_records
from cafe.modeling import last_token_pool
from cafe.prompting import (
    EmbeddingInput,
    build_embedding_batch,
    render_embedding_prompts,
)
from cafe.video import Video, frame_sampling, load_video

pytestmark = pytest.mark.all_families

# How one video appears in a prompt before the processor expands it.
VIDEO = {
    "llava_onevision": "<video>\n",
    "qwen2_vl": "<|vision_start|><|video_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|video_pad|><|vision_end|>",
}
REFERENCE_VIDEO = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{video}Compress this video in one word:<|im_end|>\n"
    "<|im_start|>assistant\n<|im_end|>"
)
REFERENCE_VIDEO_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n{video}what moves?<|im_end|>\n"
    "<|im_start|>assistant\n<|im_end|>"
)


@pytest.fixture(scope="module")
def clips():
    """Four distinct 8-frame clips (moving, recolouring or growing shapes), [8, 48, 48, 3] uint8."""
    return [record["video"] for record in generate_clip_records(4, seed=1, image_size=48)]


def clip_record(clip, text="a shape moving left"):
    return {"video": clip, "text": text}


def video_conversation(clip, question="What happens?", answer="it grows"):
    return {
        "video": clip,
        "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}],
    }


def video_token_id(model):
    return model.config.video_token_id


# ----------------------------------------------------------------------------- collator
def test_collator_output_for_video_records(cafe_model, clips, family):
    """Video pairs, a <video> conversation, an image pair and a repeated clip in one batch."""
    red = Image.new("RGB", (40, 30), (255, 0, 0))
    records = [
        clip_record(clips[0]),
        video_conversation(clips[1]),
        {"image": red, "text": "a red picture"},
        clip_record(clips[0]),
    ]
    collator = CafeCollator(cafe_model.processor, model=cafe_model)
    batch = collator(records)
    vision = batch.vision
    # Each distinct clip once (the repeated one too), next to the image's tensors.
    if family == "llava_onevision":
        assert vision["pixel_values_videos"].shape == (2, 8, 3, 32, 32)
    else:
        assert vision["video_grid_thw"].shape == (2, 3) and vision["video_grid_thw"][:, 0].tolist() == [4, 4]
    assert "pixel_values" in vision
    assert batch.query.video_index.tolist() == [0, 1, 0] and batch.query.image_index.tolist() == [0]
    assert batch.lm.video_index.tolist() == [0, 1, 0] and batch.lm.image_index.tolist() == [0]
    assert batch.doc.video_index.numel() == 0 and batch.doc.image_index.numel() == 0
    assert batch.query_lm_index.tolist() == [0, 1, 2, 3]
    assert torch.equal(batch.query_groups[0], batch.query_groups[3]) and batch.query_groups[0] != batch.query_groups[1]
    # Video tokens are never supervised; the answers are.
    video_tokens = batch.lm.input_ids == video_token_id(cafe_model)
    assert video_tokens.sum(1).tolist()[1] > 0 and not (batch.lm.labels[video_tokens] != -100).any()
    tok = cafe_model.processor.tokenizer
    answer = batch.lm.labels[1][batch.lm.labels[1] != -100]
    assert tok.decode(answer) == "it grows<|im_end|>"
    # The embedding prompt of a clip is the reference's image prompt with "video".
    prompt = tok.decode(batch.query.input_ids[0][batch.query.attention_mask[0].bool()])
    tokens_per_clip = int((batch.query.input_ids[0] == video_token_id(cafe_model)).sum())
    assert prompt == REFERENCE_VIDEO.format(
        video=VIDEO[family].replace(
            cafe_model.processor.video_token, cafe_model.processor.video_token * tokens_per_clip
        )
    )


def test_a_mixed_batch_keeps_image_and_video_features_apart(cafe_model, clips):
    """Text-only, image-only and video-only sides in one batch, each gets its own features."""
    red = Image.new("RGB", (40, 30), (255, 0, 0))
    records = [{"query": "a question", "positive": "its answer"}, {"image": red, "text": "red"}, clip_record(clips[2])]
    batch = CafeCollator(cafe_model.processor, model=cafe_model)(records)
    with torch.no_grad():
        out = cafe_model(cafe_batch=batch)
        expected = cafe_model.encode(["a question", red, {"video": clips[2]}])
    assert (out.query_embeds - expected).abs().max().item() <= 1e-5


def test_one_vision_pass_per_video(cafe_model, clips, family):
    """Two distinct clips shown by four records (query and LM sequences): the vision tower runs
    once, over the two clips' frames, in the whole training step."""
    records = [
        clip_record(clips[0]),
        video_conversation(clips[1]),
        clip_record(clips[0], "again"),
        video_conversation(clips[1], answer="it moves"),
    ]
    batch = CafeCollator(cafe_model.processor, model=cafe_model)(records)
    tower = getattr(cafe_model.model, type(cafe_model).cafe_vision_modules[0])
    rows = []
    hook = tower.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    try:
        out = cafe_model(cafe_batch=batch)
        (out.lm_loss + out.query_embeds.sum()).backward()
    finally:
        hook.remove()
    pixels = batch.vision["pixel_values_videos"]
    # LLaVA-OneVision: [clips, frames, 3, H, W] runs as clips * frames images; Qwen2-VL: the
    # clips' flat patches [patches, dim].
    expected = pixels.shape[0] * pixels.shape[1] if pixels.ndim == 5 else pixels.shape[0]
    assert rows == [expected]
    assert expected == (2 * 8 if family == "llava_onevision" else int(batch.vision["video_grid_thw"].prod(-1).sum()))


# ----------------------------------------------------------------------------- embeddings
@pytest.mark.released_formats
def test_video_embedding_equals_an_independent_computation(tiny_checkpoint, stock_class, clips, family):
    """encode({"video": ...}) = the stock backbone's last hidden state of the reference prompt with
    "video", at its last token, L2-normalised: prompt, frames, positions (M-RoPE) all checked."""
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    stock = stock_class.from_pretrained(tiny_checkpoint).eval()
    processor = model.processor
    sampling = frame_sampling(processor, model.cafe_settings)
    video = load_video(clips[0], sampling)
    # Written out by hand, not through cafe's templates.
    prompts = [REFERENCE_VIDEO.format(video=VIDEO[family]), REFERENCE_VIDEO_TEXT.format(video=VIDEO[family])]
    inputs = processor(
        text=prompts, videos=[video.frames] * 2, video_metadata=[video.metadata] * 2, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = stock.model(**inputs, use_cache=False).last_hidden_state
        expected = torch.nn.functional.normalize(last_token_pool(hidden, inputs["attention_mask"]).float(), dim=-1)
        ours = model.encode([{"video": clips[0]}, {"video": clips[0], "text": "what moves?"}])
    assert (ours - expected).abs().max().item() <= 1e-5
    # The two prompts differ: the suffix ("Compress this video ...") is used for video-only inputs.
    assert (ours[0] - ours[1]).abs().max().item() > 1e-4


def test_training_forward_equals_encode_for_videos(cafe_model, clips):
    """Shared vision features (one pass), cafe's positions, with and without prefix sharing, give
    what `encode` and the stock forward give."""
    records = [clip_record(clips[0], "one"), video_conversation(clips[1]), clip_record(clips[2], "three")]
    collator = CafeCollator(cafe_model.processor, model=cafe_model)
    batch = collator(records)
    conversations = [collator.parser(record, i).conversation for i, record in enumerate(records)]
    prompts = [
        cafe_model.processor.apply_chat_template(
            c, chat_template=cafe_model.cafe_settings.lm_chat_template, tokenize=False
        )
        for c in conversations
    ]
    videos = [load_video(clips[i], collator.parser.video_sampling) for i in range(3)]
    stock_batch = cafe_model.processor(
        text=prompts,
        videos=[v.frames for v in videos],
        video_metadata=[v.metadata for v in videos],
        padding=True,
        return_tensors="pt",
    )
    assert torch.equal(stock_batch["input_ids"], batch.lm.input_ids)
    with torch.no_grad():
        shared = cafe_model.cafe_forward(batch, share_prefix=True)
        separate = cafe_model.cafe_forward(batch, share_prefix=False)
        encoded = cafe_model.encode([{"video": clips[i]} for i in range(3)])
        stock = type(cafe_model).backbone_class().forward(cafe_model, **stock_batch, labels=batch.lm.labels)
    for out in (shared, separate):
        assert (out.query_embeds - encoded).abs().max().item() <= 1e-5
        assert out.lm_loss.item() == pytest.approx(stock.loss.item(), rel=1e-5)


def test_prefix_sharing_covers_video_records(cafe_model, clips):
    """A clip's tokens are computed once for its LM and embedding sequences; gradients agree."""
    records = [clip_record(clips[0]), video_conversation(clips[1]), clip_record(clips[2], "three")]
    batch = CafeCollator(cafe_model.processor, model=cafe_model)(records)
    seen = []
    hook = cafe_model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[:2].numel()), with_kwargs=True
    )
    results = {}
    try:
        cafe_model.train()
        for share in (True, False):
            seen.clear()
            cafe_model.zero_grad()
            out = cafe_model.cafe_forward(batch, share_prefix=share)
            (out.lm_loss + (out.query_embeds * out.doc_embeds.detach()).sum()).backward()
            grads = {n: p.grad.clone() for n, p in cafe_model.named_parameters() if p.grad is not None}
            results[share] = (out, grads, sum(seen))
    finally:
        hook.remove()
        cafe_model.eval()
    (shared, shared_grads, shared_positions), (separate, separate_grads, separate_positions) = (
        results[True],
        results[False],
    )
    video_tokens = int((batch.query.input_ids == video_token_id(cafe_model)).sum())
    assert separate_positions - shared_positions >= video_tokens  # every clip's tokens saved once
    assert (shared.query_embeds - separate.query_embeds).abs().max().item() <= 1e-5
    assert shared.lm_loss.item() == pytest.approx(separate.lm_loss.item(), rel=1e-5)
    assert shared_grads.keys() == separate_grads.keys()
    for name, grad in separate_grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_encode_takes_videos_with_and_without_text(cafe_model, clips):
    with torch.no_grad():
        batched = cafe_model.encode(
            [{"video": clips[0]}, "text", {"video": clips[1], "text": "what moves?"}, Video(clips[2], fps=2.0)],
            batch_size=4,
        )
        alone = torch.cat(
            [
                cafe_model.encode([item])
                for item in [
                    {"video": clips[0]},
                    "text",
                    {"video": clips[1], "text": "what moves?"},
                    Video(clips[2], fps=2.0),
                ]
            ]
        )
    assert batched.shape == (4, cafe_model.config.get_text_config().hidden_size)
    assert (batched - alone).abs().max().item() <= 1e-5
    assert (batched @ batched.T - torch.eye(4)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="an image or a video, not both"):
        cafe_model.encode([{"video": clips[0], "image": Image.new("RGB", (8, 8))}])


def test_a_template_without_video_support_is_refused(cafe_model, clips):
    """A checkpoint saved before video support renders no video placeholder: say how to rebuild."""
    old = cafe_model.embedding_chat_template.replace("part['type'] == 'video'", "false")
    items = [EmbeddingInput(video=load_video(clips[0], frame_sampling(cafe_model.processor, cafe_model.cafe_settings)))]
    assert cafe_model.processor.video_token not in render_embedding_prompts(cafe_model.processor, items, old)[0]
    with pytest.raises(ValueError, match=r"no video placeholder.*'embedding_chat_template': None"):
        build_embedding_batch(cafe_model.processor, items, old)


def test_video_settings_are_saved_with_the_checkpoint(cafe_model, clips, tmp_path):
    assert cafe_model.cafe_settings.video_prompt == "Compress this video in one word:"
    # An 8-frame clip at 2 fps, and its every other frame (at 1 fps).
    whole, halved = [{"video": Video(clips[0], fps=2.0)}], [{"video": Video(clips[0][::2], fps=1.0)}]
    with torch.no_grad():
        assert not torch.allclose(cafe_model.encode(whole), cafe_model.encode(halved), atol=1e-4)  # 8 vs 4 frames
    cafe_model.config.cafe = {**cafe_model.config.cafe, "video_num_frames": 4, "video_fps": 1.0}
    cafe_model.save_pretrained(tmp_path / "saved")
    loaded = CafeForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    assert (loaded.cafe_settings.video_num_frames, loaded.cafe_settings.video_fps) == (4, 1.0)
    # The saved rule is the one encode applies: 4 frames (LLaVA-OneVision), 1 fps (Qwen2-VL).
    with torch.no_grad():
        assert torch.allclose(loaded.encode(whole), loaded.encode(halved), atol=1e-5)


# ----------------------------------------------------------------------------- generation
def test_generate_on_a_video_matches_the_stock_class(tiny_checkpoint, stock_class, clips):
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    stock = stock_class.from_pretrained(tiny_checkpoint).eval()
    processor = model.processor
    video = load_video(clips[0], frame_sampling(processor, model.cafe_settings))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(text=[prompt], videos=[video.frames], video_metadata=[video.metadata], return_tensors="pt")
    with torch.no_grad():
        ours = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        theirs = stock.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs) and ours.shape[1] > inputs["input_ids"].shape[1]


# ----------------------------------------------------------------------------- evaluation and training
def test_video_evaluation_runs_on_paths_and_arrays(cafe_model, tmp_path):
    from cafe.data import write_clip_records
    from cafe.evaluation import evaluate_video_captions, evaluate_video_retrieval

    records = generate_clip_records(4, seed=2, image_size=32)
    path = write_clip_records(records, tmp_path)
    import json

    entries = json.loads(path.read_text())
    from_files = evaluate_video_retrieval(
        cafe_model,
        [e["video"] for e in entries],
        [e["captions"] for e in entries],
        ks=(1, 2),
        video_root=tmp_path,
        return_scores=True,
    )
    in_memory = evaluate_video_retrieval(
        cafe_model, [r["video"] for r in records], [r["captions"] for r in records], ks=(1, 2), return_scores=True
    )
    assert set(from_files) == {
        "text_to_video_recall@1",
        "text_to_video_recall@2",
        "video_to_text_recall@1",
        "video_to_text_recall@2",
        "num_videos",
        "num_captions",
        "scores",
    }
    assert torch.allclose(from_files["scores"], in_memory["scores"], atol=1e-5)  # PNG frames are lossless
    captions = evaluate_video_captions(
        cafe_model,
        [r["video"] for r in records],
        [r["attributes"]["motion"] for r in records],
        max_new_tokens=4,
        show_progress_bar=False,
    )
    assert len(captions["captions"]) == 4 and 0.0 <= captions["motion_accuracy"] <= 1.0


@pytest.mark.slow
def test_a_short_training_run_lifts_text_to_video_recall_above_chance(cafe_model, tmp_path):
    """CafeTrainer on eight (clip, caption) pairs of the built-in moving shapes: text->video R@1
    on those clips goes from chance (1/8) to at least 4x chance."""
    from cafe import CafeTrainer, CafeTrainingArguments
    from cafe.evaluation import evaluate_video_retrieval

    records = generate_clip_records(8, seed=0, image_size=32)
    videos, captions = [r["video"] for r in records], [r["caption"] for r in records]
    before = evaluate_video_retrieval(cafe_model, videos, captions, ks=(1,))["text_to_video_recall@1"]
    args = CafeTrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        max_steps=30,
        learning_rate=5e-4,
        vision_tower_learning_rate=5e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        contrastive_weight=10.0,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    trainer = CafeTrainer(
        model=cafe_model,
        args=args,
        train_dataset=[{"video": v, "text": c} for v, c in zip(videos, captions, strict=True)],
        data_collator=CafeCollator(cafe_model.processor, model=cafe_model),
        processing_class=cafe_model.processor,
    )
    trainer.train()
    cafe_model.eval()
    after = evaluate_video_retrieval(cafe_model, videos, captions, ks=(1,))["text_to_video_recall@1"]
    assert before <= 0.25 and after >= 0.5, (before, after)


def test_cafe_train_reads_video_records_and_saves_the_frame_rule(tiny_checkpoint, tmp_path):
    """`cafe train` on a JSON of clips (frames on disk): --video_num_frames / --video_fps reach the
    collator and the saved checkpoint."""
    from cafe import CafeTrainingArguments
    from cafe.data import write_clip_records
    from cafe.training import (
        DataArguments,
        ModelArguments,
        build_trainer,
        save_final_model,
    )

    path = write_clip_records(generate_clip_records(4, seed=0, image_size=32), tmp_path / "data")
    model_args = ModelArguments(model_name_or_path=str(tiny_checkpoint))
    data_args = DataArguments(
        data_path=str(path), image_folder=str(tmp_path / "data"), video_num_frames=4, video_fps=1.0
    )
    training_args = CafeTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = build_trainer(model_args, data_args, training_args)
    sampling = trainer.data_collator.parser.video_sampling
    assert sampling.num_frames == 4 or sampling.fps == 1.0
    trainer.train()
    save_final_model(trainer, model_args, str(tmp_path / "final"))
    saved = CafeForConditionalGeneration.from_pretrained(tmp_path / "final").cafe_settings
    assert (saved.video_num_frames, saved.video_fps) == (4, 1.0)
