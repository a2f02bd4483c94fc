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


def train_tiny_tokenizer(vocab_size: int = 512):
    """Train a byte-level BPE tokenizer with ChatML specials and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = [" ".join(_CORPUS_WORDS[i:] + _CORPUS_WORDS[:i]) for i in range(len(_CORPUS_WORDS))]
    tok.train_from_iterator(sentences, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        model_max_length=4096,
        padding_side="right",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
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
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    path = Path(path)
    processor = tiny_llava_onevision_processor(image_size=image_size)
    config = tiny_llava_onevision_config(processor.tokenizer, image_size=image_size)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


_BUILDERS = {"llava_onevision": build_tiny_llava_onevision}


def build_tiny_checkpoint(path: str | os.PathLike, family: str = "llava_onevision", seed: int = 0) -> Path:
    """Build the tiny checkpoint of a supported backbone family (see `cafe.backbones`)."""
    if family not in _BUILDERS:
        raise ValueError(f"No tiny checkpoint builder for family {family!r}; available: {sorted(_BUILDERS)}")
    return _BUILDERS[family](path, seed=seed)
