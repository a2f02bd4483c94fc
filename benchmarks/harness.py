"""Timing, peak memory, FLOP counting and profiling, on CPU and on CUDA.

- Time: wall clock (``time.perf_counter``) on CPU; CUDA events on GPU. Alternating side by side:
  every round runs each contestant once, the order flipping every round (A B, B A, A B, ...), so
  drift and background load hit both alike. The ratio of a round is taken between its two
  neighbouring runs; we report the median ratio and its min / max over rounds.
- Peak memory on CPU: the kernel's resident-set high-water mark (``VmHWM``), reset before each
  measured call by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0). glibc keeps freed
  medium blocks in its heap, which would hide later allocations from RSS; `tune_malloc` makes
  every block over 1 MiB a separate mapping returned to the kernel on free, so the RSS peak
  follows live tensors. ``tracemalloc`` is no use here: it sees Python objects, not tensor
  storage. Peak memory on CUDA: ``torch.cuda.max_memory_allocated``.
- FLOPs: `FlopCounter`, with the formulas of ``torch.utils.flop_counter`` (matmuls,
  convolutions, attention), plus the CPU flash-attention kernels they do not cover (counted as 4*B*H*Lq*Lk*D forward and twice
  that backward, no recompute, the usual MFU convention).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MiB = 1024 * 1024


# ---------------------------------------------------------------------------------- memory
def tune_malloc(mmap_threshold: int = MiB) -> bool:
    """Fix glibc's mmap threshold (no dynamic growth) so freed large blocks leave the RSS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, mmap_threshold) == 1
    ok &= libc.mallopt(m_trim_threshold, mmap_threshold) == 1
    return bool(ok)


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def mib(n: int | None) -> float | None:
    """Bytes as MiB, one decimal (None stays None)."""
    return None if n is None else round(n / MiB, 1)


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryReading:
    peak_bytes: int | None = None  # process RSS high-water mark (CPU) / max allocated (CUDA)
    start_bytes: int | None = None  # RSS / allocated when the call began
    method: str = ""

    @property
    def delta_bytes(self) -> int | None:
        if self.peak_bytes is None or self.start_bytes is None:
            return None
        return self.peak_bytes - self.start_bytes


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.reading``."""

    def __init__(self, device: str):
        self.device = device
        self.reading = MemoryReading()

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.reading.start_bytes = torch.cuda.memory_allocated()
            self.reading.method = "torch.cuda.max_memory_allocated"
        else:
            ok = _reset_rss_peak()
            self.reading.start_bytes = rss_bytes()
            self.reading.method = "VmHWM (reset via /proc/self/clear_refs)" if ok else "VmHWM (no reset: lifetime peak)"
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.reading.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            kib = _status_kib("VmHWM")
            self.reading.peak_bytes = None if kib is None else kib * 1024
        return False


# ---------------------------------------------------------------------------------- time
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds one call takes (CUDA events on GPU)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class Contestant:
    name: str
    fn: Callable[[], object]
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    memory: list[MemoryReading] = field(default_factory=list)
    flops: int | None = None

    def summary(self) -> dict:
        peaks = [m.peak_bytes for m in self.memory if m.peak_bytes is not None]
        deltas = [m.delta_bytes for m in self.memory if m.delta_bytes is not None]
        return {
            "median_s": statistics.median(self.times) if self.times else None,
            "min_s": min(self.times) if self.times else None,
            "max_s": max(self.times) if self.times else None,
            "times_s": [round(t, 4) for t in self.times],
            "median_process_cpu_s": statistics.median(self.cpu_times) if self.cpu_times else None,
            "peak_memory_mib": round(statistics.median(peaks) / MiB, 1) if peaks else None,
            "peak_memory_delta_mib": round(statistics.median(deltas) / MiB, 1) if deltas else None,
            "memory_method": self.memory[0].method if self.memory else None,
            "flops": self.flops,
        }


def run_side_by_side(
    contestants: list[Contestant],
    device: str,
    warmup: int,
    repeats: int,
    count_flops: bool = True,
    between: Callable[[], None] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Warm up each contestant (the first warm-up also counts its FLOPs), then alternate."""
    for i in range(warmup):
        for c in contestants:
            t0 = time.perf_counter()
            if i == 0 and count_flops:
                c.flops = count_flops_of(c.fn)
            else:
                c.fn()
            synchronize(device)
            if between:
                between()
            log(f"  warm-up {c.name}: {time.perf_counter() - t0:.2f} s")
    for r in range(repeats):
        order = contestants if r % 2 == 0 else list(reversed(contestants))
        for c in order:
            with PeakMemory(device) as mem:
                cpu0 = time.process_time()
                c.times.append(time_call(c.fn, device))
                c.cpu_times.append(time.process_time() - cpu0)
            c.memory.append(mem.reading)
            if between:
                between()
            log(f"  round {r + 1}/{repeats} {c.name}: {c.times[-1]:.3f} s")


