"""DP calibrations (host side) and the protection of one client's update (jitted).

``resolve`` turns a :class:`DPConfig` into concrete noise scales on the host;
``protect_update`` applies clipping and noise to one client's per-example
gradients and is meant to be ``vmap``-ped over clients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray, PyTree

from jaxleak.privacy.accounting import ACCOUNTANTS, dpsgd_epsilon, dpsgd_noise_multiplier
from jaxleak.privacy.clipping import clip_by_global_norm

CALIBRATIONS = ("paper", "dpsgd", "none")
MECHANISMS = ("gaussian", "laplace")
SCOPES = ("all", "layer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPConfig:
    """How a client protects its update.

    Attributes:
      calibration: ``"paper"`` (Mjolnir/Venom protocol), ``"dpsgd"`` (Abadi et al.)
        or ``"none"`` (no clipping, no noise).
      mechanism: ``"gaussian"`` or ``"laplace"`` (Laplace only under ``paper``).
      epsilon: privacy budget; ``None`` with ``dpsgd`` requires ``noise_multiplier``.
      delta: privacy parameter delta.
      clip: L2 clipping bound ``C``.
      lr: learning rate in the paper's sensitivity ``s = 2 * lr * C / m``.
      noise_multiplier: DP-SGD ``z``; when set it is used as given and no accountant runs.
      sampling_rate: DP-SGD Poisson sampling rate ``q`` for the accountant.
      steps: DP-SGD steps composed by the accountant.
      accountant: ``"rdp"`` or ``"pld"``.
      scope: which layers the ``paper`` calibration protects: ``"all"`` (every
        layer clipped to ``C`` on its own, then noised) or ``"layer"`` (only the
        captured dense layer, the FC layer of the paper's wording; the other
        layers are released as the plain mean gradient). The two agree on
        everything that reads only that layer (SPE, Venom, FGLA); they differ for
        attacks that match the whole update (docs/baselines.md).
    """

    calibration: str = "paper"
    mechanism: str = "gaussian"
    epsilon: float | None = 10.0
    delta: float = 1e-5
    clip: float = 1.0
    lr: float = 1e-3
    noise_multiplier: float | None = None
    sampling_rate: float = 1.0
    steps: int = 1
    accountant: str = "rdp"
    scope: str = "all"

    def __post_init__(self):
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if self.calibration == "dpsgd" and self.mechanism != "gaussian":
            raise ValueError("DP-SGD is defined with the Gaussian mechanism; use --mechanism gaussian")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope != "all" and self.calibration != "paper":
            raise ValueError(f"scope {self.scope!r} exists only under the paper calibration "
                             f"(dpsgd clips the whole gradient; none protects nothing)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.calibration != "none":
            if not (self.clip > 0 and math.isfinite(self.clip)):
                raise ValueError(f"clip must be a positive finite number, got {self.clip}")
            if not 0 < self.delta < 1:
                raise ValueError(f"delta must be in (0, 1), got {self.delta}")
            needs_eps = self.calibration == "paper" or self.noise_multiplier is None
            if needs_eps and (self.epsilon is None or not self.epsilon > 0):
                raise ValueError(f"epsilon must be > 0 for calibration {self.calibration!r}, got {self.epsilon}")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResolvedDP:
    """Concrete noise of one calibration, for a client batch of ``batch_size``.

    Attributes:
      noise_scale: the scale drawn inside ``protect_update``: Gaussian std or
        Laplace scale ``b`` (paper: added to the clipped mean; dpsgd: to the clipped sum).
      noise_std: per-coordinate std of the noise in the *released* update.
      noise_variance: ``noise_std ** 2`` (the ``sigma^2`` SPE may be given).
      noise_multiplier: DP-SGD ``z`` (``None`` otherwise).
      epsilon: the epsilon the noise was calibrated for (``inf`` for ``none``).
      scope: ``"all"`` or ``"layer"`` (see :class:`DPConfig`).
    """

    calibration: str
    mechanism: str
    batch_size: int
    clip: float
    noise_scale: float
    noise_std: float
    noise_variance: float
    noise_multiplier: float | None
    epsilon: float
    delta: float
    accountant: str | None
    scope: str = "all"

    def as_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def paper_noise_scale(
    epsilon: float,
    delta: float,
    *,
    mechanism: str = "gaussian",
    lr: float = 1e-3,
    clip: float = 1.0,
    batch_size: int = 1,
) -> float:
    """The paper protocol's noise scale.

    Gaussian std ``s * sqrt(2 ln(1.25/delta)) / eps`` or Laplace scale ``s / eps``,
    with sensitivity ``s = 2 * lr * C / m``.

    >>> round(paper_noise_scale(10.0, 1e-5), 7)
    0.000969
    """
    s = 2.0 * lr * clip / batch_size
    if mechanism == "gaussian":
        return s * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    if mechanism == "laplace":
        return s / epsilon
    raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")


def resolve(config: DPConfig, *, batch_size: int = 1) -> ResolvedDP:
    """Computes the noise of ``config`` for clients holding ``batch_size`` examples.

    Runs the accountant on the host for ``dpsgd`` when no noise multiplier is given.

    >>> r = resolve(DPConfig(calibration="dpsgd", epsilon=8.0), batch_size=4)
    >>> r.noise_std == r.noise_multiplier * r.clip / 4
    True
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    c = config
    if c.calibration == "none":
        return ResolvedDP(
            calibration="none", mechanism="none", batch_size=batch_size, clip=math.inf,
            noise_scale=0.0, noise_std=0.0, noise_variance=0.0, noise_multiplier=None,
            epsilon=math.inf, delta=c.delta, accountant=None,
        )
    if c.calibration == "paper":
        scale = paper_noise_scale(
            c.epsilon, c.delta, mechanism=c.mechanism, lr=c.lr, clip=c.clip, batch_size=batch_size
        )
        var = scale**2 if c.mechanism == "gaussian" else 2.0 * scale**2
        return ResolvedDP(
            calibration="paper", mechanism=c.mechanism, batch_size=batch_size, clip=c.clip,
            noise_scale=scale, noise_std=math.sqrt(var), noise_variance=var, noise_multiplier=None,
            epsilon=float(c.epsilon), delta=c.delta, accountant=None, scope=c.scope,
        )
    if c.noise_multiplier is not None:
        # The noise is given: report the epsilon it actually buys, not the one asked for.
        z, acc = c.noise_multiplier, c.accountant
        eps = (
            dpsgd_epsilon(z, c.delta, sampling_rate=c.sampling_rate, steps=c.steps, accountant=acc)
            if z > 0 else math.inf
        )
    else:
        z = dpsgd_noise_multiplier(
            float(c.epsilon), c.delta, sampling_rate=c.sampling_rate, steps=c.steps, accountant=c.accountant
        )
        eps, acc = float(c.epsilon), c.accountant
    std = z * c.clip / batch_size
    return ResolvedDP(
        calibration="dpsgd", mechanism="gaussian", batch_size=batch_size, clip=c.clip,
        noise_scale=z * c.clip, noise_std=std, noise_variance=std**2, noise_multiplier=z,
        epsilon=eps, delta=c.delta, accountant=acc,
    )


