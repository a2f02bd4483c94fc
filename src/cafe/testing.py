"""Tiny, offline checkpoints for tests, the demo and benchmarks.

Nothing here downloads anything: the tokenizer is trained on the spot with the ``tokenizers``
library, and the model and processor are built from stock transformers classes and configs, then
written with the real ``save_pretrained`` so that every consumer goes through ``from_pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionProcessor,
        PreTrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
        ProcessorMixin,
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLProcessor,
    )

    from .batch import CafeBatch

# ChatML, as in Qwen2 / LLaVA-OneVision. Kept small on purpose: this is the *generation* template
# of the tiny checkpoints; CAFe's embedding template lives in `cafe.prompting`.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# A small English corpus so that the byte-level BPE learns real merges for the words the
# bundled data and the prompts use; any text tokenizes (byte fallback) even if not seen here.
_CORPUS_WORDS = (
    "you are a helpful assistant system user compress this image sentence in one word "
    "describe the picture what is shown is there a an yes no of on at with and red green blue "
    "yellow purple orange white black gray circle square triangle small large big left right top "
    "bottom center middle one two three four shapes shape colour color background image shows "
    "question answer caption photo of how many objects object"
).split()


def train_tiny_tokenizer(
    vocab_size: int = 512,
    special_tokens: list[str] | None = None,
    extra_special_tokens: dict[str, str] | None = None,
    chat_template: str = CHATML_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ChatML specials and wrap it for transformers.

    Args:
        vocab_size: Size of the learned vocabulary (special tokens included).
        special_tokens: The family's special tokens; defaults to LLaVA-OneVision's (`SPECIAL_TOKENS`).
        extra_special_tokens: Named special tokens (``image_token`` ...) the processor reads from
            the tokenizer; defaults to LLaVA-OneVision's.
        chat_template: The family's generation chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if special_tokens is None:
        special_tokens = SPECIAL_TOKENS
    if extra_special_tokens is None:
        extra_special_tokens = {"image_token": "<image>", "video_token": "<video>"}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = [" ".join(_CORPUS_WORDS[i:] + _CORPUS_WORDS[:i]) for i in range(len(_CORPUS_WORDS))]
    tok.train_from_iterator(sentences, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra_special_tokens,
        model_max_length=4096,
        padding_side="right",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llava_onevision_processor(
    image_size: int = 32, tokenizer: PreTrainedTokenizerBase | None = None
) -> LlavaOnevisionProcessor:
    """The real `LlavaOnevisionProcessor` (image + video processors) at a small image size."""
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = tokenizer if tokenizer is not None else train_tiny_tokenizer()
    size = {"height": image_size, "width": image_size}
    image_processor = LlavaOnevisionImageProcessor(
        size=size,
        crop_size=size,
        # One base crop plus one anyres tile keeps the real packing code path (unpadding and the
        # newline token) while the sequences stay short.
        image_grid_pinpoints=[[image_size, image_size]],
    )
    video_processor = LlavaOnevisionVideoProcessor(size=size, crop_size=size)
    patch = 8
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(image_size // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHATML_TEMPLATE,
    )


def tiny_llava_onevision_config(
    tokenizer: PreTrainedTokenizerBase, image_size: int = 32, hidden_size: int = 64, num_layers: int = 2
) -> LlavaOnevisionConfig:
    """A `LlavaOnevisionConfig` with a tiny SigLIP vision tower and a tiny Qwen2 language model."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),  # type: ignore[arg-type]  # one token: an int (typed int | list[int])
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),  # type: ignore[arg-type]  # one token: an int (typed int | list[int])
        image_grid_pinpoints=[[image_size, image_size]],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def build_tiny_llava_onevision(path: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny stock LLaVA-OneVision checkpoint (model + processor) to `path` and return it.

    The folder is what `llava-hf/llava-onevision-*` repos look like, so anything that works on it
    runs the same code as on a real checkpoint.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    processor = tiny_llava_onevision_processor(image_size=image_size)
    config = tiny_llava_onevision_config(processor.tokenizer, image_size=image_size)
    return save_tiny_checkpoint(path, LlavaOnevisionForConditionalGeneration, config, processor, seed)


# ----------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
# The generation chat template of Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct (both ship the
# same one): ChatML, and an image is <|vision_start|><|image_pad|><|vision_end|> with no newline.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The special tokens of the Qwen2 tokenizer that the VL models use.
QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_QWEN_PATCH = 8  # vision patch size of the tiny Qwen checkpoints (the real ones use 14)
_QWEN_MERGE = 2  # spatial merge size (as in the real ones): 2x2 patches become one LLM token


def train_tiny_qwen2_vl_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A tiny Qwen2-style tokenizer: ChatML, the vision special tokens, the Qwen2-VL chat template.

    Like the real Qwen2 tokenizer it names no ``image_token``; `Qwen2VLProcessor` then uses
    ``<|image_pad|>``.
    """
    return train_tiny_tokenizer(
        vocab_size,
        special_tokens=QWEN2_VL_SPECIAL_TOKENS,
        extra_special_tokens={},
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def tiny_qwen2_vl_processor(
    tokenizer: PreTrainedTokenizerBase | None = None, min_pixels: int = 32 * 32, max_pixels: int = 48 * 48
) -> Qwen2VLProcessor:
    """The real `Qwen2VLProcessor` (also Qwen2.5-VL's processor class) at a small image size.

    Images are resized to multiples of 16 pixels (patch 8 x merge 2) with 1024-2304 pixels, so an
    image becomes 4-9 LLM tokens and images of different shapes get different grids.
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = tokenizer if tokenizer is not None else train_tiny_qwen2_vl_tokenizer()
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    common: dict[str, Any] = dict(size=size, patch_size=_QWEN_PATCH, merge_size=_QWEN_MERGE, temporal_patch_size=2)
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**common),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def _tiny_qwen_text_kwargs(
    tokenizer: PreTrainedTokenizerBase, hidden_size: int, num_layers: int, tie_word_embeddings: bool
) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # M-RoPE: the rotary half-dimension (head_dim 16 -> 8) split into temporal/height/width.
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
    )


