"""`CafeForConditionalGeneration`: one set of weights for embeddings and generation.

Design: a concrete CAFe model is the backbone's own transformers class combined with this base,
e.g. ``class CafeLlavaOnevisionForConditionalGeneration(CafeForConditionalGeneration,
LlavaOnevisionForConditionalGeneration)``. The backbone class provides the weights layout, the
forward pass and ``generate()``; this base adds the CAFe behaviour (embedding prompt, pooling,
normalisation, contrastive settings) and knows nothing of any particular family. Each family
supplies two small hooks: how to run the vision encoder once (so features can be reused) and
which position ids an embedding pass needs. ``CafeForConditionalGeneration.from_pretrained``
picks the family from the checkpoint's ``model_type`` (see `cafe.backbones`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import logging

from .batch import CafeBatch
from .configuration import ADAPTER_ROTATION_NAME, ADAPTER_SETTINGS_NAME, CafeSettings
from .export import read_embedding_rotation
from .hub import is_hub_repo_id, resolve_checkpoint_file
from .inference import (
    EmbeddingPrefixCache,
    approximate_token_lengths,
    embedding_prompt_prefix_ids,
    length_sorted_order,
)
from .losses import lm_loss_at_supervised_positions
from .prompting import (
    build_embedding_batch,
    build_embedding_chat_template,
    build_lm_chat_template,
    embedding_items,
    load_embedding_inputs,
    media_kind,
)
from .rotation import check_rotation, principal_rotation
from .shared_prefix import SUPPORTED_ATTENTION, PackedBatch, pack_shared_prefix
from .video import frame_sampling

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from transformers import PreTrainedConfig, PreTrainedTokenizerBase, ProcessorMixin

    from .batch import EmbeddingSequences, LanguageModelingSequences

logger = logging.get_logger(__name__)

# Keyword arguments of `from_pretrained` that also apply to loading the config and the processor.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
# Where the model keeps `embedding_rotation` (a plain attribute: see `set_embedding_rotation`).
_ROTATION_ATTRIBUTE = "_cafe_embedding_rotation"


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last non-padding token of each row, for left *and* right padding.

    Args:
        hidden_states: ``[batch, seq, hidden]``.
        attention_mask: ``[batch, seq]`` with 1 on real tokens.

    Returns:
        ``[batch, hidden]``.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    # The largest position holding a real token; works whichever side the padding is on.
    last = (attention_mask.to(torch.long) * positions).argmax(dim=1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


@dataclass
class CafeForwardOutput:
    """What one CAFe training forward produces; `cafe.losses.CafeLoss` combines it into Eq. 3.

    Embeddings are ``[n, hidden]`` float32 and L2-normalised; ``lm_loss`` is a float32 scalar.
    """

    query_embeds: torch.Tensor | None = None
    doc_embeds: torch.Tensor | None = None
    negative_embeds: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None


class CafeForConditionalGeneration(PreTrainedModel):
    """A vision-language model that both generates (its backbone's ``generate``) and embeds.

    Use ``CafeForConditionalGeneration.from_pretrained(path_or_hub_id)`` on a stock checkpoint of a
    supported family or on a CAFe checkpoint; it returns the family's CAFe class. Checkpoints are
    saved in the backbone's own layout and load in stock transformers.

    Family classes set:
        cafe_image_placeholder: text that stands for one image in a prompt (before expansion).
        cafe_video_placeholder: the same for one video.
    and may override `get_vision_features` and `embedding_position_ids`.
    """

    cafe_image_placeholder: str = "<image>\n"
    cafe_video_placeholder: str = "<video>\n"
    # Module names (as in `named_parameters`) of the vision encoder and of the projector, for
    # per-component learning rates.
    cafe_vision_modules: tuple[str, ...] = ("vision_tower",)
    cafe_projector_modules: tuple[str, ...] = ("multi_modal_projector",)
    # Parameters the backbone has but never uses in a forward pass (e.g. a vision pooling head
    # when the features are read from hidden states). They get no gradient; DDP without
    # find_unused_parameters would then wait for them forever and skip the gradient all-reduce.
    cafe_unused_modules: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        backbone_forward = next(
            (
                b.__dict__["forward"]
                for b in cls.__mro__
                if b.__module__.startswith("transformers.") and "forward" in b.__dict__
            ),
            None,
        )
        if backbone_forward is None or "forward" in cls.__dict__:
            return

        # `generate()` and Trainer inspect `forward`'s signature; `functools.wraps` keeps the
        # backbone's. The extra `cafe_batch` keyword routes a CAFe training step through
        # `forward`, so DDP / FSDP / DeepSpeed wrappers see one ordinary forward call.
        @functools.wraps(backbone_forward)
        def forward(
            self: CafeForConditionalGeneration,
            *args: Any,
            cafe_batch: CafeBatch | None = None,
            cafe_share_prefix: bool = True,
            **kwargs: Any,
        ) -> Any:
            if cafe_batch is not None:
                return self.cafe_forward(cafe_batch, share_prefix=cafe_share_prefix)
            return backbone_forward(self, *args, **kwargs)

        cls.forward = forward

    def __init__(self, config: PreTrainedConfig, *inputs: Any, **kwargs: Any) -> None:
        super().__init__(config, *inputs, **kwargs)
        # Fill in the CAFe settings (defaults follow the paper and the reference) and write the
        # rendered embedding template into the config so the checkpoint is self-describing.
        settings = CafeSettings.from_dict(getattr(config, "cafe", None))
        placeholders = (self.cafe_image_placeholder, self.cafe_video_placeholder)
        if settings.embedding_chat_template is None:
            settings.embedding_chat_template = build_embedding_chat_template(settings, *placeholders)
        if settings.lm_chat_template is None:
            settings.lm_chat_template = build_lm_chat_template(settings, *placeholders)
        config.cafe = settings.to_dict()
        self.processor: ProcessorMixin | None = None

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def _resolve_family_class(cls, config: PreTrainedConfig) -> type[CafeForConditionalGeneration]:
        from .backbones import get_cafe_class

        return get_cafe_class(config.model_type)

    @classmethod
    def from_pretrained(  # type: ignore[override]  # adds CAFe keywords; the rest go to transformers
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        cafe_settings: CafeSettings | dict | None = None,
        load_processor: bool = True,
        merge_adapter: bool = True,
        **kwargs: Any,
    ) -> CafeForConditionalGeneration:
        """Load a stock or CAFe checkpoint of a supported family as its CAFe class.

        Args:
            pretrained_model_name_or_path: Hub id or local folder: a checkpoint, or a PEFT adapter
                saved from a LoRA fine-tune (loaded on top of its base model, see `_from_adapter`).
            cafe_settings: Override the CAFe settings stored in the checkpoint (or the defaults): a
                `CafeSettings` replaces them all, a dict only the settings it names
                (``{"max_text_chars": 4096}`` keeps the checkpoint's prompts and the rest).
            load_processor: Also load the checkpoint's processor into ``model.processor`` (used by
                `encode` and saved by `save_pretrained`). Skipped silently if the folder has none.
            merge_adapter: For an adapter folder: merge it into the base weights (default; PEFT's
                ``merge_and_unload``), or return the `peft.PeftModel` holding it (``False``).
                Ignored for a checkpoint.
            **kwargs: Passed to transformers' ``from_pretrained`` (``dtype``, ``device_map``, ...).
        """
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config = kwargs.pop("config", None)
        adapter_config = None
        if config is None:
            _check_model_source(pretrained_model_name_or_path)
            # A PEFT adapter (adapter_config.json, no config.json): found locally or in the Hub
            # cache first; a Hub repo is asked for one only once its config.json turned out missing,
            # so that loading a model costs no extra request.
            if resolve_checkpoint_file(pretrained_model_name_or_path, "config.json") is None:
                adapter_config = resolve_checkpoint_file(pretrained_model_name_or_path, "adapter_config.json")
            if adapter_config is None:
                try:
                    config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
                except OSError:
                    adapter_config = _hub_adapter_config(pretrained_model_name_or_path, hub_kwargs)
                    if adapter_config is None:
                        raise
        if adapter_config is not None:
            return cls._from_adapter(
                pretrained_model_name_or_path,
                adapter_config,
                *model_args,
                cafe_settings=cafe_settings,
                load_processor=load_processor,
                merge_adapter=merge_adapter,
                **kwargs,
            )
        if cafe_settings is not None:
            settings = (
                cafe_settings
                if isinstance(cafe_settings, CafeSettings)
                else CafeSettings.from_dict({**(getattr(config, "cafe", None) or {}), **cafe_settings})
            )
            config.cafe = settings.to_dict()
        target = cls._resolve_family_class(config) if cls is CafeForConditionalGeneration else cls
        model = super(CafeForConditionalGeneration, target).from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, **kwargs
        )
        # `output_loading_info=True` makes transformers return (model, info).
        loaded = model[0] if isinstance(model, tuple) else model
        rotation = read_embedding_rotation(pretrained_model_name_or_path, **hub_kwargs)
        if rotation is not None:
            loaded.set_embedding_rotation(rotation)
        if load_processor:
            loaded.processor = _try_load_processor(pretrained_model_name_or_path, hub_kwargs)
        return model

    @classmethod
    def _from_adapter(
        cls,
        adapter: str | os.PathLike,
        adapter_config: Path,
        *model_args: Any,
        cafe_settings: CafeSettings | dict | None,
        load_processor: bool,
        merge_adapter: bool,
        **kwargs: Any,
    ) -> Any:  # the CAFe model, or the PeftModel wrapping it (merge_adapter=False)
        """A PEFT adapter folder (a LoRA fine-tune saved without merging): its base model, with the
        CAFe settings the adapter was trained with (`ADAPTER_SETTINGS_NAME`, written by `CafeTrainer`;
        `cafe_settings` overrides them) and the adapter merged into the weights (PEFT's
        ``merge_and_unload``: a plain CAFe model, whose `save_pretrained` writes a full checkpoint).
        With ``merge_adapter=False``, the `peft.PeftModel` wrapping it instead (to train the adapter
        further or switch it off; `encode` and `generate` reach the model through it).

        PEFT directly rather than transformers' ``load_adapter``: that integration needs a newer
        PEFT than the one on PyPI for saving, and a model with an injected adapter saves the
        adapter only, which would drop the settings file.
        """
        base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"{str(adapter)!r} holds a PEFT adapter whose adapter_config.json names no base model "
                "(base_model_name_or_path): load the base model with CafeForConditionalGeneration.from_pretrained, "
                f"then peft.PeftModel.from_pretrained(model, {str(adapter)!r})."
            )
        from transformers.utils import cached_file

        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        settings_file = cached_file(
            str(adapter), ADAPTER_SETTINGS_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        trained = json.loads(Path(settings_file).read_text(encoding="utf-8")) if settings_file else {}
        if not trained and cafe_settings is None:
            logger.warning(
                "%s has no %s (an adapter saved by PEFT itself, not by CafeTrainer): it is loaded with the base "
                "model's CAFe settings, which may not be the prompts and temperature it was trained with. Pass "
                "cafe_settings={...} to say which.",
                adapter,
                ADAPTER_SETTINGS_NAME,
            )
        settings: CafeSettings | dict | None = cafe_settings
        if not isinstance(cafe_settings, CafeSettings) and trained:
            settings = {**trained, **(cafe_settings or {})}
        try:
            model = cls.from_pretrained(base, *model_args, cafe_settings=settings, load_processor=False, **kwargs)
        except OSError as err:
            raise OSError(
                f"{str(adapter)!r} is a PEFT adapter on top of the base model {base!r} (adapter_config.json "
                f"base_model_name_or_path), which could not be loaded: {err}"
            ) from err
        if isinstance(model, tuple):
            raise ValueError("output_loading_info=True is not supported for a PEFT adapter folder; load it without.")
        from peft import PeftModel

        rotation_file = cached_file(
            str(adapter), ADAPTER_ROTATION_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        if rotation_file:
            from safetensors.torch import load_file

            # The rotation the adapter was trained or fitted with replaces the base model's.
            model.set_embedding_rotation(load_file(rotation_file)["rotation"])
        if load_processor:
            # A trainer that was given the processor saved it with the adapter; else the base's.
            model.processor = _try_load_processor(adapter, hub_kwargs) or _try_load_processor(base, hub_kwargs)
        adapted = PeftModel.from_pretrained(model, str(adapter), **hub_kwargs)
        return adapted.merge_and_unload() if merge_adapter else adapted

    @classmethod
    def from_config(cls, config: PreTrainedConfig, **kwargs: Any) -> CafeForConditionalGeneration:
        """Build a randomly initialised CAFe model of the family named by ``config.model_type``."""
        target = cls._resolve_family_class(config) if cls is CafeForConditionalGeneration else cls
        return target._from_config(config, **kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: Any, save_processor: bool = True, **kwargs: Any
    ) -> None:
        """Save a vanilla backbone checkpoint (stock layout and ``architectures``) plus the processor.

        The folder loads in the stock transformers class without custom code; the CAFe settings
        ride along in ``config.json["cafe"]``. The same folder is a sentence-transformers model made
        of stock modules (``SentenceTransformer(save_directory)``, see `cafe.export`) and carries a
        model card (``README.md``, see `cafe.hub`; fill ``model.model_card_data`` with a
        `cafe.hub.CafeModelCardData` to set its base model, datasets and training settings).

        The save is all or nothing: every file is written into a hidden sibling folder
        (``.{name}.saving-*``) that replaces ``save_directory`` only once complete, so an error or
        an interruption at any point leaves the previous save as it was. Files of an earlier model
        save that this one does not write (other weight shards, an index, PEFT adapter files,
        sentence-transformers modules) are gone afterwards; anything else in the folder (Trainer
        state, checkpoints, logs) is kept.

        Keyword arguments besides transformers' own:
            sentence_transformers_prompts: Named prompts for sentence-transformers (``"query"`` for
                ``encode_query``, ``"document"`` for ``encode_document``, any name for
                ``prompt_name=``), applied as the CAFe task instruction. Default: the prompts of the
                checkpoint the model was loaded from, else empty ones.
            push_to_hub, repo_id, commit_message, private, create_pr: As in transformers; the upload
                goes through `cafe.hub.push_folder_to_hub` once every file above is written.
        """
        from .export import read_sentence_transformers_prompts, write_sentence_transformers_files
        from .hub import push_folder_to_hub, write_model_card

        prompts = kwargs.pop("sentence_transformers_prompts", None)
        default_prompt_name = None
        # transformers would upload from inside its save_pretrained, before the files below exist,
        # and with a generic card in place of ours: take the upload over and do it last.
        push = kwargs.pop("push_to_hub", False)
        hub_kwargs = {
            key: kwargs.pop(key) for key in ("repo_id", "commit_message", "private", "create_pr") if key in kwargs
        }
        if self.processor is not None:
            _check_processor_matches(self, self.processor)
        is_main_process = kwargs.get("is_main_process", True)
        writes_here = getattr(self, "should_save_on_this_rank", lambda main: main)(is_main_process)
        if not writes_here or kwargs.get("distributed_checkpoint", False):
            # Other ranks only join transformers' collectives; rank-local distributed checkpoints
            # are written by every rank into the folder itself, so there is no single writer to
            # stage them.
            return super().save_pretrained(save_directory, *args, **kwargs)

        if prompts is None:
            # Read before the folder is replaced: the source may be this very folder.
            prompts, default_prompt_name = read_sentence_transformers_prompts(self.name_or_path) or (None, None)
        with _staged_folder(save_directory) as staging:
            result = super().save_pretrained(staging, *args, **kwargs)
            # transformers writes our class name into `architectures`; tools that dispatch on it
            # (vLLM, lmms-eval) must see the backbone's class instead.
            config_path = staging / "config.json"
            config = json.loads(config_path.read_text())
            config["architectures"] = [self.backbone_class().__name__]
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if save_processor and self.processor is not None:
                self.processor.save_pretrained(staging)
            write_sentence_transformers_files(
                staging,
                self.config,
                prompts=prompts,
                default_prompt_name=default_prompt_name,
                rotation=self.embedding_rotation,
            )
            write_model_card(
                staging,
                card_data=getattr(self, "model_card_data", None),
                source=self.name_or_path,
                tags=self.model_tags,
                model_id=str(save_directory),
            )
        if push:
            repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
            push_folder_to_hub(
                save_directory,
                repo_id,
                token=kwargs.get("token"),
                card_data=getattr(self, "model_card_data", None),
                **hub_kwargs,
            )
        return result

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> CommitInfo:  # type: ignore[override]  # cafe's upload, same keywords
        """Upload what `save_pretrained` writes (checkpoint, processor, sentence-transformers files,
        model card) through huggingface_hub's ``create_repo`` / ``upload_folder``.

        Overrides transformers' version, which replaces the card with a generic one. Keyword
        arguments as in transformers: ``commit_message``, ``commit_description``, ``private``,
        ``token``, ``revision``, ``create_pr``, ``max_shard_size``, ``tags``.
        """
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def backbone_class(cls) -> type[PreTrainedModel]:
        """The stock transformers class this CAFe class is combined with."""
        for base in cls.__mro__[1:]:
            if base.__module__.startswith("transformers.") and issubclass(base, PreTrainedModel):
                if base.__name__.endswith("ForConditionalGeneration"):
                    return base
        raise TypeError(f"{cls.__name__} is not combined with a transformers *ForConditionalGeneration class.")

    # ------------------------------------------------------------------ CAFe settings
    @property
    def cafe_settings(self) -> CafeSettings:
        return CafeSettings.from_dict(self.config.cafe)

    @property
    def embedding_chat_template(self) -> str:
        template = self.cafe_settings.embedding_chat_template
        if template is None:  # `__init__` fills it in; only a hand-edited config.cafe lacks it
            raise ValueError("config.cafe has no embedding_chat_template; reload the model with from_pretrained.")
        return template

    def freeze_unused_parameters(self) -> list[str]:
        """Set ``requires_grad=False`` on `cafe_unused_modules`' parameters; returns their names."""
        frozen = []
        for name, param in self.named_parameters():
            if any(f".{module}." in f".{name}" for module in self.cafe_unused_modules) and param.requires_grad:
                param.requires_grad_(False)
                frozen.append(name)
        return frozen

    # ------------------------------------------------------------------ family hooks
    @classmethod
    def parameter_component(cls, name: str) -> str:
        """``"vision"``, ``"projector"`` or ``"llm"`` for a parameter name (PEFT prefixes allowed)."""
        parts = name.split(".")
        # Projector first: it may live inside the vision module (Qwen2-VL's `visual.merger`).
        if any(module in parts for module in cls.cafe_projector_modules):
            return "projector"
        if any(module in parts for module in cls.cafe_vision_modules):
            return "vision"
        return "llm"

    def get_vision_features(self, *args: Any, **vision_inputs: Any) -> dict[str, Any]:
        """Run the vision tower + projector once; returns ``mm_encoder_outputs`` for `forward`.

        Args:
            **vision_inputs: The processor's tensors of some images (``pixel_values``, ...) and / or
                videos (``pixel_values_videos``, ...), e.g. ``CafeBatch.vision``.

        Returns:
            ``{"image": ..., "video": ...}`` (the modalities given): the backbone's encoder
            outputs, whose ``pooler_output`` holds one feature chunk per image / video.

        The result can be passed to several forward passes over sequences that hold the same
        images and videos in the same order (the embedding and LM sequences of a training step).
        """
        raise NotImplementedError

    def embedding_position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision_inputs: Any
    ) -> torch.Tensor:
        """Position ids for an embedding (or training LM) pass.

        ``vision_inputs`` are the vision keyword arguments the pass gives the backbone (the
        processor's tensors, or ``mm_encoder_outputs``), for position schemes that depend on the
        images (Qwen2-VL's M-RoPE). Default (1-D RoPE): count real tokens, so a left-padded row gets
        the same positions as the same row unpadded.
        """
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def inputs_after_cached_images(self, inputs: dict[str, Any], cached_images: int) -> dict[str, Any]:
        """``generate`` inputs of a one-prompt processor batch whose first `cached_images` images are
        already in a reused KV cache (`cafe.inference.generate_reusing_prefix`).

        The cached images are not encoded again, so their entries leave the per-image tensors.
        Default (LLaVA-OneVision): ``pixel_values``, ``image_sizes`` and ``batch_num_images`` hold one
        entry per image when the images are passed as a flat list, which is how a one-prompt batch
        comes. Families whose positions depend on the images also fix the prompt's positions here.
        """
        total = self._count_images(inputs["input_ids"][0])
        inputs = dict(inputs)
        for key in ("pixel_values", "image_sizes", "batch_num_images"):
            if inputs.get(key) is not None:
                if inputs[key].shape[0] != total:
                    raise ValueError(
                        f"{key} has {inputs[key].shape[0]} entries for the prompt's {total} images: pass the "
                        "images as one flat list (processor(images=[...], text=prompt))."
                    )
                inputs[key] = inputs[key][cached_images:] if cached_images < total else None
        return {k: v for k, v in inputs.items() if v is not None}

    def _count_images(self, input_ids: torch.Tensor) -> int:
        """Images in a ``[seq]`` prompt: runs of image tokens (one run per image once expanded)."""
        image = input_ids == self.config.image_token_id
        starts = image.clone()
        starts[1:] &= ~image[:-1]
        return int(starts.sum())

    def select_vision_features(
        self, features: dict[str, Any], index: torch.Tensor, modality: str = "image"
    ) -> dict[str, Any]:
        """The ``mm_encoder_outputs`` entry of the images (``modality="image"``) or videos
        (``"video"``) ``index`` (``[n]`` positions in `get_vision_features`'s input, in order)."""
        raise NotImplementedError

    def _select_visuals(
        self, features: dict[str, Any] | None, image_index: torch.Tensor | None, video_index: torch.Tensor | None
    ) -> dict[str, Any] | None:
        """``mm_encoder_outputs`` for sequences showing these images and videos (None: none)."""
        selected: dict[str, Any] = {}
        for modality, index in (("image", image_index), ("video", video_index)):
            if index is not None and index.numel():
                if features is None:
                    raise ValueError(f"The batch's sequences show {modality}s but batch.vision has no pixel values.")
                selected.update(self.select_vision_features(features, index, modality))
        return selected or None

    # ------------------------------------------------------------------ training forward
    def cafe_forward(self, batch: CafeBatch, share_prefix: bool = True) -> CafeForwardOutput:
        """One CAFe step's forward on a `CafeBatch`: embeddings of every side and the LM loss.

        The vision tower runs once over the batch's distinct images and videos; every side that
        shows one reuses those features (the reference runs it once per sequence, three times per
        step). Text-only sides carry no placeholders. The LM loss computes logits only at
        supervised positions.

        With ``share_prefix`` (default), a record's image- or video-embedding sequence rides in its
        LM sequence's LLM pass: their common prefix (system turn, header, visual tokens) is
        computed once (`cafe.shared_prefix`). Same results, about half the LLM work on visual
        tokens, which for a video are most of the sequence.
        """
        has_pixels = any(batch.vision.get(key) is not None for key in ("pixel_values", "pixel_values_videos"))
        features = self.get_vision_features(**batch.vision) if has_pixels else None

        def vision_for(
            sequences: EmbeddingSequences | LanguageModelingSequences, rows: torch.Tensor | None = None
        ) -> dict[str, Any] | None:
            """``mm_encoder_outputs`` of (some ``rows`` of) a sequence batch."""
            if rows is None:
                return self._select_visuals(features, sequences.image_index, sequences.video_index)
            return self._select_visuals(features, *self._row_visuals(sequences, rows))

        output = CafeForwardOutput()
        lm, packed, served = batch.lm, None, None
        if lm is not None:
            lm_vision = {"mm_encoder_outputs": vision_for(lm)}
            lm_positions = self.embedding_position_ids(lm.input_ids, lm.attention_mask, **lm_vision)
            packed = self._pack_shared_prefix(batch, lm_positions, vision_for) if share_prefix else None
        if packed is not None:
            hidden = self.model(
                input_ids=packed.input_ids,
                attention_mask=packed.attention_mask,
                position_ids=packed.position_ids,
                use_cache=False,
                **lm_vision,
            ).last_hidden_state
            output.lm_loss = lm_loss_at_supervised_positions(hidden, packed.labels, self.lm_head)
            served = (packed.query_rows, self._finish_embedding(hidden[packed.pooled]))

        for name, side in batch.embedding_sides.items():
            if name == "query" and served is not None:
                # The packed pass served some query rows; embed the rest on their own, then
                # put the rows back in batch order.
                rows, embeds = served
                rest = _complement(rows, len(side))
                if rest.numel():
                    rest_embeds = self.get_embeddings(
                        side.input_ids[rest], side.attention_mask[rest], mm_encoder_outputs=vision_for(side, rest)
                    )
                    rows, embeds = torch.cat([rows, rest]), torch.cat([embeds, rest_embeds])
                embeds = embeds[rows.argsort()]
            else:
                embeds = self.get_embeddings(side.input_ids, side.attention_mask, mm_encoder_outputs=vision_for(side))
            setattr(output, f"{name}_embeds", embeds)

        if lm is not None and packed is None:
            hidden = self.model(
                input_ids=lm.input_ids,
                attention_mask=lm.attention_mask,
                position_ids=lm_positions,
                use_cache=False,
                **lm_vision,
            ).last_hidden_state
            output.lm_loss = lm_loss_at_supervised_positions(hidden, lm.labels, self.lm_head)
        return output

    @property
    def _visual_token_ids(self) -> dict[str, int | None]:
        return {"image": self.config.image_token_id, "video": getattr(self.config, "video_token_id", None)}

    def _visual_per_row(
        self, input_ids: torch.Tensor, index: torch.Tensor | None, modality: str = "image"
    ) -> torch.Tensor | None:
        """The image (or video) each row shows, as an ``index`` entry, -1 for none; ``None`` if some
        row shows several or the counts disagree (the tokens of one image / video are one run)."""
        token_id = self._visual_token_ids[modality]
        is_visual = input_ids == token_id if token_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        starts = is_visual.clone()
        starts[:, 1:] &= ~is_visual[:, :-1]
        per_row_count = starts.sum(dim=1)
        n = 0 if index is None else index.numel()
        if bool((per_row_count > 1).any()) or int(per_row_count.sum()) != n:
            return None
        per_row = torch.full_like(per_row_count, -1)
        if index is not None and n:
            per_row[per_row_count == 1] = index.to(per_row.device)
        return per_row

    def _row_visuals(
        self, sequences: EmbeddingSequences | LanguageModelingSequences, rows: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(image_index, video_index)`` entries of ``rows`` of an embedding side (one image or
        video per row at most)."""
        result: list[torch.Tensor | None] = []
        for modality in ("image", "video"):
            index = getattr(sequences, f"{modality}_index", None)
            if index is None or index.numel() == 0:
                result.append(None)
                continue
            per_row = self._visual_per_row(sequences.input_ids, index, modality)
            if per_row is None:
                raise ValueError(
                    f"This embedding side's {modality} tokens do not match its {index.numel()} {modality}s, one per "
                    "row at most: build training batches with CafeCollator."
                )
            per_row = per_row[rows]
            result.append(per_row[per_row >= 0])
        return result[0], result[1]

    def _pack_shared_prefix(
        self,
        batch: CafeBatch,
        lm_positions: torch.Tensor,
        vision_for: Callable[[EmbeddingSequences, torch.Tensor], dict[str, Any] | None],
    ) -> PackedBatch | None:
        """Pack the query rows that share their prefix with an LM row (``query_lm_index``), if any.

        A pair is packed only if both rows show the same image or video: equal tokens do not
        imply that (two images of one size expand to the same placeholder tokens).
        """
        pair_index, query, lm = batch.query_lm_index, batch.query, batch.lm
        attention = self.model.language_model.config._attn_implementation
        if pair_index is None or query is None or lm is None:
            return None
        if attention not in SUPPORTED_ATTENTION:
            if getattr(self, "_said_sharing_is_off", False):
                return None
            self._said_sharing_is_off = True  # once per model: it would repeat every step
            logger.warning(
                f"Prefix sharing is off: the {attention!r} attention kernel cannot take its 4-D mask (supported: "
                f"{SUPPORTED_ATTENTION}). Embedding and LM sequences run in separate passes (same results, "
                "more compute); load the model with attn_implementation='sdpa' to share them."
            )
            return None
        paired = pair_index >= 0
        shows_visual = torch.zeros_like(paired)
        for modality in ("image", "video"):
            query_per_row = self._visual_per_row(query.input_ids, getattr(query, f"{modality}_index"), modality)
            lm_per_row = self._visual_per_row(lm.input_ids, getattr(lm, f"{modality}_index"), modality)
            if query_per_row is None or lm_per_row is None:
                return None
            query_per_row, lm_per_row = query_per_row.to(paired.device), lm_per_row.to(paired.device)
            same = torch.zeros_like(paired)
            same[paired] = query_per_row[paired] == lm_per_row[pair_index[paired]]
            paired &= same
            shows_visual |= query_per_row >= 0
        paired &= shows_visual
        query_rows = paired.nonzero().flatten()
        if query_rows.numel() == 0:
            return None
        q_ids, q_mask = query.input_ids[query_rows], query.attention_mask[query_rows]
        q_vision = {"mm_encoder_outputs": vision_for(query, query_rows)}
        packed = pack_shared_prefix(
            lm.input_ids,
            lm.attention_mask,
            lm.labels,
            lm_positions,
            q_ids,
            q_mask,
            self.embedding_position_ids(q_ids, q_mask, **q_vision),
            pairs=list(zip(range(len(query_rows)), pair_index[query_rows].tolist(), strict=True)),
            visual_token_ids=[token for token in self._visual_token_ids.values() if token is not None],
            attention_implementation=attention,
            dtype=self.dtype,
        )
        if packed is not None:
            packed.query_rows = query_rows[packed.query_rows]
        return packed

    def _finish_embedding(self, pooled: torch.Tensor, normalize: bool | None = None) -> torch.Tensor:
        """float32, rotated by `embedding_rotation` if set, L2-normalised unless the settings (or
        ``normalize``) say otherwise."""
        pooled = pooled.float()
        rotation = self._rotation_on(pooled.device)
        if rotation is not None:
            # In float32 even under autocast: the result is documented float32, and a bf16 matmul
            # would round every embedding for a rotation that is meant to change nothing.
            with torch.autocast(pooled.device.type, enabled=False):
                pooled = pooled @ rotation.T
        if self.cafe_settings.normalize if normalize is None else normalize:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled

    # ------------------------------------------------------------------ embedding rotation
    @property
    def embedding_rotation(self) -> torch.Tensor | None:
        """``[hidden, hidden]`` float32 orthogonal matrix applied to every embedding before
        normalisation, or None (the default). Set by `fit_embedding_rotation`; see `cafe.rotation`."""
        return self.__dict__.get(_ROTATION_ATTRIBUTE)

    def set_embedding_rotation(self, rotation: torch.Tensor | None) -> None:
        """Apply ``rotation`` (``[hidden, hidden]``, orthogonal) to every embedding from now on, or
        none (``None``). `save_pretrained` stores it as the sentence-transformers ``Dense`` module."""
        if rotation is not None:
            rotation = check_rotation(rotation, self.config.get_text_config().hidden_size)
        # A plain float32 CPU tensor, not a buffer: a buffer would be cast by `.to(bfloat16)`
        # (and DeepSpeed / FSDP mixed precision), rounding the matrix out of orthogonality, and
        # it stays out of the transformers weights, so the stock class loads the folder as before.
        # `_rotation_on` keeps one copy per device the embeddings are computed on.
        self.__dict__[_ROTATION_ATTRIBUTE] = rotation
        self.__dict__["_cafe_rotation_by_device"] = {}

    def _rotation_on(self, device: torch.device) -> torch.Tensor | None:
        rotation = self.embedding_rotation
        if rotation is None:
            return None
        copies = self.__dict__.setdefault("_cafe_rotation_by_device", {})
        if device not in copies:
            copies[device] = rotation.to(device)
        return copies[device]

    def fit_embedding_rotation(
        self,
        inputs: Sequence[Any] | None = None,
        *,
        images: Sequence[Any] | None = None,
        texts: Sequence[str] | None = None,
        instruction: str | None = None,
        processor: ProcessorMixin | None = None,
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
    ) -> torch.Tensor:
        """Rotate the embedding space so its first coordinates are the data's principal directions.

        After this, ``encode(..., truncate_dim=k)`` (and ``SentenceTransformer(path, truncate_dim=k)``
        on the saved folder) keeps the best ``k``-dimensional subspace of these inputs' embeddings
        instead of whatever the first ``k`` hidden units hold. Full-size similarities are unchanged
        (the rotation is orthogonal). Unsupervised: fit on a sample of the corpus you will embed
        (queries and documents alike), never on evaluation labels. Replaces any earlier rotation.

        The rotation is saved by `save_pretrained` (as the ``Dense`` module of the folder) and,
        for a LoRA fine-tune saved as an adapter, by `CafeTrainer` beside the adapter
        (``cafe_embedding_rotation.safetensors``); PEFT's own ``save_pretrained`` does not carry it.

        Args:
            inputs, images, texts, instruction, processor, batch_size, show_progress_bar: As in
                `encode`; at least ``hidden_size`` inputs (fewer order only as many directions,
                with a warning), and many more than the ``truncate_dim`` you will use.

        Returns:
            The ``[hidden, hidden]`` rotation now in use.
        """
        previous = self.embedding_rotation
        self.set_embedding_rotation(None)
        try:
            embeddings = self.encode(
                inputs,
                images=images,
                texts=texts,
                instruction=instruction,
                processor=processor,
                batch_size=batch_size,
                show_progress_bar=show_progress_bar,
            )
            rotation = principal_rotation(embeddings)
        except BaseException:
            self.set_embedding_rotation(previous)
            raise
        self.set_embedding_rotation(rotation)
        return rotation

    # ------------------------------------------------------------------ embeddings
    def _check_fits_context(self, length: int) -> None:
        """A prompt past the position limit would embed garbage with only a tokenizer warning."""
        limit = _context_length(self)
        if limit is not None and length > limit:
            raise ValueError(
                f"An embedding prompt is {length} tokens, longer than the model's context ({limit} positions). "
                f"Texts are cut at CafeSettings.max_text_chars={self.cafe_settings.max_text_chars} characters: lower "
                "it (CafeForConditionalGeneration.from_pretrained(path, cafe_settings=...)), or pass smaller images."
            )

    def get_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mm_encoder_outputs: dict[str, Any] | None = None,
        normalize: bool | None = None,
        prefix_cache: bool | EmbeddingPrefixCache | None = None,
        **vision_inputs: Any,
    ) -> torch.Tensor:
        """Embeddings of a processed batch: last-layer hidden state of the last real token.

        Runs the backbone without the LM head, so no vocabulary-sized logits are computed.

        Args:
            input_ids: ``[batch, seq]``, left- or right-padded.
            attention_mask: ``[batch, seq]``.
            mm_encoder_outputs: Pre-computed vision features from `get_vision_features`; when
                given, pixel inputs must not be passed.
            normalize: Override the ``normalize`` setting.
            prefix_cache: Read the keys and values of the prompt's shared prefix (system turn +
                user header) from a cache instead of recomputing them for every row
                (`cafe.inference`). ``True``: this model's cache for its processor's embedding
                prompt (`prefix_cache_for`); or an `EmbeddingPrefixCache`. Default off here (a
                training forward needs the prefix's gradient); `encode` turns it on. Batches whose
                prefix is under 5 % of their tokens (image prompts) run uncached by design: there
                the cache saves less than the attention fast path it gives up. Equal to the
                uncached path within 1e-5 in float32; in bfloat16 within rounding (max abs
                difference of the unit-norm vectors <= 1e-2 and cosine >= 0.999; measured 3.7e-3
                and 0.9998 at LLaVA-OneVision-0.5B's shape). Needs
                ``no_grad`` / ``inference_mode``, eval mode and sdpa or eager attention; otherwise
                it logs why and runs uncached.
            **vision_inputs: The processor's image and video tensors (``pixel_values``,
                ``image_sizes``, ``pixel_values_videos``, ``video_grid_thw``, ...).

        Returns:
            ``[batch, hidden]`` float32 tensor, L2-normalised unless disabled.
        """
        _check_token_batch(input_ids, attention_mask)
        vision_inputs = {k: v for k, v in vision_inputs.items() if v is not None}
        if mm_encoder_outputs is not None:
            vision_inputs = {"mm_encoder_outputs": mm_encoder_outputs}
        if prefix_cache is True:
            prefix_cache = self.prefix_cache_for()
        elif (
            prefix_cache is not None
            and prefix_cache is not False
            and not isinstance(prefix_cache, EmbeddingPrefixCache)
        ):
            raise TypeError(
                f"prefix_cache must be True, False, None or an EmbeddingPrefixCache, got {type(prefix_cache).__name__}."
            )
        if isinstance(prefix_cache, EmbeddingPrefixCache):
            pooled = prefix_cache.last_hidden_states(self, input_ids, attention_mask, vision_inputs)
            if pooled is not None:
                return self._finish_embedding(pooled, normalize)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=self.embedding_position_ids(input_ids, attention_mask, **vision_inputs),
            use_cache=False,
            **vision_inputs,
        )
        return self._finish_embedding(last_token_pool(outputs.last_hidden_state, attention_mask), normalize)

    def prefix_cache_for(
        self, processor: ProcessorMixin | PreTrainedTokenizerBase | None = None
    ) -> EmbeddingPrefixCache:
        """This model's `EmbeddingPrefixCache` for the embedding prompt as ``processor`` (default: the
        model's own) tokenizes it; created on first use, kept on the model, one per distinct prefix."""
        processor = processor if processor is not None else self.processor
        if processor is None:
            raise ValueError(
                "The prefix cache needs the processor that tokenizes the embedding prompt: load the model with its "
                "processor, pass processor=..., or give get_embeddings an EmbeddingPrefixCache(prefix_ids)."
            )
        prefix_ids = embedding_prompt_prefix_ids(processor, self.embedding_chat_template)
        caches = self.__dict__.setdefault("_cafe_prefix_caches", {})
        key = tuple(prefix_ids.tolist())
        if key not in caches:
            caches[key] = EmbeddingPrefixCache(prefix_ids)
        return caches[key]

    def clear_prefix_cache(self) -> None:
        """Drop the cached prompt prefixes. Needed only after a change the weights signature cannot
        see (e.g. toggling PEFT adapters); weight updates invalidate the cache by themselves."""
        self.__dict__.pop("_cafe_prefix_caches", None)

    def encode(
        self,
        inputs: Sequence[Any] | None = None,
        *,
        images: Sequence[Any] | None = None,
        texts: Sequence[str] | None = None,
        instruction: str | None = None,
        processor: ProcessorMixin | None = None,
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
        use_prefix_cache: bool = True,
        sort_by_length: bool = True,
        truncate_dim: int | None = None,
    ) -> torch.Tensor:
        """Embed raw inputs under the CAFe embedding prompt; returns ``[N, hidden]`` float32 on CPU.

        Images and videos are opened a chunk of 16 batches at a time (length-sorted within the
        chunk), so a list of photos larger than memory embeds; texts alone are sorted all together.

        Args:
            inputs: Strings (texts; a string naming an existing local image or video file, by
                its extension, is that file, as in sentence-transformers), PIL images, ``(image, text)`` tuples, ``{"image", "text"}`` dicts, or
                videos as ``{"video": ...}`` / ``{"video": ..., "text": ...}`` dicts (a video file
                path, a list of frames or a ``[T, H, W, 3]`` uint8 array; its frames are sampled by
                the family's rule under ``video_num_frames`` / ``video_fps``, see `cafe.video`).
            images, texts: Alternatively, images and/or texts (both: embedded as pairs).
            instruction: Optional task instruction placed before the text (MMEB style).
            processor: Defaults to the processor loaded with the model.
            batch_size: Inputs per forward pass (a positive integer).
            show_progress_bar: Defaults to on when there is more than one batch.
            use_prefix_cache: Compute the prompt's shared prefix (system turn + user header) once
                and run every batch on its suffix only (see `get_embeddings`' ``prefix_cache``).
            sort_by_length: Batch inputs of similar token length together (longest first), then
                restore the input order: less padding on mixed lengths, same vectors.
            truncate_dim: Keep the first ``truncate_dim`` dimensions (re-normalised when the model
                normalises), for a model trained with ``matryoshka_dims`` or rotated by
                `fit_embedding_rotation`.

        Returns:
            ``[N, hidden]`` (or ``[N, truncate_dim]``) float32, in the order of the inputs.
        """
        from .prompting import check_batch_size, render_embedding_prompts

        check_batch_size(batch_size)
        processor = processor if processor is not None else self.processor
        if processor is None:
            raise ValueError(
                "No processor: load the model with CafeForConditionalGeneration.from_pretrained(path) from a folder "
                "that has one, or pass processor=AutoProcessor.from_pretrained(...)."
            )
        _check_processor_matches(self, processor)
        hidden_size = self.config.get_text_config().hidden_size
        if truncate_dim is not None and (
            isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int) or not 0 < truncate_dim <= hidden_size
        ):
            raise ValueError(
                f"truncate_dim must be an integer between 1 and the embedding size {hidden_size}, got {truncate_dim!r}."
            )
        if (
            truncate_dim is not None
            and truncate_dim < hidden_size
            and self.embedding_rotation is None
            and not self.cafe_settings.matryoshka_dims
        ):
            # Measured on SmolLM2-135M (docs/sentence-transformers.md): unordered hidden units keep
            # 85-90 % of full-size recall at 128 of 576 dimensions, a fitted rotation 98-100 %.
            logger.warning_once(
                f"truncate_dim={truncate_dim} keeps the first {truncate_dim} hidden units of a model that was neither "
                "trained with matryoshka_dims nor rotated: they are in no particular order. Call "
                "fit_embedding_rotation(sample) first (or `cafe rotate`) to keep the best dimensions instead."
            )
        raw = embedding_items(inputs, images=images, texts=texts)
        sampling = frame_sampling(processor, self.cafe_settings)
        # Images and videos are opened chunk by chunk (length-sorted within a chunk), so a list of
        # photos larger than memory still embeds; texts alone are one chunk (sorting all of them
        # together pads least).
        chunk_size = ENCODE_CHUNK_BATCHES * batch_size if any(map(_is_visual_item, raw)) else len(raw)
        batches = sum(math.ceil(min(chunk_size, len(raw) - c) / batch_size) for c in range(0, len(raw), chunk_size))
        if show_progress_bar is None:
            show_progress_bar = batches > 1
        progress = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=batches, desc="Embedding", unit="batch")
        template = self.embedding_chat_template
        limit = self.cafe_settings.max_text_chars
        cut = 0
        embeddings = torch.empty(len(raw), hidden_size, dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                prefix_cache = self.prefix_cache_for(processor) if use_prefix_cache else None
                for first in range(0, len(raw), chunk_size):
                    items = load_embedding_inputs(raw[first : first + chunk_size], sampling, first_index=first)
                    cut += sum(1 for item in items if limit is not None and item.text and len(item.text) > limit)
                    order = list(range(len(items)))
                    if sort_by_length and len(items) > 1:
                        prompts = render_embedding_prompts(processor, items, template, instruction)
                        order = length_sorted_order(approximate_token_lengths(processor, items, prompts))
                    for start in range(0, len(items), batch_size):
                        rows = order[start : start + batch_size]
                        batch = build_embedding_batch(processor, [items[i] for i in rows], template, instruction)
                        self._check_fits_context(batch["input_ids"].shape[1])
                        batch = batch.to(self.device)
                        for key in ("pixel_values", "pixel_values_videos"):
                            if key in batch:
                                batch[key] = batch[key].to(self.dtype)
                        vectors = self.get_embeddings(**batch, prefix_cache=prefix_cache).cpu()
                        embeddings[torch.tensor(rows) + first] = vectors
                        if progress is not None:
                            progress.update(1)
        finally:
            self.train(was_training)
            if progress is not None:
                progress.close()
        if cut:
            # The embedding template cuts them (as sentence-transformers and training do); say so,
            # since two texts that differ only past the limit get the same vector.
            logger.warning(
                f"{cut} text(s) are longer than max_text_chars={limit} characters and are embedded from their "
                f"first {limit}. Raise it with from_pretrained(path, cafe_settings={{'max_text_chars': ...}}) "
                "(within the model's context), or split long texts into passages."
            )
        if truncate_dim is not None:
            embeddings = embeddings[:, :truncate_dim]
            if self.cafe_settings.normalize:
                embeddings = F.normalize(embeddings, p=2, dim=-1)
        return embeddings


# Batches per chunk of `encode` when the inputs hold images or videos (see `encode`).
ENCODE_CHUNK_BATCHES = 16


def _is_visual_item(item: Any) -> bool:
    """Whether a raw `encode` item holds an image or a video (a text alone is cheap to hold)."""
    if isinstance(item, str):
        return media_kind(item) is not None
    if isinstance(item, dict):
        return item.get("image") is not None or item.get("video") is not None
    return True  # PIL images, videos, (image, text) tuples


def _context_length(model: PreTrainedModel) -> int | None:
    text_config = model.config.get_text_config()
    return getattr(text_config, "max_position_embeddings", None)


def _complement(rows: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in ``range(n)`` not in ``rows``."""
    keep = torch.ones(n, dtype=torch.bool, device=rows.device)
    keep[rows] = False
    return keep.nonzero().flatten()


def _check_processor_matches(model: CafeForConditionalGeneration, processor: ProcessorMixin) -> None:
    """A processor whose image or video token differs from the model's would silently embed garbage."""
    for modality in ("image", "video"):
        model_id = getattr(model.config, f"{modality}_token_id", None)
        proc_id = getattr(processor, f"{modality}_token_id", None)
        if model_id is not None and proc_id is not None and model_id != proc_id:
            raise ValueError(
                f"The processor's {modality} token id ({proc_id}, {getattr(processor, f'{modality}_token', '?')!r}) "
                f"does not match the model's config.{modality}_token_id ({model_id}). Load the processor from the "
                "same checkpoint as the model (AutoProcessor.from_pretrained(<model path>))."
            )


def _check_model_source(name: str | os.PathLike) -> None:
    """A path that does not exist and cannot be a Hub repo id is a missing folder: say so (the Hub
    client's "Repo id must be in the form 'namespace/repo_name'" names neither)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(name):
        return
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        raise FileNotFoundError(
            f"No model folder at {str(name)!r} (and it is not a Hub repo id such as 'llava-hf/llava-onevision-"
            "qwen2-0.5b-ov-hf'): check the path."
        ) from None


def _hub_adapter_config(name: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path | None:
    """``adapter_config.json`` of the Hub repo `name` (downloaded), or None: not a repo id, or no adapter."""
    from transformers.utils.peft_utils import find_adapter_config_file

    if not is_hub_repo_id(name):
        return None
    try:
        found = find_adapter_config_file(str(name), **hub_kwargs)
    except OSError:
        return None
    return Path(found) if found is not None else None


def _try_load_processor(path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> ProcessorMixin | None:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, **hub_kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        # A weights-only folder (e.g. an intermediate Trainer checkpoint) has no processor.
        return None


# ----------------------------------------------------------------------------- staged saves
# Top-level names a model save writes (transformers weights and config, PEFT adapters, processor
# and tokenizer files, the sentence-transformers export, the card, Trainer's `training_args.bin`).
# When a new save replaces a folder, these go even if the new save does not write them: a stale
# `adapter_config.json` or `model.safetensors` would be loaded instead of the new weights.
_MODEL_SAVE_FILES = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    ADAPTER_SETTINGS_NAME,
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "README.md",
    "training_args.bin",
    "training_args.json",
)


@contextlib.contextmanager
def _staged_folder(save_directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden sibling of `save_directory` to write a save into; on a clean exit it
    replaces `save_directory`, on any error (or interruption) it is removed and the folder is left
    as it was.

    The sibling lives in the same parent so that the final swap is a rename on one filesystem.
    What the folder holds besides a model save (see `_MODEL_SAVE_FILES`) is carried over.
    """
    import shutil
    import uuid

    target = Path(os.path.realpath(save_directory))  # a symlinked folder keeps its link
    if target.is_file():
        raise NotADirectoryError(f"Cannot save into {str(save_directory)!r}: it is a file. Pass a folder path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.saving-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # honours the umask, like the folder transformers would have created
    try:
        yield staging
        _swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, target: Path) -> None:
    """Make `staging` the folder `target`, carrying over what `target` holds besides a model save."""
    import shutil
    import uuid

    if not target.exists():
        os.rename(staging, target)
        return
    owned = set(os.listdir(staging)) | _sentence_transformers_module_folders(target)
    for name in os.listdir(target):
        if name in owned or any(fnmatch.fnmatchcase(name, pattern) for pattern in _MODEL_SAVE_FILES):
            continue
        # Hard links: the old folder stays complete until the swap, at no copying cost.
        source, destination = target / name, staging / name
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, destination)
    os.chmod(staging, target.stat().st_mode & 0o7777)
    # A process whose working directory is inside the old folder would be left in the replaced
    # copy; it is moved to the same path in the new folder.
    cwd = os.getcwd()
    inside = cwd == str(target) or cwd.startswith(str(target) + os.sep)
    replaced = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:12]}"
    # Two renames: the path is missing for the instant between them, never half written. Were
    # the process killed right there, the previous save is intact under the `.replaced-` name.
    os.rename(target, replaced)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(replaced, target)
        raise
    if inside and os.path.isdir(cwd):
        os.chdir(cwd)
    shutil.rmtree(replaced, ignore_errors=True)


def _sentence_transformers_module_folders(folder: Path) -> set[str]:
    """Module folders (``1_Pooling``, ...) listed in the ``modules.json`` of an earlier save."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        paths = {str(module.get("path") or "") for module in modules}
    except (OSError, ValueError, TypeError, AttributeError):
        return set()
    # Only plain top-level folder names: a malformed file must not point outside the folder.
    return {path for path in paths if path and Path(path).name == path}


def _link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:  # a filesystem without hard links
        import shutil

        shutil.copy2(source, destination, follow_symlinks=False)


# ----------------------------------------------------------------------------- argument checks
def _check_token_batch(input_ids: Any, attention_mask: Any) -> None:
    """Shape checks only: they cost no device synchronisation on the training path."""
    for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got {type(value).__name__}: call the processor with "
                "return_tensors='pt' (or use `encode` for raw inputs)."
            )
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}; a single sequence is a batch "
            "of one: pass input_ids[None] and attention_mask[None]."
        )
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}; "
            "pass the mask the processor returned with these ids."
        )
