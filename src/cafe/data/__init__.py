"""Data utilities for CAFe: a synthetic, fully offline image-caption data set."""

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

__all__ = [
    "CAPTION_TEMPLATES",
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
