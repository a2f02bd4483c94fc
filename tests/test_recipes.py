"""The recipes in examples/configs/ parse into cafe's arguments and state the batch they promise."""

import json
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from cafe import CafeTrainingArguments
from cafe.training import DataArguments, ModelArguments, parse_arguments

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
RECIPES = sorted(p for p in CONFIGS.iterdir() if p.suffix in (".json", ".yaml") and not p.name.startswith("accelerate"))


def parse(path, tmp_path):
    """Parse a recipe as `cafe train` does, on this GPU-less machine (bf16 recipes need use_cpu here)."""
    copy = tmp_path / path.name
    if path.suffix == ".json":
        copy.write_text(json.dumps({**json.loads(path.read_text()), "use_cpu": True}))
    else:
        copy.write_text(path.read_text() + "use_cpu: true\n")
    parser = HfArgumentParser((ModelArguments, DataArguments, CafeTrainingArguments))
    return parse_arguments(parser, [str(copy)])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe, tmp_path):
    _, _, args = parse(recipe, tmp_path)
    assert args.compute_contrastive_loss and args.compute_language_loss


@pytest.mark.parametrize("name", ["paper_scale_0.5b_8gpu.yaml", "paper_scale_7b_8gpu.yaml"])
def test_paper_scale_recipes_reach_512_pairs_at_the_papers_balance(name, tmp_path):
    _, _, args = parse(CONFIGS / name, tmp_path)
    assert args.per_device_train_batch_size * 8 == 512  # the paper's 2 x 256
    assert args.gradient_cache and args.per_device_train_batch_size % args.gradient_cache_mini_batch_size == 0
    # The paper's code at W = 256 with con_weight 10: an effective 10 / 256 on the global loss.
    assert args.contrastive_gradient == "exact" and args.contrastive_weight == pytest.approx(10 / 256)
    assert args.gradient_accumulation_steps == 2


def test_a_missing_run_file_is_a_clear_error(tmp_path):
    parser = HfArgumentParser((ModelArguments, DataArguments, CafeTrainingArguments))
    with pytest.raises(FileNotFoundError, match="Run configuration not found"):
        parse_arguments(parser, [str(tmp_path / "nope.yaml")])
