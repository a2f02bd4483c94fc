"""Training records: every supported layout becomes one `TrainingExample`.

Layouts (keys of one record):

- LLaVA conversation (LLaVA-OneVision-Data): ``image``, ``conversations`` (``from``/``value``).
  LM sequence = the conversation; contrastive pair = (image, the assistant answers joined), as
  the reference does. A text-only conversation names its contrastive query with ``query``.
- Plain pair: ``image``, ``text``. Contrastive pair = (image, text); LM sequence = a captioning
  turn (``caption_prompt`` -> text) unless ``caption_prompt`` is None.
- Text pair: ``query``, ``positive``. Contrastive only.
- Interleaved / MMEB pair: ``query_text`` and/or ``query_image``, ``target_text`` and/or
  ``target_image`` (VLM2Vec's ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path`` too).

Wherever a record carries an image it may carry a ``video`` instead (``video``,
``query_video``, ``target_video``, ``negative_video``, ``{"video", "text"}`` items; a ``<video>``
turn in a conversation): a video file path, a list of frames or a ``[T, H, W, 3]`` uint8 array
(see `cafe.video`). A side shows one image or one video, not both.

Any layout may add ``negatives`` (list of texts or ``{"image" | "video", "text"}`` dicts: hard
negatives) and ``positives`` (several positives; one is sampled each time the record is used).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import io
import json
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .prompting import check_image_pixels, decompression_bomb_message, load_image
from .video import FrameSampling, Video, VideoError, load_video

if TYPE_CHECKING:
    from PIL import Image

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

EXPECTED_LAYOUTS = (
    "{'image'|'video', 'conversations'} (LLaVA), {'image'|'video', 'text'} (pair), {'query', 'positive'} (text "
    "pair), {'query_text'|'query_image'|'query_video', 'target_text'|'target_image'|'target_video'} (interleaved / MMEB)"
)
# Every key a layout reads (VLM2Vec's names in `_MMEB_ALIASES` too). Other keys are metadata and
# ignored (LLaVA-OneVision-Data's ``data_source``, ground-truth columns), unless they look like a
# misspelt layout key: then the layout would silently lose a field, so the record is refused.
LAYOUT_KEYS = (
    "image",
    "video",
    "conversations",
    "text",
    "query",
    "positive",
    "positives",
    "negatives",
    "query_text",
    "query_image",
    "target_text",
    "target_image",
    "query_video",
    "target_video",
    "negative_text",
    "negative_image",
    "negative_video",
)
_MMEB_ALIASES = {
    "qry": "query_text",
    "qry_text": "query_text",
    "qry_image_path": "query_image",
    "qry_image": "query_image",
    "pos_text": "target_text",
    "pos_image_path": "target_image",
    "pos_image": "target_image",
    "neg_text": "negative_text",
    "neg_image_path": "negative_image",
}


class RecordError(ValueError):
    """A training record that cannot be used; the message names the record and the fix."""


class ImageRecordError(RecordError):
    """A record whose image or video cannot be used: missing, unreadable, corrupt or too large.

    ``missing_images="skip"`` skips records that raise this (and only this) error; any other
    `RecordError` is a mistake in the data that skipping would hide.
    """


@dataclass
class Side:
    """One side of a contrastive pair: an image (loaded, RGB) or a video (sampled), and/or a text."""

    image: Any = None
    text: str | None = None
    image_key: str | None = None  # identity of the image content, for dedup and false negatives
    video: Video | None = None

    @property
    def visual_key(self) -> str | None:
        """Identity of the image or video this side shows (None: text only, or unhashed image)."""
        return self.video.key if self.video is not None else self.image_key

    @property
    def has_visual(self) -> bool:
        return self.image is not None or self.video is not None


@dataclass
class TrainingExample:
    query: Side | None
    positive: Side | None
    negatives: list[Side] = field(default_factory=list)
    # transformers-format messages of the LM sequence and the sides of the images / videos it
    # shows, in order.
    conversation: list[dict[str, Any]] | None = None
    conversation_visuals: list[Side] = field(default_factory=list)


def image_content_key(image: Image.Image) -> str:
    """Hash of the decoded pixels: identical images share a key wherever they come from."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(repr((image.size, image.mode)).encode())
    return digest.hexdigest()


