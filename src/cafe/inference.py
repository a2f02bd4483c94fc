"""Embedding inference at serving grade: the shared-prefix KV cache and length-sorted batching.

Shared-prefix cache
-------------------
Every CAFe embedding prompt starts with the same tokens, the system turn and the user header::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n

(15 tokens of the reference prompt; a text input is ~45 tokens, an image ~1.5k). In a causal LM
the keys and values of these positions depend on nothing that follows, so `EmbeddingPrefixCache`
computes them once per model state and every batch runs only on its *suffix* (images, text,
instruction, the empty assistant turn), attending to the cached prefix through a
``transformers.DynamicCache``:

- ``input_ids`` / ``attention_mask``: each row's tokens after the prefix, right-padded, whatever
  side the caller padded; the mask handed to the model is ``[1] * prefix + suffix mask``.
- position ids: the model's own (`CafeForConditionalGeneration.embedding_position_ids` on the full
  batch: 1-D for LLaVA-OneVision, M-RoPE for Qwen2-VL / Qwen2.5-VL, which depends on the images),
  gathered at the suffix tokens. So every family gets exactly the positions the uncached pass
  uses; the prefix's own positions are checked to be ``0 .. prefix - 1`` in every RoPE section.

Exact in exact arithmetic. Measured: equal to the uncached path within 1e-5 in float32 on every
family (tests/test_inference.py); in bfloat16 the two paths differ by rounding only (different
kernel shapes accumulate in a different order): the tolerance is a max abs difference of 1e-2
between the unit-norm embeddings and a cosine >= 0.999 (measured: 2.2e-3 on the tiny fixtures,
3.7e-3 and cosine 0.9998 at LLaVA-OneVision-0.5B's shape, benchmarks row 7).

When it pays. What the cache saves is the prefix's share of the batch's tokens: a third of a
short text input's, 1 % of an image input's (1.5k tokens). What it costs is the attention kernel's
causal fast path: behind a cached prefix the queries are fewer than the keys, so sdpa needs an
explicit mask and computes the whole score matrix, where an unpadded batch without the cache skips
the upper triangle. On long inputs that outweighs 1 %, so by default a batch whose prefix is under
``min_prefix_fraction`` (5 %) of its real tokens runs uncached, by design (logged once per model at
INFO level); ``EmbeddingPrefixCache(..., min_prefix_fraction=0)`` forces the cache.

When the cache cannot be used, the reason is logged once per model as a warning and the batch
runs uncached (never silently): gradients are enabled or the model is in train mode (the prefix would get no
gradient and dropout would differ), the attention kernel is not ``sdpa`` / ``eager`` (the only
ones verified with a cache behind a padded suffix), or a row does not start with the prefix's
tokens (a text whose first characters merge with the header's last token, e.g. one starting with
a newline).

Invalidation. The cache is keyed on the device and dtype, and on a *weights signature*: for every
parameter of the language model, its storage pointer and its in-place version counter
(``tensor._version``, bumped by ``load_state_dict``, ``copy_``, merges of LoRA weights and most
optimizer steps), plus the number of optimizer steps taken in the process (fused optimizers, such
as Trainer's default ``adamw_torch_fused``, update weights without bumping the version counter).
Any change to those weights recomputes the prefix on the next batch, at the cost of one
pass over ~300 parameter handles per batch (microseconds), rather than trusting callers to clear
it. The one change it cannot see is a forward that changes without any weight changing (toggling
PEFT adapters with ``disable_adapter()``): call `CafeForConditionalGeneration.clear_prefix_cache`
after that.

Length-sorted batching
----------------------
`length_sorted_order` orders inputs by token length (longest first, as sentence-transformers
does) so a batch pads to similar lengths; ``encode`` restores the caller's order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.utils import logging

from .shared_prefix import SUPPORTED_ATTENTION, common_prefix_length

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedTokenizerBase, ProcessorMixin
    from transformers.generation.utils import GenerateOutput

    from .modeling import CafeForConditionalGeneration
    from .prompting import EmbeddingInput

logger = logging.get_logger(__name__)

# Per-token processor outputs that only feed a position computation the cached path does itself
# (Qwen2-VL's `mm_token_type_ids`): they are full-length and would not match the suffix.
_FULL_LENGTH_KEYS = ("mm_token_type_ids",)


def warn_once(model: object, key: str, message: str) -> None:
    """Log ``message`` the first time ``key`` comes up for this model (a per-batch warning would
    repeat on every batch of an encode call)."""
    said = model.__dict__.setdefault("_cafe_said", set())
    if key not in said:
        said.add(key)
        logger.warning(message)


# ----------------------------------------------------------------------------- the prefix
def embedding_prompt_prefix_ids(
    processor: ProcessorMixin | PreTrainedTokenizerBase, chat_template: str
) -> torch.Tensor:
    """Token ids every embedding prompt of ``chat_template`` starts with: ``[prefix]`` long.

    Rendered from probes that differ right after the user header (an image, two texts, an
    instruction), tokenized without image expansion, and cut to their common prefix.
    """
    from PIL import Image

    from .prompting import EmbeddingInput

    image = Image.new("RGB", (8, 8))
    probes = [EmbeddingInput(image=image), EmbeddingInput(text="a"), EmbeddingInput(text="Zz 1")]
    rendered = [
        processor.apply_chat_template(item.to_messages(), chat_template=chat_template, tokenize=False)
        for item in probes
    ]
    rendered.append(
        processor.apply_chat_template(probes[1].to_messages("Q:"), chat_template=chat_template, tokenize=False)
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = [torch.tensor(tokenizer(text, add_special_tokens=True)["input_ids"]) for text in rendered]
    length = min(common_prefix_length(ids[0], other) for other in ids[1:])
    return ids[0][:length]


def weights_signature(module: torch.nn.Module) -> tuple:
    """Optimizer steps so far, and the storage pointer and in-place version of every parameter:
    changes whenever a weight does.

    The version counter alone misses optimizer steps: fused optimizers (``AdamW(fused=True)``,
    Trainer's default ``adamw_torch_fused``) write the weights in place without bumping it, and a
    model embedded before `Trainer.train` would then embed afterwards with the old prefix. So every
    optimizer step, of any optimizer, also counts (torch's global step hook, registered once).
    """
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    return (_optimizer_steps, *((p.data_ptr(), p._version) for p in module.parameters()))


# Optimizer steps taken in this process since the first `weights_signature` (see there).
_optimizer_steps = 0
_step_hook: Any = None


def _count_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


@dataclass
class _Entry:
    signature: tuple
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values ``[1, kv_heads, prefix, head_dim]``


@dataclass
class SuffixBatch:
    """A padded batch cut behind the shared prefix (see `split_prefix`).

    Attributes:
        input_ids: ``[batch, suffix]``, right-padded.
        attention_mask: ``[batch, suffix]``.
        columns: ``[batch, suffix]``: the column of the original batch each suffix token came
            from (padding slots repeat a valid column), to gather per-token tensors (positions).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    columns: torch.Tensor


def split_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_ids: torch.Tensor) -> SuffixBatch | str:
    """Cut ``prefix_ids`` off the front of every row of a left- or right-padded batch.

    Args:
        input_ids: ``[batch, seq]``.
        attention_mask: ``[batch, seq]``; each row's real tokens must be contiguous.
        prefix_ids: ``[prefix]``.

    Returns:
        The `SuffixBatch`, or a string saying why the batch cannot be split.
    """
    seq = input_ids.shape[1]
    p = prefix_ids.numel()
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    first = mask.long().argmax(1)  # first real column, whichever the padding side
    columns = torch.arange(seq, device=input_ids.device)
    contiguous = (mask == ((columns >= first[:, None]) & (columns < (first + lengths)[:, None]))).all()
    if not contiguous:
        return "an attention mask with holes inside a row"
    if int(lengths.min()) <= p:
        return f"an input of {int(lengths.min())} tokens, no longer than the {p}-token prefix"
    head = input_ids.gather(1, first[:, None] + torch.arange(p, device=input_ids.device))
    if not bool((head == prefix_ids.to(input_ids.device)).all()):
        return (
            "an input that does not start with the prompt's prefix tokens (its text merges with the header's last "
            "token, e.g. a text starting with a newline)"
        )
    suffix_lengths = lengths - p
    width = int(suffix_lengths.max())
    offsets = torch.arange(width, device=input_ids.device)
    valid = offsets[None, :] < suffix_lengths[:, None]
    # Padding slots point at the row's last real column: any valid column would do, and the
    # image token count of the suffix must not grow (they get the prefix's first token instead).
    last = first + lengths - 1
    cols = torch.where(valid, first[:, None] + p + offsets[None, :], last[:, None])
    suffix_ids = input_ids.gather(1, cols).masked_fill(~valid, int(prefix_ids[0]))
    return SuffixBatch(suffix_ids, valid.to(attention_mask.dtype), cols)


class EmbeddingPrefixCache:
    """The keys and values of the token prefix every embedding prompt shares, computed once.

    One per prefix (a model keeps its own, see `CafeForConditionalGeneration.prefix_cache_for`);
    inside, one entry per (device, dtype), recomputed when the language model's weights change
    (see the module docstring).

    Args:
        prefix_ids: ``[prefix]`` token ids (`embedding_prompt_prefix_ids`).
        min_prefix_fraction: Use the cache on a batch only if the prefix is at least this share of
            its real tokens (see the module docstring: on long inputs the lost causal fast path
            of attention costs more than the prefix). 0 uses it on every batch.
    """

    def __init__(self, prefix_ids: torch.Tensor | Sequence[int], min_prefix_fraction: float = 0.05):
        self.prefix_ids = torch.as_tensor(prefix_ids, dtype=torch.long).flatten().cpu()
        if self.prefix_ids.numel() == 0:
            raise ValueError("An empty prefix has nothing to cache; the embedding prompts share no leading tokens.")
        if not 0 <= min_prefix_fraction <= 1:
            raise ValueError(f"min_prefix_fraction must be between 0 and 1, got {min_prefix_fraction}.")
        self.min_prefix_fraction = min_prefix_fraction
        self._entries: dict[tuple[torch.device, torch.dtype], _Entry] = {}
        self.builds = 0  # prefix computations so far (each weight change costs one)

    def __len__(self) -> int:
        return self.prefix_ids.numel()

    def clear(self) -> None:
        self._entries.clear()

    # ------------------------------------------------------------------ the KV
    def _entry(self, model: CafeForConditionalGeneration) -> _Entry:
        language_model = model.model.language_model
        key = (model.device, model.dtype)
        signature = weights_signature(language_model)
        entry = self._entries.get(key)
        if entry is None or entry.signature != signature:
            # Normal tensors, not inference tensors: the entry may be used under no_grad later.
            with torch.inference_mode(False), torch.no_grad():
                ids = self.prefix_ids.to(model.device)[None]
                mask = torch.ones_like(ids)
                from transformers import DynamicCache
                from transformers.cache_utils import CacheLayerMixin

                cache = DynamicCache(config=model.config)
                model.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=model.embedding_position_ids(ids, mask),
                    cache=cache,
                    use_cache=True,
                )
                layers = []
                for index, layer in enumerate(cache.layers):
                    if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
                        raise RuntimeError(
                            f"Layer {index} of the language model left no keys and values in the prefix cache "
                            f"({type(layer).__name__}): the shared-prefix cache supports attention layers only; "
                            "embed with use_prefix_cache=False."
                        )
                    layers.append((layer.keys, layer.values))
            entry = _Entry(signature, layers)
            self._entries[key] = entry
            self.builds += 1
        return entry

    def key_values(self, model: CafeForConditionalGeneration, batch_size: int) -> DynamicCache:
        """A fresh ``DynamicCache`` holding the prefix for ``batch_size`` rows (the forward appends
        to it, so each batch gets its own; the stored tensors are only read)."""
        from transformers import DynamicCache

        entry = self._entry(model)
        data = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in entry.layers]
        return DynamicCache(data, config=model.config)

    # ------------------------------------------------------------------ embedding
    def unusable_reason(self, model: CafeForConditionalGeneration) -> str | None:
        """Why this model cannot use the cache now, or ``None``."""
        if torch.is_grad_enabled() or model.training:
            return (
                "gradients are enabled or the model is in train mode (the cached prefix would get no gradient); "
                "embed under torch.no_grad() / inference_mode() in eval mode to use it"
            )
        attention = model.model.language_model.config._attn_implementation
        if attention not in SUPPORTED_ATTENTION:
            return (
                f"the {attention!r} attention kernel is not verified behind a cached prefix (supported: "
                f"{SUPPORTED_ATTENTION}); load the model with attn_implementation='sdpa' to use it"
            )
        return None

    def last_hidden_states(
        self,
        model: CafeForConditionalGeneration,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision_inputs: dict[str, Any],
    ) -> torch.Tensor | None:
        """Last-token hidden states ``[batch, hidden]`` of a processed embedding batch, the prefix
        read from the cache; ``None`` (after a warning, once per model and reason) when the batch
        must run uncached."""
        fraction = len(self) * input_ids.shape[0] / max(int(attention_mask.sum()), 1)
        if fraction < self.min_prefix_fraction:
            said = model.__dict__.setdefault("_cafe_said", set())
            if "prefix-cache: long" not in said:
                said.add("prefix-cache: long")
                logger.info(
                    f"Long inputs embed without the shared-prefix cache: its {len(self)} tokens are {fraction:.1%} of "
                    f"the batch's (< min_prefix_fraction {self.min_prefix_fraction}), less than the attention fast "
                    "path it would give up."
                )
            return None
        reason = self.unusable_reason(model)
        split = None
        if reason is None:
            cut = split_prefix(input_ids, attention_mask, self.prefix_ids)
            if isinstance(cut, str):
                reason = f"the batch has {cut}"
            else:
                split = cut
        if split is None:  # then `reason` says why
            warn_once(
                model,
                f"prefix-cache: {reason}",
                f"Embedding without the shared-prefix cache: {reason}. Same "
                "results, the prefix is recomputed for every input.",
            )
            return None
        positions = model.embedding_position_ids(input_ids, attention_mask, **vision_inputs)
        p = len(self)
        first = attention_mask.long().argmax(1)
        prefix_cols = (first[:, None] + torch.arange(p, device=input_ids.device)).expand(*positions.shape[:-2], -1, -1)
        expected = torch.arange(p, device=positions.device)
        if not bool((positions.gather(-1, prefix_cols) == expected).all()):
            # A family whose positions do not count the prefix from 0 (none of the supported ones).
            warn_once(
                model,
                "prefix-cache: positions",
                "Embedding without the shared-prefix cache: this model's "
                "position ids of the prefix are not 0..prefix-1, so the cached keys would be rotated wrongly.",
            )
            return None
        columns = split.columns.expand(*positions.shape[:-2], -1, -1)
        suffix_positions = positions.gather(-1, columns)
        cache = self.key_values(model, input_ids.shape[0])
        mask = torch.cat([split.attention_mask.new_ones(input_ids.shape[0], p), split.attention_mask], dim=1)
        inputs = {k: v for k, v in vision_inputs.items() if k not in _FULL_LENGTH_KEYS}
        hidden = model.model(
            input_ids=split.input_ids,
            attention_mask=mask,
            position_ids=suffix_positions,
            cache=cache,
            use_cache=True,
            **inputs,
        ).last_hidden_state
        last = split.attention_mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


