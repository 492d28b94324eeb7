"""L2 clipping of gradient pytrees (one example or one update at a time)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree


def global_norm(tree: PyTree) -> Float[Array, ""]:
    """L2 norm of all leaves of ``tree`` taken together."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm(tree: PyTree, clip: float) -> tuple[PyTree, Float[Array, ""]]:
    """Scales ``tree`` so that its global L2 norm is at most ``clip``.

    Trees already inside the ball are returned unchanged (factor exactly 1),
    which is what DP-SGD prescribes: ``g * min(1, C / ||g||)``.

    Args:
      tree: gradients of one example (or one client update).
      clip: the bound ``C > 0``.

    Returns:
      ``(clipped_tree, norm_before_clipping)``.

    >>> import jax.numpy as jnp
    >>> clipped, norm = clip_by_global_norm({"w": jnp.array([3.0, 4.0])}, 1.0)
    >>> [round(float(v), 3) for v in clipped["w"]], float(norm)
    ([0.6, 0.8], 5.0)
    """
    norm = global_norm(tree)
    # where() keeps the factor exactly 1.0 inside the ball, so small gradients are bit-identical.
    factor = jnp.where(norm > clip, clip / jnp.maximum(norm, 1e-30), 1.0)
    return jax.tree_util.tree_map(lambda x: x * factor.astype(x.dtype), tree), norm
