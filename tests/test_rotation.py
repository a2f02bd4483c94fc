"""`fit_embedding_rotation`: an orthogonal rotation that makes a ``truncate_dim`` prefix the data's
principal subspace, kept through save / load as sentence-transformers' stock ``Dense`` module."""

import json

import pytest
import torch
import torch.nn.functional as F

from cafe import CafeForConditionalGeneration
from cafe.rotation import check_rotation, principal_rotation

pytestmark = [pytest.mark.all_families, pytest.mark.released_formats]

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "pink", "grey", "brown", "purple"]
SHAPES = ["square", "circle", "triangle", "star", "cross", "ring", "dot", "line"]
TEXTS = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]  # 80 >= the tiny models' width


def test_principal_rotation_puts_the_data_s_directions_first():
    """Vectors that vary only along 4 hidden directions: after the rotation those are the first
    4 coordinates, so a 4-dimensional prefix holds the whole vector."""
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator))
    vectors = torch.randn(200, 4, generator=generator) @ basis[:, 28:].T  # [200, 32], rank 4
    rotation = principal_rotation(vectors)
    assert torch.allclose(rotation @ rotation.T, torch.eye(32), atol=1e-5)
    rotated = F.normalize(vectors, dim=-1) @ rotation.T
    assert (rotated[:, :4] ** 2).sum(-1).min() > 0.9999
    # Before the rotation the same prefix held little of each vector.
    assert (F.normalize(vectors, dim=-1)[:, :4] ** 2).sum(-1).mean() < 0.5
    # Rows are ordered by the share of the vectors' length they carry.
    energy = (rotated**2).mean(0)
    assert torch.all(energy[:-1] >= energy[1:] - 1e-6)


def test_fewer_vectors_than_dimensions_order_only_their_span_and_say_so(caplog):
    """20 vectors fix 20 directions: those come first, the other 12 complete the rotation."""
    vectors = torch.randn(20, 32, generator=torch.Generator().manual_seed(1))
    with caplog.at_level("WARNING"):
        rotation = principal_rotation(vectors)
    assert "orders only their first 20 directions" in caplog.text
    assert torch.allclose(rotation @ rotation.T, torch.eye(32), atol=1e-5)
    rotated = F.normalize(vectors, dim=-1) @ rotation.T
    assert (rotated[:, :20] ** 2).sum(-1).min() > 0.9999


def test_principal_rotation_rejects_bad_vectors():
    with pytest.raises(ValueError, match="NaN"):
        principal_rotation(torch.full((40, 32), float("nan")))
    with pytest.raises(ValueError, match=r"non-empty \[N, D\]"):
        principal_rotation(torch.zeros(0, 32))


def test_check_rotation_rejects_what_is_not_a_rotation():
    with pytest.raises(ValueError, match=r"must be \[8, 8\]"):
        check_rotation(torch.eye(4), 8)
    with pytest.raises(ValueError, match="not orthogonal"):
        check_rotation(2 * torch.eye(8), 8)
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_rotation([[1.0]], 1)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def rotated(tiny_checkpoint, tmp_path_factory):
    """The tiny model, its vectors before the rotation, and the folder it was saved to after it."""
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    plain = model.encode(TEXTS)
    model.fit_embedding_rotation(TEXTS)
    folder = tmp_path_factory.mktemp("rotated")
    model.save_pretrained(folder)
    return model, plain, folder


def test_the_rotation_keeps_full_size_similarities_and_fills_the_prefix(rotated):
    model, plain, _ = rotated
    vectors = model.encode(TEXTS)
    assert torch.allclose(vectors @ vectors.T, plain @ plain.T, atol=1e-5)
    # The first 8 of 64 coordinates now carry the most of each vector that any 8 can (here > 0.9),
    # against what the hidden units happened to hold before.
    assert (vectors[:, :8] ** 2).sum(-1).mean() > (plain[:, :8] ** 2).sum(-1).mean() + 0.2
    truncated = model.encode(TEXTS, truncate_dim=8)
    assert torch.allclose(truncated, F.normalize(vectors[:, :8], dim=-1), atol=1e-6)


def test_the_rotation_is_a_stock_dense_module_of_the_saved_folder(rotated, stock_class):
    model, _, folder = rotated
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Dense", "3_Normalize"]
    assert modules[2]["type"] == "sentence_transformers.base.modules.dense.Dense"
    dense = json.loads((folder / "2_Dense" / "config.json").read_text())
    assert dense["bias"] is False and dense["activation_function"] == "torch.nn.modules.linear.Identity"
    reloaded = CafeForConditionalGeneration.from_pretrained(folder)
    assert torch.equal(reloaded.embedding_rotation, model.embedding_rotation)
    # The transformers weights do not carry it: the stock class loads the folder without surprises.
    _, info = stock_class.from_pretrained(folder, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]


