"""Similarity between batches of vectors (e.g. recovered vs true features)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # jaxtyping is a test-time dependency only
    from jax import Array
    from jaxtyping import ArrayLike, Float

# Guards 0/0 for all-zero rows; far below any product of norms of real features.
_EPS = 1e-12


def _cosine_one(a: Float[Array, " d"], b: Float[Array, " d"]) -> Float[Array, ""]:
    norms = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    return jnp.dot(a, b) / jnp.maximum(norms, _EPS)


_cosine_batch = jax.jit(jax.vmap(_cosine_one))


def cosine_similarity(
    a: Float[ArrayLike, "n ..."], b: Float[ArrayLike, "n ..."]
) -> Float[Array, " n"]:
    """Per-row cosine similarity, flattening every axis after the batch axis.

    Args:
        a: Array ``[N, ...]`` with at least two axes; axis 0 is the batch.
        b: Array with the same shape as ``a``.

    Returns:
        ``[N]`` float32 values in [-1, 1]; a row that is all zeros in ``a`` or
        ``b`` gives 0.

    Raises:
        ValueError: If the shapes differ or the inputs have fewer than two axes.

    >>> import numpy as np
    >>> a = np.array([[1.0, 0.0], [1.0, 1.0]])
    >>> b = np.array([[0.0, 2.0], [3.0, 3.0]])
    >>> cosine_similarity(a, b).round(4).tolist()
    [0.0, 1.0]
    """
    a = jnp.asarray(a, dtype=jnp.float32)
    b = jnp.asarray(b, dtype=jnp.float32)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}.")
    if a.ndim < 2:
        raise ValueError(f"expected a batch [N, ...] with at least two axes, got shape {a.shape}.")
    n = a.shape[0]
    return _cosine_batch(a.reshape(n, -1), b.reshape(n, -1))
