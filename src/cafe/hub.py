"""Model card and Hub upload for CAFe checkpoints.

A CAFe checkpoint folder is at once a transformers model (generation), a cafe model (embeddings)
and a sentence-transformers model (see `cafe.export`). `write_model_card` adds the ``README.md``
that says so: Hub metadata (library, pipeline tag, base model, datasets, licence), usage for all
three entry points and the CAFe settings of the checkpoint. `push_folder_to_hub` uploads a folder
with huggingface_hub's standard ``create_repo`` / ``upload_folder``.

Card metadata travels with the checkpoint: a model loaded from a folder (or a cached Hub repo)
whose card was written here keeps its base model, datasets, licence and training settings when it
is saved again, unless ``model.model_card_data`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import logging
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, ModelCard, ModelCardData

    from .modeling import CafeForConditionalGeneration

logger = logging.getLogger(__name__)

# The Hub allows one `pipeline_tag`. Generation is the checkpoint's primary task (it is a stock
# image-text-to-text model); the embedding tasks are listed as tags so the model is found under
# them too (sentence-transformers' own cards use these tag names).
PIPELINE_TAG = "image-text-to-text"
CAFE_TAG = "cafe"
CARD_TAGS = (CAFE_TAG, "sentence-transformers", "sentence-similarity", "feature-extraction", "multimodal-embeddings")
# Licence of the LLaVA-OneVision releases and of the reference CAFe code; override it through
# `CafeModelCardData.license` when the base model or the training data say otherwise.
DEFAULT_LICENSE = "apache-2.0"
# Metadata key holding the training settings, so they survive a load / save round trip.
TRAINING_METADATA_KEY = "cafe_training"


@dataclass
class CafeModelCardData:
    """What the model card needs to know beyond the checkpoint's own config.

    Set it as ``model.model_card_data`` before ``save_pretrained`` / ``push_to_hub`` (a training
    loop does this once), or pass it to `write_model_card`. Every field left empty is taken from
    the card of the checkpoint the model was loaded from, when there is one.

    Args:
        base_model: Hub id of the model this checkpoint was fine-tuned from. Defaults to the Hub id
            the model was loaded from.
        datasets: Hub ids of the training datasets.
        license: Licence identifier for the Hub metadata (default ``"apache-2.0"``).
        language: Language codes.
        tags: Extra Hub tags.
        training: CAFe training settings to publish (loss weights, learning rates, batch size,
            epochs, ...), shown as a table and stored in the card metadata.
        model_name: Title of the card. Defaults to the repository or folder name.
    """

    base_model: str | list[str] | None = None
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    language: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None


# Training arguments worth publishing: CAFe's joint loss (paper Eq. 3) and the optimisation
# recipe. Names follow `CafeTrainingArguments` / `TrainingArguments`; absent ones are skipped.
TRAINING_CARD_FIELDS = (
    "contrastive_weight",
    "lm_weight",
    "compute_contrastive_loss",
    "compute_language_loss",
    "contrastive_temperature",
    "learnable_logit_scale",
    "mask_false_negatives",
    "gather_negatives",
    "contrastive_gradient",
    "gradient_cache",
    "learning_rate",
    "vision_tower_learning_rate",
    "projector_learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "gradient_checkpointing",
    "seed",
)


def training_settings_from_args(args: object, **extra: Any) -> dict[str, Any]:
    """The publishable training settings of a ``CafeTrainingArguments`` (or any object with those
    attribute names), plus `extra` ones (e.g. ``datasets_size=248_000``).

    For ``CafeModelCardData(training=...)``. Adds the contrastive batch size, the number of
    pairs each InfoNCE loss sees: per-device batch x world size when negatives are gathered across
    processes (gradient accumulation adds none).
    """
    settings: dict[str, Any] = {}
    for name in TRAINING_CARD_FIELDS:
        value = getattr(args, name, None)
        if value is None or (name == "max_steps" and value <= 0):
            continue
        value = getattr(value, "value", value)  # enums such as lr_scheduler_type
        settings[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    world_size = getattr(args, "world_size", None)
    if world_size and "per_device_train_batch_size" in settings:
        settings["world_size"] = world_size
        gathered = world_size if getattr(args, "gather_negatives", True) else 1
        settings["contrastive_batch_size"] = settings["per_device_train_batch_size"] * gathered
    settings.update(extra)
    return settings


# ----------------------------------------------------------------------------- locating files
def is_hub_repo_id(name: str | os.PathLike | None) -> bool:
    """Whether `name` reads as a Hub repo id rather than an existing local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name is None or os.path.exists(name):
        return False
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return False
    return "/" in str(name)  # a bare name is more likely a missing local folder than a canonical model


