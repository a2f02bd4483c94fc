"""results.md from results.json: the setup, one table line (or a few) per row, then each row's notes."""

from __future__ import annotations

from rows import GOALS
from rows.training_step import UNSHARED


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


def _met(row: dict) -> str:
    return {True: "yes", False: "**no**", None: "-"}[row.get("goal_met")]


def _goal(i: int) -> str:
    g = GOALS[i]
    return "-" if g["value"] is None else f"{g['op']} {g['value']}"


def markdown(report: dict) -> str:
    meta, rows = report["meta"], {r["id"]: r for r in report["rows"]}
    lines = _setup(meta) + [
        "",
        "| # | Measure | cafe | reference-style | ratio (median [min-max]) | goal | met |",
        "|---|---------|------|-----------------|--------------------------|------|-----|",
    ]
    for i, (label, table_lines) in _TABLE.items():
        r = rows.get(i)
        if r and r["status"] == "measured":
            lines += table_lines(r)
        elif r:
            lines.append(f"| {i} | {label} | {r['status']} | | | {_goal(i)} | - |")
    lines.append("")
    lines.append("## Notes per row")
    lines.append("")
    for i in sorted(rows):
        lines += _notes(i, rows[i])
    return "\n".join(lines) + "\n"


def _setup(meta: dict) -> list[str]:
    m = meta["model"]
    return [
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
    ]


# ---------------------------------------------------------------------------------- table lines per row
def _training_step(r: dict) -> list[str]:
    res = r["result"]
    s = res["sides"]
    u = s[UNSHARED]
    return [
        f"| 1 | training step, {res['pairs_per_step']} pairs (s) | {fmt(s['cafe']['median_s'])} | "
        f"{fmt(s['reference-style']['median_s'])} | {spread(res['step_time_ratio_spread'])} | {_goal(1)} | {_met(r)} |",
        f"| 1 | ... cafe without prefix sharing (s) | {fmt(u['median_s'])} | {fmt(s['reference-style']['median_s'])} "
        f"| {spread(res['unshared_step_time_ratio_spread'])} | | |",
        f"| 1 | ... FLOPs per step (TFLOP) | {fmt(s['cafe']['flops'] / 1e12)} | {fmt(s['reference-style']['flops'] / 1e12)} "
        f"| {fmt(res['flop_ratio'])} | | |",
        f"| 1 | ... step peak memory above start (MiB) | {fmt(s['cafe']['peak_memory_delta_mib'])} | "
        f"{fmt(s['reference-style']['peak_memory_delta_mib'])} | {fmt(res['peak_memory_delta_ratio'])} | | |",
    ]


def _embedding(r: dict) -> list[str]:
    return [
        f"| 2 | {kind}/s ({res['count']} {kind}, ~{res['tokens_per_input']} tokens each) | {fmt(res['cafe_per_s'])} | "
        f"{fmt(res['reference_per_s'])} | {spread(res['throughput_ratio_spread'])} | {_goal(2)} | {_met(r)} |"
        for kind, res in r["result"].items()
    ]


def _lm_loss_memory(r: dict) -> list[str]:
    res = r["result"]
    s = list(res["sides"].values())
    return [
        f"| 3 | LM-loss peak memory, {res['tokens'][0]}x{res['tokens'][1]} tokens, vocab {res['vocab']} (MiB) | "
        f"{fmt(s[2]['peak_memory_delta_mib'])} | {fmt(s[0]['peak_memory_delta_mib'])} (fp32 loss) / "
        f"{fmt(s[1]['peak_memory_delta_mib'])} (bf16) | {spread(res['peak_memory_ratio_spread'])} "
        f"(vs bf16: {fmt(res['peak_memory_ratio_vs_bf16_full_logits'])}) | {_goal(3)} | {_met(r)} |"
    ]


def _gradcache(r: dict) -> list[str]:
    series = r["result"]["series"]
    cached = ", ".join(f"{k}: {v['peak_memory_mib']}" for k, v in series.get("gradcache", {}).items())
    plain = ", ".join(f"{k}: {v['peak_memory_mib']}" for k, v in series.get("no gradcache", {}).items())
    return [
        f"| 4 | peak memory by batch size (MiB) | GradCache {cached} | no GradCache {plain} | "
        f"{fmt(r['result']['peak64_over_peak8'])} | {_goal(4)} | {_met(r)} |"
    ]


