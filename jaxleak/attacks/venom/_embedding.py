"""Embeddings of Venom's noise strength T: Liquid Time Embedding and the plain sinusoid.

Liquid Time Embedding (LTE, Venom eqs. 9-12), for one scalar ``T``:

1. Time2Vec ``t_enc = [W_l T + b_l, sin(W_p T + b_p)]`` (eqs. 9-10);
2. ``liquid_steps`` liquid updates from ``h0 = 0`` (eq. 11)::

       h <- h + alpha * (tanh(W_in t_enc + W_rec h) - h)

3. gate ``g = sigmoid(W_g proj(h) + b_g)``, ``phi = g * h`` (eq. 12), ``proj``
   a linear map.

``alpha`` is learnable and must stay in ``(0, 1)``: it is parameterised as
``alpha = sigmoid(a)`` with ``a`` initialised to ``logit(alpha_init)``
(``alpha_init = 0.1`` as in the paper), then clipped to
``[ALPHA_EPS, 1 - ALPHA_EPS]`` because a float32 sigmoid rounds to exactly 0 or
1 for ``|a|`` beyond ~17 and 104.

Contraction (the precise content of Theorem 2). ``tanh`` is 1-Lipschitz, so the
update ``F(h) = (1 - alpha) h + alpha tanh(u + W_rec h)`` satisfies
``||F(h) - F(h')|| <= L ||h - h'||`` with ``L = (1 - alpha) + alpha ||W_rec||_2``.
When ``||W_rec||_2 < 1`` then ``L < 1``: successive differences shrink by at
least ``L`` and the iterates converge to the unique fixed point at rate
``O(L^t)``; the paper's ``O((1 - alpha)^t)`` is the ``W_rec = 0`` case.
``W_rec`` is initialised orthogonal with scale 0.5 (``||W_rec||_2 = 0.5``), so an
untrained unit contracts with ``L = 1 - alpha / 2``; training does not
constrain it (neither does the paper).

The number of liquid steps is not given by the paper or the notes; the default
(:data:`DEFAULT_LIQUID_STEPS` = 10) is our choice: with ``alpha = 0.1`` the
distance to the fixed point shrinks to at most ``0.9^10 ~ 0.35`` of its start
(``W_rec = 0``), enough for ``h`` to move well away from ``h0 = 0`` while the
unrolled loop stays cheap (a ``time_dim x time_dim`` matvec per step).

Everything is written for ``[*batch]`` noise strengths; the math is per example.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

DEFAULT_ALPHA_INIT = 0.1
DEFAULT_LIQUID_STEPS = 10
# alpha is clipped to [ALPHA_EPS, 1 - ALPHA_EPS]; 1 - 1e-6 is representable in float32.
ALPHA_EPS = 1e-6
# Scale of the orthogonal W_rec init: ||W_rec||_2 = 0.5 keeps the untrained unit a contraction.
W_REC_INIT_SCALE = 0.5


def logit(p: float) -> float:
    """Inverse sigmoid of a probability ``p`` in ``(0, 1)``.

    Raises:
      ValueError: if ``p`` is not strictly between 0 and 1.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"logit needs p in (0, 1), got {p}")
    return math.log(p / (1.0 - p))


def liquid_alpha(alpha_logit: Float[Array, "*a"]) -> Float[Array, "*a"]:
    """Leak rate ``alpha = sigmoid(a)``, clipped so it stays strictly inside ``(0, 1)``.

    Args:
      alpha_logit: the unconstrained parameter ``a`` (any real, including +-inf).

    Returns:
      ``alpha`` in ``[ALPHA_EPS, 1 - ALPHA_EPS]``.

    >>> float(liquid_alpha(jnp.float32(logit(0.1))))  # doctest: +ELLIPSIS
    0.1000...
    """
    return jnp.clip(jax.nn.sigmoid(alpha_logit), ALPHA_EPS, 1.0 - ALPHA_EPS)


