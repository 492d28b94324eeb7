"""DLG, iDLG, Inverting Gradients, GradInversion and GRNN as :class:`Problem` s.

Each attack is a frozen config (defaults = the reference settings of
``NOTES.md`` section 5) and a cached factory ``make_problem(victim, config,
batch_size)`` returning pure functions for ONE target. A target is the pytree
``{"update": params-shaped gradient, "label_probs": [B, K]}`` (the labels are
used only by attacks that do not optimise them); ``shared`` is the victim's
variables. Candidates live in the victim's input space, [0, 1]; IG may optimise
a normalised parametrisation of them (``IGConfig.space``, :mod:`._space`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PyTree

from jaxleak.attacks.optimization._driver import Candidate, Problem
from jaxleak.attacks.optimization._matching import (
    DISTANCES,
    batchnorm_prior,
    dummy_gradient,
    l2_prior,
    layer_weights,
    total_variation,
)
from jaxleak.attacks.optimization._space import as_floats, check_space, image_space

LABEL_MODES = ("known", "infer", "joint")


def _check(config) -> None:
    if config.iterations < 1 or config.restarts < 1:
        raise ValueError(f"iterations and restarts must be >= 1, got {config.iterations}, {config.restarts}")
    if config.labels not in config.label_modes:
        raise ValueError(f"labels must be one of {config.label_modes}, got {config.labels!r}")
    if config.layer_weights is not None and config.layers is not None \
            and len(config.layer_weights) != len(config.layers):
        raise ValueError("layer_weights must give one weight per entry of layers")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DLGConfig:
    """DLG (Zhu et al. 2019) and, with ``labels="infer"``, iDLG (Zhao et al. 2020).

    Attributes:
      iterations: L-BFGS steps (reference 300).
      learning_rate: L-BFGS step scale (reference 1).
      memory_size: L-BFGS history (torch's default 100).
      linesearch_steps: zoom line-search evaluations per step (optax); 0 = a
        fixed step of ``learning_rate`` as torch's LBFGS without line search.
      inner_steps: L-BFGS updates per iteration. DLG's code calls torch's
        ``LBFGS.step`` ``iterations`` times with its default ``max_iter=20`` and
        no line search, i.e. up to 20 fixed-step updates per iteration: the
        defaults ``inner_steps=20, linesearch_steps=0`` are that loop.
        ``inner_steps=1, linesearch_steps=20`` is a cheaper variant that
        converges more slowly (docs/baselines.md).
      labels: ``"joint"`` soft labels optimised with the image (DLG),
        ``"infer"`` read off the head gradient (iDLG), ``"known"`` given.
      distance: ``"l2"`` (reference) or ``"cosine"``.
      layers, layer_weights: optional subset / weights of the matched leaves
        (see :func:`layer_weights`); default all leaves, weight 1.
      init_std: dummy images start as N(0, init_std^2) (DLG: randn).
      restarts: independent initialisations per target (reference 1).
    """

    iterations: int = 300
    learning_rate: float = 1.0
    memory_size: int = 100
    linesearch_steps: int = 0
    inner_steps: int = 20
    labels: str = "joint"
    distance: str = "l2"
    layers: tuple[str, ...] | None = None
    layer_weights: tuple[float, ...] | None = None
    init_std: float = 1.0
    restarts: int = 1
    label_modes = LABEL_MODES

    def __post_init__(self):
        _check(self)
        if self.distance not in ("l2", "cosine"):
            raise ValueError(f"distance must be 'l2' or 'cosine', got {self.distance!r}")
        if self.inner_steps < 1 or self.linesearch_steps < 0:
            raise ValueError(f"inner_steps must be >= 1 and linesearch_steps >= 0, got "
                             f"{self.inner_steps}, {self.linesearch_steps}")


def idlg_config(**overrides: Any) -> DLGConfig:
    """iDLG: DLG with the label inferred from the head gradient."""
    return DLGConfig(**{"labels": "infer", **overrides})


@dataclasses.dataclass(frozen=True, kw_only=True)
class IGConfig:
    """Inverting Gradients (Geiping et al. 2020), the CIFAR-10 ConvNet setting by default.

    Attributes:
      iterations: Adam steps (reference 24,000 for CIFAR; 4,800 for some runs).
      learning_rate: Adam step size (0.1).
      tv: total-variation weight (1e-6 CIFAR ConvNet; 1e-1 ImageNet).
      signed: Adam on the sign of the gradient.
      boxed: clip the images to the valid range [0, 1] after every step.
      lr_decay: multiply the step size by 0.1 at 3/8, 5/8 and 7/8 of ``iterations``.
      labels: ``"known"`` (reference: labels given) or ``"infer"``.
      layers, layer_weights: subset / weights of the leaves in the global cosine.
      init_std: start from N(0, init_std^2) in the optimised space (reference ``randn``).
      restarts: initialisations per target, best by matching loss (reference 1 for CIFAR).
      space: the space the images are optimised in (:mod:`._space`): ``"normalized"``
        (``(x - mean) / std`` per channel, as IG's public code: the N(0, 1) start, the step, the box and
        TV act there; the default since it measured better than pixels on CIFAR-10, 0.7 dB on 8
        images, experiments/baselines/README.md "Image space") or ``"pixel"`` ([0, 1] pixels, the
        behaviour before that measurement: ~66% of the start is clipped at the first step, and the
        signed step of 0.1 is ~4x larger in pixel terms).
      mean, std: per-channel statistics of the normalised space (one value broadcasts);
        ``None``: CIFAR-10's for RGB images, MNIST's for grayscale ones.
    """

    iterations: int = 24_000
    learning_rate: float = 0.1
    tv: float = 1e-6
    signed: bool = True
    boxed: bool = True
    lr_decay: bool = True
    labels: str = "known"
    layers: tuple[str, ...] | None = None
    layer_weights: tuple[float, ...] | None = None
    init_std: float = 1.0
    restarts: int = 1
    space: str = "normalized"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    label_modes = ("known", "infer")

    def __post_init__(self):
        object.__setattr__(self, "mean", as_floats(self.mean))
        object.__setattr__(self, "std", as_floats(self.std))
        _check(self)
        check_space(self.space, self.mean, self.std)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradInversionConfig:
    """GradInversion / See-through-gradients (Yin et al. 2021).

    Defaults follow the public breaching re-implementation's setting where the
    paper is silent (L2 matching scaled 1e-4, Adam 0.1, 20,000 iterations,
    warm-up 50 then cosine decay, TV 1e-4, L2 1e-6, BN 1e-4); group
    consistency weight and group size are ours (the paper registers the seeds'
    images before averaging; here the plain mean is used).

    Attributes:
      iterations, learning_rate, warmup: Adam with linear warm-up over
        ``warmup`` steps then cosine decay to 0.
      matching_scale: weight of the L2 gradient distance.
      bn, tv, l2, group: prior weights (BN statistics, total variation, image
        norm, distance of each seed's images to the group mean).
      group_size: seeds optimised jointly per target; the output is their mean.
      labels: ``"infer"`` (batch label counts; the paper's row-minimum strategy) or ``"known"``.
      boxed: clip to [0, 1] after every step.
      layers, layer_weights, init_std, restarts: as for :class:`IGConfig`.
    """

    iterations: int = 20_000
    learning_rate: float = 0.1
    warmup: int = 50
    matching_scale: float = 1e-4
    bn: float = 1e-4
    tv: float = 1e-4
    l2: float = 1e-6
    group: float = 1e-2
    group_size: int = 4
    labels: str = "infer"
    boxed: bool = True
    layers: tuple[str, ...] | None = None
    layer_weights: tuple[float, ...] | None = None
    init_std: float = 1.0
    restarts: int = 1
    label_modes = ("known", "infer")

    def __post_init__(self):
        _check(self)
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRNNConfig:
    """GRNN (Ren et al. 2022): a generator maps fixed noise to image and label.

    Attributes:
      iterations: RMSprop steps (reference 1,000).
      learning_rate: RMSprop step size (reference 1e-4).
      wasserstein: weight of the per-layer 1-D Wasserstein gradient distance (1).
      tv: total-variation weight (1e-3).
      noise_dim, width: generator input size and base width (ours: a small
        deconvolution generator, no BatchNorm; GRNN's has BN in train mode).
      labels: ``"joint"`` (the generator's label branch, reference), ``"infer"``, ``"known"``.
      layers, layer_weights, restarts: as for :class:`IGConfig`.
    """

    iterations: int = 1_000
    learning_rate: float = 1e-4
    wasserstein: float = 1.0
    tv: float = 1e-3
    noise_dim: int = 128
    width: int = 64
    labels: str = "joint"
    layers: tuple[str, ...] | None = None
    layer_weights: tuple[float, ...] | None = None
    restarts: int = 1
    label_modes = LABEL_MODES

    def __post_init__(self):
        _check(self)


# --------------------------------------------------------------------------- shared pieces


def _weights(victim, config) -> PyTree:
    params = victim.abstract_variables()["params"]
    return layer_weights(params, layers=config.layers, weights=config.layer_weights)


def _init_images(key, victim, batch: int, std: float) -> Float[Array, "b h w c"]:
    return std * jax.random.normal(key, (batch, *victim.image_shape), jnp.float32)


def _matching(victim, weights, distance: str, shared, images, probs, update) -> Float[Array, ""]:
    return DISTANCES[distance](dummy_gradient(victim, shared, images, probs), update, weights)


# --------------------------------------------------------------------------- DLG / iDLG


@functools.lru_cache(maxsize=32)
def make_dlg(victim, config: DLGConfig, batch_size: int) -> Problem:
    """DLG / iDLG for one target of ``batch_size`` images (L-BFGS via ``optax.lbfgs``)."""
    weights = _weights(victim, config)
    linesearch = (optax.scale_by_zoom_linesearch(max_linesearch_steps=config.linesearch_steps)
                  if config.linesearch_steps > 0 else None)
    opt = optax.lbfgs(learning_rate=config.learning_rate, memory_size=config.memory_size,
                      linesearch=linesearch)
    joint = config.labels == "joint"
    k = victim.num_classes

    def probs_of(x, target):
        return jax.nn.softmax(x["label_logits"]) if joint else target["label_probs"]

    def objective(x, target, shared):
        return _matching(victim, weights, config.distance, shared, x["images"], probs_of(x, target),
                         target["update"])

    def init(key, target, shared):
        k1, k2 = jax.random.split(key)
        x = {"images": _init_images(k1, victim, batch_size, config.init_std),
             "label_logits": jax.random.normal(k2, (batch_size, k), jnp.float32)}
        return {"x": x, "opt": opt.init(x), "target_probs": target["label_probs"]}

    def step(state, target, shared, it):
        fn = functools.partial(objective, target=target, shared=shared)

        def update(carry, _):
            x, opt_state = carry
            if linesearch is None:  # only the line search keeps value and gradient in the state
                value, grad = jax.value_and_grad(fn)(x)
            else:
                value, grad = optax.value_and_grad_from_state(fn)(x, state=opt_state)
            updates, opt_state = opt.update(grad, opt_state, x, value=value, grad=grad, value_fn=fn)
            return (optax.apply_updates(x, updates), opt_state), value

        (x, opt_state), values = jax.lax.scan(update, (state["x"], state["opt"]), None,
                                              length=config.inner_steps)
        return {**state, "x": x, "opt": opt_state}, values[0]

    def candidate(state, shared):
        x = state["x"]
        probs = jax.nn.softmax(x["label_logits"]) if joint else state["target_probs"]
        return Candidate(images=x["images"], label_probs=probs)

    return Problem(init=init, step=step, candidate=candidate)


# --------------------------------------------------------------------------- Inverting Gradients


def ig_schedule(learning_rate: float, iterations: int, decay: bool) -> optax.Schedule:
    """IG's step size: x0.1 at 3/8, 5/8 and 7/8 of the budget (torch MultiStepLR milestones)."""
    if not decay:
        return optax.constant_schedule(learning_rate)
    bounds = {int(iterations * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8)}
    return optax.piecewise_constant_schedule(learning_rate, bounds)


@functools.lru_cache(maxsize=32)
def make_ig(victim, config: IGConfig, batch_size: int) -> Problem:
    """Inverting Gradients for one target of ``batch_size`` images.

    The state's ``"images"`` are in ``config.space`` (:mod:`._space`); the victim sees their pixels.

    Raises:
      ValueError: ``config.mean`` / ``config.std`` for another channel count than the victim's.
    """
    weights = _weights(victim, config)
    opt = optax.adam(ig_schedule(config.learning_rate, config.iterations, config.lr_decay))
    space = image_space(config.space, victim.image_shape[-1], config.mean, config.std)

    def objective(z, target, shared):
        images = space.to_pixels(z)
        match = _matching(victim, weights, "cosine", shared, images, target["label_probs"], target["update"])
        # TV on the optimised variable, as IG's code (which optimises normalised images) takes it
        return match + config.tv * total_variation(z), match

    def init(key, target, shared):
        # not boxed at the start: IG's code clamps only after each step
        z = _init_images(key, victim, batch_size, config.init_std)
        return {"images": z, "opt": opt.init(z), "probs": target["label_probs"]}

    def step(state, target, shared, it):
        (_, match), grad = jax.value_and_grad(objective, has_aux=True)(state["images"], target, shared)
        if config.signed:
            grad = jnp.sign(grad)
        updates, opt_state = opt.update(grad, state["opt"], state["images"])
        z = state["images"] + updates
        if config.boxed:
            z = space.box(z)
        return {**state, "images": z, "opt": opt_state}, match

    def candidate(state, shared):
        images = space.to_pixels(state["images"])
        if space.name == "normalized":  # the affine map's rounding at the box's ends, and the unboxed start
            images = jnp.clip(images, 0.0, 1.0)
        return Candidate(images=images, label_probs=state["probs"])

    return Problem(init=init, step=step, candidate=candidate)


# --------------------------------------------------------------------------- GradInversion


@functools.lru_cache(maxsize=32)
def make_gradinversion(victim, config: GradInversionConfig, batch_size: int) -> Problem:
    """GradInversion for one target: ``group_size`` seeds optimised jointly."""
    weights = _weights(victim, config)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, min(config.warmup, config.iterations - 1), config.iterations)
    opt = optax.adam(schedule)

    def one_seed(images, target, shared):
        match = _matching(victim, weights, "l2", shared, images, target["label_probs"], target["update"])
        prior = (config.bn * batchnorm_prior(victim, shared, images)
                 + config.tv * total_variation(images) + config.l2 * l2_prior(images))
        return config.matching_scale * match + prior, match

    def objective(group, target, shared):
        losses, matches = jax.vmap(one_seed, in_axes=(0, None, None))(group, target, shared)
        mean = jax.lax.stop_gradient(jnp.mean(group, axis=0))
        consistency = jnp.mean(jnp.sum((group - mean) ** 2, axis=(1, 2, 3, 4)))
        return jnp.sum(losses) + config.group * consistency, jnp.mean(matches)

    def init(key, target, shared):
        keys = jax.random.split(key, config.group_size)
        group = jax.vmap(lambda kk: _init_images(kk, victim, batch_size, config.init_std))(keys)
        return {"group": group, "opt": opt.init(group), "probs": target["label_probs"]}

    def step(state, target, shared, it):
        (_, match), grad = jax.value_and_grad(objective, has_aux=True)(state["group"], target, shared)
        updates, opt_state = opt.update(grad, state["opt"], state["group"])
        group = state["group"] + updates
        if config.boxed:
            group = jnp.clip(group, 0.0, 1.0)
        return {**state, "group": group, "opt": opt_state}, match

    def candidate(state, shared):
        return Candidate(images=jnp.mean(state["group"], axis=0), label_probs=state["probs"])

    return Problem(init=init, step=step, candidate=candidate)


# --------------------------------------------------------------------------- GRNN


class GRNNGenerator(nn.Module):
    """Noise ``[noise_dim]`` -> (image ``[H, W, C]`` in (0, 1), label distribution ``[K]``)."""

    image_shape: tuple[int, int, int]
    num_classes: int
    width: int = 64

    @nn.compact
    def __call__(self, z: Float[Array, " n"]) -> tuple[Array, Array]:
        h, w, c = self.image_shape
        h0, w0 = -(-h // 4), -(-w // 4)
        x = nn.Dense(h0 * w0 * 2 * self.width)(z).reshape(h0, w0, 2 * self.width)
        x = nn.leaky_relu(x, 0.2)
        for _ in range(2):
            x = nn.leaky_relu(nn.ConvTranspose(self.width, (4, 4), strides=(2, 2))(x[None])[0], 0.2)
        image = nn.sigmoid(nn.Conv(c, (3, 3))(x[None])[0])[:h, :w]
        label = nn.softmax(nn.Dense(self.num_classes)(z))
        return image, label


@functools.lru_cache(maxsize=32)
def make_grnn(victim, config: GRNNConfig, batch_size: int) -> Problem:
    """GRNN for one target: the generator's weights are the optimisation variable."""
    weights = _weights(victim, config)
    gen = GRNNGenerator(image_shape=victim.image_shape, num_classes=victim.num_classes, width=config.width)
    opt = optax.rmsprop(config.learning_rate)
    joint = config.labels == "joint"

    def generate(params, noise, probs):
        images, labels = jax.vmap(lambda z: gen.apply(params, z))(noise)
        return images, (labels if joint else probs)

    def objective(params, noise, target, shared):
        images, probs = generate(params, noise, target["label_probs"])
        trial = dummy_gradient(victim, shared, images, probs)
        match = DISTANCES["l2"](trial, target["update"], weights)
        wd = DISTANCES["wasserstein"](trial, target["update"], weights)
        return match + config.wasserstein * wd + config.tv * total_variation(images), match

    def init(key, target, shared):
        k1, k2 = jax.random.split(key)
        noise = jax.random.normal(k2, (batch_size, config.noise_dim), jnp.float32)
        params = gen.init(k1, noise[0])
        return {"params": params, "opt": opt.init(params), "noise": noise, "probs": target["label_probs"]}

    def step(state, target, shared, it):
        (_, match), grad = jax.value_and_grad(objective, has_aux=True)(
            state["params"], state["noise"], target, shared)
        updates, opt_state = opt.update(grad, state["opt"], state["params"])
        return {**state, "params": optax.apply_updates(state["params"], updates), "opt": opt_state}, match

    def candidate(state, shared):
        images, probs = generate(state["params"], state["noise"], state["probs"])
        return Candidate(images=images, label_probs=probs)

    return Problem(init=init, step=step, candidate=candidate)


__all__ = [
    "DLGConfig",
    "GRNNConfig",
    "GRNNGenerator",
    "GradInversionConfig",
    "IGConfig",
    "idlg_config",
    "ig_schedule",
    "make_dlg",
    "make_gradinversion",
    "make_grnn",
    "make_ig",
]
