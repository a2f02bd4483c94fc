"""Row 3: peak memory of the LM loss on a long prompt, cafe (logits at supervised positions only)
against full-vocabulary logits (the stock / reference loss, fp32 and bf16)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import harness as H
import reference_style as R
import torch

from . import alternate, goal_met, log

if TYPE_CHECKING:
    from run import Bench


def run(bench: Bench) -> dict:
    from cafe.losses import lm_loss_at_supervised_positions

    model, device = bench.model, bench.device
    seq, supervised, batch = bench.opt("lm_seq"), bench.opt("lm_supervised"), bench.opt("lm_batch")
    hidden_size = model.config.text_config.hidden_size
    vocab = model.lm_head.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, seq, hidden_size, generator=gen).to(device=device, dtype=bench.dtype)
    hidden.requires_grad_(True)
    labels = torch.full((batch, seq), -100, dtype=torch.long)
    labels[:, -supervised:] = torch.randint(0, vocab, (batch, supervised), generator=gen)
    labels = labels.to(device)
    head = model.lm_head

    def run(loss_fn):
        def step():
            loss = loss_fn()
            loss.backward()
            hidden.grad = None
            model.zero_grad(set_to_none=True)

        return step

    contestants = [
        H.Contestant(
            "full logits, fp32 loss (stock / reference)", run(lambda: R.full_logits_lm_loss(hidden, labels, head, True))
        ),
        H.Contestant("full logits, bf16 loss", run(lambda: R.full_logits_lm_loss(hidden, labels, head, False))),
        H.Contestant(
            "cafe (logits at supervised positions)", run(lambda: lm_loss_at_supervised_positions(hidden, labels, head))
        ),
    ]
    log(f"row 3: LM loss on [{batch} x {seq}] tokens, {supervised} supervised per sequence, vocab {vocab}")
    alternate(bench, contestants, count_flops=False)
    stock, bf16, cafe = contestants
    deltas = {c.name: [m.delta_bytes for m in c.memory] for c in contestants}
    ratio_stock = H.ratio_stats(deltas[cafe.name], deltas[stock.name])
    ratio_bf16 = H.ratio_stats(deltas[cafe.name], deltas[bf16.name])
    analytic = {
        "full_logits_bf16_mib": H.mib(batch * seq * vocab * 2),
        "full_logits_fp32_mib": H.mib(batch * seq * vocab * 4),
        "supervised_logits_fp32_mib": H.mib(batch * supervised * vocab * 4),
        "lm_head_weight_grad_mib": H.mib(vocab * hidden_size * 2),
    }
    result = {
        "tokens": [batch, seq],
        "supervised_per_sequence": supervised,
        "vocab": vocab,
        "peak_memory_ratio": ratio_stock["median"],
        "peak_memory_ratio_spread": ratio_stock,
        "peak_memory_ratio_vs_bf16_full_logits": ratio_bf16["median"],
        "time_ratio_vs_stock": H.ratio_stats(cafe.times, stock.times)["median"],
        "analytic_sizes": analytic,
        "sides": {c.name: c.summary() for c in contestants},
    }
    met = goal_met(3, ratio_stock["median"])
    note = (
        "Peak memory = high-water mark of forward + backward of the loss head alone (hidden states -> loss -> "
        "grads of hidden states and LM-head weight) minus the memory in use before it. The LM-head weight "
        "gradient (same on every side) is included. Goal checked against the stock/reference loss; the strictest "
        "full-logits variant (bf16 throughout) is reported too."
    )
    return {"status": "measured", "goal_met": met, "result": result, "note": note}