def _mfu(r: dict) -> list[str]:
    res = r["result"]
    lines = []
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
                f"{fmt(k['fraction_of_matmul_peak'])}) | {_goal(5) if kind == 'images' else ''} | "
                f"{_met(r) if kind == 'images' else ''} |"
            )
        else:
            lines.append(
                f"| 5 | embedding forward ({kind}): cafe TFLOP/s / best torch.mm TFLOP/s of the run | "
                f"{fmt(k['achieved_tflops'])} | {fmt(res['matmul_peak']['tflops_best'])} | "
                f"{fmt(k['fraction_of_matmul_peak'])} | | |"
            )
    return lines


def _gpu(r: dict) -> list[str]:
    res = r["result"]
    return [
        f"| 6 | {side} on {res['gpu']}: step {fmt(res[side]['step_s'])} s, {fmt(res[side]['samples_per_s'])} pairs/s, "
        f"MFU {fmt(res[side]['mfu_vs_nominal'])} (nominal) / {fmt(res[side]['mfu_vs_measured_matmul'])} (measured mm) "
        "| | | | - | - |"
        for side in ("cafe", "reference-style")
    ]


def _prefix_cache(r: dict) -> list[str]:
    res = r["result"]
    lines = []
    for kind in ("texts", "images"):
        k = res[kind]
        lines.append(
            f"| 7 | {kind}/s, shared-prefix cache ({k['count']} {kind}, ~{k['tokens_per_input']:.0f} tokens, prefix "
            f"{k['prefix_tokens']} = {k['token_fraction_saved']:.1%}, ceiling {k['ceiling']:.2f}x) | "
            f"{fmt(k['cached_per_s'])} | {fmt(k['uncached_per_s'])} (uncached) | {spread(k['throughput_ratio_spread'])} | "
            f"{_goal(7) if kind == 'texts' else ''} | {_met(r) if kind == 'texts' else ''} |"
        )
    b = res.get("length_buckets")
    if b:
        lines.append(
            f"| 7 | texts/s, length buckets ({b['count']} texts of {b['text_tokens_range'][0]}-{b['text_tokens_range'][1]} "
            f"text tokens, batch {b['batch_size']}; padded tokens {b['padded_tokens_length_buckets']:,} vs "
            f"{b['padded_tokens_input_order']:,}, real {b['real_tokens']:,}) | {fmt(b['sorted_per_s'])} | "
            f"{fmt(b['unsorted_per_s'])} (input order) | {spread(b['throughput_ratio_spread'])} | | |"
        )
    return lines


def _rag_reuse(r: dict) -> list[str]:
    return [
        f"| 8 | RAG answer, {kind} ({k['reused_tokens']} of {k['prompt_tokens']} prompt tokens reused, "
        f"{k['new_tokens']} new; identical answer: {k['identical_answer']}) (s) | {fmt(k['reuse_s'])} | "
        f"{fmt(k['anew_s'])} (anew) | {spread(k['latency_ratio_spread'])} | - | - |"
        for kind, k in r["result"].items()
    ]


# Row id -> (what the table calls it when not measured, its table lines when measured).
_TABLE = {
    1: ("training step", _training_step),
    2: ("embedding throughput", _embedding),
    3: ("LM-loss peak memory", _lm_loss_memory),
    4: ("GradCache peak memory vs batch size", _gradcache),
    5: ("embedding FLOP/s vs matmul", _mfu),
    6: ("GPU mode", _gpu),
    7: ("shared-prefix cache", _prefix_cache),
    8: ("RAG answer reuse", _rag_reuse),
}


def _notes(i: int, row: dict) -> list[str]:
    lines = [f"**{i}. {row['name']}** ({row['status']}). {row.get('note', '')}"]
    if row.get("error"):
        lines.append(f"\n```\n{row['error']}\n```")
    if i == 1 and row["status"] == "measured":
        for side, s in row["result"]["sides"].items():
            parts = ", ".join(f"{k} {v / 1e12:.3g}" for k, v in s["flops_by_component"].items())
            lines.append(
                f"\n- {side} TFLOP per step by component: {parts}; executed "
                f"{fmt(s['achieved_tflops'])} TFLOP/s = {fmt(s['hfu_vs_measured_matmul'])} of the torch.mm timed in the same rounds "
                f"(MFU with model FLOPs = 3 x forward: {fmt(s['mfu_vs_measured_matmul'])}); "
                f"{fmt(s['samples_per_s'])} pairs/s"
            )
    lines.append("")
    for name, table in (row.get("profile") or {}).items():
        excerpt = "\n".join(table.splitlines()[:20])
        lines.append(f"<details><summary>profile: {name}</summary>\n\n```\n{excerpt}\n```\n</details>\n")
    return lines
