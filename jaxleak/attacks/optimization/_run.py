"""Entry points: targets from observed updates, the attack registry, null controls, matching."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

from jaxleak.attacks.optimization._attacks import (
    DLGConfig,
    GradInversionConfig,
    GRNNConfig,
    IGConfig,
    idlg_config,
    make_dlg,
    make_gradinversion,
    make_grnn,
    make_ig,
)
from jaxleak.attacks.optimization._driver import RunOptions, RunResult, run_problem
from jaxleak.attacks.optimization._labels import infer_labels


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """How to build an attack: default config factory and problem factory."""

    config: Callable[..., Any]
    make: Callable[..., Any]


ATTACKS: dict[str, AttackSpec] = {
    "dlg": AttackSpec(config=DLGConfig, make=make_dlg),
    "idlg": AttackSpec(config=idlg_config, make=make_dlg),
    "ig": AttackSpec(config=IGConfig, make=make_ig),
    "gradinversion": AttackSpec(config=GradInversionConfig, make=make_gradinversion),
    "grnn": AttackSpec(config=GRNNConfig, make=make_grnn),
}
"""Optimisation attacks by CLI name (``mjolnir`` lives in :mod:`._mjolnir`)."""


def default_config(attack: str, **overrides: Any):
    """The reference config of ``attack`` with ``overrides`` (any config field).

    >>> default_config("ig", iterations=10).tv
    1e-06
    """
    if attack not in ATTACKS:
        raise ValueError(f"unknown optimisation attack {attack!r}; known: {', '.join(ATTACKS)}")
    return ATTACKS[attack].config(**overrides)


def head_gradients(victim, updates: PyTree) -> tuple[Float[Array, "t k d"], Float[Array, "t k"]]:
    """The head's class-major weight ``[T, K, d]`` and bias ``[T, K]`` gradients of stacked updates."""
    head = victim.layers["head"].select(updates)
    return jnp.swapaxes(jnp.asarray(head["kernel"]), -1, -2), jnp.asarray(head["bias"])


def prepare_targets(
    victim,
    updates: PyTree,
    *,
    labels: str,
    batch_size: int,
    true_labels: Int[np.ndarray, "t b"] | None = None,
) -> dict[str, Any]:
    """The driver's targets: ``{"update": [T, ...] tree, "label_probs": [T, B, K]}``.

    Args:
      victim: the victim.
      updates: params-shaped tree of ``[T, ...]`` observed updates.
      labels: ``"known"`` (one-hot of ``true_labels``) or ``"infer"`` / ``"joint"``
        (inferred from the head gradient; ``"joint"`` attacks only start from them).
      batch_size: images per update ``B``.
      true_labels: ``[T, B]`` ints, needed for ``"known"``.

    Raises:
      ValueError: ``"known"`` without labels, or labels of the wrong shape.
    """
    n = int(jax.tree_util.tree_leaves(updates)[0].shape[0])
    if labels == "known":
        if true_labels is None:
            raise ValueError("labels='known' needs the true labels (the capture holds none)")
        y = np.asarray(true_labels).reshape(n, -1)
        if y.shape[1] != batch_size:
            raise ValueError(f"true labels must be [T, B] = [{n}, {batch_size}], got {np.shape(true_labels)}")
        y = jnp.asarray(y)
    else:
        gw, gb = head_gradients(victim, updates)
        y = jax.jit(jax.vmap(lambda w, b: infer_labels(w, b, batch_size)))(gw, gb)
    probs = jax.nn.one_hot(y, victim.num_classes, dtype=jnp.float32)
    return {"update": updates, "label_probs": probs}


def attack_conv_impl(victim, conv_impl: str = "auto") -> str:
    """Convolution implementation for an attack's steps (``"auto"`` decides).

    Every step differentiates the victim's gradient again (double backward).
    With XLA's convolution, XLA:CPU ran those steps far slower inside the
    compiled iteration loop than as im2col ``"patches"`` (9.8x, IG, ConvNet
    width 64, 32x32; 2.4x for ResNet-18; BENCHMARKS.md), and under ``vmap`` over targets the per-target
    weight gradients become grouped convolutions, which were 4-5x slower than
    im2col on an H100 in the capture benchmark. So ``"auto"`` picks
    ``"patches"`` for every victim with convolutions, on every backend (not
    yet measured for attacks on a GPU); ``"xla"`` for the MLP. Only the speed
    changes (same parameters, same math up to float rounding).

    >>> from jaxleak.models import get_victim
    >>> attack_conv_impl(get_victim("convnet", image_shape=(16, 16, 3), num_classes=3, width=2))
    'patches'
    """
    if conv_impl != "auto":
        return conv_impl
    return "xla" if victim.conv_impl is None else "patches"