def _open_image(value: Any, image_folder: str | None, where: str, max_pixels: int | None = None) -> Image.Image:
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        # `datasets.Image(decode=False)` rows.
        if value.get("bytes") is not None:
            from PIL import Image

            try:
                with Image.open(io.BytesIO(value["bytes"])) as opened:
                    check_image_pixels(opened, f"{where} (image bytes)", max_pixels)
                    return opened.convert("RGB")
            except Image.DecompressionBombError as err:
                raise ImageRecordError(decompression_bomb_message(f"{where} (image bytes)", err)) from None
            except ValueError as err:
                raise ImageRecordError(str(err)) from None
            except OSError as err:
                raise ImageRecordError(f"Corrupt image bytes in {where} ({err}).") from None
        value = value["path"]
    if isinstance(value, str) and not value.strip():
        raise ImageRecordError(f"{where}: the image path is empty. Fill it in, or leave the field out (null).")
    if isinstance(value, (str, os.PathLike)) and image_folder is not None and not Path(value).is_absolute():
        value = Path(image_folder) / value
    try:
        return load_image(value, where, max_pixels=max_pixels)
    except (FileNotFoundError, ValueError) as err:
        raise ImageRecordError(str(err)) from err
    except TypeError as err:
        raise RecordError(str(err)) from err


def _open_video(value: Any, folder: str | None, where: str, sampling: FrameSampling | None) -> Video:
    try:
        return load_video(value, sampling, where, folder)
    except (FileNotFoundError, VideoError) as err:
        raise ImageRecordError(str(err)) from err
    except TypeError as err:
        raise RecordError(str(err)) from err
    # An ImportError (no video decoder installed) passes through: it is the environment, not the
    # record, and missing_images="skip" must not silently skip every video record for it.


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where}: {what} must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise RecordError(f"{where}: {what} is empty. Remove the record or give it a non-empty text.")
    return value


