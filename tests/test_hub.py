"""Model card (metadata, snippets that run) and push_to_hub through huggingface_hub's API.

No network: uploads go to mocks of ``HfApi.create_repo`` / ``upload_folder`` that record the call
and what the folder held at that moment.
"""

import json
import re
import shutil

import pytest
from huggingface_hub import HfApi, ModelCard, RepoUrl
from PIL import Image

from cafe import CafeForConditionalGeneration
from cafe.hub import CafeModelCardData, resolve_card_data, training_settings_from_args, write_model_card

CARD_DATA = CafeModelCardData(
    base_model="llava-hf/llava-onevision-qwen2-7b-ov-hf",
    datasets=["lmms-lab/LLaVA-OneVision-Data"],
    license="apache-2.0",
    language=["en"],
    training={"contrastive_weight": 10.0, "lm_weight": 1.0, "learning_rate": 1e-5, "epochs": 1},
)


@pytest.fixture(scope="module")
def carded(tiny_checkpoint, tmp_path_factory):
    """A CAFe folder saved with card data."""
    folder = tmp_path_factory.mktemp("cafe-card")
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model.model_card_data = CARD_DATA
    model.save_pretrained(folder)
    return folder


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_card_metadata(carded):
    card = ModelCard.load(carded / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert {"sentence-transformers", "sentence-similarity", "feature-extraction", "cafe"} <= set(data["tags"])
    assert data["base_model"] == CARD_DATA.base_model
    assert data["datasets"] == CARD_DATA.datasets
    assert data["license"] == "apache-2.0"
    assert data["cafe_training"] == CARD_DATA.training


def test_card_shows_three_usages_and_the_cafe_settings(carded):
    text = (carded / "README.md").read_text()
    blocks = _python_blocks(text)
    assert len(blocks) == 3
    generation, embeddings, sentence_transformers = blocks
    assert "LlavaOnevisionForConditionalGeneration.from_pretrained" in generation and ".generate(" in generation
    assert "model.encode(" in embeddings and "model.get_embeddings(" in embeddings
    assert "SentenceTransformer(" in sentence_transformers and "encode_query" in sentence_transformers
    assert "| contrastive temperature | `0.05` |" in text
    assert '| image prompt | `"Compress this image in one word:"` |' in text
    assert "| contrastive_weight | `10.0` |" in text and "| learning_rate | `1e-05` |" in text


def test_card_snippets_run(carded, tmp_path, monkeypatch, capsys):
    """Every snippet of the card runs as written, loading the tiny checkpoint it was written for."""
    folder = shutil.copytree(carded, tmp_path / "model")
    write_model_card(folder, repo_id=str(folder))  # what push_to_hub does with the repo id
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (48, 40), (200, 30, 30)).save("photo.jpg")
    for index, block in enumerate(_python_blocks((folder / "README.md").read_text())):
        namespace = {"__name__": "__main__"}
        exec(compile(block, f"README.md snippet {index}", "exec"), namespace)
        if "embeddings" in namespace and hasattr(namespace["embeddings"], "shape"):
            assert namespace["embeddings"].shape[-1] == 64
    printed = capsys.readouterr().out
    assert "tensor(" in printed  # the similarity matrices were printed


def test_card_metadata_survives_load_and_save(carded, tmp_path):
    model = CafeForConditionalGeneration.from_pretrained(carded)  # no model_card_data set
    model.save_pretrained(tmp_path)
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data["base_model"] == CARD_DATA.base_model
    assert data["datasets"] == CARD_DATA.datasets
    assert data["cafe_training"] == CARD_DATA.training


def test_base_model_defaults_to_the_hub_id_loaded_from():
    data = resolve_card_data(None, source="llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    assert data.base_model == "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
    assert data.license == "apache-2.0"
    assert resolve_card_data(None, source="/no/such/local/folder").base_model is None


def test_a_repo_is_never_its_own_base_model(carded, tmp_path):
    folder = shutil.copytree(carded, tmp_path / "model")
    write_model_card(folder, repo_id="someone/cafe", card_data=CafeModelCardData(base_model="someone/cafe"))
    assert ModelCard.load(folder / "README.md").data.to_dict().get("base_model") is None


def test_training_settings_from_training_arguments(tmp_path):
    from types import SimpleNamespace

    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-5, per_device_train_batch_size=2)
    settings = training_settings_from_args(args, train_samples=248_000)
    assert settings["learning_rate"] == 1e-5 and settings["lr_scheduler_type"] == "linear"
    assert settings["contrastive_batch_size"] == 2 * args.world_size and settings["train_samples"] == 248_000
    cafe_args = SimpleNamespace(
        contrastive_weight=10.0,
        lm_weight=1.0,
        per_device_train_batch_size=2,
        world_size=8,
        gather_negatives=False,
        max_steps=-1,
    )
    settings = training_settings_from_args(cafe_args)
    assert settings == {
        "contrastive_weight": 10.0,
        "lm_weight": 1.0,
        "gather_negatives": False,
        "per_device_train_batch_size": 2,
        "world_size": 8,
        "contrastive_batch_size": 2,
    }


