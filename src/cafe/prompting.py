"""The CAFe embedding instruction (paper Table 1): from raw images / texts to model inputs.

One Jinja chat template does all the prompting. It receives a conversation in the
transformers / sentence-transformers message format (a user turn whose content holds images and
text, optionally a system turn carrying a task instruction) and renders the reference's
embedding conversation::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<image>\\nCompress this image in one word:<|im_end|>\\n
    <|im_start|>assistant\\n<|im_end|>

cafe renders with it through ``processor.apply_chat_template`` and the sentence-transformers export
hands the very same template to sentence-transformers, so both paths give the same token ids by
construction.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .configuration import CafeSettings

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

    from .video import FrameSampling


def _literal(text: str) -> str:
    """A Jinja string literal for `text` (Jinja parses double-quoted literals like JSON strings)."""
    return json.dumps(text, ensure_ascii=False)


def build_embedding_chat_template(
    settings: CafeSettings, image_placeholder: str, video_placeholder: str | None = None
) -> str:
    """Render `settings` into the Jinja embedding template of a ChatML backbone.

    Args:
        settings: The prompts to embed in the template.
        image_placeholder: The text one image stands for in a prompt, as the backbone's processor
            expects it (``"<image>\\n"`` for LLaVA-OneVision).
        video_placeholder: The same for one video (``"<video>\\n"``); default: the image
            placeholder with "image" replaced by "video", which is right for every supported
            family (see `default_video_placeholder`).

    Images and videos come first (in their order of appearance), then the optional instruction
    (a system turn, which is how sentence-transformers passes ``prompts``), then the text, then
    the modality's suffix: ``image_prompt`` for image-only inputs, ``video_prompt`` for
    video-only inputs, ``text_prompt`` for text-only inputs and ``multimodal_prompt`` for image
    or video + text. Each text is cut to ``settings.max_text_chars`` characters here, in the
    template, so that every path that renders with it (training, ``encode``,
    sentence-transformers) embeds the same text.
    """
    if video_placeholder is None:
        video_placeholder = default_video_placeholder(image_placeholder)
    # Why in the template: sentence-transformers renders with this template and can only cut
    # the *rendered* prompt, from the right, which would drop the pooled token.
    cut = "" if settings.max_text_chars is None else f"[:{int(settings.max_text_chars)}]"
    return (
        "{%- set ns = namespace(visuals='', instruction='', text='', has_image=false, has_video=false, has_text=false) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"
        "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
        "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
        "{%- for part in parts -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- if part['type'] == 'text' -%}{%- set ns.instruction = ns.instruction + part['text'] -%}{%- endif -%}"
        "{%- elif part['type'] == 'image' -%}"
        f"{{%- set ns.visuals = ns.visuals + {_literal(image_placeholder)} -%}}"
        "{%- set ns.has_image = true -%}"
        "{%- elif part['type'] == 'video' -%}"
        f"{{%- set ns.visuals = ns.visuals + {_literal(video_placeholder)} -%}}"
        "{%- set ns.has_video = true -%}"
        "{%- elif part['type'] == 'text' -%}"
        f"{{%- set ns.text = ns.text + part['text']{cut} -%}}{{%- set ns.has_text = true -%}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endfor -%}"
        f"{{%- if (ns.has_image or ns.has_video) and ns.has_text -%}}"
        f"{{%- set suffix = {_literal(settings.multimodal_prompt)} -%}}"
        f"{{%- elif ns.has_video -%}}{{%- set suffix = {_literal(settings.video_prompt)} -%}}"
        f"{{%- elif ns.has_image -%}}{{%- set suffix = {_literal(settings.image_prompt)} -%}}"
        f"{{%- else -%}}{{%- set suffix = {_literal(settings.text_prompt)} -%}}{{%- endif -%}}"
        f"{{{{ '<|im_start|>system\\n' + {_literal(settings.system_prompt)} + '<|im_end|>\\n' }}}}"
        "{{ '<|im_start|>user\\n' + ns.visuals + ns.instruction + ns.text + suffix + '<|im_end|>\\n' }}"
        # The empty assistant turn: its closing <|im_end|> is the pooled token.
        "{{ '<|im_start|>assistant\\n<|im_end|>' }}"
    )


def default_video_placeholder(image_placeholder: str) -> str:
    """The video placeholder of a family from its image placeholder: ``"<image>\\n"`` ->
    ``"<video>\\n"`` (LLaVA-OneVision), ``<|vision_start|><|image_pad|><|vision_end|>`` ->
    ``<|vision_start|><|video_pad|><|vision_end|>`` (Qwen2-VL / Qwen2.5-VL)."""
    return image_placeholder.replace("image", "video")


def build_lm_chat_template(settings: CafeSettings, image_placeholder: str, video_placeholder: str | None = None) -> str:
    """The Jinja template of CAFe's LM (next-token) training conversations.

    The reference trains on its own conversation format whatever template a checkpoint ships::

        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
        <|im_start|>user\\n<image>\\nDescribe the image.<|im_end|>\\n
        <|im_start|>assistant\\nA red square.<|im_end|>\\n

    (ChatML, a system turn unless the conversation brings its own, images where they appear in
    the content). llava-hf's LLaVA-OneVision checkpoints ship a generation template without the
    system turn; rendering the LM sequences with it would drop the turn LLaVA-OneVision was
    trained with and leave the LM sequence and the image-embedding sequence (which has it) with a
    one-token common prefix, so prefix sharing would find nothing to share.

    Args:
        settings: Provides ``system_prompt`` (the same system turn as the embedding template's).
        image_placeholder: The text one image stands for before the processor expands it.
        video_placeholder: The same for one video (default: `default_video_placeholder`).
    """
    if video_placeholder is None:
        video_placeholder = default_video_placeholder(image_placeholder)
    return (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        f"{{{{ '<|im_start|>system\\n' + {_literal(settings.system_prompt)} + '<|im_end|>\\n' }}}}"
        "{%- endif -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{ {_literal(image_placeholder)} }}}}"
        f"{{%- elif part['type'] == 'video' -%}}{{{{ {_literal(video_placeholder)} }}}}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


@dataclass(frozen=True)
class EmbeddingInput:
    """One thing to embed: an image or a video, a text, or both.

    ``image`` is a loaded PIL image, ``video`` a sampled `cafe.video.Video`; at most one of them.
    """

    image: Any = None
    text: str | None = None
    video: Any = None

    def to_messages(self, instruction: str | None = None) -> list[dict[str, Any]]:
        """The conversation in the transformers message format, as sentence-transformers builds it."""
        content: list[dict[str, Any]] = []
        if self.image is not None:
            content.append({"type": "image"})
        if self.video is not None:
            content.append({"type": "video"})
        if self.text is not None:
            content.append({"type": "text", "text": self.text})
        messages = [{"role": "user", "content": content}]
        if instruction:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": instruction}]})
        return messages


def load_image(image: Any, where: str = "input", max_pixels: int | None = None) -> Image.Image:
    """Return an RGB PIL image from a PIL image or a file path, with errors that say what to fix.

    Args:
        image: A PIL image, or the path of an image file.
        where: What the image belongs to (``"record 12 (pair image)"``), for the error messages.
        max_pixels: Refuse files with more pixels than this, checked on the header before
            decoding. Files over PIL's own decompression-bomb limit (2 x
            ``PIL.Image.MAX_IMAGE_PIXELS``) are refused either way.

    Raises:
        FileNotFoundError: no such file. ValueError: the file is corrupt, unreadable or too large.
        TypeError: neither an image nor a path.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            looked = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()})"
            raise FileNotFoundError(
                f"Image file not found for {where}: {str(path)!r}{looked}. Check the path / image folder."
            )
        try:
            with Image.open(path) as opened:
                check_image_pixels(opened, f"{where}: {str(path)!r}", max_pixels)
                return opened.convert("RGB")
        except Image.DecompressionBombError as err:
            raise ValueError(decompression_bomb_message(f"{where}: {str(path)!r}", err)) from None
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(
                f"Corrupt or unreadable image for {where}: {str(path)!r} ({err}). Re-export or remove the file."
            ) from None
    raise TypeError(
        f"Expected a PIL.Image.Image or an image file path for {where}, got {type(image).__name__}. "
        "Open the image with PIL (Image.open(path)) or pass its path inside a dict {'image': path}."
    )


