"""`CafeTrainer` and `CafeTrainingArguments`: the joint loss of paper Eq. 3 on the Trainer stack."""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from .distributed import gather_no_grad, gather_with_grad, is_distributed
from .gradient_cache import MiniBatchCollator, gradient_cache_step, supervised_tokens
from .losses import ContrastiveLoss

logger = logging.get_logger(__name__)


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
        metadata={"help": "GradCache: contrastive batch in mini-batches without keeping activations (see docs/scaling.md)."},
    )
    gradient_cache_mini_batch_size: int = field(
        default=8, metadata={"help": "Records per GradCache mini-batch (<= per_device_train_batch_size)."}
    )
    share_prefix: bool = field(
        default=True,
        metadata={"help": "Run a record's image-embedding sequence in its LM sequence's LLM pass, computing their "
                          "shared prefix (system turn + image tokens) once. Same results, less compute; needs "
                          "sdpa or eager attention (other kernels fall back to separate passes)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep raw record columns: CafeCollator reads them."}
    )
    dataloader_drop_last: bool = field(
        default=True, metadata={"help": "Drop the last, smaller batch (a contrastive batch needs >= 2 pairs)."}
    )

    def __post_init__(self):
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
        if self.torch_compile:
            warnings.warn("torch_compile=True with CafeTrainer is untested; it is off by default.", stacklevel=2)


