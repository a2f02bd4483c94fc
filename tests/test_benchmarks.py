"""benchmarks/run.py --quick: runs end to end on the tiny checkpoint and writes the documented schema.

Schema only: no timing or memory assertion (the numbers of a tiny model on a shared CI machine
mean nothing). The headline figures are in docs/benchmarks.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STATUSES = {"measured", "skipped", "not available", "error"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_meta_states_the_setup(quick_report):
    report, _ = quick_report
    assert report["schema_version"] == 1
    meta = report["meta"]
    for key in (
        "command",
        "device",
        "dtype",
        "torch",
        "transformers",
        "cpu",
        "torch_threads",
        "model",
        "matmul_peak",
        "warmup",
        "repeats",
        "memory_method",
        "parameters",
        "duration_s",
    ):
        assert key in meta, key
    assert meta["quick"] is True and meta["device"] == "cpu"
    assert meta["model"]["name"].startswith("tiny")  # --quick says it is not the real shape
    assert meta["matmul_peak"]["tflops_best"] > 0


def test_every_row_is_reported_with_its_goal(quick_report):
    report, markdown = quick_report
    rows = {row["id"]: row for row in report["rows"]}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6, 7, 8]
    for row in rows.values():
        assert row["status"] in STATUSES, row
        assert row["status"] != "error", row.get("error")
        assert row["goal_met"] in (True, False, None)
        assert {"metric", "op", "value"} <= set(row["goal"])
        assert isinstance(row["note"], str) and row["note"]
    for i in (1, 2, 3, 5, 7, 8):
        assert rows[i]["status"] == "measured"
    assert rows[6]["status"] == "skipped"  # no --device cuda
    assert rows[4]["status"] in ("measured", "not available")
    assert "| # | Measure |" in markdown


def test_row_results_have_the_documented_fields(quick_report):
    report, _ = quick_report
    rows = {row["id"]: row for row in report["rows"]}
    one = rows[1]["result"]
    for key in ("step_time_ratio", "step_time_ratio_spread", "flop_ratio", "sides", "batch"):
        assert key in one
    assert set(one["sides"]) == {"reference-style", "cafe", "cafe, no prefix sharing"}
    for side in one["sides"].values():
        for key in ("median_s", "times_s", "peak_memory_mib", "flops", "flops_by_component", "samples_per_s"):
            assert key in side
        assert side["flops"] > 0
    # The reference-style step does strictly more work: 3 vision passes and full-vocabulary logits.
    assert one["sides"]["reference-style"]["flops"] > one["sides"]["cafe"]["flops"]
    # Sharing the image-embedding / LM prefix removes LLM work: the counted FLOPs show it.
    assert one["sides"]["cafe, no prefix sharing"]["flops"] > one["sides"]["cafe"]["flops"]
    shared = one["shared_prefix"]
    assert 0 < shared["shared_prefix_tokens"] < shared["llm_tokens_unshared"]
    for kind in ("images", "texts"):
        two = rows[2]["result"][kind]
        for key in ("cafe_per_s", "reference_per_s", "throughput_ratio", "throughput_ratio_spread"):
            assert key in two
        # Both ways embed the same inputs: the embeddings agree.
        assert two["min_cosine_cafe_vs_reference"] > 0.99
    three = rows[3]["result"]
    for key in ("peak_memory_ratio", "peak_memory_ratio_vs_bf16_full_logits", "sides", "analytic_sizes"):
        assert key in three
    assert "fraction_of_matmul_peak" in rows[5]["result"]
    seven = rows[7]["result"]
    for kind in ("texts", "images"):
        for key in ("cached_per_s", "uncached_per_s", "throughput_ratio", "token_fraction_saved", "ceiling"):
            assert key in seven[kind]
        # The cached prefix gives the uncached vectors (bf16 rounding aside).
        assert seven[kind]["min_cosine_cached_vs_uncached"] > 0.999
        # It runs on fewer tokens: fewer counted FLOPs.
        assert seven[kind]["flop_ratio"] > 1
    buckets = seven["length_buckets"]
    assert buckets["padded_tokens_length_buckets"] < buckets["padded_tokens_input_order"]
    for kind, eight in rows[8]["result"].items():
        assert 0 < eight["reused_tokens"] < eight["prompt_tokens"], kind
        for key in ("reuse_s", "anew_s", "latency_ratio", "identical_answer"):
            assert key in eight
    if rows[4]["status"] == "measured":
        assert "gradcache" in rows[4]["result"]["series"]
