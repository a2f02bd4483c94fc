"""Models, processors and inputs of the benchmarks. Nothing is downloaded.

Two model shapes:

- ``ov-0.5b``: LLaVA-OneVision-0.5B's real shape with random weights. SigLIP-so400m vision tower
  (hidden 1152, MLP 4304, 16 heads, patch 14, 384 px, 729 tokens per crop) run to 26 of its 27
  layers, as LLaVA-OneVision does (the reference's SigLIP tower deletes the last layer and the
  llava-hf checkpoints ship 26; that is what makes the published 894M parameter count), the
  2-layer GELU projector, and Qwen2-0.5B (24 layers, hidden 896, MLP 4864, 14 heads, 2 KV
  heads, vocabulary 151,936, tied embeddings). ``--vision-layers`` / ``--text-layers`` cut the
  depth (then every result says "depth-cut").
- ``tiny``: the test suite's tiny checkpoint (`cafe.testing`), used by ``--quick`` only. Its
  proportions are nothing like the real model's: quick results check the plumbing, not claims.

Token counts are the released checkpoints': the processor is llava-hf's LLaVA-OneVision processor
(`cafe.testing.llava_hf_llava_onevision_processor`: its chat template, 384 px crops and the full
anyres grid), so a 384x384 image is a base crop plus one tile (1,485 LLM tokens after packing with
row newlines) and a 640x480 photo a base crop plus four tiles (2,929 tokens). The training rows
use 640x480 photos (``photo_size``), what a llava-hf user's data looks like. The tokenizer is
`cafe.testing`'s small offline BPE (ids < 512 of the 151,936-entry embedding); captions are drawn
from the words it knows, one token per word, to a stated token length.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

# The words the tiny tokenizer learned as whole tokens (see `cafe.testing._CORPUS_WORDS`).
_WORDS = [
    "you",
    "are",
    "a",
    "helpful",
    "assistant",
    "system",
    "user",
    "compress",
    "this",
    "image",
    "sentence",
    "in",
    "one",
    "word",
    "describe",
    "the",
    "picture",
    "what",
    "is",
    "shown",
    "there",
    "an",
    "yes",
    "no",
    "of",
    "on",
    "at",
    "with",
    "and",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "gray",
    "circle",
    "square",
    "triangle",
    "small",
    "large",
    "big",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "middle",
    "two",
    "three",
    "four",
    "shapes",
    "shape",
    "colour",
    "color",
    "background",
    "shows",
    "question",
    "answer",
    "caption",
    "photo",
    "how",
    "many",
    "objects",
    "object",
]


@dataclass
class ModelSpec:
    name: str
    vision_layers: int
    vision_hidden: int
    vision_mlp: int
    vision_heads: int
    patch_size: int
    image_size: int
    text_layers: int
    text_hidden: int
    text_mlp: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    depth_cut: bool = False

    @property
    def tokens_per_crop(self) -> int:
        return (self.image_size // self.patch_size) ** 2


OV_05B = ModelSpec(
    name="ov-0.5b",
    vision_layers=26,
    vision_hidden=1152,
    vision_mlp=4304,
    vision_heads=16,
    patch_size=14,
    image_size=384,
    text_layers=24,
    text_hidden=896,
    text_mlp=4864,
    text_heads=14,
    text_kv_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
)


def spec_for(model: str, vision_layers: int | None = None, text_layers: int | None = None) -> ModelSpec:
    if model == "tiny":
        return ModelSpec(
            name="tiny (cafe.testing, --quick only: not the real proportions)",
            vision_layers=2,
            vision_hidden=32,
            vision_mlp=64,
            vision_heads=2,
            patch_size=8,
            image_size=32,
            text_layers=2,
            text_hidden=64,
            text_mlp=128,
            text_heads=4,
            text_kv_heads=2,
            vocab_size=0,
            tie_word_embeddings=False,
            depth_cut=True,
        )
    if model != "ov-0.5b":
        raise ValueError(f"Unknown model {model!r}; expected 'ov-0.5b' or 'tiny'.")
    spec = ModelSpec(**asdict(OV_05B))
    if vision_layers is not None and vision_layers != spec.vision_layers:
        spec.vision_layers, spec.depth_cut = vision_layers, True
    if text_layers is not None and text_layers != spec.text_layers:
        spec.text_layers, spec.depth_cut = text_layers, True
    if spec.depth_cut:
        spec.name = f"ov-0.5b DEPTH-CUT ({spec.vision_layers} vision / {spec.text_layers} text layers)"
    return spec


def build_processor(spec: ModelSpec):
    """llava-hf's LLaVA-OneVision processor (chat template, 384 px, full anyres grid), tiny tokenizer."""
    from cafe.testing import llava_hf_llava_onevision_processor, tiny_llava_onevision_processor

    if spec.name.startswith("tiny"):
        return tiny_llava_onevision_processor()
    return llava_hf_llava_onevision_processor()