class CafeTrainer(Trainer):
    """Trainer for CAFe: ``loss = lm_weight * L_lm + contrastive_weight * L_con``.

    Expects batches from `CafeCollator` and a `CafeForConditionalGeneration` (or a PEFT wrapper
    of one). Logs ``loss_lm``, ``loss_con``, in-batch retrieval accuracy in both directions
    (``acc_q2d``, ``acc_d2q``), ``logit_scale`` and the collator's truncation counts.

    Gradient accumulation adds no negatives: each micro-batch's contrastive loss only sees its
    own (or, with several processes, its global) batch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        args = self.args
        if not isinstance(args, CafeTrainingArguments):
            raise TypeError("CafeTrainer needs CafeTrainingArguments (got TrainingArguments).")
        frozen = self._cafe_model().freeze_unused_parameters()
        if frozen:
            logger.info("Froze %d parameters the forward pass never uses: %s", len(frozen), frozen)
        settings = self._cafe_model().cafe_settings
        temperature = args.contrastive_temperature or settings.contrastive_temperature
        learnable = args.learnable_logit_scale or settings.learnable_logit_scale
        self.contrastive_loss = ContrastiveLoss(temperature, learnable=learnable).to(args.device)
        # Our losses are means over their own batch; let Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._attach_model_card_data()
        if args.gradient_cache and not isinstance(self.data_collator, MiniBatchCollator):
            self.data_collator = MiniBatchCollator(self.data_collator, args.gradient_cache_mini_batch_size)

    def _cafe_model(self):
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    # ------------------------------------------------------------------ optimisation
    def create_optimizer(self, model=None):
        """Separate learning rates for vision tower, projector and LLM (paper: 2e-6 / 1e-5 / 1e-5)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
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
        if self.contrastive_loss.log_logit_scale.requires_grad:
            param_groups.append({"params": [self.contrastive_loss.log_logit_scale], "lr": self.args.learning_rate, "weight_decay": 0.0})
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        self._log_counts(inputs)
        output = model(cafe_batch=inputs, cafe_share_prefix=args.share_prefix)
        loss = torch.zeros((), device=args.device)
        if args.compute_language_loss and output.lm_loss is not None:
            lm = output.lm_loss * (supervised_tokens(inputs) / self._lm_denominator(supervised_tokens(inputs)))
            loss = loss + args.lm_weight * lm
            self._metrics["loss_lm"].append(output.lm_loss.item())
        if args.compute_contrastive_loss:
            con = self._contrastive(output.query_embeds, output.doc_embeds, output.negative_embeds,
                                    inputs.get("query_groups"), inputs.get("doc_groups"))
            loss = loss + args.contrastive_weight * con.loss
        return (loss, output) if return_outputs else loss

    def _log_counts(self, inputs):
        counts = inputs.pop("truncation_counts", None)
        if counts is not None:
            names = ("lm_truncated", "lm_dropped_image_cut", "embedding_text_truncated", "skipped_records")
            for name, value in zip(names, counts.tolist()):
                self._metrics[f"data/{name}"].append(float(value))

    def _lm_denominator(self, local_tokens: int) -> float:
        """Token count the LM loss is averaged over.

        One process: its own count. Several: the global count divided by the world size, so
        that DDP's gradient *average* equals the gradient of the mean over all tokens of the
        global batch (processes may hold different numbers of answer tokens).
        """
        if not (is_distributed() and self.args.average_tokens_across_devices) or not local_tokens:
            return max(local_tokens, 1)
        count = torch.tensor(float(local_tokens), device=self.args.device)
        torch.distributed.all_reduce(count)
        return count.item() / torch.distributed.get_world_size()

    def _contrastive(self, query, doc, negatives, query_groups, doc_groups):
        if query is None or doc is None:
            raise ValueError("compute_contrastive_loss is on but the batch has no pairs; build it with CafeCollator.")
        if not self.args.mask_false_negatives:
            query_groups = doc_groups = None
        world_size = 1
        if self.args.gather_negatives and is_distributed():
            world_size = torch.distributed.get_world_size()
            query, doc = gather_with_grad(query), gather_with_grad(doc)
            if negatives is not None:
                negatives = gather_with_grad(negatives)
            query_groups = None if query_groups is None else gather_no_grad(query_groups)
            doc_groups = None if doc_groups is None else gather_no_grad(doc_groups)
        result = self.contrastive_loss(query, doc, negatives, query_groups, doc_groups)
        self._metrics["loss_con"].append(result.loss.item())
        self._metrics["acc_q2d"].append(result.accuracy_query_to_doc.item())
        self._metrics["acc_d2q"].append(result.accuracy_doc_to_query.item())
        self._metrics["logit_scale"].append(result.logit_scale.item())
        if world_size > 1:
            # Every process computes the same global loss but backpropagates only into its own
            # slice (see `gather_with_grad`); DDP then averages over processes. Gradients are
            # scaled by the world size so the average equals the single-process gradient on the
            # concatenated batch; the value is left unscaled so the logged loss stays comparable.
            result.loss = world_size * result.loss - (world_size - 1) * result.loss.detach()
        return result

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.gradient_cache:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        mini_batches = inputs["mini_batches"]
        for mb in mini_batches:
            self._log_counts(mb)
        args = self.args
        # Set by Trainer's loop; a direct call (e.g. a benchmark) runs one micro-batch per step.
        steps = getattr(self, "current_gradient_accumulation_steps", 1)

        def backward(tensor):
            self.accelerator.backward(tensor / steps)

        result = gradient_cache_step(
            model,
            mini_batches,
            contrastive_fn=self._contrastive if args.compute_contrastive_loss else None,
            lm_weight=args.lm_weight if args.compute_language_loss else 0.0,
            contrastive_weight=args.contrastive_weight,
            backward=backward,
            no_sync=lambda: self.accelerator.no_sync(model),
            lm_denominator=self._lm_denominator,
            share_prefix=args.share_prefix,
        )
        if result.lm_loss is not None:
            self._metrics["loss_lm"].append(result.lm_loss.item())
        return result.loss.to(args.device) / steps

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
        model.model_card_data = card

    def create_model_card(self, *args, **kwargs):
        # Trainer.push_to_hub would write its generic training card over ours: keep cafe's card,
        # which holds the CAFe settings and the transformers / cafe / sentence-transformers usage.
        from .hub import write_model_card

        if self.is_world_process_zero():
            model = self._cafe_model()
            write_model_card(self.args.output_dir, card_data=getattr(model, "model_card_data", None),
                             source=model.name_or_path, tags=getattr(model, "model_tags", None))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
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
        loaded = type(unwrapped).from_pretrained(resume_from_checkpoint, load_processor=False, dtype=unwrapped.dtype)
        unwrapped.load_state_dict(loaded.state_dict(), strict=True)

    def _save(self, output_dir: str | None = None, state_dict=None):
        # A learned temperature belongs to the checkpoint's CAFe settings.
        if self.contrastive_loss.log_logit_scale.requires_grad:
            model = self._cafe_model()
            model.config.cafe = {**model.config.cafe, "contrastive_temperature": self.contrastive_loss.temperature}
        super()._save(output_dir, state_dict)
