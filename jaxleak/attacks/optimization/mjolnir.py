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

The denoiser is trained once per victim (:func:`train_mjolnir_denoiser`, the
CLI's ``jaxleak train mjolnir``) and saved as a ``"denoiser/mjolnir"`` artifact
(:mod:`jaxleak.artifacts`: architecture, DDPM, victim and update layout in its
config); the attack loads it (``denoiser_path``) or, without one, trains it
inside the call and says so in its returned info.

Training length and the auxiliary set (``train_steps``, ``aux_*``) are ours:
the reference trains far longer on far more data. Treat the numbers as a lower
bound on what the published attack achieves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PyTree

from jaxleak.artifacts import (
    ArtifactError,
    check_config,
    check_target,
    differences,
    load_artifact,
    read_artifact,
    save_artifact,
    tree_digest,
)
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
      denoiser_path: a denoiser saved by :func:`train_mjolnir_denoiser`
        (``jaxleak train mjolnir``); its architecture and DDPM replace the
        fields above. ``None``: the denoiser is trained inside every attack call.
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
    denoiser_path: str | None = None

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


class TrainedDenoiser(NamedTuple):
    """A denoiser trained for one victim's updates (what :func:`save_denoiser` stores).

    Attributes:
      params: the network's variables.
      scale: the clean gradients' RMS; updates are divided by it before diffusion.
      config: the settings it was trained with (architecture, DDPM, training).
      victim: ``victim.metadata()`` of the victim whose updates it denoises.
      update_shapes: the update's leaf shapes in :func:`flatten_update` order.
      loss: mean training loss of the last 100 steps.
      extra: JSON description (auxiliary data, seed, victim-weights digest, ...).
    """

    params: PyTree
    scale: float
    config: MjolnirConfig
    victim: dict[str, Any]
    update_shapes: tuple[tuple[int, ...], ...]
    loss: float
    extra: dict[str, Any]

    @property
    def dim(self) -> int:
        """Values per flat update."""
        return int(sum(math.prod(shape) for shape in self.update_shapes))


def _update_layout(tree: PyTree) -> tuple[list[str], tuple[tuple[int, ...], ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [jax.tree_util.keystr(path) for path, _ in leaves]
    return paths, tuple(tuple(int(d) for d in np.shape(leaf)) for _, leaf in leaves)


def train_denoiser(victim, variables, images: np.ndarray, labels: np.ndarray, config: MjolnirConfig,
                   *, seed: int = 0, extra: dict[str, Any] | None = None,
                   progress: bool = False) -> TrainedDenoiser:
    """Trains the denoiser on clean single-example gradients of ``images``.

    Args:
      victim: the victim whose updates will be denoised.
      variables: its variables (the weights the attacked clients start from).
      images: auxiliary images ``[n, *victim.image_shape]`` in [0, 1].
      labels: their labels in ``[0, K)``.
      config: the denoiser's architecture, DDPM and training settings.
      seed: initialisation and training noise.
      extra: JSON description stored with it (e.g. the auxiliary data).
      progress: a tqdm bar over the training steps.

    Returns:
      A :class:`TrainedDenoiser` (the gradients are divided by their RMS
      ``scale`` before diffusion).

    >>> import numpy as np
    >>> from jaxleak.models import get_victim
    >>> victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=2, hidden=4)
    >>> variables = victim.init(jax.random.key(0))
    >>> config = MjolnirConfig(denoiser="mlp", hidden=8, depth=1, timesteps=10, train_steps=2)
    >>> x = np.random.default_rng(0).random((6, 4, 4, 1), dtype=np.float32)
    >>> trained = train_denoiser(victim, variables, x, np.arange(6) % 2, config)
    >>> trained.dim, trained.update_shapes
    (78, ((4,), (16, 4), (2,), (4, 2)))
    """
    grad_one = lambda x, y: dummy_gradient(
        victim, variables, x[None], jax.nn.one_hot(y[None], victim.num_classes))
    grads = jax.jit(jax.vmap(grad_one))(jnp.asarray(images, jnp.float32), jnp.asarray(labels))
    paths, shapes = _update_layout(jax.tree_util.tree_map(lambda a: a[0], grads))
    clean = jax.vmap(flatten_update)(grads)
    scale = float(jnp.sqrt(jnp.mean(clean**2))) or 1.0
    params, loss = fit_denoiser(clean / scale, config, seed=seed, progress=progress)
    description = {"seed": int(seed), "update_paths": paths,
                   "victim_weights": tree_digest(variables),
                   "train_images": int(np.shape(images)[0]), **(extra or {})}
    return TrainedDenoiser(params=params, scale=scale, config=config,
                           victim=json.loads(json.dumps(victim.metadata())), update_shapes=shapes,
                           loss=loss, extra=description)


def fit_denoiser(data: Float[Array, "n p"], config: MjolnirConfig, *, seed: int = 0,
                 progress: bool = False) -> tuple[PyTree, float]:
    """Trains the configured denoiser (epsilon prediction, Adam) on the rows of ``data``.

    All steps run in one compiled ``lax.scan``; with ``progress`` each step also ticks a
    tqdm bar from the host (a debug callback: the trained weights are the same either way).

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

    from tqdm.auto import tqdm

    bar = tqdm(total=config.train_steps, desc="mjolnir denoiser", unit="step", disable=not progress,
               leave=False)

    def step(carry, k):
        p, s = carry
        k1, k2, k3 = jax.random.split(k, 3)
        idx = jax.random.randint(k1, (config.train_batch,), 0, data.shape[0])
        t = jax.random.randint(k2, (config.train_batch,), 0, config.timesteps)
        eps = jax.random.normal(k3, (config.train_batch, dim))
        loss, g = jax.value_and_grad(loss_fn)(p, data[idx], t, eps)
        u, s = opt.update(g, s, p)
        if progress:  # decided at trace time: without a bar the compiled loop has no callback
            jax.debug.callback(lambda: bar.update(1))
        return (optax.apply_updates(p, u), s), loss

    keys = jax.random.split(jax.random.fold_in(key, 1), config.train_steps)
    (params, _), losses = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks))((params, opt.init(params)), keys)
    loss = float(jnp.mean(losses[-min(100, config.train_steps):]))  # waits for every step (and tick)
    bar.close()
    return params, loss


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
    run = _denoise_fn(int(noisy.shape[1]), architecture(config))  # compiled once per architecture
    out, t0 = run(params, jnp.asarray(noisy) / scale, jnp.float32(sigma / scale), keys)
    return out * scale, int(np.asarray(t0)[0])


# --------------------------------------------------------------------------- the stored denoiser

ARTIFACT_KIND = "denoiser/mjolnir"
ARCHITECTURE_FIELDS = ("timesteps", "beta_start", "beta_end", "denoiser", "unet_channels", "hidden",
                       "depth", "time_dim")
TRAINING_FIELDS = ("train_steps", "train_batch", "learning_rate", "aux_dataset", "aux_split",
                   "aux_n")
IN_CALL_NOTE = "denoiser trained in-call; save one with jaxleak train mjolnir"


def architecture(config: MjolnirConfig) -> MjolnirConfig:
    """``config`` reduced to what builds and runs the denoiser (the rest at defaults)."""
    return MjolnirConfig(**{name: getattr(config, name) for name in ARCHITECTURE_FIELDS})


def _fields(config: MjolnirConfig, names) -> dict[str, Any]:
    return json.loads(json.dumps({name: getattr(config, name) for name in names}))


def _artifact_config(victim_metadata: dict, shapes, config: MjolnirConfig) -> dict[str, Any]:
    return {"denoiser": _fields(config, ARCHITECTURE_FIELDS), "victim": victim_metadata,
            "update_shapes": [list(shape) for shape in shapes],
            "dim": int(sum(math.prod(shape) for shape in shapes))}


def save_denoiser(directory: str | Path, trained: TrainedDenoiser, *, force: bool = False) -> Path:
    """Saves a trained denoiser as a ``"denoiser/mjolnir"`` artifact (:mod:`jaxleak.artifacts`).

    The config holds the architecture and DDPM, the victim and the update
    layout it was trained for; the extra holds the training settings, loss and
    description. ``scale`` is stored with the parameters.

    Raises:
      ArtifactError: ``directory`` is occupied (see :func:`jaxleak.artifacts.save_artifact`).
    """
    loss = trained.loss if math.isfinite(trained.loss) else None
    extra = {"train": _fields(trained.config, TRAINING_FIELDS), "loss": loss, **trained.extra}
    tree = {"params": trained.params, "scale": np.asarray(trained.scale, np.float32)}
    config = _artifact_config(trained.victim, trained.update_shapes, trained.config)
    return save_artifact(directory, kind=ARTIFACT_KIND, config=config, tree=tree, extra=extra,
                         force=force)


def _requirements(victim, like: PyTree | None, expect: dict[str, Any] | None) -> dict[str, Any]:
    """The part of a denoiser's artifact config that must equal the caller's."""
    required: dict[str, Any] = {}
    if victim is not None:
        required["victim"] = victim.metadata()
    if like is not None:
        required["update_shapes"] = [list(shape) for shape in _update_layout(like)[1]]
    if expect:
        required["denoiser"] = dict(expect)
    return required


def load_denoiser(directory: str | Path, *, victim=None, like: PyTree | None = None,
                  expect: dict[str, Any] | None = None) -> TrainedDenoiser:
    """Loads a denoiser saved by :func:`save_denoiser`, refusing one made for something else.

    Args:
      directory: the artifact folder.
      victim: when given, the victim it must have been trained for.
      like: when given, one update (a tree without the target axis) whose
        layout it must have been trained for.
      expect: architecture fields the caller requires (e.g. ``{"denoiser": "unet"}``).

    Returns:
      A :class:`TrainedDenoiser`.

    Raises:
      ArtifactError: a missing or foreign folder, or a stored victim, layout or
        architecture that differs from the given ones (the keys named).
    """
    required = _requirements(victim, like, expect)
    info = read_artifact(directory, kind=ARTIFACT_KIND)
    check_config(directory, info, required)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in info.config["denoiser"].items()}
    train = {k: v for k, v in (info.extra.get("train") or {}).items() if k in TRAINING_FIELDS}
    config = MjolnirConfig(**fields, **train)
    dim = int(info.config["dim"])
    net = make_denoiser(dim, config)
    params = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros(dim), jnp.zeros(()))
    abstract = {"params": params, "scale": jax.ShapeDtypeStruct((), jnp.float32)}
    tree, _, extra = load_artifact(directory, kind=ARTIFACT_KIND, target=abstract)
    loss = extra.pop("loss", None)
    extra.pop("train", None)
    return TrainedDenoiser(params=tree["params"], scale=float(tree["scale"]), config=config,
                           victim=info.config["victim"],
                           update_shapes=tuple(tuple(s) for s in info.config["update_shapes"]),
                           loss=math.nan if loss is None else float(loss), extra=extra)


def aux_images(config: MjolnirConfig, image_shape, *, data_dir: str | None = None,
               download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The auxiliary images of ``config``, resized (grey <-> colour) to ``image_shape``."""
    from jaxleak.data import load_dataset

    data = load_dataset(config.aux_dataset, split=config.aux_split, n=config.aux_n, seed=0,
                        image_size=tuple(image_shape[:2]), data_dir=data_dir, download=download)
    images = np.asarray(data.images, np.float32)
    channels = image_shape[2]
    if images.shape[-1] != channels:  # grey <-> colour
        images = (np.repeat(images, channels, -1) if images.shape[-1] == 1
                  else images.mean(-1, keepdims=True))
    return images, np.asarray(data.labels)


def _aux_description(config: MjolnirConfig) -> str:
    return f"{config.aux_dataset}:{config.aux_split} n={config.aux_n}"


def train_mjolnir_denoiser(victim, variables, *, out: str | Path,
                           overrides: dict[str, Any] | None = None, seed: int = 0,
                           force: bool = False, data_dir: str | None = None,
                           download: bool = False, progress: bool = False) -> dict[str, Any]:
    """Trains Mjolnir's denoiser once for a victim and saves it (``jaxleak train mjolnir``).

    Args:
      victim: the victim whose updates will be attacked (e.g. rebuilt from a capture).
      variables: its weights (the clients' starting point).
      out: the artifact folder to create (checked before training).
      overrides: :class:`MjolnirConfig` fields (architecture, DDPM, training,
        auxiliary data).
      seed: initialisation and training noise.
      force: replace an existing denoiser at ``out``.
      data_dir, download: where the auxiliary dataset is (see :func:`jaxleak.data.load_dataset`).
      progress: a tqdm bar over the training steps.

    Returns:
      A JSON-ready summary (folder, kind, dimension, loss, gradient scale, auxiliary data).

    Raises:
      ArtifactError: ``out`` is occupied or not writable (before any training).
      ValueError: bad overrides.
    """
    config = MjolnirConfig(**(overrides or {}))
    if config.denoiser_path is not None:
        raise ValueError("denoiser_path names a denoiser to load, not one to train")
    out = check_target(out, force=force)
    images, labels = aux_images(config, victim.image_shape, data_dir=data_dir, download=download)
    trained = train_denoiser(victim, variables, images, labels % victim.num_classes, config,
                             seed=seed, extra={"aux": _aux_description(config)}, progress=progress)
    path = save_denoiser(out, trained, force=force)
    return {"denoiser": str(path), "kind": ARTIFACT_KIND, "dim": trained.dim,
            "denoiser_loss": trained.loss if math.isfinite(trained.loss) else None,
            "gradient_scale": trained.scale, "aux": _aux_description(config),
            "architecture": _fields(config, ARCHITECTURE_FIELDS)}


# --------------------------------------------------------------------------- the attack


def _given_architecture(overrides: dict[str, Any]) -> dict[str, Any]:
    """Architecture fields the caller set explicitly (a loaded denoiser must agree with them)."""
    given = {k: overrides[k] for k in ARCHITECTURE_FIELDS if k in overrides}
    return _fields(MjolnirConfig(**given), given) if given else {}


def reconstruct_capture(cap, victim, variables, updates: PyTree, *, overrides: dict[str, Any], chunk: int,
                        target_batch: int, patience, min_delta: float, seed: int, progress: bool,
                        batching: str = "vmap", unroll: int = 1, conv_impl: str = "auto",
                        devices: int | None = None,
                        denoiser: TrainedDenoiser | str | Path | None = None):
    """Mjolnir on a capture's updates: a denoiser (loaded, or trained here), denoise, DLG.

    Args:
      cap: the capture (its ``meta`` gives the noise std and the batch size).
      victim, variables: the victim and its capture-time weights.
      updates: ``[T, ...]`` params-shaped observed updates.
      overrides: :class:`MjolnirConfig` fields (``denoiser_path`` loads a saved denoiser).
      chunk, target_batch, patience, min_delta, seed, progress, batching, unroll, conv_impl,
        devices: the optimisation driver's options.
      denoiser: a :class:`TrainedDenoiser` or a saved denoiser's folder (takes
        precedence over ``overrides["denoiser_path"]``). With neither, the
        denoiser is trained inside this call (and the returned info says so).

    Returns:
      ``(config, RunResult, extra)`` with ``extra["mjolnir"]`` describing the
      denoising (start step, sigma, denoiser loss and source, what is scaled down).

    Raises:
      ArtifactError: a saved denoiser made for another victim, update layout or
        architecture than the given ones.
    """
    from jaxleak.attacks.optimization._run import reconstruct

    config = MjolnirConfig(**overrides)
    batch = int(cap.meta.get("batch_size", 1))
    like = jax.tree_util.tree_map(lambda a: a[0], updates)
    source = denoiser if denoiser is not None else config.denoiser_path
    if source is None:
        images, labels = aux_images(config, cap.image_shape)
        labels = labels % victim.num_classes
        trained = train_denoiser(victim, variables, images, labels, config, seed=seed,
                                 extra={"aux": _aux_description(config)}, progress=progress)
        origin = IN_CALL_NOTE
    else:
        if isinstance(source, TrainedDenoiser):
            trained, origin = source, "given in memory"
            stored = _artifact_config(trained.victim, trained.update_shapes, trained.config)
            required = _requirements(victim, like, _given_architecture(overrides))
            diffs = differences(stored, json.loads(json.dumps(required)))
            if diffs:
                raise ArtifactError("the given denoiser was trained for something else: "
                                    + "; ".join(diffs))
        else:
            trained = load_denoiser(source, victim=victim, like=like,
                                    expect=_given_architecture(overrides))
            origin = f"loaded from {Path(source).absolute()}"
        config = dataclasses.replace(config, **{k: getattr(trained.config, k)
                                                for k in ARCHITECTURE_FIELDS + TRAINING_FIELDS})
    flat = jax.vmap(flatten_update)(updates)
    sigma = float(cap.meta.get("noise_std") or 0.0)
    if not math.isfinite(sigma):
        sigma = 0.0
    denoised, t0 = denoise(trained.params, trained.scale, config, flat, sigma, seed=seed)
    clean = jax.vmap(lambda v: unflatten_update(v, like))(denoised)
    res = reconstruct("dlg", victim, variables, clean, config=config.dlg(), batch_size=batch,
                      true_labels=np.asarray(cap.labels).reshape(cap.n, batch), chunk=chunk,
                      target_batch=target_batch, patience=patience, min_delta=min_delta, seed=seed,
                      progress=progress, batching=batching, unroll=unroll, conv_impl=conv_impl,
                      devices=devices)
    info = {"t_start": t0, "sigma": sigma, "gradient_scale": trained.scale,
            "denoiser_loss": trained.loss if math.isfinite(trained.loss) else None,
            "aux": trained.extra.get("aux"), "denoiser": config.denoiser, "denoiser_source": origin,
            "scaled_down": ("MLP denoiser on the flat update (reference: UNet on the gradient "
                            "reshaped into an image)" if config.denoiser == "mlp" else
                            f"UNet channels {list(config.unet_channels)}, {config.train_steps} "
                            f"training steps on {config.aux_n} aux images (reference: larger, "
                            "longer)")}
    if trained.extra.get("victim_weights") not in (None, tree_digest(variables)):
        info["note"] = ("the denoiser was trained on other victim weights than the capture's "
                        "(its clean-gradient statistics may not match)")
    return config, res, {"mjolnir": info}


__all__ = [
    "ARCHITECTURE_FIELDS",
    "ARTIFACT_KIND",
    "DENOISERS",
    "IN_CALL_NOTE",
    "TRAINING_FIELDS",
    "Denoiser",
    "MjolnirConfig",
    "TrainedDenoiser",
    "UNetDenoiser",
    "alpha_bars",
    "architecture",
    "aux_images",
    "denoise",
    "fit_denoiser",
    "flatten_update",
    "grid_side",
    "load_denoiser",
    "make_denoiser",
    "reconstruct_capture",
    "save_denoiser",
    "start_step",
    "time_embedding",
    "train_denoiser",
    "train_mjolnir_denoiser",
    "unflatten_update",
]
