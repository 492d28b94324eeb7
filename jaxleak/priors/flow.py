"""Flow matching on the linear path: the loss, a jitted training step, training runs, sampling.

The path (NOTES.md section 4): ``x_t = (1 - t) x0 + t x1`` with noise
``x0 ~ N(0, I)``, data ``x1`` in [-1, 1] and ``t ~ U[0, 1]``; ``t = 1`` is clean
data. The velocity field regresses the path's velocity ``x1 - x0``:
``L = E ||v(x_t, t) - (x1 - x0)||^2`` (mean over pixels here). Sampling
integrates ``dx/dt = v(x, t)`` from noise at ``t = 0`` to ``t = 1``.

A training run's folder is an artifact of kind ``"prior/flow"``
(:mod:`jaxleak.artifacts`)::

    out/config.json     config: {"unet": UNetConfig fields, "train": TrainConfig fields
                        (``steps`` excepted), "data": {"count", "image_shape", "digest",
                        **info}}; extra: {"steps": the steps the run was started with}
    out/steps/<step>/   TrainState (params, ema, opt_state, step, key) + {"history", "steps"}
    out/samples/        step_<step>.png sample grids (EMA weights), when asked

Every step's randomness is ``fold_in(key, step)``, so a run resumed from its
latest checkpoint continues exactly as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PyTree

from jaxleak import artifacts
from jaxleak.priors.unet import UNetConfig, abstract_params, init_params, make_unet, velocity_fn

KIND = "prior/flow"
METHODS: tuple[str, ...] = ("euler", "heun", "midpoint")

VelocityFn = Callable[[Float[Array, "b h w c"], Float[Array, " b"]], Float[Array, "b h w c"]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How a flow-matching prior is trained (defaults: the torchcfm CIFAR-10 recipe, NOTES §4).

    Attributes:
      steps: optimisation steps of the run (may grow on resume: the schedule
        does not depend on it).
      batch_size: images per step (drawn uniformly with replacement).
      learning_rate: Adam learning rate after warm-up.
      warmup_steps: steps of the linear warm-up from 0.
      grad_clip: global-norm gradient clipping bound (0: none).
      ema_decay: EMA decay of the weights; the effective decay at step ``s`` is
        ``min(ema_decay, (1 + s) / (10 + s))`` so that short runs still get a
        useful EMA.
      bf16: compute the UNet in bfloat16 (parameters, optimizer state, loss float32).
      flip: random horizontal flips of the training images.
      seed: seeds the initialisation and every step's draws.
      devices: local devices the batch is split over (``NamedSharding``); the
        batch size must be a multiple of it.
      checkpoint_every: save a step every this many steps (and at the end).
      max_to_keep: step checkpoints kept.
    """

    steps: int = 10_000
    batch_size: int = 128
    learning_rate: float = 2e-4
    warmup_steps: int = 5_000
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    bf16: bool = False
    flip: bool = True
    seed: int = 0
    devices: int = 1
    checkpoint_every: int = 500
    max_to_keep: int = 2

    def __post_init__(self):
        for name in ("steps", "batch_size", "devices", "checkpoint_every", "max_to_keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.batch_size % self.devices:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of devices {self.devices}"
            )
        if self.learning_rate <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("learning_rate must be > 0, warmup_steps and grad_clip >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


class TrainState(NamedTuple):
    """What a training step carries (and a checkpoint holds).

    Attributes:
      params: the UNet's ``params`` being optimised.
      ema: their exponential moving average (what sampling and the attack use).
      opt_state: the optax state.
      step: steps taken (int32 scalar).
      key: the run's PRNG key (raw uint32 ``[2]``); step ``s`` uses ``fold_in(key, s)``.
    """

    params: PyTree
    ema: PyTree
    opt_state: PyTree
    step: Array
    key: Array


class TrainResult(NamedTuple):
    """What :func:`train_flow_prior` returns.

    Attributes:
      state: the final :class:`TrainState` (``state.ema`` are the weights to use).
      history: ``{"step": [...], "loss": [...], "wall_s": [...]}`` (losses every step).
      config: the UNet's config.
    """

    state: TrainState
    history: dict[str, list]
    config: UNetConfig


class Prior(NamedTuple):
    """A loaded prior: ``apply(params, x, t)`` is ``v(x, t)`` on images in [-1, 1].

    Attributes:
      apply: ``(params, x [B, H, W, C], t [B]) -> v [B, H, W, C]``.
      params: the (EMA) weights.
      config: the UNet's config.
      extra: the stored description (training data, step, history).
    """

    apply: Callable[[PyTree, Array, Array], Array]
    params: PyTree
    config: UNetConfig
    extra: dict[str, Any]


# --------------------------------------------------------------------------- the math


def interpolate(
    x0: Float[Array, "*shape"], x1: Float[Array, "*shape"], t: Float[Array, " b"]
) -> Float[Array, "*shape"]:
    """``x_t = (1 - t) x0 + t x1`` (``t`` broadcast over all but the leading axis)."""
    t = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim))
    return (1.0 - t) * x0 + t * x1


