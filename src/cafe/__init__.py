"""cafe: contrastive-autoregressive fine-tuning of vision-language models on the Hugging Face stack."""

from .configuration import CafeSettings
from .modeling import CafeForConditionalGeneration, last_token_pool
from .prompting import build_embedding_chat_template

__version__ = "0.1.0"

__all__ = [
    "CafeForConditionalGeneration",
    "CafeSettings",
    "build_embedding_chat_template",
    "last_token_pool",
]
