"""CAFe losses: the objective of paper Eq. 3 and its parts.

- `ContrastiveLoss`: symmetric InfoNCE (Eq. 1) with false-negative masking, hard negatives and a
  fixed or learnable logit scale.
- `lm_loss_at_supervised_positions`: the next-token loss (Eq. 2), logits only where a label is.
- `CafeLoss`: ``L = lm_weight * L_lm + contrastive_weight * L_con`` (Eq. 3) on a model and a
  `cafe.batch.CafeBatch`, negatives gathered across processes. What `CafeTrainer` optimises;
  pass your own subclass as ``CafeTrainer(loss=...)`` to change the objective.
- `CachedCafeLoss`: the same objective with GradCache (a large contrastive batch on the memory of
  a small one), as a property of the loss in the manner of sentence-transformers'
  ``CachedMultipleNegativesRankingLoss``.

Everything computes in float32 whatever the model dtype: a bf16 softmax over a large batch loses
the small differences InfoNCE is made of (the reference computes in bf16; we don't).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.utils import logging

from .distributed import gather_no_grad, gather_with_grad, is_distributed
from .rotation import principal_basis

if TYPE_CHECKING:
    from .batch import CafeBatch, MiniBatches
    from .modeling import CafeForwardOutput

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100


@dataclass
class ContrastiveOutput:
    """Loss and in-batch diagnostics. Accuracies are top-1 retrieval accuracies in each direction."""

    loss: torch.Tensor
    accuracy_query_to_doc: torch.Tensor
    accuracy_doc_to_query: torch.Tensor
    logit_scale: torch.Tensor
    # Matryoshka: the unweighted InfoNCE at each truncated size, detached (``{dim: loss}``).
    loss_by_dim: dict[int, torch.Tensor] | None = None


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between paired query and document embeddings (paper Eq. 1).

    ``loss = (CE(S, arange) + CE(S_docs^T, arange)) / 2`` with ``S = scale * q @ d^T``, q and d
    L2-normalised. Hard negatives add columns to the query->document direction only: they are
    documents without a query, so they have no row in the document->query direction.

    False negatives: two rows whose documents (or queries) are identical would each count the
    other's positive as a negative. Pass ``doc_groups`` / ``query_groups`` (equal ids = identical
    content) and those off-diagonal entries are masked out of the softmax. With ``negative_groups``
    (the same id space as ``doc_groups``), a hard negative that shows a query's own positive (mined
    negatives often are another row's document) is masked out for that query too.

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
        negative_groups: torch.Tensor | None = None,
    ) -> ContrastiveOutput:
        """
        Args:
            query_embeds: ``[N, D]`` (e.g. image embeddings); row i is paired with document i.
            doc_embeds: ``[N, D]`` (e.g. text embeddings).
            negative_embeds: ``[K, D]`` hard negatives, extra columns for every query.
            query_groups, doc_groups: ``[N]`` content ids (equal id = identical content) for
                false-negative masking.
            negative_groups: ``[K]`` content ids of the hard negatives (``doc_groups``' id space).

        Returns:
            `ContrastiveOutput` with the mean of both directions.
        """
        n = query_embeds.shape[0]
        if n < 2 and negative_embeds is None:
            raise ValueError(
                f"The contrastive loss needs at least 2 pairs per batch (got {n}): with one pair there is no "
                "negative. Increase per_device_train_batch_size or add hard negatives."
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
            negative_logits = scale * (q @ neg.T)  # [N, K]
            negative_mask = hard_negative_mask(mask, doc_groups, negative_groups)
            if negative_mask is not None:
                negative_logits = negative_logits.masked_fill(negative_mask, float("-inf"))
            logits_q2d = torch.cat([logits, negative_logits], dim=1)  # [N, N + K]
        if mask is not None and bool(torch.isfinite(logits_q2d).sum(dim=1).eq(1).all()):
            # Every candidate (in-batch and hard negative) is a duplicate of the positive: the loss
            # is 0 and the accuracies 1 by construction, and a counter alone would not show it.
            warnings.warn(
                f"The contrastive loss had nothing to compare: all {n} pairs of this batch show the same image / "
                "text, so false-negative masking removed every negative (hard negatives included) and the term "
                "is 0. Shuffle the data (or deduplicate it) so that a batch mixes different items, or add hard "
                "negatives.",
                stacklevel=2,
            )
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


def hard_negative_mask(
    false_negatives: torch.Tensor | None, doc_groups: torch.Tensor | None, negative_groups: torch.Tensor | None
) -> torch.Tensor | None:
    """``[N, K]`` True where hard negative k shows a document that is a positive for query i.

    Query i's positives are its own document and those of the rows masked as its false negatives
    (``false_negatives``, `false_negative_mask`). A hard negative mined from the same pool as the
    documents is often another row's document: for that row's query it is its positive again, and
    would be pushed away as a negative.
    """
    if doc_groups is None or negative_groups is None:
        return None
    n = doc_groups.shape[0]
    positives = torch.eye(n, dtype=torch.bool, device=doc_groups.device)  # [N, N]: doc j is a positive of query i
    if false_negatives is not None:
        positives |= false_negatives
    shows = doc_groups[:, None] == negative_groups[None, :]  # [N, K]: negative k shows doc j
    # A float product is the boolean "any j" without an [N, N, K] intermediate (N, K grow with
    # the number of processes when negatives are gathered).
    return (positives.float() @ shows.float()) > 0


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


# ----------------------------------------------------------------------------- Eq. 3
CONTRASTIVE_GRADIENTS = ("exact", "reference")
# How `CafeLoss(matryoshka_rotation=True)` finds its rotation: a trained orthogonal parameter, or
# the running principal basis of the training embeddings (`RunningPrincipalBasis`).
MATRYOSHKA_ROTATION_METHODS = ("learned", "principal")
# The principal basis's running statistic averages over about the last 1 / (1 - decay) = 20 steps.
MATRYOSHKA_ROTATION_DECAY = 0.95


@dataclass
class CafeLossOutput:
    """The Eq. 3 total and its parts for one batch.

    Attributes:
        loss: The scalar to backpropagate (float32).
        lm_loss: The LM term before weighting (detached), or ``None`` when it is off.
        contrastive: The InfoNCE result (loss before weighting, in-batch accuracies, logit scale),
            or ``None`` when it is off.
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor | None = None
    contrastive: ContrastiveOutput | None = None
    extra_metrics: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """What `CafeTrainer` logs next to ``loss`` (averaged over the logging interval)."""
        metrics = dict(self.extra_metrics)
        if self.lm_loss is not None:
            metrics["loss_lm"] = self.lm_loss.item()
        if self.contrastive is not None:
            metrics["loss_con"] = self.contrastive.loss.item()
            metrics["acc_q2d"] = self.contrastive.accuracy_query_to_doc.item()
            metrics["acc_d2q"] = self.contrastive.accuracy_doc_to_query.item()
            metrics["logit_scale"] = self.contrastive.logit_scale.item()
            for dim, value in (self.contrastive.loss_by_dim or {}).items():
                metrics[f"loss_con@{dim}"] = value.item()
        return metrics


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class CafeLoss(nn.Module):
    """The CAFe objective (paper Eq. 3): ``lm_weight * L_lm + contrastive_weight * L_con``.

    Called as ``loss(model, batch)``: runs ``model(cafe_batch=batch)`` (one forward call, which is
    what DDP / FSDP / DeepSpeed wrappers see) and combines its `CafeForwardOutput` with
    `combine`. To change the objective, subclass and override `combine` (or `contrastive_term`)
    and pass an instance as ``CafeTrainer(loss=...)``; see docs/training.md.

    Args:
        contrastive_weight: alpha_con (paper: 10); 0 turns the contrastive term off.
        lm_weight: alpha_lm (paper: 1); 0 turns the LM term off.
        contrastive: The InfoNCE module; default ``ContrastiveLoss(temperature, learnable_logit_scale)``.
            Its logit scale, when learnable, is a parameter of this loss: `CafeTrainer` optimises
            it, saves and restores it with the trainer state and writes the learned temperature
            into the saved ``config.cafe``.
        temperature, learnable_logit_scale: For the default ``contrastive`` module.
        mask_false_negatives: Mask identical queries / documents of a batch out of each other's
            negatives (needs the batch's ``query_groups`` / ``doc_groups``).
        gather_negatives: Under ``torch.distributed``, every process's pairs are negatives for
            every other's (gather-then-local-loss, as open_clip).
        contrastive_gradient: With gathered negatives over W processes, every process computes
            the same global loss but backpropagates into its own embeddings only, and DDP averages
            gradients over processes. ``"exact"`` (default) multiplies the local embeddings'
            gradient by W, so the averaged gradient is the gradient of the global loss (what one
            process on the concatenated batch computes). ``"reference"`` leaves it, as the paper's
            code does: the contrastive gradient is then 1/W of the global loss's, i.e. an effective
            ``contrastive_weight / W``. See docs/scaling.md.
        average_tokens_across_processes: Average the LM loss over the supervised tokens of all
            processes (so DDP's gradient average is the global token mean), not per process.
        share_prefix: Let the model compute the prefix an image-embedding sequence shares with its
            LM sequence once (`cafe.shared_prefix`).
        matryoshka_dims: Matryoshka representation learning (Kusupati et al. 2022), as
            sentence-transformers' ``MatryoshkaLoss``: the contrastive term becomes
            ``sum_k w_k * InfoNCE(q[:, :d_k], d[:, :d_k])`` over these sizes, each truncated prefix
            re-normalised, so the first ``d_k`` dimensions embed on their own (``truncate_dim``).
            List the full embedding size too (e.g. ``[896, 512, 256, 128, 64]``), or the full
            vectors get no loss of their own. Applied after negatives are gathered and inside
            `contrastive_term`, so `CachedCafeLoss` caches the gradient of the whole sum. Written
            into the saved ``config.cafe`` (`learned_settings`) and the sentence-transformers
            config. Default: off (the full size only).
        matryoshka_weights: ``w_k`` per size (default 1 each; as sentence-transformers, the terms are
            summed, so the contrastive term's scale grows with the number of sizes: lower
            ``contrastive_weight`` or pass weights summing to 1 to keep the paper's balance).
        matryoshka_rotation: Learn a ``[D, D]`` orthogonal rotation of the embedding space jointly
            with the Matryoshka terms (``D`` = the largest of ``matryoshka_dims``, which must be the
            full embedding size), applied before truncating. A fine-tune cannot reorder the
            coordinates of a pretrained LM's residual stream (docs/sentence-transformers.md), so
            the truncated terms alone leave the first ``k`` coordinates no better than any ``k``;
            the rotation is where the loss can put the directions that matter first. It is
            orthogonal, so the full-size term does not see it and full-size embeddings are
            unchanged: only the truncated terms train it. A parameter of this loss (as a learnable
            logit scale), saved with the trainer state; `CafeTrainer` folds it into the model's
            `embedding_rotation` (the saved ``Dense`` module) when it saves and after training.
        matryoshka_rotation_method: How ``matryoshka_rotation`` finds its rotation. ``"learned"``
            (default): the orthogonal matrix above, a parameter trained by the truncated terms
            at its own learning rate; it turns slowly (a few hundred steps to reach the data's
            principal basis). ``"principal"``: the principal basis of the embeddings this loss
            sees in training, a running statistic (`RunningPrincipalBasis`, like batch norm's
            running mean: a buffer updated on every training batch, no gradient), so the
            truncated terms always train the subspace that currently holds most of the
            embeddings' length, and it follows the model as it changes.
        matryoshka_rotation_decay: For ``"principal"``: the running second moment's decay per
            training batch (each call in training mode; a gradient-accumulation micro-batch
            counts as one). 0.95 averages over about the last 20 batches; the window should hold
            several times the embedding width in vectors (queries, documents and negatives), so
            raise it towards 1 for small batches or wide models.
    """

    def __init__(
        self,
        contrastive_weight: float = 10.0,
        lm_weight: float = 1.0,
        contrastive: ContrastiveLoss | None = None,
        temperature: float = 0.05,
        learnable_logit_scale: bool = False,
        mask_false_negatives: bool = True,
        gather_negatives: bool = True,
        contrastive_gradient: str = "exact",
        average_tokens_across_processes: bool = True,
        share_prefix: bool = True,
        matryoshka_dims: list[int] | tuple[int, ...] | None = None,
        matryoshka_weights: list[float] | tuple[float, ...] | None = None,
        matryoshka_rotation: bool = False,
        matryoshka_rotation_method: str = "learned",
        matryoshka_rotation_decay: float = MATRYOSHKA_ROTATION_DECAY,
    ):
        super().__init__()
        if contrastive_weight < 0 or lm_weight < 0:
            raise ValueError(
                f"Loss weights must be >= 0, got contrastive_weight={contrastive_weight}, lm_weight={lm_weight}."
            )
        if contrastive_weight == 0 and lm_weight == 0:
            raise ValueError(
                "Both loss terms are off (weights 0): give contrastive_weight or lm_weight a positive value."
            )
        if contrastive_gradient not in CONTRASTIVE_GRADIENTS:
            raise ValueError(
                f"contrastive_gradient must be one of {CONTRASTIVE_GRADIENTS}, got {contrastive_gradient!r}."
            )
        self.contrastive_weight = contrastive_weight
        self.lm_weight = lm_weight
        self.contrastive = (
            contrastive if contrastive is not None else ContrastiveLoss(temperature, learnable_logit_scale)
        )
        self.mask_false_negatives = mask_false_negatives
        self.gather_negatives = gather_negatives
        self.contrastive_gradient = contrastive_gradient
        self.average_tokens_across_processes = average_tokens_across_processes
        self.share_prefix = share_prefix
        self.matryoshka_dims, self.matryoshka_weights = _check_matryoshka(matryoshka_dims, matryoshka_weights)
        if matryoshka_rotation_method not in MATRYOSHKA_ROTATION_METHODS:
            raise ValueError(
                f"matryoshka_rotation_method must be one of {MATRYOSHKA_ROTATION_METHODS}, "
                f"got {matryoshka_rotation_method!r}."
            )
        # Either kind is "learned" from the training embeddings: by gradient, or as their statistic.
        self.learned_rotation: nn.Linear | RunningPrincipalBasis | None = None
        if matryoshka_rotation:
            if not self.matryoshka_dims:
                raise ValueError(
                    "matryoshka_rotation=True needs matryoshka_dims: the rotation is trained by the truncated terms "
                    "(the full-size term does not see an orthogonal rotation)."
                )
            size = max(self.matryoshka_dims)
            if matryoshka_rotation_method == "principal":
                self.learned_rotation = RunningPrincipalBasis(size, matryoshka_rotation_decay)
            else:
                self.learned_rotation = learned_rotation(size)

    @property
    def uses_lm(self) -> bool:
        return self.lm_weight > 0

    @property
    def uses_contrastive(self) -> bool:
        return self.contrastive_weight > 0

    @property
    def learned_settings(self) -> dict[str, Any]:
        """CAFe settings this loss gives the model, for the saved ``config.cafe``: the temperature, if
        learnable, and the Matryoshka sizes it trained (which truncations embed on their own)."""
        settings: dict[str, Any] = {}
        if self.uses_contrastive and self.contrastive.log_logit_scale.requires_grad:
            settings.update(contrastive_temperature=self.contrastive.temperature, learnable_logit_scale=True)
        if self.uses_contrastive and self.matryoshka_dims:
            settings["matryoshka_dims"] = list(self.matryoshka_dims)
        return settings

    def forward(self, model: nn.Module, batch: CafeBatch) -> CafeLossOutput:
        """Eq. 3 on ``batch``, with gradients to the model and the loss's own parameters."""
        output = model(cafe_batch=batch, cafe_share_prefix=self.share_prefix)
        return self.combine(output, batch)

    def combine(self, output: CafeForwardOutput, batch: CafeBatch) -> CafeLossOutput:
        """The Eq. 3 total from the model's forward output for ``batch``."""
        total = None
        lm = contrastive = None
        if self.uses_lm and output.lm_loss is not None:
            lm = self.lm_term(output.lm_loss, batch.supervised_tokens)
            total = self.lm_weight * lm
        elif self.uses_lm and self.uses_contrastive:
            warnings.warn(
                "The LM loss is on, but a batch has no LM sequences (text pairs and interleaved records have no "
                "answer to learn; or the collator was built with compute_language_loss=False, or every row was "
                "dropped at max_length): that batch trains contrastively only. Said once; loss_lm is not logged "
                "for such batches.",
                stacklevel=2,
            )
        if self.uses_contrastive:
            contrastive = self.gathered_contrastive_term(
                output.query_embeds,
                output.doc_embeds,
                output.negative_embeds,
                batch.query_groups,
                batch.doc_groups,
                batch.negative_groups,
            )
            weighted = self.contrastive_weight * contrastive.loss
            total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError(
                "The batch gave no loss term: it has no LM sequences and the contrastive loss is off. "
                "Build batches with CafeCollator(compute_language_loss=True) or turn the contrastive loss on."
            )
        return CafeLossOutput(total, None if lm is None else lm.detach(), contrastive)

    # ------------------------------------------------------------------ the two terms
    def lm_term(self, lm_loss: torch.Tensor, local_tokens: int) -> torch.Tensor:
        """The LM mean over this process's tokens, rescaled to the token mean of all processes.

        DDP *averages* gradients over the W processes, which may hold different numbers of
        answer tokens: dividing the local token sum by (global count / W) makes that average the
        gradient of the mean over every token of the global batch.
        """
        if not local_tokens:
            return lm_loss
        return lm_loss * (local_tokens / self.lm_denominator(local_tokens, lm_loss.device))

    def lm_denominator(self, local_tokens: int, device: torch.device) -> float:
        """Token count the LM loss is averaged over (see `lm_term`)."""
        if not (self.average_tokens_across_processes and is_distributed()) or not local_tokens:
            return max(local_tokens, 1)
        count = torch.tensor(float(local_tokens), device=device)
        torch.distributed.all_reduce(count)
        return count.item() / torch.distributed.get_world_size()

    def gathered_contrastive_term(
        self,
        query: torch.Tensor | None,
        doc: torch.Tensor | None,
        negatives: torch.Tensor | None,
        query_groups: torch.Tensor | None,
        doc_groups: torch.Tensor | None,
        negative_groups: torch.Tensor | None,
    ) -> ContrastiveOutput:
        """`contrastive_term` over this process's pairs, or over every process's (gather-then-local-loss)."""
        if query is None or doc is None:
            raise ValueError(
                "The contrastive loss is on but the batch has no pairs; build batches with "
                "CafeCollator(compute_contrastive_loss=True)."
            )
        if not self.mask_false_negatives:
            query_groups = doc_groups = negative_groups = None
        if self.learned_rotation is not None and is_distributed() and not self.gather_negatives:
            # The rotation is no DDP parameter: on local batches every process would turn its own.
            raise ValueError(
                "matryoshka_rotation=True under several processes needs gather_negatives=True, so that every "
                "process learns the same rotation from the same global batch of embeddings."
            )
        if self.gather_negatives and is_distributed():
            world_size = torch.distributed.get_world_size()
            if self.contrastive_gradient == "exact":
                # Only the embeddings' gradient is scaled: the logit scale is not a DDP parameter,
                # every process computes its gradient on the same global loss.
                query, doc = _ScaleGradient.apply(query, world_size), _ScaleGradient.apply(doc, world_size)
                if negatives is not None:
                    negatives = _ScaleGradient.apply(negatives, world_size)
            query, doc = gather_with_grad(query), gather_with_grad(doc)
            if negatives is not None:
                negatives = gather_with_grad(negatives)
            query_groups = None if query_groups is None else gather_no_grad(query_groups)
            doc_groups = None if doc_groups is None else gather_no_grad(doc_groups)
            negative_groups = None if negative_groups is None else gather_no_grad(negative_groups)
        return self.contrastive_term(query, doc, negatives, query_groups, doc_groups, negative_groups)

    def contrastive_term(
        self,
        query: torch.Tensor,
        doc: torch.Tensor,
        negatives: torch.Tensor | None,
        query_groups: torch.Tensor | None,
        doc_groups: torch.Tensor | None,
        negative_groups: torch.Tensor | None = None,
    ) -> ContrastiveOutput:
        """The contrastive objective on the step's embeddings, already gathered from every process.

        ``[N, D]`` queries and documents, ``[K, D]`` hard negatives, and their content ids for
        false-negative masking (``None`` when masking is off). InfoNCE, or with
        ``matryoshka_dims`` the weighted sum over truncated sizes. The piece to override for a
        new contrastive objective (docs/training.md).
        """
        if self.matryoshka_dims:
            return self.matryoshka_term(query, doc, negatives, query_groups, doc_groups, negative_groups)
        return self.contrastive(query, doc, negatives, query_groups, doc_groups, negative_groups)

    def matryoshka_term(
        self,
        query: torch.Tensor,
        doc: torch.Tensor,
        negatives: torch.Tensor | None,
        query_groups: torch.Tensor | None,
        doc_groups: torch.Tensor | None,
        negative_groups: torch.Tensor | None = None,
    ) -> ContrastiveOutput:
        """``sum_k w_k * InfoNCE`` over the truncated prefixes ``[:, :d_k]`` of ``[N, D]`` embeddings.

        `ContrastiveLoss` L2-normalises its inputs, so each prefix is re-normalised. Accuracies are
        those of the largest size; ``loss_by_dim`` holds each size's unweighted loss.
        """
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        if dims is None or weights is None:
            raise ValueError("matryoshka_term needs matryoshka_dims: this loss was built without Matryoshka sizes.")
        size = query.shape[-1]
        too_large = [dim for dim in dims if dim > size]
        if too_large:
            raise ValueError(
                f"matryoshka_dims {too_large} exceed the embedding size {size}: use sizes <= {size} "
                f"(e.g. [{size}, {size // 2}, {size // 4}])."
            )
        if size not in dims and not getattr(self, "_said_full_size_missing", False):
            self._said_full_size_missing = True
            logger.warning(
                f"matryoshka_dims {list(dims)} leave out the full embedding size {size}: the full "
                f"vectors get no loss of their own. Add {size} to train them too."
            )
        if self.learned_rotation is not None:
            rotation = self.rotation_matrix(size)
            if isinstance(self.learned_rotation, RunningPrincipalBasis) and self.training:
                # This step's embeddings join the statistic before the terms use its basis.
                rotation = self.learned_rotation.update(query, doc, negatives)
            # float32 even under autocast, as every part of the loss.
            with torch.autocast(query.device.type, enabled=False):
                query, doc = query.float() @ rotation.T, doc.float() @ rotation.T
                negatives = None if negatives is None else negatives.float() @ rotation.T
        total: torch.Tensor | None = None
        by_dim: dict[int, torch.Tensor] = {}
        largest: tuple[int, ContrastiveOutput] | None = None
        for dim, weight in zip(dims, weights, strict=True):
            out = self.contrastive(
                query[..., :dim],
                doc[..., :dim],
                None if negatives is None else negatives[..., :dim],
                query_groups,
                doc_groups,
                negative_groups,
            )
            by_dim[dim] = out.loss.detach()
            term = weight * out.loss
            total = term if total is None else total + term
            if largest is None or dim > largest[0]:
                largest = (dim, out)
        if total is None or largest is None:  # `_check_matryoshka` rejects an empty list
            raise ValueError("matryoshka_dims is empty: give at least one size.")
        best = largest[1]
        return ContrastiveOutput(
            total, best.accuracy_query_to_doc, best.accuracy_doc_to_query, best.logit_scale, loss_by_dim=by_dim
        )

    @property
    def rotation(self) -> torch.Tensor | None:
        """The learned ``[D, D]`` orthogonal rotation (``matryoshka_rotation``), detached, or None."""
        if self.learned_rotation is None:
            return None
        # A copy: a running principal basis is a buffer that `reset_rotation` overwrites in place.
        return self.learned_rotation.weight.detach().float().clone()

    def rotation_matrix(self, size: int) -> torch.Tensor:
        """The learned rotation, ``[size, size]`` float32 with its gradient: one matrix exponential,
        shared by a step's queries, documents and negatives. A clear error if ``size``, the
        embeddings' width, is not the width it was built for."""
        if self.learned_rotation is None:
            raise ValueError("rotation_matrix needs matryoshka_rotation=True: this loss learns no rotation.")
        rotation = self.learned_rotation.weight
        if rotation.shape[0] != size:
            raise ValueError(
                f"matryoshka_rotation learns a rotation of the full embedding, {rotation.shape[0]} wide (the largest "
                f"of matryoshka_dims), but the embeddings are {size} wide: list the full size {size} in "
                "matryoshka_dims."
            )
        return rotation.float()

    def reset_rotation(self) -> None:
        """Start the rotation again from the identity, after `CafeTrainer` folded it into the model (a
        running principal basis keeps its statistic, re-expressed in the model's new basis)."""
        if isinstance(self.learned_rotation, RunningPrincipalBasis):
            self.learned_rotation.fold()
        elif self.learned_rotation is not None:
            size = self.learned_rotation.weight.shape[0]
            device = self.learned_rotation.weight.device
            with torch.no_grad():
                self.learned_rotation.weight = torch.eye(size, device=device)


class RunningPrincipalBasis(nn.Module):
    """The principal basis of the embeddings a loss sees in training, kept as a running statistic.

    ``weight`` (``[D, D]``) holds, as rows and largest first, the principal directions of an
    exponential moving average of the unit embeddings' (uncentred) second moment: the basis
    `cafe.rotation.principal_rotation` fits on a sample, here over the last ``~1 / (1 - decay)``
    training steps, so it follows the model while it trains. Buffers, not parameters (as batch
    norm's running statistics): no optimizer sees them, and they are saved with the loss's state
    (``cafe_loss.pt`` in a checkpoint), so a resumed run goes on with the same basis.
    """

    second_moment: torch.Tensor  # [D, D] float32 buffers (registered in __init__)
    weight: torch.Tensor

    def __init__(self, size: int, decay: float = MATRYOSHKA_ROTATION_DECAY):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"matryoshka_rotation_decay must be in [0, 1), got {decay}.")
        self.decay = decay
        self.register_buffer("second_moment", torch.zeros(size, size))
        self.register_buffer("weight", torch.eye(size))

    @torch.no_grad()
    def update(self, *embeddings: torch.Tensor | None) -> torch.Tensor:
        """Add a step's ``[N, D]`` embeddings (queries, documents, negatives) to the statistic and
        return the new basis, ``[D, D]`` float32."""
        with torch.autocast(self.weight.device.type, enabled=False):
            vectors = torch.cat([F.normalize(e.detach().float(), dim=-1) for e in embeddings if e is not None])
            if not torch.isfinite(vectors).all():
                # One NaN would stay in the running sum (and in every checkpoint) for good; the
                # step's loss is NaN anyway, which is what the user sees. Keep the last basis.
                logger.warning_once(
                    "Non-finite embeddings in a training batch: the principal rotation skipped them (the loss of that "
                    "batch is not finite either)."
                )
                return self.weight.clone()
            self.second_moment.mul_(self.decay).add_(vectors.T @ vectors / vectors.shape[0], alpha=1.0 - self.decay)
            # The order within (near-)equal eigenvalues and the signs may change from step to step;
            # the truncated terms see only the nested subspaces. Under DDP every process gathered
            # the same embeddings, so every process computes the same statistic and the same
            # basis: nothing to synchronise.
            self.weight.copy_(principal_basis(self.second_moment))
        window = vectors.shape[0] / (1.0 - self.decay)
        if window < self.weight.shape[0]:
            # Past the window's rank the basis is an arbitrary completion: prefixes that reach
            # into it are cut in no particular order (what `principal_rotation` warns of too).
            logger.warning_once(
                f"The principal rotation averages over about {window:.0f} embeddings ({vectors.shape[0]} a batch, "
                f"matryoshka_rotation_decay={self.decay}), fewer than their width {self.weight.shape[0]}: directions "
                "past that count are in no particular order. Raise matryoshka_rotation_decay towards 1 or the batch size."
            )
        # A copy: the loss's graph keeps it for backward, and the buffer changes in place next step.
        return self.weight.clone()

    @torch.no_grad()
    def fold(self) -> None:
        """After the model took ``weight`` as its own rotation: its embeddings now come out in this
        basis, so the statistic is re-expressed in it and the basis restarts at the identity."""
        self.second_moment.copy_(self.weight @ self.second_moment @ self.weight.T)
        self.weight.copy_(torch.eye(self.weight.shape[0], device=self.weight.device))