def flow_loss(
    velocity: VelocityFn,
    x1: Float[Array, "b h w c"],
    x0: Float[Array, "b h w c"],
    t: Float[Array, " b"],
) -> Float[Array, ""]:
    """The flow-matching loss ``mean ||v(x_t, t) - (x1 - x0)||^2`` for given noise and times.

    Args:
      velocity: ``v(x, t)`` on a batch.
      x1: data in [-1, 1].
      x0: noise of the same shape.
      t: one time per image in [0, 1].

    Returns:
      The mean over images and pixels.

    >>> x1, x0 = jnp.ones((2, 2, 2, 1)), jnp.zeros((2, 2, 2, 1))
    >>> float(flow_loss(lambda x, t: jnp.ones_like(x), x1, x0, jnp.array([0.2, 0.7])))
    0.0
    """
    prediction = velocity(interpolate(x0, x1, t), t)
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - (x1 - x0)))


def sampled_flow_loss(
    velocity: VelocityFn, x1: Float[Array, "b h w c"], key: Array
) -> Float[Array, ""]:
    """:func:`flow_loss` with ``x0 ~ N(0, I)`` and ``t ~ U[0, 1]`` drawn from ``key``."""
    noise_key, time_key = jax.random.split(key)
    x0 = jax.random.normal(noise_key, x1.shape, jnp.float32)
    t = jax.random.uniform(time_key, (x1.shape[0],), jnp.float32)
    return flow_loss(velocity, x1, x0, t)


def ema_update(ema: PyTree, params: PyTree, decay: float | Array) -> PyTree:
    """``decay * ema + (1 - decay) * params``, leaf by leaf.

    >>> float(ema_update(jnp.array(1.0), jnp.array(3.0), 0.75))
    1.5
    """
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def ema_decay_at(step: Array, decay: float) -> Array:
    """The effective EMA decay after ``step`` updates: ``min(decay, (1 + step) / (10 + step))``."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Adam after a linear warm-up from 0 to ``learning_rate``, with global-norm clipping."""
    if config.warmup_steps:
        schedule = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    else:
        schedule = config.learning_rate
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
    return optax.chain(*parts, optax.adam(schedule))


def to_model_space(images01: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """Images in [0, 1] to the model's [-1, 1]."""
    return 2.0 * images01 - 1.0


def to_image_space(x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """The model's [-1, 1] to images in [0, 1] (clipped)."""
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


# --------------------------------------------------------------------------- training step


def init_state(config: UNetConfig, train_config: TrainConfig) -> TrainState:
    """A fresh :class:`TrainState` (weights from ``seed``; the EMA starts at the weights)."""
    key = jax.random.PRNGKey(train_config.seed)
    params = init_params(config, jax.random.fold_in(key, 0x1A17))
    optimizer = make_optimizer(train_config)
    ema = jax.tree_util.tree_map(jnp.copy, params)  # its own buffers: the step donates both
    return TrainState(params, ema, optimizer.init(params), jnp.zeros((), jnp.int32), key)


def abstract_state(config: UNetConfig, train_config: TrainConfig) -> TrainState:
    """Shapes and dtypes of a :class:`TrainState` (for restoring a checkpoint)."""
    params = abstract_params(config)
    opt_state = jax.eval_shape(make_optimizer(train_config).init, params)
    return TrainState(params, params, opt_state, jax.ShapeDtypeStruct((), jnp.int32),
                      jax.ShapeDtypeStruct((2,), jnp.uint32))


def _batch(images: Array, key: Array, batch_size: int, flip: bool) -> Array:
    """A uniformly drawn batch in [-1, 1] (``images`` uint8 or float [0, 1]), randomly flipped."""
    index_key, flip_key = jax.random.split(key)
    index = jax.random.randint(index_key, (batch_size,), 0, images.shape[0])
    x = images[index].astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    x = to_model_space(x)
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
        x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1], x)
    return x


