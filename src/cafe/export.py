"""Make a CAFe checkpoint folder a sentence-transformers model too, with stock modules only.

sentence-transformers 6 builds a model from the ``modules.json`` of a folder, and any module class
outside the ``sentence_transformers`` package needs ``trust_remote_code=True``, even when it comes
from an installed package. A custom CAFe module would therefore not be a drop-in. None is needed:
the whole CAFe embedding recipe is expressible with stock modules (three, four with a rotation),

``Transformer``
    ``AutoModel`` of the checkpoint (for LLaVA-OneVision: ``LlavaOnevisionModel``, the backbone
    without the LM head; exactly ``CafeForConditionalGeneration.model``). Every input is rendered
    through the CAFe embedding chat template, handed over as
    ``processing_kwargs["chat_template"]["chat_template"]`` so the processor's own (generation)
    template is left untouched. Its output is the last-layer hidden state.
``Pooling(pooling_mode="lasttoken")``
    The hidden state of the last non-padding token: the final ``<|im_end|>`` of the empty assistant
    turn, as in `CafeForConditionalGeneration.get_embeddings`.
``Dense`` (only with an embedding rotation)
    ``bias=False``, identity activation: the orthogonal matrix of
    `CafeForConditionalGeneration.fit_embedding_rotation` (see `cafe.rotation`), so that a
    ``truncate_dim`` prefix holds the data's principal directions. Its weights live only in this
    module's folder (``2_Dense``), which `CafeForConditionalGeneration.from_pretrained` reads back.
``Normalize``
    L2 normalisation, present when ``config.cafe["normalize"]`` is set.

A model trained with Matryoshka sizes (``config.cafe["matryoshka_dims"]``) embeds at each of them
on its own: ``SentenceTransformer(folder, truncate_dim=128)`` (or ``encode(..., truncate_dim=128)``)
keeps the first 128 dimensions. The sizes are recorded as ``matryoshka_dims`` in
``config_sentence_transformers.json`` (sentence-transformers ignores the key; it documents which
truncations were trained). No default ``truncate_dim`` is written: the full size stays the default.
Quantised vectors need nothing from the folder either: ``encode(..., precision="int8" | "uint8" |
"binary" | "ubinary")`` or ``sentence_transformers.quantization.quantize_embeddings``.

The ``Transformer`` module is stored "in root": it reads ``config.json``, the weights and the
processor files of the folder itself. The weights are stored once, and the folder remains a full
generation checkpoint (LM head included) that stock transformers loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedConfig

logger = logging.get_logger(__name__)

# The files (and folders) this module writes, relative to the checkpoint folder.
POOLING_DIR = "1_Pooling"
DENSE_DIR = "2_Dense"  # only with an embedding rotation; Normalize then follows as "3_Normalize"
MODULES_FILE = "modules.json"
TRANSFORMER_CONFIG_FILE = "sentence_bert_config.json"
SENTENCE_TRANSFORMERS_CONFIG_FILE = "config_sentence_transformers.json"

# CAFe's zero-shot retrieval uses no task instruction: queries and documents differ only through
# the modality suffix of the embedding template. Empty prompts keep `encode_query` /
# `encode_document` equal to `encode` until a checkpoint is saved with prompts of its own.
DEFAULT_PROMPTS: dict[str, str] = {"query": "", "document": ""}

# What the folder needs from the reader's install: `processing_kwargs["chat_template"]` and the
# message modality of the Transformer module arrived in sentence-transformers 6, and they render
# through transformers 5 processors. Declared so that older installs fail with a clear message.
REQUIREMENTS: dict[str, dict[str, str]] = {
    "sentence_transformers": {
        "specifier": ">=6.0",
        "reason": "renders inputs through the CAFe embedding chat template (processing_kwargs['chat_template'])",
    },
    "transformers": {"specifier": ">=5.0", "reason": "loads the backbone and its multimodal processor"},
}


def transformer_module_config(config: PreTrainedConfig) -> dict[str, Any]:
    """The ``sentence_bert_config.json`` content of the ``Transformer`` module of a CAFe checkpoint.

    Args:
        config: The model's ``PretrainedConfig`` (``config.cafe`` holds the embedding template).
    """
    from sentence_transformers.base.modules import Transformer

    cafe = getattr(config, "cafe", None) or {}
    template = cafe.get("embedding_chat_template")
    if not template:
        raise ValueError(
            "config.cafe has no 'embedding_chat_template'; save the model through "
            "CafeForConditionalGeneration so that the CAFe settings are filled in."
        )
    # Every input kind the CAFe template understands. Plain texts, images and videos are
    # converted into messages by the Transformer module (because "message" is listed); image+text
    # and video+text dicts are accepted through "message" as well. A template written before
    # video support has no video placeholder: video stays off for it (a video would be dropped).
    last_hidden_state = {"method": "forward", "method_output_name": "last_hidden_state"}
    modalities = ("text", "image", "video") if "'video'" in template else ("text", "image")
    module_config = {
        "transformer_task": "feature-extraction",
        "modality_config": {
            **{modality: dict(last_hidden_state) for modality in modalities},
            "message": {**last_hidden_state, "format": "structured"},
        },
        "module_output_name": "token_embeddings",
        "processing_kwargs": {
            "chat_template": {"chat_template": template},
            # sentence-transformers passes no position ids, so the backbone numbers positions from
            # the first column. With right padding those are the positions of the unpadded
            # sequence, which is what `get_embeddings` uses (attention-mask based position ids):
            # the two paths then agree exactly, whatever padding side the tokenizer was saved with.
            "text": {"padding_side": "right"},
        },
        # Packing text-only batches for flash-attention (sentence-transformers' "unpadding") is not
        # verified for LLaVA-style forwards; the padded path is the one tested against
        # `get_embeddings`.
        "unpad_inputs": False,
    }
    unknown = set(module_config) - set(Transformer.config_keys)
    if unknown:  # the installed sentence-transformers would ignore these keys; fail loudly instead
        raise RuntimeError(
            f"sentence-transformers' Transformer module does not know the config keys {sorted(unknown)}."
        )
    return module_config


def write_sentence_transformers_files(
    save_directory: str | os.PathLike,
    config: PreTrainedConfig,
    *,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    rotation: torch.Tensor | None = None,
) -> list[Path]:
    """Write the sentence-transformers files next to a saved CAFe checkpoint.

    After this, ``SentenceTransformer(save_directory)`` loads the folder with stock modules only (no
    ``trust_remote_code``, no cafe import) and embeds strings, PIL images and
    ``{"image": ..., "text": ...}`` dicts as `CafeForConditionalGeneration.encode` does.

    Args:
        save_directory: A folder that already holds the transformers checkpoint and processor.
        config: The model's ``PretrainedConfig``.
        prompts: Named task instructions for ``encode(prompt_name=...)``, ``encode_query`` (``"query"``)
            and ``encode_document`` (``"document"``). sentence-transformers passes a prompt as a
            system turn, which the CAFe template places before the text (MMEB style), exactly like
            ``encode(..., instruction=prompt)`` in cafe. Defaults to empty query/document prompts.
        default_prompt_name: Prompt applied by ``encode`` when none is given.
        rotation: The model's `embedding_rotation` (``[hidden, hidden]``), written as a ``Dense``
            module before ``Normalize``; None writes none.

    Returns:
        The paths written.
    """
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    save_directory = Path(save_directory)
    prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts {sorted(prompts)}.")
    cafe = getattr(config, "cafe", None) or {}
    written = []

    def write_json(name: str, content: Any) -> None:
        path = save_directory / name
        path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)

    write_json(TRANSFORMER_CONFIG_FILE, transformer_module_config(config))

    # Pooling and Normalize are built and saved by sentence-transformers itself, so their config
    # files are in the format the installed version reads.
    hidden_size = config.get_text_config().hidden_size
    modules: list[tuple[str, type, Any]] = [
        ("", Transformer, None),
        (POOLING_DIR, Pooling, Pooling(hidden_size, pooling_mode="lasttoken")),
    ]
    if rotation is not None:
        dense = Dense(
            hidden_size,
            hidden_size,
            bias=False,
            activation_function=torch.nn.Identity(),
            init_weight=rotation.detach().to("cpu", torch.float32).clone(),
        )
        modules.append((DENSE_DIR, Dense, dense))
    if cafe.get("normalize", True):
        modules.append((f"{len(modules)}_Normalize", Normalize, Normalize()))
    for folder, _, module in modules:
        if module is not None:
            (save_directory / folder).mkdir(parents=True, exist_ok=True)
            module.save(str(save_directory / folder))
            written.extend(sorted((save_directory / folder).iterdir()))

    # The class references sentence-transformers itself would write (module path + class name).
    write_json(
        MODULES_FILE,
        [
            {"idx": idx, "name": str(idx), "path": folder, "type": f"{cls.__module__}.{cls.__name__}"}
            for idx, (folder, cls, _) in enumerate(modules)
        ],
    )
    write_json(
        SENTENCE_TRANSFORMERS_CONFIG_FILE,
        {
            "model_type": "SentenceTransformer",
            "__version__": {
                "sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
            },
            "requirements": REQUIREMENTS,
            "prompts": prompts,
            "default_prompt_name": default_prompt_name,
            # CAFe embeddings are compared by cosine (the contrastive loss uses normalised vectors).
            "similarity_fn_name": "cosine",
            **({"matryoshka_dims": list(cafe["matryoshka_dims"])} if cafe.get("matryoshka_dims") else {}),
        },
    )
    return written


def read_sentence_transformers_prompts(source: str | os.PathLike | None) -> tuple[dict[str, str], str | None] | None:
    """The ``(prompts, default_prompt_name)`` of the checkpoint a model was loaded from, if it has them.

    Args:
        source: A local folder or a Hub id (looked up in the local cache only, never downloaded).
    """
    from .hub import resolve_checkpoint_file

    path = resolve_checkpoint_file(source, SENTENCE_TRANSFORMERS_CONFIG_FILE)
    if path is None:
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return dict(saved.get("prompts") or {}), saved.get("default_prompt_name")


def read_embedding_rotation(source: str | os.PathLike, **hub_kwargs: Any) -> torch.Tensor | None:
    """The rotation stored in the ``Dense`` module of a saved CAFe checkpoint, or None if it has none.

    Args:
        source: A local folder or a Hub id (downloaded like the model's own files).
        **hub_kwargs: ``cache_dir``, ``revision``, ``token``, ``local_files_only``, ``subfolder``...
    """
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    def fetch(filename: str) -> str | None:
        return cached_file(
            str(source),
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )

    modules_file = fetch(MODULES_FILE)
    if modules_file is None:
        if not os.path.isdir(source):
            from huggingface_hub import try_to_load_from_cache

            subfolder = hub_kwargs.get("subfolder") or ""
            known = try_to_load_from_cache(
                str(source),
                f"{subfolder}/{MODULES_FILE}" if subfolder else MODULES_FILE,
                cache_dir=hub_kwargs.get("cache_dir"),
                revision=hub_kwargs.get("revision"),
            )
            if known is None:  # neither downloaded nor known to be absent: offline and never fetched
                logger.warning(
                    f"Could not read {MODULES_FILE} of {source} (offline, and not in the cache): an embedding "
                    "rotation stored in the repository would not be applied. Load it once with a connection."
                )
        return None
    modules = json.loads(Path(modules_file).read_text(encoding="utf-8"))
    paths = [str(m.get("path") or "") for m in modules]
    dense = [i for i, m in enumerate(modules) if str(m.get("type", "")).endswith(".Dense")]
    if not dense:
        return None
    folder = paths[dense[0]]
    config_file, weights_file = fetch(f"{folder}/config.json"), fetch(f"{folder}/model.safetensors")
    if config_file is None or weights_file is None:
        raise ValueError(
            f"{source} lists a Dense module in {MODULES_FILE} but {folder}/config.json or "
            f"{folder}/model.safetensors is missing: save the model again with save_pretrained."
        )
    config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    # The one Dense layout cafe writes and applies: right after Pooling, square, no bias, no
    # activation, no residual, on the sentence embedding. Anything else would embed differently in
    # sentence-transformers than in cafe.
    is_rotation = (
        len(dense) == 1
        and dense[0] == 2
        and POOLING_DIR in paths
        and paths.index(POOLING_DIR) == 1
        and config.get("bias", True) is False
        and config.get("in_features") == config.get("out_features")
        and str(config.get("activation_function", "")).endswith(".Identity")
        and not config.get("use_residual", False)
        and config.get("module_input_name", "sentence_embedding") == "sentence_embedding"
        and config.get("module_output_name", "sentence_embedding") in (None, "sentence_embedding")
    )
    if not is_rotation:
        raise ValueError(
            f"The Dense module of {source} ({folder}) is not an embedding rotation (one square Dense right after "
            "Pooling, bias=False, identity activation, no residual), the only Dense module CAFe models apply; load "
            "this folder with sentence-transformers."
        )
    return load_file(weights_file)["linear.weight"]
