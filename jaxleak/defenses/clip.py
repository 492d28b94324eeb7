"""Update clipping: ``clip_norm`` (global L2 norm) and ``clip_value`` (per-coordinate clamp).

The FM paper clips the update "with bound 0.05" without saying which (NOTES section 4).
``clip-value`` is the default reading for that row: a norm clip only rescales the
update, and the cosine-matching attacks of the paper cannot see a rescaling, so it
would not be a defense against them at all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray, PyTree

from jaxleak.defenses.base import Defense, check_number
from jaxleak.privacy.clipping import clip_by_global_norm

__all__ = ["clip_norm", "clip_value"]


def clip_norm(c: float) -> Defense:
    """Rescales the update so its global L2 norm over all leaves is at most ``c``.

    An update already inside the ball is returned unchanged (factor exactly 1). Note that
    a rescaling is invisible to a cosine attack; see :func:`clip_value` for the reading of
    the FM paper's "bound 0.05".

    Args:
      c: the bound (> 0).

    Returns:
      An update-stage ``Defense``.

    Raises:
      ValueError: on a non-positive or non-finite ``c``.

    >>> u = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    >>> out = clip_norm(1.0).apply(u, jax.random.PRNGKey(0))
    >>> round(float(out["a"][0]), 3), round(float(out["b"][0]), 3)
    (0.6, 0.8)
    """
    c = check_number("clip-norm bound", c, low=0.0, low_open=True)

    def apply(update: PyTree, key: PRNGKeyArray) -> PyTree:
        del key
        return clip_by_global_norm(update, c)[0]

    return Defense(name="clip-norm", stage="update", apply=apply,
                   meta={"name": "clip-norm", "c": c})


def clip_value(c: float) -> Defense:
    """Clamps every coordinate of the update to ``[-c, c]``.

    The FM paper's "update clipping with bound 0.05" is ambiguous (a per-coordinate clamp
    or a global norm clip). This clamp is the default reading for the paper's row: a norm
    clip (:func:`clip_norm`) only rescales the update, which a cosine attack cannot see,
    while a clamp changes its direction.

    Args:
      c: the bound (> 0).

    Returns:
      An update-stage ``Defense``.

    Raises:
      ValueError: on a non-positive or non-finite ``c``.

    >>> clip_value(0.5).apply({"w": jnp.array([-1.0, 0.25, 2.0])}, None)["w"].tolist()
    [-0.5, 0.25, 0.5]
    """
    c = check_number("clip-value bound", c, low=0.0, low_open=True)

    def apply(update: PyTree, key: PRNGKeyArray) -> PyTree:
        del key
        return jax.tree_util.tree_map(lambda u: jnp.clip(u, -c, c), update)

    return Defense(name="clip-value", stage="update", apply=apply,
                   meta={"name": "clip-value", "c": c})
