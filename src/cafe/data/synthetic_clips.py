"""Synthetic video clips: one coloured shape that moves, changes colour or grows.

The video counterpart of `cafe.data.synthetic` (same colours, shapes and drawing)::

    "a red circle moving left"      "a blue square turning green"      "a yellow triangle growing"

Each clip shows one shape doing one of six motions (`MOTIONS`). The clips are built so that
**no single frame tells the motion**: left- and right-moving shapes start from the same range of
positions (so do up / down), every clip starts with a shape of the same range of sizes, and a
colour change happens at the middle frame, so the first frame of "a red circle turning green"
looks like any red circle's. A model that sees one frame can at best guess the motion (1 in 6);
the captions name it, so retrieval and captioning need the frames together
(`cafe.evaluation.video` measures both).

Determinism as in `cafe.data.synthetic`: clip ``i`` of split ``s`` under seed ``k`` is drawn from
its own ``random.Random("cafe-clips/k/s/i")`` and drawn without anti-aliasing.

Entry points: `generate_clip_records` (records with the frames as a ``[T, H, W, 3]`` uint8 array)
and `write_clip_records` (JSON + one PNG per frame, or an mp4 per clip with PyAV).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .synthetic import DEFAULT_COLOURS, DEFAULT_SHAPES, draw_shapes

MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "colour", "grow")
# How a caption names each motion; `parse_motion` reads it back from generated text.
MOTION_PHRASES = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "colour": "turning {end_colour}",
    "grow": "growing",
}
HUMAN_DESCRIBE_VIDEO_PROMPT = "<video>\nDescribe the video."
MOTION_QUESTION = "What does the shape do?"
CLIP_CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} {motion}",
    "a video of a {colour} {shape} {motion}",
    "one {colour} {shape} {motion} on a plain background",
)


@dataclass(frozen=True)
class SyntheticClipsConfig:
    """What the clip generator draws.

    Args:
        image_size: Side of the square frames in pixels.
        num_frames: Frames per clip.
        fps: Frame rate the clips are stored at (an mp4's rate; for frames, Qwen2-VL's sampling
            takes in-memory frames as already sampled at ``CafeSettings.video_fps``).
        background: RGB of the background.
        colours: Colour name -> RGB (at least two, for colour changes).
        shapes: Shape names, a subset of ``("circle", "square", "triangle")``.
        motions: A subset of `MOTIONS`.
        travel: Distance a moving shape covers over the clip, as a fraction of ``image_size``.
        size_range: Side of the shape at the first frame, as fractions of ``image_size``.
        growth: Factor a growing shape's side is multiplied by over the clip.
        num_captions: Captions per clip (`CLIP_CAPTION_TEMPLATES`, canonical first).
    """

    image_size: int = 64
    num_frames: int = 8
    fps: float = 4.0
    background: tuple[int, int, int] = (255, 255, 255)
    colours: Mapping[str, tuple[int, int, int]] = field(default_factory=lambda: dict(DEFAULT_COLOURS))
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    motions: tuple[str, ...] = MOTIONS
    travel: float = 0.35
    size_range: tuple[float, float] = (0.14, 0.2)
    growth: float = 1.8
    num_captions: int = 1

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.num_frames < 2:
            raise ValueError(
                f"Clips need image_size >= 32 and num_frames >= 2, got {self.image_size}, {self.num_frames}."
            )
        if set(self.motions) - set(MOTIONS) or not self.motions:
            raise ValueError(f"motions must be a non-empty subset of {MOTIONS}, got {self.motions}.")
        if set(self.shapes) - set(DEFAULT_SHAPES) or not self.shapes:
            raise ValueError(f"shapes must be a non-empty subset of {DEFAULT_SHAPES}, got {self.shapes}.")
        if len(self.colours) < 2:
            raise ValueError("Clips need at least two colours (colour changes).")
        low, high = self.size_range
        # Moving shapes share their start range whatever the direction: it must not be empty.
        if not 0.05 <= low <= high or high + 2 * self.travel >= 1.0 or high * self.growth >= 0.9:
            raise ValueError("size_range, travel and growth leave no room for the motion inside the frame.")
        if not 1 <= self.num_captions <= len(CLIP_CAPTION_TEMPLATES):
            raise ValueError(f"num_captions must be in 1..{len(CLIP_CAPTION_TEMPLATES)}, got {self.num_captions}.")


@dataclass(frozen=True)
class ClipScene:
    """The ground truth of one clip."""

    shape: str
    colour: str
    motion: str
    end_colour: str | None = None  # the colour after the change ("colour" motion only)

    @property
    def motion_phrase(self) -> str:
        return MOTION_PHRASES[self.motion].format(end_colour=self.end_colour)

    def caption(self, template: int = 0) -> str:
        return _fix_article(
            CLIP_CAPTION_TEMPLATES[template].format(colour=self.colour, shape=self.shape, motion=self.motion_phrase)
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fix_article(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def parse_motion(text: str | None) -> str | None:
    """The motion a caption names (a `MOTIONS` entry), or None if it names none or several."""
    if not text:
        return None
    text = text.lower()
    found = {motion for motion, word in _MOTION_WORDS.items() if re.search(word, text)}
    return found.pop() if len(found) == 1 else None


_MOTION_WORDS = {
    "left": r"\bleft\b",
    "right": r"\bright\b",
    "up": r"\bup\b",
    "down": r"\bdown\b",
    "colour": r"\bturning\b",
    "grow": r"\bgrowing\b",
}


# ------------------------------------------------------------------ sampling and drawing
def _clip_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"cafe-clips/{seed}/{split}/{index}")


def sample_clip_scene(rng: random.Random, config: SyntheticClipsConfig) -> ClipScene:
    colour = rng.choice(list(config.colours))
    motion = rng.choice(list(config.motions))
    end_colour = rng.choice([c for c in config.colours if c != colour]) if motion == "colour" else None
    return ClipScene(shape=rng.choice(list(config.shapes)), colour=colour, motion=motion, end_colour=end_colour)


def clip_boxes(scene: ClipScene, config: SyntheticClipsConfig, rng: random.Random) -> list[list[int]]:
    """One box ``[x0, y0, x1, y1]`` (inclusive) per frame.

    Left and right movers draw their start centre from the same range (so do up and down), and
    every clip starts with a side from ``size_range``: the first frame does not give the motion away.
    """
    n, frames = config.image_size, config.num_frames
    side = rng.uniform(*config.size_range) * n
    travel = config.travel * n
    # Every clip starts in the range a mover needs in either direction of either axis (so a
    # first frame's position says nothing); a growing shape grows about its centre within it.
    margin = side / 2 + 1
    lo, hi = margin + travel, n - margin - travel
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(scene.motion, (0, 0))
    boxes = []
    for t in range(frames):
        progress = t / (frames - 1)
        size = side * (1 + (config.growth - 1) * progress) if scene.motion == "grow" else side
        x, y = cx + dx * travel * progress, cy + dy * travel * progress
        x0, y0 = round(x - size / 2), round(y - size / 2)
        boxes.append([x0, y0, x0 + max(3, round(size)) - 1, y0 + max(3, round(size)) - 1])
    return boxes


def draw_clip(scene: ClipScene, boxes: list[list[int]], config: SyntheticClipsConfig) -> np.ndarray:
    """The clip's frames ``[T, H, W, 3]`` uint8; a colour change happens at the middle frame."""
    frames = []
    for t, box in enumerate(boxes):
        colour = scene.end_colour if scene.motion == "colour" and t >= len(boxes) // 2 else scene.colour
        if colour is None:
            raise ValueError(f"A {scene.motion!r} clip has no colour for frame {t}: colour changes need end_colour.")
        image = draw_shapes(scene.shape, config.colours[colour], [box], config.image_size, config.background)
        frames.append(np.asarray(image))
    return np.stack(frames)


