"""cafe benchmarks: speed and memory, cafe against the reference implementation's way, side by side.

    python benchmarks/run.py                 # headline CPU run, LLaVA-OneVision-0.5B shape, bf16
    python benchmarks/run.py --quick         # tiny checkpoint, seconds; checks the plumbing only
    python benchmarks/run.py --device cuda   # GPU mode (row 6): bf16, sdpa, CUDA events
    python benchmarks/run.py --rows 4        # GradCache memory vs contrastive batch size

Writes ``results.json`` and ``results.md`` to ``--out`` (default ``benchmarks/results/<device>[-quick]``).
See docs/benchmarks.md for the method, the recorded figures and how to read them.

Rows:
 1. training step time, cafe / reference-style, same batch               goal <= 0.5
 2. embedding throughput (images/s, texts/s), cafe batched / reference     goal >= 5x
 3. LM-loss peak memory, long prompt, cafe / full-vocabulary logits        goal <= 0.5
 4. peak memory vs contrastive batch size with GradCache                   goal peak(64) <= 1.3 x peak(8)
 5. achieved FLOP/s of the embedding forward / measured matmul FLOP/s      goal >= 50 % (CPU)
 6. GPU mode: step time, samples/s, MFU                                    (needs --device cuda)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H
import reference_style as R
import torch
import workload as W

SCHEMA_VERSION = 1
ROW_NAMES = {
    1: "Training step time, cafe / reference-style (same batch)",
    2: "Embedding throughput, cafe batched / reference-style (one input per forward)",
    3: "LM-loss peak memory on a long prompt, cafe / full-vocabulary logits",
    4: "Peak memory vs contrastive batch size with GradCache",
    5: "Achieved FLOP/s of the embedding forward / measured matmul FLOP/s",
    6: "GPU mode: step time, samples/s, MFU (bf16, sdpa, CUDA events)",
}
GOALS = {
    1: {"metric": "step_time_ratio", "op": "<=", "value": 0.5},
    2: {"metric": "throughput_ratio", "op": ">=", "value": 5.0},
    3: {"metric": "peak_memory_ratio", "op": "<=", "value": 0.5},
    4: {"metric": "peak64_over_peak8", "op": "<=", "value": 1.3},
    5: {"metric": "fraction_of_matmul_peak", "op": ">=", "value": 0.5},
    6: {"metric": "reported", "op": "n/a", "value": None},
}
# Nominal dense bf16 tensor-core peaks (TFLOP/s) for MFU on known GPUs; the measured torch.mm
# peak of the same run is always reported next to it.
NOMINAL_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0, "L40S": 362.0}

DEFAULTS = {
    #                 CPU headline               --quick (tiny)            --device cuda
    "train_pairs": {"cpu": 2, "quick": 4, "cuda": 8},
    "caption_tokens": {"cpu": 160, "quick": 16, "cuda": 160},
    "embed_images": {"cpu": 2, "quick": 4, "cuda": 32},
    "embed_texts": {"cpu": 32, "quick": 8, "cuda": 256},
    "embed_batch": {"cpu": 16, "quick": 4, "cuda": 32},
    "text_tokens": {"cpu": 14, "quick": 8, "cuda": 14},
    "lm_seq": {"cpu": 2048, "quick": 256, "cuda": 2048},
    "lm_supervised": {"cpu": 256, "quick": 32, "cuda": 256},
    "lm_batch": {"cpu": 1, "quick": 1, "cuda": 4},
    "warmup": {"cpu": 1, "quick": 1, "cuda": 3},
    "repeats": {"cpu": 2, "quick": 2, "cuda": 10},
    "train_repeats": {"cpu": 2, "quick": 2, "cuda": 10},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def goal_met(row_id: int, value) -> bool | None:
    goal = GOALS[row_id]
    if value is None or goal["value"] is None:
        return None
    return bool(value <= goal["value"]) if goal["op"] == "<=" else bool(value >= goal["value"])


_FULL_GC = [True]


def gc_between() -> None:
    """Collect garbage between measured calls (skipped in --quick: ~0.5 s a time with transformers loaded)."""
    if _FULL_GC[0]:
        gc.collect()


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every layer (transformers 5 name; older: gradient_checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / H.MiB, 1)


# ---------------------------------------------------------------------------------- context
class Bench:
    """Shared state: the model (built once), the processor, options, the matmul peak."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        self.spec = W.spec_for("tiny" if args.quick else "ov-0.5b", args.vision_layers, args.text_layers)
        self.floor_rss = H.rss_bytes()
        self._model = None
        self._processor = None
        self.matmul = None

    @property
    def model(self):
        if self._model is None:
            log(f"building model {self.spec.name} ({self.args.dtype}, {self.device}, attn={self.args.attn})")
            t0 = time.perf_counter()
            self._model, self._processor = W.build_model(self.spec, self.dtype, self.device, self.args.attn)
            if self.args.gradient_checkpointing:
                enable_checkpointing(self._model)
            log(f"  built in {time.perf_counter() - t0:.1f} s: {W.count_parameters(self._model)}")
        return self._model

    @property
    def processor(self):
        self.model  # noqa: B018 - builds both
        return self._processor

    def opt(self, name: str):
        value = getattr(self.args, name)
        if value is not None:
            return value
        mode = "quick" if self.args.quick else ("cuda" if self.device.startswith("cuda") else "cpu")
        return DEFAULTS[name][mode]

    def matmul_peak(self) -> dict:
        if self.matmul is None:
            self.matmul = self.measure_matmul_peak()
        return self.matmul

    def measure_matmul_peak(self) -> dict:
        """Best of square torch.mm at a couple of large sizes (the ceiling for MFU-style ratios)."""
        sizes = [512] if self.args.quick else ([8192] if self.device.startswith("cuda") else [2048, 4096])
        runs = [H.matmul_peak(self.device, self.dtype, n=n, repeats=3 if self.args.quick else 5) for n in sizes]
        best = max(runs, key=lambda r: r["tflops_best"])
        best = {**best, "by_size": {str(r["n"]): round(r["tflops_best"], 4) for r in runs}}
        log(f"matmul peak ({self.args.dtype}): {best['by_size']} TFLOP/s")
        return best

    def train_batch(self, pairs: int):
        records = W.training_records(pairs, self.spec.image_size, self.opt("caption_tokens"))
        batch = W.cafe_training_batch(self.model, self.processor, records)
        return W.to_device(batch, self.device, self.dtype)


