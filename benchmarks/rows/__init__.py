"""The benchmark's rows, one module each (listed with their goals in run.py), and what they share:
names, goals, logging, garbage collection between measured calls.

Each module's ``run(bench, ...)`` measures its row on the `run.Bench` context and returns the
row's ``status``, ``goal_met``, ``result`` and ``note`` (run.py adds id, name, goal, duration).
"""

from __future__ import annotations

import gc
import time

ROW_NAMES = {
    1: "Training step time, cafe / reference-style (same batch)",
    2: "Embedding throughput, cafe batched / reference-style (one input per forward)",
    3: "LM-loss peak memory on a long prompt, cafe / full-vocabulary logits",
    4: "Peak memory vs contrastive batch size with GradCache",
    5: "Achieved FLOP/s of the embedding forward / measured matmul FLOP/s",
    6: "GPU mode: step time, samples/s, MFU (bf16, sdpa, CUDA events)",
    7: "Embedding throughput with the shared-prefix cache / without (and length buckets on mixed lengths)",
    8: "RAG answer latency, reusing the question's embedding pass / computing the prompt anew",
}
GOALS = {
    1: {"metric": "step_time_ratio", "op": "<=", "value": 0.5},
    2: {"metric": "throughput_ratio", "op": ">=", "value": 5.0},
    3: {"metric": "peak_memory_ratio", "op": "<=", "value": 0.5},
    4: {"metric": "peak64_over_peak8", "op": "<=", "value": 1.3},
    5: {"metric": "fraction_of_matmul_peak", "op": ">=", "value": 0.5},
    6: {"metric": "reported", "op": "n/a", "value": None},
    7: {"metric": "throughput_ratio (texts)", "op": ">=", "value": 1.4},
    8: {"metric": "reported", "op": "n/a", "value": None},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def goal_met(row_id: int, value) -> bool | None:
    goal = GOALS[row_id]
    if value is None or goal["value"] is None:
        return None
    return bool(value <= goal["value"]) if goal["op"] == "<=" else bool(value >= goal["value"])


_FULL_GC = [True]


def set_full_gc(enabled: bool) -> None:
    """Whether `gc_between` collects (run.py turns it off for --quick)."""
    _FULL_GC[0] = enabled


def gc_between() -> None:
    """Collect garbage between measured calls (skipped in --quick: ~0.5 s a time with transformers loaded)."""
    if _FULL_GC[0]:
        gc.collect()


def alternate(bench, contestants: list, count_flops: bool = True) -> None:
    """Run ``contestants`` side by side with the run's warm-up and repeats (every row's timing call)."""
    import harness as H

    H.run_side_by_side(
        contestants,
        bench.device,
        warmup=bench.opt("warmup"),
        repeats=bench.opt("repeats"),
        count_flops=count_flops,
        between=gc_between,
        log=log,
    )
