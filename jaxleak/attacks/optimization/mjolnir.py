"""Mjolnir: a DDPM denoiser on protected updates, then DLG.

As in the reference (NOTES section 5): a DDPM with T = 1000 and linear betas
1e-4..0.02 trained (epsilon prediction) on clean gradients of auxiliary
images; the reverse process starts at the step ``t*`` whose noise level
``sqrt((1 - abar_t) / abar_t)`` matches the observed per-coordinate noise std
(relative to the gradients' scale), runs ancestral sampling down to 0, and DLG
(L-BFGS, 20 steps) inverts the denoised gradient.

The denoiser (``MjolnirConfig.denoiser``):

* ``"unet"`` (default, the reference's design): the flat update is laid out
  row by row as a zero-padded ``[S, S, 1]`` image and denoised by a small
  convolutional UNet (residual blocks with GroupNorm and a time embedding, one
  skip connection per resolution). It is narrower than a DDPM image UNet
  (``unet_channels``, default 32 / 64), and costly on a CPU.
* ``"mlp"``: the update as one flat vector through an MLP with a sinusoidal
  time embedding: a cheap stand-in for CPU runs, weaker than the UNet.

Training length and the auxiliary set (``train_steps``, ``aux_*``) are ours:
the reference trains far longer on far more data. Treat the numbers as a lower
bound on what the published attack achieves.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PyTree

from jaxleak.attacks.optimization._attacks import DLGConfig
from jaxleak.attacks.optimization._matching import dummy_gradient

DENOISERS = ("unet", "mlp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MjolnirConfig:
    """Mjolnir's settings (DDPM per the reference; denoiser size and training are ours).

    Attributes:
      timesteps, beta_start, beta_end: the DDPM (1000, 1e-4, 0.02).
      denoiser: ``"unet"`` (the update laid out as an image, the reference's
        design) or ``"mlp"`` (flat update; cheap).
      unet_channels: UNet channels per resolution (each further entry halves the
        resolution once).
      hidden, depth: MLP denoiser width and hidden layers.
      time_dim: time-embedding size (both denoisers).
      train_steps, train_batch, learning_rate: Adam training of the denoiser.
      aux_dataset, aux_split, aux_n: the attacker's auxiliary images (disjoint
        from the attacked ones: another split), resized to the victim's input.
      iterations: DLG's L-BFGS steps on the denoised gradient (reference 20).
      linesearch_steps, inner_steps: DLG's zoom line-search evaluations per
        update (0: fixed step) and L-BFGS updates per iteration (as :class:`DLGConfig`).
      labels: DLG's label mode (``"joint"`` as DLG, or ``"infer"``).
      restarts: DLG restarts.
    """

    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    denoiser: str = "unet"
    unet_channels: tuple[int, ...] = (32, 64)
    hidden: int = 512
    depth: int = 3
    time_dim: int = 64
    train_steps: int = 2000
    train_batch: int = 64
    learning_rate: float = 1e-3
    aux_dataset: str = "mnist-embedded"
    aux_split: str = "train"
    aux_n: int = 512
    iterations: int = 20
    linesearch_steps: int = 0
    inner_steps: int = 20
    labels: str = "joint"
    restarts: int = 1

    def __post_init__(self):
        if self.timesteps < 1 or not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError("need timesteps >= 1 and 0 < beta_start < beta_end < 1")
        if min(self.train_steps, self.train_batch, self.aux_n, self.iterations, self.restarts) < 1:
            raise ValueError("train_steps, train_batch, aux_n, iterations and restarts must be >= 1")
        if self.denoiser not in DENOISERS:
            raise ValueError(f"denoiser must be one of {DENOISERS}, got {self.denoiser!r}")
        object.__setattr__(self, "unet_channels", tuple(int(c) for c in self.unet_channels))
        if not self.unet_channels or min(self.unet_channels) < 1:
            raise ValueError(f"unet_channels must be positive ints, got {self.unet_channels}")

    def dlg(self) -> DLGConfig:
        return DLGConfig(iterations=self.iterations, linesearch_steps=self.linesearch_steps,
                         inner_steps=self.inner_steps, labels=self.labels, restarts=self.restarts)


def alpha_bars(timesteps: int, beta_start: float, beta_end: float) -> tuple[Array, Array]:
    """``(betas, cumulative products of 1 - beta)``, both ``[T]``."""
    betas = jnp.linspace(beta_start, beta_end, timesteps, dtype=jnp.float32)
    return betas, jnp.cumprod(1.0 - betas)


def start_step(sigma: Float[Array, ""], abar: Float[Array, " t"]) -> Array:
    """The step whose noise-to-signal ratio ``sqrt((1 - abar) / abar)`` is closest to ``sigma``; -1 for 0."""
    ratio = jnp.sqrt((1.0 - abar) / abar)
    return jnp.where(sigma > 0, jnp.argmin(jnp.abs(ratio - sigma)), -1)


def time_embedding(t: Float[Array, "*b"], dim: int) -> Float[Array, "*b dim"]:
    """Sinusoidal embedding of the diffusion step (``dim // 2`` sines and cosines)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
    angles = jnp.asarray(t)[..., None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)


class Denoiser(nn.Module):
    """epsilon_theta(x_t, t) for flat vectors: an MLP with a sinusoidal time embedding.

    ``x`` is ``[p]`` or a batch ``[b, p]`` with ``t`` ``[]`` or ``[b]``.
    """

    dim: int
    hidden: int = 512
    depth: int = 3
    time_dim: int = 64

    @nn.compact
    def __call__(self, x: Float[Array, "*b p"], t: Array) -> Float[Array, "*b p"]:
        emb = time_embedding(t, self.time_dim)
        h = nn.Dense(self.hidden)(x) + nn.Dense(self.hidden)(emb)
        for _ in range(self.depth - 1):
            h = h + nn.Dense(self.hidden)(nn.silu(nn.LayerNorm()(h)))
        return nn.Dense(self.dim)(nn.silu(h))


def grid_side(dim: int, levels: int) -> int:
    """Side ``S`` of the square image holding ``dim`` values, a multiple of ``2 ** (levels - 1)``.

    >>> grid_side(19_000, 2)
    138
    """
    step = 2 ** (levels - 1)
    smallest = math.isqrt(dim - 1) + 1 if dim > 1 else 1  # the least S with S * S >= dim
    return -(-smallest // step) * step


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class _ResBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, x: Float[Array, "b s s c"], emb: Float[Array, "b e"]) -> Float[Array, "b s s o"]:
        h = nn.Conv(self.channels, (3, 3))(nn.silu(nn.GroupNorm(_groups(x.shape[-1]))(x)))
        h = h + nn.Dense(self.channels)(nn.silu(emb))[:, None, None, :]
        h = nn.Conv(self.channels, (3, 3))(nn.silu(nn.GroupNorm(_groups(self.channels))(h)))
        skip = x if x.shape[-1] == self.channels else nn.Conv(self.channels, (1, 1))(x)
        return skip + h


class UNetDenoiser(nn.Module):
    """epsilon_theta(x_t, t) for an update laid out as a zero-padded ``[S, S, 1]`` image.

    Takes and returns flat ``[p]`` vectors or batches ``[b, p]`` (with ``t`` ``[]``
    or ``[b]``; the image layout is internal). One residual block per resolution
    on the way down and up, a middle block, skip connections by concatenation,
    strided-conv downsampling and nearest upsampling; the time embedding enters
    every block. Train it on batches, not under ``vmap``: XLA:CPU lowers the
    weight gradients of a ``vmap``-ped convolution as grouped convolutions, ~100x
    slower here.
    """

    dim: int
    channels: tuple[int, ...] = (32, 64)
    time_dim: int = 64

    @nn.compact
    def __call__(self, x: Float[Array, "*b p"], t: Array) -> Float[Array, "*b p"]:
        single = x.ndim == 1
        x = x[None] if single else x
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        side = grid_side(self.dim, len(self.channels))
        grid = jnp.pad(x, ((0, 0), (0, side * side - self.dim))).reshape(-1, side, side, 1)
        emb = nn.Dense(4 * self.time_dim)(time_embedding(t, self.time_dim))
        h = nn.Conv(self.channels[0], (3, 3))(grid)
        skips = []
        for level, width in enumerate(self.channels):
            h = _ResBlock(width)(h, emb)
            skips.append(h)
            if level < len(self.channels) - 1:
                h = nn.Conv(width, (3, 3), strides=(2, 2))(h)
        h = _ResBlock(self.channels[-1])(h, emb)
        for level in reversed(range(len(self.channels))):
            h = _ResBlock(self.channels[level])(jnp.concatenate([h, skips.pop()], -1), emb)
            if level > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest x2
                h = nn.Conv(self.channels[level - 1], (3, 3))(h)
        out = nn.Conv(1, (3, 3))(nn.silu(nn.GroupNorm(_groups(h.shape[-1]))(h)))
        out = out.reshape(out.shape[0], -1)[:, : self.dim]
        return out[0] if single else out


def make_denoiser(dim: int, config: MjolnirConfig) -> nn.Module:
    """The configured denoiser for updates of ``dim`` values."""
    if config.denoiser == "unet":
        return UNetDenoiser(dim=dim, channels=config.unet_channels, time_dim=config.time_dim)
    return Denoiser(dim=dim, hidden=config.hidden, depth=config.depth, time_dim=config.time_dim)


def flatten_update(update: PyTree) -> Float[Array, " p"]:
    """One update as a flat vector (leaf order of ``jax.tree_util``)."""
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(update)])


