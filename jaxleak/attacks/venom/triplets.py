"""Venom's training triplets (Algorithm 1), generated on the fly inside one jitted function.

For each auxiliary image ``z``: the victim's forward pass and per-example
gradient, the client's protection (clip + noise at an epsilon drawn per image
from a set, so one recovery network can serve all of them), SPE on the
protected head gradient, and the noise strength ``T`` (or, for the FGLA
baseline, FGLA's label-row features with ``T = 0``). The result
``(x_hat, T, z)`` is what Diff-LRN trains on; nothing is written to disk.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from jaxleak._batching import map_chunked
from jaxleak.attacks.fgla import fgla_features, infer_label
from jaxleak.attacks.spe import SPEConfig, _spe_single
from jaxleak.defenses.dp import protect_update
from jaxleak.protocols import FEDSGD, local_update
from jaxleak.privacy.mechanisms import DPConfig, resolve

FEATURES: tuple[str, ...] = ("spe", "fgla")


class Triplets(NamedTuple):
    """A batch of training triplets (leading axis ``B``).

    Attributes:
      features: SPE's structural prior ``x_hat`` ``[B, h, w, c]`` (the head-input map).
      noise_strength: ``T`` of eq. 7, ``[B]``.
      images: the auxiliary images ``z`` ``[B, H, W, C]``.
      epsilon: the epsilon each triplet's noise was drawn at, ``[B]``.
    """

    features: Float[Array, "b h w c"]
    noise_strength: Float[Array, " b"]
    images: Float[Array, "b hh ww cc"]
    epsilon: Float[Array, " b"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TripletConfig:
    """How the triplets are made.

    Attributes:
      calibration: ``"paper"``, ``"dpsgd"`` or ``"none"`` (see :mod:`jaxleak.privacy`).
      mechanism: ``"gaussian"`` or ``"laplace"``.
      epsilons: the epsilons to train for; each image draws one uniformly.
      delta, clip, lr: DP parameters as in :class:`jaxleak.privacy.DPConfig`.
      accountant: DP-SGD accountant used to turn each epsilon into a noise multiplier.
      sigma2: ``"mechanism"`` (SPE is given the noise variance) or ``"estimate"``.
      layer: the dense layer SPE inverts.
      features: ``"spe"`` (Venom: SPE's structural prior and its ``T``) or
        ``"fgla"`` (FGLA's offset-corrected label row, label inferred from the
        update, ``T = 0``; see :mod:`jaxleak.attacks.fgla`).
    """

    calibration: str = "paper"
    mechanism: str = "gaussian"
    epsilons: tuple[float, ...] = (1.0, 5.0, 10.0)
    delta: float = 1e-5
    clip: float = 1.0
    lr: float = 1e-3
    accountant: str = "rdp"
    sigma2: str = "mechanism"
    layer: str = "head"
    features: str = "spe"

    def __post_init__(self):
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {self.features!r}")
        if self.sigma2 not in ("mechanism", "estimate"):
            raise ValueError(f"sigma2 must be 'mechanism' or 'estimate', got {self.sigma2!r}")
        if self.calibration != "none" and not self.epsilons:
            raise ValueError("epsilons must name at least one epsilon")
        for dp in self.dp_configs():  # validates every (epsilon, calibration) pair now
            del dp

    def dp_configs(self) -> list[DPConfig]:
        """One :class:`DPConfig` per epsilon (a single no-noise config for ``none``)."""
        if self.calibration == "none":
            return [DPConfig(calibration="none")]
        return [
            DPConfig(
                calibration=self.calibration,
                mechanism=self.mechanism,
                epsilon=float(e),
                delta=self.delta,
                clip=self.clip,
                lr=self.lr,
                accountant=self.accountant,
            )
            for e in self.epsilons
        ]


def _noise_table(config: TripletConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-epsilon noise scale (as drawn), released variance and epsilon, computed on the host."""
    resolved = [resolve(dp) for dp in config.dp_configs()]
    return (
        np.array([r.noise_scale for r in resolved], np.float32),
        np.array([r.noise_variance for r in resolved], np.float32),
        np.array([r.epsilon for r in resolved], np.float32),
    )


def _one_triplet(
    victim,
    variables: PyTree,
    image: Float[Array, "h w c"],
    label: Int[Array, ""],
    key: PRNGKeyArray,
    *,
    config: TripletConfig,
    spe_config: SPEConfig,
    table: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> Triplets:
    scales, variances, epsilons = (jnp.asarray(t) for t in table)
    k_eps, k_noise = jax.random.split(key)
    i = jax.random.randint(k_eps, (), 0, scales.shape[0])
    mechanism = config.mechanism if config.calibration == "paper" else "gaussian"
    # The client of the capture, replayed: one FedSGD step whose DP noise scale is drawn per image.
    step = functools.partial(protect_update, calibration=config.calibration, mechanism=mechanism,
                             clip=config.clip, noise_scale=scales[i])
    update = local_update(victim, variables, image[None], label[None], k_noise, protocol=FEDSGD,
                          step=step).update
    dense = victim.layers[config.layer].select(update)
    gw, gb = dense["kernel"].T, dense["bias"]
    if config.features == "fgla":
        fshape = victim.layers[config.layer].feature_shape
        feats = fgla_features(gw, gb, infer_label(gb)).reshape(fshape)
        return Triplets(
            features=feats,
            noise_strength=jnp.zeros((), feats.dtype),
            images=image,
            epsilon=epsilons[i],
        )
    estimate = config.sigma2 == "estimate"
    res = _spe_single(
        gw,
        gb,
        variances[i],
        feature_shape=victim.layers[config.layer].feature_shape,
        config=spe_config,
        estimate=estimate,
    )
    return Triplets(
        features=res.features, noise_strength=res.noise_strength, images=image, epsilon=epsilons[i]
    )


def _triplets_at(one, variables: PyTree, key: PRNGKeyArray, images, labels, index) -> Triplets:
    """Triplets of ``images [B]``; image ``b`` draws from ``fold_in(key, index[b])``."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
    return jax.vmap(one, in_axes=(None, 0, 0, 0))(variables, images, labels, keys)


@functools.lru_cache(maxsize=16)
def _indexed_triplet_fn(victim, config: TripletConfig, spe_config: SPEConfig):
    """A jitted ``(variables, key, images [B,H,W,C], labels [B], index [B]) -> Triplets``.

    The per-epsilon noise table is computed once here (the DP-SGD accountant runs
    on the host, never inside ``jit``).
    """
    table = _noise_table(config)
    one = functools.partial(_one_triplet, victim, config=config, spe_config=spe_config, table=table)
    return jax.jit(functools.partial(_triplets_at, one))


@functools.lru_cache(maxsize=16)
def make_triplet_fn(victim, config: TripletConfig, spe_config: SPEConfig = SPEConfig()):
    """A jitted ``(variables, images [B,H,W,C], labels [B], key) -> Triplets``.

    Image ``b`` uses ``fold_in(key, b)``; the per-epsilon noise table is computed
    once (the DP-SGD accountant runs on the host, never inside ``jit``).
    """
    indexed = _indexed_triplet_fn(victim, config, spe_config)

    def batch(variables, images, labels, key):
        return indexed(variables, key, images, labels, jnp.arange(images.shape[0]))

    return jax.jit(batch)


def make_triplets(
    victim,
    variables: PyTree,
    images: Float[np.ndarray, "b h w c"],
    labels: Int[np.ndarray, " b"],
    key: PRNGKeyArray,
    *,
    config: TripletConfig = TripletConfig(),
    spe_config: SPEConfig = SPEConfig(),
    chunk_size: int | None = None,
    progress: str | None = None,
) -> Triplets:
    """Training triplets for a set of auxiliary images (see :func:`make_triplet_fn`).

    Image ``i`` of the set draws from ``fold_in(key, i)`` whatever ``chunk_size``,
    so the chunk size changes no random draw (float results may differ in the
    last bits: docs/pitfalls.md, "The batching edge").

    Args:
      victim: the victim model.
      variables: its variables.
      images: ``[B, H, W, C]`` auxiliary images in [0, 1].
      labels: ``[B]`` their labels.
      key: base PRNG key.
      config: how the triplets are made.
      spe_config: SPE settings.
      chunk_size: images per compiled call (:func:`jaxleak._batching.map_chunked`;
        the last chunk is padded); ``None`` makes all of them in one call.
      progress: description of a tqdm bar over images; ``None`` shows none.

    Returns:
      :class:`Triplets`: device arrays when made in one call, NumPy arrays when chunked.

    Raises:
      ValueError: on badly shaped inputs, an unknown layer or a ``chunk_size`` below 1.
    """
    whole = chunk_size is None
    xp = jnp if whole else np
    images = xp.asarray(images, np.float32)
    labels = xp.asarray(labels, np.int32)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(victim.image_shape):
        raise ValueError(f"images must be [B, *{victim.image_shape}], got {images.shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be [B] = [{images.shape[0]}], got {labels.shape}")
    if config.layer not in victim.layers:
        raise ValueError(f"victim {victim.name} has no layer {config.layer!r}")
    if not whole and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                      or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n = images.shape[0]
    index = np.arange(n, dtype=np.int32)
    return map_chunked(
        _indexed_triplet_fn(victim, config, spe_config), images, labels, index,
        shared=(variables, key), chunk=max(n, 1) if whole else chunk_size,
        out="device" if whole else "numpy", progress=progress,
    )


__all__ = ["TripletConfig", "Triplets", "make_triplet_fn", "make_triplets"]
