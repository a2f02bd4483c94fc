"""`CafeCollator`: one `CafeBatch` with the LM sequence and both embedding sides of every record.

Every distinct image and video of the batch is preprocessed once (``CafeBatch.vision``); each
sequence says which of those its placeholders show (``image_index``, ``video_index``), so the
model runs the vision tower once and hands the features to every side that shows them (see
`CafeForConditionalGeneration.cafe_forward`). See `cafe.batch` for the fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .batch import CafeBatch, EmbeddingSequences, LanguageModelingSequences, MiniBatches
from .configuration import CafeSettings
from .losses import IGNORE_INDEX
from .prompting import (
    EmbeddingInput,
    build_embedding_chat_template,
    build_lm_chat_template,
    default_video_placeholder,
    process_prompts,
    render_chat,
    render_embedding_prompts,
)
from .records import ImageRecordError, RecordError, RecordParser, Side, TrainingExample
from .video import frame_sampling

if TYPE_CHECKING:
    from transformers import (
        BatchFeature,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        ProcessorMixin,
    )

    from .modeling import CafeForConditionalGeneration

logger = logging.getLogger(__name__)

# What each length count means, for the first-time warning (``%d``: max_length).
_LENGTH_WARNINGS = {
    "lm_dropped_image_cut": "left the LM loss: their image tokens reach past max_length=%d, so they train "
    "contrastively only. Raise max_length (default: the model's context length).",
    "lm_dropped_answer_cut": "left the LM loss: their prompt fills max_length=%d, so no answer token is left to "
    "train on; they train contrastively only. Raise max_length or shorten the questions.",
    "lm_truncated": "were cut at max_length=%d (after any image tokens; the answer tokens past the limit are not "
    "trained on). Raise max_length to keep them whole.",
}
COUNT_NAMES = (
    "lm_truncated",
    "lm_dropped_image_cut",
    "lm_dropped_answer_cut",
    "embedding_text_truncated",
    "skipped_records",
)


class CafeCollator:
    """Builds CAFe training batches from raw records (see `cafe.records` for the layouts).

    Args:
        processor: The model's processor (tokenizer + image processor + chat template).
        settings: CAFe settings; defaults to the model's (`model.cafe_settings`) if you pass
            ``model=``, else the paper's defaults. Their ``embedding_chat_template`` renders the
            embedding sides and their ``lm_chat_template`` the LM sequences (the reference's
            format, not the checkpoint's generation template; see `build_lm_chat_template`).
            `settings` (the attribute) holds what this collator trains with: `CafeTrainer`
            writes it into the model's ``config.cafe`` if it differs (``multimodal_input``).
        model: Optional; read for its settings, image / video placeholders and context length.
        image_folder: Base folder of relative image and video paths.
        max_length: Longest LM sequence. Default: the language model's context length
            (``text_config.max_position_embeddings``), which keeps every image of a released
            checkpoint's anyres processor (up to ~7.3k tokens per photo for llava-hf
            LLaVA-OneVision). Longer sequences are cut at the end, never inside the image tokens:
            a sequence whose image tokens reach past ``max_length`` leaves the LM batch (its
            contrastive pair stays). Both are counted in ``CafeBatch.counts`` and logged as a
            warning the first time they happen.
        multimodal_input: Reference flag: query = user turn (image + question), positive = answer,
            and no "Compress ..." instruction on either side.
        compute_language_loss, compute_contrastive_loss: Which sequences to build.
        caption_prompt, video_caption_prompt: User turn of the LM sequence built for (image, text)
            and (video, text) pairs (see `cafe.records.RecordParser`); default for videos:
            "Describe the video.".
        missing_images: ``"raise"`` (default) or ``"skip"``: drop records whose image or video is
            missing or unreadable, counted in ``CafeBatch.counts`` and logged, never silently.
        assistant_header, end_of_turn: Token strings that delimit assistant turns in the
            generation template (ChatML defaults); labels cover the answer and its end token.

    Videos are sampled by the processor's rule under the settings' ``video_num_frames`` /
    ``video_fps`` (`cafe.video.frame_sampling`): the frames ``encode`` shows the model.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        settings: CafeSettings | None = None,
        model: CafeForConditionalGeneration | None = None,
        image_folder: str | None = None,
        max_length: int | None = None,
        multimodal_input: bool = False,
        compute_language_loss: bool = True,
        compute_contrastive_loss: bool = True,
        caption_prompt: str | None = "Describe the image.",
        video_caption_prompt: str | None = None,
        missing_images: str = "raise",
        assistant_header: str = "<|im_start|>assistant\n",
        end_of_turn: str = "<|im_end|>",
        seed: int = 0,
    ) -> None:
        if missing_images not in ("raise", "skip"):
            raise ValueError(f"missing_images must be 'raise' or 'skip', got {missing_images!r}.")
        if not (compute_language_loss or compute_contrastive_loss):
            raise ValueError("Both losses are off: enable compute_language_loss or compute_contrastive_loss.")
        self.processor = processor
        # The processor's tokenizer (transformers declares it Any); a bare tokenizer is its own.
        self.tokenizer: Any = getattr(processor, "tokenizer", processor)
        if model is not None and not hasattr(model, "cafe_settings"):
            raise TypeError(
                f"CafeCollator's model= takes a CafeForConditionalGeneration, got {type(model).__name__}: load it "
                "with CafeForConditionalGeneration.from_pretrained(path) (same weights)."
            )
        if settings is None:
            settings = model.cafe_settings if model is not None else CafeSettings()
        placeholders = _placeholders(model, processor)
        if multimodal_input:
            # The reference's MMEB mode: no "Compress ..." instruction on either side. The
            # prompts a model trains with are the prompts it must embed with afterwards.
            settings = dataclasses.replace(
                settings,
                image_prompt="",
                text_prompt="",
                multimodal_prompt="",
                video_prompt="",
                embedding_chat_template=None,
            )
        if settings.embedding_chat_template is None:
            settings = dataclasses.replace(
                settings, embedding_chat_template=build_embedding_chat_template(settings, *placeholders)
            )
        if settings.lm_chat_template is None:
            settings = dataclasses.replace(settings, lm_chat_template=build_lm_chat_template(settings, *placeholders))
        # Filled above: the templates this collator renders with.
        assert settings.embedding_chat_template is not None and settings.lm_chat_template is not None
        self.settings = settings
        self.embedding_chat_template: str = settings.embedding_chat_template
        self.lm_chat_template: str = settings.lm_chat_template
        self.assistant_header = assistant_header
        self.max_length = max_length if max_length is not None else _context_length(model, self.tokenizer)
        self._warned: set[str] = set()
        self.compute_language_loss = compute_language_loss
        self.compute_contrastive_loss = compute_contrastive_loss
        self.missing_images = missing_images
        self.parser = RecordParser(
            image_folder,
            multimodal_input,
            caption_prompt,
            seed,
            video_sampling=frame_sampling(processor, settings),
            video_caption_prompt=video_caption_prompt,
        )
        self.header_ids = self.tokenizer.encode(assistant_header, add_special_tokens=False)
        self.end_id = self.tokenizer.convert_tokens_to_ids(end_of_turn)
        if self.end_id is None or self.end_id == self.tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {end_of_turn!r} token; pass end_of_turn= for this template.")
        self.image_token_id = getattr(processor, "image_token_id", None)
        # Tokens the processor expands images and videos into (never supervised, never cut).
        self.visual_token_ids = [
            token for token in (self.image_token_id, getattr(processor, "video_token_id", None)) if token is not None
        ]

    # ------------------------------------------------------------------ entry point
    def __call__(self, records: list[dict[str, Any]]) -> CafeBatch:
        counts = dict.fromkeys(COUNT_NAMES, 0)
        examples: list[TrainingExample] = []
        for position, record in enumerate(records):
            try:
                examples.append(self.parser(record, position))
            except RecordError as err:
                if self.missing_images == "skip" and isinstance(err, ImageRecordError):
                    logger.warning("Skipping a record: %s", err)
                    counts["skipped_records"] += 1
                    continue
                raise
        if not examples:
            raise RecordError(
                "Every record of this batch was skipped (missing or corrupt images / videos); check the data."
            )

        visuals = _UniqueVisuals()
        batch = CafeBatch(counts=counts)
        if self.compute_contrastive_loss:
            queries = [_pair_side(example.query) for example in examples]
            docs = [_pair_side(example.positive) for example in examples]
            batch.query = self._embedding_side(queries, visuals, counts)
            batch.doc = self._embedding_side(docs, visuals, counts)
            negatives = [negative for example in examples for negative in example.negatives]
            if negatives:
                batch.negative = self._embedding_side(negatives, visuals, counts)
                batch.negative_groups = _group_ids(negatives)
            batch.query_groups = _group_ids(queries)
            batch.doc_groups = _group_ids(docs)
        if self.compute_language_loss:
            batch.lm, lm_examples = self._lm_sequences(examples, visuals, counts)
            if self.compute_contrastive_loss and batch.lm is not None:
                batch.query_lm_index = _query_lm_index(examples, lm_examples)
        batch.vision = self._vision_inputs(visuals)
        return batch

    def _vision_inputs(self, visuals: _UniqueVisuals) -> dict[str, torch.Tensor]:
        """The processor's tensors of the batch's distinct images and videos (each once)."""
        vision = {}
        if visuals.images:
            vision.update(self.processor.image_processor(visuals.images, return_tensors="pt"))
        if visuals.videos:
            # Through the processor rather than its video processor: Qwen2.5-VL's processor adds
            # the clips' `second_per_grid_ts` (temporal position spacing) there.
            vision.update(
                self.processor(
                    videos=[video.frames for video in visuals.videos],
                    video_metadata=[video.metadata for video in visuals.videos],
                    return_tensors="pt",
                )
            )
        return vision

    # ------------------------------------------------------------------ embedding sides
    def _embedding_side(self, sides: list[Side], visuals: _UniqueVisuals, counts: dict[str, int]) -> EmbeddingSequences:
        texts = self._cut_texts([s.text for s in sides], counts)
        items = [EmbeddingInput(s.image, text, s.video) for s, text in zip(sides, texts, strict=True)]
        prompts = render_embedding_prompts(self.processor, items, self.embedding_chat_template)
        encoded = self._process(prompts, sides, "embedding_chat_template")
        return EmbeddingSequences(encoded["input_ids"], encoded["attention_mask"], *visuals.indices(sides))

    def _process(self, prompts: list[str], sides: list[Side], template_name: str) -> BatchFeature:
        """Tokenize prompts showing the images and videos of ``sides`` (the pixels are processed
        again here only to expand the placeholders; the batch keeps `_vision_inputs`' copy)."""
        images = [s.image for s in sides if s.image is not None]
        videos = [s.video for s in sides if s.video is not None]
        return process_prompts(self.processor, prompts, images, videos, template_name)

    def _cut_texts(self, texts: list[str | None], counts: dict[str, int]) -> list[str | None]:
        """Count the texts the embedding template cuts (``CafeSettings.max_text_chars``; the cut
        itself is the template's, shared with ``encode`` and sentence-transformers)."""
        limit = self.settings.max_text_chars
        if limit is None:
            return texts
        cut = sum(1 for text in texts if text is not None and len(text) > limit)
        if cut:
            counts["embedding_text_truncated"] += cut
            if "text" not in self._warned:
                self._warned.add("text")
                logger.warning(
                    "%d embedding text(s) in this batch are longer than max_text_chars=%d and are cut to it (inside "
                    "the prompt, as encode() and sentence-transformers cut them). Raise CafeSettings.max_text_chars "
                    "to keep more; further cuts are counted in the logged metric data/embedding_text_truncated.",
                    cut,
                    limit,
                )
        return texts

    # ------------------------------------------------------------------ LM sequences
    def _lm_sequences(
        self, examples: list[TrainingExample], visuals: _UniqueVisuals, counts: dict[str, int]
    ) -> tuple[LanguageModelingSequences | None, list[TrainingExample]]:
        """The LM batch and the examples of its rows, in order."""
        with_lm = [example for example in examples if example.conversation is not None]
        if not with_lm:
            return None, []
        conversations = [example.conversation for example in with_lm if example.conversation is not None]  # all
        texts = [render_chat(self.processor, conversation, self.lm_chat_template) for conversation in conversations]
        lm_visuals = [side for example in with_lm for side in example.conversation_visuals]
        encoded = self._process(texts, lm_visuals, "lm_chat_template")
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        labels = self.assistant_labels(input_ids, attention_mask)
        unsupervised = (labels[:, 1:] == IGNORE_INDEX).all(dim=1)
        if bool(unsupervised.any()):
            # Every record with an LM sequence has a non-empty answer, so no label means the
            # assistant turns were not found: the loss would silently be 0.
            row = int(unsupervised.nonzero()[0])
            raise ValueError(
                f"No answer tokens found in {int(unsupervised.sum())} of {len(with_lm)} LM sequences: the assistant "
                f"header {self.assistant_header!r} does not occur in the rendered conversation, e.g. "
                f"{texts[row][-300:]!r}. The LM sequences are rendered with `lm_chat_template` (CafeSettings); pass "
                "CafeCollator(assistant_header=...) matching that template's assistant turn, or use the default template."
            )

        keep = torch.ones(len(with_lm), dtype=torch.bool)
        if input_ids.shape[1] > self.max_length:
            lengths = attention_mask.sum(1)
            counts["lm_truncated"] += int((lengths > self.max_length).sum())
            if self.visual_token_ids:
                positions = torch.arange(input_ids.shape[1])
                is_visual = torch.isin(input_ids, torch.tensor(self.visual_token_ids))
                last_image = torch.where(is_visual, positions, -1).max(dim=1).values
                keep = last_image < self.max_length
                counts["lm_dropped_image_cut"] += int((~keep).sum())
                counts["lm_truncated"] -= int((~keep).sum())
            input_ids = input_ids[:, : self.max_length]
            attention_mask = attention_mask[:, : self.max_length]
            labels = labels[:, : self.max_length]
            # A row cut before its first answer token has nothing left to learn: kept, it would add
            # a 0 to the LM loss's mean. It leaves the LM batch (its pair still trains contrastively).
            answer_cut = keep & (labels[:, 1:] == IGNORE_INDEX).all(dim=1)
            counts["lm_dropped_answer_cut"] += int(answer_cut.sum())
            counts["lm_truncated"] -= int(answer_cut.sum())
            keep &= ~answer_cut
        self._warn_once_about_lengths(counts, len(with_lm))
        if not keep.all():
            input_ids, attention_mask, labels = input_ids[keep], attention_mask[keep], labels[keep]
            with_lm = [e for e, k in zip(with_lm, keep.tolist(), strict=True) if k]
            lm_visuals = [side for example in with_lm for side in example.conversation_visuals]
            if not len(input_ids):
                return None, []
        return LanguageModelingSequences(input_ids, attention_mask, labels, *visuals.indices(lm_visuals)), with_lm

    def _warn_once_about_lengths(self, counts: dict[str, int], rows: int) -> None:
        """Say it the first time LM rows are cut or dropped at ``max_length`` (later: counts only)."""
        for count, what in _LENGTH_WARNINGS.items():
            if counts[count] and count not in self._warned:
                self._warned.add(count)
                logger.warning(
                    f"%d of %d LM sequences in this batch {what} Further ones are counted in the logged metric "
                    f"data/{count}.",
                    counts[count],
                    rows,
                    self.max_length,
                )

    def assistant_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Labels equal to the input ids on assistant answers (and their end token), -100 elsewhere.

        Vectorised over the batch: a position is supervised if the last assistant header before
        it ended after the last end-of-turn token before it.
        """
        batch, length = input_ids.shape
        positions = torch.arange(length).expand(batch, length)
        h = len(self.header_ids)
        header = torch.tensor(self.header_ids)
        is_header_end = torch.zeros_like(input_ids, dtype=torch.bool)
        if length >= h:
            windows = input_ids.unfold(1, h, 1)  # [batch, length - h + 1, h]
            is_header_end[:, h - 1 :] = (windows == header).all(-1)
        # First answer position after each header, and first position after each end token.
        starts = torch.zeros_like(is_header_end)
        starts[:, 1:] = is_header_end[:, :-1]
        after_end = torch.zeros_like(is_header_end)
        after_end[:, 1:] = input_ids[:, :-1] == self.end_id
        last_start = torch.where(starts, positions, -1).cummax(dim=1).values
        last_after_end = torch.where(after_end, positions, -1).cummax(dim=1).values
        supervised = (last_start >= 0) & (last_start > last_after_end) & attention_mask.bool()
        if self.visual_token_ids:
            supervised &= ~torch.isin(input_ids, torch.tensor(self.visual_token_ids))
        return torch.where(supervised, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


class MiniBatchCollator:
    """Wraps a `CafeCollator` for a cached (GradCache) loss: splits each batch of records into
    chunks of ``mini_batch_size`` records, each collated on its own (`MiniBatches`).

    `CafeTrainer` wraps its collator in this when its loss has a ``mini_batch_size``.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], CafeBatch], mini_batch_size: int) -> None:
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}.")
        self.collator = collator
        self.mini_batch_size = mini_batch_size

    def __call__(self, records: list[dict[str, Any]]) -> MiniBatches:
        size = self.mini_batch_size
        return MiniBatches(self.collator(records[i : i + size]) for i in range(0, len(records), size))