def unflatten_update(vector: Float[Array, " p"], like: PyTree) -> PyTree:
    """Inverse of :func:`flatten_update` for the structure and shapes of ``like``."""
    leaves, tree = jax.tree_util.tree_flatten(like)
    sizes = np.cumsum([int(np.prod(np.shape(a))) for a in leaves])[:-1]
    parts = jnp.split(vector, sizes)
    return jax.tree_util.tree_unflatten(tree, [p.reshape(np.shape(a)) for p, a in zip(parts, leaves)])


def train_denoiser(victim, variables, images: np.ndarray, labels: np.ndarray, config: MjolnirConfig,
                   *, seed: int = 0) -> tuple[PyTree, float, float]:
    """Trains the denoiser on clean single-example gradients of ``images``.

    Returns:
      ``(params, scale, final_loss)``: the gradients are divided by ``scale``
      (their RMS) before diffusion.
    """
    grad_one = lambda x, y: flatten_update(
        dummy_gradient(victim, variables, x[None], jax.nn.one_hot(y[None], victim.num_classes)))
    clean = jax.jit(jax.vmap(grad_one))(jnp.asarray(images, jnp.float32), jnp.asarray(labels))
    scale = float(jnp.sqrt(jnp.mean(clean**2))) or 1.0
    params, loss = fit_denoiser(clean / scale, config, seed=seed)
    return params, scale, loss