def _tiny_qwen_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def tiny_qwen2_vl_config(
    tokenizer: PreTrainedTokenizerBase, hidden_size: int = 64, num_layers: int = 2, tie_word_embeddings: bool = True
) -> Qwen2VLConfig:
    """A `Qwen2VLConfig` with a tiny vision transformer and a tiny Qwen2 language model.

    Tied input/output embeddings by default, as in Qwen2-VL-2B (the 7B unties them).
    """
    from transformers import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig

    vision = Qwen2VLVisionConfig(
        depth=2,
        embed_dim=32,
        hidden_size=hidden_size,  # the merger projects to the LLM width
        mlp_ratio=2,
        num_heads=2,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=2,
    )
    text = Qwen2VLTextConfig(**_tiny_qwen_text_kwargs(tokenizer, hidden_size, num_layers, tie_word_embeddings))
    return Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        tie_word_embeddings=tie_word_embeddings,
        **_tiny_qwen_token_ids(tokenizer),
    )


def tiny_qwen2_5_vl_config(
    tokenizer: PreTrainedTokenizerBase, hidden_size: int = 64, num_layers: int = 2, tie_word_embeddings: bool = False
) -> Qwen2_5_VLConfig:
    """A `Qwen2_5_VLConfig`: tiny windowed-attention vision transformer (one full-attention block)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig

    vision = Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=hidden_size,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=_QWEN_MERGE,
        temporal_patch_size=2,
        # Windows of 2x2 merged tokens (window_size is in pixels: 2 * merge * patch), so the
        # window permutation is exercised; block 1 attends over the whole image.
        window_size=2 * _QWEN_MERGE * _QWEN_PATCH,
        fullatt_block_indexes=[1],
    )
    text = Qwen2_5_VLTextConfig(**_tiny_qwen_text_kwargs(tokenizer, hidden_size, num_layers, tie_word_embeddings))
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        tie_word_embeddings=tie_word_embeddings,
        **_tiny_qwen_token_ids(tokenizer),
    )


def save_tiny_checkpoint(
    path: str | os.PathLike,
    model_class: type[PreTrainedModel],
    config: PreTrainedConfig,
    processor: ProcessorMixin,
    seed: int = 0,
) -> Path:
    """Initialise `model_class(config)` with `seed` and save it with `processor` and a greedy generation config."""
    from transformers import GenerationConfig

    path = Path(path)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config = GenerationConfig(
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_qwen2_vl(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny stock Qwen2-VL checkpoint (model + processor) to `path`, laid out like `Qwen/Qwen2-VL-*`."""
    from transformers import Qwen2VLForConditionalGeneration

    processor = tiny_qwen2_vl_processor()
    config = tiny_qwen2_vl_config(processor.tokenizer)
    return save_tiny_checkpoint(path, Qwen2VLForConditionalGeneration, config, processor, seed)


