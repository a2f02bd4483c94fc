"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank takes its slice of the same records, computes the CAFe loss through `CafeTrainer` on a
DDP-wrapped model and backpropagates; rank 0 writes the rank-averaged loss and the (DDP-averaged)
gradients to a file for the test to compare with one process on the concatenated batch.
"""

import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_distributed import RECORDS_PER_RANK, make_trainer, records  # noqa: E402

from cafe.collator import MiniBatchCollator  # noqa: E402
from cafe.losses import CachedCafeLoss  # noqa: E402

# Trainer settings each mode runs with (the single-process reference uses the same, see the test).
MODE_SETTINGS = {
    "reference": {"contrastive_gradient": "reference"},
    "learnable": {"learnable_logit_scale": True},
    "rotation": {"matryoshka_dims": [64, 16, 8], "matryoshka_rotation": True},
    "principal": {
        "matryoshka_dims": [64, 16, 8],
        "matryoshka_rotation": True,
        "matryoshka_rotation_method": "principal",
    },
    "rotation_local": {"matryoshka_dims": [64, 16, 8], "matryoshka_rotation": True, "gather_negatives": False},
}


def main(checkpoint: str, output: str, mode: str):
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    trainer, model = make_trainer(checkpoint, output + ".run", ddp_backend="gloo", **MODE_SETTINGS.get(mode, {}))
    rank, world = dist.get_rank(), dist.get_world_size()
    recs = records()
    sizes = [RECORDS_PER_RANK] * world
    if mode == "uneven":
        sizes[-1] -= 1
    start = sum(sizes[:rank])
    mine = recs[start : start + sizes[rank]]
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.language_model.layers:
            fully_shard(layer)
        ddp = fully_shard(model)
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    try:
        if mode == "gradient_cache":
            cached = CachedCafeLoss(mini_batch_size=1)
            loss = cached(ddp, MiniBatchCollator(trainer.data_collator, 1)(mine)).loss
        else:
            loss = trainer.compute_loss(ddp, trainer.data_collator(mine))
        loss.backward()
    except ValueError as err:
        if rank == 0:
            torch.save({"error": str(err)}, output)
        return
    loss = loss.detach().reshape(1).clone()
    dist.all_reduce(loss)
    # FSDP keeps sharded DTensor gradients: `full_tensor()` (a collective) reassembles them.
    grads = {
        n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    grads.update({f"loss.{n}": p.grad.clone() for n, p in trainer.loss.named_parameters() if p.grad is not None})
    grads.update({f"loss.{n}": b.clone() for n, b in trainer.loss.named_buffers()})  # compared like gradients
    if rank == 0:
        torch.save({"loss": loss.item() / world, "grads": grads}, output)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    dist.barrier() if dist.is_initialized() else None