COMPONENTS = ("model.vision_tower", "model.multi_modal_projector", "model.language_model", "lm_head")


UNSHARED = "cafe, no prefix sharing"


def flop_breakdown(model, fn) -> dict:
    """FLOPs of one call: forward per component (vision tower, projector, LLM, LM head) + backward."""
    with H.FlopCounter(model, COMPONENTS) as counter:
        fn()
    return counter.breakdown()


# ---------------------------------------------------------------------------------- row 1
def cafe_training_step(model, batch, loss) -> float:
    """What `CafeTrainer.training_step` does with a `CafeLoss`: ``loss(model, batch)``, then backward."""
    total = loss(model, batch).loss
    total.backward()
    model.zero_grad(set_to_none=True)
    return float(total.detach())


def row_training_step(bench: Bench) -> dict:
    from cafe.losses import CafeLoss

    model, device = bench.model, bench.device
    model.train()
    pairs = bench.opt("train_pairs")
    batch = bench.train_batch(pairs)
    ref = R.reference_batch(batch)
    # The paper's Eq. 3 weights and temperature, the same as the reference-style side's.
    weights = dict(contrastive_weight=R.REFERENCE_CON_WEIGHT, lm_weight=1.0, temperature=R.REFERENCE_TEMPERATURE)
    shared_loss = CafeLoss(**weights, share_prefix=True).to(device)
    unshared_loss = CafeLoss(**weights, share_prefix=False).to(device)
    contestants = [
        H.Contestant("reference-style", lambda: R.reference_training_step(model, ref)),
        H.Contestant("cafe", lambda: cafe_training_step(model, batch, shared_loss)),
        # Attribution: cafe with the image-embedding and LM sequences in separate LLM passes.
        H.Contestant(UNSHARED, lambda: cafe_training_step(model, batch, unshared_loss)),
    ]
    profiles = {}
    breakdown = {}

    # Warm-up: each side once, counting FLOPs per component and profiling (cheap next to the
    # step at these sizes), so no extra runs are needed for the explanation.
    for c in contestants:
        t0 = time.perf_counter()
        with H.PeakMemory(device):
            table_holder = {}

            def counted(fn=c.fn, name=c.name):
                breakdown[name] = flop_breakdown(model, fn)

            if bench.args.profile:
                table_holder["t"] = H.profile_table(counted, device)
                profiles[c.name] = table_holder["t"]
            else:
                counted()
        c.flops = breakdown[c.name]["total"]
        gc_between()
        log(f"  warm-up {c.name}: {time.perf_counter() - t0:.1f} s, {c.flops / 1e12:.2f} TFLOP")
    for _ in range(bench.opt("warmup") - 1):
        for c in contestants:
            c.fn()
            gc_between()
    # A torch.mm in the same alternation: the utilisation ceiling under the same background load.
    mm = matmul_contestant(bench)
    mm.fn()
    H.run_side_by_side(
        contestants + [mm], device, warmup=0, repeats=bench.opt("train_repeats"), count_flops=False,
        between=gc_between, log=log,
    )
    ref_c, cafe_c, unshared_c = contestants
    ratio = H.ratio_stats(cafe_c.times, ref_c.times)
    unshared_ratio = H.ratio_stats(unshared_c.times, ref_c.times)
    sharing_ratio = H.ratio_stats(cafe_c.times, unshared_c.times)
    mem_ratio = H.ratio_stats(
        [m.delta_bytes for m in cafe_c.memory], [m.delta_bytes for m in ref_c.memory]
    ) if all(m.delta_bytes for m in ref_c.memory + cafe_c.memory) else None
    peak = statistics.median(mm.flops / t / 1e12 for t in mm.times)
    sides = {}
    for c in contestants:
        s = c.summary()
        forward = sum(v for k, v in breakdown[c.name].items() if k.startswith("forward/"))
        s["samples_per_s"] = pairs / s["median_s"]
        # Executed FLOPs (recompute under activation checkpointing included) -> hardware utilisation;
        # model FLOPs = 3 x forward (the usual convention, no recompute) -> MFU.
        s["achieved_tflops"] = c.flops / s["median_s"] / 1e12
        s["model_flops"] = 3 * forward
        s["model_tflops_per_s"] = 3 * forward / s["median_s"] / 1e12
        s["hfu_vs_measured_matmul"] = s["achieved_tflops"] / peak
        s["mfu_vs_measured_matmul"] = s["model_tflops_per_s"] / peak
        s["flops_by_component"] = breakdown[c.name]
        sides[c.name] = s
    result = {
        "pairs_per_step": pairs,
        "batch": W.batch_shape_summary(batch),
        "step_time_ratio": ratio["median"],
        "step_time_ratio_spread": ratio,
        "ratio_of_medians": cafe_c.summary()["median_s"] / ref_c.summary()["median_s"],
        "flop_ratio": cafe_c.flops / ref_c.flops,
        "peak_memory_delta_ratio": None if mem_ratio is None else mem_ratio["median"],
        "matmul_ceiling_interleaved_tflops": peak,
        "unshared_step_time_ratio_spread": unshared_ratio,
        "unshared_flop_ratio": unshared_c.flops / ref_c.flops,
        "shared_vs_unshared_time_ratio_spread": sharing_ratio,
        "shared_prefix": shared_prefix_tokens(batch),
        "sides": sides,
        "gradient_checkpointing": bench.args.gradient_checkpointing,
    }
    met = goal_met(1, ratio["median"])
    shared = result["shared_prefix"]
    note = (
        "All sides: forward + backward of one step on the same CafeCollator batch and weights (no optimizer "
        "step). Reference-style = 3 vision passes + 3 LLM passes + full-vocabulary logits + bf16 InfoNCE; cafe = "
        "one vision pass per distinct image, the image-embedding sequence packed behind its LM sequence so their "
        f"common causal prefix runs once ({shared['shared_prefix_tokens']} of the unshared step's "
        f"{shared['llm_tokens_unshared']} LLM token positions), LM head at supervised positions only, fp32 "
        f"InfoNCE. FLOP ratio cafe/reference = {result['flop_ratio']:.3f} ({result['unshared_flop_ratio']:.3f} "
        f"without prefix sharing, time ratio {unshared_ratio['median']:.3f}); a compute-bound CPU step cannot go "
        "far below its FLOP ratio."
    )
    if met is False:
        note += (
            " Missed: see the profile tables (rows[0].profile) for where the time goes; the LLM and vision work "
            "that remains is the same model computation the reference does once."
        )
    return {"status": "measured", "goal_met": met, "result": result, "note": note,
            "profile": profiles if (met is False or bench.args.quick) else {}}


