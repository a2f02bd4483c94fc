"""What a run records about its machine and setup (``meta`` of results.json), and the thread probe."""

from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import statistics
from typing import TYPE_CHECKING

import harness as H
import torch

if TYPE_CHECKING:
    from run import Bench


def environment(bench: Bench, argv: list[str]) -> dict:
    import transformers

    import cafe

    meta = {
        "command": "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in argv),
        "quick": bench.args.quick,
        "device": bench.device,
        "dtype": bench.args.dtype,
        "attn_implementation": bench.args.attn,
        "gradient_checkpointing": bench.args.gradient_checkpointing,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cafe": getattr(cafe, "__version__", None),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "model": dataclasses.asdict(bench.spec) | {"tokens_per_crop": bench.spec.tokens_per_crop},
        "warmup": bench.opt("warmup"),
        "repeats": bench.opt("repeats"),
        "train_repeats": bench.opt("train_repeats"),
        "memory_method": "torch.cuda.max_memory_allocated"
        if bench.device.startswith("cuda")
        else "RSS high-water mark (VmHWM, reset per call via /proc/self/clear_refs), glibc mmap threshold 1 MiB",
    }
    if bench.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def thread_probe(args, dtype) -> dict:
    """Does the thread count matter? torch.mm at 1 thread and at torch's default, alternating.

    On a shared machine (load above the core count) OpenMP threads wait on each other while
    descheduled, and one thread can beat two several times over; on a quiet one two win.
    ``--threads auto`` (the default on CPU) takes the faster; the probe and the choice are recorded.
    """
    default = torch.get_num_threads()
    n = 1024 if args.quick else 2048
    candidates = sorted({1, default})
    out = {str(t): [] for t in candidates}
    for _ in range(3):
        for t in candidates:
            with H.num_threads(t):
                out[str(t)].append(H.matmul_peak("cpu", dtype, n=n, repeats=2)["tflops_best"])
    medians = {t: round(statistics.median(v), 4) for t, v in out.items()}
    best = int(max(medians, key=medians.get))
    return {
        "matmul_tflops_by_threads": medians,
        "n": n,
        "torch_default_threads": default,
        "fastest": best,
        "load_average": H.load_average(),
    }
