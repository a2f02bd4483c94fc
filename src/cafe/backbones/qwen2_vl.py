"""Qwen2-VL (``model_type: qwen2_vl``) and Qwen2.5-VL (``model_type: qwen2_5_vl``).

The two families share everything CAFe needs to know, so one mixin serves both:

- An image is ``<|vision_start|><|image_pad|><|vision_end|>`` in a prompt; the processor expands
  ``<|image_pad|>`` to one token per 2x2 patch group of the image's (dynamic) grid.
- The vision encoder (``model.visual``, whose ``merger`` is the projector) takes all images of a
  batch as one flat patch tensor ``pixel_values`` ``[sum of patches, patch_dim]`` with
  ``image_grid_thw`` ``[n_images, 3]``, and returns one feature chunk per image.
- The language model uses M-RoPE: 3-D (temporal, height, width) position ids that depend on each
  image's grid. The stock model computes them only when it is given ``image_grid_thw`` *and* the
  processor's ``mm_token_type_ids``; otherwise it silently falls back to 1-D positions. A CAFe
  training step has neither for its sequences (they run on pre-computed ``mm_encoder_outputs``),
  so `embedding_position_ids` computes the positions itself with the stock ``get_rope_index`` from
  the input ids (image tokens give the token types), the attention mask (padding on either side is
  skipped) and the grids of the images shown, which the selected vision features carry along
  (`QwenImageFeatures`). On a processor batch these are exactly the stock model's positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..modeling import CafeForConditionalGeneration
from ._conversion import inherit_checkpoint_conversion


@dataclass
class QwenImageFeatures(BaseModelOutputWithPooling):
    """The stock image-encoder output (``pooler_output``: one ``[tokens, hidden]`` chunk per image)
    plus the images' ``image_grid_thw``, which the M-RoPE positions of a sequence need.

    The stock forward reads only ``pooler_output`` of ``mm_encoder_outputs["image"]``.
    """

    image_grid_thw: torch.LongTensor | None = None


class _QwenVLMixin:
    """CAFe hooks shared by Qwen2-VL and Qwen2.5-VL; combine before the transformers class."""

    cafe_image_placeholder: str = "<|vision_start|><|image_pad|><|vision_end|>"
    cafe_vision_modules: tuple[str, ...] = ("visual",)
    # The projector (patch merger) lives inside the vision module: `visual.merger`.
    cafe_projector_modules: tuple[str, ...] = ("merger",)
    # Provided by the model class this mixin is combined with.
    model: Any
    config: Any
    dtype: torch.dtype

    def get_vision_features(  # the family's named vision inputs
        self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor, **unused: Any
    ) -> dict[str, Any]:
        outputs = self.model.get_image_features(pixel_values.to(self.dtype), image_grid_thw, return_dict=True)
        # transformers annotates pooler_output as one tensor; image features hold one chunk per image.
        chunks = tuple(outputs.pooler_output)
        return {"image": QwenImageFeatures(pooler_output=chunks, image_grid_thw=image_grid_thw)}  # type: ignore[arg-type]

    def select_vision_features(self, features: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        image = features["image"]
        if getattr(image, "image_grid_thw", None) is None:
            raise ValueError(_MISSING_GRID)
        chunks = image.pooler_output
        index = index.to(image.image_grid_thw.device)
        return {
            "image": QwenImageFeatures(
                pooler_output=[chunks[i] for i in index.tolist()],  # type: ignore[arg-type]  # one chunk per image
                image_grid_thw=image.image_grid_thw[index],
            )
        }

    def embedding_position_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_grid_thw: torch.LongTensor | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **unused: Any,
    ) -> torch.Tensor:
        """M-RoPE position ids ``[3, batch, seq]`` of sequences showing the images of ``image_grid_thw``
        (or of ``mm_encoder_outputs["image"]``) in order; padding positions are ignored."""
        if image_grid_thw is None and mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            image_grid_thw = getattr(mm_encoder_outputs["image"], "image_grid_thw", None)
            if image_grid_thw is None:
                raise ValueError(_MISSING_GRID)
        # What the processor returns as `mm_token_type_ids`: 1 on image tokens, 2 on video tokens.
        token_types = (input_ids == self.config.image_token_id).int()
        token_types = token_types + 2 * (input_ids == self.config.video_token_id).int()
        if image_grid_thw is None and bool((token_types == 1).any()):
            raise ValueError(
                "These sequences hold image tokens but no image_grid_thw was given: pass the processor's "
                "image_grid_thw (or features from get_vision_features) to compute M-RoPE positions."
            )
        position_ids, _ = self.model.get_rope_index(
            input_ids, mm_token_type_ids=token_types, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        return position_ids


_MISSING_GRID = (
    "Qwen2-VL vision features must carry their image_grid_thw (for the M-RoPE positions): compute them with "
    "model.get_vision_features(pixel_values=..., image_grid_thw=...) rather than model.model.get_image_features."
)


class CafeQwen2VLForConditionalGeneration(_QwenVLMixin, CafeForConditionalGeneration, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with CAFe embeddings. Weights, forward and ``generate`` are the stock ones."""


class CafeQwen2_5_VLForConditionalGeneration(
    _QwenVLMixin, CafeForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
):
    """Qwen2.5-VL with CAFe embeddings. Weights, forward and ``generate`` are the stock ones."""


inherit_checkpoint_conversion(CafeQwen2VLForConditionalGeneration, Qwen2VLForConditionalGeneration, "qwen2_vl")
inherit_checkpoint_conversion(CafeQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, "qwen2_5_vl")
