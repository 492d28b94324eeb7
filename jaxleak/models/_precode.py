"""PRECODE (Scheliga et al. 2022): a variational bottleneck in front of the output layer.

``get_victim(..., precode=K_b)`` inserts it directly before ``head``:

* ``encoder``: Dense(d -> 2 K_b) on the flattened head input ``x``; the first
  ``K_b`` outputs are the mean ``mu``, the last ``K_b`` go through softplus to
  give the standard deviation ``sigma`` of ``q(z | x)``;
* ``z = mu + sigma * eps`` with ``eps ~ N(0, I)`` drawn from the ``"precode"``
  PRNG stream, or ``z = mu`` when the caller gives no such stream (the
  deterministic mode of ``Victim.apply(..., key=None)``; the reference samples
  always);
* ``decoder``: Dense(K_b -> d), reshaped back to the input map, then ``head``.

The training loss adds ``beta * KL(q || N(0, I)) / ln 2`` (``beta = 1e-3``, the
KL in bits) to the cross-entropy. Both Dense layers start from PyTorch's
default initialisation, as in the reference code (dAI-SY-Group/PRECODE), so a
PyTorch twin can copy the weights: ``encoder`` / ``decoder`` ``kernel`` ``[in,
out]`` is torch's ``weight.T``.

The module sows, under ``intermediates`` in its own scope, ``kl`` (``[b]``, in
nats) and ``eps`` (``[b, K_b]``, zeros in the deterministic mode).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxleak.models._common import INTERMEDIATES, torch_bias_init, torch_kernel_init

PRECODE_RNG = "precode"
"""Name of the Flax PRNG stream the bottleneck draws ``eps`` from."""

DEFAULT_BETA = 1e-3

# Below this pre-activation, log(softplus(s)) = s to float32 precision; computing it directly
# would underflow to log(0) = -inf for very negative s.
_LOG_SOFTPLUS_LINEAR_BELOW = -15.0


def log_softplus(s: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """``log(softplus(s))`` without the ``-inf`` of an underflowing softplus.

    Args:
      s: pre-activations.

    Returns:
      ``log(log(1 + exp(s)))`` elementwise.

    >>> float(log_softplus(jnp.array(-200.0)))
    -200.0
    """
    linear = s < _LOG_SOFTPLUS_LINEAR_BELOW
    safe = jnp.where(linear, 0.0, s)  # keeps the unused branch's gradient finite
    return jnp.where(linear, s, jnp.log(jax.nn.softplus(safe)))


def gaussian_kl(
    mean: Float[Array, "*batch k"], log_std: Float[Array, "*batch k"]
) -> Float[Array, "*batch"]:
    """``KL(N(mean, diag(std^2)) || N(0, I))`` in nats, summed over the last axis.

    Args:
      mean: means of the diagonal Gaussian.
      log_std: log standard deviations, same shape.

    Returns:
      ``0.5 * sum(mean^2 + std^2 - 1 - 2 log std)``.

    >>> float(gaussian_kl(jnp.zeros(3), jnp.zeros(3)))
    0.0
    """
    return 0.5 * jnp.sum(mean**2 + jnp.exp(2.0 * log_std) - 1.0 - 2.0 * log_std, axis=-1)


def precode_penalty(kl: Float[Array, "*batch"], beta: float) -> Float[Array, "*batch"]:
    """The term PRECODE adds to the cross-entropy: ``beta * KL / ln 2`` (the KL in bits).

    Args:
      kl: KL divergences in nats.
      beta: weight (the reference uses 1e-3).

    Returns:
      The penalty, same shape as ``kl``.

    >>> round(float(precode_penalty(jnp.array(math.log(2.0)), 1e-3)), 6)
    0.001
    """
    return beta * kl / math.log(2.0)


class VariationalBottleneck(nn.Module):
    """PRECODE's bottleneck on a feature map; the output has the input's shape.

    Attributes:
      size: bottleneck size ``K_b`` (the reference uses 256).
    """

    size: int

    @nn.compact
    def __call__(self, fmap: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        batch, d = fmap.shape[0], math.prod(fmap.shape[1:])
        x = fmap.reshape(batch, d)
        stats = nn.Dense(
            2 * self.size,
            kernel_init=torch_kernel_init(),
            bias_init=torch_bias_init(d),
            name="encoder",
        )(x)
        mean, pre_std = stats[:, : self.size], stats[:, self.size :]
        std = jax.nn.softplus(pre_std)
        if self.has_rng(PRECODE_RNG):
            eps = jax.random.normal(self.make_rng(PRECODE_RNG), mean.shape, mean.dtype)
        else:
            eps = jnp.zeros_like(mean)
        z = mean + std * eps
        self.sow(INTERMEDIATES, "kl", gaussian_kl(mean, log_softplus(pre_std)))
        self.sow(INTERMEDIATES, "eps", eps)
        out = nn.Dense(
            d,
            kernel_init=torch_kernel_init(),
            bias_init=torch_bias_init(self.size),
            name="decoder",
        )(z)
        return out.reshape(fmap.shape)