def build_tiny_qwen2_5_vl(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny stock Qwen2.5-VL checkpoint (model + processor) to `path`, laid out like `Qwen/Qwen2.5-VL-*`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = tiny_qwen2_vl_processor()
    config = tiny_qwen2_5_vl_config(processor.tokenizer)
    return save_tiny_checkpoint(path, Qwen2_5_VLForConditionalGeneration, config, processor, seed)


# model_type -> builder; every family of `cafe.backbones` has one (tests run over all of them).
_BUILDERS = {
    "llava_onevision": build_tiny_llava_onevision,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
}
TINY_FAMILIES = tuple(_BUILDERS)


def batch_image_count(batch: Mapping[str, Any] | CafeBatch) -> int:
    """How many images the pixel tensors of a processor batch / `CafeBatch` hold, for any family.

    LLaVA-OneVision stacks images (``pixel_values [n, crops, 3, H, W]``); Qwen2-VL concatenates their
    patches (``pixel_values [sum of patches, dim]``) and lists one ``image_grid_thw`` row per image.
    """
    from .batch import CafeBatch

    if isinstance(batch, CafeBatch):
        batch = batch.vision
    if "image_grid_thw" in batch:
        return int(batch["image_grid_thw"].shape[0])
    return int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 0


def build_tiny_checkpoint(path: str | os.PathLike, family: str = "llava_onevision", seed: int = 0) -> Path:
    """Build the tiny checkpoint of a supported backbone family (see `cafe.backbones`).

    Args:
        path: Folder to write (created if needed).
        family: A ``model_type`` of `TINY_FAMILIES`: ``"llava_onevision"``, ``"qwen2_vl"`` or
            ``"qwen2_5_vl"``.
        seed: Seed of the random weights.
    """
    if family not in _BUILDERS:
        raise ValueError(f"No tiny checkpoint builder for family {family!r}; available: {sorted(_BUILDERS)}")
    return _BUILDERS[family](path, seed=seed)


# ----------------------------------------------------------------------------- released-format fixtures
# The tiny checkpoints above shrink the processing as well as the model (32 px images, a handful of
# image tokens, a ChatML template with a system turn for every family). The fixtures below keep
# the *processing* of the released checkpoints (chat template, image processor config, hence the
# real number of image tokens per image) and shrink only the model (tiny widths, 1-2 layers), so
# sequence lengths, truncation and padding are those users get. The tokenizer is still trained on
# the spot (its vocabulary is tiny; the text tokens differ from Qwen2's, the special tokens do not).

# The chat template of the llava-hf LLaVA-OneVision checkpoints (`llava-hf/llava-onevision-qwen2-*-hf`):
# the `chat_template` variable of transformers' conversion script
# src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py, verbatim (split
# over lines here; the joined string is the script's), which the script passes to the
# `LlavaOnevisionProcessor` it saves. Unlike `CHATML_TEMPLATE` it adds no system turn, renders a
# message's images first (``<image>\n`` each), then its videos, then its text, and wraps assistant
# text in ``{% generation %}`` (for ``return_assistant_tokens_mask``).
LLAVA_HF_LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# anyres grid of the llava-hf checkpoints: every (height, width) multiple of 384 up to 2304, i.e. up
# to 6x6 tiles. The same list is `LlavaOnevisionImageProcessor`'s and `LlavaOnevisionConfig`'s default.
LLAVA_ONEVISION_IMAGE_GRID_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
_LLAVA_ONEVISION_IMAGE_SIZE = 384  # SigLIP-so400m-patch14-384
_LLAVA_ONEVISION_PATCH = 14
# The llava-hf image/video processors were loaded from google/siglip-so400m-patch14-384, so they
# normalise with SigLIP's mean/std (0.5), not the class default (CLIP's). Token counts don't depend on it.
_SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]


