"""Causal-prefix sharing: one LLM pass serves a record's LM sequence *and* its image (or video) embedding.

In a CAFe training step a record gives two sequences that start alike: the LM conversation
(system turn, user header, the image's tokens, the question, the answer) and the image-embedding
prompt (system turn, user header, the same image's tokens, "Compress this image in one word:").
Their common prefix (about 1.5k tokens at LLaVA-OneVision's 0.5B shape, against ~30 tokens of
embedding suffix) is identical work in a causal LM: every prefix position sees only earlier
prefix positions. So instead of two LLM passes we run one over the *packed* row

    [ LM sequence (prefix + LM suffix) | embedding suffix ]

with an attention mask under which the embedding suffix sees the prefix and itself (causally)
but not the LM suffix, and with each part's own position ids (the embedding suffix continues
from the end of the prefix, as in its own sequence). The LM loss reads the LM part, the
embedding is the hidden state of the packed row's last token. In exact arithmetic this is the
unshared computation; gradients from both losses flow into the one prefix. A video record is
the same with a longer prefix: its clip's tokens (33 per 8 frames on the tiny LLaVA-OneVision,
~1.6k on the released one) are computed once instead of twice.

Why a packed row with a custom mask rather than a KV cache: the prefix must carry gradients
into *two* continuations, and it must work under activation checkpointing, which re-runs layers
in backward and would append a cache twice. A 4-D mask passes through transformers' mask
builders unchanged (``sdpa`` takes it as a boolean mask, ``eager`` as an additive one); other
attention kernels (flash-attention, flex) cannot take an arbitrary mask, so callers fall back to
separate passes there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .losses import IGNORE_INDEX

# Attention implementations that accept an arbitrary 4-D mask, and the form each wants.
SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class PackedBatch:
    """LM rows with their paired embedding suffixes appended; one row per LM sequence.

    Attributes:
        input_ids: ``[rows, length]``, right-padded.
        attention_mask: ``[rows, 1, length, length]``: boolean (True = may attend) for ``sdpa``,
            additive (0 / dtype minimum) for ``eager``.
        position_ids: ``[..., rows, length]``: the LM sequence's positions, then the embedding
            sequence's positions of its suffix (leading dims as the backbone's, e.g. 3 for M-RoPE).
        labels: ``[rows, length]``: the LM labels on the LM part, ``-100`` elsewhere.
        query_rows: ``[pairs]``: query (image-embedding) rows served by this batch.
        pooled: ``(row, position)`` of each served query's last token, two ``[pairs]`` tensors.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    query_rows: torch.Tensor
    pooled: tuple[torch.Tensor, torch.Tensor]


