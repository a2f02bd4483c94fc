"""`cafe.evaluation.language`: perplexity, text-only answers and SQuAD-style answer scoring."""

import math

import pytest
import torch

from cafe.evaluation import (
    answer_contains,
    generate_text_answers,
    normalize_answer,
    perplexity,
    score_answers,
    token_f1,
)


def test_squad_normalisation_and_token_f1():
    assert normalize_answer("The  Capital, of FRANCE!") == "capital of france"
    assert token_f1("Paris", "paris.") == 1.0
    # prediction "capital is paris" vs "paris": precision 1/3, recall 1 -> F1 0.5
    assert token_f1("The capital is Paris.", "Paris") == pytest.approx(0.5)
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "Paris") == 0.0


def test_answers_are_found_as_whole_words_only():
    assert answer_contains("The capital of France is Paris.", "Paris")
    assert answer_contains("It is carbon dioxide, mostly.", "carbon dioxide")
    assert not answer_contains("The answer is 100.", "10")
    with pytest.raises(ValueError, match="empty after normalisation"):
        answer_contains("anything", "the")
    scores = score_answers(["Paris", "It is Berlin.", "Rome"], ["Paris", "Berlin", "Madrid"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["contains"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same length"):
        score_answers(["a"], [])


def test_perplexity_is_the_token_weighted_next_token_loss(cafe_model):
    tokenizer = cafe_model.processor.tokenizer
    texts = ["two small red circles on the left", "a large blue square"]
    result = perplexity(cafe_model, texts, batch_size=1)
    losses, counts = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            losses.append(cafe_model(input_ids=ids, labels=ids).loss.item())  # mean over len - 1 tokens
        counts.append(ids.shape[1] - 1)
    expected = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    assert result["tokens"] == sum(counts)
    assert result["loss"] == pytest.approx(expected, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    # Right padding in a batch changes nothing.
    assert perplexity(cafe_model, texts, batch_size=2)["loss"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="texts is empty"):
        perplexity(cafe_model, [])


def test_text_answers_are_greedy_and_batch_independent(cafe_model):
    tokenizer = cafe_model.processor.tokenizer
    side = tokenizer.padding_side
    questions = ["what colour is it", "how many shapes are there in the picture"]
    batched = generate_text_answers(cafe_model, questions, batch_size=2, max_new_tokens=4)
    one_by_one = [generate_text_answers(cafe_model, [q], batch_size=1, max_new_tokens=4)[0] for q in questions]
    assert batched == one_by_one and all(isinstance(a, str) for a in batched)
    assert tokenizer.padding_side == side
    with pytest.raises(ValueError, match="questions is empty"):
        generate_text_answers(cafe_model, [])
