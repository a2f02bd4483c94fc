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
WORDNET_SAMPLE = Path(__file__).parent / "data" / "wordnet"


def _load_example():
    spec = importlib.util.spec_from_file_location("cafe_real_lm_example", EXAMPLE)
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
    ]
    summary = example.main(argv)
    assert list(summary) == [
        "base (SmolLM2 + stage 1)",
        "contrastive only",
        "CAFe 1:10 + Matryoshka",
        "CAFe 1:10 + Matryoshka 1/4",
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
    assert "| contrastive only | 1 |" in (out / "results.md").read_text()

    # Resume: every stage's metrics are read back, nothing is trained or evaluated again.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    assert example.main(argv) == summary
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == stamps


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
    assert not (tmp_path / "out").exists()  # refused before the composition and stage 1
