"""The surrogate model of SME, shared by the FedAvg attacks (SME, FM, flow-latent).

A FedAvg client releases ``u = w0 - w1`` after several local steps. SME's observation
(Zhu et al. 2023): the images' gradient at a point on the segment between ``w0`` and
``w1`` is nearly parallel to ``u``. So the attacks match ``grad_w L(x, y; w_alpha)``
against ``u`` by cosine, with ``w_alpha = (1 - alpha) w0 + alpha w1 = w0 - alpha u`` and
``alpha`` in [0, 1] learned with the images. Everything here is for ONE client.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jaxtyping import Array, Float, PyTree

from jaxleak.attacks.optimization._matching import cosine_distance, dummy_gradient


def surrogate_variables(variables: Mapping[str, PyTree], update: PyTree,
                        alpha: Float[Array, ""]) -> dict[str, PyTree]:
    """``variables`` with ``params`` moved to ``w_alpha = w0 - alpha (w0 - w1)``.

    BatchNorm statistics stay those of ``w0`` (local training runs BN in inference mode).

    >>> import jax.numpy as jnp
    >>> v = surrogate_variables({"params": {"w": jnp.ones(2)}}, {"w": jnp.full(2, 0.5)}, jnp.float32(0.5))
    >>> v["params"]["w"].tolist()
    [0.75, 0.75]
    """
    params = jax.tree_util.tree_map(lambda w, u: w - alpha * u, variables["params"], update)
    return {**variables, "params": params}


def surrogate_matching(
    victim,
    variables: Mapping[str, PyTree],
    update: PyTree,
    alpha: Float[Array, ""],
    images: Float[Array, "m h w c"],
    label_probs: Float[Array, "m k"],
    weights: PyTree,
) -> Float[Array, ""]:
    """``1 - cos(grad_w L(images, labels; w_alpha), update)`` over all (weighted) parameters at once.

    One global cosine of the flattened update, not a mean of per-layer cosines (NOTES section 4).
    The sign matters: ``update`` is the descent step ``w0 - w1``, parallel to a gradient.
    """
    trial = dummy_gradient(victim, surrogate_variables(variables, update, alpha), images, label_probs)
    return cosine_distance(trial, update, weights)


__all__ = ["surrogate_matching", "surrogate_variables"]