def learned_rotation(size: int) -> nn.Linear:
    """A ``[size, size]`` linear map kept orthogonal by torch's ``orthogonal`` parametrization
    (the matrix exponential of a learned skew-symmetric matrix), starting at the identity."""
    layer = nn.Linear(size, size, bias=False)
    torch.nn.utils.parametrizations.orthogonal(layer, orthogonal_map="matrix_exp")  # in place
    with torch.no_grad():
        layer.weight = torch.eye(size)  # the parametrization's right inverse
    return layer


def _check_matryoshka(
    dims: Sequence[int] | None, weights: Sequence[float] | None
) -> tuple[tuple[int, ...] | None, tuple[float, ...] | None]:
    """Validated ``(dims, weights)``; ``(None, None)`` when Matryoshka is off."""
    if not dims:
        if weights:
            raise ValueError(
                "matryoshka_weights is set but matryoshka_dims is not: give the sizes the weights are for."
            )
        return None, None
    dims = tuple(int(d) for d in dims)
    if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
        raise ValueError(f"matryoshka_dims must be distinct positive sizes, got {list(dims)}.")
    weights = tuple(float(w) for w in weights) if weights else (1.0,) * len(dims)
    if len(weights) != len(dims):
        raise ValueError(
            f"matryoshka_weights has {len(weights)} entries for {len(dims)} matryoshka_dims: give one weight per size."
        )
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"matryoshka_weights must be >= 0 with at least one > 0, got {list(weights)}.")
    return dims, weights