def test_sentence_transformers_truncates_the_rotated_vectors(rotated, images):
    from sentence_transformers import SentenceTransformer

    model, _, folder = rotated
    st = SentenceTransformer(str(folder), device="cpu", truncate_dim=8)
    theirs = st.encode(TEXTS[:6] + images, convert_to_tensor=True).float()
    ours = model.encode(TEXTS[:6] + images, truncate_dim=8)
    assert F.cosine_similarity(theirs, ours, dim=-1).min() >= 0.99999


def test_a_failed_fit_keeps_the_rotation_in_use(rotated):
    model, _, _ = rotated
    before = model.embedding_rotation.clone()
    with pytest.raises(ValueError, match="Empty text for input 1"):
        model.fit_embedding_rotation(["a red square", ""])
    assert torch.equal(model.embedding_rotation, before)


def test_a_save_without_the_rotation_removes_its_module(rotated, tmp_path):
    import shutil

    _, _, folder = rotated
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    model = CafeForConditionalGeneration.from_pretrained(copy)
    model.set_embedding_rotation(None)
    model.save_pretrained(copy)  # over the save that had one
    assert [m["path"] for m in json.loads((copy / "modules.json").read_text())] == ["", "1_Pooling", "2_Normalize"]
    assert not (copy / "2_Dense").exists() and not (copy / "3_Normalize").exists()
    assert CafeForConditionalGeneration.from_pretrained(copy).embedding_rotation is None


def test_a_dense_module_that_is_not_a_rotation_is_refused(rotated, tmp_path):
    import shutil

    _, _, folder = rotated
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "2_Dense" / "config.json").read_text())
    (copy / "2_Dense" / "config.json").write_text(json.dumps({**config, "activation_function": "torch.nn.Tanh"}))
    with pytest.raises(ValueError, match="not an embedding rotation"):
        CafeForConditionalGeneration.from_pretrained(copy)


def test_the_rotation_stays_float32_when_the_model_is_cast(rotated, tmp_path):
    """`.to(bfloat16)` casts weights and buffers; the rotation is neither, so a bf16 model still
    saves the exact matrix (bf16 rounding would break its orthogonality)."""
    _, _, folder = rotated
    model = CafeForConditionalGeneration.from_pretrained(folder)
    exact = model.embedding_rotation.clone()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert model.embedding_rotation.dtype == torch.float32
    assert torch.equal(CafeForConditionalGeneration.from_pretrained(tmp_path / "bf16").embedding_rotation, exact)


def test_embeddings_stay_float32_under_autocast(rotated):
    model, _, _ = rotated
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vectors = model.encode(TEXTS[:4])
    assert vectors.dtype == torch.float32
    pooled = torch.randn(3, model.embedding_rotation.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        finished = model._finish_embedding(pooled)
    assert finished.dtype == torch.float32
    expected = F.normalize(pooled @ model.embedding_rotation.T, dim=-1)
    assert torch.allclose(finished, expected, atol=1e-6)


def _hub_cache(folder, cache, repo_id, skip=()):
    """A Hub cache holding `folder` as the snapshot of `repo_id` (what a download leaves behind)."""
    import shutil

    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit, ignore=lambda _, names: [n for n in names if n in skip])


def test_a_hub_checkpoint_brings_its_rotation(rotated, tmp_path):
    model, _, folder = rotated
    _hub_cache(folder, tmp_path / "hub", "someone/cafe-rotated")
    loaded = CafeForConditionalGeneration.from_pretrained("someone/cafe-rotated", cache_dir=str(tmp_path / "hub"))
    assert torch.equal(loaded.embedding_rotation, model.embedding_rotation)


def test_an_offline_hub_load_without_modules_json_says_the_rotation_is_missing(rotated, tmp_path, caplog):
    _, _, folder = rotated
    _hub_cache(folder, tmp_path / "hub", "someone/cafe-partial", skip={"modules.json"})
    with caplog.at_level("WARNING"):
        loaded = CafeForConditionalGeneration.from_pretrained("someone/cafe-partial", cache_dir=str(tmp_path / "hub"))
    assert loaded.embedding_rotation is None
    assert "an embedding rotation stored in the repository would not be applied" in caplog.text


def test_truncating_an_unordered_model_says_how_to_order_it(tiny_checkpoint, rotated, caplog):
    from transformers.utils import logging as hf_logging

    plain = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    hf_logging.get_logger("cafe.modeling").warning_once.cache_clear()
    with caplog.at_level("WARNING"):
        plain.encode(TEXTS[:2], truncate_dim=8)
    assert "neither trained with matryoshka_dims nor rotated" in caplog.text
    caplog.clear()
    hf_logging.get_logger("cafe.modeling").warning_once.cache_clear()
    with caplog.at_level("WARNING"):
        rotated[0].encode(TEXTS[:2], truncate_dim=8)
    assert "nor rotated" not in caplog.text