# ----------------------------------------------------------------------------- length buckets
def approximate_token_lengths(
    processor: ProcessorMixin | PreTrainedTokenizerBase, items: Sequence[EmbeddingInput], prompts: Sequence[str]
) -> list[int]:
    """Token length of each rendered prompt once its images are expanded, without processing pixels.

    The text is tokenized once (one fast-tokenizer call for all prompts); each image adds the
    number of tokens the processor will expand it to, from its size
    (``processor._get_num_multimodal_tokens``). Where the processor cannot say, images count as
    equal (a warning says so): the order is then by text length within images.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    sized = [(i, item.image.height, item.image.width) for i, item in enumerate(items) if item.image is not None]
    if not sized:
        return lengths
    counts = None
    count_tokens = getattr(processor, "_get_num_multimodal_tokens", None)
    if count_tokens is not None:
        try:
            data = count_tokens(image_sizes=[(h, w) for _, h, w in sized])
            counts = data["num_image_tokens"] if isinstance(data, dict) else data.num_image_tokens
        except (AttributeError, KeyError, TypeError, ValueError, NotImplementedError):
            counts = None
    if counts is None or len(counts) != len(sized):
        logger.warning(
            f"{type(processor).__name__} cannot count an image's tokens from its size: inputs with images are sorted "
            "by their text length only (batches may pad more; results are unchanged)."
        )
        return lengths
    for (i, _, _), count in zip(sized, counts, strict=True):
        lengths[i] += int(count) - 1  # the placeholder token itself is replaced by the expansion
    return lengths


def length_sorted_order(lengths: Sequence[int]) -> list[int]:
    """Indices that sort ``lengths`` longest first (stable), as sentence-transformers orders a batch
    job: the first batch is the largest, so an out-of-memory error comes at once, not at the end."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