def fit_denoiser(data: Float[Array, "n p"], config: MjolnirConfig, *, seed: int = 0) -> tuple[PyTree, float]:
    """Trains the configured denoiser (epsilon prediction, Adam) on the rows of ``data``.

    Returns:
      ``(params, mean loss of the last 100 steps)``.
    """
    dim = data.shape[1]
    net = make_denoiser(dim, config)
    _, abar = alpha_bars(config.timesteps, config.beta_start, config.beta_end)
    key = jax.random.PRNGKey(seed)
    params = net.init(key, jnp.zeros(dim), jnp.zeros(()))
    opt = optax.adam(config.learning_rate)

    def loss_fn(p, x0, t, eps):
        xt = jnp.sqrt(abar[t])[:, None] * x0 + jnp.sqrt(1 - abar[t])[:, None] * eps
        pred = net.apply(p, xt, t.astype(jnp.float32))  # batched, not vmapped (see UNetDenoiser)
        return jnp.mean((pred - eps) ** 2)

    def step(carry, k):
        p, s = carry
        k1, k2, k3 = jax.random.split(k, 3)
        idx = jax.random.randint(k1, (config.train_batch,), 0, data.shape[0])
        t = jax.random.randint(k2, (config.train_batch,), 0, config.timesteps)
        eps = jax.random.normal(k3, (config.train_batch, dim))
        loss, g = jax.value_and_grad(loss_fn)(p, data[idx], t, eps)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    keys = jax.random.split(jax.random.fold_in(key, 1), config.train_steps)
    (params, _), losses = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks))((params, opt.init(params)), keys)
    return params, float(jnp.mean(losses[-min(100, config.train_steps):]))


@functools.lru_cache(maxsize=8)
def _denoise_fn(dim: int, config: MjolnirConfig):
    net = make_denoiser(dim, config)
    betas, abar = alpha_bars(config.timesteps, config.beta_start, config.beta_end)
    alphas = 1.0 - betas
    abar_prev = jnp.concatenate([jnp.ones(1), abar[:-1]])
    post_std = jnp.sqrt(betas * (1 - abar_prev) / (1 - abar))

    def one(params, noisy, sigma, key):
        t0 = start_step(sigma, abar)
        x = jnp.sqrt(abar[jnp.maximum(t0, 0)]) * noisy

        def body(x, inputs):
            t, k = inputs
            eps = net.apply(params, x, t.astype(jnp.float32))
            mean = (x - betas[t] / jnp.sqrt(1 - abar[t]) * eps) / jnp.sqrt(alphas[t])
            new = mean + jnp.where(t > 0, post_std[t], 0.0) * jax.random.normal(k, x.shape)
            return jnp.where(t <= t0, new, x), None

        ts = jnp.arange(config.timesteps - 1, -1, -1)
        x, _ = jax.lax.scan(body, x, (ts, jax.random.split(key, config.timesteps)))
        return jnp.where(t0 >= 0, x, noisy), t0

    return jax.jit(jax.vmap(one, in_axes=(None, 0, None, 0)))