class _UniqueVisuals:
    """Collects the distinct images and videos of a batch (by content key) so each is encoded once."""

    def __init__(self) -> None:
        self.images: list = []
        self.videos: list = []
        self._index: dict[str, int] = {}

    def indices(self, sides: list[Side]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_index, video_index)`` of the images and of the videos of ``sides``, in order."""
        images: list[int] = []
        videos: list[int] = []
        for side in sides:
            if not side.has_visual:
                continue
            store, result = (self.videos, videos) if side.video is not None else (self.images, images)
            key = side.visual_key
            if key is None:
                raise ValueError(
                    "A visual side without a content key: build examples with RecordParser(hash_images=True)."
                )
            if key not in self._index:
                self._index[key] = len(store)
                store.append(side.video if side.video is not None else side.image)
            result.append(self._index[key])
        return torch.tensor(images, dtype=torch.long), torch.tensor(videos, dtype=torch.long)


def _placeholders(model: CafeForConditionalGeneration | None, processor: ProcessorMixin) -> tuple[str, str]:
    """How one image and one video appear in a prompt before the processor expands them (the family's)."""
    if model is not None and hasattr(model, "cafe_image_placeholder"):
        return model.cafe_image_placeholder, model.cafe_video_placeholder
    if getattr(processor, "image_token", None) == "<|image_pad|>":  # Qwen2-VL / Qwen2.5-VL processors
        image = "<|vision_start|><|image_pad|><|vision_end|>"
    else:
        image = "<image>\n"
    return image, default_video_placeholder(image)


def _context_length(model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase) -> int:
    """The default LM length: the language model's context length, else the tokenizer's limit."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", config)
    length = getattr(text_config, "max_position_embeddings", None)
    if length is None:
        length = getattr(tokenizer, "model_max_length", None)
        if length is None or length > 10**7:  # transformers' "no limit" sentinel is ~1e30
            raise ValueError(
                "Cannot tell the LM sequence length: pass CafeCollator(model=...) or max_length=... (the language "
                "model's context length keeps every image of an anyres processor)."
            )
    return int(length)


def _pair_side(side: Side | None) -> Side:
    if side is None:  # RecordParser fills both sides of every pair it returns
        raise RecordError("A training example without both sides of its pair; build examples with RecordParser.")
    return side


def _query_lm_index(examples: list[TrainingExample], lm_examples: list[TrainingExample]) -> torch.Tensor:
    """For each query row, the LM row of the same record when both open with the same image or
    video, else -1.

    Such a pair shares its causal prefix (system turn, user header, image or video tokens), which
    the model computes once (`cafe.shared_prefix`).
    """
    lm_row = {id(example): row for row, example in enumerate(lm_examples)}
    index = []
    for example in examples:
        row = lm_row.get(id(example), -1)
        first = example.conversation_visuals[0] if example.conversation_visuals else None
        query = example.query
        same = query is not None and query.has_visual and first is not None and first.visual_key == query.visual_key
        index.append(row if same else -1)
    return torch.tensor(index, dtype=torch.long)


def _group_ids(sides: list[Side]) -> torch.Tensor:
    """Equal ids for sides with identical content (same image or video and same text).

    A 64-bit content hash rather than a per-batch counter, so that ids stay comparable after
    they are gathered from several processes.
    """
    ids = []
    for side in sides:
        digest = hashlib.blake2b(repr((side.visual_key, side.text)).encode(), digest_size=8).digest()
        ids.append(int.from_bytes(digest, "little", signed=True))
    return torch.tensor(ids, dtype=torch.long)
