"""Contrastive negatives across processes: the open_clip gather-then-local-loss pattern."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` ([n, ...]) from every rank, in rank order; gradients flow to the local slice.

    Other ranks' slices arrive without gradient; the local slice is put back as the original
    tensor so autograd reaches this rank's model. Every rank then computes the loss on the full
    global batch. That global loss is the same number on every rank, and rank r's backward
    produces only dL/d(its own embeddings); DDP *averages* gradients over the W ranks, so the
    sum over ranks is divided by W. Multiplying the loss by W (see `CafeTrainer`) makes the
    averaged gradient equal the gradient of one process computing the loss on the concatenated
    batch.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_same_batch_size(tensor)
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.detach().contiguous())
    gathered[rank] = tensor
    return torch.cat(gathered, dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    world_size = dist.get_world_size()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def check_same_batch_size(tensor: torch.Tensor) -> None:
    """All ranks must contribute the same number of rows (an uneven last batch would not)."""
    sizes = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    if len(set(counts)) > 1:
        raise ValueError(
            f"Contrastive batch sizes differ across processes {counts}; gathering negatives needs equal sizes. "
            "Keep dataloader_drop_last=True (CafeTrainingArguments' default) so the uneven last batch is dropped."
        )
