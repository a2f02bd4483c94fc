"""Modality gap (Liang et al., 2022) and a 2-D scatter of paired embeddings (paper Fig. 3).

The gap is the Euclidean distance between the centroid of the L2-normalised image embeddings and
the centroid of the L2-normalised text embeddings: 0 when both modalities share a centre, up to 2
when they sit at opposite poles of the unit sphere.

The scatter projects image and text embeddings jointly to 2-D (UMAP, as in the paper, when
``umap-learn`` is installed; otherwise PCA) and draws them with PIL, with a thin line between
the two points of each pair, so no plotting library is needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from ._common import check_batch_size, check_same_length, check_scores, check_sequence, resolve_image

if TYPE_CHECKING:
    import PIL.Image

    from ..modeling import CafeForConditionalGeneration

IMAGE_COLOUR = (31, 119, 180)
TEXT_COLOUR = (255, 127, 14)
PAIR_COLOUR = (205, 205, 205)


def _embeddings(x: Any, name: str) -> torch.Tensor:
    x = check_scores(x, name)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains inf.")
    return x


def modality_gap(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """``|| mean(normalize(image)) - mean(normalize(text)) ||_2``.

    Args:
        image_embeddings: ``[num_images, hidden]``.
        text_embeddings: ``[num_texts, hidden]`` (need not be paired with the images).

    Rows are L2-normalised here, so un-normalised embeddings give the same result.
    """
    images = _embeddings(image_embeddings, "image_embeddings")
    texts = _embeddings(text_embeddings, "text_embeddings")
    if images.shape[1] != texts.shape[1]:
        raise ValueError(f"Embedding sizes differ: images {images.shape[1]}, texts {texts.shape[1]}.")
    gap = F.normalize(images, dim=-1).mean(0) - F.normalize(texts, dim=-1).mean(0)
    return gap.norm().item()


def _pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Exact PCA to 2-D by SVD (deterministic, unlike the randomised ``torch.pca_lowrank``)."""
    centred = x - x.mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(centred.double(), full_matrices=False)
    coords = (u * s)[:, :2]
    # Fix each axis's sign (the largest |coordinate| is positive), as sklearn's svd_flip does,
    # so the same embeddings always give the same picture.
    signs = torch.sign(coords.gather(0, coords.abs().argmax(0, keepdim=True)))
    coords = coords * torch.where(signs == 0, torch.ones_like(signs), signs)
    if coords.shape[1] < 2:
        # Fewer than two directions of variation (one point, or 1-D embeddings).
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 2 - coords.shape[1])], dim=1)
    return coords.float()


def project_2d(
    embeddings: torch.Tensor, method: Literal["auto", "pca", "umap"] = "auto", seed: int = 0
) -> tuple[torch.Tensor, str]:
    """Project ``[N, hidden]`` embeddings to ``[N, 2]``.

    ``"auto"`` uses UMAP when ``umap-learn`` is importable and there are at least 5 points,
    else PCA. Returns ``(coords, method actually used)``.
    """
    x = _embeddings(embeddings, "embeddings")
    if method not in ("auto", "pca", "umap"):
        raise ValueError(f"method must be 'auto', 'pca' or 'umap', got {method!r}.")
    if method in ("auto", "umap") and x.shape[0] >= 5:
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise ImportError("method='umap' needs umap-learn: pip install umap-learn") from None
        else:
            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, x.shape[0] - 1), random_state=seed)
            return torch.from_numpy(reducer.fit_transform(x.numpy())).float(), "umap"
    elif method == "umap":
        raise ValueError("UMAP needs at least 5 points.")
    return _pca_2d(x), "pca"


