"""`CafeTrainer` and `CafeTrainingArguments`: the joint loss of paper Eq. 3 on the Trainer stack."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.utils import logging

from .batch import CafeBatch, MiniBatches
from .collator import MiniBatchCollator
from .losses import (
    CONTRASTIVE_GRADIENTS,
    MATRYOSHKA_ROTATION_DECAY,
    MATRYOSHKA_ROTATION_METHODS,
    CachedCafeLoss,
    CafeLoss,
    RunningPrincipalBasis,
)

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo
    from torch import nn
    from transformers import TrainerControl, TrainerState
    from transformers.trainer_utils import TrainOutput

    from .losses import CafeLossOutput
    from .modeling import CafeForConditionalGeneration

logger = logging.get_logger(__name__)


# Default rate of the learned Matryoshka rotation (`CafeLoss(matryoshka_rotation=True)`).
MATRYOSHKA_ROTATION_LEARNING_RATE = 1e-2


@dataclass
class CafeTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus CAFe's. Defaults follow the paper (alpha_con = 10, alpha_lm = 1)."""

    contrastive_weight: float = field(default=10.0, metadata={"help": "alpha_con of Eq. 3 (paper: 10)."})
    lm_weight: float = field(default=1.0, metadata={"help": "alpha_lm of Eq. 3 (paper: 1)."})
    con_weight: float | None = field(
        default=None, metadata={"help": "Reference name of --contrastive_weight; overrides it when set."}
    )
    compute_language_loss: bool = field(default=True, metadata={"help": "Include the next-token loss."})
    compute_contrastive_loss: bool = field(default=True, metadata={"help": "Include the InfoNCE loss."})
    contrastive_temperature: float | None = field(
        default=None, metadata={"help": "InfoNCE temperature; default: the model's setting (0.05)."}
    )
    learnable_logit_scale: bool = field(default=False, metadata={"help": "Learn the logit scale (CLIP-style)."})
    mask_false_negatives: bool = field(
        default=True, metadata={"help": "Mask identical texts / images inside a batch out of the negatives."}
    )
    gather_negatives: bool = field(
        default=True,
        metadata={"help": "Under torch.distributed, use every process's samples as negatives."},
    )
    vision_tower_learning_rate: float | None = field(
        default=2e-6, metadata={"help": "LR of the vision tower (paper: 2e-6); None = learning_rate."}
    )
    projector_learning_rate: float | None = field(
        default=None, metadata={"help": "LR of the multimodal projector; None = learning_rate."}
    )
    gradient_cache: bool = field(
        default=False,
        metadata={
            "help": "GradCache: contrastive batch in mini-batches without keeping activations (see docs/scaling.md)."
        },
    )
    gradient_cache_mini_batch_size: int = field(
        default=8, metadata={"help": "Records per GradCache mini-batch (<= per_device_train_batch_size)."}
    )
    contrastive_gradient: str = field(
        default="exact",
        metadata={
            "help": "Under several processes: 'exact' = gradient of the global contrastive loss; 'reference' = "
            "the paper's code (DDP average, i.e. an effective con_weight / world_size). See docs/scaling.md."
        },
    )
    share_prefix: bool = field(
        default=True,
        metadata={
            "help": "Run a record's image-embedding sequence in its LM sequence's LLM pass, computing their "
            "shared prefix (system turn + image tokens) once. Same results, less compute; needs "
            "sdpa or eager attention (other kernels fall back to separate passes)."
        },
    )
    validate_data: bool = field(
        default=True,
        metadata={
            "help": "Check every training record (layout, texts, images) before step 1 and report all bad "
            "ones at once (cafe.data.validation.validate_records)."
        },
    )
    data_validation_num_proc: int | None = field(
        default=None, metadata={"help": "Processes for the pre-flight data check (datasets.map num_proc)."}
    )
    matryoshka_dims: list[int] | None = field(
        default=None,
        metadata={
            "help": "Matryoshka training: InfoNCE also at these truncated, re-normalised embedding sizes (e.g. "
            "896 512 256 128 64; list the full size too). Saved in config.cafe and the "
            "sentence-transformers config, for truncate_dim. See CafeLoss."
        },
    )
    matryoshka_weights: list[float] | None = field(
        default=None, metadata={"help": "Weight of each matryoshka_dims term (default 1 each, summed)."}
    )
    matryoshka_rotation: bool = field(
        default=False,
        metadata={
            "help": "Rotate the embedding space for the Matryoshka terms (learned, or the running principal basis: "
            "matryoshka_rotation_method), so that truncated prefixes hold the directions that matter; saved as the "
            "sentence-transformers Dense module. See CafeLoss."
        },
    )
    matryoshka_rotation_method: str = field(
        default="learned",
        metadata={
            "help": "How matryoshka_rotation finds the rotation: 'learned' (an orthogonal matrix trained by the "
            "truncated terms) or 'principal' (the running principal basis of the training embeddings). See CafeLoss.",
            "choices": list(MATRYOSHKA_ROTATION_METHODS),
        },
    )
    matryoshka_rotation_learning_rate: float = field(
        default=MATRYOSHKA_ROTATION_LEARNING_RATE,
        metadata={"help": "Learning rate of the learned Matryoshka rotation (it starts at the identity)."},
    )
    matryoshka_rotation_decay: float = field(
        default=MATRYOSHKA_ROTATION_DECAY,
        metadata={
            "help": "Decay per training batch of the 'principal' rotation's running statistic (it averages over "
            "about the last 1/(1-decay) batches)."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep raw record columns: CafeCollator reads them."}
    )
    dataloader_drop_last: bool = field(
        default=True, metadata={"help": "Drop the last, smaller batch (a contrastive batch needs >= 2 pairs)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.con_weight is not None:
            self.contrastive_weight = self.con_weight
        if not (self.compute_language_loss or self.compute_contrastive_loss):
            raise ValueError("Both losses are off: enable compute_language_loss or compute_contrastive_loss.")
        if self.gradient_cache and not 1 <= self.gradient_cache_mini_batch_size <= self.per_device_train_batch_size:
            raise ValueError(
                f"gradient_cache_mini_batch_size ({self.gradient_cache_mini_batch_size}) must be between 1 and "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}): it splits that batch."
            )
        if self.contrastive_gradient not in CONTRASTIVE_GRADIENTS:
            raise ValueError(
                f"contrastive_gradient must be one of {CONTRASTIVE_GRADIENTS}, got {self.contrastive_gradient!r}."
            )
        if self.matryoshka_rotation and not self.matryoshka_dims:
            raise ValueError(
                "matryoshka_rotation=True needs matryoshka_dims (e.g. 896 512 256 128 64): only the truncated terms "
                "train the rotation."
            )
        if self.matryoshka_rotation_method not in MATRYOSHKA_ROTATION_METHODS:
            raise ValueError(
                f"matryoshka_rotation_method must be one of {MATRYOSHKA_ROTATION_METHODS}, "
                f"got {self.matryoshka_rotation_method!r}."
            )
        if self.matryoshka_rotation_method != "learned" and not self.matryoshka_rotation:
            raise ValueError(
                f"matryoshka_rotation_method={self.matryoshka_rotation_method!r} has no effect without "
                "matryoshka_rotation=True: turn the rotation on (with matryoshka_dims)."
            )
        if not 0.0 <= self.matryoshka_rotation_decay < 1.0:
            raise ValueError(f"matryoshka_rotation_decay must be in [0, 1), got {self.matryoshka_rotation_decay}.")
        if self.torch_compile:
            warnings.warn("torch_compile=True with CafeTrainer is untested; it is off by default.", stacklevel=2)


LOSS_STATE_NAME = "cafe_loss.pt"
# The collator's record-sampling RNG (which of a record's ``positives`` is drawn): training
# state, so that a resumed run draws what the uninterrupted run draws. JSON, not a pickle.
DATA_RNG_STATE_NAME = "cafe_data_rng.json"
TRAINING_ARGS_JSON_NAME = "training_args.json"


class _ZeroLossGradients(TrainerCallback):
    """Trainer zeroes the *model's* gradients after each optimizer step; the loss's parameters (a
    learnable logit scale) are optimised too and would otherwise accumulate gradient over steps."""

    def __init__(self, trainer: CafeTrainer):
        self.trainer = trainer

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.trainer.loss.zero_grad(set_to_none=True)


class CafeTrainer(Trainer):
    """Trainer for CAFe: optimises a `cafe.losses.CafeLoss` (paper Eq. 3) on `CafeCollator` batches.

    Args:
        loss: The objective, called as ``loss(model, batch)`` and returning a
            `cafe.losses.CafeLossOutput`. Default: built from `CafeTrainingArguments` by
            `default_loss` (a `CachedCafeLoss` with ``gradient_cache=True``). A loss with a
            ``mini_batch_size`` attribute is a cached (GradCache) loss: its batches arrive as
            `cafe.batch.MiniBatches`. The loss's parameters (a learnable logit scale) are optimised
            with the model, saved with every checkpoint's trainer state and restored on resume.
        Other arguments as `transformers.Trainer`; ``args`` must be `CafeTrainingArguments`.

    Expects a `CafeForConditionalGeneration` (or a PEFT / DDP wrapper of one). Logs ``loss_lm``,
    ``loss_con``, in-batch retrieval accuracy in both directions (``acc_q2d``, ``acc_d2q``),
    ``logit_scale`` and the collator's truncation counts (``data/...``).

    Gradient accumulation adds no negatives: each micro-batch's contrastive loss only sees its
    own (or, with several processes, its global) batch.
    """

    args: CafeTrainingArguments

    def __init__(self, *args: Any, loss: CafeLoss | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CafeTrainingArguments):
            raise TypeError("CafeTrainer needs CafeTrainingArguments (got TrainingArguments).")
        if not hasattr(self._cafe_model(), "cafe_forward"):  # modeling imports the trainer's modules
            raise TypeError(
                f"CafeTrainer needs a CafeForConditionalGeneration (optionally PEFT-wrapped), got "
                f"{type(self._cafe_model()).__name__}: load the model with "
                "CafeForConditionalGeneration.from_pretrained(path) (same weights)."
            )
        if self.data_collator is default_data_collator or isinstance(self.data_collator, DataCollatorWithPadding):
            # Trainer's stand-in when none is given: it would fail on the first batch, inside transformers.
            raise TypeError(
                "CafeTrainer needs data_collator=CafeCollator(processor, model=model): the loss reads its paired "
                "contrastive + language-modelling batches."
            )
        collator = getattr(self.data_collator, "collator", self.data_collator)
        if self.args.compute_language_loss and getattr(collator, "compute_language_loss", True) is False:
            logger.warning(
                "compute_language_loss is on in the training arguments but the collator builds no LM sequences "
                "(CafeCollator(compute_language_loss=False)): this run trains contrastively only. Build the collator "
                "with compute_language_loss=True, or turn it off in CafeTrainingArguments to say so."
            )
        frozen = self._cafe_model().freeze_unused_parameters()
        if frozen:
            logger.info("Froze %d parameters the forward pass never uses: %s", len(frozen), frozen)
        passed_rotation = None if loss is None else getattr(loss, "learned_rotation", None)
        if loss is not None and self.args.matryoshka_rotation and passed_rotation is None:
            logger.warning(
                "matryoshka_rotation=True in the training arguments, but the loss passed to CafeTrainer learns no "
                "rotation: this run trains none. Build it with CafeLoss(..., matryoshka_rotation=True)."
            )
        elif self.args.matryoshka_rotation and passed_rotation is not None:
            passed_method = "principal" if isinstance(passed_rotation, RunningPrincipalBasis) else "learned"
            if passed_method != self.args.matryoshka_rotation_method:
                logger.warning(
                    f"matryoshka_rotation_method={self.args.matryoshka_rotation_method!r} in the training arguments, "
                    f"but the loss passed to CafeTrainer has a {passed_method!r} rotation, which this run uses. Build "
                    "the loss with the same matryoshka_rotation_method."
                )
        self.loss = (loss if loss is not None else self.default_loss()).to(self.args.device)
        # Our losses are means over their own batch; let Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        # Set by Trainer's loop; a direct `training_step` call (e.g. a benchmark) is one micro-step.
        self.current_gradient_accumulation_steps = 1
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._attach_model_card_data()
        self.add_callback(_ZeroLossGradients(self))
        self._adopt_collator_prompts()
        mini_batch_size = getattr(self.loss, "mini_batch_size", None)
        if mini_batch_size is not None and not isinstance(self.data_collator, MiniBatchCollator):
            # Trainer types `data_collator` as returning a dict; cafe's return `CafeBatch` / `MiniBatches`.
            self.data_collator = MiniBatchCollator(self.data_collator, mini_batch_size)  # type: ignore[assignment,arg-type]

    def _adopt_collator_prompts(self) -> None:
        """The prompts a model is trained with are the prompts it embeds with afterwards.

        A `CafeCollator` may train with other prompts than the model's ``config.cafe`` (the
        reference's ``multimodal_input`` drops the "Compress ..." instructions); then ``encode``,
        the evaluation and the saved sentence-transformers files would embed with prompts the
        model never saw. So the collator's settings are written into the model's config.
        """
        collator = getattr(self.data_collator, "collator", self.data_collator)
        trained = getattr(collator, "settings", None)
        if trained is None:
            return
        model = self._cafe_model()
        current = model.cafe_settings
        fields = ("image_prompt", "text_prompt", "multimodal_prompt", "embedding_chat_template", "lm_chat_template")
        changed = [name for name in fields if getattr(trained, name) != getattr(current, name)]
        if changed:
            logger.warning(
                "The collator trains with other CAFe prompts than the model's config.cafe (%s differ, e.g. "
                "multimodal_input=True); writing the collator's into the model so that encode(), evaluation and "
                "the saved checkpoint embed with the prompts it is trained with.",
                ", ".join(changed),
            )
            model.config.cafe = {**model.config.cafe, **{name: getattr(trained, name) for name in fields}}

    def default_loss(self) -> CafeLoss:
        """The loss `CafeTrainingArguments` describe, temperature defaulting to the model's setting."""
        args = self.args
        settings = self._cafe_model().cafe_settings
        kwargs: dict[str, Any] = dict(
            contrastive_weight=args.contrastive_weight if args.compute_contrastive_loss else 0.0,
            lm_weight=args.lm_weight if args.compute_language_loss else 0.0,
            temperature=args.contrastive_temperature or settings.contrastive_temperature,
            learnable_logit_scale=args.learnable_logit_scale or settings.learnable_logit_scale,
            mask_false_negatives=args.mask_false_negatives,
            gather_negatives=args.gather_negatives,
            contrastive_gradient=args.contrastive_gradient,
            average_tokens_across_processes=args.average_tokens_across_devices,
            share_prefix=args.share_prefix,
            matryoshka_dims=args.matryoshka_dims,
            matryoshka_weights=args.matryoshka_weights,
            matryoshka_rotation=args.matryoshka_rotation,
            matryoshka_rotation_method=args.matryoshka_rotation_method,
            matryoshka_rotation_decay=args.matryoshka_rotation_decay,
        )
        if args.gradient_cache:
            return CachedCafeLoss(mini_batch_size=args.gradient_cache_mini_batch_size, **kwargs)
        return CafeLoss(**kwargs)

    def _cafe_model(self) -> CafeForConditionalGeneration:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # ------------------------------------------------------------------ optimisation
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Separate learning rates for vision tower, projector and LLM (paper: 2e-6 / 1e-5 / 1e-5),
        plus the loss's own parameters (a learnable logit scale) at the LLM's rate, no decay."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if opt_model is None:
            raise ValueError("CafeTrainer has no model to optimise: pass model= to the trainer.")
        decay = set(self.get_decay_parameter_names(opt_model))
        cafe_model = self._cafe_model()
        lrs = {
            "vision": self.args.vision_tower_learning_rate or self.args.learning_rate,
            "projector": self.args.projector_learning_rate or self.args.learning_rate,
            "llm": self.args.learning_rate,
        }
        groups: dict[tuple[str, bool], list] = defaultdict(list)
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups[(cafe_model.parameter_component(name), name in decay)].append(param)
        param_groups = [
            {"params": params, "lr": lrs[component], "weight_decay": self.args.weight_decay if decayed else 0.0}
            for (component, decayed), params in groups.items()
        ]
        # Trainer logs the first group's rate; on Qwen2-VL that is the vision tower's. The logged
        # `learning_rate` is the LLM's (the one --learning_rate sets), whatever the group order.
        components = [component for component, _ in groups]
        self._logged_lr_group = components.index("llm") if "llm" in components else 0
        rotation = getattr(self.loss, "learned_rotation", None)
        rotation_params = set() if rotation is None else {id(p) for p in rotation.parameters()}
        loss_params = [p for p in self.loss.parameters() if p.requires_grad and id(p) not in rotation_params]
        if loss_params:
            param_groups.append({"params": loss_params, "lr": self.args.learning_rate, "weight_decay": 0.0})
        if rotation is not None and rotation_params:  # a running principal basis has none
            # Its own rate: it starts at the identity and has to turn far in a few hundred steps,
            # where the LLM's rate (1e-5 - 1e-4) would leave it there.
            param_groups.append(
                {
                    "params": list(rotation.parameters()),
                    "lr": self.args.matryoshka_rotation_learning_rate,
                    "weight_decay": 0.0,
                }
            )
        # transformers annotates the model as PreTrainedModel; a PEFT / DDP wrapper is what Trainer passes too.
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)  # type: ignore[arg-type]
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    def _get_learning_rate(self) -> float:
        index, scheduler = getattr(self, "_logged_lr_group", 0), self.lr_scheduler
        if index and scheduler is not None and not self.is_deepspeed_enabled and hasattr(scheduler, "get_last_lr"):
            return float(scheduler.get_last_lr()[index])
        return super()._get_learning_rate()

    # ------------------------------------------------------------------ loss
    # Trainer types batches as dicts; cafe's are `CafeBatch` / `MiniBatches` (dicts still pass through).
    def _prepare_inputs(  # type: ignore[override]
        self, inputs: CafeBatch | MiniBatches | dict[str, Any]
    ) -> CafeBatch | MiniBatches | dict[str, Any]:
        # Trainer moves dicts of tensors; CAFe batches are dataclasses that move themselves.
        if isinstance(inputs, (CafeBatch, MiniBatches)):
            return inputs.to(self.args.device)
        return super()._prepare_inputs(inputs)

    # Trainer types the batch as a dict; cafe's losses take `CafeBatch` / `MiniBatches`.
    def compute_loss(  # type: ignore[override]
        self,
        model: nn.Module,
        inputs: CafeBatch | MiniBatches,
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, CafeLossOutput]:
        for name, value in getattr(inputs, "counts", {}).items():
            self._metrics[f"data/{name}"].append(float(value))
        # Running statistics in the loss (a principal-basis rotation) update on training steps
        # only, as batch norm's do: the loss follows the model's train / eval mode.
        self.loss.train(model.training)
        output = self.loss(model, inputs)
        for name, value in output.metrics().items():
            self._metrics[name].append(value)
        return (output.loss, output) if return_outputs else output.loss

    # ------------------------------------------------------------------ logging and saving
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics:
            logs = {**logs, **{key: sum(values) / len(values) for key, values in self._metrics.items()}}
            self._metrics.clear()
        super().log(logs, start_time)

    def _attach_model_card_data(self) -> None:
        """Publish this run's CAFe settings in the model card `save_pretrained` writes."""
        from .hub import CafeModelCardData, training_settings_from_args

        model = self._cafe_model()
        card = getattr(model, "model_card_data", None) or CafeModelCardData()
        card.training = {**training_settings_from_args(self.args), **card.training}
        model.model_card_data = card  # type: ignore[assignment]  # an instance attribute the class does not declare

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # Trainer.push_to_hub would write its generic training card over ours: keep cafe's card,
        # which holds the CAFe settings and the transformers / cafe / sentence-transformers usage.
        from .hub import write_model_card

        if self.is_world_process_zero():
            model = self._cafe_model()
            write_model_card(
                str(self.args.output_dir),
                card_data=getattr(model, "model_card_data", None),
                source=model.name_or_path,
                tags=getattr(model, "model_tags", None),
            )

    def write_learned_settings(self) -> None:
        """Write what the loss learned (the temperature, if learnable) into the model's ``config.cafe``.

        Called before every save and at the end of `train`, so that a checkpoint, the final
        folder and a model merged afterwards (``merge_and_unload`` returns this same model) all
        state the temperature the model was trained with.
        """
        learned = self.loss.learned_settings if hasattr(self.loss, "learned_settings") else {}
        if learned:
            model = self._cafe_model()
            model.config.cafe = {**model.config.cafe, **learned}

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> TrainOutput:
        self._check_training_data()
        # The model's own rotation (a fitted one, or none) while the loss learns one on top of it.
        self._rotation_before_training = self._cafe_model().embedding_rotation
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        self.write_learned_settings()
        self.fold_learned_rotation()
        return result

    # ------------------------------------------------------------------ learned Matryoshka rotation
    def learned_embedding_rotation(self) -> torch.Tensor | None:
        """The model's rotation with the loss's learned one on top (``R_learned @ R_model``, ``[D, D]``
        float32 on the CPU), or None when the loss learns none (``matryoshka_rotation``)."""
        learned = getattr(self.loss, "rotation", None)
        if learned is None:
            return None
        before = getattr(self, "_rotation_before_training", self._cafe_model().embedding_rotation)
        learned = learned.to("cpu", torch.float32)
        return learned if before is None else learned @ before

    def fold_learned_rotation(self) -> None:
        """Make the learned rotation the model's `embedding_rotation` and restart the loss's from the
        identity, so that the model embeds (and a further `train` starts) as training left it."""
        rotation = self.learned_embedding_rotation()
        if rotation is None:
            return
        self._cafe_model().set_embedding_rotation(rotation)
        self._rotation_before_training = rotation
        self.loss.reset_rotation()

    @contextlib.contextmanager
    def _saving_learned_rotation(self) -> Iterator[None]:
        """While saving mid-training: the model's rotation is the learned one, so the checkpoint
        embeds as the model does at this step; afterwards training goes on with the loss applying it."""
        rotation = self.learned_embedding_rotation()
        if rotation is None:
            yield
            return
        model = self._cafe_model()
        before = model.embedding_rotation
        model.set_embedding_rotation(rotation)
        try:
            yield
        finally:
            model.set_embedding_rotation(before)

    # ------------------------------------------------------------------ data checks
    def _cafe_collator(self) -> Any:
        return getattr(self.data_collator, "collator", self.data_collator)

    def _check_training_data(self) -> None:
        """Before step 1: every record usable (all problems reported at once), and enough records
        for one batch, so that no run ends hours in on a bad record or a short data set."""
        dataset, args = self.train_dataset, self.args
        collator = self._cafe_collator()
        parser = getattr(collator, "parser", None)
        if args.validate_data and parser is not None:
            from .data.validation import validate_record_list, validate_records

            settings = {
                "image_folder": parser.image_folder,
                "multimodal_input": parser.multimodal_input,
                "caption_prompt": parser.caption_prompt,
                "missing_images": collator.missing_images,
            }
            if isinstance(dataset, list):
                # Trainer takes a plain list of records too: the same checks, on the records as given.
                self.train_dataset = dataset = validate_record_list(dataset, **settings)
            elif hasattr(dataset, "map") and hasattr(dataset, "__len__"):
                with args.main_process_first(desc="validating the training records"):
                    self.train_dataset = dataset = validate_records(
                        dataset, num_proc=args.data_validation_num_proc, **settings
                    )
        if dataset is not None and hasattr(dataset, "__len__") and args.dataloader_drop_last:
            needed = args.per_device_train_batch_size * max(args.world_size, 1)
            if len(dataset) < needed:
                raise ValueError(
                    f"The training set has {len(dataset)} usable records, fewer than one batch "
                    f"(per_device_train_batch_size={args.per_device_train_batch_size} x {max(args.world_size, 1)} "
                    "processes), and dataloader_drop_last=True drops incomplete batches (a contrastive batch needs equal "
                    "sizes across processes): lower per_device_train_batch_size or add records."
                )

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        self.write_learned_settings()
        with self._saving_learned_rotation():
            super()._save(output_dir, state_dict)
        # Trainer pickles its arguments next to the weights; a published folder should hold no
        # pickle (loading one runs code). Write them as JSON instead.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and output_dir is not None:
            pickled = os.path.join(output_dir, "training_args.bin")
            if os.path.isfile(pickled):
                os.remove(pickled)
            with open(os.path.join(output_dir, TRAINING_ARGS_JSON_NAME), "w") as f:
                f.write(self.args.to_json_string())
            unwrapped = self.accelerator.unwrap_model(self.model)
            if hasattr(unwrapped, "get_base_model"):
                with self._saving_learned_rotation():
                    self._save_adapter_extras(output_dir)

    def _save_adapter_extras(self, output_dir: str) -> None:
        """Beside PEFT's adapter files: the CAFe settings the adapter was trained with (an adapter
        folder has no config.json for ``config.cafe``, and training may have changed the prompts,
        the temperature or the Matryoshka sizes), the embedding rotation if the model has one
        (fitted, or learned by the loss) and cafe's model card over PEFT's placeholder.
        `CafeForConditionalGeneration.from_pretrained(output_dir)` reads them back."""
        from safetensors.torch import save_file

        from .configuration import ADAPTER_ROTATION_NAME, ADAPTER_SETTINGS_NAME
        from .hub import write_adapter_card

        model = self._cafe_model()
        with open(os.path.join(output_dir, ADAPTER_SETTINGS_NAME), "w") as f:
            json.dump(model.config.cafe, f, indent=2)
        rotation_path = os.path.join(output_dir, ADAPTER_ROTATION_NAME)
        if model.embedding_rotation is not None:
            save_file({"rotation": model.embedding_rotation.contiguous()}, rotation_path)
        elif os.path.isfile(rotation_path):  # an earlier save's, which this model no longer has
            os.remove(rotation_path)
        write_adapter_card(
            output_dir,
            base_model=str(model.name_or_path),
            cafe=model.config.cafe,
            card_data=getattr(model, "model_card_data", None),
        )

    # Returns None on non-main processes, as Trainer.push_to_hub does (it is annotated CommitInfo only).
    def push_to_hub(  # type: ignore[override]
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> CommitInfo | None:
        """Save the model to ``output_dir`` and upload what `save_pretrained` writes through
        `cafe.hub.push_folder_to_hub` (cafe's model card; no pickles, no checkpoints)."""
        from .hub import push_folder_to_hub

        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        model = self._cafe_model()
        output_dir = str(self.args.output_dir)
        repo_id = self.args.hub_model_id or os.path.basename(os.path.normpath(output_dir))
        return push_folder_to_hub(
            output_dir,
            repo_id,
            commit_message=commit_message,
            token=token or self.args.hub_token,
            revision=revision,
            private=self.args.hub_private_repo if private is None else private,
            card_data=getattr(model, "model_card_data", None),
        )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # The loss's parameters are training state, like the optimizer's moments for them; so
        # is the collator's record-sampling RNG.
        super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        state = self.loss.state_dict()
        if state:
            torch.save(
                {key: value.detach().cpu() for key, value in state.items()}, os.path.join(output_dir, LOSS_STATE_NAME)
            )
        parser = getattr(self._cafe_collator(), "parser", None)
        if parser is not None:
            with open(os.path.join(output_dir, DATA_RNG_STATE_NAME), "w") as f:
                json.dump(parser.rng_state(), f)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, LOSS_STATE_NAME)
        if os.path.isfile(path):
            self.loss.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))
        elif self.loss.state_dict():
            logger.warning(
                "%s has no %s: the loss's parameters (e.g. a learned logit scale) start from their initial values.",
                checkpoint,
                LOSS_STATE_NAME,
            )
        parser = getattr(self._cafe_collator(), "parser", None)
        rng_path = os.path.join(checkpoint, DATA_RNG_STATE_NAME)
        if parser is not None and os.path.isfile(rng_path):
            with open(rng_path) as f:
                parser.set_rng_state(json.load(f))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # Checkpoints are in the backbone's published key layout (e.g. `language_model.lm_head`),
        # which transformers renames on `from_pretrained` only; Trainer's resume path calls a
        # plain non-strict `load_state_dict` that would silently load nothing under those names.
        # So full-model checkpoints are read back through `from_pretrained`.
        target = model if model is not None else self.model
        unwrapped = self.accelerator.unwrap_model(target)
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        index = os.path.join(resume_from_checkpoint, "model.safetensors.index.json")
        plain = hasattr(unwrapped, "cafe_settings") and not self.is_fsdp_enabled and not self.is_deepspeed_enabled
        if not plain or not (os.path.isfile(weights) or os.path.isfile(index)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        try:
            loaded = type(unwrapped).from_pretrained(
                resume_from_checkpoint, load_processor=False, dtype=unwrapped.dtype
            )
        except Exception as err:  # safetensors / json errors of a folder an interrupted save left half-written
            raise RuntimeError(
                f"Cannot resume from {resume_from_checkpoint!r}: its weights do not load ({type(err).__name__}: {err}). "
                "The checkpoint is incomplete, probably written by a run that was killed while saving it. Delete "
                f"{resume_from_checkpoint!r} to resume from the previous checkpoint (resume_from_checkpoint=True picks "
                "the newest remaining one), or pass another checkpoint folder."
            ) from err
        unwrapped.load_state_dict(loaded.state_dict(), strict=True)