# ----------------------------------------------------------------------------- GradCache
class RandomState:
    """Snapshot of the CPU and CUDA RNGs, restorable later (for identical dropout masks)."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        )

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


_SIDES = ("query", "doc", "negative")


class CachedCafeLoss(CafeLoss):
    """`CafeLoss` with GradCache (Gao et al. 2021): a large contrastive batch on small memory.

    The contrastive loss couples every pair of the batch, so the whole batch's activations would
    normally live until backward. Here the batch comes as `cafe.batch.MiniBatches` and:

    1. every mini-batch runs without gradient (no activations kept), its RNG state remembered;
    2. the loss is computed on the full batch of cached embeddings, and its gradient with
       respect to those embeddings is cached;
    3. when the trainer calls ``backward`` on the returned loss, a hook re-runs each mini-batch
       with gradient, RNG restored so dropout draws the same masks, and backpropagates
       ``<embeddings, cached gradient>`` plus the mini-batch's share of the LM loss.

    The loss's own parameters (a learnable logit scale) stay in the returned loss's graph and
    get their gradient from that same ``backward``: the total equals `CafeLoss` on the
    concatenated batch, and so do all gradients. Peak memory is one mini-batch's activations plus
    the ``[batch, hidden]`` embeddings; the price is a second forward of every mini-batch.

    Args:
        mini_batch_size: Records per mini-batch. `CafeTrainer` collates its batches into
            mini-batches of this size (`cafe.collator.MiniBatchCollator`).
        **kwargs: As `CafeLoss`.
    """

    def __init__(self, mini_batch_size: int = 8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}.")
        self.mini_batch_size = mini_batch_size

    # A cached loss consumes `MiniBatches` (the trainer collates them for a loss with a
    # `mini_batch_size`), or one `CafeBatch` as a single mini-batch.
    def forward(self, model: nn.Module, batch: MiniBatches | CafeBatch) -> CafeLossOutput:
        from .batch import CafeBatch

        mini_batches = [batch] if isinstance(batch, CafeBatch) else list(batch)
        states, outputs = [], []
        # 1. Every output of the step, without activations. The pass is the one the re-forward
        # repeats (same inputs, same RNG), so the LM loss value comes out of it too.
        with torch.no_grad():
            for mb in mini_batches:
                states.append(RandomState())
                outputs.append(model(cafe_batch=mb, cafe_share_prefix=self.share_prefix))

        # 2. The full-batch loss on cached embeddings and its gradient w.r.t. them.
        leaves = {}
        for side in _SIDES:
            chunks = [getattr(out, f"{side}_embeds") for out in outputs]
            if any(chunk is not None for chunk in chunks):
                leaves[side] = torch.cat([chunk for chunk in chunks if chunk is not None]).requires_grad_()
        total_tokens = sum(mb.supervised_tokens for mb in mini_batches)
        lm_shares = []
        denominator = 1.0
        if self.uses_lm and total_tokens:
            denominator = self.lm_denominator(total_tokens, next(iter(model.parameters())).device)
            lm_shares = [
                None if out.lm_loss is None else out.lm_loss * (mb.supervised_tokens / denominator)
                for out, mb in zip(outputs, mini_batches, strict=True)
            ]
        lm = sum(share for share in lm_shares if share is not None) if lm_shares else None

        total, contrastive, cached_grads = None, None, {}
        if self.uses_contrastive:
            # Concatenated like the leaves: a mini-batch without hard negatives adds no ids.
            groups = {}
            for key in ("query_groups", "doc_groups", "negative_groups"):
                chunks = [getattr(mb, key) for mb in mini_batches if getattr(mb, key) is not None]
                groups[key] = torch.cat(chunks) if chunks else None
            with torch.enable_grad():
                contrastive = self.gathered_contrastive_term(
                    leaves.get("query"),
                    leaves.get("doc"),
                    leaves.get("negative"),
                    groups["query_groups"],
                    groups["doc_groups"],
                    groups["negative_groups"],
                )
                total = self.contrastive_weight * contrastive.loss
                if torch.is_grad_enabled() and leaves:
                    # retain_graph: the trainer's backward on the returned loss walks this graph
                    # again for the loss's own parameters (a learnable logit scale).
                    grads = torch.autograd.grad(total, list(leaves.values()), retain_graph=True, allow_unused=True)
                    cached_grads = {side: g for side, g in zip(leaves, grads, strict=True) if g is not None}
        if lm is not None:
            lm_value = (self.lm_weight * lm).to(torch.float32)
            total = lm_value if total is None else total + lm_value
        if total is None:
            raise ValueError("The batch gave no loss term: no LM sequences and the contrastive loss is off.")

        if torch.is_grad_enabled():
            if not total.requires_grad:
                # An LM-only step: give the hook a tensor to hang on.
                total = total.detach().requires_grad_()
            total.register_hook(
                partial(
                    _regrad_mini_batches,
                    loss=self,
                    model=model,
                    mini_batches=mini_batches,
                    states=states,
                    cached_grads=cached_grads,
                    denominator=denominator,
                )
            )
        return CafeLossOutput(total, None if lm is None else lm.detach(), contrastive)


def _regrad_mini_batches(
    grad_output: torch.Tensor,
    loss: CachedCafeLoss,
    model: nn.Module,
    mini_batches: list,
    states: list[RandomState],
    cached_grads: dict[str, torch.Tensor],
    denominator: float,
) -> None:
    """GradCache step 3, run from the returned loss's backward: ``grad_output`` carries the
    trainer's scaling (gradient accumulation, fp16 loss scale), applied to every surrogate."""
    offsets = dict.fromkeys(cached_grads, 0)
    # Every backward but the last under DDP's no_sync, so gradients are reduced once per step.
    no_sync = getattr(model, "no_sync", None)
    with torch.enable_grad():
        for i, (mb, state) in enumerate(zip(mini_batches, states, strict=True)):
            sync = no_sync() if (no_sync is not None and i < len(mini_batches) - 1) else contextlib.nullcontext()
            with sync:
                with state.restored():
                    out = model(cafe_batch=mb, cafe_share_prefix=loss.share_prefix)
                surrogate = None
                for side, grad in cached_grads.items():
                    embeds = getattr(out, f"{side}_embeds")
                    if embeds is not None:
                        n = embeds.shape[0]
                        term = (embeds * grad[offsets[side] : offsets[side] + n]).sum()
                        surrogate = term if surrogate is None else surrogate + term
                        offsets[side] += n
                if loss.uses_lm and out.lm_loss is not None and mb.supervised_tokens:
                    # The mini-batch's mean over its tokens -> its share of the full-batch mean.
                    term = loss.lm_weight * out.lm_loss * (mb.supervised_tokens / denominator)
                    surrogate = term if surrogate is None else surrogate + term
                if surrogate is not None:
                    (surrogate * grad_output.to(surrogate.dtype)).backward()