def common_prefix_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of leading tokens two 1-D id tensors have in common."""
    n = min(a.numel(), b.numel())
    differs = (a[:n] != b[:n]).nonzero()
    return int(differs[0]) if differs.numel() else n


def pack_shared_prefix(
    lm_input_ids: torch.Tensor,
    lm_attention_mask: torch.Tensor,
    lm_labels: torch.Tensor,
    lm_position_ids: torch.Tensor,
    query_input_ids: torch.Tensor,
    query_attention_mask: torch.Tensor,
    query_position_ids: torch.Tensor,
    pairs: list[tuple[int, int]],
    visual_token_ids: Sequence[int],
    attention_implementation: str,
    dtype: torch.dtype,
) -> PackedBatch | None:
    """Pack each paired query's embedding suffix behind its LM sequence.

    Args:
        lm_input_ids, lm_attention_mask, lm_labels: The LM batch ``[lm_rows, lm_len]`` (either padding side).
        lm_position_ids: Its position ids ``[..., lm_rows, lm_len]``.
        query_input_ids, query_attention_mask: The query rows of ``pairs`` ``[q_rows, q_len]``.
        query_position_ids: Their position ids ``[..., q_rows, q_len]``.
        pairs: ``(query row, lm row)``: the two sequences show the same image or video first.
        visual_token_ids: The image and video token ids. A pair whose embedding suffix would hold
            such tokens is not packed (the packed row's images and videos must be the LM row's,
            in order).
        attention_implementation: ``"sdpa"`` or ``"eager"`` (the mask's form).
        dtype: Model dtype, for the additive ``eager`` mask.

    Returns:
        The packed batch, or ``None`` when no pair shares a prefix.
    """
    lengths, parts_ids, parts_pos, parts_labels = [], [], [], []
    query_rows, pooled_rows, pooled_positions = [], [], []
    lm_lengths, prefix_lengths = [], []
    paired = {lm: query for query, lm in pairs}
    visual = torch.tensor(list(visual_token_ids), dtype=lm_input_ids.dtype, device=lm_input_ids.device)
    for lm_row in range(lm_input_ids.shape[0]):
        keep = lm_attention_mask[lm_row].bool()
        ids, pos, labels = lm_input_ids[lm_row, keep], lm_position_ids[..., lm_row, keep], lm_labels[lm_row, keep]
        prefix = 0
        if lm_row in paired:
            q = paired[lm_row]
            q_keep = query_attention_mask[q].bool()
            q_ids, q_pos = query_input_ids[q, q_keep], query_position_ids[..., q, q_keep]
            # Keep at least the last token in the suffix: it is the pooled one.
            prefix = min(common_prefix_length(ids, q_ids), q_ids.numel() - 1)
            suffix_has_visual = bool(torch.isin(q_ids[prefix:], visual).any())
            if prefix > 0 and not suffix_has_visual:
                query_rows.append(q)
                pooled_rows.append(lm_row)
                pooled_positions.append(ids.numel() + q_ids.numel() - prefix - 1)
                ids = torch.cat([ids, q_ids[prefix:]])
                pos = torch.cat([pos, q_pos[..., prefix:]], dim=-1)
                labels = torch.cat([labels, labels.new_full((q_ids.numel() - prefix,), IGNORE_INDEX)])
            else:
                prefix = 0
        lm_lengths.append(keep.sum().item())
        prefix_lengths.append(prefix)
        parts_ids.append(ids)
        parts_pos.append(pos)
        parts_labels.append(labels)
        lengths.append(ids.numel())
    if not query_rows:
        return None

    length = max(lengths)
    n = len(lengths)
    device = lm_input_ids.device
    input_ids = lm_input_ids.new_zeros((n, length))
    position_ids = lm_position_ids.new_zeros(lm_position_ids.shape[:-2] + (n, length))
    labels = lm_labels.new_full((n, length), IGNORE_INDEX)
    for i, (ids, pos, lab) in enumerate(zip(parts_ids, parts_pos, parts_labels, strict=True)):
        input_ids[i, : ids.numel()] = ids
        position_ids[..., i, : ids.numel()] = pos
        labels[i, : ids.numel()] = lab
    pad = torch.arange(length, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]
    input_ids[pad] = _pad_id(visual_token_ids)

    mask = shared_prefix_attention_mask(
        torch.tensor(lm_lengths, device=device),
        torch.tensor(prefix_lengths, device=device),
        torch.tensor(lengths, device=device),
        length,
    )
    if attention_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=device)
        mask = torch.where(mask, zero, torch.finfo(dtype).min)
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        labels=labels,
        query_rows=torch.tensor(query_rows, dtype=torch.long, device=device),
        pooled=(torch.tensor(pooled_rows, device=device), torch.tensor(pooled_positions, device=device)),
    )


def shared_prefix_attention_mask(
    lm_lengths: torch.Tensor, prefix_lengths: torch.Tensor, lengths: torch.Tensor, max_length: int
) -> torch.Tensor:
    """Boolean ``[rows, 1, max_length, max_length]`` mask of packed rows (True = may attend).

    Row ``r`` holds the LM sequence at ``[0, lm_lengths[r])`` (its first ``prefix_lengths[r]``
    tokens shared) and an embedding suffix at ``[lm_lengths[r], lengths[r])``. A position attends
    causally within its own part, and the suffix also to the shared prefix. Padding positions
    attend to themselves only, so no row of the softmax is empty.
    """
    positions = torch.arange(max_length, device=lm_lengths.device)
    query, key = positions[:, None], positions[None, :]  # [L, 1], [1, L]
    lm_len = lm_lengths[:, None, None]
    in_suffix_q, in_suffix_k = query >= lm_len, key >= lm_len  # [rows, L, 1], [rows, 1, L]
    real_query, real_key = query < lengths[:, None, None], key < lengths[:, None, None]
    shared_key = key < prefix_lengths[:, None, None]
    allowed = (key <= query) & real_query & real_key & ((in_suffix_q == in_suffix_k) | shared_key)
    allowed = allowed | (query == key)
    return allowed[:, None]


def _pad_id(visual_token_ids: Sequence[int]) -> int:
    # Padding never reaches a loss or an embedding; it only must not be taken for a visual token.
    return next(token for token in range(len(visual_token_ids) + 1) if token not in visual_token_ids)
