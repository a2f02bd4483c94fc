"""Row 8: RAG answer latency, answering from the question's embedding pass / computing the prompt anew.

examples/rag.py embeds the question (`cafe.inference.embed_keeping_cache`), retrieves, then answers
with a prompt that opens like the embedding prompt (system turn, user header, the question's image
and text). ``answer(..., embedded=...)`` continues from the embedding pass's KV cache
(`cafe.inference.generate_reusing_prefix`): neither that prefix's LLM prefill nor the vision pass
of the question's image runs again. Timed: the example's own ``answer`` with and without
``embedded``, greedy, same prompt; the question is embedded once before (both sides have it).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import harness as H
import torch
import workload as W

from . import alternate, log

if TYPE_CHECKING:
    from run import Bench

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rag.py"


def load_example():
    spec = importlib.util.spec_from_file_location("cafe_rag_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def run(bench: Bench) -> dict:
    rag = load_example()
    model = bench.model
    model.eval()
    passages = [
        rag.Document(source=f"p{i}", text=W.caption(bench.opt("text_tokens") * 3, 80_000 + i)) for i in range(2)
    ]
    (photo,) = W.random_images(1, bench.spec.image_size, seed=3)
    new_tokens = bench.opt("answer_tokens")
    results = {}
    for kind, image in (("image question", photo), ("text question", None)):
        question = W.caption(bench.opt("text_tokens"), 90_000)
        with torch.inference_mode():
            embedded = rag.embed_question(model, question, image)
        last = {}

        def reuse(question=question, image=image, embedded=embedded, last=last):
            last["reuse"] = rag.answer(model, question, [], passages, new_tokens, image, embedded)

        def anew(question=question, image=image, last=last):
            last["anew"] = rag.answer(model, question, [], passages, new_tokens, image, None)

        contestants = [H.Contestant("computed anew", anew), H.Contestant("reusing the question", reuse)]
        log(f"row 8 ({kind}): {new_tokens} new tokens")
        alternate(bench, contestants, count_flops=False)
        plain, fast = contestants
        ratio = H.ratio_stats(plain.times, fast.times)
        prompt_tokens = len(
            model.processor(
                images=[image] if image is not None else None,
                text=rag.build_rag_prompt(model, question, [], passages, image),
            )["input_ids"][0]
        )
        results[kind] = {
            "prompt_tokens": prompt_tokens,
            "reused_tokens": last["reuse"].reused_tokens,
            "new_tokens": new_tokens,
            "reuse_s": fast.summary()["median_s"],
            "anew_s": plain.summary()["median_s"],
            "latency_ratio": ratio["median"],
            "latency_ratio_spread": ratio,
            "identical_answer": last["reuse"].token_ids == last["anew"].token_ids,
            "sides": {c.name: c.summary() for c in contestants},
        }
    image = results["image question"]
    note = (
        f"examples/rag.py's `answer`, greedy, {new_tokens} new tokens, 2 retrieved passages, no retrieved image. "
        f"Image question: {image['reused_tokens']} of {image['prompt_tokens']} prompt tokens come from the question's "
        "embedding pass, and its image skips the vision tower. Ratio = time computed anew / time reusing. Whether "
        "the two answers are token-identical is reported (in bf16 the cached and the recomputed prefix may differ "
        "by rounding, which can flip a near-tie; the float32 test on the tiny model requires identity)."
    )
    return {"status": "measured", "goal_met": None, "result": results, "note": note}
