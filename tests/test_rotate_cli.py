"""``cafe rotate DATA --model M --out FOLDER``: `fit_embedding_rotation` on a row sample, saved."""

import json

import pytest
import torch

from cafe import CafeForConditionalGeneration
from cafe.cli import main

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "pink", "grey", "brown", "purple"]
SHAPES = ["square", "circle", "triangle", "star", "cross", "ring", "dot", "line"]
TEXTS = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]  # 80 rows


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(TEXTS)))
    return path


def test_rotate_fits_on_the_sample_and_saves_a_rotated_checkpoint(data, tiny_checkpoint, tmp_path):
    out = tmp_path / "rotated"
    args = ["rotate", str(data), "--model", str(tiny_checkpoint), "--out", str(out), "--text-column", "text"]
    assert main([*args, "--sample", "72", "--seed", "3", "--batch-size", "8", "--no-progress"]) == 0
    rotated = CafeForConditionalGeneration.from_pretrained(out).eval()
    # The same rotation as fitting on those rows in Python.
    import random

    rows = sorted(random.Random(3).sample(range(len(TEXTS)), 72))
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    expected = model.fit_embedding_rotation([{"text": TEXTS[i]} for i in rows], batch_size=8)
    # Eigenvectors of nearly equal eigenvalues (72 points in 64 dimensions) move by ~1e-4 when float32
    # sums run over another thread split (a busy machine); another sample of rows moves them by ~0.9.
    assert torch.allclose(rotated.embedding_rotation, expected, atol=1e-3)
    assert (out / "2_Dense" / "model.safetensors").is_file()


def test_rotate_needs_a_column(data, tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="--text-column and/or --image-column"):
        main(["rotate", str(data), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x")])
    with pytest.raises(KeyError, match=r"\['caption'\] not in the dataset.*--text-column"):
        main(
            [
                "rotate",
                str(data),
                "--model",
                str(tiny_checkpoint),
                "--out",
                str(tmp_path / "x"),
                "--text-column",
                "caption",
            ]
        )