class RecordParser:
    """Turns raw records into `TrainingExample` objects.

    Args:
        image_folder: Folder that relative image paths are resolved against.
        multimodal_input: Reference flag: the query is the user turn (image + question text) and
            the positive the answer, instead of (image, caption).
        caption_prompt: User turn of the LM sequence built for plain (image, text) pairs;
            None trains plain pairs contrastively only.
        seed: Seed of the positive sampling for records with several positives.
        max_image_pixels: Refuse images with more pixels (checked before decoding); default:
            only PIL's own decompression-bomb limit.
        hash_images: Compute each image's content key (``Side.image_key``, used to encode an
            image once per batch and to mask false negatives). A check that only needs to know
            whether records parse turns it off: hashing costs about as much as decoding.
        video_sampling: Which frames of a video a model sees (`cafe.video.frame_sampling` of its
            processor; `CafeCollator` passes it). Default: 8 frames.
        video_caption_prompt: User turn of the LM sequence built for (video, text) pairs; default:
            ``caption_prompt`` with "image" replaced by "video" ("Describe the video.").

    Keys whose value is None count as absent: `datasets` gives every row of a file that mixes
    layouts all the columns, with None for the ones the row does not have.
    """

    def __init__(
        self,
        image_folder: str | None = None,
        multimodal_input: bool = False,
        caption_prompt: str | None = "Describe the image.",
        seed: int = 0,
        max_image_pixels: int | None = None,
        hash_images: bool = True,
        video_sampling: FrameSampling | None = None,
        video_caption_prompt: str | None = None,
    ):
        self.image_folder = image_folder
        self.multimodal_input = multimodal_input
        self.caption_prompt = caption_prompt
        if video_caption_prompt is None and caption_prompt is not None:
            video_caption_prompt = caption_prompt.replace("image", "video")
        self.video_caption_prompt = video_caption_prompt
        self.video_sampling = video_sampling
        self.max_image_pixels = max_image_pixels
        self.hash_images = hash_images
        self._rng = random.Random(seed)

    def where(self, record: Mapping, position: int) -> str:
        index = record.get("record_index")
        if index is None:
            index = record.get("id")
        return f"record {position if index is None else index}"

    def side(self, image: Any, text: Any, where: str, what: str, video: Any = None) -> Side:
        if image is not None and video is not None:
            raise RecordError(
                f"{where}: the {what} has both an image and a video; a side shows one of them. Split the record in two."
            )
        side = Side()
        if image is not None:
            side.image = _open_image(image, self.image_folder, f"{where} ({what} image)", self.max_image_pixels)
            side.image_key = image_content_key(side.image) if self.hash_images else None
        if video is not None:
            side.video = _open_video(video, self.image_folder, f"{where} ({what} video)", self.video_sampling)
        if text is not None:
            side.text = _text(text, where, f"{what} text")
        if not side.has_visual and side.text is None:
            raise RecordError(f"{where}: the {what} has neither an image, a video nor a text.")
        return side

    def _item(self, value: Any, where: str, what: str) -> Side:
        if isinstance(value, dict):
            return self.side(value.get("image"), value.get("text"), where, what, video=value.get("video"))
        return self.side(None, value, where, what)

    def __call__(self, record: Mapping, position: int = 0) -> TrainingExample:
        if not isinstance(record, Mapping):
            raise RecordError(
                f"record {position} is a {type(record).__name__}, not a dict of fields; a collator takes a "
                "list of records (e.g. collator([record])), each a dict such as {'image': ..., 'text': ...}."
            )
        where = self.where(record, position)
        given = [k for k, v in record.items() if v is not None]
        fields = [_MMEB_ALIASES.get(k, k) for k in given]
        clashing = sorted({f for f in fields if fields.count(f) > 1})
        if clashing:
            names = [g for g, f in zip(given, fields, strict=True) if f in clashing]
            raise RecordError(
                f"{where} gives {' and '.join(map(repr, names))}, which name the same field ({', '.join(clashing)}); "
                "keep one of them."
            )
        record = {_MMEB_ALIASES.get(k, k): v for k, v in record.items() if v is not None}
        _check_keys(record, where)
        if "positive" in record and "positives" in record:
            raise RecordError(f"{where} has both 'positive' and 'positives'; put the positive into 'positives'.")
        if "negatives" in record and not isinstance(record["negatives"], (list, tuple)):
            value = record["negatives"]
            shown = json.dumps(value) if isinstance(value, str) and len(value) <= 60 else "..."
            raise RecordError(
                f"{where}: 'negatives' must be a list of texts or {{'image', 'text'}} dicts, got a "
                f"{type(value).__name__} (a string would become one negative per character); write "
                f'"negatives": [{shown}].'
            )
        # Every layout reads the hard negatives and `positives`; the rest is per layout.
        read = {"negatives", "negative_text", "negative_image", "negative_video", "positives"}
        if "conversations" in record:
            example = self._llava(record, where)
            layout, read = "LLaVA conversation", read | {"conversations", "image", "video"}
            if not self.multimodal_input and record.get("image") is None and record.get("video") is None:
                read.add("query")  # a text-only conversation names its contrastive query
        elif "query" in record and "positive" in record or "query" in record and "positives" in record:
            example = TrainingExample(self._item(record["query"], where, "query"), None)
            layout, read = "text pair", read | {"query", "positive"}
        elif ("image" in record or "video" in record) and ("text" in record or "positives" in record):
            example = self._pair(record, where)
            layout, read = "image / video + text pair", read | {"image", "video", "text"}
        elif {"query_text", "query_image", "query_video"} & set(record) and {
            "target_text",
            "target_image",
            "target_video",
            "positives",
        } & set(record):
            example = TrainingExample(self._prefixed_side(record, "query", where), None)
            if {"target_text", "target_image", "target_video"} & set(record):
                example.positive = self._prefixed_side(record, "target", where)
            prefixed = {f"{side}_{kind}" for side in ("query", "target") for kind in ("text", "image", "video")}
            layout, read = "interleaved", read | prefixed
        else:
            raise RecordError(
                f"{where} fits no supported layout; it has keys {sorted(record)}, expected {EXPECTED_LAYOUTS}."
            )
        ignored = sorted(k for k in record if k in LAYOUT_KEYS and k not in read)
        if ignored:
            # Training would drop these fields without a word: a record mixing two layouts.
            raise RecordError(
                f"{where} is read as a {layout} record, which does not use its {', '.join(map(repr, ignored))}; "
                f"a record has one layout ({EXPECTED_LAYOUTS}): split it into two records or drop the field."
            )

        if example.positive is None or "positives" in record:
            example.positive = self._sample_positive(record, where, example.positive)
        positives = [record[key] for key in ("positive", "text", "target_text") if key in record]
        positives += record.get("positives") or []
        for i, negative in enumerate(record.get("negatives", [])):
            if any(negative == positive for positive in positives):
                # In-batch duplicates are masked out of the softmax; a hard negative equal to its own
                # positive would be trained *away* from itself.
                raise RecordError(
                    f"{where}: negative {i} is identical to the record's positive ({negative!r:.80}); drop it from "
                    "'negatives'."
                )
            example.negatives.append(self._item(negative, where, f"negative {i}"))
        if {"negative_text", "negative_image", "negative_video"} & set(record):
            example.negatives.append(self._prefixed_side(record, "negative", where))
        return example

    def _prefixed_side(self, record: dict, prefix: str, where: str) -> Side:
        """The side of ``{prefix}_image`` / ``{prefix}_video`` / ``{prefix}_text`` (interleaved layout)."""
        return self.side(
            record.get(f"{prefix}_image"),
            record.get(f"{prefix}_text"),
            where,
            prefix,
            video=record.get(f"{prefix}_video"),
        )

    def rng_state(self) -> list:
        """The positives-sampling RNG's state as JSON-able lists (saved in training checkpoints)."""
        version, internal, gauss = self._rng.getstate()
        return [version, list(internal), gauss]

    def set_rng_state(self, state: list) -> None:
        version, internal, gauss = state
        self._rng.setstate((version, tuple(internal), gauss))

    def check(self, record: Mapping, position: int = 0) -> TrainingExample:
        """Parse `record` as `__call__` does, and also every one of its ``positives``.

        For a pre-flight check of a data set: training samples one positive per use, so a bad
        one among several would otherwise surface only when drawn. Raises `RecordError`.
        """
        example = self(record, position)
        positives = record.get("positives") if isinstance(record, Mapping) else None
        if isinstance(positives, list):
            where = self.where(record, position)
            for i, positive in enumerate(positives):
                self._item(positive, where, f"positive {i}")
        return example

    def _sample_positive(self, record: dict, where: str, default: Side | None) -> Side:
        positives = record.get("positives")
        if positives is None:
            if "positive" in record:
                return self._item(record["positive"], where, "positive")
            if default is None:
                raise RecordError(f"{where} has no positive; expected one of {EXPECTED_LAYOUTS}.")
            return default
        if not isinstance(positives, list) or not positives:
            raise RecordError(f"{where}: 'positives' must be a non-empty list.")
        # Same draw as `self._rng.choice(positives)`, with the index kept for error messages.
        index = self._rng.randrange(len(positives))
        return self._item(positives[index], where, f"positive {index}")

    def _pair(self, record: dict, where: str) -> TrainingExample:
        visual_side = self.side(record.get("image"), None, where, "pair", video=record.get("video"))
        text = record.get("text")
        example = TrainingExample(visual_side, None if text is None else self.side(None, text, where, "pair"))
        kind = "video" if visual_side.video is not None else "image"
        prompt = self.video_caption_prompt if kind == "video" else self.caption_prompt
        if prompt is not None and text is not None:
            example.conversation = [
                {"role": "user", "content": [{"type": kind}, {"type": "text", "text": prompt}]},
                {"role": "assistant", "content": [{"type": "text", "text": text}]},
            ]
            example.conversation_visuals = [visual_side]
        return example

    def _llava(self, record: dict, where: str) -> TrainingExample:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            raise RecordError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns.")
        visual = None
        if record.get("image") is not None or record.get("video") is not None:
            visual = self.side(record.get("image"), None, where, "conversation", video=record.get("video"))
        # The record's one visual input and its placeholder ("<image>" or "<video>").
        kind = "video" if visual is not None and visual.video is not None else "image"
        messages: list[dict[str, Any]] = []
        answers: list[str] = []
        questions: list[str] = []
        counts = {"image": 0, "video": 0}
        for t, turn in enumerate(turns):
            if not isinstance(turn, Mapping):
                raise RecordError(
                    f"{where}: turn {t} of 'conversations' is a {type(turn).__name__}; each turn is a dict "
                    '{"from": "human" | "gpt", "value": "..."}.'
                )
            source = turn.get("from")
            roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
            role = roles.get(source) if isinstance(source, str) else None
            if role is None:
                raise RecordError(f"{where}: turn {t} has 'from'={turn.get('from')!r}; expected 'human' or 'gpt'.")
            value = turn.get("value")
            if not isinstance(value, str):
                raise RecordError(f"{where}: turn {t} has no string 'value'.")
            content = []
            for name, placeholder in (("image", IMAGE_PLACEHOLDER), ("video", VIDEO_PLACEHOLDER)):
                if placeholder in value:
                    counts[name] += value.count(placeholder)
                    content.append({"type": name})
                    value = value.replace(placeholder, "").strip()
            if role == "assistant":
                answers.append(_text(value, where, f"answer of turn {t}"))
            else:
                questions.append(value)
            content.append({"type": "text", "text": value})
            messages.append({"role": role, "content": content})
        if not answers:
            raise RecordError(f"{where}: the conversation has no assistant ('gpt') turn to learn from.")
        if visual is not None and counts["image"] + counts["video"] == 0:
            # LLaVA data sometimes omit the placeholder; the image goes before the first question.
            messages[0]["content"].insert(0, {"type": kind})
            counts[kind] = 1
        other = "image" if kind == "video" else "video"
        if (visual is None) != (counts[kind] == 0) or counts[kind] > 1 or counts[other]:
            shown = " and ".join(f"{n} '<{name}>'" for name, n in counts.items() if n) or "no '<image>' / '<video>'"
            has = f"one {kind}" if visual is not None else "no image or video"
            raise RecordError(
                f"{where}: the conversation has {shown} placeholder(s) but the record has {has}; records hold at most "
                "one image or video, shown by one matching placeholder."
            )
        answer = " ".join(answers)
        if self.multimodal_input:
            # The query is the whole user side of the conversation, as the reference builds it:
            # every user turn's text joined (like the answers), with the image or video.
            question = " ".join(q for q in questions if q) or None
            query = dataclasses.replace(visual, text=question) if visual is not None else Side(text=question)
            if not query.has_visual and query.text is None:
                raise RecordError(
                    f"{where}: multimodal_input needs an image, a video or a question text in the first turn."
                )
        elif visual is not None:
            query = visual
        elif "query" in record:
            # A text-only conversation (instruction data such as "Define the word X." -> gloss):
            # the record names its contrastive query; the positive is the answers, as above.
            query = self._item(record["query"], where, "query")
        else:
            raise RecordError(
                f"{where}: a LLaVA record without an image or video has no pair to contrast; give it a 'query' "
                "text (contrasted with the answers) or an image."
            )
        return TrainingExample(
            query,
            Side(text=answer),
            conversation=messages,
            conversation_visuals=[visual] if visual is not None else [],
        )


