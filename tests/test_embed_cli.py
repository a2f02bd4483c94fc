"""``cafe embed DATA --out vectors.parquet``: the vectors of `encode`, in row order, resumable by shard."""

import json

import pytest
import torch
from PIL import Image

from cafe import CafeForConditionalGeneration
from cafe.cli import main

ROWS = [
    {"id": "a", "text": "a red square", "image": None},
    {"id": "b", "text": None, "image": "blue.png"},
    {"id": "c", "text": "what colour is it?", "image": "green.png"},
    {"id": "d", "text": "two large yellow circles on the left of a small purple triangle", "image": None},
    {"id": "e", "text": "hi", "image": None},
    {"id": "f", "text": None, "image": "green.png"},
    {"id": "g", "text": "a white background", "image": None},
]


@pytest.fixture()
def data(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (0, 60, 250)).save(images / "blue.png")
    Image.new("RGB", (40, 30), (20, 200, 20)).save(images / "green.png")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path, images


def _args(data, tiny_checkpoint, out, *extra):
    path, images = data
    return [
        "embed",
        str(path),
        "--out",
        str(out),
        "--model",
        str(tiny_checkpoint),
        "--text-column",
        "text",
        "--image-column",
        "image",
        "--image-folder",
        str(images),
        "--id-column",
        "id",
        "--shard-size",
        "3",
        "--batch-size",
        "2",
        "--no-progress",
        *extra,
    ]


def _expected(tiny_checkpoint, images, **encode_kwargs):
    model = CafeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    inputs = [
        {
            key: (str(images / value) if key == "image" and value else value)
            for key, value in row.items()
            if key != "id" and value is not None
        }
        for row in ROWS
    ]
    return model.encode(inputs, **encode_kwargs)


def _read(out):
    import datasets

    return datasets.Dataset.from_parquet(str(out))


def test_vectors_are_encodes_in_row_order(data, tiny_checkpoint, tmp_path, capsys):
    import datasets

    out = tmp_path / "vectors.parquet"
    assert main(_args(data, tiny_checkpoint, out)) == 0
    # --no-progress silences datasets' bars too, for the job only.
    assert "Creating parquet" not in capsys.readouterr().err and datasets.is_progress_bar_enabled()
    table = _read(out)
    assert table.column_names == ["row", "id", "embedding"]
    assert table["row"] == list(range(len(ROWS))) and table["id"] == [row["id"] for row in ROWS]
    vectors = torch.tensor(table["embedding"])
    assert (vectors - _expected(tiny_checkpoint, data[1])).abs().max().item() <= 1e-5
    assert not out.with_name(out.name + ".shards").exists()  # joined, then removed


def test_truncate_dim_and_instruction(data, tiny_checkpoint, tmp_path):
    out = tmp_path / "small.parquet"
    main(_args(data, tiny_checkpoint, out, "--truncate-dim", "16", "--instruction", "Represent it: "))
    vectors = torch.tensor(_read(out)["embedding"])
    expected = _expected(tiny_checkpoint, data[1], truncate_dim=16, instruction="Represent it: ")
    assert vectors.shape == (len(ROWS), 16)
    assert (vectors - expected).abs().max().item() <= 1e-5