@pytest.fixture()
def hub_calls(monkeypatch):
    """Replace the two Hub endpoints with recorders; the folder is inspected while it exists."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        folder = Path(folder_path)
        calls["upload_folder"] = {
            "repo_id": repo_id,
            "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
            "readme": (folder / "README.md").read_text(),
            **kwargs,
        }
        return "commit-info"

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' card-fetching push path must not run")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr("transformers.modeling_utils.create_and_tag_model_card", refuse)
    return calls


def test_push_to_hub_uploads_the_full_folder(cafe_model, hub_calls):
    cafe_model.model_card_data = CARD_DATA
    result = cafe_model.push_to_hub("someone/cafe-tiny", private=True, commit_message="CAFe tiny", tags=["demo"])
    assert result == "commit-info"
    assert hub_calls["create_repo"] == {"repo_id": "someone/cafe-tiny", "private": True, "exist_ok": True}
    upload = hub_calls["upload_folder"]
    assert upload["repo_id"] == "someone/cafe-tiny" and upload["commit_message"] == "CAFe tiny"
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "README.md",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
    } <= set(upload["files"])
    # The snippets load the repository it was pushed to, the metadata is the model's.
    assert 'SentenceTransformer("someone/cafe-tiny")' in upload["readme"]
    data = ModelCard(upload["readme"]).data.to_dict()
    assert data["base_model"] == CARD_DATA.base_model and "demo" in data["tags"]


def test_save_pretrained_with_push_to_hub_uploads_after_writing_everything(cafe_model, hub_calls, tmp_path):
    cafe_model.save_pretrained(tmp_path, push_to_hub=True, repo_id="someone/cafe-tiny")
    upload = hub_calls["upload_folder"]
    assert {"modules.json", "README.md", "model.safetensors"} <= set(upload["files"])
    assert 'model_id = "someone/cafe-tiny"' in upload["readme"]
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "LlavaOnevisionForConditionalGeneration"
    ]


# ----------------------------------------------------------------------------- LoRA adapter folders
@pytest.fixture()
def adapter_folder(tiny_checkpoint, tmp_path):
    """An adapter saved by `CafeTrainer` (PEFT LoRA, B matrices non-zero so it changes the model)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from cafe import CafeCollator, CafeTrainer, CafeTrainingArguments

    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model.config.cafe = {**model.config.cafe, "text_prompt": "Summarise this sentence in one word:"}
    peft_model = get_peft_model(
        model, LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj", init_lora_weights=False)
    )
    args = CafeTrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    trainer = CafeTrainer(model=peft_model, args=args, data_collator=CafeCollator(model.processor, model=model))
    model.model_card_data = CARD_DATA
    trainer.save_model(str(tmp_path / "adapter"))
    with torch.no_grad():
        expected = model.encode(["a red picture"])
    return tmp_path / "adapter", expected


@pytest.mark.all_families
@pytest.mark.released_formats
def test_an_adapter_folder_gets_cafes_card_and_loads_with_its_trained_settings(adapter_folder, tmp_path, monkeypatch):
    folder, expected = adapter_folder
    card = ModelCard.load(folder / "README.md")
    assert "More Information Needed" not in card.text  # PEFT's placeholder card is replaced
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and {"cafe", "lora"} <= set(data["tags"])
    assert data["base_model"] == CARD_DATA.base_model and data["cafe_training"]
    assert '| text prompt | `"Summarise this sentence in one word:"` |' in card.text
    assert json.loads((folder / "cafe_settings.json").read_text())["text_prompt"].startswith("Summarise")

    # The card's snippets run as written (with the folder as the model id, as for an upload).
    from cafe.hub import rewrite_adapter_card

    rewrite_adapter_card(folder, repo_id=str(folder))
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (48, 40), (200, 30, 30)).save("photo.jpg")
    blocks = _python_blocks((folder / "README.md").read_text())
    assert len(blocks) == 2
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md snippet {index}", "exec"), {"__name__": "__main__"})
    loaded = CafeForConditionalGeneration.from_pretrained(folder)
    assert loaded.config.cafe["text_prompt"].startswith("Summarise")  # not the base model's prompt
    assert (loaded.encode(["a red picture"]) - expected).abs().max() <= 1e-5
    # The merged save from the second snippet: a full checkpoint for sentence-transformers.
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    assert abs(st.encode(["a red picture"], convert_to_tensor=True) - expected).max() <= 1e-4


def test_push_an_adapter_folder(adapter_folder, hub_calls):
    from cafe.hub import push_folder_to_hub

    folder, _ = adapter_folder
    push_folder_to_hub(folder, "someone/cafe-lora")
    upload = hub_calls["upload_folder"]
    assert {"adapter_config.json", "adapter_model.safetensors", "cafe_settings.json", "README.md"} <= set(
        upload["files"]
    )
    assert 'from_pretrained("someone/cafe-lora")' in upload["readme"]
    data = ModelCard(upload["readme"]).data.to_dict()
    assert data["base_model"] == CARD_DATA.base_model and data["cafe_training"]  # kept from the folder's card