def llava_hf_llava_onevision_processor(tokenizer: PreTrainedTokenizerBase | None = None) -> LlavaOnevisionProcessor:
    """The `LlavaOnevisionProcessor` of the llava-hf checkpoints, with a tiny trained tokenizer.

    Real: the chat template (`LLAVA_HF_LLAVA_ONEVISION_CHAT_TEMPLATE`), 384 px crops, the full anyres
    grid (`LLAVA_ONEVISION_IMAGE_GRID_PINPOINTS`), SigLIP normalisation, ``num_image_tokens=729``
    (27x27 patches of 14 px per crop), ``vision_feature_select_strategy="full"`` and
    ``vision_aspect_ratio="anyres_max_9"``, as the conversion script writes them. So one image costs
    its real number of tokens: 1,485 for 384x384, 2,929 for 640x480, 4,725 for 1024x768, 7,269 for
    1920x1080.
    """
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    if tokenizer is None:
        tokenizer = train_tiny_tokenizer(chat_template=LLAVA_HF_LLAVA_ONEVISION_CHAT_TEMPLATE)
        # Long image prompts are normal here (7,269 image tokens for a 1920x1080 photo): allow the
        # model's whole context, so the tokenizer does not warn about sequences the model accepts.
        tokenizer.model_max_length = 32768
    size = {"height": _LLAVA_ONEVISION_IMAGE_SIZE, "width": _LLAVA_ONEVISION_IMAGE_SIZE}
    normalisation: dict[str, Any] = dict(image_mean=_SIGLIP_MEAN_STD, image_std=_SIGLIP_MEAN_STD)
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=LLAVA_ONEVISION_IMAGE_GRID_PINPOINTS, **normalisation
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size, **normalisation),
        num_image_tokens=(_LLAVA_ONEVISION_IMAGE_SIZE // _LLAVA_ONEVISION_PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=LLAVA_HF_LLAVA_ONEVISION_CHAT_TEMPLATE,
    )


def llava_hf_llava_onevision_config(
    tokenizer: PreTrainedTokenizerBase, hidden_size: int = 64, num_layers: int = 2
) -> LlavaOnevisionConfig:
    """A `LlavaOnevisionConfig` laid out like llava-hf's, with tiny widths and depths.

    Real: the SigLIP geometry (384 px, patch 14: 729 features per crop, no pooling head), the anyres
    grid, ``vision_feature_select_strategy="full"``, ``vision_feature_layer=-1``,
    ``vision_aspect_ratio="anyres_max_9"`` and Qwen2-0.5B's context (32,768 positions, RoPE theta
    1e6), so the model accepts exactly the sequences the processor makes. Tiny: a 1-layer SigLIP of
    width 32 and a Qwen2 of width `hidden_size` with `num_layers` layers (the 0.5B has 26 + 24).
    """
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=_LLAVA_ONEVISION_IMAGE_SIZE,
        patch_size=_LLAVA_ONEVISION_PATCH,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),  # type: ignore[arg-type]  # one token: an int (typed int | list[int])
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),  # type: ignore[arg-type]  # one token: an int (typed int | list[int])
        image_grid_pinpoints=LLAVA_ONEVISION_IMAGE_GRID_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def build_llava_hf_llava_onevision(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny LLaVA-OneVision checkpoint in the llava-hf released format to `path` and return it.

    Real: what `llava-hf/llava-onevision-qwen2-*-ov-hf` ship for processing: the chat template
    (no system turn, ``<image>\\n`` before the text), the image processor config (384 px crops, anyres
    grid up to 2304 px, anyres_max_9) and so the image token counts (1,485 / 2,929 / 4,725 / 7,269
    for 384x384 / 640x480 / 1024x768 / 1920x1080), and the vision geometry of the model (SigLIP 384
    px, patch 14). Shrunk: the widths and depths (SigLIP 32 wide, 1 layer; Qwen2 64 wide, 2 layers)
    and the tokenizer's vocabulary (512, trained on the spot).
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    processor = llava_hf_llava_onevision_processor()
    config = llava_hf_llava_onevision_config(processor.tokenizer)
    return save_tiny_checkpoint(path, LlavaOnevisionForConditionalGeneration, config, processor, seed)


# Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct ship the same processor chat template (their
# chat_template.json), which is `QWEN2_VL_CHAT_TEMPLATE` verbatim. (Qwen2.5-VL's tokenizer_config.json
# carries another one, the Qwen2.5 template with tool calls; the processor does not use it.)
QWEN2_5_VL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE

# The image processor settings of the released Instruct checkpoints (preprocessor_config.json):
# patch 14, 2x2 merge, temporal patch 2, and pixel bounds min_pixels=3136, max_pixels=12845056.
# max_pixels is 28*28*16384 (a 3584x3584 image, 16,384 LLM tokens), not 28*28*1280 = 1,003,520:
# the latter is `Qwen2VLImageProcessor`'s class default and the model cards' suggested setting,
# which users opt into with `max_pixels=`; the checkpoints themselves ship the larger bound.
QWEN2_VL_PATCH_SIZE = 14
QWEN2_VL_MERGE_SIZE = 2
QWEN2_VL_TEMPORAL_PATCH_SIZE = 2
QWEN2_VL_MIN_PIXELS = 56 * 56
QWEN2_VL_MAX_PIXELS = 28 * 28 * 16384

# Per family: (processor class, template, the text model's context as released).
_RELEASED_QWEN = {
    "qwen2_vl": ("Qwen2VLProcessor", QWEN2_VL_CHAT_TEMPLATE, 32768),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", QWEN2_5_VL_CHAT_TEMPLATE, 128000),
}


def released_qwen2_vl_processor(
    family: str = "qwen2_vl",
    tokenizer: PreTrainedTokenizerBase | None = None,
    min_pixels: int = QWEN2_VL_MIN_PIXELS,
    max_pixels: int = QWEN2_VL_MAX_PIXELS,
) -> Qwen2VLProcessor | Qwen2_5_VLProcessor:
    """The processor of `Qwen/Qwen2-VL-*-Instruct` (``family="qwen2_vl"``) or `Qwen/Qwen2.5-VL-*-Instruct`
    (``"qwen2_5_vl"``), with a tiny trained tokenizer.

    Real: the processor class (`Qwen2VLProcessor` / `Qwen2_5_VLProcessor`), the chat template (default
    system turn "You are a helpful assistant.", ``<|vision_start|><|image_pad|><|vision_end|>``) and
    the image processor settings (patch 14, merge 2, temporal patch 2, 3136-12845056 pixels), so an
    image gets its real grid and token count (196 for 384x384, 391 for 640x480, 999 for 1024x768,
    2,691 for 1920x1080). Videos use `Qwen2VLVideoProcessor`'s defaults (same patching).

    Args:
        family: ``"qwen2_vl"`` or ``"qwen2_5_vl"``.
        tokenizer: Defaults to a tiny trained one with the family's special tokens and template.
        min_pixels, max_pixels: Pixel bounds of a resized image; the released values by default.
            ``max_pixels=1280 * 28 * 28`` is the model cards' suggested cheaper setting.
    """
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    processor_class, template, context = _RELEASED_QWEN[family]
    if tokenizer is None:
        tokenizer = train_tiny_tokenizer(
            special_tokens=QWEN2_VL_SPECIAL_TOKENS, extra_special_tokens={}, chat_template=template
        )
        tokenizer.model_max_length = context  # see llava_hf_llava_onevision_processor
    patching: dict[str, Any] = dict(
        patch_size=QWEN2_VL_PATCH_SIZE, merge_size=QWEN2_VL_MERGE_SIZE, temporal_patch_size=QWEN2_VL_TEMPORAL_PATCH_SIZE
    )
    return getattr(transformers, processor_class)(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **patching),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**patching),
        chat_template=template,
    )


