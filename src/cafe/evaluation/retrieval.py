"""Zero-shot image-text retrieval: recall@K in both directions, CLIP_benchmark style.

Setting (Flickr30K 1K test, COCO 5K test): a gallery of images, each with several captions.

* text -> image: every caption is a query over all images; a hit at K if the caption's own image
  is among the K highest-scoring images.
* image -> text: every image is a query over all captions; a hit at K if **any** of the image's
  captions is among the K highest-scoring captions.

recall@K is the fraction of queries with a hit (a float in [0, 1]; the paper prints percentages).

Tie rule (pessimistic, deterministic): a negative whose score *equals* the best positive's is
ranked before it. The 0-based rank of a query's answer is the number of negatives scoring
``>=`` its best positive, and the query is a hit at K iff that rank is ``< K``. A degenerate model
that gives every candidate the same score therefore never scores by luck: it hits only when K
exceeds the number of negatives. (CLIP_benchmark uses ``topk``, whose order among equal scores is
unspecified; with continuous embeddings exact ties are rare and both rules agree.) When K is at
least the number of candidates, every query is a hit.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._common import (
    check_batch_size,
    check_ks,
    check_same_length,
    check_scores,
    check_sequence,
    load_any_dataset,
    require_columns,
    resolve_image,
    select_rows,
)

if TYPE_CHECKING:
    from ..modeling import CafeForConditionalGeneration

DEFAULT_KS = (1, 5, 10)


def positive_ranks(scores: torch.Tensor, positives: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """0-based rank of each query's best positive under the pessimistic tie rule.

    Args:
        scores: ``[num_queries, num_candidates]`` similarity scores (higher = more similar).
        positives: ``[num_queries, num_candidates]`` bool, True where the candidate is a correct
            answer. Every row needs at least one True.
        chunk_size: Queries processed at once (bounds the temporary memory).

    Returns:
        ``[num_queries]`` long tensor: the number of negatives scoring ``>=`` the query's
        highest-scoring positive.
    """
    scores = check_scores(scores)
    positives = torch.as_tensor(positives, dtype=torch.bool, device=scores.device)
    if positives.shape != scores.shape:
        raise ValueError(
            f"positives has shape {tuple(positives.shape)}, scores {tuple(scores.shape)}; they must match."
        )
    without = (~positives.any(dim=1)).nonzero().flatten()
    if without.numel():
        raise ValueError(f"{without.numel()} queries have no positive candidate (first: row {without[0].item()}).")
    ranks = []
    for start in range(0, scores.shape[0], chunk_size):
        s = scores[start : start + chunk_size]
        p = positives[start : start + chunk_size]
        best_positive = s.masked_fill(~p, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(((s >= best_positive) & ~p).sum(dim=1))
    return torch.cat(ranks)


def recall_from_ranks(ranks: torch.Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[int, float]:
    """``{K: fraction of queries whose rank < K}`` for 0-based ranks from `positive_ranks`."""
    ks = check_ks(ks)
    ranks = torch.as_tensor(ranks)
    if ranks.numel() == 0:
        raise ValueError("No ranks: there are no queries.")
    return {k: (ranks < k).float().mean().item() for k in ks}


def caption_image_index(captions_per_image: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Flatten per-image caption lists.

    Args:
        captions_per_image: ``num_images`` lists (one string is taken as a list of one caption).

    Returns:
        ``(captions, text_to_image)``: the ``num_captions`` captions in order and a
        ``[num_captions]`` long tensor with the index of each caption's image.
    """
    check_sequence(captions_per_image, "captions_per_image", "caption lists, one per image")
    if len(captions_per_image) == 0:
        raise ValueError("captions_per_image is empty.")
    captions, owners = [], []
    for index, caps in enumerate(captions_per_image):
        caps = [caps] if isinstance(caps, str) else list(caps)
        if not caps:
            # Such an image could never be found by image -> text retrieval.
            raise ValueError(f"Image {index} has no captions; every image needs at least one.")
        for caption in caps:
            if not isinstance(caption, str):
                raise TypeError(f"Captions of image {index} must be strings, got {type(caption).__name__}.")
        captions += caps
        owners += [index] * len(caps)
    return captions, torch.tensor(owners, dtype=torch.long)


