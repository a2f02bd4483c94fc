"""Video evaluation: text <-> video retrieval recall@K and caption accuracy on the motion.

Retrieval has exactly the semantics of image retrieval (`cafe.evaluation.retrieval`: a gallery
of videos with one or more captions each, the pessimistic tie rule), with "video" in the metric
names: ``text_to_video_recall@K`` (every caption a query over all videos) and
``video_to_text_recall@K`` (every video a query over all captions, a hit if any of its own
captions is in the top K). Videos are embedded with ``model.encode([{"video": ...}])`` under the
video prompt ("Compress this video in one word:"), captions with the text prompt.

Caption accuracy asks ``model.generate`` to describe each clip and reads the motion its caption
names (`cafe.data.synthetic_clips.parse_motion`: left / right / up / down / a colour change /
growing). On the built-in clips no single frame shows the motion, so the score measures whether
a model uses the frames together.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._common import check_batch_size, check_ks, check_same_length, check_sequence
from .retrieval import DEFAULT_KS, caption_image_index, retrieval_recall

if TYPE_CHECKING:
    from ..modeling import CafeForConditionalGeneration

DEFAULT_VIDEO_CAPTION_PROMPT = "Describe the video."


def resolve_video(video: Any, root: str | os.PathLike | None) -> Any:
    """A relative video path, or relative frame paths of a list, joined to ``root``."""
    if root is None:
        return video

    def join(path: Any) -> Any:
        if isinstance(path, (str, os.PathLike)) and not Path(path).is_absolute():
            return str(Path(root) / path)
        return path

    if isinstance(video, (list, tuple)):
        return [join(frame) for frame in video]
    return join(video)


def video_retrieval_recall(
    scores: torch.Tensor, text_to_video: Sequence[int] | torch.Tensor, ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """`cafe.evaluation.retrieval_recall` of a ``[num_captions, num_videos]`` score matrix, with the
    metrics named ``text_to_video_recall@K`` and ``video_to_text_recall@K``."""
    metrics = retrieval_recall(scores, text_to_video, ks)
    return {name.replace("image", "video"): value for name, value in metrics.items()}


def evaluate_video_retrieval(
    model: CafeForConditionalGeneration,
    videos: Sequence[Any],
    captions_per_video: Sequence[Sequence[str]],
    batch_size: int = 8,
    ks: Iterable[int] = DEFAULT_KS,
    video_root: str | os.PathLike | None = None,
    show_progress_bar: bool | None = None,
    return_scores: bool = False,
) -> dict[str, Any]:
    """Embed videos and captions with ``model.encode`` and compute `video_retrieval_recall`.

    Args:
        model: A `CafeForConditionalGeneration`.
        videos: ``num_videos`` videos: file paths, lists of frames or ``[T, H, W, 3]`` uint8 arrays
            (relative paths are joined to ``video_root``).
        captions_per_video: ``num_videos`` lists of captions (a string is one caption).
        batch_size: Inputs per forward pass (a video is ~33 tokens per 8 frames on the tiny
            LLaVA-OneVision, ~1.6k on the released one).

    Returns:
        The metrics plus ``num_videos`` and ``num_captions`` (and ``scores`` if asked).
    """
    ks = check_ks(ks)
    check_batch_size(batch_size)
    check_sequence(videos, "videos", "videos (paths, frame lists or arrays)")
    if len(videos) == 0:
        raise ValueError("videos is empty.")
    check_same_length(videos, captions_per_video, "videos", "captions_per_video")
    captions, owners = caption_image_index(captions_per_video)
    inputs = [{"video": resolve_video(video, video_root)} for video in videos]
    video_embeddings = model.encode(inputs, batch_size=batch_size, show_progress_bar=show_progress_bar)
    text_embeddings = model.encode(texts=captions, batch_size=batch_size, show_progress_bar=show_progress_bar)
    scores = text_embeddings.float() @ video_embeddings.float().T
    result: dict[str, Any] = video_retrieval_recall(scores, owners, ks)
    result.update(num_videos=len(videos), num_captions=len(captions))
    if return_scores:
        result["scores"] = scores
    return result


def motion_accuracy(captions: Sequence[str], motions: Sequence[str]) -> dict[str, float]:
    """Fraction of captions that name the right motion (`parse_motion`), and of those naming any.

    Returns:
        ``{"motion_accuracy": ..., "motion_answered": ...}`` in [0, 1].
    """
    from ..data.synthetic_clips import MOTIONS, parse_motion

    check_sequence(captions, "captions", "strings")
    check_sequence(motions, "motions", f"motions ({', '.join(MOTIONS)})")
    check_same_length(captions, motions, "captions", "motions")
    if not captions:
        raise ValueError("No captions to score.")
    unknown = sorted(set(motions) - set(MOTIONS))
    if unknown:
        raise ValueError(f"Unknown motions {unknown}; expected some of {MOTIONS}.")
    parsed = [parse_motion(caption) for caption in captions]
    return {
        "motion_accuracy": sum(p == m for p, m in zip(parsed, motions, strict=True)) / len(motions),
        "motion_answered": sum(p is not None for p in parsed) / len(motions),
    }


def evaluate_video_captions(
    model: Any,
    videos: Sequence[Any],
    motions: Sequence[str],
    prompt: str = DEFAULT_VIDEO_CAPTION_PROMPT,
    batch_size: int = 8,
    max_new_tokens: int = 12,
    video_root: str | os.PathLike | None = None,
    show_progress_bar: bool = True,
) -> dict[str, Any]:
    """Caption each video with ``model.generate`` (greedy) and score the motion it names.

    Args:
        videos: As in `evaluate_video_retrieval`.
        motions: The true motion of each video (`cafe.data.MOTIONS`; the built-in clips' records
            carry it as ``attributes["motion"]``).
        prompt: The user turn after the video (the LM training turn of the built-in clips).

    Returns:
        `motion_accuracy` plus ``"captions"``, the generated captions.
    """
    from .pope import generate_visual_answers

    check_sequence(videos, "videos", "videos (paths, frame lists or arrays)")
    check_same_length(videos, motions, "videos", "motions")
    captions = generate_visual_answers(
        model,
        [resolve_video(video, video_root) for video in videos],
        [prompt] * len(videos),
        "video",
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        show_progress_bar=show_progress_bar,
    )
    return {**motion_accuracy(captions, motions), "captions": captions}