def shared_prefix_tokens(batch) -> dict:
    """LLM token positions of the step with and without sharing the query / LM causal prefix.

    Counted from the batch's real (unpadded) tokens: per query row paired with an LM row
    (``query_lm_index``), the common prefix of its image-embedding sequence and that LM sequence.
    """
    from cafe.shared_prefix import common_prefix_length

    query, lm = batch.query, batch.lm
    shared = 0
    if lm is not None and batch.query_lm_index is not None:
        for row, lm_row in enumerate(batch.query_lm_index.tolist()):
            if lm_row >= 0:
                shared += common_prefix_length(query.input_ids[row][query.attention_mask[row].bool()],
                                               lm.input_ids[lm_row][lm.attention_mask[lm_row].bool()])
    sequences = list(batch.embedding_sides.values()) + ([lm] if lm is not None else [])
    unshared = sum(int(side.attention_mask.sum()) for side in sequences)
    return {"shared_prefix_tokens": shared, "llm_tokens_unshared": unshared, "llm_tokens_shared": unshared - shared}


# ---------------------------------------------------------------------------------- rows 2 + 5
def _single_inputs(batches: list) -> list[dict]:
    """Split processed batches back into one-input batches, unpadded (what a one-by-one loop feeds)."""
    singles = []
    for batch in batches:
        n = batch["input_ids"].shape[0]
        image_cursor = 0
        for i in range(n):
            length = int(batch["attention_mask"][i].sum())
            item = {
                "input_ids": batch["input_ids"][i : i + 1, :length],
                "attention_mask": batch["attention_mask"][i : i + 1, :length],
            }
            if "pixel_values" in batch and (batch["input_ids"][i] == _image_token_id[0]).any():
                item["pixel_values"] = batch["pixel_values"][image_cursor : image_cursor + 1]
                item["image_sizes"] = batch["image_sizes"][image_cursor : image_cursor + 1]
                image_cursor += 1
            singles.append(item)
    return singles


_image_token_id = [None]