def denoise(params: PyTree, scale: float, config: MjolnirConfig, noisy: Float[Array, "n p"], sigma: float,
            *, seed: int = 0) -> tuple[Float[Array, "n p"], int]:
    """Reverse diffusion from the step matching ``sigma`` (per-coordinate noise std of ``noisy``).

    Returns:
      ``(denoised [n, p], t_start)``; ``t_start = -1`` (no denoising) when ``sigma == 0``.
    """
    keys = jax.random.split(jax.random.PRNGKey(seed), noisy.shape[0])
    out, t0 = _denoise_fn(int(noisy.shape[1]), config)(params, jnp.asarray(noisy) / scale,
                                                       jnp.float32(sigma / scale), keys)
    return out * scale, int(np.asarray(t0)[0])


def _aux_images(config: MjolnirConfig, image_shape) -> tuple[np.ndarray, np.ndarray]:
    from jaxleak.audit import load_data

    data = load_data(config.aux_dataset, split=config.aux_split, n=config.aux_n, seed=0,
                     image_size=tuple(image_shape[:2]))
    images = np.asarray(data.images, np.float32)
    channels = image_shape[2]
    if images.shape[-1] != channels:  # grey <-> colour
        images = (np.repeat(images, channels, -1) if images.shape[-1] == 1
                  else images.mean(-1, keepdims=True))
    return images, np.asarray(data.labels)


def reconstruct_capture(cap, victim, variables, updates: PyTree, *, overrides: dict[str, Any], chunk: int,
                        target_batch: int, patience, min_delta: float, seed: int, progress: bool,
                        batching: str = "vmap", unroll: int = 1, conv_impl: str = "auto",
                        devices: int | None = None):
    """Mjolnir on a capture's updates: train the denoiser, denoise, DLG.

    Returns:
      ``(config, RunResult, extra)`` with ``extra["mjolnir"]`` describing the
      denoising (start step, sigma, denoiser loss, what is scaled down).
    """
    from jaxleak.attacks.optimization._run import reconstruct

    config = MjolnirConfig(**overrides)
    batch = int(cap.meta.get("batch_size", 1))
    images, labels = _aux_images(config, cap.image_shape)
    labels = labels % victim.num_classes
    params, scale, loss = train_denoiser(victim, variables, images, labels, config, seed=seed)
    flat = jax.vmap(flatten_update)(updates)
    sigma = float(cap.meta.get("noise_std") or 0.0)
    if not math.isfinite(sigma):
        sigma = 0.0
    denoised, t0 = denoise(params, scale, config, flat, sigma, seed=seed)
    like = jax.tree_util.tree_map(lambda a: a[0], updates)
    clean = jax.vmap(lambda v: unflatten_update(v, like))(denoised)
    res = reconstruct("dlg", victim, variables, clean, config=config.dlg(), batch_size=batch,
                      true_labels=np.asarray(cap.labels).reshape(cap.n, batch), chunk=chunk,
                      target_batch=target_batch, patience=patience, min_delta=min_delta, seed=seed,
                      progress=progress, batching=batching, unroll=unroll, conv_impl=conv_impl,
                      devices=devices)
    extra = {"mjolnir": {"t_start": t0, "sigma": sigma, "gradient_scale": scale, "denoiser_loss": loss,
                         "aux": f"{config.aux_dataset}:{config.aux_split} n={config.aux_n}",
                         "denoiser": config.denoiser,
                         "scaled_down": ("MLP denoiser on the flat update (reference: UNet on the gradient "
                                         "reshaped into an image)" if config.denoiser == "mlp" else
                                         f"UNet channels {list(config.unet_channels)}, {config.train_steps} "
                                         f"training steps on {config.aux_n} aux images (reference: larger, "
                                         "longer)")}}
    return config, res, extra


__all__ = [
    "DENOISERS",
    "Denoiser",
    "MjolnirConfig",
    "UNetDenoiser",
    "alpha_bars",
    "denoise",
    "fit_denoiser",
    "flatten_update",
    "grid_side",
    "make_denoiser",
    "reconstruct_capture",
    "start_step",
    "time_embedding",
    "train_denoiser",
    "unflatten_update",
]
