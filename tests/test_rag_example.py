"""examples/rag.py: index (FAISS), retrieve and answer with one model, reusing the question's
computation; the memory comparison adds up."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "rag.py"
try:
    import faiss  # noqa: F401

    HAS_FAISS = True
except ImportError:
    HAS_FAISS = False
NEEDS_FAISS = pytest.mark.skipif(not HAS_FAISS, reason="faiss-cpu is not installed (pip install 'cafe-vlm[rag]')")
# The example's own tests run on FAISS where it is installed, else on its torch matrix.
BACKEND = "faiss" if HAS_FAISS else "torch"


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
        result = rag.main(
            ["--max-new-tokens", "6", "--k-images", "2", "--k-passages", "2", "--compare-reuse", "--index", BACKEND]
        )
    return result, output.getvalue()


def test_prints_retrieval_answer_and_memory(run):
    result, printed = run
    assert "Indexed 3 images and 4 passages" in printed and "reloaded" in printed
    assert printed.count("  image ") == 2 and printed.count("  passage ") == 2
    assert "Answer: " in printed and "identical answer: True" in printed
    assert "one CAFe model" in printed and "embedder + separate VLM" in printed and "vector index:" in printed
    assert isinstance(result["answer"].text, str)


def test_retrieval_is_the_cosine_ranking_of_the_model_embeddings(run):
    result, _ = run
    model, index = result["model"], result["index"]
    query = model.encode(["Which colour is the square?"])[0]
    assert (result["question"].embedding - query).abs().max().item() <= 1e-5
    for found, documents, embed in (
        (result["images"], index.images, lambda docs: model.encode(images=[d.image for d in docs])),
        (result["passages"], index.passages, lambda docs: model.encode(texts=[d.text for d in docs])),
    ):
        scores = embed(documents) @ query
        expected = torch.argsort(scores, descending=True)[: len(found)].tolist()
        assert [documents.index(document) for _, document in found] == expected
        assert [score for score, _ in found] == pytest.approx(scores[expected].tolist(), abs=1e-5)


def test_answer_reuses_the_question_prefix_and_says_the_same(rag, run):
    """Embedding the question (with an image) then answering it: the shared opening (system turn,
    header, the question's image and text) comes from the embedding pass; greedy tokens unchanged,
    and the question's image skips the vision tower."""
    result, _ = run
    model = result["model"]
    question_image = Image.new("RGB", (40, 30), (200, 30, 30))
    question = "What colour is this shape?"
    images = [document for _, document in result["images"]][:1]
    passages = [document for _, document in result["passages"]]
    encoded = []
    handle = model.model.vision_tower.register_forward_pre_hook(lambda module, args: encoded.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            embedded = rag.embed_question(model, question, question_image)
        encoded.clear()
        reused = rag.answer(model, question, images, passages, 8, question_image, embedded)
        with_reuse = sum(encoded)
        encoded.clear()
        plain = rag.answer(model, question, images, passages, 8, question_image, None)
        without_reuse = sum(encoded)
    finally:
        handle.remove()
    assert reused.token_ids == plain.token_ids and reused.text == plain.text
    image_tokens = int((embedded.input_ids == model.config.image_token_id).sum())
    assert reused.reused_tokens > image_tokens and plain.reused_tokens == 0
    assert with_reuse < without_reuse  # the question's image is not encoded again
    torch.testing.assert_close(embedded.embedding, model.encode([{"image": question_image, "text": question}])[0])


@NEEDS_FAISS
def test_faiss_index_persists_and_reloads(rag, run, tmp_path):
    import faiss

    result, _ = run
    index, model = result["index"], result["model"]
    assert isinstance(index.image_vectors._faiss, faiss.IndexFlatIP)
    corpus = rag.build_demo_corpus(tmp_path / "corpus")  # the run's own folder is gone; same files
    index.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "documents.json",
        "images.faiss",
        "passages.faiss",
    ]
    reloaded = rag.Index.load(tmp_path / "saved", corpus)
    query = result["question"].embedding
    for name in ("image_vectors", "passage_vectors"):
        assert getattr(reloaded, name).search(query, 3) == getattr(index, name).search(query, 3)
    assert [d.text for d in reloaded.passages] == [d.text for d in index.passages]
    assert [d.image.tobytes() for d in reloaded.images] == [d.image.tobytes() for d in index.images]
    assert reloaded.nbytes == index.nbytes == 7 * model.config.text_config.hidden_size * 4


@NEEDS_FAISS
def test_faiss_search_equals_the_exact_torch_ranking(rag):
    torch.manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    query = torch.nn.functional.normalize(torch.randn(16), dim=-1)
    found = {}
    for backend in rag.INDEX_BACKENDS:
        index = rag.VectorIndex(16, backend)
        index.add(vectors)
        found[backend] = index.search(query, 5)
    assert found["faiss"][1] == found["torch"][1]
    assert found["faiss"][0] == pytest.approx(found["torch"][0], abs=1e-5)


def test_missing_faiss_names_the_extra(rag, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(ImportError, match=r"cafe-vlm\[rag\].*--index torch"):
        rag.VectorIndex(8, "faiss")


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
