"""cafe: contrastive-autoregressive fine-tuning of vision-language models on the Hugging Face stack."""

from importlib import metadata as _metadata

from .batch import CafeBatch, EmbeddingSequences, LanguageModelingSequences, MiniBatches
from .collator import CafeCollator, MiniBatchCollator
from .configuration import CafeSettings
from .hub import CafeModelCardData
from .losses import CachedCafeLoss, CafeLoss, CafeLossOutput, ContrastiveLoss, lm_loss_at_supervised_positions
from .modeling import CafeForConditionalGeneration, CafeForwardOutput, last_token_pool
from .prompting import build_embedding_chat_template
from .trainer import CafeTrainer, CafeTrainingArguments

try:  # one source of truth: the version in pyproject.toml, as installed
    __version__ = _metadata.version("cafe-vlm")
except _metadata.PackageNotFoundError:  # a source tree used without installing it
    __version__ = "0+unknown"

__all__ = [
    "CachedCafeLoss",
    "CafeBatch",
    "CafeCollator",
    "CafeForConditionalGeneration",
    "CafeForwardOutput",
    "CafeLoss",
    "CafeLossOutput",
    "CafeModelCardData",
    "CafeSettings",
    "CafeTrainer",
    "CafeTrainingArguments",
    "ContrastiveLoss",
    "EmbeddingSequences",
    "LanguageModelingSequences",
    "MiniBatchCollator",
    "MiniBatches",
    "build_embedding_chat_template",
    "last_token_pool",
    "lm_loss_at_supervised_positions",
]
