"""Gradient-matching distances, image priors and the attacker's dummy gradient.

Everything here is written for ONE target update (a params-shaped pytree) and
ONE dummy batch; the driver vmaps over targets and restarts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree

from jaxleak.capture.io import flatten_tree, unflatten_tree

# --------------------------------------------------------------------------- layer weights


def layer_weights(
    params: PyTree,
    *,
    layers: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
) -> PyTree:
    """A params-shaped tree of scalar weights for the matching distances.

    Args:
      params: the victim's ``params`` (only its structure and paths are used).
      layers: path prefixes (``"conv0"``, ``"head/kernel"``, ...) of the leaves
        to match; ``None`` keeps every leaf (the reference setting).
      weights: one weight per entry of ``layers`` (or per leaf in path order
        when ``layers`` is ``None``); default 1 for each.

    Returns:
      A tree with the structure of ``params`` holding float weights (0 = ignored).

    Raises:
      ValueError: an entry of ``layers`` matches no leaf, or ``weights`` has the
        wrong length.

    >>> import numpy as np
    >>> layer_weights({"a": {"kernel": np.ones(2)}, "b": {"bias": np.ones(1)}}, layers=["b"])
    {'a': {'kernel': 0.0}, 'b': {'bias': 1.0}}
    """
    flat = flatten_tree(jax.tree_util.tree_map(lambda a: a, dict(params)))
    paths = list(flat)
    out = dict.fromkeys(paths, 0.0)
    if layers is None:
        if weights is not None and len(weights) != len(paths):
            raise ValueError(f"weights must give one value per leaf ({len(paths)}: {paths}), "
                             f"got {len(weights)}")
        for i, path in enumerate(paths):
            out[path] = 1.0 if weights is None else float(weights[i])
        return unflatten_tree(out)
    if weights is not None and len(weights) != len(layers):
        raise ValueError(f"weights must give one value per entry of layers ({len(layers)}), "
                         f"got {len(weights)}")
    for i, prefix in enumerate(layers):
        hits = [p for p in paths if p == prefix or p.startswith(prefix.rstrip("/") + "/")]
        if not hits:
            raise ValueError(f"layer {prefix!r} matches no parameter; parameters are {paths}")
        for p in hits:
            out[p] = 1.0 if weights is None else float(weights[i])
    return unflatten_tree(out)


# --------------------------------------------------------------------------- distances


def _leaf_sums(fn, a: PyTree, b: PyTree, w: PyTree) -> Array:
    terms = jax.tree_util.tree_map(lambda x, y, s: s * fn(x, y), a, b, w)
    return sum(jax.tree_util.tree_leaves(terms))


def l2_distance(trial: PyTree, target: PyTree, weights: PyTree) -> Float[Array, ""]:
    """DLG's distance: ``sum_l w_l ||trial_l - target_l||^2`` over all leaves.

    >>> import jax.numpy as jnp
    >>> float(l2_distance({"a": jnp.ones(3)}, {"a": jnp.zeros(3)}, {"a": 2.0}))
    6.0
    """
    return _leaf_sums(lambda x, y: jnp.sum((x - y) ** 2), trial, target, weights)


def cosine_distance(trial: PyTree, target: PyTree, weights: PyTree) -> Float[Array, ""]:
    """Inverting Gradients' global cosine distance over all (weighted) layers together.

    ``1 - sum_l w_l <t_l, g_l> / (sqrt(sum_l w_l ||t_l||^2) sqrt(sum_l w_l ||g_l||^2))``:
    one cosine of the concatenated update, not a mean of per-layer cosines.

    >>> import jax.numpy as jnp
    >>> float(cosine_distance({"a": jnp.ones(3)}, {"a": 2 * jnp.ones(3)}, {"a": 1.0}))
    0.0
    """
    dot = _leaf_sums(lambda x, y: jnp.sum(x * y), trial, target, weights)
    nt = _leaf_sums(lambda x, y: jnp.sum(x * x), trial, target, weights)
    ng = _leaf_sums(lambda x, y: jnp.sum(y * y), trial, target, weights)
    return 1.0 - dot / (jnp.sqrt(nt) * jnp.sqrt(ng) + 1e-20)


def wasserstein_distance(trial: PyTree, target: PyTree, weights: PyTree) -> Float[Array, ""]:
    """GRNN's term: per leaf, the 1-D Wasserstein-1 distance between the value distributions.

    For two samples of equal size it is the mean absolute difference of the sorted values.
    """
    return _leaf_sums(lambda x, y: jnp.mean(jnp.abs(jnp.sort(x.ravel()) - jnp.sort(y.ravel()))),
                      trial, target, weights)


DISTANCES = {"l2": l2_distance, "cosine": cosine_distance, "wasserstein": wasserstein_distance}


# --------------------------------------------------------------------------- priors


def total_variation(images: Float[Array, "*b h w c"]) -> Float[Array, ""]:
    """Anisotropic TV as in Inverting Gradients: mean |dx| + mean |dy|."""
    dx = jnp.mean(jnp.abs(images[..., :, 1:, :] - images[..., :, :-1, :]))
    dy = jnp.mean(jnp.abs(images[..., 1:, :, :] - images[..., :-1, :, :]))
    return dx + dy


def l2_prior(images: Float[Array, "*b h w c"]) -> Float[Array, ""]:
    """Mean squared pixel value (GradInversion's image-norm prior)."""
    return jnp.mean(images**2)


def batchnorm_prior(victim, variables: PyTree, images: Float[Array, "b h w c"]) -> Float[Array, ""]:
    """GradInversion's BN prior: ``sum_l ||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2``.

    ``mu_l(x)``, ``var_l(x)`` are the statistics of the dummy batch at the input
    of every BatchNorm layer; ``mu_l``, ``var_l`` the victim's running
    statistics. 0 for models without BatchNorm.
    """
    if not victim.has_batch_stats:
        return jnp.zeros((), images.dtype)
    terms: list[Array] = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
            x = args[0]
            axes = tuple(range(x.ndim - 1))
            mean, var = jnp.mean(x, axes), jnp.var(x, axes)
            terms.append(jnp.linalg.norm(mean - module.get_variable("batch_stats", "mean"))
                         + jnp.linalg.norm(var - module.get_variable("batch_stats", "var")))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        victim.module.apply(variables, images, train=False)
    return sum(terms) if terms else jnp.zeros((), images.dtype)


# --------------------------------------------------------------------------- dummy gradient


def batch_loss(
    victim,
    params: PyTree,
    batch_stats: PyTree | None,
    images: Float[Array, "b h w c"],
    label_probs: Float[Array, "b k"],
) -> Float[Array, ""]:
    """Mean of :meth:`jaxleak.models.Victim.soft_losses` over a batch (BatchNorm in inference mode).

    With one-hot ``label_probs`` its gradient equals the FedSGD update of
    :func:`jaxleak.capture.capture_updates` without protection (mean of the
    per-example gradients). A PRECODE victim runs its bottleneck's mean path with its KL term.
    """
    variables: dict[str, Any] = {"params": params}
    if victim.has_batch_stats:
        variables["batch_stats"] = batch_stats
    return jnp.mean(victim.soft_losses(variables, images, label_probs))


def dummy_gradient(
    victim,
    variables: Mapping[str, PyTree],
    images: Float[Array, "b h w c"],
    label_probs: Float[Array, "b k"],
) -> PyTree:
    """The update a client holding ``images`` with (soft) labels would send: ``grad_params``."""
    return jax.grad(batch_loss, argnums=1)(
        victim, variables["params"], variables.get("batch_stats"), images, label_probs)


__all__ = [
    "DISTANCES",
    "batch_loss",
    "batchnorm_prior",
    "cosine_distance",
    "dummy_gradient",
    "l2_distance",
    "l2_prior",
    "layer_weights",
    "total_variation",
    "wasserstein_distance",
]
