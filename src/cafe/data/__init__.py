"""Data utilities for CAFe: synthetic, fully offline image-caption and video-caption data sets."""

from .synthetic import (
    CAPTION_TEMPLATES,
    POPE_CATEGORIES,
    Scene,
    SyntheticShapesConfig,
    generate_records,
    make_pope_dataset,
    make_synthetic_dataset,
    records_to_dataset,
    shape_interior_point,
    write_llava_json,
    write_synthetic_dataset,
)
from .synthetic_clips import (
    MOTIONS,
    ClipScene,
    SyntheticClipsConfig,
    generate_clip_records,
    parse_motion,
    write_clip_records,
)

__all__ = [
    "CAPTION_TEMPLATES",
    "MOTIONS",
    "ClipScene",
    "SyntheticClipsConfig",
    "generate_clip_records",
    "parse_motion",
    "write_clip_records",
    "POPE_CATEGORIES",
    "Scene",
    "SyntheticShapesConfig",
    "generate_records",
    "make_pope_dataset",
    "make_synthetic_dataset",
    "records_to_dataset",
    "shape_interior_point",
    "write_llava_json",
    "write_synthetic_dataset",
]