def make_train_step(
    config: UNetConfig, train_config: TrainConfig
) -> Callable[[TrainState, Array], tuple[TrainState, Array]]:
    """The jitted step ``(state, images [N, H, W, C]) -> (state, loss)`` (``state`` donated).

    See :func:`_make_train_step`; runs that differ only in length or
    checkpointing share one compiled step.
    """
    relevant = dataclasses.replace(train_config, steps=1, checkpoint_every=1, max_to_keep=1)
    return _make_train_step(config, relevant)


@functools.lru_cache(maxsize=16)
def _make_train_step(
    config: UNetConfig, train_config: TrainConfig
) -> Callable[[TrainState, Array], tuple[TrainState, Array]]:
    """The jitted step ``(state, images [N, H, W, C]) -> (state, loss)`` (``state`` donated).

    ``images`` are the whole training set (uint8, or float in [0, 1]); the step
    draws its batch, flips it, draws noise and times, takes one clipped Adam
    step and updates the EMA. With ``devices > 1`` the batch is split over the
    local devices (``NamedSharding`` on its leading axis); parameters replicate.
    """
    dtype = jnp.bfloat16 if train_config.bf16 else jnp.float32
    model = make_unet(config, dtype)
    optimizer = make_optimizer(train_config)
    sharding = None
    if train_config.devices > 1:
        mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[: train_config.devices]),
                                 ("batch",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))

    def loss_fn(params, x1, key):
        dropout_key, loss_key = jax.random.split(key)

        def velocity(x, t):
            return model.apply({"params": params}, x, t, train=True,
                               rngs={"dropout": dropout_key})

        return sampled_flow_loss(velocity, x1, loss_key)

    def step(state: TrainState, images: Array) -> tuple[TrainState, Array]:
        key = jax.random.fold_in(state.key, state.step)
        batch_key, loss_key = jax.random.split(key)
        x1 = _batch(images, batch_key, train_config.batch_size, train_config.flip)
        if sharding is not None:
            x1 = jax.lax.with_sharding_constraint(x1, sharding)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x1, loss_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, ema_decay_at(state.step, train_config.ema_decay))
        return TrainState(params, ema, opt_state, state.step + 1, state.key), loss

    return jax.jit(step, donate_argnums=0)


# --------------------------------------------------------------------------- sampling


def integrate(
    velocity: VelocityFn,
    x0: Float[Array, "b h w c"],
    steps: int,
    method: str = "euler",
) -> Float[Array, "b h w c"]:
    """Integrates ``dx/dt = velocity(x, t)`` from ``t = 0`` to ``1`` in ``steps`` fixed steps.

    ``"euler"`` (1 evaluation per step), ``"heun"`` (2: trapezoid of the
    Euler predictor) or ``"midpoint"`` (2). Traceable (a ``lax.fori_loop``).

    >>> x = integrate(lambda x, t: jnp.full_like(x, 2.0), jnp.zeros((1, 1, 1, 1)), 7)
    >>> round(float(x.squeeze()), 5)
    2.0
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    dt = 1.0 / steps
    batch = x0.shape[0]

    def times(value):
        return jnp.full((batch,), value, jnp.float32)

    def body(i, x):
        t = i * dt
        k1 = velocity(x, times(t))
        if method == "euler":
            return x + dt * k1
        if method == "heun":
            k2 = velocity(x + dt * k1, times(t + dt))
            return x + 0.5 * dt * (k1 + k2)
        k2 = velocity(x + 0.5 * dt * k1, times(t + 0.5 * dt))
        return x + dt * k2

    return jax.lax.fori_loop(0, steps, body, x0)


@functools.partial(jax.jit, static_argnames=("config", "n", "steps", "method"))
def _sample(params, key, *, config, n, steps, method):
    # XLA's convolutions: forward-only, the solver's loop does not slow them (unlike the attacks' loops,
    # which also differentiate through the UNet; docs/pitfalls.md)
    velocity = velocity_fn(config)
    x0 = jax.random.normal(key, (n, *config.image_shape), jnp.float32)
    x1 = integrate(lambda x, t: velocity(params, x, t), x0, steps, method)
    return to_image_space(x1)


def sample(
    params: PyTree,
    config: UNetConfig,
    key: Array,
    n: int,
    steps: int = 50,
    method: str = "euler",
) -> Float[Array, "n h w c"]:
    """``n`` images from the prior: noise at ``t = 0`` integrated to ``t = 1`` (jitted, batched).

    Args:
      params: the UNet's (EMA) ``params``.
      config: its architecture.
      key: PRNG key of the starting noise.
      n: images (one batch).
      steps: integration steps.
      method: ``"euler"``, ``"heun"`` or ``"midpoint"``.

    Returns:
      Images ``[n, H, W, C]`` in [0, 1].

    >>> from jaxleak.priors.unet import UNetConfig, init_params
    >>> cfg = UNetConfig(image_size=8, base_width=8, channel_mult=(1,), num_res_blocks=1,
    ...                  attention_resolutions=(), groups=4)
    >>> sample(init_params(cfg, jax.random.key(0)), cfg, jax.random.key(1), 4, steps=2).shape
    (4, 8, 8, 3)
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return _sample(params, key, config=config, n=n, steps=steps, method=method)


