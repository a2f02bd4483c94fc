"""Supported backbone families, keyed by the checkpoint's ``model_type``.

Adding a family is one small module (see ``llava_onevision.py``, ``qwen2_vl.py`` and
docs/backbones.md): combine `CafeForConditionalGeneration` with the family's transformers class,
say how one image appears in a prompt, how to run its vision encoder once and (if its positions
depend on the images) how to compute an embedding pass's position ids; register it here and give
it a tiny offline checkpoint in `cafe.testing` so the shared test suites run on it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..modeling import CafeForConditionalGeneration

# model_type -> (module, class name). Imported lazily so that `import cafe` stays cheap.
_FAMILIES: dict[str, tuple[str, str]] = {
    "llava_onevision": ("cafe.backbones.llava_onevision", "CafeLlavaOnevisionForConditionalGeneration"),
    "qwen2_vl": ("cafe.backbones.qwen2_vl", "CafeQwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("cafe.backbones.qwen2_vl", "CafeQwen2_5_VLForConditionalGeneration"),
}

BACKBONES_DOC = "docs/backbones.md"


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def get_cafe_class(model_type: str) -> type[CafeForConditionalGeneration]:
    """Return the CAFe class for a checkpoint's ``model_type``, or raise a clear error."""
    if model_type not in _FAMILIES:
        raise ValueError(
            f"cafe does not support the backbone model_type {model_type!r}. Supported: {supported_model_types()}. "
            f"To add a family, combine CafeForConditionalGeneration with its transformers class as described in "
            f"{BACKBONES_DOC} (a small module in cafe/backbones/ plus a tiny test checkpoint)."
        )
    module, name = _FAMILIES[model_type]
    return getattr(importlib.import_module(module), name)