# ----------------------------------------------------------------------------- embed, then generate
@dataclass
class EmbeddedPrompt:
    """One input's embedding plus the keys and values of the prompt that produced it.

    Made by `embed_keeping_cache`; `generate_reusing_prefix` continues a generation prompt that
    starts with the same tokens from this cache instead of recomputing them (GritLM's query
    caching, here multimodal: the prefix includes the input's image, so its vision pass is saved
    too).

    Attributes:
        embedding: ``[hidden]`` float32, as `CafeForConditionalGeneration.encode` returns it.
        input_ids: ``[1, seq]``: the embedding prompt's tokens (images expanded).
        cache: ``DynamicCache`` over those ``seq`` tokens.
    """

    embedding: torch.Tensor
    input_ids: torch.Tensor
    cache: DynamicCache


def reuse_unsupported_reason(model: CafeForConditionalGeneration) -> str | None:
    """Why `generate_reusing_prefix` cannot continue from a cache for this model, or ``None``.

    Every family can (Qwen2-VL's M-RoPE positions are passed to ``generate`` by the family's
    `inputs_after_cached_images`); only the attention kernels verified behind a cached prefix are.
    """
    attention = model.model.language_model.config._attn_implementation
    if attention not in SUPPORTED_ATTENTION:
        return f"the {attention!r} attention kernel is not verified behind a cached prefix"
    return None


