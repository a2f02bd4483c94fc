"""Compose a LLaVA-OneVision checkpoint from a pretrained text-only language model.

LLaVA's recipe starts from a pretrained LLM, adds a vision tower and a new projector, and trains
the projector (stage 1) before instruction tuning. `compose_llava_onevision` does the assembly
step: it keeps every weight of the given causal LM (Llama, Qwen2, ... anything LLaVA-OneVision
accepts as ``text_config``), adds the ``<image>`` / ``<video>`` tokens to its tokenizer, builds a
SigLIP vision tower of the requested size and a freshly initialised projector, and saves an
ordinary ``LlavaOnevisionForConditionalGeneration`` folder with its processor. The result loads in
stock transformers, in `cafe.CafeForConditionalGeneration` and (after a CAFe save) in
sentence-transformers, like a released checkpoint.

It is how the real-LM experiment (``examples/reproduce_real_lm.py``) gets a VLM whose language
model is SmolLM2-135M-Instruct, offline: no pretrained vision tower ships on PyPI, so the tower
is initialised from its config and learns with the projector.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlavaOnevisionForConditionalGeneration, PreTrainedModel, PreTrainedTokenizerBase

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"


def chatml_vision_template(default_system_prompt: str) -> str:
    """A ChatML generation template that also renders LLaVA image / video content items.

    Text-only LMs such as SmolLM2 ship a ChatML template that only takes string contents; a VLM's
    processor renders ``{"type": "image"}`` items too. This is that template with the LM's own
    default system turn (added when a conversation starts without one) and llava-hf's placement
    of the placeholder (its own line, before the text).
    """
    system = default_system_prompt.replace("'", "\\'")
    return (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}"
        "{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\\n' }}"
        "{% elif content['type'] == 'video' %}{{ '" + VIDEO_TOKEN + "\\n' }}"
        "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def compose_llava_onevision(
    language_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    *,
    image_size: int = 48,
    patch_size: int = 8,
    vision_hidden_size: int = 128,
    vision_layers: int = 4,
    vision_heads: int = 4,
    default_system_prompt: str = "You are a helpful assistant.",
    seed: int = 0,
) -> Path:
    """Build a LLaVA-OneVision model around `language_model` and save it with its processor.

    Args:
        language_model: A pretrained ``*ForCausalLM`` (its body and LM head are copied unchanged).
        tokenizer: Its tokenizer; gets ``<image>`` and ``<video>`` as special tokens (the embedding
            matrix grows by those rows, initialised to the mean embedding as
            ``resize_token_embeddings`` does).
        output_dir: Where the checkpoint (model, processor, chat template) is written.
        image_size: Side of the base crop and of the one anyres tile, in pixels.
        patch_size: SigLIP patch side; an image costs ``2 * (image_size // patch_size) ** 2`` tokens
            plus one newline token per tile row.
        vision_hidden_size, vision_layers, vision_heads: Size of the SigLIP vision tower
            (initialised from its config: no pretrained tower is available offline).
        default_system_prompt: System turn the generation template adds when a conversation has
            none (the LM's own default, e.g. SmolLM2's).
        seed: Seed of the vision tower's and projector's initialisation.

    Returns:
        The checkpoint folder.
    """
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        SiglipVisionConfig,
    )

    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}).")
    tokenizer.add_tokens([IMAGE_TOKEN, VIDEO_TOKEN], special_tokens=True)
    # Copy the LM before resizing: the caller's model stays as it was.
    text_dict = language_model.config.to_dict()
    # A GGUF checkpoint loads de-quantised to float but keeps its quantization_config; carried
    # over, it would mark the composed model as quantised (Trainer then refuses to fine-tune it).
    text_dict.pop("quantization_config", None)
    text_config = language_model.config.__class__.from_dict(text_dict)
    text_config.vocab_size = len(tokenizer)
    vision_config = SiglipVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=4 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=_token_id(tokenizer, IMAGE_TOKEN),
        video_token_index=_token_id(tokenizer, VIDEO_TOKEN),
        image_grid_pinpoints=[[image_size, image_size]],
        # "full": every patch is an image token (SigLIP has no CLS token to drop).
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=bool(getattr(language_model.config, "tie_word_embeddings", False)),
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    _copy_language_model(language_model, model, len(tokenizer))

    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, crop_size=size, image_grid_pinpoints=[[image_size] * 2]
        ),
        video_processor=LlavaOnevisionVideoProcessor(size=size, crop_size=size),
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=chatml_vision_template(default_system_prompt),
    )
    output = Path(output_dir)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int):  # a list only when given a list
        raise TypeError(f"{token!r} maps to {token_id!r}, not one token id.")
    return token_id


def _copy_language_model(source: PreTrainedModel, target: LlavaOnevisionForConditionalGeneration, vocab: int) -> None:
    """Load `source`'s body and LM head into `target`, growing the vocabulary to `vocab` rows."""
    import torch

    body: Any = source.get_decoder() if hasattr(source, "get_decoder") else source.model
    state = {k: v.detach().clone() for k, v in body.state_dict().items()}
    old_embeddings = state["embed_tokens.weight"]
    state["embed_tokens.weight"] = _grow_rows(old_embeddings, vocab)
    missing, unexpected = target.model.language_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{type(source).__name__} does not fit LLaVA-OneVision's {type(target.model.language_model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    if not target.config.tie_word_embeddings:
        head = source.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(source).__name__} has no output embeddings (LM head) to copy.")
        with torch.no_grad():
            target.lm_head.weight.copy_(_grow_rows(head.weight.detach(), vocab))


def _grow_rows(weight: Any, rows: int) -> Any:
    """`weight` with rows appended up to `rows`, each the mean of the existing rows.

    The mean row is what ``resize_token_embeddings(mean_resizing=True)`` starts new tokens from:
    a new token's logit is then the average one, so adding the placeholder tokens does not change
    what the LM predicts before training.
    """
    import torch

    extra = rows - weight.shape[0]
    if extra < 0:
        raise ValueError(f"The tokenizer has {rows} tokens but the LM's embedding has {weight.shape[0]} rows.")
    return torch.cat([weight, weight.mean(dim=0, keepdim=True).expand(extra, -1)], dim=0)