@functools.partial(jax.jit, static_argnames=("config",))
def _velocity_norm(params, images01, t, *, config):
    x = to_model_space(images01)
    v = make_unet(config).apply({"params": params}, x, t)
    return jnp.mean(jnp.square(v), axis=(1, 2, 3))


def velocity_norm(
    params: PyTree,
    config: UNetConfig,
    images01: Float[Array, "b h w c"],
    t: float | Float[Array, " b"],
) -> Float[Array, " b"]:
    """Per-image ``||v(x, t)||^2 / D`` (the mean over the D pixel values): the attack's regulariser.

    Small on images the prior finds realistic for time ``t``, large on noisy
    ones (on the linear path ``v`` is a denoising residual over ``1 - t``).
    Differentiable in ``images01`` (jit inside).

    Args:
      params: the UNet's (EMA) ``params``.
      config: its architecture.
      images01: images ``[B, H, W, C]`` in [0, 1] (mapped to [-1, 1] inside).
      t: one time for all images, or one per image.

    Returns:
      ``[B]`` mean squared velocity per image.

    >>> from jaxleak.priors.unet import UNetConfig, init_params
    >>> cfg = UNetConfig(image_size=8, base_width=8, channel_mult=(1,), num_res_blocks=1,
    ...                  attention_resolutions=(), groups=4)
    >>> velocity_norm(init_params(cfg, jax.random.key(0)), cfg, jnp.zeros((5, 8, 8, 3)), 0.9).shape
    (5,)
    """
    images01 = jnp.asarray(images01)
    # one compiled program whether t is a scalar or per image
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), images01.shape[:1])
    return _velocity_norm(params, images01, t, config=config)


# --------------------------------------------------------------------------- training runs


