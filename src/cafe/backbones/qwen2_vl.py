"""Qwen2-VL (``model_type: qwen2_vl``) and Qwen2.5-VL (``model_type: qwen2_5_vl``).

The two families share everything CAFe needs to know, so one mixin serves both:

- An image is ``<|vision_start|><|image_pad|><|vision_end|>`` in a prompt; the processor expands
  ``<|image_pad|>`` to one token per 2x2 patch group of the image's (dynamic) grid. A video is
  ``<|vision_start|><|video_pad|><|vision_end|>``, one token per 2x2 patch group of every pair of
  frames (``video_grid_thw`` ``[videos, 3]``: time patches, height, width).
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
  (`QwenImageFeatures`, `QwenVideoFeatures`; Qwen2.5-VL also spaces a video's time positions by
  its ``second_per_grid_ts``). On a processor batch these are exactly the stock model's positions.
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


@dataclass
class QwenVideoFeatures(BaseModelOutputWithPooling):
    """The stock video-encoder output (``pooler_output``: one ``[tokens, hidden]`` chunk per video)
    plus what the M-RoPE positions need: ``video_grid_thw`` ``[videos, 3]`` and, from a
    Qwen2.5-VL processor, ``second_per_grid_ts`` ``[videos]`` (seconds per time patch)."""

    video_grid_thw: torch.LongTensor | None = None
    second_per_grid_ts: torch.Tensor | None = None


class _QwenVLMixin:
    """CAFe hooks shared by Qwen2-VL and Qwen2.5-VL; combine before the transformers class."""

    cafe_image_placeholder: str = "<|vision_start|><|image_pad|><|vision_end|>"
    cafe_video_placeholder: str = "<|vision_start|><|video_pad|><|vision_end|>"
    cafe_vision_modules: tuple[str, ...] = ("visual",)
    # The projector (patch merger) lives inside the vision module: `visual.merger`.
    cafe_projector_modules: tuple[str, ...] = ("merger",)
    # Provided by the model class this mixin is combined with.
    model: Any
    config: Any
    dtype: torch.dtype

    def get_vision_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        **unused: Any,
    ) -> dict[str, Any]:
        """Images: ``pixel_values [patches, dim]`` with ``image_grid_thw [images, 3]``; videos:
        ``pixel_values_videos [patches, dim]`` with ``video_grid_thw [videos, 3]`` (and
        ``second_per_grid_ts [videos]`` from a Qwen2.5-VL processor)."""
        features: dict[str, Any] = {}
        # transformers annotates pooler_output as one tensor; these features hold one chunk per image / video.
        if pixel_values is not None:
            outputs = self.model.get_image_features(pixel_values.to(self.dtype), image_grid_thw, return_dict=True)
            features["image"] = QwenImageFeatures(
                pooler_output=tuple(outputs.pooler_output),  # type: ignore[arg-type]
                image_grid_thw=image_grid_thw,
            )
        if pixel_values_videos is not None:
            outputs = self.model.get_video_features(
                pixel_values_videos.to(self.dtype), video_grid_thw, return_dict=True
            )
            features["video"] = QwenVideoFeatures(
                pooler_output=tuple(outputs.pooler_output),  # type: ignore[arg-type]
                video_grid_thw=video_grid_thw,
                second_per_grid_ts=second_per_grid_ts,
            )
        return features

    def select_vision_features(
        self, features: dict[str, Any], index: torch.Tensor, modality: str = "image"
    ) -> dict[str, Any]:
        selected = features[modality]
        grid = getattr(selected, f"{modality}_grid_thw", None)
        if grid is None:
            raise ValueError(_MISSING_GRID)
        chunks = [selected.pooler_output[i] for i in index.tolist()]
        index = index.to(grid.device)
        if modality == "video":
            seconds = selected.second_per_grid_ts
            return {
                "video": QwenVideoFeatures(
                    pooler_output=chunks,  # type: ignore[arg-type]
                    video_grid_thw=grid[index],
                    second_per_grid_ts=None if seconds is None else seconds[index.to(seconds.device)],
                )
            }
        return {"image": QwenImageFeatures(pooler_output=chunks, image_grid_thw=grid[index])}  # type: ignore[arg-type]

    def embedding_position_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **unused: Any,
    ) -> torch.Tensor:
        """M-RoPE position ids ``[3, batch, seq]`` of sequences showing the images of ``image_grid_thw``
        and the videos of ``video_grid_thw`` (or of ``mm_encoder_outputs``) in order; padding
        positions are ignored."""
        if mm_encoder_outputs is not None:
            if mm_encoder_outputs.get("image") is not None and image_grid_thw is None:
                image_grid_thw = getattr(mm_encoder_outputs["image"], "image_grid_thw", None)
                if image_grid_thw is None:
                    raise ValueError(_MISSING_GRID)
            if mm_encoder_outputs.get("video") is not None and video_grid_thw is None:
                video = mm_encoder_outputs["video"]
                video_grid_thw = getattr(video, "video_grid_thw", None)
                if video_grid_thw is None:
                    raise ValueError(_MISSING_GRID)
                second_per_grid_ts = video.second_per_grid_ts
        # What the processor returns as `mm_token_type_ids`: 1 on image tokens, 2 on video tokens.
        token_types = (input_ids == self.config.image_token_id).int()
        token_types = token_types + 2 * (input_ids == self.config.video_token_id).int()
        for kind, value, grid in (("image", 1, image_grid_thw), ("video", 2, video_grid_thw)):
            if grid is None and bool((token_types == value).any()):
                raise ValueError(
                    f"These sequences hold {kind} tokens but no {kind}_grid_thw was given: pass the processor's "
                    f"{kind}_grid_thw (or features from get_vision_features) to compute M-RoPE positions."
                )
        extra = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts}
        position_ids, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids=token_types,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
            **extra,
        )
        return position_ids

    def inputs_after_cached_images(self, inputs: dict[str, Any], cached_images: int) -> dict[str, Any]:
        """As the base hook, for the flat patch tensor, plus the prompt's M-RoPE positions.

        The stock ``generate`` computes M-RoPE positions from the whole prompt only when it runs the
        whole prompt; behind a prefilled cache it would continue 1-D positions (or need grids of
        images it no longer gets). So the positions of the whole prompt are computed here, with
        every image's grid, and passed as ``position_ids`` ``[4, 1, seq]`` (text positions first,
        as the stock ``generate`` lays them out); ``generate`` keeps the uncached part and extends
        it while decoding. ``pixel_values`` loses the cached images' patches (``t * h * w`` rows
        each) and ``image_grid_thw`` their rows.
        """
        inputs = dict(inputs)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        grid = inputs.get("image_grid_thw")
        spatial = self.embedding_position_ids(
            input_ids,
            attention_mask,
            image_grid_thw=grid,
            video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
        )
        text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        inputs["position_ids"] = torch.cat([text[None], spatial.to(text.device)], dim=0)
        if grid is not None and cached_images:
            if grid.shape[0] < cached_images:
                raise ValueError(
                    f"image_grid_thw has {grid.shape[0]} rows for {cached_images} cached images: pass the processor's "
                    "output for the whole prompt."
                )
            skipped = int(grid[:cached_images].prod(-1).sum())
            inputs["pixel_values"] = inputs["pixel_values"][skipped:]
            inputs["image_grid_thw"] = grid[cached_images:]
            if inputs["image_grid_thw"].shape[0] == 0:
                inputs["pixel_values"] = inputs["image_grid_thw"] = None
        return {k: v for k, v in inputs.items() if v is not None}


_MISSING_GRID = (
    "Qwen2-VL vision features must carry their image_grid_thw / video_grid_thw (for the M-RoPE positions): compute "
    "them with model.get_vision_features(pixel_values=..., image_grid_thw=...) (or pixel_values_videos=..., "
    "video_grid_thw=...) rather than model.model.get_image_features / get_video_features."
)


class CafeQwen2VLForConditionalGeneration(_QwenVLMixin, CafeForConditionalGeneration, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with CAFe embeddings. Weights, forward and ``generate`` are the stock ones."""


class CafeQwen2_5_VLForConditionalGeneration(
    _QwenVLMixin, CafeForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
):
    """Qwen2.5-VL with CAFe embeddings. Weights, forward and ``generate`` are the stock ones."""


inherit_checkpoint_conversion(CafeQwen2VLForConditionalGeneration, Qwen2VLForConditionalGeneration, "qwen2_vl")
inherit_checkpoint_conversion(CafeQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, "qwen2_5_vl")