def retrieval_recall(
    scores: torch.Tensor,
    text_to_image: Sequence[int] | torch.Tensor,
    ks: Iterable[int] = DEFAULT_KS,
    image_groups: Sequence[Hashable] | None = None,
) -> dict[str, float]:
    """recall@K in both directions from a caption x image score matrix.

    Args:
        scores: ``[num_captions, num_images]``, e.g. ``text_embeddings @ image_embeddings.T``.
        text_to_image: ``[num_captions]`` index of each caption's image (see `caption_image_index`).
            Every image must own at least one caption.
        ks: Cut-offs (integers >= 1). A K above the number of candidates gives 1.0.
        image_groups: ``[num_images]`` hashable label per image (e.g. the tuple of a synthetic
            scene's attributes) for *group-level* recall: a retrieved image counts as correct if
            it is in the same group as the caption's image, a retrieved caption if its image is in
            the query image's group. ``None``: instance-level recall (only the caption's own image
            / the image's own captions are correct). On a test set where several images share a
            description, instance-level recall is capped (see `group_recall_ceiling`); group-level
            recall is not.

    Returns:
        ``{"text_to_image_recall@K": ..., "image_to_text_recall@K": ...}`` for each K, in [0, 1].
        Tie rule: see the module docstring (ties count against the query).
    """
    ks = check_ks(ks)
    scores = check_scores(scores)
    num_captions, num_images = scores.shape
    owners = torch.as_tensor(text_to_image, dtype=torch.long).flatten().to(scores.device)
    if owners.numel() != num_captions:
        raise ValueError(f"text_to_image has {owners.numel()} entries but scores has {num_captions} caption rows.")
    if owners.min() < 0 or owners.max() >= num_images:
        raise ValueError(f"text_to_image indices must be in [0, {num_images}), got [{owners.min()}, {owners.max()}].")
    # positives[c, i]: caption c describes image i (or, with groups, an image of its image's group).
    if image_groups is None:
        positives = owners[:, None] == torch.arange(num_images, device=scores.device)[None, :]
    else:
        labels = _group_ids(image_groups, num_images).to(scores.device)
        positives = labels[owners][:, None] == labels[None, :]
    if not positives.any(dim=0).all():
        missing = (~positives.any(dim=0)).nonzero().flatten()[0].item()
        raise ValueError(f"Image {missing} has no caption in text_to_image; every image needs at least one.")
    t2i = recall_from_ranks(positive_ranks(scores, positives), ks)
    i2t = recall_from_ranks(positive_ranks(scores.T, positives.T), ks)
    metrics = {f"text_to_image_recall@{k}": v for k, v in t2i.items()}
    metrics.update({f"image_to_text_recall@{k}": v for k, v in i2t.items()})
    return metrics


def _group_ids(image_groups: Sequence[Hashable], num_images: int) -> torch.Tensor:
    """Hashable group labels -> ``[num_images]`` long tensor of group ids (first-seen order)."""
    check_sequence(image_groups, "image_groups", "hashable labels, one per image")
    if len(image_groups) != num_images:
        raise ValueError(f"image_groups has {len(image_groups)} labels for {num_images} images.")
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(label, len(ids)) for label in image_groups], dtype=torch.long)


def group_recall_ceiling(
    image_groups: Sequence[Hashable], text_to_image: Sequence[int] | torch.Tensor | None = None
) -> dict[str, float]:
    """Expected instance-level recall@1 of a model that is perfect up to groups.

    Such a model ranks the images (captions) of the right group first but cannot tell apart the
    images of one group, e.g. duplicate scenes of a synthetic test set with identical captions;
    among them it picks at random. Its expected text -> image recall@1 is the mean over captions
    of ``1 / (images in the group)``, and its image -> text recall@1 the mean over images of
    ``(own captions) / (captions of the group)``. This is the ceiling of instance-level recall@1
    on such a test set (a model could only pass it by telling duplicates apart).

    Args:
        image_groups: ``[num_images]`` hashable label per image.
        text_to_image: ``[num_captions]`` index of each caption's image; ``None``: one caption
            per image.

    Returns:
        ``{"text_to_image_recall@1": ..., "image_to_text_recall@1": ...}`` in (0, 1].
    """
    groups = _group_ids(image_groups, len(image_groups))
    if groups.numel() == 0:
        raise ValueError("image_groups is empty.")
    owners = (
        torch.arange(groups.numel())
        if text_to_image is None
        else torch.as_tensor(text_to_image, dtype=torch.long).flatten()
    )
    if owners.numel() == 0 or owners.min() < 0 or owners.max() >= groups.numel():
        raise ValueError(f"text_to_image must hold image indices in [0, {groups.numel()}).")
    images_per_group = torch.bincount(groups).float()
    captions_per_image = torch.bincount(owners, minlength=groups.numel()).float()
    captions_per_group = torch.bincount(groups, weights=captions_per_image)
    return {
        "text_to_image_recall@1": (1.0 / images_per_group[groups[owners]]).mean().item(),
        "image_to_text_recall@1": (captions_per_image / captions_per_group[groups]).mean().item(),
    }