def embed_keeping_cache(
    model: CafeForConditionalGeneration,
    item: Any,
    instruction: str | None = None,
    processor: ProcessorMixin | None = None,
) -> EmbeddedPrompt:
    """Embed one input (a string, an image, an ``(image, text)`` pair or a dict) and keep its KV cache.

    Same vector as ``model.encode([item], use_prefix_cache=False)[0]``; the cache costs
    ``2 * layers * kv_heads * head_dim * seq`` values (0.5B shape: 12 KiB per token in bf16).
    """
    from transformers import DynamicCache

    from .prompting import build_embedding_batch, to_embedding_inputs

    processor = processor if processor is not None else model.processor
    if processor is None:
        raise ValueError(
            "No processor: load the model with its processor (CafeForConditionalGeneration.from_pretrained) or pass "
            "processor=AutoProcessor.from_pretrained(...)."
        )
    items = to_embedding_inputs([item] if not isinstance(item, list) else item)
    if len(items) != 1:
        raise ValueError(f"embed_keeping_cache embeds one input, got {len(items)}; call it once per input.")
    batch = build_embedding_batch(processor, items, model.embedding_chat_template, instruction).to(model.device)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    input_ids, attention_mask = batch.pop("input_ids"), batch.pop("attention_mask")
    vision = {k: v for k, v in batch.items() if v is not None}
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(False), torch.no_grad():
        hidden = model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=model.embedding_position_ids(input_ids, attention_mask, **vision),
            cache=cache,
            use_cache=True,
            **vision,
        ).last_hidden_state
    embedding = model._finish_embedding(hidden[:, -1])[0].cpu()
    return EmbeddedPrompt(embedding, input_ids, cache)