def row_embedding(bench: Bench) -> dict:
    from cafe.prompting import EmbeddingInput

    model, processor, device = bench.model, bench.processor, bench.device
    model.eval()
    _image_token_id[0] = model.config.image_token_id
    n_images, n_texts, batch_size = bench.opt("embed_images"), bench.opt("embed_texts"), bench.opt("embed_batch")
    images = W.random_images(n_images, bench.spec.image_size, seed=1)
    texts = [W.caption(bench.opt("text_tokens"), 50_000 + i) for i in range(n_texts)]
    results = {}
    profiles = {}
    for kind, items in (("images", [EmbeddingInput(image=im) for im in images]),
                        ("texts", [EmbeddingInput(text=t) for t in texts])):
        batches = [W.to_device(b.data if hasattr(b, "data") else b, device, bench.dtype)
                   for b in W.embedding_batches(processor, model, items, batch_size)]
        singles = [W.to_device(s, device, bench.dtype) for s in _single_inputs(batches)]

        last = {}

        def cafe_embed(batches=batches, last=last):
            with torch.inference_mode():
                last["cafe"] = torch.cat([model.get_embeddings(**b) for b in batches])

        def ref_embed(singles=singles, last=last):
            last["ref"] = R.reference_embed(model, singles)

        contestants = [H.Contestant("reference-style", ref_embed), H.Contestant("cafe", cafe_embed)]
        # Row 5's ceiling, timed inside the same alternation (neighbouring runs share the background load).
        contestants.append(matmul_contestant(bench))
        log(f"row 2 ({kind}): {len(items)} inputs, cafe batch {batch_size}")
        H.run_side_by_side(contestants, device, warmup=bench.opt("warmup"), repeats=bench.opt("repeats"),
                           between=gc_between, log=log)
        # Same embeddings either way (up to bf16 noise from padding and batching).
        agreement = float((last["cafe"] * last["ref"]).sum(-1).min())
        ref_c, cafe_c = contestants[:2]
        ratio = H.ratio_stats(ref_c.times, cafe_c.times)  # throughput ratio = time_ref / time_cafe
        per_s = {c.name: len(items) / c.summary()["median_s"] for c in contestants}
        results[kind] = {
            "count": len(items),
            "cafe_batch_size": batch_size,
            "tokens_per_input": int(singles[0]["input_ids"].shape[1]),
            "cafe_per_s": per_s["cafe"],
            "reference_per_s": per_s["reference-style"],
            "throughput_ratio": ratio["median"],
            "throughput_ratio_spread": ratio,
            "min_cosine_cafe_vs_reference": round(agreement, 4),
            "sides": {c.name: c.summary() for c in contestants[:2]},
        }
        if len(contestants) > 2:
            mm = contestants[2]
            results[kind]["matmul_ceiling"] = {**mm.summary(), "per_round_tflops": [mm.flops / t / 1e12 for t in mm.times]}
            results[kind]["per_round_fraction_of_matmul"] = [
                (cafe_c.flops / tc) / (mm.flops / tm) for tc, tm in zip(cafe_c.times, mm.times)
            ]
        if bench.args.profile and not bench.args.quick and ratio["median"] < GOALS[2]["value"]:
            profiles[f"{kind}/reference-style"] = H.profile_table(ref_embed, device)
            profiles[f"{kind}/cafe"] = H.profile_table(cafe_embed, device)
    worst = min(r["throughput_ratio"] for r in results.values())
    met = goal_met(2, worst)
    note = (
        "Timed: the model forwards only, inputs pre-tokenised for both sides (the same prompts). Reference-style: "
        "one input per forward through the full model (LM head included) with output_hidden_states=True. cafe: "
        f"`get_embeddings` on batches of {batch_size} (backbone only, no LM head). The goal is checked on the "
        "worse of images and texts."
    )
    if met is False:
        note += (
            " Missed: on a CPU a forward is compute-bound already at batch 1 for an image (~1.5k tokens), so batching "
            "cannot multiply throughput; what cafe saves is the LM head over every position (~15 % of an image "
            "forward's FLOPs) and per-call overhead. A 5x speed-up is a GPU effect (a batch-1 forward leaves most "
            "of a GPU idle): run --device cuda. Closing it on CPU would need fewer FLOPs per input, e.g. fewer "
            "vision tokens (token pooling) or a shorter prompt."
        )
    return {"status": "measured", "goal_met": met, "result": results, "note": note,
            "profile": profiles}


def matmul_contestant(bench: Bench) -> H.Contestant:
    n = 512 if bench.args.quick else (8192 if bench.device.startswith("cuda") else 4096)
    reps = 3
    a = torch.randn(n, n, device=bench.device, dtype=bench.dtype)
    b = torch.randn(n, n, device=bench.device, dtype=bench.dtype)

    def mm():
        for _ in range(reps):
            torch.mm(a, b)

    c = H.Contestant(f"torch.mm {n}^3 x{reps}", mm)
    c.flops = reps * 2 * n**3
    return c


def row_mfu(bench: Bench, embedding_row: dict | None) -> dict:
    if not embedding_row or embedding_row.get("status") != "measured":
        return {"status": "skipped", "goal_met": None, "result": {}, "note": "needs row 2 (the embedding run)"}
    peak = bench.matmul_peak()
    results = {}
    for kind, r in embedding_row["result"].items():
        side = r["sides"]["cafe"]
        achieved = side["flops"] / side["median_s"] / 1e12
        results[kind] = {
            "flops_per_pass": side["flops"],
            "median_s": side["median_s"],
            "achieved_tflops": achieved,
            "fraction_of_matmul_peak": achieved / peak["tflops_best"],
        }
        if "per_round_fraction_of_matmul" in r:
            # Preferred: against the torch.mm timed in the same alternation (same background load).
            fractions = r["per_round_fraction_of_matmul"]
            results[kind]["fraction_of_interleaved_matmul"] = statistics.median(fractions)
            results[kind]["fraction_of_interleaved_matmul_spread"] = [min(fractions), max(fractions)]
            results[kind]["interleaved_matmul_tflops"] = statistics.median(r["matmul_ceiling"]["per_round_tflops"])
    main = results.get("images", next(iter(results.values())))
    value = main.get("fraction_of_interleaved_matmul", main["fraction_of_matmul_peak"])
    met = goal_met(5, value)
    note = (
        "FLOPs counted with torch.utils.flop_counter (matmuls + attention) on the cafe batched embedding forward "
        "of row 2; achieved = FLOPs / median time. Ceiling: a large square torch.mm (same dtype) timed as a third "
        "contestant inside row 2's alternation, so each round compares runs under the same background load "
        "(the goal uses the median of those per-round fractions); the best torch.mm at the start / end of the run "
        "is reported too. Texts are reported for information."
    )
    if met is False:
        note += " Missed: see row 2's cafe profile for the non-matmul ops that take the rest of the time."
    return {"status": "measured", "goal_met": met, "result": {"matmul_peak": peak, **results,
            "fraction_of_matmul_peak": value}, "note": note}