def _released_qwen_text_kwargs(
    tokenizer: PreTrainedTokenizerBase, family: str, hidden_size: int, num_layers: int
) -> dict[str, Any]:
    kwargs = _tiny_qwen_text_kwargs(tokenizer, hidden_size, num_layers, tie_word_embeddings=False)
    # The released context and RoPE base; M-RoPE sections stay scaled to the tiny head_dim (16).
    kwargs["max_position_embeddings"] = _RELEASED_QWEN[family][2]
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}
    return kwargs


def released_qwen2_vl_config(
    tokenizer: PreTrainedTokenizerBase, family: str = "qwen2_vl", hidden_size: int = 64, num_layers: int = 2
) -> Qwen2VLConfig | Qwen2_5_VLConfig:
    """A `Qwen2VLConfig` / `Qwen2_5_VLConfig` with the released vision geometry and tiny widths.

    Real: patch 14, spatial merge 2, temporal patch 2 (so the model consumes the processor's real
    grids), the released context length and RoPE base; for Qwen2.5-VL, the 112 px attention window
    with full attention in the last block. Tiny: a 2-block vision transformer 32 wide and a Qwen2 of
    width `hidden_size` with `num_layers` layers (the released ones: 32 vision blocks 1280 wide).
    Embeddings untied, as in the 7B checkpoints.
    """
    import transformers

    prefix = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL"}[family]
    patching: dict[str, Any] = dict(
        patch_size=QWEN2_VL_PATCH_SIZE,
        spatial_merge_size=QWEN2_VL_MERGE_SIZE,
        temporal_patch_size=QWEN2_VL_TEMPORAL_PATCH_SIZE,
    )
    vision: transformers.PreTrainedConfig
    if family == "qwen2_vl":
        vision = transformers.Qwen2VLVisionConfig(
            depth=2, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2, num_heads=2, **patching
        )
    else:
        vision = transformers.Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden_size,
            # As released: 112 px windows (4x4 merged tokens); the last block attends over the whole
            # image, as blocks 7, 15, 23 and 31 of the released 32 do.
            window_size=112,
            fullatt_block_indexes=[1],
            **patching,
        )
    text = getattr(transformers, f"{prefix}TextConfig")(
        **_released_qwen_text_kwargs(tokenizer, family, hidden_size, num_layers)
    )
    return getattr(transformers, f"{prefix}Config")(
        vision_config=vision, text_config=text, tie_word_embeddings=False, **_tiny_qwen_token_ids(tokenizer)
    )