def decompression_bomb_message(what: str, err: Exception) -> str:
    """The error for a file PIL refuses as a possible decompression bomb.

    Worded so that `CafeCollator`'s ``missing_images="skip"`` (which recognises corrupt and
    missing files by their message) skips it like any other unusable image file.
    """
    from PIL import Image

    limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    return (
        f"Image too large for {what} ({err}). PIL refuses images over 2 x PIL.Image.MAX_IMAGE_PIXELS = {limit} "
        "pixels as possible decompression bombs. Corrupt or oversized files like this one are skipped with "
        "missing_images='skip'; otherwise resize the file, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."
    )


def check_image_pixels(image: Image.Image, what: str, max_pixels: int | None) -> None:
    """Raise ValueError if an opened (not yet decoded) image has more than ``max_pixels`` pixels."""
    if max_pixels is None:
        return
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(
            f"Image too large for {what}: {width}x{height} = {width * height} pixels, over "
            f"max_image_pixels={max_pixels}. Resize the file or raise the limit."
        )


def check_batch_size(batch_size: Any) -> None:
    """A batch size must be a positive int (0 would loop forever or fail deep inside ``range``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be a positive integer (inputs per forward pass), got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (inputs per forward pass), got {batch_size}.")


def check_sequence(value: Any, name: str, what: str = "items") -> None:
    """Reject a single string, image or dict where a list of them is expected.

    Python iterates a string by character and a dict by key, so without this check a bare
    ``"hello"`` silently becomes five inputs. The error shows the call to write instead.
    """
    from PIL import Image

    if isinstance(value, (str, bytes)):
        shown = repr(value) if len(value) <= 40 else repr(value[:37])[:-1] + "...'"
        raise TypeError(f"{name} must be a list of {what}, got a single string; pass {name}=[{shown}].")
    if isinstance(value, Image.Image):
        raise TypeError(f"{name} must be a list of {what}, got a single PIL image; pass {name}=[image].")
    if isinstance(value, dict):
        raise TypeError(f"{name} must be a list of {what}, got a single dict; pass {name}=[row].")


def check_text(text: Any, where: str) -> str:
    """``text`` if it is a string with a non-space character, else an error naming ``where``."""
    if not isinstance(text, str):
        raise TypeError(f"Expected a string for the text of {where}, got {type(text).__name__}.")
    if not text.strip():
        raise ValueError(f"Empty text for {where}: an embedding needs at least one non-space character.")
    return text


# sentence-transformers' rule for a bare string (`sentence_transformers.base.modality`): an existing
# local file with one of these extensions is that image or video, anything else is text. cafe
# follows it so that `encode(["photo.jpg"])` embeds the same thing in both libraries.
IMAGE_FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tiff", ".webp")
VIDEO_FILE_EXTENSIONS = (".mp4", ".avi", ".mov", ".wmv", ".flv", ".mkv")


def media_kind(text: str) -> str | None:
    """``"image"`` / ``"video"`` if the bare string ``text`` names such a local file, else None (a text).

    Image or video URLs and ``data:image/`` URIs, which sentence-transformers downloads and embeds as
    images, are refused: cafe does not fetch, and embedding the address as text would give a vector
    unlike sentence-transformers' one without a word.
    """
    lowered = text.lower()
    is_url = text.startswith(("http://", "https://")) and " " not in text
    if text.startswith("data:image/") or (is_url and lowered.split("?")[0].endswith(IMAGE_FILE_EXTENSIONS)):
        raise ValueError(
            f"{text[:80]!r} is an image URL: cafe does not download. Fetch it and pass the PIL image or the "
            'local path (or {"text": ...} to embed the address as text).'
        )
    if lowered.endswith(IMAGE_FILE_EXTENSIONS) and os.path.isfile(text):
        return "image"
    if lowered.endswith(VIDEO_FILE_EXTENSIONS) and os.path.isfile(text):
        return "video"
    return None


def to_embedding_inputs(
    inputs: Sequence[Any] | None = None,
    *,
    images: Sequence[Any] | None = None,
    texts: Sequence[str] | None = None,
    video_sampling: FrameSampling | None = None,
) -> list[EmbeddingInput]:
    """Normalise what users pass into a list of `EmbeddingInput`.

    Accepted: ``inputs`` as a list of strings (texts; a string naming an existing local image or
    video file by its extension is that file, as in sentence-transformers), PIL images, `cafe.video.Video` clips,
    ``{"image": ..., "text": ...}`` / ``{"video": ..., "text": ...}`` dicts or ``(image, text)``
    tuples (a single item is one input); or ``images=`` and/or ``texts=`` as lists (both given:
    they are pairs and must have the same length). A bare string or image passed as ``texts=`` /
    ``images=`` is an error: it is not a list, and iterating it would be wrong. A ``video`` is any
    input `cafe.video.load_video` takes (a file path, a list of frames, a ``[T, H, W, 3]`` uint8
    array); its frames are chosen by ``video_sampling`` (`cafe.video.FrameSampling`, the model's
    rule; default 8 frames).
    """
    return load_embedding_inputs(embedding_items(inputs, images=images, texts=texts), video_sampling)


def embedding_items(
    inputs: Sequence[Any] | None = None, *, images: Sequence[Any] | None = None, texts: Sequence[str] | None = None
) -> list[Any]:
    """`to_embedding_inputs`' first half: what users pass -> a non-empty list of raw items (one per
    input, nothing opened yet), with the same type checks."""
    from PIL import Image

    from .video import Video

    if inputs is not None and (images is not None or texts is not None):
        raise ValueError("Pass either `inputs` or `images=`/`texts=`, not both.")
    if inputs is None:
        if images is None and texts is None:
            raise ValueError("Nothing to embed: pass `inputs`, `images=` or `texts=`.")
        if images is not None:
            check_sequence(images, "images", "images (PIL images or file paths)")
        if texts is not None:
            check_sequence(texts, "texts", "strings")
        if images is not None and texts is not None:
            if len(images) != len(texts):
                raise ValueError(
                    f"`images` and `texts` are paired but have different lengths ({len(images)} vs {len(texts)}). "
                    "Pass lists of equal length, or embed them in two separate calls."
                )
            inputs = [{"image": image, "text": text} for image, text in zip(images, texts, strict=True)]
        elif images is not None:
            inputs = [{"image": image} for image in images]
        else:
            inputs = [{"text": text} for text in texts or []]
    if isinstance(inputs, (str, dict, Image.Image, Video)):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise ValueError("Nothing to embed: the input list is empty.")
    return inputs


def load_embedding_inputs(
    inputs: Sequence[Any], video_sampling: FrameSampling | None = None, first_index: int = 0
) -> list[EmbeddingInput]:
    """`to_embedding_inputs`' second half: a list of raw items (as it accepts them) -> `EmbeddingInput`,
    images opened and videos sampled. ``first_index``: the list's place in a longer one, for errors."""
    from PIL import Image

    from .video import Video, load_video

    result = []
    for index, item in enumerate(inputs, start=first_index):
        where = f"input {index}"
        kind = media_kind(item) if isinstance(item, str) else None  # one file check per string
        if kind == "image":
            result.append(EmbeddingInput(image=load_image(item, where)))
        elif kind == "video":
            result.append(EmbeddingInput(video=load_video(item, video_sampling, where)))
        elif isinstance(item, str):
            result.append(EmbeddingInput(text=check_text(item, where)))
        elif isinstance(item, Image.Image):
            result.append(EmbeddingInput(image=load_image(item, where)))
        elif isinstance(item, Video):
            result.append(EmbeddingInput(video=load_video(item, video_sampling, where)))
        elif isinstance(item, dict):
            unknown = set(item) - {"image", "text", "video"}
            if unknown or not ({"image", "text", "video"} & set(item)):
                raise ValueError(
                    f"{where}: expected a dict with keys 'image' or 'video', and/or 'text', got keys {sorted(item)}."
                )
            image, video, text = item.get("image"), item.get("video"), item.get("text")
            if image is not None and video is not None:
                raise ValueError(f"{where}: give an image or a video, not both (one visual input per embedding).")
            result.append(
                EmbeddingInput(
                    image=None if image is None else load_image(image, where),
                    text=None if text is None else check_text(text, where),
                    video=None if video is None else load_video(video, video_sampling, where),
                )
            )
        elif isinstance(item, tuple) and len(item) == 2:
            image, text = item
            result.append(EmbeddingInput(image=load_image(image, where), text=check_text(text, where)))
        else:
            raise TypeError(
                f"{where}: cannot embed an object of type {type(item).__name__}. Pass a string, a PIL image, "
                "an (image, text) tuple, a dict {'image': ..., 'text': ...} or a dict {'video': ..., 'text': ...}."
            )
        last = result[-1]
        if last.image is None and last.video is None and last.text is None:
            raise ValueError(f"{where}: 'image', 'video' and 'text' are all None; give at least one.")
    return result