def generate_reusing_prefix(
    model: CafeForConditionalGeneration, embedded: EmbeddedPrompt, inputs: Mapping[str, Any], **generate_kwargs: Any
) -> tuple[GenerateOutput | torch.LongTensor, int]:
    """``model.generate`` on a one-prompt processor batch, its leading tokens read from ``embedded``.

    The generation prompt must start like the embedding prompt (same system turn, user header,
    image and text: see examples/rag.py, which renders both from the same conversation). The
    tokens the two prompts share are taken from ``embedded.cache`` (a copy: it can serve again),
    and the images inside them are not passed to the vision tower again. Greedy decoding then
    gives the tokens plain ``generate`` gives (tests/test_inference.py).

    Falls back to plain ``generate``, with a warning, where a cache cannot be reused
    (`reuse_unsupported_reason`).

    Args:
        embedded: From `embed_keeping_cache` on the same model.
        inputs: The processor's output for the generation prompt: ``input_ids`` ``[1, seq]``,
            ``attention_mask`` and per-image tensors (``pixel_values``, ``image_sizes``).
        **generate_kwargs: For ``generate`` (``max_new_tokens``, ``do_sample``, ...).

    Returns:
        ``(output_ids, reused_tokens)``: ``generate``'s output and how many prompt tokens came
        from the cache (0 when nothing was reused).
    """
    import copy

    from transformers import GenerationMixin

    if not isinstance(model, GenerationMixin):  # every family class mixes in its backbone's generation
        raise TypeError(
            f"{type(model).__name__} cannot generate: load the model with CafeForConditionalGeneration.from_pretrained, "
            "which returns the family's class (with the backbone's generate())."
        )
    inputs = dict(inputs)
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"generate_reusing_prefix continues one prompt, got a batch of {input_ids.shape[0]}.")
    reason = reuse_unsupported_reason(model)
    shared = 0 if reason else common_prefix_length(embedded.input_ids[0].to(input_ids.device), input_ids[0])
    # At least one prompt token must run to produce the first next-token logits.
    shared = min(shared, input_ids.shape[1] - 1)
    # A video stays out of the cache (its tensors are passed whole): stop before its first token.
    video_token_id = getattr(model.config, "video_token_id", None)
    if video_token_id is not None:
        videos = (input_ids[0, :shared] == video_token_id).nonzero()
        if len(videos):
            shared = int(videos[0])
            warn_once(
                model,
                "reuse: video in prefix",
                f"Reusing only the {shared} prompt tokens before the first video: a video's tokens are "
                "computed anew (its tensors are passed whole to generate).",
            )
    image = (input_ids[0] == model.config.image_token_id).tolist()
    # Never split an image's token run: its features are scattered as a whole.
    while 0 < shared < len(image) and image[shared] and image[shared - 1]:
        shared -= 1
    if reason or shared == 0:
        warn_once(
            model,
            f"reuse: {reason or 'no shared tokens'}",
            "Generating without reusing the embedded prompt's "
            f"cache: {reason or 'the generation prompt shares no leading tokens with it'}.",
        )
        return model.generate(**inputs, **generate_kwargs), 0
    inputs = model.inputs_after_cached_images(inputs, model._count_images(input_ids[0, :shared]))
    cache = copy.deepcopy(embedded.cache)
    cache.crop(shared - cache.get_seq_length())
    return model.generate(**inputs, cache=cache, **generate_kwargs), shared