def liquid_update(
    h: Float[Array, "*batch hidden"],
    drive: Float[Array, "*batch hidden"],
    w_rec: Float[Array, "hidden hidden"],
    alpha: Float[Array, ""] | float,
) -> Float[Array, "*batch hidden"]:
    """One liquid update ``h + alpha * (tanh(drive + W_rec h) - h)`` (Venom eq. 11).

    Args:
      h: current state ``h_old``.
      drive: the input term ``W_in t_enc (+ bias)``, constant over the steps.
      w_rec: recurrent matrix; ``h @ w_rec`` is the row-vector form of ``W_rec h``.
      alpha: leak rate in ``(0, 1)``.

    Returns:
      ``h_new``, same shape as ``h``.

    >>> h = liquid_update(jnp.zeros(2), jnp.array([0.0, 100.0]), jnp.zeros((2, 2)), 0.5)
    >>> [round(float(v), 4) for v in h]
    [0.0, 0.5]
    """
    return h + alpha * (jnp.tanh(drive + h @ w_rec) - h)


def liquid_dynamics(
    drive: Float[Array, "*batch hidden"],
    w_rec: Float[Array, "hidden hidden"],
    alpha: Float[Array, ""] | float,
    steps: int,
) -> Float[Array, "*batch hidden"]:
    """``steps`` liquid updates (eq. 11) from ``h0 = 0``; returns ``h^(steps)``."""
    h0 = jnp.zeros_like(drive)
    return jax.lax.fori_loop(0, steps, lambda _, h: liquid_update(h, drive, w_rec, alpha), h0)


def sinusoidal_embedding(t: Float[Array, "*batch"], dim: int) -> Float[Array, "*batch dim"]:
    """Transformer/DDPM sinusoidal embedding ``[sin(T f_k), cos(T f_k)]``, ``f_k = 10000^(-k/(d/2-1))``.

    Args:
      t: noise strengths.
      dim: even embedding size (at least 4).

    Returns:
      The embedding, last axis ``dim``.

    Raises:
      ValueError: if ``dim`` is odd or smaller than 4.
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"sinusoidal embedding needs an even dim >= 4, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    angles = jnp.asarray(t, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Time2Vec(nn.Module):
    """Time2Vec of a scalar ``T`` (eqs. 9-10): ``[W_l T + b_l, sin(W_p T + b_p)]``.

    Attributes:
      features: output size, even; half linear, half periodic.
    """

    features: int

    @nn.compact
    def __call__(self, t: Float[Array, "*batch"]) -> Float[Array, "*batch features"]:
        t = jnp.asarray(t, jnp.float32)[..., None]
        half = self.features // 2
        linear = nn.Dense(half, name="linear")(t)
        periodic = jnp.sin(nn.Dense(self.features - half, name="periodic")(t))
        return jnp.concatenate([linear, periodic], axis=-1)


class LiquidTimeEmbedding(nn.Module):
    """Venom's Liquid Time Embedding ``phi(T)`` (eqs. 9-12; module docstring has the math).

    Attributes:
      features: size of ``t_enc``, of the liquid state ``h`` and of ``phi``.
      steps: number of liquid updates (eq. 11) from ``h0 = 0``.
      alpha_init: initial leak rate, in ``(0, 1)``; the parameter ``alpha_logit``
        starts at ``logit(alpha_init)``.
    """

    features: int
    steps: int = DEFAULT_LIQUID_STEPS
    alpha_init: float = DEFAULT_ALPHA_INIT

    @nn.compact
    def __call__(self, t: Float[Array, "*batch"]) -> Float[Array, "*batch features"]:
        t_enc = Time2Vec(self.features, name="time2vec")(t)
        drive = nn.Dense(self.features, name="w_in")(t_enc)
        w_rec = self.param(
            "w_rec",
            nn.initializers.orthogonal(scale=W_REC_INIT_SCALE),
            (self.features, self.features),
        )
        alpha_logit = self.param(
            "alpha_logit", nn.initializers.constant(logit(self.alpha_init)), ()
        )
        h = liquid_dynamics(drive, w_rec, liquid_alpha(alpha_logit), self.steps)
        h_proj = nn.Dense(self.features, name="proj")(h)
        gate = jax.nn.sigmoid(nn.Dense(self.features, name="gate")(h_proj))
        return gate * h


class SinusoidalTimeEmbedding(nn.Module):
    """Venom-Diff's embedding of ``T``: the plain sinusoid (no liquid unit, no gate).

    Attributes:
      features: embedding size (even, >= 4).
    """

    features: int

    @nn.compact
    def __call__(self, t: Float[Array, "*batch"]) -> Float[Array, "*batch features"]:
        return sinusoidal_embedding(t, self.features)
