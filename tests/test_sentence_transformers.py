"""A saved CAFe folder is a sentence-transformers model: stock modules, no cafe, same vectors.

sentence-transformers runs in a subprocess where ``import cafe`` fails, so nothing of cafe can be
involved in loading or encoding; its outputs are compared with `get_embeddings` (through
`CafeForConditionalGeneration.encode`) of this process.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration

from cafe import CafeForConditionalGeneration, CafeSettings
from cafe.data import generate_clip_records
from cafe.export import write_sentence_transformers_files

PROMPTS = {
    "query": "Find an image that matches the given caption.",
    "document": "Represent the given image.",
    "vqa": "Represent the given image with the following question: ",
}
TEXTS = ["a red square", "a blue circle on a white background", "green"]
PAIR_TEXTS = ["what colour is it?", "how many shapes are there?"]
COLOURS = [(255, 0, 0), (0, 90, 255), (20, 200, 20), (250, 220, 0)]
CAPTIONS = ["a red picture", "a blue picture", "a green picture", "a yellow picture"]
MIN_COSINE = 0.99999

# Runs under `python -I` (no PYTHONPATH, no script or working directory on sys.path). An editable
# install can still expose cafe through a sys.path entry (a .pth file naming the src dir) or a
# meta-path finder (setuptools' editable finder): both are removed. A regular install sits in
# site-packages next to sentence-transformers, so that entry cannot go: the import is refused
# instead. Either way `import cafe` must then fail.
SUBPROCESS_SCRIPT = textwrap.dedent(
    r"""
    import importlib.util, json, sys
    from importlib.machinery import PathFinder
    from pathlib import Path

    class RefuseCafe:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "cafe" or name.startswith("cafe."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    for entry in list(sys.path):
        if (Path(entry or ".") / "cafe" / "__init__.py").exists():
            if (Path(entry or ".") / "sentence_transformers").is_dir():
                sys.meta_path.insert(0, RefuseCafe)
            else:
                sys.path.remove(entry)
    sys.meta_path[:] = [
        f for f in sys.meta_path
        if f in (PathFinder, RefuseCafe) or not (hasattr(f, "find_spec") and f.find_spec("cafe", None) is not None)
    ]
    sys.path_importer_cache.clear()
    try:
        import cafe  # noqa: F401
        cafe_import_error = None
    except ModuleNotFoundError as err:
        cafe_import_error = type(err).__name__

    import numpy as np
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    spec = json.loads(Path(sys.argv[1]).read_text())
    model = SentenceTransformer(spec["folder"], device="cpu")  # trust_remote_code stays False
    images = [Image.open(path) for path in spec["images"]]
    pairs = [{"text": text, "image": image} for text, image in zip(spec["pair_texts"], images)]
    clips = list(np.load(spec["videos"]))  # [T, H, W, 3] uint8 each
    out = {
        "videos": model.encode([{"video": clip} for clip in clips]),
        "video_pairs": model.encode([{"video": clip, "text": text} for clip, text in zip(clips, spec["pair_texts"])]),
        "texts": model.encode(spec["texts"]),
        "images": model.encode(images),
        "image_paths": model.encode(spec["images"]),  # file paths are images to sentence-transformers
        "pairs": model.encode(pairs),
        "mixed": model.encode([spec["texts"][0], images[0], pairs[1]]),
        "queries": model.encode_query(spec["texts"]),
        "documents": model.encode_document(images),
        "named": model.encode(pairs, prompt_name="vqa"),
    }
    evaluator = InformationRetrievalEvaluator(
        queries={f"q{i}": caption for i, caption in enumerate(spec["captions"])},
        corpus={f"d{i}": image for i, image in enumerate(images)},
        relevant_docs={f"q{i}": {f"d{i}"} for i in range(len(spec["captions"]))},
        precision_recall_at_k=[1, 2], accuracy_at_k=[1], mrr_at_k=[4], ndcg_at_k=[4], map_at_k=[4],
        write_csv=False,
    )
    metrics = evaluator(model)
    np.savez(spec["output"], **out)
    Path(spec["output"] + ".json").write_text(json.dumps({
        "cafe_import_error": cafe_import_error,
        "cafe_loaded": "cafe" in sys.modules or any(m.startswith("cafe.") for m in sys.modules),
        "module_classes": [f"{type(m).__module__}.{type(m).__name__}" for m in model],
        "transformers_class": type(model[0].model).__name__,
        "prompts": model.prompts,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }))
    """
)


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def saved(tiny_checkpoint, tmp_path_factory):
    """A CAFe model saved with sentence-transformers prompts, plus what it generated before saving."""
    folder = tmp_path_factory.mktemp("cafe-st")
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    image = Image.new("RGB", (40, 30), COLOURS[0])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the picture"}]}]
    prompt = model.processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = model.processor(images=image, text=prompt, return_tensors="pt")
    tokens = model.generate(**batch, max_new_tokens=10, do_sample=False)
    model.save_pretrained(folder, sentence_transformers_prompts=PROMPTS)
    return {"folder": folder, "model": model, "generation_batch": batch, "tokens": tokens}


@pytest.fixture(scope="module")
def st_run(saved, tmp_path_factory):
    """Run sentence-transformers on the folder in a Python where cafe cannot be imported."""
    work = tmp_path_factory.mktemp("st-run")
    image_paths = []
    for i, colour in enumerate(COLOURS):
        path = work / f"image{i}.png"
        Image.new("RGB", (32 + 8 * i, 40 - 4 * i), colour).save(path)
        image_paths.append(str(path))
    clips = np.stack([record["video"] for record in generate_clip_records(2, seed=1, image_size=48)])
    np.save(work / "clips.npy", clips)
    spec = {
        "videos": str(work / "clips.npy"),
        "folder": str(saved["folder"]),
        "texts": TEXTS,
        "pair_texts": PAIR_TEXTS,
        "captions": CAPTIONS,
        "images": image_paths,
        "output": str(work / "embeddings.npz"),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-I", "-c", SUBPROCESS_SCRIPT, str(work / "spec.json")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads((work / "embeddings.npz.json").read_text())
    return {
        "embeddings": dict(np.load(work / "embeddings.npz")),
        "stderr": proc.stderr,
        "images": [Image.open(p).convert("RGB") for p in image_paths],
        "image_paths": image_paths,
        "clips": list(clips),
        **info,
    }


# ----------------------------------------------------------------------------- loading
def test_subprocess_had_no_cafe(st_run):
    assert st_run["cafe_import_error"] == "ModuleNotFoundError"
    assert not st_run["cafe_loaded"]


def test_loads_with_stock_modules_only(st_run):
    assert st_run["module_classes"] == [
        "sentence_transformers.base.modules.transformer.Transformer",
        "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        "sentence_transformers.base.modules.normalize.Normalize",
    ]
    # AutoModel: the backbone without the LM head, i.e. `CafeForConditionalGeneration.model`.
    assert st_run["transformers_class"] == "LlavaOnevisionModel"


def test_load_report_only_mentions_the_unused_lm_head(st_run):
    """The one known message: the backbone does not use the LM head. Nothing missing or resized."""
    report = st_run["stderr"]
    assert "MISSING" not in report and "MISMATCH" not in report
    unexpected = [line.split("|")[0].strip() for line in report.splitlines() if "| UNEXPECTED" in line]
    assert unexpected == ["language_model.lm_head.weight"]


# ----------------------------------------------------------------------------- same vectors
@pytest.mark.parametrize("key", ["texts", "images", "image_paths", "pairs", "mixed", "videos", "video_pairs"])
def test_vectors_match_get_embeddings(saved, st_run, key):
    model, images, clips = saved["model"], st_run["images"], st_run["clips"]
    pairs = [
        {"text": text, "image": image} for text, image in zip(PAIR_TEXTS, images, strict=False)
    ]  # fewer texts: the first images
    inputs = {
        "texts": TEXTS,
        "images": images,
        "image_paths": st_run["image_paths"],  # bare path strings are images to both libraries
        "pairs": pairs,
        "mixed": [TEXTS[0], images[0], pairs[1]],
        # The clips have the model's 8 frames, so cafe's sampling keeps them all, as
        # sentence-transformers does (it hands frames to the processor as given).
        "videos": [{"video": clip} for clip in clips],
        "video_pairs": [{"video": clip, "text": text} for clip, text in zip(clips, PAIR_TEXTS, strict=True)],
    }[key]
    expected = model.encode(inputs)
    got = st_run["embeddings"][key]
    assert got.shape == tuple(expected.shape)
    assert _cosines(got, expected).min() >= MIN_COSINE


def test_encode_query_and_document_apply_their_prompts(saved, st_run):
    model, images = saved["model"], st_run["images"]
    assert st_run["prompts"] == PROMPTS
    queries = model.encode(TEXTS, instruction=PROMPTS["query"])
    documents = model.encode(images, instruction=PROMPTS["document"])
    pairs = [
        {"text": text, "image": image} for text, image in zip(PAIR_TEXTS, images, strict=False)
    ]  # fewer texts: the first images
    named = model.encode(pairs, instruction=PROMPTS["vqa"])
    assert _cosines(st_run["embeddings"]["queries"], queries).min() >= MIN_COSINE
    assert _cosines(st_run["embeddings"]["documents"], documents).min() >= MIN_COSINE
    assert _cosines(st_run["embeddings"]["named"], named).min() >= MIN_COSINE
    # ... and the prompts changed the vectors (they are not silently dropped).
    assert _cosines(st_run["embeddings"]["queries"], model.encode(TEXTS)).max() < 0.9999


def test_information_retrieval_evaluator_gives_the_expected_recall(saved, st_run):
    """Recall / MRR of sentence-transformers' evaluator equal those ranked from get_embeddings."""
    model = saved["model"]
    queries = model.encode(CAPTIONS, instruction=PROMPTS["query"])
    documents = model.encode(st_run["images"], instruction=PROMPTS["document"])
    ranking = torch.argsort(queries @ documents.T, dim=1, descending=True)
    rank_of_positive = [ranking[i].tolist().index(i) for i in range(len(CAPTIONS))]
    metrics = st_run["metrics"]
    for k in (1, 2):
        expected = np.mean([rank < k for rank in rank_of_positive])
        assert metrics[f"cosine_recall@{k}"] == pytest.approx(expected)
    assert metrics["cosine_mrr@4"] == pytest.approx(np.mean([1 / (rank + 1) for rank in rank_of_positive]))


# ----------------------------------------------------------------------------- the folder
def test_folder_still_generates_the_same_tokens_in_stock_transformers(saved):
    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(saved["folder"]).eval()
    tokens = stock.generate(**saved["generation_batch"], max_new_tokens=10, do_sample=False)
    assert torch.equal(tokens, saved["tokens"])


def test_folder_keeps_the_lm_head_and_the_generation_template(saved, tiny_checkpoint):
    from safetensors import safe_open
    from transformers import AutoProcessor

    with safe_open(saved["folder"] / "model.safetensors", "pt") as weights:
        assert "language_model.lm_head.weight" in weights.keys()
    # The embedding template goes to sentence-transformers as a processing kwarg: the processor's
    # own chat template stays the backbone's generation template.
    saved_template = AutoProcessor.from_pretrained(saved["folder"]).chat_template
    assert saved_template == AutoProcessor.from_pretrained(tiny_checkpoint).chat_template
    module_config = json.loads((saved["folder"] / "sentence_bert_config.json").read_text())
    assert (
        module_config["processing_kwargs"]["chat_template"]["chat_template"] == saved["model"].embedding_chat_template
    )
    assert saved_template != saved["model"].embedding_chat_template


def test_prompts_survive_a_load_and_save(saved, tmp_path):
    model = CafeForConditionalGeneration.from_pretrained(saved["folder"])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == PROMPTS


def test_default_prompts_and_no_normalize_module_when_disabled(tiny_checkpoint, tmp_path):
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint, cafe_settings=CafeSettings(normalize=False))
    model.save_pretrained(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling"]
    config = json.loads((tmp_path / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {"query": "", "document": ""}
    assert config["similarity_fn_name"] == "cosine"


def test_unknown_default_prompt_name_is_rejected(cafe_model, tmp_path):
    with pytest.raises(ValueError, match="default_prompt_name 'missing' is not one of the prompts"):
        write_sentence_transformers_files(tmp_path, cafe_model.config, prompts=PROMPTS, default_prompt_name="missing")


@pytest.mark.all_families
@pytest.mark.released_formats
def test_every_backbone_family_gives_the_same_vectors(tiny_checkpoint, tmp_path):
    """The export is family-agnostic: AutoModel of each family is its CAFe backbone (in-process here;
    the cafe-free subprocess above covers the default family)."""
    from sentence_transformers import SentenceTransformer

    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    model.save_pretrained(tmp_path, sentence_transformers_prompts={"query": PROMPTS["query"]})
    st_model = SentenceTransformer(str(tmp_path), device="cpu")
    image = Image.new("RGB", (40, 30), COLOURS[1])
    inputs = [TEXTS[1], image, {"text": PAIR_TEXTS[0], "image": image}]
    assert _cosines(st_model.encode(inputs), model.encode(inputs)).min() >= MIN_COSINE
    queries = model.encode(inputs, instruction=PROMPTS["query"])
    assert _cosines(st_model.encode_query(inputs), queries).min() >= MIN_COSINE


@pytest.mark.all_families
@pytest.mark.released_formats
def test_sentence_transformers_embeds_videos_as_encode_does(tiny_checkpoint, tmp_path):
    """``SentenceTransformer.encode([{"video": frames}])`` (frames as the model samples them) and
    ``{"video": ..., "text": ...}`` give `encode`'s vectors on every family."""
    from sentence_transformers import SentenceTransformer

    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    model.save_pretrained(tmp_path)
    assert "video" in json.loads((tmp_path / "sentence_bert_config.json").read_text())["modality_config"]
    st_model = SentenceTransformer(str(tmp_path), device="cpu")
    clips = [record["video"] for record in generate_clip_records(2, seed=4, image_size=48)]
    inputs = [{"video": clips[0]}, {"video": clips[1], "text": PAIR_TEXTS[0]}, TEXTS[0]]
    assert _cosines(st_model.encode(inputs), model.encode(inputs)).min() >= MIN_COSINE


def test_a_template_without_video_keeps_video_off_in_sentence_transformers(cafe_model):
    from cafe.export import transformer_module_config

    settings = dict(cafe_model.config.cafe)
    settings["embedding_chat_template"] = settings["embedding_chat_template"].replace("'video'", "'none'")
    config = type(cafe_model.config).from_dict({**cafe_model.config.to_dict(), "cafe": settings})
    assert set(transformer_module_config(config)["modality_config"]) == {"text", "image", "message"}
