"""Quantization of the update, per leaf: sign (1 bit) or uniform symmetric (``bits >= 2``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from jaxleak.defenses.base import Defense, check_int

__all__ = ["quantize"]

# float32 carries a 24-bit significand: more levels than that quantize nothing.
MAX_BITS = 24


def _sign_leaf(u: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    return jnp.sign(u) * jnp.mean(jnp.abs(u))


def _uniform_leaf(u: Float[Array, "*shape"], levels: int) -> Float[Array, "*shape"]:
    scale = jnp.max(jnp.abs(u)) / levels
    # An all-zero leaf has scale 0: divide by 1 instead, the product with scale is 0 anyway.
    steps = jnp.clip(jnp.round(u / jnp.where(scale > 0, scale, 1.0)), -levels, levels)
    return (steps * scale).astype(u.dtype)


def quantize(bits: int) -> Defense:
    """Quantizes every leaf of the update to ``bits`` bits.

    * ``bits = 1``: sign quantization, ``sign(u) * mean(|u|)`` per leaf, so the scale of
      the update survives (exact zeros stay 0).
    * ``bits >= 2``: uniform symmetric, ``L = 2**(bits-1) - 1`` levels each side of 0 with
      step ``max|u| / L`` per leaf, rounded to nearest (``2**bits - 1`` values at most;
      8 bits is the common case).

    Args:
      bits: 1 to 24.

    Returns:
      An update-stage ``Defense``.

    Raises:
      ValueError: on ``bits`` that is not an integer in ``[1, 24]``.

    >>> u = {"w": jnp.array([1.5, -0.5, 0.5, -1.5])}
    >>> quantize(1).apply(u, None)["w"].tolist()  # mean |u| = 1
    [1.0, -1.0, 1.0, -1.0]
    >>> quantize(2).apply(u, None)["w"].tolist()  # L = 1 level each side: {-1.5, 0, 1.5}
    [1.5, -0.0, 0.0, -1.5]
    """
    bits = check_int("quantize bits", bits, low=1, high=MAX_BITS)
    if bits == 1:
        leaf = _sign_leaf
    else:
        levels = 2 ** (bits - 1) - 1
        leaf = lambda u: _uniform_leaf(u, levels)

    def apply(update: PyTree, key: PRNGKeyArray) -> PyTree:
        del key
        return jax.tree_util.tree_map(leaf, update)

    return Defense(name="quantize", stage="update", apply=apply,
                   meta={"name": "quantize", "bits": bits})
