"""Row 6, GPU mode: row 1's measurements on a GPU as step time, samples/s, MFU and HFU."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from run import Bench

# Nominal dense bf16 tensor-core peaks (TFLOP/s) for MFU on known GPUs; the measured torch.mm
# peak of the same run is always reported next to it.
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0, "L40S": 362.0}


def gpu_nominal_peak(name: str) -> float | None:
    for key, value in NOMINAL_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def run(bench: Bench, training_row: dict | None) -> dict:
    if not bench.device.startswith("cuda"):
        return {
            "status": "skipped",
            "goal_met": None,
            "result": {},
            "note": "No GPU in this run. GPU mode: python benchmarks/run.py --device cuda (bf16, sdpa, CUDA "
            "events, full 0.5B shape; reports step time, samples/s and MFU).",
        }
    if not training_row or training_row.get("status") != "measured":
        return {"status": "skipped", "goal_met": None, "result": {}, "note": "needs row 1"}
    name = torch.cuda.get_device_name()
    nominal = gpu_nominal_peak(name)
    measured = training_row["result"]["matmul_ceiling_interleaved_tflops"]
    result = {"gpu": name, "nominal_bf16_tflops": nominal, "measured_matmul_tflops": measured}
    for side, s in training_row["result"]["sides"].items():
        result[side] = {
            "step_s": s["median_s"],
            "samples_per_s": s["samples_per_s"],
            "achieved_tflops": s["achieved_tflops"],
            "model_tflops_per_s": s["model_tflops_per_s"],
            "mfu_vs_nominal": None if nominal is None else s["model_tflops_per_s"] / nominal,
            "hfu_vs_nominal": None if nominal is None else s["achieved_tflops"] / nominal,
            "mfu_vs_measured_matmul": s["mfu_vs_measured_matmul"],
            "peak_memory_mib": s["peak_memory_mib"],
        }
    return {
        "status": "measured",
        "goal_met": None,
        "result": result,
        "note": "Row 1's measurements on the GPU. MFU = model FLOPs (3 x counted forward FLOPs) / step time / peak; HFU "
        "counts the executed FLOPs (activation-checkpointing recompute included). Peak: nominal dense bf16 of the "
        "GPU and the measured torch.mm of the same run.",
    }
