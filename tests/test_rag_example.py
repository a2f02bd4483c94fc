"""examples/rag.py: index, retrieve and answer with one model; the memory comparison adds up."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rag.py"


@pytest.fixture(scope="module")
def rag():
    spec = importlib.util.spec_from_file_location("cafe_rag_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their string annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def run(rag, tmp_path_factory):
    """The example end to end, offline on the tiny checkpoint and the demo corpus."""
    import contextlib
    import io

    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        result = rag.main(["--max-new-tokens", "6", "--k-images", "2", "--k-passages", "2"])
    return result, output.getvalue()


def test_prints_retrieval_answer_and_memory(run):
    result, printed = run
    assert "Indexed 3 images and 4 passages" in printed
    assert printed.count("  image ") == 2 and printed.count("  passage ") == 2
    assert "Answer: " in printed
    assert "one CAFe model" in printed and "embedder + separate VLM" in printed
    assert isinstance(result["answer"], str)


def test_retrieval_is_the_cosine_ranking_of_the_model_embeddings(run):
    result, _ = run
    model, index = result["model"], result["index"]
    query = model.encode(["Which colour is the square?"])[0]
    for found, documents, embeddings in (
        (result["images"], index.images, index.image_embeddings),
        (result["passages"], index.passages, index.passage_embeddings),
    ):
        expected = torch.argsort(embeddings @ query, descending=True)[: len(found)].tolist()
        assert [documents.index(document) for _, document in found] == expected


def test_generation_is_conditioned_on_the_retrieved_items(rag, run, monkeypatch):
    result, _ = run
    model = result["model"]
    images = [document for _, document in result["images"]]
    passages = [document for _, document in result["passages"]]
    seen = {}
    generate = model.generate

    def recording_generate(**inputs):
        seen.update(inputs)
        return generate(**inputs)

    monkeypatch.setattr(model, "generate", recording_generate)
    rag.answer(model, "Which colour is the square?", images, passages, max_new_tokens=2)
    prompt = model.processor.decode(seen["input_ids"][0])
    assert all(document.text in prompt for document in passages)
    assert prompt.count("<image>") > len(images)  # each image is expanded into its feature tokens
    assert seen["image_sizes"].shape[0] == len(images)


def test_memory_comparison_counts_two_models(run):
    result, _ = run
    model, memory = result["model"], result["memory"]
    one = sum(p.numel() * p.element_size() for p in model.parameters())
    lm_head = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    assert memory.cafe_parameter_bytes == one
    # The embedder is the same backbone without the LM head.
    assert memory.embedder_parameter_bytes == one - lm_head
    assert memory.two_model_parameter_bytes == 2 * one - lm_head
    assert memory.cafe_rss_bytes is not None and memory.embedder_rss_bytes is not None