def reconstruct(
    attack: str,
    victim,
    variables: Mapping[str, PyTree],
    updates: PyTree,
    *,
    config=None,
    batch_size: int = 1,
    true_labels: np.ndarray | None = None,
    chunk: int = 100,
    target_batch: int = 16,
    patience: int | None = None,
    min_delta: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
    batching: str = "vmap",
    unroll: int = 1,
    conv_impl: str = "auto",
    devices: int | None = None,
) -> RunResult:
    """Runs an optimisation attack on ``T`` observed updates at once.

    Args:
      attack: a key of :data:`ATTACKS`.
      victim: the victim (:class:`jaxleak.models.Victim`).
      variables: its variables at capture time.
      updates: params-shaped tree of ``[T, ...]`` protected updates.
      config: the attack's config (default: the reference setting).
      batch_size: images per update ``B``.
      true_labels: ``[T, B]`` labels, used when ``config.labels == "known"``.
      chunk, target_batch, patience, min_delta, seed, progress, batching, unroll, devices:
        see :class:`RunOptions`.
      conv_impl: the victim's convolutions during the attack (:func:`attack_conv_impl`).

    Returns:
      The driver's :class:`RunResult` (images ``[T, B, H, W, C]``, unclipped).

    Raises:
      ValueError: unknown attack, or updates that do not fit the victim.
    """
    config = default_config(attack) if config is None else config
    check_updates(victim, variables, updates)
    victim = victim.with_conv_impl(attack_conv_impl(victim, conv_impl))
    targets = prepare_targets(victim, updates, labels=config.labels, batch_size=batch_size,
                              true_labels=true_labels)
    problem = ATTACKS[attack].make(victim, config, batch_size)
    options = RunOptions(iterations=config.iterations, chunk=chunk, target_batch=target_batch,
                         restarts=config.restarts, patience=patience, min_delta=min_delta, seed=seed,
                         progress=progress, batching=batching, unroll=unroll, devices=devices)
    return run_problem(problem, targets, dict(variables), options)


def check_updates(victim, variables: Mapping[str, PyTree], updates: PyTree) -> None:
    """Raises ``ValueError`` unless ``updates`` is ``[T, ...]`` of every parameter of ``variables``."""
    want = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    got = dict(jax.tree_util.tree_flatten_with_path(updates)[0])
    for path, leaf in want:
        name = jax.tree_util.keystr(path)
        if path not in got:
            raise ValueError(f"the update has no entry for parameter {name} of {victim.name}")
        if tuple(np.shape(got[path])[1:]) != tuple(np.shape(leaf)):
            raise ValueError(f"update {name} has shape {np.shape(got[path])}, expected [T, *{np.shape(leaf)}]")


def null_updates(updates: PyTree, *, kind: str = "shuffle", seed: int = 0) -> PyTree:
    """Updates that carry no information about target ``t``'s images (the null control).

    Args:
      updates: ``[T, ...]`` observed updates.
      kind: ``"shuffle"``: target ``t`` gets the update of target ``(t + 1) % T``
        (the gradient of different images, same model and protection; T >= 2);
        ``"noise"``: i.i.d. Gaussian noise with each leaf's per-target RMS (pure
        noise of the observed scale).
      seed: noise seed (``"noise"``).

    Returns:
      A tree shaped like ``updates``.

    >>> import numpy as np
    >>> null_updates({"w": np.arange(3.0)[:, None]})["w"].ravel().tolist()
    [1.0, 2.0, 0.0]
    """
    leaves, tree = jax.tree_util.tree_flatten(updates)
    n = int(leaves[0].shape[0])
    if kind == "shuffle":
        if n < 2:
            raise ValueError("the 'shuffle' null control needs at least 2 targets")
        return jax.tree_util.tree_map(lambda a: np.roll(np.asarray(a), -1, axis=0), updates)
    if kind == "noise":
        rng = np.random.default_rng(seed)
        out = []
        for a in leaves:
            a = np.asarray(a, np.float32)
            rms = np.sqrt(np.mean(a.reshape(n, -1) ** 2, axis=1)).reshape(n, *([1] * (a.ndim - 1)))
            out.append(rng.standard_normal(a.shape).astype(np.float32) * rms)
        return jax.tree_util.tree_unflatten(tree, out)
    raise ValueError(f"null control kind must be 'shuffle' or 'noise', got {kind!r}")


def match_batch(
    recon: Float[np.ndarray, "b h w c"],
    truth: Float[np.ndarray, "b h w c"],
    *,
    metric: str = "psnr",
) -> Int[np.ndarray, " b"]:
    """Best one-to-one assignment of reconstructions to originals (Hungarian algorithm).

    Args:
      recon, truth: ``[B, H, W, C]`` images in [0, 1].
      metric: ``"psnr"`` or ``"ssim"`` (maximised) or ``"mse"`` (minimised).

    Returns:
      ``perm`` with ``recon[perm[i]]`` assigned to ``truth[i]``.

    >>> import numpy as np
    >>> a = np.zeros((2, 4, 4, 1)); a[1] += 1
    >>> match_batch(a[::-1], a).tolist()
    [1, 0]
    """
    from scipy.optimize import linear_sum_assignment

    from jaxleak import metrics

    if metric not in ("psnr", "ssim", "mse"):
        raise ValueError(f"metric must be psnr, ssim or mse, got {metric!r}")
    b = recon.shape[0]
    x = jnp.asarray(np.repeat(recon, b, axis=0), jnp.float32)  # x[i*b + j] = recon[i]
    y = jnp.asarray(np.tile(truth, (b, 1, 1, 1)), jnp.float32)  # y[i*b + j] = truth[j]
    score = np.asarray(getattr(metrics, metric)(x, y), np.float64).reshape(b, b)
    score = np.nan_to_num(score, nan=-1e9, posinf=1e9)
    rows, cols = linear_sum_assignment(score if metric == "mse" else -score)
    perm = np.empty(b, np.int64)
    perm[cols] = rows
    return perm


__all__ = [
    "ATTACKS",
    "AttackSpec",
    "attack_conv_impl",
    "check_updates",
    "default_config",
    "head_gradients",
    "match_batch",
    "null_updates",
    "prepare_targets",
    "reconstruct",
]
