"""cafe: contrastive-autoregressive fine-tuning of vision-language models on the Hugging Face stack."""

from .collator import CafeCollator
from .configuration import CafeSettings
from .hub import CafeModelCardData
from .losses import ContrastiveLoss, lm_loss_at_supervised_positions
from .modeling import CafeForConditionalGeneration, CafeForwardOutput, last_token_pool
from .prompting import build_embedding_chat_template
from .trainer import CafeTrainer, CafeTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "CafeCollator",
    "CafeForConditionalGeneration",
    "CafeForwardOutput",
    "CafeModelCardData",
    "CafeSettings",
    "CafeTrainer",
    "CafeTrainingArguments",
    "ContrastiveLoss",
    "build_embedding_chat_template",
    "last_token_pool",
    "lm_loss_at_supervised_positions",
]