def _check_keys(record: dict, where: str) -> None:
    """Refuse a key that is not a layout key but looks like a misspelt one."""
    for key in record:
        close = _misspelt_layout_key(key) if isinstance(key, str) else None
        if close:
            raise RecordError(
                f"{where}: unknown key {key!r} (did you mean {close!r}?). Its value would be ignored. "
                f"The known keys are {', '.join(LAYOUT_KEYS)} (and VLM2Vec's {', '.join(_MMEB_ALIASES)}); "
                "rename the key, or give metadata a name that is not close to one of these."
            )


@functools.lru_cache(maxsize=4096)  # a data set has few distinct keys; difflib is slow
def _misspelt_layout_key(key: str) -> str | None:
    """The layout key `key` is probably a misspelling of, or None (also for layout keys)."""
    known = (*LAYOUT_KEYS, *_MMEB_ALIASES)
    if key in known:
        return None
    close = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.8)
    return close[0] if close else None


def columns_read_by_parser(column_names: Iterable[str]) -> list[str]:
    """The columns of a data set that `RecordParser` reads or refuses (a misspelt layout key);
    the others are metadata it never looks at, which a pre-flight check need not load."""
    wanted = {*LAYOUT_KEYS, *_MMEB_ALIASES, "id", "record_index"}
    return [name for name in column_names if name in wanted or _misspelt_layout_key(name)]
