"""LLaVA-OneVision (``model_type: llava_onevision``)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..modeling import CafeForConditionalGeneration
from ._conversion import inherit_checkpoint_conversion


class CafeLlavaOnevisionForConditionalGeneration(CafeForConditionalGeneration, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with CAFe embeddings. Weights, forward and ``generate`` are the stock ones."""

    # The reference's user turn for an image: "<image>\nCompress this image in one word:".
    cafe_image_placeholder = "<image>\n"
    cafe_video_placeholder = "<video>\n"
    # LLaVA reads `hidden_states[vision_feature_layer]`, before SigLIP's post-layernorm and head.
    cafe_unused_modules = ("vision_tower.post_layernorm", "vision_tower.head")

    def get_vision_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        **unused: Any,
    ) -> dict[str, Any]:
        """Images: ``pixel_values [images, crops, 3, H, W]`` with ``image_sizes``; videos:
        ``pixel_values_videos [videos, frames, 3, H, W]`` (one frame count per batch)."""
        features = {}
        if pixel_values is not None:
            features["image"] = self.model.get_image_features(
                pixel_values.to(self.dtype), image_sizes, batch_num_images=batch_num_images, return_dict=True
            )
        if pixel_values_videos is not None:
            # The stock video path: every frame through the tower, 2x2 pooling, one newline token
            # per clip; `pooler_output` is [videos, frames * pooled patches + 1, hidden].
            features["video"] = self.model.get_video_features(pixel_values_videos.to(self.dtype), return_dict=True)
        return features

    def select_vision_features(
        self, features: dict[str, Any], index: torch.Tensor, modality: str = "image"
    ) -> dict[str, Any]:
        pooled = features[modality].pooler_output
        if modality == "video":
            # One row per clip of a stacked tensor (the stock forward flattens it).
            return {"video": BaseModelOutputWithPooling(pooler_output=pooled[index.to(pooled.device)])}
        # LLaVA-OneVision keeps one packed feature tensor per image in `pooler_output` (a list).
        # transformers annotates pooler_output as one tensor; multimodal features hold one per image.
        selected = [pooled[i] for i in index.tolist()]
        return {"image": BaseModelOutputWithPooling(pooler_output=selected)}  # type: ignore[arg-type]


inherit_checkpoint_conversion(
    CafeLlavaOnevisionForConditionalGeneration, LlavaOnevisionForConditionalGeneration, "llava_onevision"
)