# ---------------------------------------------------------------------------------- row 3
def row_lm_loss_memory(bench: Bench) -> dict:
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
        H.Contestant("full logits, fp32 loss (stock / reference)", run(lambda: R.full_logits_lm_loss(hidden, labels, head, True))),
        H.Contestant("full logits, bf16 loss", run(lambda: R.full_logits_lm_loss(hidden, labels, head, False))),
        H.Contestant("cafe (logits at supervised positions)", run(lambda: lm_loss_at_supervised_positions(hidden, labels, head))),
    ]
    log(f"row 3: LM loss on [{batch} x {seq}] tokens, {supervised} supervised per sequence, vocab {vocab}")
    H.run_side_by_side(contestants, device, warmup=bench.opt("warmup"), repeats=bench.opt("repeats"),
                       count_flops=False, between=gc_between, log=log)
    stock, bf16, cafe = contestants
    deltas = {c.name: [m.delta_bytes for m in c.memory] for c in contestants}
    ratio_stock = H.ratio_stats(deltas[cafe.name], deltas[stock.name])
    ratio_bf16 = H.ratio_stats(deltas[cafe.name], deltas[bf16.name])
    analytic = {
        "full_logits_bf16_mib": mib(batch * seq * vocab * 2),
        "full_logits_fp32_mib": mib(batch * seq * vocab * 4),
        "supervised_logits_fp32_mib": mib(batch * supervised * vocab * 4),
        "lm_head_weight_grad_mib": mib(vocab * hidden_size * 2),
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


# ---------------------------------------------------------------------------------- row 4
def row_gradcache(bench: Bench) -> dict:
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
        enable_checkpointing(model)
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
                    output_dir=tmp, per_device_train_batch_size=size, report_to=[], save_strategy="no",
                    use_cpu=not device.startswith("cuda"), gradient_cache=use_cache,
                    **({"gradient_cache_mini_batch_size": mini} if use_cache else {}),
                )
                trainer = CafeTrainer(model=model, args=training_args, data_collator=CafeCollator(processor, model=model))
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
                series[label][str(size)] = {"peak_memory_mib": mib(min(peaks)), "step_s": statistics.median(times)}
                log(f"  {label} batch {size}: peak {mib(min(peaks))} MiB, {statistics.median(times):.1f} s")
                trainer = batch = step = None
    model = None
    gc_between()
    cached = series["gradcache"]
    value = None
    if "8" in cached and "64" in cached:
        value = cached["64"]["peak_memory_mib"] / cached["8"]["peak_memory_mib"]
    met = goal_met(4, value)
    note = (f"Model: {spec.name}. Peak = memory above the process floor (before any model was built): weights, "
            f"grads, batch, activations. GradCache mini-batch {mini}.")
    if value is None:
        note += " peak(64)/peak(8) needs sizes 8 and 64 (--gradcache-sizes)."
    return {"status": "measured", "goal_met": met,
            "result": {"model": spec.name, "mini_batch": mini, "series": series, "peak64_over_peak8": value},
            "note": note}


# ---------------------------------------------------------------------------------- row 6
def gpu_nominal_peak(name: str) -> float | None:
    for key, value in NOMINAL_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def row_gpu(bench: Bench, training_row: dict | None) -> dict:
    if not bench.device.startswith("cuda"):
        return {"status": "skipped", "goal_met": None, "result": {},
                "note": "No GPU in this run. GPU mode: python benchmarks/run.py --device cuda (bf16, sdpa, CUDA "
                "events, full 0.5B shape; reports step time, samples/s and MFU)."}
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
    return {"status": "measured", "goal_met": None, "result": result,
            "note": "Row 1's measurements on the GPU. MFU = model FLOPs (3 x counted forward FLOPs) / step time / peak; HFU "
            "counts the executed FLOPs (activation-checkpointing recompute included). Peak: nominal dense bf16 of the "
            "GPU and the measured torch.mm of the same run."}


# ---------------------------------------------------------------------------------- output
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
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "model": dataclasses.asdict(bench.spec) | {"tokens_per_crop": bench.spec.tokens_per_crop},
        "warmup": bench.opt("warmup"),
        "repeats": bench.opt("repeats"),
        "train_repeats": bench.opt("train_repeats"),
        "memory_method": "torch.cuda.max_memory_allocated" if bench.device.startswith("cuda")
        else "RSS high-water mark (VmHWM, reset per call via /proc/self/clear_refs), glibc mmap threshold 1 MiB",
    }
    if bench.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    return meta