def evaluate_retrieval(
    model: CafeForConditionalGeneration,
    images: Sequence[Any],
    captions_per_image: Sequence[Sequence[str]],
    batch_size: int = 16,
    ks: Iterable[int] = DEFAULT_KS,
    image_root: str | os.PathLike | None = None,
    show_progress_bar: bool | None = None,
    return_scores: bool = False,
) -> dict[str, Any]:
    """Embed images and captions with ``model.encode`` and compute `retrieval_recall`.

    Args:
        model: A `CafeForConditionalGeneration` (anything with its ``encode(images=, texts=)``).
        images: ``num_images`` PIL images or image paths (relative ones are joined to ``image_root``).
        captions_per_image: ``num_images`` lists of captions.
        batch_size: Inputs per forward pass.
        ks: Cut-offs of recall@K.
        show_progress_bar: Passed to ``model.encode`` (tqdm).
        return_scores: Also return the ``[num_captions, num_images]`` score matrix under ``"scores"``.

    Returns:
        The metrics of `retrieval_recall` plus ``num_images`` and ``num_captions``.
    """
    ks = check_ks(ks)
    check_batch_size(batch_size)
    check_sequence(images, "images", "PIL images or image paths")
    check_sequence(captions_per_image, "captions_per_image", "caption lists, one per image")
    if len(images) == 0:
        raise ValueError("images is empty.")
    check_same_length(images, captions_per_image, "images", "captions_per_image")
    captions, owners = caption_image_index(captions_per_image)
    images = [resolve_image(image, image_root) for image in images]
    image_embeddings = model.encode(images=images, batch_size=batch_size, show_progress_bar=show_progress_bar)
    text_embeddings = model.encode(texts=captions, batch_size=batch_size, show_progress_bar=show_progress_bar)
    # Embeddings are L2-normalised, so the dot product is the cosine similarity.
    scores = text_embeddings.float() @ image_embeddings.float().T
    result: dict[str, Any] = retrieval_recall(scores, owners, ks)
    result.update(num_images=len(images), num_captions=len(captions))
    if return_scores:
        result["scores"] = scores
    return result


def load_retrieval_data(
    dataset: Any,
    split: str = "test",
    image_column: str = "image",
    captions_column: str = "caption",
    name: str | None = None,
    where: Mapping[str, Any] | None = None,
    max_images: int | None = None,
    **load_kwargs: Any,
) -> tuple[list[Any], list[list[str]]]:
    """Read ``(images, captions_per_image)`` from a retrieval test set.

    Works with the common Hugging Face layouts of Flickr30K / COCO (one row per image, an image
    column and a column holding the list of its ~5 captions), e.g.
    ``nlphuji/flickr_1k_test_image_text_retrieval`` and
    ``nlphuji/mscoco_2014_5k_test_image_text_retrieval`` (``image``, ``caption``), or
    ``nlphuji/flickr30k`` with ``where={"split": "test"}``.

    Args:
        dataset: A `datasets.Dataset` / `DatasetDict`, a local path or a Hub id (see
            `cafe.evaluation._common.load_any_dataset`).
        split: Split to load.
        image_column: Column of PIL images (Image feature) or image paths.
        captions_column: Column of caption lists (a plain string is one caption).
        name: Dataset configuration name for ``load_dataset``.
        where: Keep only rows whose columns equal these values.
        max_images: Keep the first ``max_images`` rows (after ``where``).
        **load_kwargs: Passed to ``datasets.load_dataset``.
    """
    data = load_any_dataset(dataset, split=split, name=name, **load_kwargs)
    require_columns(data, [image_column, captions_column], "Set image_column= / captions_column=.")
    data = select_rows(data, where, max_images)
    captions = [[c] if isinstance(c, str) else list(c) for c in data[captions_column]]
    images = list(data[image_column])
    return images, captions


def evaluate_retrieval_dataset(
    model: CafeForConditionalGeneration,
    dataset: Any,
    split: str = "test",
    image_column: str = "image",
    captions_column: str = "caption",
    name: str | None = None,
    where: Mapping[str, Any] | None = None,
    max_images: int | None = None,
    image_root: str | os.PathLike | None = None,
    batch_size: int = 16,
    ks: Iterable[int] = DEFAULT_KS,
    show_progress_bar: bool | None = None,
) -> dict[str, Any]:
    """`load_retrieval_data` followed by `evaluate_retrieval`."""
    images, captions = load_retrieval_data(
        dataset,
        split=split,
        image_column=image_column,
        captions_column=captions_column,
        name=name,
        where=where,
        max_images=max_images,
    )
    return evaluate_retrieval(
        model,
        images,
        captions,
        batch_size=batch_size,
        ks=ks,
        image_root=image_root,
        show_progress_bar=show_progress_bar,
    )
