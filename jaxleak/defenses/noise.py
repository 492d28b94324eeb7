"""Noise on every coordinate of the released update: ``gaussian`` and ``laplace``.

The FM paper's noise defense (NOTES section 4): an absolute std on the update itself, no
clipping, so no DP guarantee (an unbounded update has no sensitivity).
"""

from __future__ import annotations

import jax
from jaxtyping import PRNGKeyArray, PyTree

from jaxleak.defenses.base import Defense, check_number
from jaxleak.defenses.dp import _noise_like

__all__ = ["gaussian", "laplace"]


def _add_noise(scale: float, mechanism: str):
    def apply(update: PyTree, key: PRNGKeyArray) -> PyTree:
        return jax.tree_util.tree_map(lambda u, n: u + n, update,
                                      _noise_like(key, update, scale, mechanism))

    return apply


def gaussian(std: float) -> Defense:
    """Adds ``N(0, std^2)`` to every coordinate of the update, independently.

    Args:
      std: the absolute noise std (``>= 0``; 0 is the identity).

    Returns:
      An update-stage ``Defense``; ``meta`` also holds ``noise_std`` and ``noise_variance``.

    Raises:
      ValueError: on a negative or non-finite ``std``.

    >>> import jax.numpy as jnp
    >>> d = gaussian(0.0)
    >>> d.apply({"w": jnp.ones(3)}, jax.random.PRNGKey(0))["w"].tolist(), d.meta["std"]
    ([1.0, 1.0, 1.0], 0.0)
    """
    std = check_number("gaussian std", std, low=0.0)
    meta = {"name": "gaussian", "std": std, "noise_std": std, "noise_variance": std**2}
    return Defense(name="gaussian", stage="update", apply=_add_noise(std, "gaussian"), meta=meta)


def laplace(scale: float) -> Defense:
    """Adds Laplace noise of scale ``b`` (std ``sqrt(2) b``) to every coordinate of the update.

    Args:
      scale: the Laplace scale ``b >= 0``.

    Returns:
      An update-stage ``Defense``; ``meta`` also holds ``noise_std`` and ``noise_variance``.

    Raises:
      ValueError: on a negative or non-finite ``scale``.

    >>> laplace(0.5).meta["noise_variance"]
    0.5
    """
    scale = check_number("laplace scale", scale, low=0.0)
    meta = {"name": "laplace", "scale": scale, "noise_std": 2**0.5 * scale,
            "noise_variance": 2.0 * scale**2}
    return Defense(name="laplace", stage="update", apply=_add_noise(scale, "laplace"), meta=meta)
