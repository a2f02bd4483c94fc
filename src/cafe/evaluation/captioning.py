"""Caption quality against known attributes: which of an image's attributes a caption names.

On data whose ground truth is known attribute by attribute (the built-in synthetic shapes:
colour, shape, size, position, count), a generated caption can be scored without a reference
model: an attribute counts as named correctly when the caption states its value and no other
value of that attribute. The mean over captions and attributes is the *attribute accuracy*; the
fraction of captions equal to the reference caption (after normalisation) is the *exact match*.

Word forms (whole words of the lower-cased caption):

* a string value must appear as a word, or as its plural (``"circle"``: ``"circles"``); a value
  of several words (``"top left"`` or ``"top_left"``) needs all of them;
* an integer value is a count: its number word or its digits (``2``: ``"two"``, ``"2"``), and for
  1 also the article (``"a"``, ``"an"``). Articles never count as naming 1 *against* another
  count, since "a picture of two circles" names two.

"No other value": a caption that names the true colour *and* a wrong one ("a red or blue circle")
is wrong on colour. The competing values are ``choices[name]`` when given, otherwise every value
the attribute takes in the evaluated ``attributes``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._common import check_same_length, check_sequence, resolve_image

# The instruction the built-in synthetic conversations pair with the caption (their first turn).
DEFAULT_CAPTION_PROMPT = "Describe the picture."

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_ARTICLES = frozenset({"a", "an"})


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _forms(value: Any, with_articles: bool) -> list[frozenset[str]]:
    """Alternative word sets naming `value`; a caption names it if it holds all words of one set."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"Attribute values must be strings or integer counts, got {value!r}.")
    if isinstance(value, int):
        forms = [frozenset({str(value)})]
        if 0 <= value < len(_NUMBER_WORDS):
            forms.append(frozenset({_NUMBER_WORDS[value]}))
        if value == 1 and with_articles:
            forms += [frozenset({article}) for article in _ARTICLES]
        return forms
    parts = re.findall(r"[a-z0-9]+", value.lower())
    if not parts:
        raise ValueError(f"Attribute value {value!r} has no word to look for.")
    if len(parts) == 1:
        word = parts[0]
        return [frozenset({word}), frozenset({word + "s"}), frozenset({word + "es"})]
    return [frozenset(parts)]


def _names(words: set[str], value: Any, with_articles: bool = True) -> bool:
    return any(form <= words for form in _forms(value, with_articles))


def attribute_hits(
    caption: str, attributes: Mapping[str, Any], choices: Mapping[str, Iterable[Any]]
) -> dict[str, bool]:
    """For each attribute: does `caption` name its value and none of the other ``choices``?"""
    words = _words(caption)
    hits = {}
    for name, value in attributes.items():
        others = [other for other in choices.get(name, ()) if other != value]
        hits[name] = _names(words, value) and not any(_names(words, other, with_articles=False) for other in others)
    return hits


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(" .")


def caption_attribute_accuracy(
    captions: Sequence[str],
    attributes: Sequence[Mapping[str, Any]],
    references: Sequence[str] | None = None,
    choices: Mapping[str, Iterable[Any]] | None = None,
) -> dict[str, float]:
    """Score captions against the attributes of their images (see the module docstring).

    Args:
        captions: One generated caption per image.
        attributes: One mapping per image, attribute name -> value (strings, or integers for
            counts), e.g. the ``attributes`` of the built-in synthetic records.
        references: Reference captions for ``exact_match`` (compared lower-cased, whitespace
            collapsed, a final period dropped).
        choices: Attribute name -> all values it can take; defaults to the values seen in
            `attributes`.

    Returns:
        ``attribute_accuracy`` (correct attributes / all attributes), ``<name>_accuracy`` for
        each attribute, ``exact_match`` when `references` is given, in [0, 1], and
        ``num_captions``.
    """
    check_sequence(captions, "captions", "strings")
    check_sequence(attributes, "attributes", "attribute mappings, one per caption")
    check_same_length(captions, attributes, "captions", "attributes")
    if not captions:
        raise ValueError("No captions to score.")
    if choices is None:
        seen: dict[str, list[Any]] = {}
        for record in attributes:
            for name, value in record.items():
                if value not in seen.setdefault(name, []):
                    seen[name].append(value)
        choices = seen
    hits = [attribute_hits(caption, record, choices) for caption, record in zip(captions, attributes, strict=True)]
    names = list(dict.fromkeys(name for record in attributes for name in record))
    metrics: dict[str, float] = {
        "attribute_accuracy": sum(sum(h.values()) for h in hits) / max(1, sum(len(h) for h in hits))
    }
    for name in names:
        scored = [h[name] for h in hits if name in h]
        metrics[f"{name}_accuracy"] = sum(scored) / len(scored)
    if references is not None:
        check_sequence(references, "references", "strings")
        check_same_length(captions, references, "captions", "references")
        metrics["exact_match"] = sum(
            _normalise(c) == _normalise(r) for c, r in zip(captions, references, strict=True)
        ) / len(captions)
    metrics["num_captions"] = len(captions)
    return metrics


def evaluate_captions(
    model: Any,
    images: Sequence[Any],
    attributes: Sequence[Mapping[str, Any]],
    references: Sequence[str] | None = None,
    prompt: str = DEFAULT_CAPTION_PROMPT,
    choices: Mapping[str, Iterable[Any]] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    image_root: str | os.PathLike | None = None,
    show_progress_bar: bool = True,
) -> dict[str, Any]:
    """Caption each image with ``model.generate`` (greedy) and score it with `caption_attribute_accuracy`.

    Args:
        images: PIL images or image paths (relative ones are joined to ``image_root``).
        attributes, references, choices: As in `caption_attribute_accuracy`.
        prompt: The user turn after the image (the description turn of the built-in data).

    Returns:
        The metrics of `caption_attribute_accuracy` plus ``"captions"``, the generated captions.
    """
    from .pope import generate_answers

    check_sequence(images, "images", "PIL images or image paths")
    check_same_length(images, attributes, "images", "attributes")
    captions = generate_answers(
        model,
        [resolve_image(image, image_root) for image in images],
        [prompt] * len(images),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        prompt_suffix="",
        show_progress_bar=show_progress_bar,
    )
    return {**caption_attribute_accuracy(captions, attributes, references, choices), "captions": captions}
