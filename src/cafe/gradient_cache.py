"""GradCache (Gao et al. 2021): a large contrastive batch on the memory of a small one.

The contrastive loss couples every pair of the batch, so the whole batch's activations would
normally have to live until backward. GradCache splits the step in three:

1. embed every mini-batch without gradient (no activations kept), remembering the RNG state;
2. compute the loss on the full batch of (cached) embeddings and its gradient w.r.t. them;
3. re-run each mini-batch with gradient, RNG state restored so dropout draws the same masks,
   and backpropagate ``<embeddings, cached gradient>`` plus the mini-batch's share of the LM loss.

Peak memory is one mini-batch's activations plus the ``[batch, hidden]`` embeddings. The price is
a second forward of the embedding sequences; each mini-batch still runs its images through the
vision tower once per pass and shares those features between its embedding and LM sequences.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_SIDES = ("query", "doc", "negative")
_LM_KEYS = ("input_ids", "attention_mask", "labels", "lm_image_index")


class RandomState:
    """Snapshot of the CPU and CUDA RNGs, restorable later (for identical dropout masks)."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def restored(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


@dataclass
class GradientCacheResult:
    loss: torch.Tensor  # the full-batch loss value (detached), as the plain step would report it
    lm_loss: torch.Tensor | None
    contrastive: object | None  # `ContrastiveOutput`


def supervised_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else 0


def gradient_cache_step(model, mini_batches: list[dict], contrastive_fn, lm_weight: float, contrastive_weight: float,
                        backward, no_sync, lm_denominator=None, share_prefix: bool = True) -> GradientCacheResult:
    """Run one GradCache step over ``mini_batches`` (each a `CafeCollator` batch) and backpropagate.

    Args:
        model: The (possibly DDP / PEFT wrapped) CAFe model; called as ``model(cafe_batch=...)``.
        contrastive_fn: ``(query, doc, negatives, query_groups, doc_groups) -> ContrastiveOutput``
            on full-batch tensors (it may gather across processes), or None to skip the term.
        lm_weight, contrastive_weight: Eq. 3 weights (an LM weight of 0 skips the LM term).
        backward: Called with each scalar to backpropagate (e.g. ``accelerator.backward`` with the
            gradient-accumulation scaling applied).
        no_sync: Context manager factory that suspends DDP gradient sync; every backward but the
            last runs under it, so gradients are reduced once per step.
        lm_denominator: Maps this process's supervised-token count to the LM loss denominator
            (default: itself; across processes see `CafeTrainer._lm_denominator`).
        share_prefix: In the re-forward with gradient, run each record's image-embedding sequence
            in its LM sequence's pass (`cafe.shared_prefix`).
    """
    total_tokens = sum(supervised_tokens(mb) for mb in mini_batches) if lm_weight else 0
    denominator = lm_denominator(total_tokens) if (lm_denominator is not None and lm_weight) else total_tokens
    states, cached = [], {side: [] for side in _SIDES}

    # 1. Embeddings without activations.
    if contrastive_fn is not None:
        with torch.no_grad():
            for mb in mini_batches:
                states.append(RandomState())
                # With prefix sharing the query embeddings come out of the LM pass: run that same
                # pass here (without labels: no LM head), so the re-forward below repeats this
                # computation and its dropout masks exactly. Without it, the embedding sides alone.
                if share_prefix and lm_weight:
                    batch = {k: v for k, v in mb.items() if k != "labels"}
                else:
                    batch = {k: v for k, v in mb.items() if k not in _LM_KEYS}
                out = model(cafe_batch=batch, cafe_share_prefix=share_prefix)
                for side in _SIDES:
                    embeds = getattr(out, f"{side}_embeds")
                    if embeds is not None:
                        cached[side].append(embeds)

    # 2. Full-batch contrastive loss and its gradient w.r.t. the embeddings.
    grads, contrastive = {}, None
    if contrastive_fn is not None:
        leaves = {side: torch.cat(chunks).requires_grad_() for side, chunks in cached.items() if chunks}
        groups = {key: torch.cat([mb[key] for mb in mini_batches]) if key in mini_batches[0] else None
                  for key in ("query_groups", "doc_groups")}
        contrastive = contrastive_fn(leaves["query"], leaves["doc"], leaves.get("negative"),
                                     groups["query_groups"], groups["doc_groups"])
        grads = dict(zip(leaves, torch.autograd.grad(contrastive_weight * contrastive.loss, list(leaves.values()))))
        offsets = {side: 0 for side in grads}

    # 3. Re-forward each mini-batch with gradient and backpropagate its slice.
    lm_total = None
    for i, mb in enumerate(mini_batches):
        batch = dict(mb) if lm_weight else {k: v for k, v in mb.items() if k not in _LM_KEYS}
        if contrastive_fn is None:
            batch = {k: v for k, v in batch.items() if not k.startswith(_SIDES)}
            if "labels" not in batch:
                continue
        rng = states[i].restored() if states else contextlib.nullcontext()
        sync = no_sync() if i < len(mini_batches) - 1 else contextlib.nullcontext()
        with sync:
            with rng:
                out = model(cafe_batch=batch, cafe_share_prefix=share_prefix)
            surrogate = 0.0
            for side in grads:
                embeds = getattr(out, f"{side}_embeds")
                if embeds is not None:
                    n = embeds.shape[0]
                    surrogate = surrogate + (embeds * grads[side][offsets[side] : offsets[side] + n]).sum()
                    offsets[side] += n
            if out.lm_loss is not None and total_tokens:
                # The mini-batch's mean over its tokens -> its share of the full-batch mean.
                share = out.lm_loss * (supervised_tokens(mb) / denominator)
                surrogate = surrogate + lm_weight * share
                lm_total = share.detach() if lm_total is None else lm_total + share.detach()
            if torch.is_tensor(surrogate):
                backward(surrogate)

    loss = torch.zeros(())
    if contrastive is not None:
        loss = loss + contrastive_weight * contrastive.loss.detach().cpu()
    if lm_total is not None:
        loss = loss + lm_weight * lm_total.cpu()
    return GradientCacheResult(loss, lm_total, contrastive)


class MiniBatchCollator:
    """Wraps a `CafeCollator`: splits each batch of records into mini-batches collated separately."""

    def __init__(self, collator, mini_batch_size: int):
        self.collator = collator
        self.mini_batch_size = mini_batch_size

    def __call__(self, records: list[dict]) -> dict:
        size = self.mini_batch_size
        return {"mini_batches": [self.collator(records[i : i + size]) for i in range(0, len(records), size)]}
