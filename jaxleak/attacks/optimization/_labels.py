"""Label inference from the classification head's gradient (one target; vmap over targets).

For softmax cross-entropy the head's bias gradient of one example is
``p - onehot(y)``: only the true class is negative (iDLG). Without a usable
bias, the weight rows ``(p_j - y_j) x`` with non-negative features ``x``
(ReLU / sigmoid / pooling outputs) have a negative sum only for the true class.
For a batch of ``B`` the mean bias gradient is ``mean_i p_i - n / B``; with the
mean prediction ``m`` assumed equal over classes (true of untrained models and
a fair first guess otherwise) ``n_j ~ B (m - g_j)``, ``m`` estimated from the
classes whose gradient is positive (absent classes).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def infer_label(
    fc_weight_grad: Float[Array, "k d"],
    fc_bias_grad: Float[Array, " k"] | None = None,
) -> Int[Array, ""]:
    """iDLG: the label of a single-example update.

    Args:
      fc_weight_grad: the head's weight gradient, class-major ``[K, d]``.
      fc_bias_grad: its bias gradient ``[K]``; when ``None`` the weight rows decide.

    Returns:
      The class whose bias gradient (or weight-row sum) is the most negative.

    >>> import jax.numpy as jnp
    >>> int(infer_label(jnp.ones((3, 2)), jnp.array([0.3, -0.5, 0.2])))
    1
    """
    if fc_bias_grad is None:
        return jnp.argmin(jnp.sum(fc_weight_grad, axis=-1))
    return jnp.argmin(fc_bias_grad)


def infer_label_counts(
    fc_weight_grad: Float[Array, "k d"],
    fc_bias_grad: Float[Array, " k"] | None,
    batch_size: int,
) -> Int[Array, " k"]:
    """How many examples of each class a batch of ``batch_size`` holds.

    Args:
      fc_weight_grad: head weight gradient ``[K, d]`` (used when no bias is given:
        the row sums take the bias gradient's place, up to a positive factor).
      fc_bias_grad: head bias gradient ``[K]`` of the batch-mean loss, or ``None``.
      batch_size: ``B`` (static).

    Returns:
      ``[K]`` non-negative integer counts summing to ``B`` (largest-remainder
      rounding). Exact for ``B = 1``.

    >>> import jax.numpy as jnp
    >>> g = jnp.array([0.1, 0.1, -0.4, 0.1, 0.1])  # mean of p=0.1 minus one-hot of class 2
    >>> infer_label_counts(jnp.zeros((5, 1)), g, 1).tolist()
    [0, 0, 1, 0, 0]
    """
    num_classes = fc_weight_grad.shape[0]
    if fc_bias_grad is None:
        rows = jnp.sum(fc_weight_grad, axis=-1)
        g = rows / (jnp.sum(jnp.abs(rows)) + 1e-30)
    else:
        g = fc_bias_grad
    positive = g > 0
    n_pos = jnp.sum(positive)
    m = jnp.where(n_pos > 0, jnp.sum(jnp.where(positive, g, 0.0)) / jnp.maximum(n_pos, 1), 1.0 / num_classes)
    raw = jnp.maximum(batch_size * (m - g), 0.0)
    # Negative entries are present classes: give them weight even if m was overestimated.
    raw = jnp.where(g < 0, jnp.maximum(raw, 1e-6), raw)
    share = raw * batch_size / jnp.maximum(jnp.sum(raw), 1e-30)
    base = jnp.floor(share)
    left = batch_size - jnp.sum(base)
    order = jnp.argsort(-(share - base))
    rank = jnp.zeros(num_classes, jnp.int32).at[order].set(jnp.arange(num_classes, dtype=jnp.int32))
    return (base + (rank < left)).astype(jnp.int32)


def labels_from_counts(counts: Int[Array, " k"], batch_size: int) -> Int[Array, " b"]:
    """``[B]`` labels in class order, class ``j`` repeated ``counts[j]`` times.

    >>> import jax.numpy as jnp
    >>> labels_from_counts(jnp.array([2, 0, 1]), 3).tolist()
    [0, 0, 2]
    """
    return jnp.repeat(jnp.arange(counts.shape[0]), counts, total_repeat_length=batch_size)


def infer_labels(
    fc_weight_grad: Float[Array, "k d"],
    fc_bias_grad: Float[Array, " k"] | None,
    batch_size: int,
) -> Int[Array, " b"]:
    """``[B]`` labels of a batch (iDLG for ``B = 1``, counts otherwise)."""
    if batch_size == 1:
        return infer_label(fc_weight_grad, fc_bias_grad)[None]
    return labels_from_counts(infer_label_counts(fc_weight_grad, fc_bias_grad, batch_size), batch_size)


__all__ = ["infer_label", "infer_label_counts", "infer_labels", "labels_from_counts"]
