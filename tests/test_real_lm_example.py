"""examples/reproduce_real_lm.py end to end at smoke scale.

The recorded run composes SmolLM2-135M-Instruct (a GGUF wheel) and reads all of WordNet; here the
same code runs on a tiny Llama saved to disk and on the WordNet sample in tests/data, so the
pipeline (compose, stage 1, variants, every metric, resume, table, plot) is checked offline.
"""

import importlib.util
import json
import sys
from pathlib import Path

from cafe.testing import tiny_text_language_model

EXAMPLE = Path(__file__).parent.parent / "examples" / "reproduce_real_lm.py"
DIAGNOSTICS = EXAMPLE.parent / "truncation_diagnostics.py"
WORDNET_SAMPLE = Path(__file__).parent / "data" / "wordnet"


def _load_example(path: Path = EXAMPLE):
    spec = importlib.util.spec_from_file_location(f"cafe_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _tiny_language_model(path: Path) -> Path:
    language_model, tokenizer = tiny_text_language_model(hidden_size=64)
    language_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reproduce_real_lm_quick_runs_every_stage_and_resumes(tmp_path):
    example = _load_example()
    language_model = _tiny_language_model(tmp_path / "lm")
    out = tmp_path / "run"
    argv = [
        "--quick",
        "--output_dir",
        str(out),
        "--language_model",
        str(language_model),
        "--wordnet_dir",
        str(WORDNET_SAMPLE),
        "--test_fraction",
        "0.5",
        "--reference_embedder",
        "none",
        "--gradient_cache_mini_batch",
        "2",
        "--variants",
        "contrastive only",
        "CAFe 1:10 + Matryoshka",
        "CAFe 1:10 + Matryoshka 1/4",
        "CAFe 1:10 + Matryoshka 1/4, running principal rotation",
    ]
    summary = example.main(argv)
    assert list(summary) == [
        "base (SmolLM2 + stage 1)",
        "contrastive only",
        "CAFe 1:10 + Matryoshka",
        "CAFe 1:10 + Matryoshka 1/4",
        "CAFe 1:10 + Matryoshka 1/4, running principal rotation",
    ]
    results = json.loads((out / "results.json").read_text())
    for name, runs in results["runs"].items():
        metrics = runs[0]
        for _, key in example.METRICS:
            assert key in metrics, (name, key)
        assert 0 <= metrics["wn_def2word_R@1"] <= 1 and metrics["ppl_definitions"] > 1
    # The Matryoshka sizes reach the saved CAFe settings of the run (its weights are deleted after
    # evaluation unless --keep_checkpoints; the training log records the loss terms).
    log = json.loads((out / "cafe-1-10-matryoshka-seed0" / "train_log.json").read_text())
    assert any("loss_con" in entry for entry in log)
    assert not (out / "cafe-1-10-matryoshka-seed0" / "final").exists()
    assert (out / "tradeoff.png").stat().st_size > 0
    # The 64-wide test LM keeps one size of [576, 256, 128, 64], with its weight of 1/4.
    settings = json.loads((out / "cafe-1-10-matryoshka-1-4-seed0" / "training_args.json").read_text())
    assert settings["matryoshka_dims"] == [64] and settings["matryoshka_weights"] == [0.25]
    assert settings["gradient_cache"] and settings["gradient_cache_mini_batch_size"] == 2
    rotated = json.loads(
        (out / "cafe-1-10-matryoshka-1-4-running-principal-rotation-seed0" / "training_args.json").read_text()
    )
    assert rotated["matryoshka_rotation"] and rotated["matryoshka_rotation_method"] == "principal"
    assert "| contrastive only | 1 |" in (out / "results.md").read_text()

    # Resume: every stage's metrics are read back, nothing is trained or evaluated again.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    assert example.main(argv) == summary
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == stamps


def test_a_killed_fine_tune_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    """Runs take 40-100 minutes on CPU: one killed mid-stage restarts from its newest checkpoint
    (weights, optimizer, scheduler, RNG and data-sampling state) and ends where an uninterrupted
    run ends; the checkpoints are deleted once the final weights are saved."""
    import argparse

    import pytest
    import torch

    example = _load_example()
    language_model = _tiny_language_model(tmp_path / "lm")
    out = tmp_path / "run"
    common = ["--quick", "--output_dir", str(out), "--language_model", str(language_model)]
    common += ["--wordnet_dir", str(WORDNET_SAMPLE), "--test_fraction", "0.5", "--reference_embedder", "none"]
    # Composes and trains the stage-1 base; the kept checkpoints feed the truncation diagnostics.
    principal = "CAFe 1:10 + Matryoshka 1/4, principal basis"
    example.main([*common, "--variants", "contrastive only", principal, "--keep_checkpoints"])
    # The principal-basis run trained, and saved, in the base model's principal basis.
    served = example.CafeForConditionalGeneration.from_pretrained(
        out / "cafe-1-10-matryoshka-1-4-principal-basis-seed0" / "final", load_processor=False
    ).embedding_rotation
    assert served is not None and not torch.allclose(served, torch.eye(64), atol=1e-3)
    torch.testing.assert_close(served @ served.T, torch.eye(64), atol=1e-5, rtol=0)
    assert json.loads((out / "cafe-1-10-matryoshka-1-4-principal-basis-seed0" / "run_settings.json").read_text())[
        "principal_basis"
    ]
    names = ["contrastive-only-seed0", "cafe-1-10-matryoshka-1-4-principal-basis-seed0"]
    diagnostics_module = _load_example(DIAGNOSTICS)
    # Sizes below the test LM's 64 dimensions, so that the cuts differ.
    monkeypatch.setattr(diagnostics_module, "SIZES", (32, 8))
    diagnostics = diagnostics_module.main([str(out), *names, "--fit_synsets", "1000", "8", "--base_rotation"])
    for name in names:
        found = diagnostics[name]
        for kind in ("prefix", "random", "rotated", "rotated_8_synsets", "ceiling", "base_rotated"):
            assert 0 <= found[f"{kind}@8"] <= 1 and 0 <= found[f"{kind}@32"] <= 1
    assert json.loads((out / "truncation_diagnostics.json").read_text()) == diagnostics
    data = example.build_data(
        out,
        argparse.Namespace(
            num_train_images=8, num_test_images=4, num_train_synsets=8, num_test_synsets=4, num_define=2,
            num_perplexity=2, wordnet_dir=str(WORDNET_SAMPLE), test_fraction=0.5,
        ),
    )  # fmt: skip
    records = example.shape_records(data["shapes_train"]) + example.wordnet_records(data["wordnet_train"])
    base = out / "base" / "final"

    # The rotated metrics of a model that already serves a rotation are those of the same model
    # without it: the refit happens in the LM's own coordinates, and the held-out vectors are taken
    # back there first. Compared on the vectors the metric is computed from (R@1 over 4 synsets is
    # too coarse to tell).
    model = example.CafeForConditionalGeneration.from_pretrained(base).eval()
    test = data["wordnet_test"]
    measured = []
    truncated_recall = example.truncated_recall

    def recording(definitions, words, suffix=""):
        measured.append((definitions, words))
        return truncated_recall(definitions, words, suffix)

    monkeypatch.setattr(example, "truncated_recall", recording)

    def rotated_vectors():
        words = model.encode(texts=[s.words for s in test])
        definitions = model.encode(texts=[s.definition for s in test])
        example.rotated_truncated_recall(model, data, definitions, words, batch_size=4)
        return measured[-1]

    plain = rotated_vectors()
    some_rotation = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))[0]
    model.set_embedding_rotation(some_rotation)
    for got, expected in zip(rotated_vectors(), plain, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(model.embedding_rotation, some_rotation)  # the model keeps the rotation it had

    def fine_tune(folder):
        return example.train(base, records, data, tmp_path / folder, 1.0, 10.0, 4, 4, 1e-3, seed=0)

    uninterrupted = fine_tune("uninterrupted")

    trainer_class = example.CafeTrainer

    class Killed(Exception):
        pass

    class KilledAfterFirstCheckpoint(trainer_class):
        def _save_checkpoint(self, *args, **kwargs):
            super()._save_checkpoint(*args, **kwargs)
            raise Killed

    monkeypatch.setattr(example, "CafeTrainer", KilledAfterFirstCheckpoint)
    with pytest.raises(Killed):
        fine_tune("killed")
    assert [p.name for p in (tmp_path / "killed").glob("checkpoint-*")] == ["checkpoint-1"]
    # Rerun with another step count (or other data), the checkpoint is refused, not resumed into a
    # schedule it was not written for.
    with pytest.raises(
        ValueError, match=r"other settings \(steps 4 there, 6 now; records \d+ there, \d+ now; records_sha256 .*delete"
    ):
        example.train(base, records[:-1], data, tmp_path / "killed", 1.0, 10.0, 6, 4, 1e-3, seed=0)
    steps_taken = []  # global step before each optimizer step of the restarted run

    class Counting(trainer_class):
        def training_step(self, *args, **kwargs):
            steps_taken.append(self.state.global_step)
            return super().training_step(*args, **kwargs)

    monkeypatch.setattr(example, "CafeTrainer", Counting)
    capsys.readouterr()
    resumed = fine_tune("killed")
    assert "resuming killed from checkpoint-1" in capsys.readouterr().out
    assert steps_taken == [1, 2, 3]  # step 1 was not trained again

    assert not list((tmp_path / "killed").glob("checkpoint-*"))
    assert not list((tmp_path / "uninterrupted").glob("checkpoint-*"))
    log = json.loads((tmp_path / "killed" / "train_log.json").read_text())
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2, 3, 4]
    expected = example.CafeForConditionalGeneration.from_pretrained(uninterrupted, load_processor=False)
    got = example.CafeForConditionalGeneration.from_pretrained(resumed, load_processor=False)
    expected_state, got_state = expected.state_dict(), got.state_dict()
    start = example.CafeForConditionalGeneration.from_pretrained(base, load_processor=False).state_dict()
    moved = [key for key in expected_state if not torch.equal(expected_state[key], start[key])]
    assert moved  # the fine-tune changed weights, so equal weights below mean the same 4 steps
    for key in expected_state:
        torch.testing.assert_close(got_state[key], expected_state[key], rtol=0, atol=1e-6, msg=key)