def test_an_interrupted_job_resumes_from_its_shards(data, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "vectors.parquet"
    calls = []
    encode = CafeForConditionalGeneration.encode

    def failing_on_second_shard(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed while embedding shard 1
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(CafeForConditionalGeneration, "encode", failing_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        main(_args(data, tiny_checkpoint, out))
    shards = out.with_name(out.name + ".shards")
    assert sorted(p.name for p in shards.glob("*.parquet")) == ["shard-00000-of-00003.parquet"]
    assert not out.exists()

    calls.clear()
    monkeypatch.setattr(
        CafeForConditionalGeneration, "encode", lambda self, *a, **k: calls.append(1) or encode(self, *a, **k)
    )
    main(_args(data, tiny_checkpoint, out))
    assert len(calls) == 2  # shards 1 and 2 only
    assert "Resuming: 1 of 3 shards are done" in capsys.readouterr().err
    vectors = torch.tensor(_read(out)["embedding"])
    assert (vectors - _expected(tiny_checkpoint, data[1])).abs().max().item() <= 1e-5


def test_resuming_with_other_settings_is_refused(data, tiny_checkpoint, tmp_path):
    out = tmp_path / "vectors.parquet"
    main(_args(data, tiny_checkpoint, out, "--keep-shards"))
    with pytest.raises(SystemExit, match="truncate_dim differ"):
        main(_args(data, tiny_checkpoint, out, "--truncate-dim", "8"))


def test_missing_column_names_the_flag(data, tiny_checkpoint, tmp_path):
    args = _args(data, tiny_checkpoint, tmp_path / "v.parquet")
    args[args.index("--text-column") + 1] = "caption"
    with pytest.raises(KeyError, match=r"\['caption'\] not in the dataset.*--text-column"):
        main(args)


def test_listed_in_the_cafe_command(capsys):
    assert main(["--help"]) == 0
    assert "embed" in capsys.readouterr().out


def test_resuming_after_the_model_folder_was_rewritten_is_refused(data, tiny_checkpoint, tmp_path):
    """The same --model path with other weights in it (a checkpoint rotated or retrained in place)
    must not resume into shards embedded by the old weights."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    out = tmp_path / "vectors.parquet"
    main(_args(data, model, out, "--keep-shards"))
    rewritten = CafeForConditionalGeneration.from_pretrained(model)
    rewritten.fit_embedding_rotation(texts=[row["text"] for row in ROWS if row["text"]])
    rewritten.save_pretrained(model)
    with pytest.raises(SystemExit, match="model_files differ"):
        main(_args(data, model, out))
    # So is an edited data file.
    shutil.rmtree(out.with_name(out.name + ".shards"))
    main(_args(data, model, out, "--keep-shards"))
    path = data[0]
    path.write_text(path.read_text().replace("a red square", "a red circle"))
    with pytest.raises(SystemExit, match="data_files differ"):
        main(_args(data, model, out))


def test_bad_rows_are_named_by_their_row_in_the_data(data, tiny_checkpoint, tmp_path):
    """Errors name the row of DATA (shards hold 3 rows here), not the place in a shard."""
    path, images = data
    rows = [dict(row) for row in ROWS]
    rows[5]["image"] = "nowhere.png"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(FileNotFoundError, match=r"row 5 of .*rows\.jsonl.*nowhere\.png"):
        main(_args(data, tiny_checkpoint, tmp_path / "v.parquet"))
    (images / "corrupt.png").write_bytes(b"not a png")
    rows[5]["image"] = "corrupt.png"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"Corrupt or unreadable image for row 5 of "):
        main(_args(data, tiny_checkpoint, tmp_path / "v2.parquet"))
    rows[5]["image"] = ""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"Empty image path in column 'image' for row 5 of "):
        main(_args(data, tiny_checkpoint, tmp_path / "v3.parquet"))
    rows[5]["image"], rows[4]["text"] = "green.png", "  "
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"Empty text for row 4 of "):
        main(_args(data, tiny_checkpoint, tmp_path / "v4.parquet"))


def test_a_missing_data_file_or_model_folder_is_named(data, tiny_checkpoint, tmp_path):
    args = _args(data, tiny_checkpoint, tmp_path / "v.parquet")
    args[1] = str(tmp_path / "nofile.jsonl")
    with pytest.raises(FileNotFoundError, match=r"No data file or folder at .*nofile\.jsonl"):
        main(args)
    args = _args(data, tmp_path / "nomodel", tmp_path / "v.parquet")
    with pytest.raises(SystemExit, match=r"cafe embed: no model folder at .*nomodel"):
        main(args)
    with pytest.raises(SystemExit, match="--truncate-dim must be >= 1"):
        main(_args(data, tiny_checkpoint, tmp_path / "v.parquet", "--truncate-dim", "0"))


def test_the_console_command_prints_a_bad_input_error_in_one_line(data, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """`cafe embed` from a shell: the error's message and exit status 1, not a traceback."""
    from cafe.cli import run

    args = _args(data, tiny_checkpoint, tmp_path / "v.parquet")
    args[1] = str(tmp_path / "nofile.jsonl")
    monkeypatch.setattr("sys.argv", ["cafe", *args])
    monkeypatch.delenv("CAFE_TRACEBACK", raising=False)
    assert run() == 1
    err = capsys.readouterr().err
    assert err.startswith("cafe embed: error: No data file or folder at ") and "Traceback" not in err
    monkeypatch.setenv("CAFE_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        run()


def test_a_shard_is_embedded_in_chunks_with_the_same_vectors(data, tiny_checkpoint, tmp_path, monkeypatch):
    """Images are decoded per chunk of batches, not per shard; the vectors do not change."""
    import cafe.embedding_job

    monkeypatch.setattr(cafe.embedding_job, "CHUNK_BATCHES", 1)  # chunks of --batch-size 2 rows
    calls = []
    encode = CafeForConditionalGeneration.encode
    monkeypatch.setattr(
        CafeForConditionalGeneration,
        "encode",
        lambda self, inputs, **k: calls.append(len(inputs)) or encode(self, inputs, **k),
    )
    out = tmp_path / "vectors.parquet"
    main(_args(data, tiny_checkpoint, out))
    assert calls == [2, 1, 2, 1, 1]  # shards of 3, 3 and 1 rows
    vectors = torch.tensor(_read(out)["embedding"])
    assert (vectors - _expected(tiny_checkpoint, data[1])).abs().max().item() <= 1e-5
