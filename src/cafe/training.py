"""`cafe train`: CAFe fine-tuning from the command line (flags mirror the reference's).

    cafe train --model_name_or_path llava-hf/llava-onevision-qwen2-0.5b-si-hf \\
        --data_path data/train.json --image_folder data/images --output_dir out \\
        --compute_language_loss True --compute_contrastive_loss True --con_weight 10

``--model_name_or_path tiny`` builds the offline tiny checkpoint first (for trying things out).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .trainer import CafeTrainingArguments

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import HfArgumentParser

    from .modeling import CafeForConditionalGeneration
    from .trainer import CafeTrainer

logger = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Hub id or folder of a supported VLM, or 'tiny'."})
    torch_dtype: str | None = field(
        default=None, metadata={"help": "float32 | bfloat16 | float16 (default: checkpoint's)."}
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa (the reference's), eager."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LLM's linear layers."})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    merge_lora: bool = field(
        default=True, metadata={"help": "Save the merged model (a vanilla checkpoint) at the end."}
    )
    freeze_vision_tower: bool = False


@dataclass
class DataArguments:
    data_path: str = field(
        metadata={"help": "JSON / JSONL file(s) (comma-separated), a saved dataset folder or a Hub id."}
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder that image and video paths are relative to."}
    )
    multimodal_input: bool = field(
        default=False, metadata={"help": "Reference flag: (image + question) vs answer pairs."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Longest LM sequence (default: the model's context length)."}
    )
    caption_prompt: str | None = "Describe the image."
    video_caption_prompt: str | None = field(
        default=None, metadata={"help": "LM turn of (video, text) pairs (default: caption_prompt with 'video')."}
    )
    video_num_frames: int | None = field(
        default=None, metadata={"help": "Frames per video, LLaVA-OneVision (default: the checkpoint's, else 8). Saved."}
    )
    video_fps: float | None = field(
        default=None, metadata={"help": "Frames per second, Qwen2-VL (default: the checkpoint's, else 2). Saved."}
    )
    missing_images: str = field(default="raise", metadata={"help": "raise | skip (counted and logged; videos too)."})


def load_records(data_path: str) -> Dataset:
    """A `datasets.Dataset` of raw records with a ``record_index`` column (used in error messages)."""
    from datasets import load_dataset, load_from_disk

    paths = [p for p in data_path.split(",") if p]
    if len(paths) == 1 and Path(paths[0]).is_dir() and (Path(paths[0]) / "dataset_info.json").exists():
        dataset = load_from_disk(paths[0])
    elif all(Path(p).suffix in (".json", ".jsonl") for p in paths):
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"Data file(s) not found: {missing}.")
        dataset = load_dataset("json", data_files=paths, split="train")
    else:
        dataset = load_dataset(data_path, split="train")
    if "record_index" in dataset.column_names:
        return dataset
    return dataset.add_column("record_index", list(range(len(dataset))))


def build_trainer(
    model_args: ModelArguments, data_args: DataArguments, training_args: CafeTrainingArguments
) -> CafeTrainer:
    import torch

    from .collator import CafeCollator
    from .configuration import CafeSettings
    from .modeling import CafeForConditionalGeneration
    from .trainer import CafeTrainer

    path: str | Path = model_args.model_name_or_path
    if path == "tiny":
        from .testing import build_tiny_checkpoint

        path = build_tiny_checkpoint(Path(str(training_args.output_dir)) / "base-tiny")
    kwargs = {}
    if model_args.torch_dtype:
        kwargs["dtype"] = getattr(torch, model_args.torch_dtype)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    model: CafeForConditionalGeneration | PeftModel  # a PeftModel once LoRA adapters are added below
    model = CafeForConditionalGeneration.from_pretrained(path, **kwargs)
    processor = model.processor
    if processor is None:
        raise ValueError(f"{path} has no processor files; CAFe training needs the model's processor.")
    # Frame sampling is a model setting (encode must show the frames training showed): saved in config.cafe.
    video = {k: getattr(data_args, k) for k in ("video_num_frames", "video_fps") if getattr(data_args, k) is not None}
    if video:
        model.config.cafe = CafeSettings.from_dict({**model.config.cafe, **video}).to_dict()
    if model_args.freeze_vision_tower:
        for name, param in model.named_parameters():
            if model.parameter_component(name) == "vision":
                param.requires_grad_(False)
    collator = CafeCollator(
        processor,
        model=model,
        image_folder=data_args.image_folder,
        max_length=data_args.max_length,
        multimodal_input=data_args.multimodal_input,
        compute_language_loss=training_args.compute_language_loss,
        compute_contrastive_loss=training_args.compute_contrastive_loss,
        caption_prompt=data_args.caption_prompt,
        video_caption_prompt=data_args.video_caption_prompt,
        missing_images=data_args.missing_images,
        seed=training_args.seed,
    )
    if model_args.use_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=model_args.lora_r,
                lora_alpha=model_args.lora_alpha,
                lora_dropout=model_args.lora_dropout,
                # Only the language model's projections: the vision tower uses other names.
                target_modules=rf".*language_model.*\.({'|'.join(LORA_TARGETS)})",
            ),
        )
    return CafeTrainer(
        model=model,
        args=training_args,
        train_dataset=load_records(data_args.data_path),
        data_collator=collator,
        processing_class=processor,
    )


def save_final_model(trainer: CafeTrainer, model_args: ModelArguments, output_dir: str) -> str:
    """Save the trained model into `output_dir`, replacing what an earlier run left there.

    With LoRA and ``merge_lora`` (default) the adapters are merged first: a vanilla checkpoint.
    Without ``merge_lora`` the folder holds the adapter only (PEFT layout), to be loaded on top of
    its base model. Either way files of an earlier save (an adapter, a merged model's weights)
    are gone, so the folder loads what this run saved.

    Returns:
        A message for the user: what was saved and how to load it.
    """
    from .modeling import _staged_folder

    model = trainer.model
    if model_args.use_lora and model_args.merge_lora:
        merged = model.merge_and_unload()  # type: ignore[union-attr,operator]  # with use_lora: a PeftModel
        merged.save_pretrained(output_dir)  # staged and rank-aware itself
        return _checkpoint_message(output_dir, type(merged).backbone_class().__name__, merged=True)
    rank_local_files = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if model_args.use_lora and trainer.args.should_save and not rank_local_files:
        # PEFT's own save_pretrained writes into the folder as it is, next to an earlier run's
        # merged weights (which transformers would load, with this adapter on top): stage it.
        # FSDP / DeepSpeed write rank-local files under the path each rank is given, so there
        # every rank must get the same path.
        with _staged_folder(output_dir) as staging:
            trainer.save_model(str(staging))
    else:
        trainer.save_model(output_dir)
    base = trainer.accelerator.unwrap_model(model)
    if model_args.use_lora:
        return _adapter_message(output_dir, base.get_base_model().name_or_path)
    return _checkpoint_message(output_dir, type(base).backbone_class().__name__, merged=False)


def _checkpoint_message(output_dir: str, backbone: str, merged: bool) -> str:
    what = "the CAFe checkpoint (LoRA merged)" if merged else "the CAFe checkpoint"
    return (
        f"Saved {what} to {output_dir}. Load it with\n"
        f"  CafeForConditionalGeneration.from_pretrained({output_dir!r})  # cafe: encode + generate\n"
        f"  transformers.{backbone}.from_pretrained({output_dir!r})  # generation, no cafe needed\n"
        f"  SentenceTransformer({output_dir!r})  # embeddings, no cafe needed"
    )


def _adapter_message(output_dir: str, base: str) -> str:
    return (
        f"Saved the LoRA adapter (--merge_lora False) to {output_dir}: adapter weights and the CAFe settings they were "
        f"trained with, on top of the base model {base}. Load it with\n"
        f"  CafeForConditionalGeneration.from_pretrained({output_dir!r})  # the base model, this adapter merged in\n"
        f"  CafeForConditionalGeneration.from_pretrained({output_dir!r}, merge_adapter=False)  # the PeftModel\n"
        "and .save_pretrained(path) on the merged model writes a full checkpoint (stock transformers, SentenceTransformer)."
    )


def parse_arguments(parser: HfArgumentParser, argv: list[str] | None) -> tuple[Any, ...]:
    """Flags, or one JSON / YAML file holding a whole run (keys = flag names; see examples/configs/)."""
    if argv and len(argv) == 1 and Path(argv[0]).suffix in (".json", ".yaml", ".yml"):
        path = Path(argv[0])
        if not path.is_file():
            raise FileNotFoundError(f"Run configuration not found: {str(path)!r}.")
        if path.suffix == ".json":
            return parser.parse_json_file(str(path))
        return parser.parse_yaml_file(str(path))
    return parser.parse_args_into_dataclasses(args=argv)


def train_main(argv: list[str] | None = None) -> str:
    from transformers import HfArgumentParser

    # transformers types the dataclass tuple as DataClassType, which dataclass types satisfy at run time.
    parser = HfArgumentParser((ModelArguments, DataArguments, CafeTrainingArguments))  # type: ignore[arg-type]
    model_args, data_args, training_args = parse_arguments(parser, argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    trainer = build_trainer(model_args, data_args, training_args)
    checkpoint = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=checkpoint)
    final_dir = os.path.join(training_args.output_dir, "final")
    message = save_final_model(trainer, model_args, final_dir)
    if trainer.is_world_process_zero():
        print(message)
    return final_dir