def _build_released_qwen(path: str | os.PathLike, family: str, seed: int) -> Path:
    import transformers

    processor = released_qwen2_vl_processor(family)
    config = released_qwen2_vl_config(processor.tokenizer, family)
    model_class = {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    }[family]
    return save_tiny_checkpoint(path, model_class, config, processor, seed)


def build_released_qwen2_vl(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny Qwen2-VL checkpoint in the released `Qwen/Qwen2-VL-*-Instruct` format to `path`.

    Real: the chat template (`QWEN2_VL_CHAT_TEMPLATE`, with its default system turn), the image
    processor settings (patch 14, merge 2, temporal 2, min_pixels 3136, max_pixels 12845056) and so
    the token counts (196 / 391 / 999 / 2,691 for 384x384 / 640x480 / 1024x768 / 1920x1080), and the
    model's vision geometry. Shrunk: widths and depths (vision 32 wide, 2 blocks; Qwen2 64 wide, 2
    layers) and the tokenizer's vocabulary.
    """
    return _build_released_qwen(path, "qwen2_vl", seed)


def build_released_qwen2_5_vl(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint in the released `Qwen/Qwen2.5-VL-*-Instruct` format to `path`.

    Real: `Qwen2_5_VLProcessor`, the chat template (the same as Qwen2-VL's), the image processor
    settings and token counts (as `build_released_qwen2_vl`), the vision geometry including the
    112 px attention windows. Shrunk: widths and depths, the tokenizer's vocabulary.
    """
    return _build_released_qwen(path, "qwen2_5_vl", seed)


# model_type -> builder of the released-format fixture (see the section comment above).
RELEASED_FORMAT_BUILDERS = {
    "llava_onevision": build_llava_hf_llava_onevision,
    "qwen2_vl": build_released_qwen2_vl,
    "qwen2_5_vl": build_released_qwen2_5_vl,
}
RELEASED_FORMAT_FAMILIES = tuple(RELEASED_FORMAT_BUILDERS)


def build_released_format_checkpoint(path: str | os.PathLike, family: str = "llava_onevision", seed: int = 0) -> Path:
    """Build the released-format fixture of a backbone family: tiny model, real processing.

    Unlike `build_tiny_checkpoint`, the folder carries what the released checkpoints ship for
    processing (chat template, image processor config) and so their image token counts, which run
    into the thousands per image; only the model's widths and depths (and the tokenizer's
    vocabulary) shrink. Use it where sequence lengths matter (truncation, batching, memory); use
    `build_tiny_checkpoint` for everything else, it is much faster.

    Args:
        path: Folder to write (created if needed).
        family: A ``model_type`` of `RELEASED_FORMAT_FAMILIES`: ``"llava_onevision"`` (llava-hf
            format), ``"qwen2_vl"`` or ``"qwen2_5_vl"`` (Qwen's Instruct releases).
        seed: Seed of the random weights.
    """
    if family not in RELEASED_FORMAT_BUILDERS:
        raise ValueError(
            f"No released-format builder for family {family!r}; available: {sorted(RELEASED_FORMAT_BUILDERS)}"
        )
    return RELEASED_FORMAT_BUILDERS[family](path, seed=seed)


def tiny_text_language_model(hidden_size: int = 32, tie_word_embeddings: bool = True) -> tuple[Any, Any]:
    """A tiny text-only Llama and its trained ChatML tokenizer (no image tokens), as a pretrained
    causal LM stands for in `cafe.composition` (SmolLM2 in the real-LM example)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tiny_tokenizer(
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], extra_special_tokens={}
    )
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(end, int)  # one token: an int (typed int | list[int])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=end,
        eos_token_id=end,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer
