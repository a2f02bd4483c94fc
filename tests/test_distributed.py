"""Negatives across processes: a real 2-process gloo run equals one process on the whole batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cafe import CafeCollator, CafeForConditionalGeneration, CafeTrainer, CafeTrainingArguments

RECORDS_PER_RANK = 2
NAMES = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def records():
    out = [
        {
            "image": Image.new("RGB", (32, 32), rgb),
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the picture."},
                {"from": "gpt", "value": f"a {name} picture" + " indeed" * i},
            ],
        }
        for i, (name, rgb) in enumerate(NAMES.items())
    ]
    out[0]["negatives"] = ["a purple picture"]
    # Record 0's own answer, mined as a hard negative for record 3 on the other rank: masked for
    # query 0 only if the negatives' content ids are gathered with the negatives.
    out[3]["negatives"] = ["a red picture"]
    return out


def make_trainer(checkpoint, output_dir, **overrides):
    model = CafeForConditionalGeneration.from_pretrained(checkpoint).train()
    kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=RECORDS_PER_RANK,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    kwargs.update(overrides)
    trainer = CafeTrainer(
        model=model, args=CafeTrainingArguments(**kwargs), data_collator=CafeCollator(model.processor, model=model)
    )
    model.train()  # as Trainer's training_step: the loss's running statistics update in training mode
    return trainer, model


def run_two_processes(checkpoint, output, mode):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(Path(__file__).parent / "distributed_worker.py"),
        str(checkpoint),
        str(output),
        mode,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(output)


def single_process_reference(checkpoint, tmp_path, **settings):
    trainer, model = make_trainer(checkpoint, str(tmp_path / "single"), per_device_train_batch_size=4, **settings)
    loss = trainer.compute_loss(model, trainer.data_collator(records()))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"loss.{n}": p.grad.clone() for n, p in trainer.loss.named_parameters() if p.grad is not None})
    grads.update({f"loss.{n}": b.clone() for n, b in trainer.loss.named_buffers()})  # compared like gradients
    return loss.item(), grads


def assert_close_grads(got, expected):
    assert got.keys() == expected.keys() and got
    for name in got:
        err = (got[name] - expected[name]).abs().max().item()
        scale = expected[name].abs().max().item()
        # 1e-7 absolute floor: some gradients are zero in exact arithmetic (a key bias under softmax).
        assert err <= 1e-4 * scale + 1e-7, (name, err, scale)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "gradient_cache", "fsdp", "learnable", "rotation", "principal"])
def test_two_processes_equal_one_process_on_the_concatenated_batch(tiny_checkpoint, tmp_path, mode):
    """contrastive_gradient="exact": the DDP-averaged gradient is the global loss's gradient, the
    learnable logit scale's included (it is not a DDP parameter: no world-size factor on it)."""
    from distributed_worker import MODE_SETTINGS

    result = run_two_processes(tiny_checkpoint, tmp_path / "ddp.pt", mode)
    loss, grads = single_process_reference(tiny_checkpoint, tmp_path, **MODE_SETTINGS.get(mode, {}))
    assert result["loss"] == pytest.approx(loss, rel=1e-4)
    if mode == "learnable":
        assert "loss.contrastive.log_logit_scale" in grads
    if mode == "rotation":  # the learned Matryoshka rotation: every rank turns it by the global loss's gradient
        assert grads["loss.learned_rotation.parametrizations.weight.original"].abs().max() > 0
    if mode == "principal":  # the running principal basis: every rank computes it from the gathered embeddings
        got, expected = result["grads"].pop("loss.learned_rotation.weight"), grads.pop("loss.learned_rotation.weight")
        assert (expected - torch.eye(64)).abs().max() > 1e-3
        for k in (4, 8):  # the leading subspaces (past the 8 records' rank the basis is an arbitrary completion)
            assert torch.allclose(got[:k].T @ got[:k], expected[:k].T @ expected[:k], atol=1e-4)
    assert_close_grads(result["grads"], grads)


@pytest.mark.slow
def test_reference_gradient_scale_is_con_weight_over_world_size(tiny_checkpoint, tmp_path):
    """contrastive_gradient="reference" (the paper's code): 2 processes with con_weight c take the
    same optimizer step as 1 process with c / 2 on the same global batch."""
    result = run_two_processes(tiny_checkpoint, tmp_path / "ref.pt", "reference")
    _, grads = single_process_reference(tiny_checkpoint, tmp_path, contrastive_weight=10.0 / 2)
    _, exact = single_process_reference(tiny_checkpoint, tmp_path, contrastive_weight=10.0)
    assert_close_grads(result["grads"], grads)
    # ... and not the exact gradient (the test would prove nothing if the two coincided).
    with pytest.raises(AssertionError):
        assert_close_grads(result["grads"], exact)


@pytest.mark.slow
def test_a_learned_rotation_without_gathered_negatives_is_a_clear_error(tiny_checkpoint, tmp_path):
    result = run_two_processes(tiny_checkpoint, tmp_path / "local.pt", "rotation_local")
    assert "matryoshka_rotation=True under several processes needs gather_negatives=True" in result["error"]


@pytest.mark.slow
def test_uneven_last_batch_across_processes_is_a_clear_error(tiny_checkpoint, tmp_path):
    result = run_two_processes(tiny_checkpoint, tmp_path / "uneven.pt", "uneven")
    assert "batch sizes differ across processes [2, 1]" in result["error"]
    assert "dataloader_drop_last=True" in result["error"]


def test_gather_on_a_single_process_is_a_no_op(tiny_checkpoint, tmp_path):
    on, model_on = make_trainer(tiny_checkpoint, str(tmp_path / "on"), gather_negatives=True)
    off, _ = make_trainer(tiny_checkpoint, str(tmp_path / "off"), gather_negatives=False)
    batch = on.data_collator(records())
    with torch.no_grad():
        assert on.compute_loss(model_on, batch).item() == off.compute_loss(model_on, batch).item()
    assert on.args.dataloader_drop_last  # the default that keeps per-process batches even