def _noise_like(key: PRNGKeyArray, tree: PyTree, scale: float, mechanism: str) -> PyTree:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    draw = jax.random.normal if mechanism == "gaussian" else jax.random.laplace
    # Drawn with the axes reversed and transposed back: XLA:CPU vectorises the sampler along
    # the minor axis, which for a dense kernel [d, K] is the short K (the paper-calibration
    # capture step of lenet-dlg got 18% faster on CPU).
    noise = [scale * draw(k, x.shape[::-1], x.dtype).T for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, noise)


def _at(tree: PyTree, path: tuple[str, ...]) -> PyTree:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            raise ValueError(f"layer path {path} not found in the update")
        tree = tree[key]
    return tree


def _replace_at(tree: PyTree, path: tuple[str, ...], value: PyTree) -> PyTree:
    """``tree`` with the subtree at ``path`` replaced by ``value`` (new dicts along the path)."""
    if not path:
        return value
    return {**tree, path[0]: _replace_at(tree[path[0]], path[1:], value)}


def _map_layers(fn, tree: PyTree) -> PyTree:
    """Applies ``fn`` to every innermost dict of arrays (one layer: kernel + bias, ...)."""
    if isinstance(tree, dict) and tree and all(not isinstance(v, dict) for v in tree.values()):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_layers(fn, v) for k, v in tree.items()}
    return fn(tree)


def protect_update(
    per_example_grads: PyTree,
    key: PRNGKeyArray,
    *,
    calibration: str,
    mechanism: str,
    clip: float,
    noise_scale: float,
    only: tuple[str, ...] | None = None,
) -> PyTree:
    """The released update of one client from its per-example gradients.

    Every leaf of ``per_example_grads`` has a leading batch axis ``B``.

    * ``none``: the FedSGD update, the mean gradient.
    * ``paper``: each layer's (kernel and bias jointly) per-example gradient is
      clipped to ``clip``, averaged, and noise of ``noise_scale`` is added to every
      coordinate. For ``B = 1`` this is exactly the paper's joint clip of the FC
      weight and bias gradient; other layers get the same treatment, unless
      ``only`` names one layer: then that layer alone is clipped and noised and
      the rest is the mean gradient (``DPConfig.scope = "layer"``).
    * ``dpsgd``: the whole per-example gradient is clipped to ``clip``, summed,
      Gaussian noise of std ``noise_scale`` (= z C) is added to the sum, and the
      result is divided by ``B``.

    Args:
      per_example_grads: pytree of ``[B, ...]`` gradients of one client.
      key: PRNG key of this client.
      calibration, mechanism, clip, noise_scale: from :func:`resolve` (static).
      only: keys leading to the one layer protected under ``paper`` (``None``: all).

    Returns:
      The protected update, a pytree shaped like one example's gradient.
    """
    leaves = jax.tree_util.tree_leaves(per_example_grads)
    batch = leaves[0].shape[0]
    if calibration == "none":
        return jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), per_example_grads)
    if calibration == "paper" and only is not None:
        mean = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), per_example_grads)
        layer = protect_update(_at(per_example_grads, only), key, calibration="paper", mechanism=mechanism,
                               clip=clip, noise_scale=noise_scale)
        return _replace_at(mean, only, layer)
    if calibration == "paper":
        clip_one = lambda layer: clip_by_global_norm(layer, clip)[0]
        clipped = jax.vmap(lambda g: _map_layers(clip_one, g))(per_example_grads)
        mean = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), clipped)
        noise = _noise_like(key, mean, noise_scale, mechanism)
        return jax.tree_util.tree_map(jnp.add, mean, noise)
    if calibration == "dpsgd":
        clipped = jax.vmap(lambda g: clip_by_global_norm(g, clip)[0])(per_example_grads)
        total = jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0), clipped)
        noise = _noise_like(key, total, noise_scale, "gaussian")
        return jax.tree_util.tree_map(lambda s, n: (s + n) / batch, total, noise)
    raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")


