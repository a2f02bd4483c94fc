"""What the language model keeps: perplexity, text-only generation and answer scoring.

Contrastive fine-tuning reshapes the LLM's last hidden states; the paper's claim is that the LM
loss of CAFe keeps what the LLM could do. These functions measure that on text alone:

* `perplexity`: exp of the mean next-token loss over held-out texts (no chat template: plain
  English, every token after the first predicted from the ones before);
* `generate_text_answers`: greedy answers to text-only chat questions (the model's generation
  chat template, left padding, as `cafe.evaluation.generate_answers` does for images);
* `token_f1` / `normalize_answer` / `answer_contains`: the SQuAD v1.1 answer normalisation and
  token-overlap F1 (Rajpurkar et al., 2016, official ``evaluate-v1.1.py``), re-implemented here
  because neither transformers nor sentence-transformers ships it.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence
from typing import Any

from ..prompting import check_batch_size, check_sequence, render_chat
from ._common import check_same_length, generation_mode, greedy_answers


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD v1.1 token F1 between two texts after `normalize_answer` (1.0 when both are empty)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = collections.Counter(predicted) & collections.Counter(expected)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def answer_contains(prediction: str, answer: str) -> bool:
    """Whether the normalised `answer` occurs as whole words in the normalised `prediction`.

    Chat models answer "The capital of France is Paris."; an exact match against "Paris" would
    count that as wrong. Whole words only: "10" is not found in "100".
    """
    expected = normalize_answer(answer)
    if not expected:
        raise ValueError(f"The reference answer {answer!r} is empty after normalisation.")
    return f" {expected} " in f" {normalize_answer(prediction)} "


def perplexity(model: Any, texts: Sequence[str], tokenizer: Any = None, batch_size: int = 16) -> dict[str, float]:
    """Perplexity of `model` on plain `texts`: ``exp(total next-token loss / predicted tokens)``.

    Every text is tokenised on its own (no special tokens, no chat template) and each of its
    tokens after the first is predicted from the ones before; the loss is summed over all those
    tokens of all texts, so long and short texts weigh by their length (the usual corpus
    perplexity, not a mean of per-text perplexities).

    Returns:
        ``{"perplexity", "loss" (mean nats per token), "tokens"}``.
    """
    import torch
    import torch.nn.functional as F

    tokenizer = tokenizer if tokenizer is not None else _tokenizer_of(model)
    check_sequence(texts, "texts", "strings")
    check_batch_size(batch_size)
    if len(texts) == 0:
        raise ValueError("texts is empty.")
    total, count = 0.0, 0
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]), add_special_tokens=False, padding=True, return_tensors="pt"
            ).to(model.device)
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            total += loss.item()
            count += int((targets != -100).sum())
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    if count == 0:
        raise ValueError("No text has two tokens or more: there is nothing to predict.")
    return {"perplexity": math.exp(total / count), "loss": total / count, "tokens": count}


def generate_text_answers(
    model: Any,
    questions: Sequence[str],
    processor: Any = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers to text-only questions, one user turn each, under the generation chat template.

    Returns:
        ``len(questions)`` decoded answers (special tokens removed, whitespace stripped).
    """
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None:
        raise ValueError("No processor: pass processor= or load the model with its processor.")
    check_sequence(questions, "questions", "strings")
    check_batch_size(batch_size)
    if len(questions) == 0:
        raise ValueError("questions is empty.")
    tokenizer = getattr(processor, "tokenizer", processor)
    answers: list[str] = []
    with generation_mode(model, tokenizer):
        for start in range(0, len(questions), batch_size):
            prompts = [
                render_chat(
                    processor,
                    [{"role": "user", "content": [{"type": "text", "text": q}]}],
                    add_generation_prompt=True,
                )
                for q in questions[start : start + batch_size]
            ]
            inputs = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
            answers += greedy_answers(model, tokenizer, inputs, max_new_tokens)
    return answers


def score_answers(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match, whole-word containment (`answer_contains`) and token F1 of short answers."""
    check_same_length(answers, references, "answers", "references")
    if len(answers) == 0:
        raise ValueError("answers is empty.")
    pairs = list(zip(answers, references, strict=True))
    return {
        "exact_match": sum(normalize_answer(a) == normalize_answer(r) for a, r in pairs) / len(pairs),
        "contains": sum(answer_contains(a, r) for a, r in pairs) / len(pairs),
        "token_f1": sum(token_f1(a, r) for a, r in pairs) / len(pairs),
    }


def _tokenizer_of(model: Any) -> Any:
    processor = getattr(model, "processor", None)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is None:
        raise ValueError("No tokenizer: pass tokenizer= or load the model with its processor.")
    return tokenizer
