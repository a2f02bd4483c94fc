"""Video inputs without a model: frame sampling, formats, decoding, errors, record layouts."""

import numpy as np
import pytest
import torch
from PIL import Image

from cafe.data import generate_clip_records
from cafe.records import ImageRecordError, RecordError, RecordParser
from cafe.video import (
    FrameSampling,
    Video,
    VideoError,
    frame_sampling,
    load_video,
    write_video,
)


@pytest.fixture(scope="module")
def clips():
    """Four distinct 8-frame clips, [8, 48, 48, 3] uint8."""
    return [record["video"] for record in generate_clip_records(4, seed=1, image_size=48)]


def clip_record(clip, text="a shape moving left"):
    return {"video": clip, "text": text}


def video_conversation(clip, question="What happens?", answer="it grows"):
    return {
        "video": clip,
        "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}],
    }


def test_frame_sampling_is_the_processors():
    """The fps rule is Qwen2VLVideoProcessor.sample_frames; the fixed count is transformers'
    default_sample_indices_fn (which fails on short clips, where ours repeats frames)."""
    from transformers import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    qwen = Qwen2VLVideoProcessor()
    rule = frame_sampling(type("P", (), {"video_processor": qwen})(), None)
    assert (rule.fps, rule.min_frames, rule.max_frames, rule.frame_factor) == (2.0, 4, 768, 2)
    for total in range(4, 300, 7):
        for fps in (8.0, 24.0, 29.97, 30.0):
            expected = qwen.sample_frames(VideoMetadata(total_num_frames=total, fps=fps), fps=2.0).numpy()
            assert np.array_equal(rule.indices(total, fps), expected), (total, fps)
    fixed = FrameSampling(num_frames=8)
    for total in range(8, 100, 5):
        assert np.array_equal(fixed.indices(total, None), default_sample_indices_fn(VideoMetadata(total), num_frames=8))
    assert fixed.indices(3, None).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]


def test_every_video_format_gives_the_same_frames(clips, tmp_path):
    clip = clips[0]
    paths = []
    for t, frame in enumerate(clip):
        Image.fromarray(frame).save(tmp_path / f"{t}.png")
        paths.append(f"{t}.png")
    as_array = load_video(clip)
    assert as_array.frames.shape == (8, 48, 48, 3) and as_array.frames.dtype == np.uint8
    assert np.array_equal(load_video(torch.from_numpy(clip)).frames, clip)
    assert np.array_equal(load_video([Image.fromarray(f) for f in clip]).frames, clip)
    assert np.array_equal(load_video(paths, folder=tmp_path).frames, clip)
    assert load_video(Video(clip)).key == load_video(clip).key != load_video(clips[1]).key
    assert load_video(Video(clip, fps=4.0)).key != load_video(clip).key  # the rate is part of a clip (Qwen2.5-VL)
    # A fixed count resamples: 16 frames -> every other one.
    doubled = np.repeat(clip, 2, axis=0)
    assert np.array_equal(load_video(doubled).frames, clip)


def test_video_files_decode_with_pyav(clips, tmp_path):
    pytest.importorskip("av")
    path = write_video(tmp_path / "clip.mp4", np.repeat(clips[0], 2, axis=0), fps=8.0)
    video = load_video("clip.mp4", FrameSampling(num_frames=8), folder=tmp_path)
    assert video.frames.shape == (8, 48, 48, 3) and video.fps == pytest.approx(4.0)
    # mpeg4 is lossy: the decoded frames are the written ones up to codec noise.
    assert np.abs(video.frames.astype(int) - clips[0].astype(int)).mean() < 8
    qwen_rule = FrameSampling(num_frames=None, fps=2.0, min_frames=4, max_frames=768, frame_factor=2)
    assert load_video(path, qwen_rule).frames.shape[0] == 4  # 2 s at 2 fps, at least min_frames
    short = write_video(tmp_path / "short.mp4", clips[0][:3], fps=8.0)
    assert load_video(short).frames.shape[0] == 8  # three frames, repeated to the fixed count