def render_embedding_prompts(
    processor: ProcessorMixin | PreTrainedTokenizerBase,
    items: Iterable[EmbeddingInput],
    chat_template: str,
    instruction: str | None = None,
) -> list[str]:
    """Render each item's embedding conversation to the prompt string the processor tokenizes."""
    return [render_chat(processor, item.to_messages(instruction), chat_template) for item in items]


def render_chat(
    processor: ProcessorMixin | PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """``processor.apply_chat_template(messages, ..., tokenize=False)``: the prompt string (default
    template: the processor's own)."""
    prompt = processor.apply_chat_template(
        messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    if not isinstance(prompt, str):
        raise TypeError(
            f"{type(processor).__name__}.apply_chat_template(tokenize=False) returned a {type(prompt).__name__}, "
            "not the rendered prompt string; pass a transformers processor or tokenizer."
        )
    return prompt


def build_embedding_batch(
    processor: ProcessorMixin, items: Sequence[EmbeddingInput], chat_template: str, instruction: str | None = None
) -> BatchFeature:
    """Tokenize `items` (and preprocess their images and videos) into one padded batch for `get_embeddings`."""
    prompts = render_embedding_prompts(processor, items, chat_template, instruction)
    images = [item.image for item in items if item.image is not None]
    videos = [item.video for item in items if item.video is not None]
    return process_prompts(processor, prompts, images, videos, "embedding_chat_template")


def process_prompts(
    processor: ProcessorMixin, prompts: list[str], images: Sequence[Any], videos: Sequence[Any], template_name: str
) -> BatchFeature:
    """``processor(text=prompts, images=..., videos=...)``, padded, as PyTorch tensors.

    Args:
        prompts: Rendered prompts whose placeholders show ``images`` and ``videos``; the processor
            pairs each modality's placeholders with its list in order.
        images: PIL images. videos: `cafe.video.Video` clips (their sampled frames and rate go to
            the processor as ``videos`` and ``video_metadata``).
        template_name: The CafeSettings field the prompts were rendered with, for the error raised
            when they show fewer videos than given (a template without video support).

    Returns:
        The processor's `BatchFeature`: ``input_ids`` / ``attention_mask`` ``[rows, seq]`` plus
        the image tensors and ``pixel_values_videos`` (and ``video_grid_thw`` for Qwen2-VL).
    """
    kwargs: dict[str, Any] = {}
    if videos:
        from .video import check_video_processor

        check_video_processor(processor)
        token = getattr(processor, "video_token", None)
        shown = sum(prompt.count(token) for prompt in prompts) if token else len(videos)
        if shown != len(videos):
            if template_name in ("embedding_chat_template", "lm_chat_template"):
                fix = (
                    f"this model's {template_name} has no video placeholder (it was written before cafe supported "
                    "video, or was customised). Rebuild the templates from the family's defaults, which show videos: "
                    "CafeForConditionalGeneration.from_pretrained(path, cafe_settings={**model.config.cafe, "
                    "'embedding_chat_template': None, 'lm_chat_template': None})."
                )
            else:
                fix = (
                    f"the {template_name} renders no video placeholder for {{'type': 'video'}} parts; use a processor "
                    "whose chat_template does (the released LLaVA-OneVision and Qwen2-VL templates do)."
                )
            raise ValueError(f"The prompts show {shown} video(s) but {len(videos)} were given: {fix}")
        kwargs = {"videos": [video.frames for video in videos], "video_metadata": [video.metadata for video in videos]}
    return processor(text=prompts, images=list(images) or None, padding=True, return_tensors="pt", **kwargs)
