"""FGLA's feature extraction: the head's input read off the label row of its gradient.

For a dense head and softmax cross-entropy, one example of label ``y`` gives
``gW_j = (p_j - [j = y]) x`` and ``gb_j = p_j - [j = y]``. FGLA (Xue et al.,
2023) takes the label row and subtracts an *offset*, the mean of the rows of the
classes that are not labels in the client's batch (for one example they hold
``p_j x``, the part every row shares):

    x = (gW_y - mean_{j not in Y} gW_j) / (gb_y - mean_{j not in Y} gb_j).

For one noise-free example this is exactly ``x`` (numerator and denominator
both carry the factor ``p_y - 1 - mean_{j != y} p_j``). FGLA does nothing
about DP noise: no class selection, no denoising, no noise strength; a trained
generator (``jaxleak.attacks.venom.FGLAGenerator``) maps the features to the
image.

The label is read off the update (iDLG's rule: for one example the label row is
the only one with a negative bias gradient, so ``argmin gb``) unless the caller
passes the labels; :class:`FGLAResult` records the rows used.

Written for one capture; :func:`fgla_batch` is the batched, jitted entry point.

>>> import numpy as np
>>> x = np.linspace(0.0, 1.0, 12, dtype=np.float32)
>>> p = np.array([0.2, 0.5, 0.3], dtype=np.float32)
>>> delta = p - np.eye(3, dtype=np.float32)[1]          # label 1
>>> out = fgla_batch(np.outer(delta, x)[None], delta[None], feature_shape=(2, 2, 3))
>>> int(out.labels[0]), bool(np.allclose(out.features.reshape(-1), x, atol=1e-6))
(1, True)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxleak._batching import map_chunked

_HIGHEST = jax.lax.Precision.HIGHEST


class FGLAResult(NamedTuple):
    """FGLA features of ``N`` captures (leading axis ``N`` on every field).

    Attributes:
      features: ``[N, H, W, C]`` the recovered head input, reshaped to its map.
      labels: ``[N]`` the gradient row used (inferred or given).
      label_inferred: ``[N]`` whether that row was inferred from the update.
    """

    features: Float[Array, "n h w c"]
    labels: Int[Array, " n"]
    label_inferred: Array


def infer_label(fc_bias_grad: Float[Array, " classes"]) -> Int[Array, ""]:
    """iDLG's single-example label: the row with the most negative bias gradient."""
    return jnp.argmin(fc_bias_grad)


def fgla_features(
    fc_weight_grad: Float[Array, "classes dim"],
    fc_bias_grad: Float[Array, " classes"],
    label: Int[Array, ""],
) -> Float[Array, " dim"]:
    """``(gW_y - offset_W) / (gb_y - offset_b)`` for ONE capture (see module doc).

    The offset averages the ``K - 1`` rows other than ``label``; with ``K = 1``
    there are none and the offset is zero. A zero denominator gives zeros.
    """
    k = fc_bias_grad.shape[0]
    others = 1.0 - jax.nn.one_hot(label, k, dtype=fc_bias_grad.dtype)
    count = jnp.maximum(jnp.sum(others), 1.0)
    offset_w = jnp.einsum("k,kd->d", others, fc_weight_grad, precision=_HIGHEST) / count
    offset_b = jnp.dot(others, fc_bias_grad, precision=_HIGHEST) / count
    num = fc_weight_grad[label] - offset_w
    den = fc_bias_grad[label] - offset_b
    safe = jnp.where(den == 0, 1.0, den)
    return jnp.where(den == 0, 0.0, num / safe)


@functools.lru_cache(maxsize=32)
def _compiled(feature_shape: tuple[int, int, int]):
    def one(gw, gb, label, given):
        y = jnp.where(given, label, infer_label(gb))
        return fgla_features(gw, gb, y).reshape(feature_shape), y

    return jax.jit(jax.vmap(one))


def fgla_batch(
    fc_weight_grad: Float[np.ndarray, "n classes dim"],
    fc_bias_grad: Float[np.ndarray, "n classes"],
    *,
    feature_shape: tuple[int, int, int],
    labels: Int[np.ndarray, " n"] | None = None,
    chunk_size: int | None = None,
) -> FGLAResult:
    """FGLA features of ``N`` captures with one jitted ``vmap``.

    Args:
      fc_weight_grad: ``[N, K, d]`` protected head weight gradients (class-major).
      fc_bias_grad: ``[N, K]`` protected head bias gradients.
      feature_shape: ``(H, W, C)`` with ``H * W * C = d`` (the head's input map, HWC order).
      labels: ``[N]`` known labels; ``None`` infers each from its update.
      chunk_size: captures per compiled call (:func:`jaxleak._batching.map_chunked`:
        the last chunk is padded so one compilation serves all); ``None`` runs
        everything at once.

    Returns:
      :class:`FGLAResult` (NumPy arrays).

    Raises:
      ValueError: on inconsistent shapes, non-finite gradients or out-of-range labels.
    """
    gw, gb = np.asarray(fc_weight_grad, np.float32), np.asarray(fc_bias_grad, np.float32)
    if gw.ndim != 3 or gb.ndim != 2 or gw.shape[:2] != gb.shape:
        raise ValueError(
            f"expected fc_weight_grad [N, K, d] and fc_bias_grad [N, K], got {gw.shape} and {gb.shape}"
        )
    n, k, d = gw.shape
    if n < 1 or k < 1:
        raise ValueError(f"need at least one capture and one class, got {gw.shape}")
    feature_shape = tuple(int(s) for s in feature_shape)
    if len(feature_shape) != 3 or int(np.prod(feature_shape)) != d:
        raise ValueError(f"feature_shape {feature_shape} does not hold d = {d} features")
    if not (np.all(np.isfinite(gw)) and np.all(np.isfinite(gb))):
        raise ValueError("gradients must be finite")
    given = labels is not None
    if given:
        lab = np.asarray(labels)
        if lab.shape != (n,):
            raise ValueError(f"labels must be [N] = [{n}] (one example per capture), got {lab.shape}")
        if lab.min() < 0 or lab.max() >= k:
            raise ValueError(f"labels must lie in [0, {k}), got range [{lab.min()}, {lab.max()}]")
        lab = lab.astype(np.int32)
    else:
        lab = np.zeros((n,), np.int32)
    flags = np.full((n,), given)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    features, ys = map_chunked(_compiled(feature_shape), gw, gb, lab, flags,
                               chunk=n if chunk_size is None else chunk_size)
    return FGLAResult(features=features, labels=ys, label_inferred=~flags)


__all__ = ["FGLAResult", "fgla_batch", "fgla_features", "infer_label"]
