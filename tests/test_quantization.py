"""Smaller vectors from a saved cafe checkpoint through sentence-transformers: ``truncate_dim``,
``precision="int8" / "binary"`` and ``quantize_embeddings`` (docs/sentence-transformers.md)."""

import numpy as np
import pytest
import torch
from PIL import Image

from cafe import CafeForConditionalGeneration

TEXTS = ["a red square", "a blue circle on a white background", "green", "two yellow triangles"]
COLOURS = [(255, 0, 0), (0, 90, 255), (20, 200, 20), (250, 220, 0)]


@pytest.fixture(scope="module")
def saved(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("st-quantised")
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    model.config.cafe = {**model.config.cafe, "matryoshka_dims": [64, 32, 16]}
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def st_model(saved):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(saved[1]), device="cpu")


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (32, 32), rgb) for rgb in COLOURS]


def test_truncate_dim_is_cafes_truncation(saved, images):
    from sentence_transformers import SentenceTransformer

    model, folder = saved
    truncated = SentenceTransformer(str(folder), device="cpu", truncate_dim=16)
    st = truncated.encode(TEXTS + images, convert_to_tensor=True)
    assert st.shape == (8, 16)
    ours = model.encode(TEXTS + images, truncate_dim=16)
    # sentence-transformers truncates after its Normalize module and does not re-normalise;
    # cosine similarity (the folder's similarity function) does not care.
    cosine = torch.nn.functional.cosine_similarity(st.float(), ours, dim=-1)
    assert cosine.min().item() >= 0.99999
    assert truncated.similarity_fn_name == "cosine"


@pytest.mark.parametrize(
    "precision, dtype, width",
    [("int8", np.int8, 64), ("uint8", np.uint8, 64), ("binary", np.int8, 8), ("ubinary", np.uint8, 8)],
)
def test_encode_precision(st_model, precision, dtype, width):
    from sentence_transformers.quantization import quantize_embeddings

    vectors = st_model.encode(TEXTS, precision=precision)
    assert vectors.dtype == dtype and vectors.shape == (len(TEXTS), width)
    # encode(precision=...) is quantize_embeddings of the float vectors (ranges from the same batch).
    expected = quantize_embeddings(st_model.encode(TEXTS), precision=precision)
    assert np.array_equal(vectors, expected)


def test_binary_is_the_sign_of_each_dimension(st_model):
    floats = st_model.encode(TEXTS)
    bits = np.unpackbits(st_model.encode(TEXTS, precision="ubinary"), axis=1)
    assert np.array_equal(bits, (floats > 0).astype(np.uint8))


def test_int8_codes_hold_the_vector_to_one_step(st_model, images):
    """int8 with calibration: per dimension, 256 buckets over the calibration set's [min, max];
    decoding a code gives the vector back to within one bucket (what rescoring relies on)."""
    from sentence_transformers.quantization import quantize_embeddings

    corpus = st_model.encode(TEXTS + images)
    queries = st_model.encode(TEXTS)
    codes = quantize_embeddings(queries, "int8", calibration_embeddings=corpus)
    assert codes.dtype == np.int8 and codes.shape == queries.shape
    low, high = corpus.min(0), corpus.max(0)
    step = np.where(high > low, (high - low) / 255, 1)
    decoded = low + (codes.astype(np.float32) + 128 + 0.5) * step
    assert np.abs(decoded - queries).max() <= step.max()
    cosine = (decoded * queries).sum(1) / np.linalg.norm(decoded, axis=1) / np.linalg.norm(queries, axis=1)
    assert cosine.min() >= 0.99


def test_matryoshka_dims_are_recorded_for_readers(saved):
    import json

    _, folder = saved
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    assert config["matryoshka_dims"] == [64, 32, 16]