def draw_scatter(
    image_coords: torch.Tensor,
    text_coords: torch.Tensor,
    size: int = 512,
    title: str | None = None,
    connect_pairs: bool = True,
) -> PIL.Image.Image:
    """Draw 2-D points with PIL: images as blue discs, texts as orange squares; returns the image.

    Args:
        image_coords: ``[num_images, 2]``.
        text_coords: ``[num_texts, 2]``.
        size: Side of the square picture in pixels.
        title: Text written at the top.
        connect_pairs: Draw a line from image i to text i (needs ``num_images == num_texts``).
    """
    from PIL import Image, ImageDraw, ImageFont

    if connect_pairs:
        check_same_length(image_coords, text_coords, "image_coords", "text_coords")
    picture = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    margin, top = max(12, size // 20), max(32, size // 10)
    points = torch.cat([image_coords, text_coords]).double()
    low, high = points.min(0).values, points.max(0).values
    centre = (low + high) / 2
    # One scale for both axes keeps distances comparable; a degenerate span becomes 1.
    span = (high - low).max().item() or 1.0
    extent = size - 2 * margin - top
    middle = (margin + extent / 2, top + margin + extent / 2)

    def pixel(p: torch.Tensor) -> tuple[float, float]:
        # Centred in the plot area; y grows upwards as in a plot.
        x = middle[0] + (p[0].item() - centre[0].item()) / span * extent
        y = middle[1] - (p[1].item() - centre[1].item()) / span * extent
        return x, y

    image_px = [pixel(p) for p in image_coords]
    text_px = [pixel(p) for p in text_coords]
    if connect_pairs:
        for a, b in zip(image_px, text_px, strict=True):
            draw.line([a, b], fill=PAIR_COLOUR, width=1)
    r = max(2, size // 128)
    for x, y in image_px:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=IMAGE_COLOUR)
    for x, y in text_px:
        draw.rectangle([x - r, y - r, x + r, y + r], fill=TEXT_COLOUR)
    # Legend and title.
    draw.ellipse([margin, 8, margin + 2 * r, 8 + 2 * r], fill=IMAGE_COLOUR)
    draw.text((margin + 3 * r, 8 + r), "image", fill=(0, 0, 0), font=font, anchor="lm")
    draw.rectangle([margin + 60, 8, margin + 60 + 2 * r, 8 + 2 * r], fill=TEXT_COLOUR)
    draw.text((margin + 60 + 3 * r, 8 + r), "text", fill=(0, 0, 0), font=font, anchor="lm")
    if title:
        draw.text((size - margin, 8 + r), title, fill=(0, 0, 0), font=font, anchor="rm")
    return picture


def save_embedding_scatter(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    path: str | os.PathLike,
    method: Literal["auto", "pca", "umap"] = "auto",
    size: int = 512,
    title: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Project normalised image and text embeddings jointly to 2-D and write a PNG scatter.

    Args:
        image_embeddings: ``[num_images, hidden]``.
        text_embeddings: ``[num_texts, hidden]``; lines join pair i when the counts match.
        path: Output PNG path (parent folders are created).
        method: See `project_2d`.
        title: Written on the picture; default: the modality gap and the method.

    Returns:
        ``{"path", "method", "image_coords" [num_images, 2], "text_coords" [num_texts, 2], "modality_gap"}``.
    """
    images = F.normalize(_embeddings(image_embeddings, "image_embeddings"), dim=-1)
    texts = F.normalize(_embeddings(text_embeddings, "text_embeddings"), dim=-1)
    gap = modality_gap(images, texts)
    coords, used = project_2d(torch.cat([images, texts]), method=method, seed=seed)
    image_coords, text_coords = coords[: len(images)], coords[len(images) :]
    if title is None:
        title = f"modality gap {gap:.3f} ({used.upper()})"
    picture = draw_scatter(image_coords, text_coords, size=size, title=title, connect_pairs=len(images) == len(texts))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return {"path": path, "method": used, "image_coords": image_coords, "text_coords": text_coords, "modality_gap": gap}


def evaluate_modality_gap(
    model: CafeForConditionalGeneration,
    images: Sequence[Any],
    texts: Sequence[str],
    batch_size: int = 16,
    plot_path: str | os.PathLike | None = None,
    method: Literal["auto", "pca", "umap"] = "auto",
    image_root: str | os.PathLike | None = None,
    show_progress_bar: bool | None = None,
) -> dict[str, Any]:
    """Embed paired images and texts with ``model.encode``; return the gap and optionally plot.

    Returns:
        ``{"modality_gap", "num_pairs"}``, plus ``"plot_path"`` and ``"projection"`` when
        ``plot_path`` is given.
    """
    check_sequence(images, "images", "PIL images or image paths")
    check_sequence(texts, "texts", "strings")
    check_batch_size(batch_size)
    if len(images) == 0:
        raise ValueError("images is empty.")
    check_same_length(images, texts, "images", "texts")
    images = [resolve_image(image, image_root) for image in images]
    image_embeddings = model.encode(images=images, batch_size=batch_size, show_progress_bar=show_progress_bar)
    text_embeddings = model.encode(texts=list(texts), batch_size=batch_size, show_progress_bar=show_progress_bar)
    result: dict[str, Any] = {"modality_gap": modality_gap(image_embeddings, text_embeddings), "num_pairs": len(texts)}
    if plot_path is not None:
        plot = save_embedding_scatter(image_embeddings, text_embeddings, plot_path, method=method)
        result.update(plot_path=plot["path"], projection=plot["method"])
    return result