def _images_uint8(images: Any, config: UNetConfig) -> np.ndarray:
    """Training images as uint8 ``[N, H, W, C]`` (a quarter of float32's memory), checked."""
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != config.image_shape:
        raise ValueError(
            f"images must be [N, {', '.join(map(str, config.image_shape))}] for this UNet, "
            f"got {images.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError("no training images")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    if not np.isfinite(images).all() or images.min() < 0.0 or images.max() > 1.0:
        raise ValueError("float images must be finite and in [0, 1]")
    # 8-bit source data is stored exactly; resized images lose < 1/510 per pixel
    return np.round(images * 255.0).astype(np.uint8)


def _digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


def _train_dict(train_config: TrainConfig) -> dict[str, Any]:
    fields = dataclasses.asdict(train_config)
    fields.pop("steps")  # a resumed run may be extended
    return fields


def _run_config(config, train_config, images, info) -> dict[str, Any]:
    measured = {"count": int(images.shape[0]), "image_shape": list(images.shape[1:]),
                "digest": _digest(images)}
    clash = sorted(set(measured) & set(info or {}))
    if clash:
        raise ValueError(f"info must not set {clash}: they describe the images themselves")
    data = {**measured, **dict(info or {})}
    return {"unet": config.to_dict(), "train": _train_dict(train_config), "data": data}


def read_run_config(path: str | Path) -> tuple[UNetConfig, TrainConfig, dict[str, Any]]:
    """The ``(UNetConfig, TrainConfig, data)`` a prior's run folder stores.

    The stored ``TrainConfig`` has the ``steps`` the run was started with (a
    resumed run may have been extended; each checkpoint records its own).

    Raises:
      ArtifactError: not a ``"prior/flow"`` folder.
    """
    info = artifacts.read_artifact(path, kind=KIND)
    config = UNetConfig.from_dict(info.config["unet"])
    train_config = TrainConfig(**info.config["train"], steps=int(info.extra.get("steps", 1)))
    return config, train_config, dict(info.config.get("data") or {})


def _host(tree: PyTree) -> PyTree:
    # Host copies put back uncommitted: orbax's committed arrays would miss the
    # compiled step's cache (one recompile per resume).
    return jax.device_put(jax.device_get(tree))


def save_sample_grid(path: str | Path, images: Float[np.ndarray, "n h w c"]) -> Path:
    """Saves images in [0, 1] as a near-square PNG grid (``ceil(sqrt(n))`` per row).

    >>> import tempfile
    >>> save_sample_grid(tempfile.mkdtemp() + "/grid.png", np.zeros((5, 8, 8, 3))).name
    'grid.png'
    """
    from jaxleak.report import save_image_grid

    images = np.asarray(images)
    side = int(np.ceil(np.sqrt(images.shape[0])))
    rows = [images[i : i + side] for i in range(0, images.shape[0], side)]
    return save_image_grid(path, rows)


def train_flow_prior(
    images: Any,
    *,
    config: UNetConfig,
    train_config: TrainConfig,
    out: str | Path | None = None,
    resume: bool = False,
    until: int | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    sample_every: int | None = None,
    sample_n: int = 16,
    sample_steps: int = 50,
) -> TrainResult:
    """Trains a flow-matching prior on ``images``, checkpointing to ``out``.

    Args:
      images: training images ``[N, H, W, C]``, float in [0, 1] (as
        :func:`jaxleak.data.load_dataset` gives them) or uint8; kept on the
        device as uint8.
      config: the UNet (its ``image_shape`` must be the images').
      train_config: the training settings.
      out: the run's artifact folder (kind ``"prior/flow"``); ``None``: no
        checkpoints. Without ``resume`` it must not hold a checkpoint.
      resume: continue the run in ``out`` from its latest step. ``config``,
        ``train_config`` (except ``steps``, which may grow), the images and
        ``info`` must equal the stored ones (the error names what differs).
        A folder with no ``config.json`` yet starts a new run.
      until: stop after this step (checkpointing it), e.g. to split a run.
      info: JSON-ready description of the data stored in the config (dataset
        name, split, image size) and so checked on resume.
      progress: a tqdm bar with the loss.
      sample_every: with ``out``, save a grid of ``sample_n`` EMA samples
        (``sample_steps`` Euler steps, fixed noise) to ``out/samples/`` every
        this many steps and at the end.
      sample_n: images per sample grid.
      sample_steps: Euler steps of the sample grids.

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: images of the wrong shape or range, ``sample_every`` without
        ``out``, a run already past ``train_config.steps``.
      ArtifactError: an occupied ``out`` without ``resume``, or a resumed run
        given other settings.

    >>> from jaxleak.priors.unet import UNetConfig
    >>> cfg = UNetConfig(image_size=8, base_width=8, channel_mult=(1,), num_res_blocks=1,
    ...                  attention_resolutions=(), groups=4)
    >>> data = np.random.default_rng(0).random((8, 8, 8, 3), dtype=np.float32)
    >>> train_config = TrainConfig(steps=3, batch_size=4, learning_rate=3e-3, warmup_steps=0,
    ...                            ema_decay=0.9, flip=False)
    >>> result = train_flow_prior(data, config=cfg, train_config=train_config, progress=False)
    >>> int(result.state.step), len(result.history["loss"])
    (3, 3)
    """
    pixels = _images_uint8(images, config)
    if sample_every is not None and (out is None or sample_every < 1):
        raise ValueError("sample_every needs out (the grids go to out/samples/) and must be >= 1")
    last = train_config.steps if until is None else int(until)
    if not 1 <= last <= train_config.steps:
        raise ValueError(f"until must be in [1, steps={train_config.steps}], got {until}")
    if train_config.devices > jax.local_device_count():
        raise ValueError(
            f"devices={train_config.devices} but only {jax.local_device_count()} local devices"
        )
    run_config = _run_config(config, train_config, pixels, info)

    state, history, checkpoints = None, {"step": [], "loss": [], "wall_s": []}, None
    if out is not None:
        out = Path(out).absolute()
        if resume and (out / artifacts.CONFIG_FILE).is_file():
            artifacts.resume_run(out, kind=KIND, expect=run_config)
            checkpoints = artifacts.StepCheckpoints(out, max_to_keep=train_config.max_to_keep)
            if checkpoints.latest_step() is not None:
                tree, extra, _ = checkpoints.restore(target=abstract_state(config, train_config))
                state = TrainState(*_host(tuple(tree)))
                history = {k: list(v) for k, v in extra["history"].items()}
                if int(state.step) > train_config.steps:
                    checkpoints.close()
                    raise ValueError(
                        f"{out} is already at step {int(state.step)}, past the "
                        f"{train_config.steps} requested"
                    )
        else:
            artifacts.start_run(out, kind=KIND, config=run_config, extra={"steps": train_config.steps})
            checkpoints = artifacts.StepCheckpoints(out, max_to_keep=train_config.max_to_keep)
    if state is None:
        state = init_state(config, train_config)

    step_fn = make_train_step(config, train_config)
    if train_config.devices > 1:
        mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[: train_config.devices]),
                                 ("batch",))
        whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        data, state = jax.device_put(pixels, whole), jax.device_put(state, whole)
    else:
        data = jax.device_put(pixels)
    sample_key = jax.random.fold_in(jax.random.PRNGKey(train_config.seed), 0x5A3)

    def save():
        if checkpoints is not None:
            extra = {"history": history, "steps": train_config.steps}
            checkpoints.save_step(int(state.step), state, extra=extra)

    def save_samples():
        grid = sample(state.ema, config, sample_key, sample_n, sample_steps)
        save_sample_grid(out / "samples" / f"step_{int(state.step):07d}.png", np.asarray(grid))

    from tqdm.auto import tqdm

    wall_before = history["wall_s"][-1] if history["wall_s"] else 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=last, initial=int(state.step), desc="flow prior", unit="step",
               disable=not progress)
    try:
        while int(state.step) < last:
            state, loss = step_fn(state, data)
            done, loss = int(state.step), float(loss)
            history["step"].append(done)
            history["loss"].append(loss)
            history["wall_s"].append(wall_before + time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
            if done % train_config.checkpoint_every == 0 or done == last:
                save()
            if sample_every is not None and (done % sample_every == 0 or done == last):
                save_samples()
    except KeyboardInterrupt:
        save()  # keep what was done; resume continues from here
        raise
    finally:
        bar.close()
        if checkpoints is not None:
            checkpoints.close()
    return TrainResult(state, history, config)


# --------------------------------------------------------------------------- loading


def load_prior(path: str | Path, *, ema: bool = True) -> Prior:
    """A trained prior from its artifact folder.

    Args:
      path: a ``"prior/flow"`` folder: a training run of :func:`train_flow_prior`
        (its latest step is read) or an export of :func:`export_prior`.
      ema: the EMA weights (default) or the raw optimised ones (runs only).

    Returns:
      A :class:`Prior` (float32 weights; ``apply`` runs float32).

    Raises:
      ArtifactError: a missing folder, another kind, or no step saved yet.
    """
    config, train_config, data = read_run_config(path)
    apply = velocity_fn(config)

    if (Path(path) / artifacts.ARRAYS_DIR).is_dir():
        loaded = artifacts.load_artifact(path, kind=KIND)
        params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), loaded.tree["params"])
        expected = jax.tree_util.tree_structure(abstract_params(config))
        if jax.tree_util.tree_structure(params) != expected:
            raise artifacts.ArtifactError(f"{path}: the stored weights do not fit its UNet config")
        return Prior(apply, _host(params), config, {**loaded.extra, "data": data})
    loaded = artifacts.load_artifact(path, kind=KIND, target=abstract_state(config, train_config))
    state = TrainState(*loaded.tree)
    extra = {**loaded.extra, "data": data}
    return Prior(apply, _host(state.ema if ema else state.params), config, extra)


SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
"""Where the package's shipped priors live (one artifact folder per name)."""

DEFAULT_PRIOR = "tinyimagenet32-small"
"""The shipped prior the flow-matching attacks use for 32x32 RGB images unless told otherwise."""


def shipped_priors() -> list[str]:
    """Names of the priors shipped inside the package (folders of ``SHIPPED_DIR``).

    >>> DEFAULT_PRIOR in shipped_priors() or not SHIPPED_DIR.is_dir()
    True
    """
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(d.name for d in SHIPPED_DIR.iterdir() if (d / artifacts.CONFIG_FILE).is_file())


def resolve_prior(name_or_path: str | Path) -> Path:
    """The artifact folder of a shipped prior's name, or ``name_or_path`` itself when it is a folder.

    Raises:
      ArtifactError: neither a shipped name nor an existing folder (one line listing the names).
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    shipped = SHIPPED_DIR / str(name_or_path)
    if "/" not in str(name_or_path) and (shipped / artifacts.CONFIG_FILE).is_file():
        return shipped
    names = ", ".join(shipped_priors()) or "none installed"
    raise artifacts.ArtifactError(f"no prior {str(name_or_path)!r}: give a folder from `jaxleak train "
                                  f"flow-prior` or a shipped name ({names})")


def load(name_or_path: str | Path = DEFAULT_PRIOR, *, ema: bool = True) -> Prior:
    """A prior by shipped name (``"tinyimagenet32-small"``, no network) or by folder.

    Args:
      name_or_path: a name of :func:`shipped_priors` or a folder of :func:`train_flow_prior`
        / :func:`export_prior`.
      ema: for a training run, its EMA weights (default) or the raw ones.

    Returns:
      A :class:`Prior`; ``extra["source"]`` says where it came from.

    Raises:
      ArtifactError: unknown name, missing folder, or not a prior.
    """
    path = resolve_prior(name_or_path)
    prior = load_prior(path, ema=ema)
    shipped = path.resolve().parent == SHIPPED_DIR
    source = f"shipped prior {path.name}" if shipped else str(path.resolve())
    return prior._replace(extra={**prior.extra, "source": source, "name": path.name if shipped else None})


def export_prior(
    run: str | Path,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    extra: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Saves a run's EMA weights alone, compactly, as a ``"prior/flow"`` artifact to ship.

    Args:
      run: a training run's folder.
      out: the new artifact folder (config as the run's; :func:`load_prior` reads it).
      dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"`` for the stored weights.
      extra: description added to the run's (command, wall time, quality numbers).
      force: replace an existing artifact at ``out``.

    Returns:
      The absolute ``out`` folder.

    Raises:
      ValueError: an unknown ``dtype``.
      ArtifactError: ``run`` is no prior run, or ``out`` is occupied.
    """
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    prior = load_prior(run)
    info = artifacts.read_artifact(run, kind=KIND)
    params = jax.tree_util.tree_map(lambda a: np.asarray(jnp.asarray(a, dtype)), prior.params)
    description = {
        **info.extra,
        "steps": int(prior.extra.get("step", 0)),
        "history_tail": {k: v[-100:] for k, v in (prior.extra.get("history") or {}).items()},
        "exported_from": str(Path(run).absolute()),
        "dtype": dtype,
        "digest": artifacts.tree_digest(params),
        **dict(extra or {}),
    }
    return artifacts.save_artifact(out, kind=KIND, config=info.config, tree={"params": params},
                                   extra=description, force=force)


__all__ = [
    "DEFAULT_PRIOR",
    "KIND",
    "METHODS",
    "SHIPPED_DIR",
    "Prior",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "abstract_state",
    "ema_decay_at",
    "ema_update",
    "export_prior",
    "flow_loss",
    "init_state",
    "integrate",
    "interpolate",
    "load",
    "load_prior",
    "make_optimizer",
    "make_train_step",
    "read_run_config",
    "resolve_prior",
    "sample",
    "sampled_flow_loss",
    "save_sample_grid",
    "shipped_priors",
    "to_image_space",
    "to_model_space",
    "train_flow_prior",
    "velocity_norm",
]
