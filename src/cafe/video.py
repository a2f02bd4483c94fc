"""Videos: what a record's or an input's ``video`` may be, and which of its frames a model sees.

To CAFe a video is a longer run of visual tokens: the processor turns its frames into
``pixel_values_videos`` and expands one placeholder into the frames' tokens, exactly as it does
for an image. What this module adds is everything before the processor:

* **Inputs.** A video may be given as the path of a video file (decoded with PyAV through
  transformers' own ``load_video``; ``pip install av``, or the ``cafe-vlm[video]`` extra), a list
  of frames (PIL images, image file paths or ``[H, W, 3]`` arrays), a ``[T, H, W, 3]`` uint8 array
  or tensor, or a `Video` (frames plus the rate they were taken at).
* **Frame sampling** (`FrameSampling`), the backbone processor's rule, so that training,
  ``encode`` and evaluation all show a model the same frames:

  - LLaVA-OneVision: a fixed number of frames (``CafeSettings.video_num_frames``, default 8),
    uniformly spread (transformers' ``default_sample_indices_fn``); a shorter clip repeats frames
    so that every clip has the same length (the processor stacks clips into one tensor).
  - Qwen2-VL / Qwen2.5-VL: ``CafeSettings.video_fps`` frames per second (default 2.0, Qwen's),
    at least ``min_frames`` (4) and at most ``max_frames`` (768) of the video processor, rounded
    down to a multiple of its ``temporal_patch_size`` (2); `Qwen2VLVideoProcessor.sample_frames`.

  Frames given in memory (a list or an array) carry no timing: for the fps rule they are taken as
  the clip already sampled at ``video_fps`` (wrap them in ``Video(frames, fps=...)`` to say
  otherwise); for the fixed-count rule they are resampled to the count.

The result is a `Video`: sampled frames ``[T, H, W, 3]`` uint8 and their rate, with a content key
(identical clips are encoded once per batch, as identical images are).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import ProcessorMixin
    from transformers.video_utils import VideoMetadata

    from .configuration import CafeSettings

VIDEO_DECODER_HINT = "pip install av  (the PyAV decoder; or install cafe with the extra: pip install 'cafe-vlm[video]')"


class VideoError(ValueError):
    """A video that cannot be used: missing, unreadable, or frames of the wrong shape / type."""


@dataclass(frozen=True, eq=False)
class Video:
    """A clip as the processor receives it.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB (every frame the same size).
        fps: Frames per second of ``frames`` (the *sampled* rate), or ``None`` when unknown.
            Qwen2.5-VL spaces its temporal positions by it (``second_per_grid_ts``).
    """

    frames: np.ndarray
    fps: float | None = None
    _key: list = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        frames = self.frames
        if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise VideoError(
                f"Video.frames must be a [T, H, W, 3] uint8 array, got {_describe(frames)}; build videos with "
                "cafe.video.load_video(...)."
            )
        if frames.shape[0] == 0:
            raise VideoError("A video needs at least one frame, got 0.")
        if self.fps is not None and not self.fps > 0:
            raise VideoError(f"Video.fps must be > 0 (frames per second) or None, got {self.fps}.")

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def metadata(self) -> dict[str, Any]:
        """transformers' ``video_metadata`` of the clip: its frames are the video, at ``fps``."""
        return {
            "total_num_frames": self.num_frames,
            "fps": self.fps,
            "duration": None if self.fps is None else self.num_frames / self.fps,
            "frames_indices": list(range(self.num_frames)),
            "height": int(self.frames.shape[1]),
            "width": int(self.frames.shape[2]),
        }

    @property
    def key(self) -> str:
        """Hash of the frames and rate: identical clips share a key wherever they come from."""
        if not self._key:  # computed once; the dataclass is frozen, the cache list is not
            digest = hashlib.blake2b(np.ascontiguousarray(self.frames).tobytes(), digest_size=16)
            digest.update(repr((self.frames.shape, self.fps)).encode())
            self._key.append("video:" + digest.hexdigest())
        return self._key[0]


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a clip a model sees (see the module docstring for the per-family rules).

    Args:
        num_frames: Fixed count (LLaVA-OneVision). Exclusive with ``fps``.
        fps: Frames per second (Qwen2-VL), clamped to ``[min_frames, max_frames]`` and to the
            clip's length, then rounded down to a multiple of ``frame_factor``.
        min_frames, max_frames, frame_factor: The fps rule's bounds (the video processor's
            ``min_frames``, ``max_frames`` and ``temporal_patch_size``).
    """

    num_frames: int | None = 8
    fps: float | None = None
    min_frames: int = 1
    max_frames: int | None = None
    frame_factor: int = 1

    def __post_init__(self) -> None:
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError("FrameSampling takes exactly one of num_frames (a fixed count) and fps.")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}.")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}.")
        if self.frame_factor < 1 or self.min_frames < 1:
            raise ValueError("frame_factor and min_frames must be >= 1.")

    def indices(self, total_frames: int, source_fps: float | None) -> np.ndarray:
        """Indices of the frames to keep, out of ``total_frames`` taken at ``source_fps``.

        Returns:
            ``[frames]`` int array, non-decreasing (the fixed count repeats frames of short clips).
        """
        if total_frames < 1:
            raise VideoError("The video has no frames.")
        if self.num_frames is not None:
            # transformers' default_sample_indices_fn; for total_frames < num_frames it repeats
            # frames instead of failing, so every clip stacks into one [videos, T, ...] tensor.
            return np.arange(self.num_frames, dtype=np.int64) * total_frames // self.num_frames
        # Qwen2VLVideoProcessor.sample_frames (in-memory frames: source_fps = the target fps).
        if self.fps is None:  # __post_init__ requires num_frames or fps
            raise ValueError("FrameSampling needs num_frames or fps.")
        source_fps = source_fps or self.fps
        factor = self.frame_factor
        max_frames = min(self.max_frames or total_frames, total_frames)
        max_frames = math.floor(max_frames / factor) * factor
        count = total_frames / source_fps * self.fps
        count = min(max(count, self.min_frames), max_frames, total_frames)
        count = math.floor(count / factor) * factor
        if count < 1:
            # Shorter than one temporal patch: keep every frame (the processor pads the last one).
            return np.arange(total_frames, dtype=np.int64)
        # torch's float arange, as the processor computes it (it can give one frame more than
        # `count` by rounding; the processor then pads time to a whole patch, and so do we).
        import torch

        return torch.arange(0, total_frames, total_frames / count).int().numpy().astype(np.int64)

    def sample(self, frames: np.ndarray, source_fps: float | None) -> Video:
        """The `Video` of the sampled frames, with its sampled rate."""
        indices = self.indices(frames.shape[0], source_fps)
        return Video(frames[indices], _sampled_fps(len(indices), frames.shape[0], source_fps, self))

    def describe(self) -> str:
        if self.num_frames is not None:
            return f"{self.num_frames} frames"
        return (
            f"{self.fps:g} fps ({self.min_frames}-{self.max_frames or 'all'} frames, multiple of {self.frame_factor})"
        )


def _sampled_fps(kept: int, total: int, source_fps: float | None, sampling: FrameSampling) -> float | None:
    """The rate of the kept frames (VideoMetadata.sampled_fps); in-memory frames of the fps rule
    are at ``sampling.fps`` by definition."""
    source_fps = source_fps if source_fps is not None else sampling.fps
    if source_fps is None:
        return None
    return kept / total * source_fps


def frame_sampling(processor: ProcessorMixin | None, settings: CafeSettings | None = None) -> FrameSampling:
    """The frame-sampling rule of a backbone's processor under CAFe settings.

    Qwen2-VL's video processor patches time (``temporal_patch_size``) and samples by fps; every
    other video processor (LLaVA-OneVision) takes a fixed frame count.
    """
    from .configuration import CafeSettings

    settings = settings if settings is not None else CafeSettings()
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is not None and getattr(video_processor, "temporal_patch_size", None):
        return FrameSampling(
            num_frames=None,
            fps=settings.video_fps,
            min_frames=int(getattr(video_processor, "min_frames", None) or 1),
            max_frames=getattr(video_processor, "max_frames", None),
            frame_factor=int(video_processor.temporal_patch_size),
        )
    return FrameSampling(num_frames=settings.video_num_frames)


def check_video_processor(processor: ProcessorMixin) -> None:
    """A processor without a video processor cannot take a video: say so before anything else."""
    if getattr(processor, "video_processor", None) is None:
        raise ValueError(
            f"The processor ({type(processor).__name__}) has no video_processor, so it cannot take videos. Load the "
            "checkpoint's full processor (AutoProcessor.from_pretrained(<model path>)); LLaVA-OneVision and "
            "Qwen2-VL / Qwen2.5-VL processors have one."
        )


# ----------------------------------------------------------------------------- loading
def load_video(
    video: Any,
    sampling: FrameSampling | None = None,
    where: str = "input",
    folder: str | os.PathLike | None = None,
) -> Video:
    """Turn any accepted video input into a sampled `Video`.

    Args:
        video: A video file path, a list of frames (PIL images, image paths or ``[H, W, 3]``
            uint8 arrays), a ``[T, H, W, 3]`` uint8 array or tensor, or a `Video`.
        sampling: The frame rule (`frame_sampling` of the model's processor); default: 8 frames.
        where: What the video belongs to (``"record 3 (pair video)"``), for error messages.
        folder: Base folder of relative paths (files and frame images).

    Raises:
        FileNotFoundError: a file that does not exist. VideoError: unreadable file, no decoder,
        frames of different sizes or of the wrong type.
    """
    sampling = sampling if sampling is not None else FrameSampling()
    if isinstance(video, Video):
        return sampling.sample(video.frames, video.fps)
    if isinstance(video, (str, os.PathLike)):
        return _decode_file(_resolve(video, folder), sampling, where)
    if isinstance(video, (list, tuple)):
        return sampling.sample(_stack_frames(video, folder, where), None)
    frames = _as_array(video, where)
    if frames is not None:
        return sampling.sample(frames, None)
    raise TypeError(
        f"Expected a video for {where}: a video file path, a list of frames, a [T, H, W, 3] uint8 array or a "
        f"cafe.video.Video; got {type(video).__name__}."
    )


def _resolve(path: str | os.PathLike, folder: str | os.PathLike | None) -> Path:
    path = Path(path)
    if folder is not None and not path.is_absolute():
        path = Path(folder) / path
    return path


def _decode_file(path: Path, sampling: FrameSampling, where: str) -> Video:
    if not path.is_file():
        raise FileNotFoundError(f"Video file not found for {where}: {str(path)!r}. Check the path / image folder.")
    backend = _decoder_backend()
    from transformers.video_utils import load_video as transformers_load_video

    seen: dict[str, Any] = {}

    def sample_indices(metadata: VideoMetadata, **kwargs: Any) -> np.ndarray:
        if not metadata.total_num_frames:
            raise VideoError(f"the container does not state its frame count ({backend})")
        seen.update(total=metadata.total_num_frames, fps=metadata.fps)
        seen["kept"] = sampling.indices(metadata.total_num_frames, metadata.fps)
        return seen["kept"]

    try:
        # transformers annotates load_video with array inputs only; it takes a path or URL too.
        frames, _ = transformers_load_video(str(path), backend=backend, sample_indices_fn=sample_indices)  # type: ignore[arg-type]
    except (ValueError, OSError, RuntimeError, IndexError, EOFError) as err:
        # PyAV's FFmpegError types derive from ValueError / OSError; a file without a video
        # stream fails with IndexError, a truncated one with EOFError.
        raise VideoError(
            f"Corrupt or unreadable video for {where}: {str(path)!r} ({type(err).__name__}: {err}). Re-encode the "
            "file (e.g. ffmpeg -i in.mp4 -c:v libx264 out.mp4), or pass its frames as a list of images."
        ) from None
    frames = np.asarray(frames)
    # The decoder returns each sampled frame once; the fixed count may repeat frames of a short clip.
    distinct, order = np.unique(seen["kept"], return_inverse=True)
    if frames.ndim != 4 or frames.shape[0] != len(distinct):
        raise VideoError(
            f"Corrupt or truncated video for {where}: {str(path)!r} states {seen['total']} frames but "
            f"{frames.shape[0] if frames.ndim == 4 else 0} of the {len(distinct)} sampled ones decoded. Re-encode it."
        )
    frames = np.ascontiguousarray(frames[order], dtype=np.uint8)
    return Video(frames, _sampled_fps(len(order), seen["total"], seen["fps"], sampling))


def _decoder_backend() -> str:
    from transformers.utils import is_av_available, is_torchcodec_available

    if is_av_available():
        return "pyav"
    if is_torchcodec_available():
        return "torchcodec"
    raise ImportError(
        f"Decoding video files needs a decoder: {VIDEO_DECODER_HINT}. Or pass the frames as a list of images."
    )


def _stack_frames(frames: list[Any] | tuple[Any, ...], folder: str | os.PathLike | None, where: str) -> np.ndarray:
    from .prompting import load_image

    if not frames:
        raise VideoError(f"The video of {where} is an empty list of frames.")
    arrays = []
    for i, frame in enumerate(frames):
        if isinstance(frame, np.ndarray):
            array = frame
        else:
            if isinstance(frame, (str, os.PathLike)):
                frame = _resolve(frame, folder)
            try:
                array = np.asarray(load_image(frame, f"{where}, frame {i}"))
            except ValueError as err:  # a corrupt frame file: the video is unusable
                raise VideoError(str(err)) from None
            except TypeError:
                raise TypeError(
                    f"Frame {i} of the video of {where} is a {type(frame).__name__}; frames must be PIL images, "
                    "image paths or [H, W, 3] uint8 arrays."
                ) from None
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise VideoError(f"Frame {i} of the video of {where} must be [H, W, 3] uint8 RGB, got {_describe(array)}.")
        arrays.append(array)
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise VideoError(
            f"The frames of the video of {where} have different sizes {sorted(sizes)}; resize them to one size."
        )
    return np.stack(arrays)


def _as_array(video: Any, where: str) -> np.ndarray | None:
    try:
        import torch

        if isinstance(video, torch.Tensor):
            video = video.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if not isinstance(video, np.ndarray):
        return None
    if video.ndim != 4 or video.shape[-1] != 3:
        hint = " (channels first? use frames.permute(0, 2, 3, 1))" if video.ndim == 4 and video.shape[1] == 3 else ""
        raise VideoError(f"The video of {where} must be a [T, H, W, 3] array, got shape {video.shape}{hint}.")
    if video.dtype != np.uint8:
        raise VideoError(
            f"The video of {where} must hold uint8 RGB values (0-255), got dtype {video.dtype}; convert it, e.g. "
            "(frames * 255).round().astype(numpy.uint8) for values in [0, 1]."
        )
    if video.shape[0] == 0:
        raise VideoError(f"The video of {where} has no frames.")
    return np.ascontiguousarray(video)


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, codec: str = "mpeg4") -> Path:
    """Write ``[T, H, W, 3]`` uint8 frames as a video file with PyAV (for data and tests).

    ``mpeg4`` (in every PyAV wheel) is lossy: decoded colours differ from the frames by a few
    levels. Height and width must be even (yuv420p).
    """
    try:
        import av
    except ImportError:
        raise ImportError(f"Writing video files needs PyAV: {VIDEO_DECODER_HINT}.") from None
    from fractions import Fraction

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoError(f"write_video takes [T, H, W, 3] uint8 frames, got {_describe(frames)}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        if not isinstance(stream, av.VideoStream):
            raise VideoError(f"write_video needs a video codec, got {codec!r} ({type(stream).__name__}).")
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
