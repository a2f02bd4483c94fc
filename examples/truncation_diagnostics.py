"""Where does a trained model keep its retrieval? Truncation diagnostics for `reproduce_real_lm.py` runs.

For each run's saved checkpoint (``--keep_checkpoints``), definition -> word R@1 over the held-out
WordNet synsets with the vectors cut to ``k`` dimensions four ways:

- ``prefix``: the first ``k`` coordinates (what ``truncate_dim=k`` keeps without a rotation);
- ``random``: ``k`` coordinates drawn at random (mean of 5 draws): if the prefix is no better, the
  model has not ordered its coordinates;
- ``rotated``: the first ``k`` after `fit_embedding_rotation` on the words and definitions of the
  first 1,000 training synsets (the deployable fix; ``--fit_synsets`` adds other sample sizes as
  ``rotated_{n}_synsets``);
- ``raw`` (for a run saved with a rotation, e.g. one learned with ``matryoshka_rotation``): the first
  ``k`` of the language model's own coordinates, the rotation taken off again;
- ``ceiling``: the best ``k``-dimensional subspace of the held-out vectors themselves (fitted on the
  evaluation set, so an upper bound, not a result);
- ``base_rotated`` (with ``--base_rotation``): the first ``k`` after the rotation fitted on the *base*
  model (the run's ``base/final``, same sample), i.e. a basis fixed before fine-tuning: what a run
  of the variant "..., principal basis" would serve had it trained without Matryoshka (InfoNCE on
  cosines does not depend on the basis).

Also the share of each unit vector's squared length in the first 128 coordinates (128/576 = 0.22
if spread evenly). Usage::

    python examples/truncation_diagnostics.py runs/real_lm_s10000_320 \\
        cafe-1-10-matryoshka-1-4-seed0 cafe-1-10-paper-seed0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import reproduce_real_lm  # noqa: E402  # its data layout and rotation sample

from cafe import CafeForConditionalGeneration  # noqa: E402
from cafe.rotation import principal_rotation  # noqa: E402

SIZES = (256, 128, 64)


def recall_at_1(queries: torch.Tensor, documents: torch.Tensor) -> float:
    queries, documents = F.normalize(queries, dim=-1), F.normalize(documents, dim=-1)
    return ((queries @ documents.T).argmax(1) == torch.arange(len(queries))).float().mean().item()


def encode_sample(model: CafeForConditionalGeneration, synsets: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Words and definitions of ``synsets``, embedded as the model serves them (bf16 autocast on CPU)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not torch.cuda.is_available()):
        words = model.encode(texts=[s.words for s in synsets], batch_size=32)
        definitions = model.encode(texts=[s.definition for s in synsets], batch_size=32)
    return words, definitions


def base_rotation(run: Path, data: dict) -> torch.Tensor:
    """The rotation `fit_embedding_rotation` gives the run's base model on the usual training sample,
    in the LM's own coordinates."""
    model = CafeForConditionalGeneration.from_pretrained(run / "base" / "final").eval()
    model.set_embedding_rotation(None)
    return principal_rotation(
        torch.cat(encode_sample(model, data["wordnet_train"][: reproduce_real_lm.ROTATION_FIT_SYNSETS]))
    )


def diagnose(
    run: Path, name: str, data: dict, fit_synsets: list[int], base: torch.Tensor | None = None
) -> dict[str, float]:
    model = CafeForConditionalGeneration.from_pretrained(run / name / "final").eval()
    test, train = data["wordnet_test"], data["wordnet_train"][: max(fit_synsets)]
    words, definitions = encode_sample(model, test)
    train_words, train_definitions = encode_sample(model, train)
    rotations = {
        "rotated" if n == reproduce_real_lm.ROTATION_FIT_SYNSETS else f"rotated_{n}_synsets": principal_rotation(
            torch.cat([train_words[:n], train_definitions[:n]])
        )
        for n in fit_synsets
    }
    rotations["ceiling"] = principal_rotation(torch.cat([words, definitions]))
    if model.embedding_rotation is not None:
        # Served vectors are x @ R^T: R takes them back to the LM's coordinates.
        rotations["raw"] = model.embedding_rotation.T
    if base is not None:
        # The vectors come rotated if the run was (a principal-basis variant): back to the LM's own
        # coordinates, where the base rotation was fitted, then into the base basis.
        served = model.embedding_rotation
        rotations["base_rotated"] = base if served is None else base @ served.T
    result = {"full": recall_at_1(definitions, words)}
    generator = torch.Generator().manual_seed(0)
    for k in SIZES:
        result[f"prefix@{k}"] = recall_at_1(definitions[:, :k], words[:, :k])
        draws = [torch.randperm(words.shape[1], generator=generator)[:k] for _ in range(5)]
        result[f"random@{k}"] = sum(recall_at_1(definitions[:, i], words[:, i]) for i in draws) / len(draws)
        for kind, rotation in rotations.items():
            result[f"{kind}@{k}"] = recall_at_1((definitions @ rotation.T)[:, :k], (words @ rotation.T)[:, :k])
    vectors = torch.cat([words, definitions])
    result["length_share_first_128"] = (vectors[:, :128] ** 2).sum(-1).mean().item()
    return {key: round(value, 4) for key, value in result.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a reproduce_real_lm.py --output_dir")
    parser.add_argument("names", nargs="+", help="run folders inside it, e.g. cafe-1-10-paper-seed0")
    parser.add_argument(
        "--fit_synsets",
        type=int,
        nargs="+",
        default=[reproduce_real_lm.ROTATION_FIT_SYNSETS],
        help="training synsets (their words and definitions) the rotation is fitted on; several sizes compare them",
    )
    parser.add_argument(
        "--base_rotation", action="store_true", help="also cut in the base model's principal basis (base_rotated@k)"
    )
    args = parser.parse_args(argv)
    settings = argparse.Namespace(**json.loads((args.run / "config.json").read_text()))
    data = reproduce_real_lm.build_data(args.run, settings)
    base = base_rotation(args.run, data) if args.base_rotation else None
    results = {}
    for name in args.names:
        results[name] = diagnose(args.run, name, data, args.fit_synsets, base)
        print(name, json.dumps(results[name]), flush=True)
    (args.run / "truncation_diagnostics.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
