"""Tiny, offline checkpoints for tests, the demo and benchmarks.

Nothing here downloads anything: the tokenizer is trained on the spot with the ``tokenizers``
library, and the model and processor are built from stock transformers classes and configs, then
written with the real ``save_pretrained`` so that every consumer goes through ``from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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
):
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


def tiny_llava_onevision_processor(image_size: int = 32, tokenizer=None):
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


def tiny_llava_onevision_config(tokenizer, image_size: int = 32, hidden_size: int = 64, num_layers: int = 2):
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
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
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


def train_tiny_qwen2_vl_tokenizer(vocab_size: int = 512):
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


def tiny_qwen2_vl_processor(tokenizer=None, min_pixels: int = 32 * 32, max_pixels: int = 48 * 48):
    """The real `Qwen2VLProcessor` (also Qwen2.5-VL's processor class) at a small image size.

    Images are resized to multiples of 16 pixels (patch 8 x merge 2) with 1024-2304 pixels, so an
    image becomes 4-9 LLM tokens and images of different shapes get different grids.
    """
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = tokenizer if tokenizer is not None else train_tiny_qwen2_vl_tokenizer()
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    common = dict(size=size, patch_size=_QWEN_PATCH, merge_size=_QWEN_MERGE, temporal_patch_size=2)
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**common),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def _tiny_qwen_text_kwargs(tokenizer, hidden_size: int, num_layers: int) -> dict:
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
    )


def _tiny_qwen_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def tiny_qwen2_vl_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, tie_word_embeddings: bool = True):
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
    text = Qwen2VLTextConfig(**_tiny_qwen_text_kwargs(tokenizer, hidden_size, num_layers), tie_word_embeddings=tie_word_embeddings)
    return Qwen2VLConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=tie_word_embeddings, **_tiny_qwen_token_ids(tokenizer)
    )


def tiny_qwen2_5_vl_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, tie_word_embeddings: bool = False):
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
    text = Qwen2_5_VLTextConfig(
        **_tiny_qwen_text_kwargs(tokenizer, hidden_size, num_layers), tie_word_embeddings=tie_word_embeddings
    )
    return Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, tie_word_embeddings=tie_word_embeddings, **_tiny_qwen_token_ids(tokenizer)
    )


def save_tiny_checkpoint(path, model_class, config, processor, seed: int = 0) -> Path:
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


def batch_image_count(batch) -> int:
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