def resolve_checkpoint_file(source: str | os.PathLike | None, filename: str) -> Path | None:
    """Local path of `filename` in a local checkpoint folder or in the Hub cache; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    if source is None or not str(source):
        return None
    if os.path.isdir(source):
        path = Path(source) / filename
        return path if path.is_file() else None
    if is_hub_repo_id(source):
        cached = try_to_load_from_cache(str(source), filename)
        if isinstance(cached, str):
            return Path(cached)
    return None


# ----------------------------------------------------------------------------- card data
def card_data_from_source(source: str | os.PathLike | None) -> CafeModelCardData:
    """Card data recorded in the card of the checkpoint `source` (a folder or a cached Hub repo).

    Only the licence is taken from a card that cafe did not write (a stock backbone's card): its
    datasets and base model describe the backbone's training, not this checkpoint's.
    """
    from huggingface_hub import ModelCard

    readme = resolve_checkpoint_file(source, "README.md")
    if readme is None:
        return CafeModelCardData()
    try:
        metadata = ModelCard.load(readme).data.to_dict()
    except Exception:  # a card is documentation: a malformed one must never block saving
        return CafeModelCardData()
    license_ = metadata.get("license")
    if CAFE_TAG not in (metadata.get("tags") or []):
        return CafeModelCardData(license=license_)
    return CafeModelCardData(
        base_model=metadata.get("base_model"),
        datasets=_as_list(metadata.get("datasets")),
        license=license_,
        language=_as_list(metadata.get("language")),
        tags=[tag for tag in _as_list(metadata.get("tags")) if tag not in CARD_TAGS],
        training=dict(metadata.get(TRAINING_METADATA_KEY) or {}),
    )


def resolve_card_data(
    card_data: CafeModelCardData | None, source: str | os.PathLike | None = None
) -> CafeModelCardData:
    """Fill the empty fields of `card_data` from the source checkpoint and the defaults."""
    given = card_data if card_data is not None else CafeModelCardData()
    inherited = card_data_from_source(source)
    # A model loaded by Hub id was fine-tuned from (or is) that repo; a local folder says nothing.
    base_model = given.base_model or (str(source) if is_hub_repo_id(source) else inherited.base_model)
    return CafeModelCardData(
        base_model=base_model,
        datasets=list(given.datasets or inherited.datasets),
        license=given.license or inherited.license or DEFAULT_LICENSE,
        language=list(given.language or inherited.language),
        tags=_unique([*inherited.tags, *given.tags]),
        training=dict(given.training or inherited.training),
        model_name=given.model_name,
    )


# ----------------------------------------------------------------------------- the card
def build_model_card(config: dict[str, Any], *, model_id: str, card_data: CafeModelCardData) -> ModelCard:
    """Render the ``README.md`` of a CAFe checkpoint as a ``huggingface_hub.ModelCard``.

    Args:
        config: The checkpoint's ``config.json`` as a dict (``cafe`` key included).
        model_id: Hub id (or local path) the usage snippets load.
        card_data: Resolved card data (see `resolve_card_data`).
    """
    from huggingface_hub import ModelCard

    cafe = config.get("cafe") or {}
    model_type = config.get("model_type")
    architecture = (config.get("architectures") or ["AutoModelForImageTextToText"])[0]
    metadata = _card_metadata(card_data, "transformers", [*CARD_TAGS, *([model_type] if model_type else [])])
    name = card_data.model_name or Path(str(model_id).rstrip("/")).name or "CAFe model"
    # The Hub accepts one base model or a list (merges); the text names the first.
    first_base = _as_list(card_data.base_model)[0] if card_data.base_model else None
    base = f"[{first_base}](https://huggingface.co/{first_base})" if first_base else None
    sections = [
        f"# {name}",
        _INTRO.format(
            origin=f" fine-tuned from {base}" if base else "",
            datasets=", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in card_data.datasets)
            or "not recorded",
        ),
        _USAGE.format(model_id=model_id, architecture=architecture),
        _settings_section(cafe),
        _training_section(card_data.training),
        _CITATION,
    ]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def _card_metadata(data: CafeModelCardData, library_name: str, tags: list[str]) -> ModelCardData:
    """The card's YAML metadata: `tags` first, then the card data's own."""
    from huggingface_hub import ModelCardData

    # Training settings ride in the card's metadata under their own key (ModelCardData keeps extras).
    extra: dict[str, Any] = {TRAINING_METADATA_KEY: data.training} if data.training else {}
    return ModelCardData(
        base_model=data.base_model,
        datasets=data.datasets or None,
        language=data.language or None,
        library_name=library_name,
        license=data.license,
        pipeline_tag=PIPELINE_TAG,
        tags=_unique([*tags, *data.tags]),
        **extra,
    )


def write_model_card(
    save_directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    card_data: CafeModelCardData | None = None,
    source: str | os.PathLike | None = None,
    tags: list[str] | None = None,
    model_id: str | None = None,
) -> Path:
    """Write ``README.md`` into a saved CAFe checkpoint folder and return its path.

    Args:
        save_directory: Folder holding the checkpoint (its ``config.json`` is read).
        repo_id: Hub id used in the usage snippets; defaults to `model_id`.
        card_data: Card data; empty fields are inherited from `source`, then defaulted.
        source: Where the model was loaded from (``model.name_or_path``): a folder or a Hub id.
            Defaults to `save_directory` itself, so re-writing a card keeps its metadata.
        tags: Extra Hub tags.
        model_id: Path the usage snippets load when there is no `repo_id`; defaults to
            `save_directory` (pass the final path when writing into a staging folder).
    """
    save_directory = Path(save_directory)
    config = json.loads((save_directory / "config.json").read_text(encoding="utf-8"))
    data = resolve_card_data(card_data, source if source is not None else save_directory)
    if tags:
        data = dataclasses.replace(data, tags=_unique([*data.tags, *tags]))
    if repo_id is not None and data.base_model == repo_id:
        # A repo cannot be its own base model (a checkpoint re-uploaded where it was loaded from):
        # keep the base recorded in that repo's card, if it is in the local cache.
        data = dataclasses.replace(data, base_model=card_data_from_source(repo_id).base_model)
    card = build_model_card(config, model_id=repo_id or model_id or str(save_directory), card_data=data)
    path = save_directory / "README.md"
    card.save(path)
    return path


def write_adapter_card(
    save_directory: str | os.PathLike,
    *,
    base_model: str,
    cafe: dict[str, Any],
    card_data: CafeModelCardData | None = None,
    model_id: str | None = None,
) -> Path:
    """Write ``README.md`` into a PEFT adapter folder saved from a CAFe fine-tune (over PEFT's
    placeholder card) and return its path.

    Args:
        save_directory: The adapter folder.
        base_model: The base model the adapter applies to (``base_model_name_or_path``).
        cafe: The CAFe settings the adapter was trained with (``config.cafe``).
        card_data: Card data; empty fields are inherited from the base model's card.
        model_id: Path or Hub id the usage snippets load; defaults to `save_directory`.
    """
    from huggingface_hub import ModelCard

    from .configuration import ADAPTER_SETTINGS_NAME

    save_directory = Path(save_directory)
    data = resolve_card_data(card_data, base_model)
    model_id = model_id or str(save_directory)
    first_base = _as_list(data.base_model)[0] if data.base_model else None
    metadata = _card_metadata(data, "peft", [CAFE_TAG, "lora", "peft"])
    base = f"[{first_base}](https://huggingface.co/{first_base})" if first_base else f"`{base_model}`"
    name = data.model_name or Path(model_id.rstrip("/")).name or "CAFe adapter"
    sections = [
        f"# {name}",
        _ADAPTER_INTRO.format(base=base, settings_file=ADAPTER_SETTINGS_NAME),
        _ADAPTER_USAGE.format(model_id=model_id, settings_file=ADAPTER_SETTINGS_NAME),
        _settings_section(
            cafe,
            f"Stored in `{ADAPTER_SETTINGS_NAME}` (the base model's `config.cafe` as trained, full templates included).",
        ),
        _training_section(data.training),
        _CITATION,
    ]
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    path = save_directory / "README.md"
    card.save(path)
    return path


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """A PEFT adapter save (``adapter_config.json``, no model ``config.json``)."""
    return (Path(folder) / "adapter_config.json").is_file() and not (Path(folder) / "config.json").is_file()


def rewrite_adapter_card(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    card_data: CafeModelCardData | None = None,
    tags: list[str] | None = None,
) -> Path:
    """`write_adapter_card` again for an adapter folder about to be uploaded to `repo_id`: the
    snippets load the repo; base model, settings and training are read back from the folder."""
    from .configuration import ADAPTER_SETTINGS_NAME

    folder = Path(folder)
    base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    settings = folder / ADAPTER_SETTINGS_NAME
    cafe = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else {}
    # The folder's own card holds the training settings and metadata cafe wrote at save time.
    data = resolve_card_data(card_data, folder)
    if tags:
        data = dataclasses.replace(data, tags=_unique([*data.tags, *tags]))
    return write_adapter_card(folder, base_model=str(base or ""), cafe=cafe, card_data=data, model_id=repo_id)


# ----------------------------------------------------------------------------- upload
def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    card_data: CafeModelCardData | None = None,
    tags: list[str] | None = None,
) -> CommitInfo:
    """Upload a saved CAFe checkpoint folder to the Hub; returns huggingface_hub's ``CommitInfo``.

    The repository is created if needed, the card is rewritten with the final repo id in its
    snippets (its metadata is kept), then the folder goes up in one commit through
    ``HfApi.upload_folder``. Use this for folders written by a training run; models have
    ``model.push_to_hub(repo_id)``.

    Pickles are never uploaded (``training_args.bin``, ``optimizer.pt``, ``rng_state.pth``,
    ``*.pkl``, any ``*.bin`` that is a pickle): loading one runs arbitrary code, and a CAFe
    checkpoint needs none. A folder whose weights exist only as pickles is refused.
    """
    from huggingface_hub import HfApi

    pickles = find_pickles(folder)
    weights = [name for name in pickles if fnmatch.fnmatchcase(Path(name).name, _PICKLED_WEIGHTS)]
    if weights and not any(Path(folder).glob("*.safetensors")):
        raise ValueError(
            f"{folder} holds weights as pickles ({', '.join(weights)}), which are not uploaded (loading a pickle "
            "runs code). Load the model and save it again with save_pretrained, which writes safetensors."
        )
    if pickles:
        logger.warning(
            "Not uploading %d pickle file(s) of %s: %s. Loading a pickle runs code; the checkpoint does not need them.",
            len(pickles),
            folder,
            ", ".join(pickles),
        )
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    if is_adapter_folder(folder):
        rewrite_adapter_card(folder, repo_id=repo_id, card_data=card_data, tags=tags)
    else:
        write_model_card(folder, repo_id=repo_id, card_data=card_data, source=folder, tags=tags)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or "Upload CAFe model",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
        # The files found above by name, plus the extensions (any case of them is found above).
        ignore_patterns=[glob.escape(name) for name in pickles] + list(PICKLE_PATTERNS),
    )


# File name patterns of pickles (``*.bin`` files are pickles or not: they are inspected).
PICKLE_PATTERNS = ("*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
_PICKLED_WEIGHTS = "*_model*.bin"  # pytorch_model.bin, adapter_model.bin and their shards


def find_pickles(folder: str | os.PathLike) -> list[str]:
    """Paths (relative, ``/``-separated) of the pickle files under `folder`.

    By extension (``.pt``, ``.pth``, ``.pkl``, ``.pickle``, ``.ckpt``, in any case), and ``.bin``
    files by content: a pickle stream (protocol 2+) or a ``torch.save`` zip archive, which holds
    one. Other ``.bin`` files (raw arrays, tokenizer data) are not pickles.
    """
    folder = Path(folder)
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = path.name.lower()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in PICKLE_PATTERNS) or (
            name.endswith(".bin") and _is_pickle(path)
        ):
            found.append(path.relative_to(folder).as_posix())
    return found


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".pkl") for name in archive.namelist())
    return False


def push_to_hub(
    model: CafeForConditionalGeneration, repo_id: str, *, max_shard_size: int | str = "50GB", **kwargs: Any
) -> CommitInfo:
    """Save `model` (weights, processor, sentence-transformers files, card) and upload that folder.

    Args:
        model: A `CafeForConditionalGeneration`.
        repo_id: Target repository.
        max_shard_size: Passed to ``save_pretrained``.
        **kwargs: Passed to `push_folder_to_hub` (``commit_message``, ``private``, ``token``,
            ``revision``, ``create_pr``, ``tags``, ...).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        # The card's metadata is carried over from the folder; the title is not metadata.
        kwargs.setdefault("card_data", getattr(model, "model_card_data", None))
        return push_folder_to_hub(folder, repo_id, **kwargs)


# ----------------------------------------------------------------------------- card text
_INTRO = """\
A [CAFe](https://arxiv.org/abs/2503.19900) (contrastive-autoregressive fine-tuning) vision-language
model{origin}. One set of weights both **generates** (captions, answers, as the base VLM) and
**embeds** images, texts and image+text inputs for retrieval: the embedding is the last-layer
hidden state of the final token under the CAFe embedding prompt (see [CAFe settings](#cafe-settings)),
rotated by the folder's `Dense` module if it has one (`fit_embedding_rotation`, for `truncate_dim`).

The repository is a stock transformers checkpoint (no custom code) that also loads in
[sentence-transformers](https://sbert.net) with its standard modules, and in
[cafe](https://pypi.org/project/cafe-vlm/) (`pip install cafe-vlm`).

Training data: {datasets}."""

_USAGE = """\
## Usage

### Generation (transformers)

```python
from PIL import Image
from transformers import AutoProcessor, {architecture}

model_id = "{model_id}"
model = {architecture}.from_pretrained(model_id, device_map="auto")
processor = AutoProcessor.from_pretrained(model_id)

image = Image.open("photo.jpg")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe this image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device, model.dtype)
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
```

### Embeddings (cafe: `encode` / `get_embeddings`)

```python
from PIL import Image
from cafe import CafeForConditionalGeneration

model_id = "{model_id}"
model = CafeForConditionalGeneration.from_pretrained(model_id, device_map="auto")

image = Image.open("photo.jpg")
# Strings, PIL images and {{"image": ..., "text": ...}} dicts; [N, hidden] float32, unit norm.
embeddings = model.encode([image, "a photo of a cat", {{"image": image, "text": "What is in the picture?"}}])
print(embeddings @ embeddings.T)

# get_embeddings embeds an already processed batch (e.g. inside a training or evaluation loop).
processor = model.processor
messages = [{{"role": "user", "content": [{{"type": "image"}}]}}]
prompt = processor.apply_chat_template(messages, chat_template=model.embedding_chat_template)
batch = processor(images=[image], text=[prompt], return_tensors="pt").to(model.device, model.dtype)
image_embedding = model.get_embeddings(**batch)
```

### Embeddings (sentence-transformers, no cafe needed)

```python
from PIL import Image
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{model_id}")

image = Image.open("photo.jpg")
document_embeddings = model.encode_document([image, "A cat sleeping on a sofa."])
query_embeddings = model.encode_query(["a photo of a cat"])
print(model.similarity(query_embeddings, document_embeddings))
# Image+text inputs are dicts; a task instruction (MMEB style) is a prompt.
embeddings = model.encode(
    [{{"image": image, "text": "What is in the picture?"}}],
    prompt="Represent the given image with the following question: ",
)
```

sentence-transformers loads the backbone without its LM head, so transformers logs the unused
`lm_head` weight as `UNEXPECTED` in its load report: that is expected, the head is kept for
generation. Do not call `SentenceTransformer.save` into this folder: it writes the backbone only."""

_ADAPTER_INTRO = """\
A LoRA adapter from a [CAFe](https://arxiv.org/abs/2503.19900) (contrastive-autoregressive
fine-tuning) run on {base}: with it the base model both **generates** and **embeds** images, texts
and image+text inputs for retrieval. The folder holds the adapter weights (PEFT layout) and the CAFe
settings it was trained with (embedding prompts, temperature, Matryoshka sizes) in
`{settings_file}`; the base model's weights are not in it."""

_ADAPTER_USAGE = """\
## Usage

```python
from cafe import CafeForConditionalGeneration

# The base model with the CAFe settings the adapter was trained with, and the adapter merged in.
model = CafeForConditionalGeneration.from_pretrained("{model_id}")
embeddings = model.encode(["a photo of a cat", {{"image": "photo.jpg", "text": "What is in the picture?"}}])
```

Generation works on the same model (`model.generate(...)`, see the base model's card). The merged
model saves as a full checkpoint that loads in stock transformers and in sentence-transformers:

```python
from cafe import CafeForConditionalGeneration

CafeForConditionalGeneration.from_pretrained("{model_id}").save_pretrained("merged")
```

To keep the adapter separate (to train it further, or switch it off with `disable_adapter()`),
`CafeForConditionalGeneration.from_pretrained("{model_id}", merge_adapter=False)` returns the
`peft.PeftModel` holding it, on the base model with the same settings."""

_CITATION = """\
## Citation

```bibtex
@article{yu2025cafe,
  title={CAFe: Unifying Representation and Generation with Contrastive-Autoregressive Finetuning},
  author={Yu, Hao and Zhao, Zhuokai and Yan, Shen and Korycki, Lukasz and Wang, Jianyu and He, Baosheng and Liu, Jiayi and Zhang, Lizhu and Fan, Xiangjun and Yu, Hanchao},
  journal={arXiv preprint arXiv:2503.19900},
  year={2025}
}
```"""


_CHECKPOINT_SETTINGS = (
    "Stored in `config.json` under `cafe`; the full embedding chat template is `cafe.embedding_chat_template` "
    "(also in `sentence_bert_config.json`)."
)


def _settings_section(cafe: dict[str, Any], where: str = _CHECKPOINT_SETTINGS) -> str:
    rows = [
        ("system prompt", cafe.get("system_prompt")),
        ("image prompt", cafe.get("image_prompt")),
        ("text prompt", cafe.get("text_prompt")),
        ("image+text prompt", cafe.get("multimodal_prompt")),
        ("pooling", cafe.get("pooling")),
        ("L2-normalised", cafe.get("normalize")),
        ("contrastive temperature", cafe.get("contrastive_temperature")),
        ("learnable logit scale", cafe.get("learnable_logit_scale")),
    ]
    return f"## CAFe settings\n\n{where}\n\n" + _table(
        ("setting", "value"), [(name, value) for name, value in rows if value is not None]
    )


def _training_section(training: dict[str, Any]) -> str:
    if not training:
        return "## Training\n\nNo training settings were recorded with this checkpoint."
    return "## Training\n\n" + _table(("setting", "value"), sorted(training.items()))


def _table(header: tuple[str, str], rows: Iterable[tuple[str, Any]]) -> str:
    def cell(value: Any) -> str:
        text = json.dumps(value) if isinstance(value, str) else str(value)
        return text.replace("|", "\\|").replace("\n", "\\n")

    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {name} | `{cell(value)}` |" for name, value in rows]
    return "\n".join(lines)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
