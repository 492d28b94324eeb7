"""The surrogate model of SME, shared by the FedAvg attacks (SME, FM, flow-latent).

A FedAvg client releases ``u = w0 - w1`` after several local steps. SME's observation
(Zhu et al. 2023): the images' gradient at a point on the segment between ``w0`` and
``w1`` is nearly parallel to ``u``. So the attacks match ``grad_w L(x, y; w_alpha)``
against ``u`` by cosine, with ``w_alpha = (1 - alpha) w0 + alpha w1 = w0 - alpha u`` and
``alpha`` in [0, 1] learned with the images. Everything here is for ONE client.

**Adam clients** (``update_model="adam"``, this project's variant, not in SME or the FM paper). A client
under Adam sends ``lr * m_hat / (sqrt(v_hat) + eps)`` per step: after one step that is
``lr * sign(g)`` up to ``eps``, not a multiple of ``g``. The variant compares ``u`` with the soft sign
``g / (|g| + kappa * rms(g))`` of the trial gradient (``rms`` per parameter tensor), which tends to
``sign(g)`` as ``kappa -> 0`` and keeps a usable gradient at ``kappa > 0`` (the exact sign has none).
Measured in experiments/flow_matching/README.md ("Adam clients").
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
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


UPDATE_MODELS = ("gradient", "adam")


def soft_sign(g: Float[Array, "*s"], kappa: float) -> Float[Array, "*s"]:
    """``g / (|g| + kappa * rms(g))``: Adam's first step ``g / (|g| + eps)`` with a relative ``eps``.

    >>> soft_sign(jnp.array([3.0, -4.0]), 0.0).tolist()
    [1.0, -1.0]
    """
    rms = jnp.sqrt(jnp.mean(jnp.square(g)))
    return g / (jnp.abs(g) + kappa * rms + 1e-30)


def surrogate_matching(
    victim,
    variables: Mapping[str, PyTree],
    update: PyTree,
    alpha: Float[Array, ""],
    images: Float[Array, "m h w c"],
    label_probs: Float[Array, "m k"],
    weights: PyTree,
    *,
    update_model: str = "gradient",
    kappa: float = 0.01,
) -> Float[Array, ""]:
    """``1 - cos(grad_w L(images, labels; w_alpha), update)`` over all (weighted) parameters at once.

    One global cosine of the flattened update, not a mean of per-layer cosines (NOTES section 4).
    The sign matters: ``update`` is the descent step ``w0 - w1``, parallel to a gradient.
    ``update_model="adam"`` puts the trial gradient through :func:`soft_sign` (``kappa``) first.
    """
    if update_model not in UPDATE_MODELS:
        raise ValueError(f"update_model must be one of {UPDATE_MODELS}, got {update_model!r}")
    trial = dummy_gradient(victim, surrogate_variables(variables, update, alpha), images, label_probs)
    if update_model == "adam":
        trial = jax.tree_util.tree_map(lambda g: soft_sign(g, kappa), trial)
    return cosine_distance(trial, update, weights)


__all__ = ["UPDATE_MODELS", "soft_sign", "surrogate_matching", "surrogate_variables"]