def _cpu_name() -> str:
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
    return {"matmul_tflops_by_threads": medians, "n": n, "torch_default_threads": default, "fastest": best,
            "load_average": H.load_average()}


def fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def spread(r: dict | None) -> str:
    if not r or r.get("median") is None:
        return "-"
    return f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]"


def markdown(report: dict) -> str:
    meta, rows = report["meta"], {r["id"]: r for r in report["rows"]}
    m = meta["model"]
    lines = [
        "# cafe benchmark results",
        "",
        f"- Command: `{meta['command']}`",
        (
            f"- Machine: {meta.get('gpu') or meta['cpu']}, {meta['cpu_count']} CPUs, torch threads {meta['torch_threads']}"
            f"; load average at start / end: {meta.get('load_average_start')} / {meta.get('load_average_end')}"
        ),
        (
            f"- torch {meta['torch']}, transformers {meta['transformers']}, python {meta['python']}; dtype {meta['dtype']}, "
            f"attention {meta['attn_implementation']}, gradient checkpointing {meta['gradient_checkpointing']}"
        ),
        (
            f"- Model: {m['name']}: vision {m['vision_layers']} layers x {m['vision_hidden']} (MLP {m['vision_mlp']}, "
            f"{m['vision_heads']} heads, patch {m['patch_size']}, {m['image_size']} px, {m['tokens_per_crop']} tokens/crop); "
            f"text {m['text_layers']} layers x {m['text_hidden']} (MLP {m['text_mlp']}, {m['text_heads']} heads, "
            f"{m['text_kv_heads']} KV heads), vocab {meta.get('vocab_size')}; parameters {meta.get('parameters')}"
        ),
        (
            f"- Matmul ceiling: {fmt(meta.get('matmul_peak', {}).get('tflops_best'))} TFLOP/s at the start, "
            f"{fmt(meta.get('matmul_peak_end', {}).get('tflops_best'))} at the end "
            f"(best square torch.mm of sizes {list(meta.get('matmul_peak', {}).get('by_size', {}))}, {meta['dtype']}); threads probe "
            f"{meta.get('thread_probe', {}).get('matmul_tflops_by_threads')}"
        ),
        (
            f"- Timing: {meta['warmup']} warm-up, {meta['train_repeats']} (row 1) / {meta['repeats']} (rows 2-3) "
            "alternating rounds, medians; ratios per round (neighbouring runs), shown as median [min-max]."
        ),
        f"- Memory: {meta['memory_method']}",
        f"- Wall time of the run: {meta.get('duration_s', 0):.0f} s",
        "",
        "| # | Measure | cafe | reference-style | ratio (median [min-max]) | goal | met |",
        "|---|---------|------|-----------------|--------------------------|------|-----|",
    ]

    def met(row):
        return {True: "yes", False: "**no**", None: "-"}[row.get("goal_met")]

    def goal(i):
        g = GOALS[i]
        return "-" if g["value"] is None else f"{g['op']} {g['value']}"

    r = rows.get(1)
    if r and r["status"] == "measured":
        res = r["result"]
        s = res["sides"]
        lines.append(
            f"| 1 | training step, {res['pairs_per_step']} pairs (s) | {fmt(s['cafe']['median_s'])} | "
            f"{fmt(s['reference-style']['median_s'])} | {spread(res['step_time_ratio_spread'])} | {goal(1)} | {met(r)} |"
        )
        u = s[UNSHARED]
        lines.append(
            f"| 1 | ... cafe without prefix sharing (s) | {fmt(u['median_s'])} | {fmt(s['reference-style']['median_s'])} "
            f"| {spread(res['unshared_step_time_ratio_spread'])} | | |"
        )
        lines.append(
            f"| 1 | ... FLOPs per step (TFLOP) | {fmt(s['cafe']['flops'] / 1e12)} | {fmt(s['reference-style']['flops'] / 1e12)} "
            f"| {fmt(res['flop_ratio'])} | | |"
        )
        lines.append(
            f"| 1 | ... step peak memory above start (MiB) | {fmt(s['cafe']['peak_memory_delta_mib'])} | "
            f"{fmt(s['reference-style']['peak_memory_delta_mib'])} | {fmt(res['peak_memory_delta_ratio'])} | | |"
        )
    elif r:
        lines.append(f"| 1 | training step | {r['status']} | | | {goal(1)} | - |")
    r = rows.get(2)
    if r and r["status"] == "measured":
        for kind, res in r["result"].items():
            lines.append(
                f"| 2 | {kind}/s ({res['count']} {kind}, ~{res['tokens_per_input']} tokens each) | {fmt(res['cafe_per_s'])} | "
                f"{fmt(res['reference_per_s'])} | {spread(res['throughput_ratio_spread'])} | {goal(2)} | {met(r)} |"
            )
    elif r:
        lines.append(f"| 2 | embedding throughput | {r['status']} | | | {goal(2)} | - |")
    r = rows.get(3)
    if r and r["status"] == "measured":
        res = r["result"]
        s = list(res["sides"].values())
        lines.append(
            f"| 3 | LM-loss peak memory, {res['tokens'][0]}x{res['tokens'][1]} tokens, vocab {res['vocab']} (MiB) | "
            f"{fmt(s[2]['peak_memory_delta_mib'])} | {fmt(s[0]['peak_memory_delta_mib'])} (fp32 loss) / "
            f"{fmt(s[1]['peak_memory_delta_mib'])} (bf16) | {spread(res['peak_memory_ratio_spread'])} "
            f"(vs bf16: {fmt(res['peak_memory_ratio_vs_bf16_full_logits'])}) | {goal(3)} | {met(r)} |"
        )
    elif r:
        lines.append(f"| 3 | LM-loss peak memory | {r['status']} | | | {goal(3)} | - |")
    r = rows.get(4)
    if r and r["status"] == "measured":
        series = r["result"]["series"]
        cached = ", ".join(f"{k}: {v['peak_memory_mib']}" for k, v in series.get("gradcache", {}).items())
        plain = ", ".join(f"{k}: {v['peak_memory_mib']}" for k, v in series.get("no gradcache", {}).items())
        lines.append(
            f"| 4 | peak memory by batch size (MiB) | GradCache {cached} | no GradCache {plain} | "
            f"{fmt(r['result']['peak64_over_peak8'])} | {goal(4)} | {met(r)} |"
        )
    elif r:
        lines.append(f"| 4 | GradCache peak memory vs batch size | {r['status']} | | | {goal(4)} | - |")
    r = rows.get(5)
    if r and r["status"] == "measured":
        res = r["result"]
        for kind in ("images", "texts"):
            if kind not in res:
                continue
            k = res[kind]
            if "fraction_of_interleaved_matmul" in k:
                lo, hi = k["fraction_of_interleaved_matmul_spread"]
                lines.append(
                    f"| 5 | embedding forward ({kind}): cafe TFLOP/s / torch.mm TFLOP/s (interleaved) | "
                    f"{fmt(k['achieved_tflops'])} | {fmt(k['interleaved_matmul_tflops'])} | "
                    f"{k['fraction_of_interleaved_matmul']:.3f} [{lo:.3f}-{hi:.3f}] (vs best mm of the run: "
                    f"{fmt(k['fraction_of_matmul_peak'])}) | {goal(5) if kind == 'images' else ''} | "
                    f"{met(r) if kind == 'images' else ''} |"
                )
            else:
                lines.append(
                    f"| 5 | embedding forward ({kind}): cafe TFLOP/s / best torch.mm TFLOP/s of the run | "
                    f"{fmt(k['achieved_tflops'])} | {fmt(res['matmul_peak']['tflops_best'])} | "
                    f"{fmt(k['fraction_of_matmul_peak'])} | | |"
                )
    elif r:
        lines.append(f"| 5 | embedding FLOP/s vs matmul | {r['status']} | | | {goal(5)} | - |")
    r = rows.get(6)
    if r and r["status"] == "measured":
        res = r["result"]
        for side in ("cafe", "reference-style"):
            v = res[side]
            lines.append(
                f"| 6 | {side} on {res['gpu']}: step {fmt(v['step_s'])} s, {fmt(v['samples_per_s'])} pairs/s, "
                f"MFU {fmt(v['mfu_vs_nominal'])} (nominal) / {fmt(v['mfu_vs_measured_matmul'])} (measured mm) | | | | - | - |"
            )
    elif r:
        lines.append(f"| 6 | GPU mode | {r['status']} | | | - | - |")
    lines.append("")
    lines.append("## Notes per row")
    lines.append("")
    for i in sorted(rows):
        row = rows[i]
        lines.append(f"**{i}. {row['name']}** ({row['status']}). {row.get('note', '')}")
        if row.get("error"):
            lines.append(f"\n```\n{row['error']}\n```")
        if i == 1 and row["status"] == "measured":
            for side, s in row["result"]["sides"].items():
                parts = ", ".join(f"{k} {v / 1e12:.3g}" for k, v in s["flops_by_component"].items())
                lines.append(f"\n- {side} TFLOP per step by component: {parts}; executed "
                             f"{fmt(s['achieved_tflops'])} TFLOP/s = {fmt(s['hfu_vs_measured_matmul'])} of the torch.mm timed in the same rounds "
                             f"(MFU with model FLOPs = 3 x forward: {fmt(s['mfu_vs_measured_matmul'])}); "
                             f"{fmt(s['samples_per_s'])} pairs/s")
        lines.append("")
        for name, table in (row.get("profile") or {}).items():
            excerpt = "\n".join(table.splitlines()[:20])
            lines.append(f"<details><summary>profile: {name}</summary>\n\n```\n{excerpt}\n```\n</details>\n")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny checkpoint, seconds; checks the plumbing, not the claims")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    p.add_argument("--rows", default=None,
                   help="comma-separated rows to run (default: all; on CPU without --quick all but 4, which is "
                   "reported as skipped: its 8..64-pair steps take another 20+ minutes, run it with --rows 4)")
    p.add_argument("--out", default=None, help="output folder (results.json, results.md)")
    p.add_argument("--threads", default="auto",
                   help="CPU threads: a number, or 'auto' (1 with --quick, else the faster of 1 and torch's default "
                   "in a matmul probe)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="activation checkpointing is on by default on both sides (the reference recipe uses it; "
                   "without it the reference-style step of the 0.5B shape needs more than 20 GB on CPU)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip torch.profiler tables")
    p.add_argument("--vision-layers", type=int, default=None, help="depth cut (results then say DEPTH-CUT)")
    p.add_argument("--text-layers", type=int, default=None, help="depth cut (results then say DEPTH-CUT)")
    for name in DEFAULTS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"default {DEFAULTS[name]['cpu']} (CPU), {DEFAULTS[name]['quick']} (--quick), "
                       f"{DEFAULTS[name]['cuda']} (cuda)")
    p.add_argument("--gradcache-sizes", default="8,16,32,64")
    p.add_argument("--gradcache-mini-batch", type=int, default=4)
    p.add_argument("--gradcache-repeats", type=int, default=1)
    p.add_argument("--gradcache-plain-max", type=int, default=16,
                   help="largest batch also run without GradCache, for comparison")
    p.add_argument("--gradcache-vision-layers", type=int, default=1, help="row 4 on CPU: depth cut (64-pair steps)")
    p.add_argument("--gradcache-text-layers", type=int, default=1, help="row 4 on CPU: depth cut (64-pair steps)")
    args = p.parse_args(argv)
    if args.quick:
        args.gradcache_sizes = "8,16" if args.gradcache_sizes == "8,16,32,64" else args.gradcache_sizes
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    H.tune_malloc()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda requested but torch.cuda.is_available() is False.", file=sys.stderr)
        return 2
    _FULL_GC[0] = not args.quick
    probe = {}
    if not args.device.startswith("cuda"):
        if args.quick and args.threads == "auto":
            probe = {"matmul_tflops_by_threads": "not probed (--quick uses 1 thread)"}
            threads = 1
        else:
            probe = thread_probe(args, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])
            threads = probe["fastest"] if args.threads == "auto" else int(args.threads)
        torch.set_num_threads(threads)
        probe["chosen"] = threads
        log(f"threads: probe {probe['matmul_tflops_by_threads']} TFLOP/s -> using {threads}")
    cpu_headline = not args.quick and not args.device.startswith("cuda")
    rows_arg = args.rows or ("1,2,3,5,6" if cpu_headline else "1,2,3,4,5,6")
    wanted = {int(x) for x in rows_arg.split(",") if x.strip()}
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / (
        args.device.split(":")[0] + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)

    bench = Bench(args)
    started = time.time()
    report = {"schema_version": SCHEMA_VERSION, "meta": environment(bench, argv), "rows": []}
    report["meta"]["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["meta"]["load_average_start"] = H.load_average()
    report["meta"]["thread_probe"] = probe
    report["meta"]["matmul_peak"] = bench.matmul_peak()
    if wanted - {4, 6}:
        report["meta"]["parameters"] = W.count_parameters(bench.model)
        report["meta"]["vocab_size"] = bench.model.config.text_config.vocab_size

    done: dict[int, dict] = {}

    def run_row(i: int, fn, *fn_args):
        if i not in wanted:
            return
        log(f"row {i}: {ROW_NAMES[i]}")
        t0 = time.perf_counter()
        try:
            row = fn(*fn_args)
        except Exception as err:  # noqa: BLE001 - a failed row is reported, the others still run
            row = {"status": "error", "goal_met": None, "result": {}, "note": f"{type(err).__name__}: {err}",
                   "error": traceback.format_exc()}
            log(f"row {i} failed: {err}")
        row = {"id": i, "name": ROW_NAMES[i], "goal": GOALS[i], **row, "duration_s": round(time.perf_counter() - t0, 1)}
        done[i] = row
        report["rows"].append(row)
        _write(report, out, started)

    # Cheap rows first: their results are written (after every row) before the long training row.
    run_row(3, row_lm_loss_memory, bench)
    run_row(2, row_embedding, bench)
    run_row(5, row_mfu, bench, done.get(2))
    run_row(1, row_training_step, bench)
    run_row(6, row_gpu, bench, done.get(1))
    if 4 in wanted:
        bench._model = None  # free the main model first
        gc_between()
        run_row(4, row_gradcache, bench)
    elif args.rows is None and cpu_headline:
        report["rows"].append({
            "id": 4, "name": ROW_NAMES[4], "goal": GOALS[4], "status": "skipped", "goal_met": None, "result": {},
            "note": "Not part of the default CPU run (8..64-pair training steps take another 20+ minutes here): "
            "python benchmarks/run.py --rows 4",
        })
    # The ceiling again at the end (background load drifts); row 5 uses the better of the two.
    end_peak = bench.measure_matmul_peak()
    report["meta"]["matmul_peak_end"] = end_peak
    if 5 in done and done[5]["status"] == "measured" and end_peak["tflops_best"] > bench.matmul["tflops_best"]:
        for kind in ("images", "texts"):
            if kind in done[5]["result"]:
                entry = done[5]["result"][kind]
                entry["fraction_of_matmul_peak"] = entry["achieved_tflops"] / end_peak["tflops_best"]
        done[5]["result"]["matmul_peak"] = end_peak
        first = done[5]["result"].get("images") or done[5]["result"].get("texts")
        value = first.get("fraction_of_interleaved_matmul", first["fraction_of_matmul_peak"])
        done[5]["result"]["fraction_of_matmul_peak"] = value
        done[5]["goal_met"] = goal_met(5, value)
    report["rows"].sort(key=lambda r: r["id"])
    _write(report, out, started)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    print((out / "results.md").read_text())
    return 0


def _write(report: dict, out: Path, started: float) -> None:
    report["meta"]["duration_s"] = round(time.time() - started, 1)
    report["meta"]["load_average_end"] = H.load_average()
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