def test_bad_videos_say_what_to_fix(clips, tmp_path, monkeypatch):
    (tmp_path / "broken.mp4").write_bytes(b"not a video" * 20)
    pytest.importorskip("av")
    with pytest.raises(VideoError, match=r"record 3 \(pair video\).*broken.mp4.*Re-encode"):
        load_video(tmp_path / "broken.mp4", where="record 3 (pair video)")
    with pytest.raises(FileNotFoundError, match="Video file not found for input"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match=r"uint8.*astype"):
        load_video(clips[0].astype(np.float32) / 255)
    with pytest.raises(VideoError, match="channels first"):
        load_video(clips[0].transpose(0, 3, 1, 2).copy())
    with pytest.raises(VideoError, match="different sizes"):
        load_video([clips[0][0], clips[0][1][:20]])
    with pytest.raises(TypeError, match="Expected a video"):
        load_video(42)
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_av_available", lambda: False)
    monkeypatch.setattr(transformers.utils, "is_torchcodec_available", lambda: False)
    with pytest.raises(ImportError, match="pip install av"):
        load_video(tmp_path / "broken.mp4")


def test_records_carry_video_where_they_carry_images(clips, tmp_path):
    parser = RecordParser()
    pair = parser(clip_record(clips[0]), 0)
    assert pair.query.video is not None and pair.positive.text == "a shape moving left"
    assert pair.conversation[0]["content"] == [{"type": "video"}, {"type": "text", "text": "Describe the video."}]
    llava = parser(video_conversation(clips[1]), 1)
    assert llava.conversation_visuals == [llava.query] and llava.conversation[0]["content"][0] == {"type": "video"}
    interleaved = parser(
        {
            "query_video": clips[0],
            "query_text": "what moves?",
            "target_text": "a square",
            "negatives": [{"video": clips[2]}],
        },
        2,
    )
    assert interleaved.query.video is not None and interleaved.negatives[0].video is not None
    with pytest.raises(RecordError, match="both an image and a video"):
        parser({"image": Image.new("RGB", (8, 8)), "video": clips[0], "text": "x"}, 3)
    with pytest.raises(RecordError, match=r"1 '<image>' placeholder.*one video"):
        parser(
            {
                "video": clips[0],
                "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "a"}],
            },
            4,
        )
    with pytest.raises(ImageRecordError, match="Video file not found for record 5"):
        parser({"video": str(tmp_path / "missing.mp4"), "text": "x"}, 5)
    with pytest.raises(RecordError, match=r"did you mean 'video'"):
        parser({"vidoe": clips[0], "image": Image.new("RGB", (8, 8)), "text": "x"}, 6)


# ----------------------------------------------------------------------------- built-in clips
def test_clips_are_deterministic_and_captions_name_the_motion():
    from cafe.data import MOTIONS, parse_motion

    first, second = generate_clip_records(30, seed=5), generate_clip_records(30, seed=5)
    assert all(
        np.array_equal(a["video"], b["video"]) and a["caption"] == b["caption"]
        for a, b in zip(first, second, strict=True)
    )
    assert [r["caption"] for r in first] != [r["caption"] for r in generate_clip_records(30, seed=5, split="test")]
    records = generate_clip_records(120, seed=0)
    assert {r["attributes"]["motion"] for r in records} == set(MOTIONS)
    for record in records:
        attributes = record["attributes"]
        assert record["video"].shape == (8, 64, 64, 3)
        assert parse_motion(record["caption"]) == attributes["motion"]
        assert record["caption"].split()[1:3] == [attributes["colour"], attributes["shape"]]
        assert record["conversations"][0]["value"].startswith("<video>\n")


