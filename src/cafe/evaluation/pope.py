"""POPE-style object hallucination probe: yes/no questions answered by ``model.generate``.

POPE (Li et al., 2023) asks "Is there a <object> in the image?" with balanced ground truth and
reports accuracy, precision, recall, F1 and the ratio of "yes" answers, with "yes" as the positive
class (paper Table 6). Free-form answers are mapped to ``"yes"``, ``"no"`` or ``"other"`` by
`parse_yes_no`. Unlike the original POPE script, which counts any answer without a negation as
"yes", unparseable answers stay ``"other"``: they are wrong for accuracy, never a predicted
positive (so they cost recall on "yes" questions but not precision) and are reported as
``other_ratio``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from ._common import (
    check_batch_size,
    check_same_length,
    check_sequence,
    generation_mode,
    greedy_answers,
    load_any_dataset,
    require_columns,
    resolve_image,
    select_rows,
)

if TYPE_CHECKING:
    from PIL import Image
    from transformers import ProcessorMixin

    from ..video import Video

YesNo = Literal["yes", "no", "other"]

# lmms-eval's POPE prompt for LLaVA-style models.
DEFAULT_POPE_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."

# Only words that commit on their own: "Definitely not" must not become a "yes".
_YES_WORDS = {"yes", "yeah", "yep", "yup", "correct", "true", "affirmative"}
_NO_WORDS = {"no", "nope", "nah", "not", "false", "incorrect", "negative", "none", "never", "nothing"}
# Checked first: "I'm not sure" holds "not" but is no answer.
_UNSURE = re.compile(
    r"\b(not sure|unsure|uncertain|unclear|unknown|maybe|perhaps|possibly|can ?not (tell|determine|say)|"
    r"can't (tell|determine|say)|(do not|don't) know|hard to (tell|say)|impossible to (tell|say)|no idea)\b"
)
# Negations anywhere in the first sentence: "There is no dog", "I don't think so", "I can't see one".
_NEGATION = re.compile(
    r"\b(no|not|none|nothing|nope|never|neither|nor|isn't|aren't|wasn't|weren't|doesn't|don't|didn't|"
    r"can't|cannot|without|absent)\b|n't\b"
)
# Affirmations without a yes-word: "There is a red circle.", "I can see two."
_AFFIRMATION = re.compile(
    r"\b(there (is|are)|there's|i (can )?see|it (is|has)|it's|they (are|have)|contains?|shows?|i think so)\b"
)


def parse_yes_no(answer: str | None) -> YesNo:
    """Map a free-form answer to ``"yes"``, ``"no"`` or ``"other"``.

    Rules, on the lower-cased first sentence (as POPE's own script keeps only the first sentence):

    1. empty -> ``"other"``; a first word "yes" (or "yeah", "yep", "correct", ...) -> ``"yes"``;
    2. hedging ("not sure", "no idea", "maybe", "I don't know", "can't tell") -> ``"other"``;
    3. a first word "no" (or "nope", "not", ...) or a negation anywhere ("There is no ...",
       "I don't think so", "isn't") -> ``"no"``;
    4. an affirmation ("There is a ...", "I can see ...") or "yes" anywhere -> ``"yes"``;
    5. anything else -> ``"other"``.
    """
    if answer is None:
        return "other"
    text = answer.strip().lower().replace("\u2019", "'")
    # Only the first sentence counts: "No. But there is a square." is a "no".
    text = re.split(r"(?<!\d)[.!?\n](?!\d)", text, maxsplit=1)[0].strip()
    words = re.findall(r"[a-z']+", text)
    if not words:
        return "other"
    if words[0] in _YES_WORDS:
        return "yes"
    if _UNSURE.search(text):
        return "other"
    if words[0] in _NO_WORDS or _NEGATION.search(text):
        return "no"
    if "yes" in words or _AFFIRMATION.search(text):
        return "yes"
    return "other"


def _label(value: Any, index: int) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return value.strip().lower()
    raise ValueError(f"Label {index} must be 'yes'/'no' or a bool, got {value!r}.")


def pope_metrics(predictions: Sequence[str], labels: Sequence[str | bool]) -> dict[str, float]:
    """POPE metrics with "yes" as the positive class.

    Args:
        predictions: Raw model answers or already parsed ``"yes"``/``"no"``/``"other"`` (parsed
            with `parse_yes_no` either way).
        labels: Ground truth, ``"yes"``/``"no"`` (any case) or booleans.

    Returns:
        ``accuracy`` (correct / all), ``precision`` (TP / predicted yes), ``recall`` (TP / true
        yes), ``f1``, ``yes_ratio`` (predicted yes / all), ``other_ratio`` (unparsed / all) as
        fractions in [0, 1] (0.0 where a denominator is 0), and ``num_questions``.
    """
    check_sequence(predictions, "predictions", "answers")
    check_sequence(labels, "labels", "'yes'/'no' labels")
    if len(predictions) == 0:
        raise ValueError("predictions is empty.")
    check_same_length(predictions, labels, "predictions", "labels")
    parsed = [parse_yes_no(p) for p in predictions]
    truth = [_label(v, i) for i, v in enumerate(labels)]
    tp = sum(p == "yes" and t == "yes" for p, t in zip(parsed, truth, strict=True))
    tn = sum(p == "no" and t == "no" for p, t in zip(parsed, truth, strict=True))
    predicted_yes = parsed.count("yes")
    true_yes = truth.count("yes")
    n = len(parsed)
    precision = tp / predicted_yes if predicted_yes else 0.0
    recall = tp / true_yes if true_yes else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": predicted_yes / n,
        "other_ratio": parsed.count("other") / n,
        "num_questions": n,
    }


def pope_metrics_by_category(
    predictions: Sequence[str], labels: Sequence[str | bool], categories: Sequence[str]
) -> dict[str, dict[str, float]]:
    """`pope_metrics` per category (POPE's random / popular / adversarial) plus their mean.

    Returns:
        ``{category: metrics, ..., "average": mean of each metric over the categories}`` (the
        paper averages the three splits). ``"all"`` holds the metrics of all questions pooled.
    """
    check_sequence(predictions, "predictions", "answers")
    check_sequence(labels, "labels", "'yes'/'no' labels")
    check_sequence(categories, "categories", "category names, one per question")
    check_same_length(predictions, labels, "predictions", "labels")
    check_same_length(predictions, categories, "predictions", "categories")
    if len(predictions) == 0:
        raise ValueError("predictions is empty.")
    result = {}
    for category in dict.fromkeys(categories):
        idx = [i for i, c in enumerate(categories) if c == category]
        result[category] = pope_metrics([predictions[i] for i in idx], [labels[i] for i in idx])
    per_category = list(result.values())
    result["average"] = {key: sum(m[key] for m in per_category) / len(per_category) for key in per_category[0]}
    result["average"]["num_questions"] = len(predictions)
    result["all"] = pope_metrics(predictions, labels)
    return result


def generate_answers(
    model: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    processor: Any = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    prompt_suffix: str = DEFAULT_POPE_PROMPT_SUFFIX,
    image_root: str | os.PathLike | None = None,
    show_progress_bar: bool = True,
) -> list[str]:
    """Greedy answers of ``model.generate`` to one question per image, in batches.

    Each prompt is the processor's chat template applied to a single user turn holding the image
    and ``question + prompt_suffix``, with the generation prompt appended. Batches are left-padded
    (needed for decoder-only generation) and the tokenizer's padding side is restored afterwards.

    Returns:
        ``len(questions)`` decoded answers (special tokens removed, whitespace stripped).
    """
    check_sequence(images, "images", "PIL images or image paths")
    return generate_visual_answers(
        model,
        images,
        questions,
        "image",
        processor,
        batch_size,
        max_new_tokens,
        prompt_suffix,
        image_root,
        show_progress_bar,
    )


def generate_visual_answers(
    model: Any,
    visuals: Sequence[Any],
    questions: Sequence[str],
    modality: str = "image",
    processor: ProcessorMixin | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    prompt_suffix: str = "",
    root: str | os.PathLike | None = None,
    show_progress_bar: bool = True,
) -> list[str]:
    """`generate_answers` for images (``modality="image"``) or videos (``"video"``).

    Videos are anything `cafe.video.load_video` takes; their frames are sampled by the model's
    rule (`cafe.video.frame_sampling` under its ``video_num_frames`` / ``video_fps``), as
    ``encode`` samples them.
    """
    from tqdm.auto import tqdm

    from ..prompting import load_image, process_prompts, render_chat
    from ..video import frame_sampling, load_video

    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None:
        raise ValueError("No processor: pass processor= or load the model with its processor.")
    if modality not in ("image", "video"):
        raise ValueError(f"modality must be 'image' or 'video', got {modality!r}.")
    check_sequence(questions, "questions", "strings")
    check_batch_size(batch_size)
    if len(questions) == 0:
        raise ValueError("questions is empty.")
    check_same_length(visuals, questions, f"{modality}s", "questions")
    sampling = frame_sampling(processor, getattr(model, "cafe_settings", None))
    tokenizer = processor.tokenizer
    starts = range(0, len(questions), batch_size)
    answers: list[str] = []
    with generation_mode(model, tokenizer):
        for start in tqdm(starts, desc="Generating", unit="batch", disable=not show_progress_bar):
            loaded: list[Image.Image | Video] = []
            for i, visual in enumerate(visuals[start : start + batch_size]):
                where = f"question {start + i}"
                if modality == "image":
                    loaded.append(load_image(resolve_image(visual, root), where))
                else:
                    loaded.append(load_video(visual, sampling, where, root))
            prompts = [
                render_chat(
                    processor,
                    [{"role": "user", "content": [{"type": modality}, {"type": "text", "text": q + prompt_suffix}]}],
                    add_generation_prompt=True,
                )
                for q in questions[start : start + batch_size]
            ]
            images, videos = (loaded, []) if modality == "image" else ([], loaded)
            inputs = process_prompts(processor, prompts, images, videos, "generation chat template").to(model.device)
            for key in ("pixel_values", "pixel_values_videos"):
                if key in inputs:
                    inputs[key] = inputs[key].to(model.dtype)
            answers += greedy_answers(model, tokenizer, inputs, max_new_tokens)
    return answers


def evaluate_pope(
    model: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    labels: Sequence[str | bool],
    categories: Sequence[str] | None = None,
    processor: ProcessorMixin | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    prompt_suffix: str = DEFAULT_POPE_PROMPT_SUFFIX,
    image_root: str | os.PathLike | None = None,
    show_progress_bar: bool = True,
) -> dict[str, Any]:
    """Generate answers with `generate_answers` and score them.

    Returns:
        `pope_metrics` of all questions, or `pope_metrics_by_category` when ``categories`` are
        given; plus ``"answers"``, the raw generated answers.
    """
    check_sequence(images, "images", "PIL images or image paths")
    check_sequence(questions, "questions", "strings")
    check_sequence(labels, "labels", "'yes'/'no' labels")
    check_batch_size(batch_size)
    check_same_length(questions, labels, "questions", "labels")
    if categories is not None:
        check_sequence(categories, "categories", "category names, one per question")
        check_same_length(questions, categories, "questions", "categories")
    # Check the labels before spending time on generation.
    [_label(v, i) for i, v in enumerate(labels)]
    answers = generate_answers(
        model,
        images,
        questions,
        processor=processor,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_suffix=prompt_suffix,
        image_root=image_root,
        show_progress_bar=show_progress_bar,
    )
    if categories is None:
        result: dict[str, Any] = pope_metrics(answers, labels)
    else:
        result = pope_metrics_by_category(answers, labels, categories)
    result["answers"] = answers
    return result


def evaluate_pope_dataset(
    model: Any,
    dataset: Any = "lmms-lab/POPE",
    split: str = "test",
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str = "answer",
    category_column: str | None = "category",
    name: str | None = None,
    where: Mapping[str, Any] | None = None,
    max_questions: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`evaluate_pope` on a data set in the ``lmms-lab/POPE`` layout (or `cafe.data.make_pope_dataset`).

    ``category_column=None`` (or a data set without it) scores all questions together.
    ``kwargs`` go to `evaluate_pope` (``batch_size``, ``max_new_tokens``, ``image_root``, ...).
    """
    data = load_any_dataset(dataset, split=split, name=name)
    require_columns(data, [image_column, question_column, answer_column])
    data = select_rows(data, where, max_questions)
    categories = list(data[category_column]) if category_column and category_column in data.column_names else None
    return evaluate_pope(
        model,
        list(data[image_column]),
        list(data[question_column]),
        list(data[answer_column]),
        categories=categories,
        **kwargs,
    )