def ratio_stats(numerator: list[float], denominator: list[float]) -> dict:
    """Per-round ratios (neighbouring runs) and their median, min and max."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True) if b > 0]
    if not ratios:
        return {"median": None, "min": None, "max": None, "per_round": []}
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "per_round": [round(r, 4) for r in ratios],
    }


# ---------------------------------------------------------------------------------- FLOPs
def _attention_flops(q_shape, k_shape, v_shape) -> int:
    *batch, s_q, d = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    bh = 1
    for b in batch:
        bh *= b
    return 2 * bh * s_q * s_k * d + 2 * bh * s_q * s_k * d_v


def _cpu_flash_fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query, key, value)


def _cpu_flash_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _attention_flops(query, key, value)


def _linear(input, weight, *args, out_shape=None, **kwargs) -> int:
    rows = 1
    for d in input[:-1]:
        rows *= d
    return 2 * rows * weight[0] * weight[1]


def _matmul(a, b, *args, out_shape=None, **kwargs) -> int:
    # Composite ops reach the dispatch mode undecomposed under torch.inference_mode.
    out = 1
    for d in out_shape:
        out *= d
    return 2 * out * a[-1]


def _sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query, key, value)


def _conv2d(input, weight, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(input, weight, out_shape, transposed=False)


def _custom_flop_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {
        aten.linear: _linear,
        aten.matmul: _matmul,
        aten.scaled_dot_product_attention: _sdpa,
        aten.conv2d: _conv2d,
    }
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_bwd
    return mapping


class FlopCounter:
    """Counts FLOPs of everything run inside it, split into forward per model component and backward.

    Uses the formulas of ``torch.utils.flop_counter`` (plus `_custom_flop_mapping`). Forward ops
    are attributed to the innermost of ``components`` (module paths of ``model``) that is running;
    ops run by the autograd engine are "backward" (recomputation under activation checkpointing
    included). torch's own FlopCounterMode attributes backward ops to modules unreliably (its
    per-module sums exceed the total), hence this.
    """

    def __init__(self, model=None, components: tuple[str, ...] = ()):
        self.model = model
        self.components = components
        self.counts: dict[str, int] = {}
        self._stack: list[str] = []
        self._handles = []

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))

    def breakdown(self) -> dict[str, int]:
        out = {f"forward/{c.split('.')[-1]}": int(self.counts.get(f"forward/{c}", 0)) for c in self.components}
        out["forward/other"] = int(self.counts.get("forward/other", 0))
        out["backward"] = int(self.counts.get("backward", 0))
        out["total"] = self.total
        return out

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry, shape_wrapper

        registry = {**flop_registry, **{k: shape_wrapper(v) for k, v in _custom_flop_mapping().items()}}
        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = registry.get(func._overloadpacket)
                if formula is not None:
                    flops = formula(*args, **kwargs, out_val=out)
                    if torch._C._current_graph_task_id() != -1:
                        key = "backward"
                    else:
                        key = "forward/" + (counter._stack[-1] if counter._stack else "other")
                    counter.counts[key] = counter.counts.get(key, 0) + int(flops)
                return out

        for path in self.components:
            module = self.model.get_submodule(path)

            def pre(module, args, path=path):
                self._stack.append(path)

            def post(module, args, output):
                self._stack.pop()

            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post))
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False


def count_flops_of(fn: Callable[[], object]) -> int:
    with FlopCounter() as counter:
        fn()
    return counter.total


# ---------------------------------------------------------------------------------- peak matmul
def matmul_peak(device: str, dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> dict:
    """Best FLOP/s of an n x n x n ``torch.mm`` (the machine's practical matmul ceiling)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    times = [time_call(lambda: torch.mm(a, b), device) for _ in range(repeats)]
    best = min(times)
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "best_s": best,
        "median_s": statistics.median(times),
        "tflops_best": 2 * n**3 / best / 1e12,
        "tflops_median": 2 * n**3 / statistics.median(times) / 1e12,
    }


# ---------------------------------------------------------------------------------- profile
def profile_table(fn: Callable[[], object], device: str, row_limit: int = 15) -> str:
    """torch.profiler table of one call, sorted by self time: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort_keys = ["self_cpu_time_total"]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
        sort_keys = ["self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"]
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    averages = prof.key_averages()
    for key in sort_keys:
        try:
            return averages.table(sort_by=key, row_limit=row_limit, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=row_limit)


@contextlib.contextmanager
def num_threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
