"""The CAFe training batch: what `CafeCollator` builds and `CafeForConditionalGeneration` consumes.

One record of the training data gives up to three kinds of sequences (paper Sec. 3): the LM
conversation (``lm``) and the two sides of a contrastive pair (``query``, e.g. the image, and
``doc``, e.g. its caption), plus optional hard negatives. The images and videos of the whole
batch are preprocessed once (``vision``); every sequence that shows an image points into them
with an ``image_index``, one that shows a video with a ``video_index``, so the model runs its
vision encoder once per distinct image and video per step. (A video is a longer run of visual
tokens: the same scheme, its own index because the processors keep the two apart.)

The batch is a small tree of dataclasses rather than a flat dict so that no module has to know
another module's key names: the model reads ``batch.vision`` as the vision encoder's keyword
arguments without guessing which keys are images, and the loss reads ``batch.query_groups``.
It moves between devices with ``.to()``, which is what accelerate's data loaders call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .losses import IGNORE_INDEX

if TYPE_CHECKING:
    from typing_extensions import Self


def _move(value: Any, device: torch.device | str | int, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {key: _move(item, device, non_blocking) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: _move(getattr(value, f.name), device, non_blocking) for f in dataclasses.fields(value)}
        )
    return value


def _no_index() -> torch.Tensor:
    return torch.empty(0, dtype=torch.long)


def _pin(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, dict):
        return {key: _pin(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _pin(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value


class _Movable:
    """``.to(device)`` and ``.pin_memory()`` over every tensor field (recursively)."""

    def to(self, device: torch.device | str | int, non_blocking: bool = False) -> Self:
        return _move(self, device, non_blocking)

    def pin_memory(self) -> Self:
        # torch's DataLoader calls this on custom batch types when pin_memory=True.
        return _pin(self)


@dataclass
class EmbeddingSequences(_Movable):
    """The rendered embedding prompts of one side of the contrastive pairs.

    Attributes:
        input_ids: ``[rows, seq]`` token ids of the embedding conversation (padded).
        attention_mask: ``[rows, seq]``, 1 on real tokens.
        image_index: ``[images]``: for each image these rows show, in order of appearance, its
            position in the batch's distinct images (`CafeBatch.vision`).
        video_index: ``[videos]``: the same for videos, positions in the batch's distinct videos.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_index: torch.Tensor
    video_index: torch.Tensor = field(default_factory=_no_index)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class LanguageModelingSequences(_Movable):
    """The conversations the next-token loss is computed on.

    Attributes:
        input_ids, attention_mask: ``[rows, seq]`` (padded).
        labels: ``[rows, seq]``: the input ids on assistant answers, ``-100`` elsewhere (unshifted).
        image_index, video_index: ``[images]``, ``[videos]``, as in `EmbeddingSequences`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_index: torch.Tensor
    video_index: torch.Tensor = field(default_factory=_no_index)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def supervised_tokens(self) -> int:
        """How many next-token targets the loss averages over (labels shifted by one)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass
class CafeBatch(_Movable):
    """One CAFe training batch (see the module docstring).

    Attributes:
        vision: The processor's output for the batch's distinct images (``pixel_values``,
            ``image_sizes`` or ``image_grid_thw``, ...) and videos (``pixel_values_videos``, and
            ``video_grid_thw`` / ``second_per_grid_ts`` for Qwen2-VL): the vision encoder's keyword
            arguments (`CafeForConditionalGeneration.get_vision_features`).
        query, doc: The two sides of the contrastive pairs, row i of one paired with row i of the
            other; ``None`` when the contrastive loss is off.
        negative: Hard negatives (documents without a query), or ``None``.
        lm: The LM sequences, or ``None`` when the LM loss is off or no record has one.
        query_lm_index: ``[query rows]``: the LM row of the same record when both sequences open
            with the same image or video (they share a causal prefix the model may compute once),
            else -1.
        query_groups, doc_groups: ``[rows]`` content ids (equal = identical content) for
            false-negative masking.
        negative_groups: ``[negatives]`` content ids of the hard negatives, in the same id space
            as ``doc_groups``: a hard negative that shows another row's document is masked out for
            the queries that document is a positive of.
        counts: What the collator cut or dropped building this batch (``lm_truncated``,
            ``lm_dropped_image_cut``, ``lm_dropped_answer_cut``, ``embedding_text_truncated``, ``skipped_records``).
    """

    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    query: EmbeddingSequences | None = None
    doc: EmbeddingSequences | None = None
    negative: EmbeddingSequences | None = None
    lm: LanguageModelingSequences | None = None
    query_lm_index: torch.Tensor | None = None
    query_groups: torch.Tensor | None = None
    doc_groups: torch.Tensor | None = None
    negative_groups: torch.Tensor | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        """Rows of the batch: contrastive pairs, or LM sequences for an LM-only batch."""
        if self.query is not None:
            return len(self.query)
        return len(self.lm) if self.lm is not None else 0

    def __contains__(self, key: str) -> bool:
        # Trainer probes batches with `"labels" in batch` to count loss tokens for models that
        # take `num_items_in_batch`; CAFe's losses count their own tokens (see `cafe.losses`).
        return False

    @property
    def supervised_tokens(self) -> int:
        return self.lm.supervised_tokens if self.lm is not None else 0

    @property
    def embedding_sides(self) -> dict[str, EmbeddingSequences]:
        """The present embedding sides by name (``query``, ``doc``, ``negative``)."""
        sides = {"query": self.query, "doc": self.doc, "negative": self.negative}
        return {name: side for name, side in sides.items() if side is not None}


class MiniBatches(list):
    """The batch of one optimizer micro-step as separately collated `CafeBatch` chunks.

    What a cached (GradCache) loss consumes: each chunk is a complete batch of its own (its own
    distinct images), so the loss can run them one at a time. Built by `CafeCollator` when it is
    given ``mini_batch_size``.
    """

    def to(self, device: torch.device | str | int, non_blocking: bool = False) -> MiniBatches:
        return MiniBatches(chunk.to(device, non_blocking=non_blocking) for chunk in self)

    def pin_memory(self) -> MiniBatches:
        return MiniBatches(chunk.pin_memory() for chunk in self)

    @property
    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for chunk in self:
            for name, value in chunk.counts.items():
                total[name] = total.get(name, 0) + value
        return total
