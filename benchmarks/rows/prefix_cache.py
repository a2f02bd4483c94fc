"""Row 7: embedding throughput with the shared-prefix KV cache / without it, and length buckets.

Part A (the goal): `get_embeddings` on the same pre-tokenised batches as row 2, with
``prefix_cache=model.prefix_cache_for(processor)`` against without (the system turn + user header
then runs for every input). Texts of row 2's length (~45 tokens, 15 of them the prefix) and row 2's
images (~1.5k tokens). The ceiling is 1 / (1 - prefix fraction of the tokens), the LLM work saved.

Part B (information): ``model.encode`` end to end (tokenisation included, prefix cache on both
sides) on texts of mixed lengths, batches in input order against batches sorted by length
(``sort_by_length``): the padding it removes.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import harness as H
import torch
import workload as W

from . import alternate, goal_met, log

if TYPE_CHECKING:
    from run import Bench


def _prefix_part(bench: Bench) -> dict:
    from cafe.prompting import EmbeddingInput

    model, processor, device = bench.model, bench.processor, bench.device
    n_images, n_texts, batch_size = bench.opt("embed_images"), bench.opt("embed_texts"), bench.opt("embed_batch")
    images = W.random_images(n_images, bench.spec.image_size, seed=1)
    texts = [W.caption(bench.opt("text_tokens"), 50_000 + i) for i in range(n_texts)]
    from cafe.inference import EmbeddingPrefixCache

    # Forced on every batch (min_prefix_fraction=0): `encode` skips it where the prefix is under 5 %
    # of a batch's tokens (images); the images part shows why.
    cache = EmbeddingPrefixCache(model.prefix_cache_for(processor).prefix_ids, min_prefix_fraction=0)
    results = {}
    for kind, items in (
        ("texts", [EmbeddingInput(text=t) for t in texts]),
        ("images", [EmbeddingInput(image=im) for im in images]),
    ):
        batches = [
            W.to_device(b.data if hasattr(b, "data") else b, device, bench.dtype)
            for b in W.embedding_batches(processor, model, items, batch_size)
        ]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        last = {}

        def uncached(batches=batches, last=last):
            with torch.inference_mode():
                last["uncached"] = torch.cat([model.get_embeddings(**b) for b in batches])

        def cached(batches=batches, last=last):
            with torch.inference_mode():
                last["cached"] = torch.cat([model.get_embeddings(**b, prefix_cache=cache) for b in batches])

        contestants = [H.Contestant("uncached", uncached), H.Contestant("prefix cache", cached)]
        log(f"row 7 ({kind}): {len(items)} inputs, batch {batch_size}, prefix {len(cache)} tokens")
        alternate(bench, contestants)
        plain, fast = contestants
        ratio = H.ratio_stats(plain.times, fast.times)  # throughput ratio = time_uncached / time_cached
        saved = len(cache) * len(items) / tokens
        diff = last["cached"] - last["uncached"]
        results[kind] = {
            "count": len(items),
            "batch_size": batch_size,
            "tokens_per_input": tokens / len(items),
            "prefix_tokens": len(cache),
            "token_fraction_saved": saved,
            "ceiling": 1 / (1 - saved),
            "cached_per_s": len(items) / fast.summary()["median_s"],
            "uncached_per_s": len(items) / plain.summary()["median_s"],
            "throughput_ratio": ratio["median"],
            "throughput_ratio_spread": ratio,
            "min_cosine_cached_vs_uncached": round(float((last["cached"] * last["uncached"]).sum(-1).min()), 6),
            "max_abs_diff_cached_vs_uncached": float(diff.abs().max()),
            "flop_ratio": plain.flops / fast.flops if plain.flops and fast.flops else None,
            "sides": {c.name: c.summary() for c in contestants},
        }
    return results


def _bucket_part(bench: Bench) -> dict:
    model, processor = bench.model, bench.processor
    n, batch_size = bench.opt("bucket_texts"), bench.opt("bucket_batch")
    low, high = 10, bench.opt("bucket_max_tokens")
    rng = random.Random(7)
    lengths = [rng.randint(low, high) for _ in range(n)]
    texts = [W.caption(length, 70_000 + i) for i, length in enumerate(lengths)]
    last = {}

    def padding_of(sort: bool) -> tuple[int, int]:
        """(real, padded) token counts of the batches encode builds."""
        from cafe.inference import approximate_token_lengths, length_sorted_order
        from cafe.prompting import render_embedding_prompts, to_embedding_inputs

        items = to_embedding_inputs(texts)
        counts = approximate_token_lengths(
            processor, items, render_embedding_prompts(processor, items, model.embedding_chat_template)
        )
        order = length_sorted_order(counts) if sort else list(range(n))
        chunks = [[counts[i] for i in order[s : s + batch_size]] for s in range(0, n, batch_size)]
        return sum(map(sum, chunks)), sum(len(c) * max(c) for c in chunks)

    def unsorted():
        last["unsorted"] = model.encode(texts, batch_size=batch_size, sort_by_length=False, show_progress_bar=False)

    def sorted_():
        last["sorted"] = model.encode(texts, batch_size=batch_size, sort_by_length=True, show_progress_bar=False)

    contestants = [H.Contestant("input order", unsorted), H.Contestant("length buckets", sorted_)]
    log(f"row 7 (length buckets): {n} texts of {low}-{high} text tokens, batch {batch_size}")
    alternate(bench, contestants, count_flops=False)
    plain, fast = contestants
    ratio = H.ratio_stats(plain.times, fast.times)
    real, padded_unsorted = padding_of(False)
    _, padded_sorted = padding_of(True)
    return {
        "count": n,
        "batch_size": batch_size,
        "text_tokens_range": [low, high],
        "input_tokens_range": [min(lengths), max(lengths)],
        "real_tokens": real,
        "padded_tokens_input_order": padded_unsorted,
        "padded_tokens_length_buckets": padded_sorted,
        "sorted_per_s": n / fast.summary()["median_s"],
        "unsorted_per_s": n / plain.summary()["median_s"],
        "throughput_ratio": ratio["median"],
        "throughput_ratio_spread": ratio,
        "max_abs_diff_sorted_vs_unsorted": float((last["sorted"] - last["unsorted"]).abs().max()),
        "sides": {c.name: c.summary() for c in contestants},
    }


def run(bench: Bench) -> dict:
    bench.model.eval()
    results = _prefix_part(bench)
    results["length_buckets"] = _bucket_part(bench)
    texts, images = results["texts"], results["images"]
    met = goal_met(7, texts["throughput_ratio"])
    note = (
        f"Part A: `get_embeddings` on the same pre-tokenised batches of {texts['batch_size']}, with the shared-prefix "
        f"cache against without. The prefix (system turn + user header) is {texts['prefix_tokens']} tokens: "
        f"{texts['token_fraction_saved']:.1%} of a text input's {texts['tokens_per_input']:.0f} tokens (ceiling "
        f"{texts['ceiling']:.2f}x) and {images['token_fraction_saved']:.1%} of an image input's "
        f"{images['tokens_per_input']:.0f} (ceiling {images['ceiling']:.3f}x). The goal (>= 1.4x) is on texts. "
        "The cache is forced on both kinds here; `encode` uses it only where the prefix is >= 5 % of a batch's "
        "tokens (texts, not images): behind a cached prefix, attention needs an explicit mask and loses sdpa's "
        "causal fast path, which on a 1.5k-token input costs more than the 1 % saved. "
        f"Agreement: min cosine {texts['min_cosine_cached_vs_uncached']} (texts), "
        f"{images['min_cosine_cached_vs_uncached']} (images) in {bench.args.dtype}. Part B: `encode` end to end on "
        "texts of mixed lengths (prefix cache on both sides), batches in input order against length buckets; "
        "information only."
    )
    return {"status": "measured", "goal_met": met, "result": results, "note": note}