def test_no_single_frame_shows_the_motion():
    """What one frame shows (the shape's centre and size on the first frame) has the same range
    whatever the motion, so a one-frame model cannot tell the motion; the last frame can."""
    from cafe.data.synthetic import DEFAULT_COLOURS

    records = generate_clip_records(600, seed=0)

    def box_stats(record, frame):
        x0, y0, x1, y1 = record["boxes"][frame]
        return (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0

    by_motion = {}
    for record in records:
        by_motion.setdefault(record["attributes"]["motion"], []).append(record)
    first = {m: np.array([box_stats(r, 0) for r in rs]) for m, rs in by_motion.items()}
    for motion, stats in first.items():
        for column in range(3):  # centre x, centre y, side: the same range for every motion
            assert abs(stats[:, column].mean() - first["left"][:, column].mean()) < 1.0, (motion, column)
    # The first frame shows one colour: the start colour (a colour change happens mid-clip).
    recolour = next(r for r in records if r["attributes"]["motion"] == "colour")
    start, end = (DEFAULT_COLOURS[recolour["attributes"][k]] for k in ("colour", "end_colour"))
    x, y, _ = box_stats(recolour, 0)
    assert tuple(recolour["video"][0][int(y), int(x)]) == start and tuple(recolour["video"][-1][int(y), int(x)]) == end
    last = {m: np.array([box_stats(r, -1) for r in rs]) for m, rs in by_motion.items()}
    assert last["left"][:, 0].max() < last["right"][:, 0].min() and last["up"][:, 1].max() < last["down"][:, 1].min()
    assert last["grow"][:, 2].min() > first["grow"][:, 2].max()


def test_clip_records_written_as_frames_or_mp4_read_back(tmp_path, clips):
    from cafe.data import write_clip_records

    records = generate_clip_records(2, seed=3)
    frames_json = write_clip_records(records, tmp_path, split="train")
    import json

    entries = json.loads(frames_json.read_text())
    parser = RecordParser(str(tmp_path))
    example = parser(entries[0], 0)
    assert np.array_equal(example.query.video.frames, records[0]["video"])
    assert example.conversation[0]["content"][0] == {"type": "video"}
    pytest.importorskip("av")
    mp4_json = write_clip_records(records, tmp_path, split="test", video_format="mp4")
    entry = json.loads(mp4_json.read_text())[1]
    assert entry["video"].endswith(".mp4")
    assert parser(entry, 1).query.video.frames.shape == (8, 64, 64, 3)


def test_parse_motion_reads_generated_captions():
    from cafe.data import parse_motion

    assert parse_motion("a red circle moving left") == "left"
    assert parse_motion("An orange square, turning blue.") == "colour"
    assert parse_motion("a big triangle growing") == "grow"
    assert parse_motion("a circle moving up and down") is None  # two motions: no answer
    assert parse_motion("a red circle") is None and parse_motion("") is None and parse_motion(None) is None


# ----------------------------------------------------------------------------- video metrics
def test_video_recall_has_the_image_retrieval_semantics():
    from cafe.evaluation import retrieval_recall, video_retrieval_recall

    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.8], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    owners = [0, 1, 2, 2]
    video = video_retrieval_recall(scores, owners, ks=(1, 2))
    image = retrieval_recall(scores, owners, ks=(1, 2))
    assert video == {k.replace("image", "video"): v for k, v in image.items()}
    # Caption 1 ties its own video with video 2 (pessimistic: a miss at 1); caption 2 ranks last.
    assert video["text_to_video_recall@1"] == 0.5 and video["video_to_text_recall@1"] == pytest.approx(2 / 3)


def test_motion_accuracy():
    from cafe.evaluation import motion_accuracy

    result = motion_accuracy(["a red circle moving left", "a square growing", "a shape"], ["left", "up", "grow"])
    assert result == {"motion_accuracy": pytest.approx(1 / 3), "motion_answered": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="Unknown motions"):
        motion_accuracy(["x"], ["sideways"])
    with pytest.raises(ValueError, match="same length"):
        motion_accuracy(["x", "y"], ["left"])


def test_no_decoder_is_not_a_skippable_record_error(tmp_path, monkeypatch):
    """missing_images="skip" must not drop every video record because PyAV is not installed."""
    import transformers.utils

    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    monkeypatch.setattr(transformers.utils, "is_av_available", lambda: False)
    monkeypatch.setattr(transformers.utils, "is_torchcodec_available", lambda: False)
    with pytest.raises(ImportError, match="pip install av"):
        RecordParser(str(tmp_path))({"video": "clip.mp4", "text": "x"}, 0)


def test_validate_records_checks_video_records(tmp_path):
    import json

    from datasets import Dataset

    from cafe.data import write_clip_records
    from cafe.data.validation import DataValidationError, validate_records

    path = write_clip_records(generate_clip_records(3, seed=0), tmp_path)
    entries = json.loads(path.read_text())
    rows = [{"video": e["video"], "text": e["caption"]} for e in entries]
    rows[1]["video"] = rows[1]["video"][:-1] + ["videos/train/missing.png"]
    with pytest.raises(DataValidationError, match="missing.png"):
        validate_records(Dataset.from_list(rows), image_folder=str(tmp_path))
    kept = validate_records(Dataset.from_list(rows), image_folder=str(tmp_path), missing_images="skip")
    assert len(kept) == 2


def test_a_corrupt_frame_file_is_a_skippable_record_error(tmp_path, clips):
    Image.fromarray(clips[0][0]).save(tmp_path / "0.png")
    (tmp_path / "1.png").write_bytes(b"not a png")
    with pytest.raises(ImageRecordError, match=r"record 0 \(pair video\), frame 1"):
        RecordParser(str(tmp_path))({"video": ["0.png", "1.png"], "text": "x"}, 0)
