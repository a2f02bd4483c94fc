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
    # LLaVA reads `hidden_states[vision_feature_layer]`, before SigLIP's post-layernorm and head.
    cafe_unused_modules = ("vision_tower.post_layernorm", "vision_tower.head")

    def get_vision_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        batch_num_images: torch.Tensor | None = None,
        **unused: Any,
    ) -> dict[str, Any]:
        image_outputs = self.model.get_image_features(
            pixel_values.to(self.dtype), image_sizes, batch_num_images=batch_num_images, return_dict=True
        )
        return {"image": image_outputs}

    def select_vision_features(self, features: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        # LLaVA-OneVision keeps one packed feature tensor per image in `pooler_output` (a list).
        pooled = features["image"].pooler_output
        # transformers annotates pooler_output as one tensor; multimodal features hold one per image.
        selected = [pooled[i] for i in index.tolist()]
        return {"image": BaseModelOutputWithPooling(pooler_output=selected)}  # type: ignore[arg-type]


inherit_checkpoint_conversion(
    CafeLlavaOnevisionForConditionalGeneration, LlavaOnevisionForConditionalGeneration, "llava_onevision"
)
