"""Row 4: peak memory of a `CafeTrainer.training_step` vs contrastive batch size, GradCache on and off.

GradCache on = the trainer's `cafe.losses.CachedCafeLoss` on `cafe.batch.MiniBatches` (its
collator wrapped in a `MiniBatchCollator`); off = the plain `CafeLoss` on one `CafeBatch`.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import TYPE_CHECKING

import harness as H
import torch
import workload as W

from . import gc_between, goal_met, log

if TYPE_CHECKING:
    from run import Bench

SKIPPED_NOTE = (
    "Not part of the default CPU run (8..64-pair training steps take another 20+ minutes here): "
    "python benchmarks/run.py --rows 4"
)


def run(bench: Bench) -> dict:
    """Peak memory of a full CafeTrainer.training_step at contrastive batch sizes 8..64, GradCache on.

    A separate model is built for this row on CPU (depth-cut by default: a 64-pair step of the full
    model costs hours on a CPU); on GPU it uses the full shape. Peak memory on CPU = RSS high-water
    mark minus the process's RSS before any model was built (weights + grads + batch +
    activations); on GPU max_memory_allocated.
    """
    from cafe import CafeCollator, CafeTrainer, CafeTrainingArguments

    args, device = bench.args, bench.device
    sizes = [int(s) for s in args.gradcache_sizes.split(",")]
    mini = args.gradcache_mini_batch
    if bench.args.quick:
        spec = bench.spec
    elif device.startswith("cuda"):
        spec = W.spec_for("ov-0.5b", args.vision_layers, args.text_layers)
    else:
        spec = W.spec_for("ov-0.5b", args.gradcache_vision_layers, args.gradcache_text_layers)
    log(f"row 4: GradCache, model {spec.name}, sizes {sizes}, mini-batch {mini}")
    floor = torch.cuda.memory_allocated() if device.startswith("cuda") else H.rss_bytes()
    model, processor = W.build_model(spec, bench.dtype, device, args.attn)
    if args.gradient_checkpointing:
        W.enable_checkpointing(model)
    series = {}
    plain_max = args.gradcache_plain_max
    with tempfile.TemporaryDirectory() as tmp:
        for use_cache in (True, False):
            label = "gradcache" if use_cache else "no gradcache"
            series[label] = {}
            for size in sizes:
                if not use_cache and size > plain_max:
                    continue
                training_args = CafeTrainingArguments(
                    output_dir=tmp,
                    per_device_train_batch_size=size,
                    report_to=[],
                    save_strategy="no",
                    use_cpu=not device.startswith("cuda"),
                    gradient_cache=use_cache,
                    **({"gradient_cache_mini_batch_size": mini} if use_cache else {}),
                )
                trainer = CafeTrainer(
                    model=model, args=training_args, data_collator=CafeCollator(processor, model=model)
                )
                records = W.training_records(size, spec.image_size, bench.opt("caption_tokens"), seed=size)
                # With GradCache on, the trainer's loss is a CachedCafeLoss and its collator a
                # MiniBatchCollator (MiniBatches of `mini` records); off, a plain CafeBatch.
                batch = trainer.data_collator(records)
                peaks, times = [], []

                def step(trainer=trainer, batch=batch):
                    trainer.training_step(model, batch)

                for _ in range(args.gradcache_repeats):
                    gc_between()
                    with H.PeakMemory(device) as mem:
                        t = H.time_call(step, device)
                    model.zero_grad(set_to_none=True)
                    peaks.append(mem.reading.peak_bytes - floor)
                    times.append(t)
                series[label][str(size)] = {"peak_memory_mib": H.mib(min(peaks)), "step_s": statistics.median(times)}
                log(f"  {label} batch {size}: peak {H.mib(min(peaks))} MiB, {statistics.median(times):.1f} s")
                trainer = batch = step = None
    model = None
    gc_between()
    cached = series["gradcache"]
    value = None
    if "8" in cached and "64" in cached:
        value = cached["64"]["peak_memory_mib"] / cached["8"]["peak_memory_mib"]
    met = goal_met(4, value)
    note = (
        f"Model: {spec.name}. Peak = memory above the process floor (before any model was built): weights, "
        f"grads, batch, activations. GradCache mini-batch {mini}."
    )
    if value is None:
        note += " peak(64)/peak(8) needs sizes 8 and 64 (--gradcache-sizes)."
    return {
        "status": "measured",
        "goal_met": met,
        "result": {"model": spec.name, "mini_batch": mini, "series": series, "peak64_over_peak8": value},
        "note": note,
    }
