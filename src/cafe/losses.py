"""CAFe losses: symmetric InfoNCE (paper Eq. 1) and the LM loss at supervised positions (Eq. 2).

Both compute in float32 whatever the model dtype: a bf16 softmax over a large batch loses the
small differences InfoNCE is made of (the reference computes in bf16; we don't).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class ContrastiveOutput:
    """Loss and in-batch diagnostics. Accuracies are top-1 retrieval accuracies in each direction."""

    loss: torch.Tensor
    accuracy_query_to_doc: torch.Tensor
    accuracy_doc_to_query: torch.Tensor
    logit_scale: torch.Tensor


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between paired query and document embeddings (paper Eq. 1).

    ``loss = (CE(S, arange) + CE(S_docs^T, arange)) / 2`` with ``S = scale * q @ d^T``, q and d
    L2-normalised. Hard negatives add columns to the query->document direction only: they are
    documents without a query, so they have no row in the document->query direction.

    False negatives: two rows whose documents (or queries) are identical would each count the
    other's positive as a negative. Pass ``doc_groups`` / ``query_groups`` (equal ids = identical
    content) and those off-diagonal entries are masked out of the softmax.

    Args:
        temperature: tau; the logit scale is 1/tau (reference: 0.05, i.e. 20).
        learnable: Learn log(1/tau), as CLIP does; clamped to at most 100 like CLIP.
    """

    max_logit_scale = 100.0

    def __init__(self, temperature: float = 0.05, learnable: bool = False):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        log_scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if learnable:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale, persistent=False)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach())

    def forward(
        self,
        query_embeds: torch.Tensor,
        doc_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None = None,
        query_groups: torch.Tensor | None = None,
        doc_groups: torch.Tensor | None = None,
    ) -> ContrastiveOutput:
        """
        Args:
            query_embeds: ``[N, D]`` (e.g. image embeddings); row i is paired with document i.
            doc_embeds: ``[N, D]`` (e.g. text embeddings).
            negative_embeds: ``[K, D]`` hard negatives, extra columns for every query.
            query_groups, doc_groups: ``[N]`` content ids (equal id = identical content) for
                false-negative masking.

        Returns:
            `ContrastiveOutput` with the mean of both directions.
        """
        n = query_embeds.shape[0]
        if n < 2 and negative_embeds is None:
            raise ValueError(
                f"The contrastive loss needs at least 2 pairs per batch (got {n}): with one pair there is no "
                "negative. Increase per_device_train_batch_size, set dataloader_drop_last=True, or add hard negatives."
            )
        if doc_embeds.shape[0] != n:
            raise ValueError(f"query_embeds and doc_embeds must pair up row by row, got {n} and {doc_embeds.shape[0]}.")
        q = F.normalize(query_embeds.float(), dim=-1)
        d = F.normalize(doc_embeds.float(), dim=-1)
        scale = self.logit_scale
        logits = scale * (q @ d.T)  # [N, N]; row i: query i against all documents

        mask = false_negative_mask(query_groups, doc_groups)
        if mask is not None:
            # The mask is symmetric, so the same one applies to the transposed direction.
            logits = logits.masked_fill(mask, float("-inf"))
        logits_q2d = logits
        if negative_embeds is not None:
            neg = F.normalize(negative_embeds.float(), dim=-1)
            logits_q2d = torch.cat([logits, scale * (q @ neg.T)], dim=1)  # [N, N + K]
        logits_d2q = logits.T

        labels = torch.arange(n, device=q.device)
        loss = (F.cross_entropy(logits_q2d, labels) + F.cross_entropy(logits_d2q, labels)) / 2
        with torch.no_grad():
            acc_q2d = (logits_q2d.argmax(dim=1) == labels).float().mean()
            acc_d2q = (logits_d2q.argmax(dim=1) == labels).float().mean()
        return ContrastiveOutput(loss, acc_q2d, acc_d2q, scale.detach())


def false_negative_mask(query_groups: torch.Tensor | None, doc_groups: torch.Tensor | None) -> torch.Tensor | None:
    """``[N, N]`` True where pair (i, j), i != j, shares its query or its document content.

    Document j is then a false negative for query i (the same text, or the same image, twice in a
    batch) and must not be pushed away. Symmetric by construction.
    """
    if query_groups is None and doc_groups is None:
        return None
    groups = [g for g in (query_groups, doc_groups) if g is not None]
    n = groups[0].shape[0]
    mask = torch.zeros(n, n, dtype=torch.bool, device=groups[0].device)
    for g in groups:
        mask |= g[:, None] == g[None, :]
    mask.fill_diagonal_(False)
    return mask


def lm_loss_at_supervised_positions(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    num_items: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy computing logits only where a label exists.

    A full ``[batch, seq, vocab]`` logits tensor is the largest activation of a VLM step (2k
    tokens x 152k vocab x 4 bytes = 1.2 GB per sequence in float32); supervised tokens are a
    small part of it, so we gather their hidden states first and apply the head to those.

    Args:
        hidden_states: ``[batch, seq, hidden]`` last-layer states.
        labels: ``[batch, seq]`` token ids, ``-100`` where unsupervised (not yet shifted).
        lm_head: The output projection.
        num_items: Divide the summed loss by this (token count over gradient accumulation);
            default: the number of supervised tokens here.

    Returns:
        Scalar float32 loss.
    """
    shift_labels = labels[:, 1:]
    supervised = shift_labels != IGNORE_INDEX
    selected = hidden_states[:, :-1][supervised]  # [T, hidden]
    if selected.shape[0] == 0:
        # Keep the graph connected so every rank runs the same backward.
        return hidden_states.sum() * 0.0
    logits = lm_head(selected).float()  # [T, vocab]
    loss = F.cross_entropy(logits, shift_labels[supervised], reduction="sum")
    return loss / (num_items if num_items is not None else selected.shape[0])
