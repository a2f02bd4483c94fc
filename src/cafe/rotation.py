"""An orthogonal rotation of the embedding space that puts the most informative directions first.

Cutting an embedding to its first ``k`` coordinates (``truncate_dim=k``) keeps whatever those
coordinates happen to hold. A VLM's last hidden state has no reason to order its coordinates:
measured on SmolLM2-135M after CAFe training (docs/sentence-transformers.md), its first 128 of 576
coordinates retrieve no better than a random 128, even after joint Matryoshka training, while the
best 128-dimensional subspace of the same vectors keeps 99 % of full-size recall. Rotating the
space so that coordinate ``i`` is the ``i``-th principal direction of the data makes every prefix
that subspace. The rotation is orthogonal, so full-size vectors keep every cosine similarity; only
truncated ones change.

The rotation is stored as sentence-transformers' stock ``Dense`` module (``bias=False``, identity
activation) between ``Pooling`` and ``Normalize`` (see `cafe.export`), so a saved checkpoint
applies it in ``SentenceTransformer(path, truncate_dim=k)`` without custom code, and
`CafeForConditionalGeneration` reads it back from there.

Why by hand: sentence-transformers' own recipe for smaller vectors (its dimensionality-reduction
example) fits scikit-learn's PCA into a ``Dense`` layer that also cuts the width. Here the layer
must stay square and orthogonal (``truncate_dim`` picks the size later, full size stays exact) and
the directions are those of unit vectors without centring; that is one ``torch.linalg.eigh``, and
scikit-learn is not a dependency.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Largest entry of |R R^T - I| accepted as orthogonal: float32 eigenvector matrices are orthogonal to ~1e-6;
# anything far above is not a rotation (and would change full-size similarities).
ORTHOGONALITY_TOLERANCE = 1e-3


def principal_rotation(embeddings: torch.Tensor) -> torch.Tensor:
    """The ``[D, D]`` orthogonal matrix whose rows are the principal directions of ``[N, D]`` embeddings.

    Rows are ordered by how much of the vectors' squared length they carry, largest first. The
    vectors are L2-normalised and not centred: the directions that keep most of each unit vector's
    length, i.e. most of its cosine similarities, when it is cut after them. Computed in float64
    on the CPU from the ``[D, D]`` second-moment matrix (a fraction of a second at D = 576 and a
    few thousand vectors).

    Args:
        embeddings: ``[N, D]``, embedded without a rotation. ``N`` vectors order only the first
            ``N`` directions (the rest complete the basis in no particular order, with a warning):
            fit on many more vectors than the size you will truncate to.
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] tensor, got shape {tuple(embeddings.shape)}.")
    count, size = embeddings.shape
    vectors = torch.nn.functional.normalize(embeddings.detach().to("cpu", torch.float64), dim=-1)
    if not torch.isfinite(vectors).all():
        raise ValueError("The embeddings contain NaN or infinite values; a rotation cannot be fitted on them.")
    if count < size:
        logger.warning(
            f"A rotation fitted on {count} vectors of size {size} orders only their first {count} directions; "
            f"truncating past {count} dimensions keeps an arbitrary subspace. Fit it on more inputs."
        )
    # The eigenvectors of the [D, D] second-moment matrix are the right singular vectors of the
    # vectors, without the [N, N] factor an SVD builds (memory quadratic in the sample).
    return principal_basis(vectors.T @ vectors).contiguous().to(torch.float32)


def principal_basis(second_moment: torch.Tensor) -> torch.Tensor:
    """The eigenvectors of a symmetric ``[D, D]`` second-moment matrix as rows, largest eigenvalue
    first: the rotation whose every prefix is the leading principal subspace. `eigh` returns a
    full orthonormal basis even when the matrix has rank < D (the rest in no particular order);
    its eigenvalues come in ascending order, hence the flip."""
    _, eigenvectors = torch.linalg.eigh(second_moment)
    return eigenvectors.flip(-1).T


def check_rotation(rotation: torch.Tensor, size: int) -> torch.Tensor:
    """``rotation`` as a float32 ``[size, size]`` matrix, or a ValueError naming what is wrong with it."""
    if not isinstance(rotation, torch.Tensor):
        raise TypeError(f"The embedding rotation must be a torch.Tensor, got {type(rotation).__name__}.")
    if tuple(rotation.shape) != (size, size):
        raise ValueError(
            f"The embedding rotation must be [{size}, {size}] (the embedding size), got {tuple(rotation.shape)}."
        )
    rotation = rotation.detach().to("cpu", torch.float32)
    error = (rotation.double() @ rotation.double().T - torch.eye(size, dtype=torch.float64)).abs().max().item()
    if not error <= ORTHOGONALITY_TOLERANCE:
        raise ValueError(
            f"The embedding rotation is not orthogonal (max |R R^T - I| = {error:.2e}): it would change "
            "full-size similarities. Fit one with fit_embedding_rotation, or pass an orthogonal matrix."
        )
    return rotation