def make_clip_record(seed: int, split: str, index: int, config: SyntheticClipsConfig) -> dict[str, Any]:
    rng = _clip_rng(seed, split, index)
    scene = sample_clip_scene(rng, config)
    boxes = clip_boxes(scene, config, rng)
    captions = [scene.caption(t) for t in range(config.num_captions)]
    return {
        "id": f"{split}-clip-{index:06d}",
        "video": draw_clip(scene, boxes, config),
        "caption": captions[0],
        "captions": captions,
        "attributes": scene.to_dict(),
        "boxes": boxes,
        "conversations": [
            {"from": "human", "value": HUMAN_DESCRIBE_VIDEO_PROMPT},
            {"from": "gpt", "value": captions[0]},
            {"from": "human", "value": MOTION_QUESTION},
            {"from": "gpt", "value": scene.motion_phrase},
        ],
    }


def generate_clip_records(
    num_samples: int,
    seed: int = 0,
    split: str = "train",
    config: SyntheticClipsConfig | None = None,
    **config_overrides: Any,
) -> list[dict[str, Any]]:
    """Generate ``num_samples`` clip records of one split.

    Returns:
        Dicts with ``id``, ``video`` (``[num_frames, image_size, image_size, 3]`` uint8),
        ``caption``, ``captions``, ``attributes`` (shape, colour, motion, end_colour), ``boxes``
        (one per frame) and ``conversations`` (a ``<video>`` description turn and a motion
        question). ``{"video", "text"}`` pairs for `CafeCollator` are
        ``{"video": r["video"], "text": r["caption"]}``; the records themselves are LLaVA records.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    config = config if config is not None else SyntheticClipsConfig()
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
    return [make_clip_record(seed, split, index, config) for index in range(num_samples)]


def write_clip_records(
    records: Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike,
    split: str = "train",
    video_format: str = "frames",
    folder: str = "videos",
    fps: float = 4.0,
) -> Path:
    """Write clip records as a JSON list plus their videos; returns the JSON path.

    ``video_format="frames"``: one PNG per frame, the record's ``video`` the list of frame paths
    (lossless, no decoder needed). ``"mp4"``: one mpeg4 file per clip (needs PyAV; lossy).
    Paths are relative to ``output_dir`` (pass it as ``image_folder``).
    """
    from PIL import Image

    if video_format not in ("frames", "mp4"):
        raise ValueError(f"video_format must be 'frames' or 'mp4', got {video_format!r}.")
    output_dir = Path(output_dir)
    entries = []
    for record in records:
        frames = np.asarray(record["video"])
        if video_format == "mp4":
            from ..video import write_video

            relative = f"{folder}/{split}/{record['id']}.mp4"
            write_video(output_dir / relative, frames, fps=fps)
            video: Any = relative
        else:
            clip_dir = output_dir / folder / split / record["id"]
            clip_dir.mkdir(parents=True, exist_ok=True)
            video = []
            for t, frame in enumerate(frames):
                Image.fromarray(frame).save(clip_dir / f"{t:03d}.png", format="PNG")
                video.append(f"{folder}/{split}/{record['id']}/{t:03d}.png")
        entry = {"id": record["id"], "video": video, "conversations": record["conversations"]}
        entry.update((k, v) for k, v in record.items() if k not in entry)
        entries.append(entry)
    path = output_dir / f"{split}-clips.json"
    path.write_text(json.dumps(entries, indent=1) + "\n")
    return path
