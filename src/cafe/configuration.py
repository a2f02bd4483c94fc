"""CAFe settings: everything that makes a VLM a CAFe model, independent of the backbone family.

The settings are stored as a plain dict under ``config.cafe`` in the backbone's own
``config.json``, so the checkpoint stays a stock transformers checkpoint (stock classes keep the
extra key as an attribute and ignore it) and `CafeForConditionalGeneration` restores them on load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Strings of the reference implementation (see shared/reference-notes.md). The paper's Table 1
# writes the prompt with "!", the released code uses ":"; we follow the code.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_IMAGE_PROMPT = "Compress this image in one word:"
DEFAULT_TEXT_PROMPT = "Compress this sentence in one word:"
# Not in the paper (video is its future work): the image prompt with "video".
DEFAULT_VIDEO_PROMPT = "Compress this video in one word:"
# Multimodal (MMEB) mode of the reference: image + text in the user turn, no "Compress" suffix.
DEFAULT_MULTIMODAL_PROMPT = ""

POOLING_MODES = ("last_token",)
# A PEFT adapter folder has no config.json to carry ``config.cafe``: `CafeTrainer` writes the
# settings the adapter was trained with (prompts, learned temperature, Matryoshka sizes) into this
# file beside it, and `CafeForConditionalGeneration.from_pretrained(adapter_folder)` reads them back.
ADAPTER_SETTINGS_NAME = "cafe_settings.json"
# ... and the embedding rotation (fitted, or learned with `matryoshka_rotation`), which a full
# checkpoint stores as its sentence-transformers ``Dense`` module: one ``[D, D]`` tensor, "rotation".
ADAPTER_ROTATION_NAME = "cafe_embedding_rotation.safetensors"


@dataclass
class CafeSettings:
    """CAFe embedding and contrastive settings (saved in ``config.json`` under ``"cafe"``).

    Args:
        system_prompt: System message of the embedding conversation.
        image_prompt: Instruction appended after the image of an image-only input.
        text_prompt: Instruction appended directly (no separator) after a text-only input.
        multimodal_prompt: Instruction appended after image + text inputs (reference: none);
            also after video + text inputs.
        video_prompt: Instruction appended after the video of a video-only input.
        video_num_frames: Frames per video for backbones that take a fixed count
            (LLaVA-OneVision), uniformly spread over the clip (see `cafe.video`).
        video_fps: Frames per second for backbones that sample by rate (Qwen2-VL / Qwen2.5-VL,
            within their video processor's ``min_frames`` / ``max_frames``). Stored here because
            training, ``encode`` and evaluation must show a model the same frames.
        pooling: How a sequence becomes one vector. ``"last_token"``: last layer hidden state of
            the last non-padding token (the final ``<|im_end|>`` of the empty assistant turn).
        normalize: L2-normalise embeddings.
        contrastive_temperature: InfoNCE temperature tau (logit scale 1/tau). Reference: 0.05.
            Not called ``temperature``: transformers reads that config name as a generation setting.
        learnable_logit_scale: Learn log(1/tau) during training instead of keeping it fixed.
        max_text_chars: Longest text of an embedding input, in characters (``None``: no limit).
            The cut is made inside the embedding template (``text[:max_text_chars]``), so training,
            ``encode`` and the sentence-transformers export, which all render with that template,
            cut the same text the same way and the pooled token stays the template's last. In
            characters because a template cannot count tokens; 2,048 characters are ~500 English
            tokens.
        embedding_chat_template: Jinja template that renders an embedding conversation. ``None``
            means the backbone family's default (see `cafe.prompting.build_embedding_chat_template`).
            Written out in full when a model is created so the checkpoint is self-describing, and
            the sentence-transformers export renders with exactly this template.
        lm_chat_template: Jinja template that renders the LM (next-token) conversations of
            training: the reference's format (ChatML with the ``system_prompt`` turn) with the
            backbone family's image placeholder, whatever generation template the checkpoint
            ships (see `cafe.prompting.build_lm_chat_template`). ``None`` means the family's
            default; written out in full like ``embedding_chat_template``, so a checkpoint states
            what it was trained on.
        matryoshka_dims: The embedding sizes the model was trained to embed at (Matryoshka
            training, `cafe.losses.CafeLoss`'s ``matryoshka_dims``), largest first; ``None``: the
            full size only. Written by `CafeTrainer` when the loss trains them and exported to the
            sentence-transformers config; use a size with ``encode(..., truncate_dim=d)`` or
            ``SentenceTransformer(path, truncate_dim=d)``.
    """

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    image_prompt: str = DEFAULT_IMAGE_PROMPT
    text_prompt: str = DEFAULT_TEXT_PROMPT
    multimodal_prompt: str = DEFAULT_MULTIMODAL_PROMPT
    video_prompt: str = DEFAULT_VIDEO_PROMPT
    video_num_frames: int = 8
    video_fps: float = 2.0
    max_text_chars: int | None = 2048
    pooling: str = "last_token"
    normalize: bool = True
    contrastive_temperature: float = 0.05
    learnable_logit_scale: bool = False
    embedding_chat_template: str | None = field(default=None, repr=False)
    lm_chat_template: str | None = field(default=None, repr=False)
    matryoshka_dims: list[int] | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"Unknown pooling {self.pooling!r}; supported: {POOLING_MODES}.")
        if self.max_text_chars is not None and self.max_text_chars < 1:
            raise ValueError(f"max_text_chars must be >= 1 or None (no limit), got {self.max_text_chars}.")
        if self.video_num_frames < 1 or not self.video_fps > 0:
            raise ValueError(
                f"video_num_frames must be >= 1 and video_fps > 0, got {self.video_num_frames} and {self.video_fps}."
            )
        if not self.contrastive_temperature > 0:
            raise ValueError(
                f"contrastive_temperature must be > 0 (got {self.contrastive_temperature}); the reference uses 0.05."
            )
        if self.matryoshka_dims is not None:
            dims = [int(d) for d in self.matryoshka_dims]
            if not dims or any(d < 1 for d in dims) or len(set(dims)) != len(dims):
                raise ValueError(
                    f"matryoshka_dims must be distinct positive sizes or None, got {self.matryoshka_dims}."
                )
            self.matryoshka_dims = sorted(dims, reverse=True)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CafeSettings:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown CAFe settings {unknown} in config['cafe']; known settings: {sorted(known)}.")
        return cls(**data)