def build_config(spec: ModelSpec, tokenizer):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    from cafe.testing import LLAVA_ONEVISION_IMAGE_GRID_PINPOINTS, tiny_llava_onevision_config

    if spec.name.startswith("tiny"):
        return tiny_llava_onevision_config(tokenizer)
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_mlp,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=LLAVA_ONEVISION_IMAGE_GRID_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def build_model(spec: ModelSpec, dtype: torch.dtype, device: str, attn: str = "sdpa", seed: int = 0):
    """A randomly initialised `CafeLlavaOnevisionForConditionalGeneration` plus its processor.

    The CAFe class *is* the stock `LlavaOnevisionForConditionalGeneration` (subclass): its plain
    ``forward`` is transformers' own, which is what the reference-style baseline calls. So both
    sides of every comparison run on the very same weights.
    """
    from cafe.backbones.llava_onevision import (
        CafeLlavaOnevisionForConditionalGeneration,
    )

    processor = build_processor(spec)
    config = build_config(spec, processor.tokenizer)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = CafeLlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    model.processor = processor
    model.train()
    return model, processor


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every layer (transformers 5 name; older: gradient_checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model) -> dict[str, int]:
    seen, parts = set(), {"vision": 0, "projector": 0, "llm": 0}
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        parts[model.parameter_component(name)] += param.numel()
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------------------------- inputs
def random_images(n: int, size: int | tuple[int, int], seed: int = 0):
    """Noise images of ``size`` pixels (an int: square) or ``(width, height)``."""
    import numpy as np
    from PIL import Image

    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]


def caption(n_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n_tokens))


def training_records(n: int, image_size: int | tuple[int, int], caption_tokens: int, seed: int = 0) -> list[dict]:
    """Plain (image, caption) pairs: contrastive pair + a captioning LM sequence each."""
    images = random_images(n, image_size, seed)
    return [{"image": image, "text": caption(caption_tokens, seed * 1000 + i)} for i, image in enumerate(images)]


def cafe_training_batch(model, processor, records, max_length: int | None = None):
    """The `cafe.batch.CafeBatch` `CafeCollator` builds from ``records`` (what `CafeTrainer` feeds)."""
    from cafe import CafeCollator

    return CafeCollator(processor, model=model, max_length=max_length)(records)


def _tensors_to(inputs: dict, device, dtype) -> dict:
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if key == "pixel_values":
                value = value.to(dtype)
        out[key] = value
    return out


def to_device(batch, device, dtype):
    """A dict of model inputs or a `CafeBatch` on ``device``, pixel values in ``dtype``."""
    if isinstance(batch, dict):
        return _tensors_to(batch, device, dtype)
    batch = batch.to(device)
    batch.vision = _tensors_to(batch.vision, device, dtype)
    return batch


def embedding_batches(processor, model, items, batch_size: int) -> list:
    """`cafe.prompting.build_embedding_batch` over ``items`` in chunks (what ``model.encode`` runs)."""
    from cafe.prompting import build_embedding_batch

    return [
        build_embedding_batch(processor, items[i : i + batch_size], model.embedding_chat_template)
        for i in range(0, len(items), batch_size)
    ]


def batch_shape_summary(batch) -> dict:
    """Shapes of a `CafeBatch`'s sequences and images (the JSON keys name the old flat-dict fields)."""
    summary = {}
    for key, side in (("query_input_ids", batch.query), ("doc_input_ids", batch.doc), ("input_ids", batch.lm)):
        if side is not None:
            summary[key] = list(side.input_ids.shape)
    if "pixel_values" in batch.vision:
        summary["pixel_values"] = list(batch.vision["pixel_values"].shape)
    if batch.lm is not None:
        summary["supervised_lm_tokens"] = batch.lm.supervised_tokens
    return summary
