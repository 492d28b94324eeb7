"""Magnitude sparsification of the update: ``prune_smallest`` and ``keep_largest``.

The FM paper's "magnitude sparsification at 5%" is ambiguous (NOTES section 4): prune
the smallest 5% of coordinates, or keep only the largest 5%. Both exist, named for
what they do. The rule, for both: per tensor (each leaf of the update on its own),
exactly ``k = round(fraction * leaf.size)`` coordinates are pruned / kept (Python's
``round``, halves to even), chosen by ``jax.lax.top_k`` on the magnitudes, so ties
never change the count: among equal magnitudes the lower flat index is taken first.
A leaf too small for ``fraction`` to reach half a coordinate (e.g. a 10-entry bias at
5%) loses / keeps nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from jaxleak.defenses.base import Defense, check_number

__all__ = ["keep_largest", "prune_smallest"]


def _prune_leaf(u: Float[Array, "*shape"], fraction: float) -> Float[Array, "*shape"]:
    k = round(fraction * u.size)
    if k == 0:
        return u
    flat = u.reshape(-1)
    _, smallest = jax.lax.top_k(-jnp.abs(flat), k)
    return flat.at[smallest].set(0).reshape(u.shape)


def _keep_leaf(u: Float[Array, "*shape"], fraction: float) -> Float[Array, "*shape"]:
    k = round(fraction * u.size)
    if k == u.size:
        return u
    flat = u.reshape(-1)
    _, largest = jax.lax.top_k(jnp.abs(flat), k)
    return jnp.zeros_like(flat).at[largest].set(flat[largest]).reshape(u.shape)


def prune_smallest(fraction: float) -> Defense:
    """Zeroes the smallest ``fraction`` of each leaf's coordinates by magnitude.

    Exactly ``round(fraction * leaf.size)`` coordinates per leaf are set to 0 (module
    docstring: the rule and its ties).

    Args:
      fraction: in ``[0, 1]``.

    Returns:
      An update-stage ``Defense``.

    Raises:
      ValueError: on a fraction outside ``[0, 1]``.

    >>> import jax.numpy as jnp
    >>> prune_smallest(0.5).apply({"w": jnp.array([3.0, -1.0, 2.0, -4.0])}, None)["w"].tolist()
    [3.0, 0.0, 0.0, -4.0]
    """
    fraction = check_number("prune-smallest fraction", fraction, low=0.0, high=1.0)

    def apply(update: PyTree, key: PRNGKeyArray) -> PyTree:
        del key
        return jax.tree_util.tree_map(lambda u: _prune_leaf(u, fraction), update)

    return Defense(name="prune-smallest", stage="update", apply=apply,
                   meta={"name": "prune-smallest", "fraction": fraction})


def keep_largest(fraction: float) -> Defense:
    """Keeps only the largest ``fraction`` of each leaf's coordinates by magnitude.

    Exactly ``round(fraction * leaf.size)`` coordinates per leaf keep their value, the
    rest become 0 (module docstring: the rule and its ties).

    Args:
      fraction: in ``[0, 1]``.

    Returns:
      An update-stage ``Defense``.

    Raises:
      ValueError: on a fraction outside ``[0, 1]``.

    >>> import jax.numpy as jnp
    >>> keep_largest(0.25).apply({"w": jnp.array([3.0, -1.0, 2.0, -4.0])}, None)["w"].tolist()
    [0.0, 0.0, 0.0, -4.0]
    """
    fraction = check_number("keep-largest fraction", fraction, low=0.0, high=1.0)

    def apply(update: PyTree, key: PRNGKeyArray) -> PyTree:
        del key
        return jax.tree_util.tree_map(lambda u: _keep_leaf(u, fraction), update)

    return Defense(name="keep-largest", stage="update", apply=apply,
                   meta={"name": "keep-largest", "fraction": fraction})