def test_bad_arguments_are_refused_before_any_stage(tmp_path, capsys):
    import pytest

    example = _load_example()
    for mini_batch in ("0", "9"):
        with pytest.raises(SystemExit):
            example.main(["--output_dir", str(tmp_path / "out"), "--gradient_cache_mini_batch", mini_batch])
        assert "--gradient_cache_mini_batch must be between 1 and --batch_size (8)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        example.main(["--output_dir", str(tmp_path / "out"), "--variants", "CAFe 1:100"])
    assert "unknown variants ['CAFe 1:100']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        example.main(["--output_dir", str(tmp_path / "out"), "--hard_negatives", "1", "--reference_embedder", "none"])
    assert "--hard_negatives must be >= 0 and needs a --reference_embedder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the composition and stage 1


def test_mined_hard_negatives_are_other_training_definitions(tmp_path, capsys):
    """`--hard_negatives`: sentence-transformers' `mine_hard_negatives` with a (tiny, local) embedder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import StaticEmbedding

    from cafe.data.wordnet import read_wordnet, retrieval_synsets
    from cafe.testing import train_tiny_tokenizer

    example = _load_example()
    tokenizer = train_tiny_tokenizer().backend_tokenizer
    SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=16)]).save(str(tmp_path / "embedder"))
    records = example.wordnet_records(retrieval_synsets(read_wordnet(WORDNET_SAMPLE)))
    mined = example.with_mined_negatives(records, str(tmp_path / "embedder"), 2)

    definitions = [r["conversations"][1]["value"] for r in records]
    assert [{k: v for k, v in r.items() if k != "negatives"} for r in mined] == records  # nothing else changes
    with_negatives = [r for r in mined if r["negatives"]]
    assert with_negatives, "no record got a negative"
    for record in with_negatives:
        assert len(record["negatives"]) == 2
        assert set(record["negatives"]) <= set(definitions)
        assert record["conversations"][1]["value"] not in record["negatives"]
    got_none = len(mined) - len(with_negatives)
    assert f"2 per WordNet record mined with {tmp_path / 'embedder'}; {got_none} of {len(mined)} got none" in (
        capsys.readouterr().out
    )
