"""How good is a flow-matching prior: FD-AlexNet of its samples and the velocity-norm table.

Two measurements (issue 12, "Sampling and quality"):

- **FD-AlexNet**: the Frechet distance between Gaussians fitted to features of
  two image sets, the features being the globally average-pooled activations of
  the ImageNet-trained AlexNet that LPIPS already loads offline
  (:mod:`jaxleak.metrics._lpips`). It is *FD-AlexNet, not comparable to
  Inception FID*: another network, another layer, another input size. Compare
  priors with it only against reference points measured the same way (real
  train vs real held-out images: the floor; samples of an untrained UNet: the
  ceiling), as ``experiments/flow_prior/quality.py`` does.
- **The denoising view** the attack relies on (NOTES.md section 4, assumption
  A2): ``||v(x, t)||^2`` should be small on clean images of the prior's domain
  and larger on noisy or unrealistic ones. :func:`velocity_table` measures it on
  named image sets, on the same images with Gaussian noise, and on uniform noise.

Feature extraction and the velocity field run jitted in fixed-size chunks (one
compiled program per chunk size, the last chunk padded); the Frechet distance
is host-side float64 NumPy.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxleak.metrics._lpips import _SCALE, _SHIFT, _AlexFeatures, load_lpips_params, min_side
from jaxleak.priors.flow import velocity_norm

LAYERS: tuple[str, ...] = ("relu1", "relu2", "relu3", "relu4", "relu5")
"""AlexNet taps :func:`alexnet_features` can pool (LPIPS's five; widths 64, 192, 384, 256, 256)."""

DEFAULT_LAYER = "relu5"
"""The last conv block: the most semantic of LPIPS's taps, 256 features."""

DEFAULT_MIN_SIDE = 64
"""Smaller images are upsampled to this side: at 32 px AlexNet's relu5 map is 1x1, at 64 px 3x3."""


# --------------------------------------------------------------------------- batching edge


def _chunked(
    fn: Callable[[Array], Array], images: np.ndarray, batch_size: int
) -> np.ndarray:
    """``fn`` over ``images`` in chunks of ``batch_size`` (last one padded: one compile)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = images.shape[0]
    size = min(batch_size, n)
    outputs = []
    for start in range(0, n, size):
        chunk = images[start : start + size]
        short = size - chunk.shape[0]
        if short:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)])
        outputs.append(np.asarray(fn(jnp.asarray(chunk)))[: size - short])
    return np.concatenate(outputs)


def _check_images(images: Any, what: str) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty batch [N, H, W, C], got {images.shape}")
    if not np.isfinite(images).all():
        raise ValueError(f"{what} must be finite")
    return images


# --------------------------------------------------------------------------- AlexNet features


@functools.partial(jax.jit, static_argnames=("tap", "side"))
def _pooled_features(params, images01, *, tap, side):
    n, _, _, channels = images01.shape
    x = images01
    if side is not None:
        x = jax.image.resize(x, (n, side, side, channels), method="bilinear", antialias=False)
    if channels == 1:  # the backbone is an RGB network; LPIPS repeats grayscale the same way
        x = jnp.repeat(x, 3, axis=-1)
    x = (2.0 * x - 1.0 - _SHIFT) / _SCALE  # LPIPS's input scaling (normalize=True)
    feats = _AlexFeatures().apply({"params": params}, x)[tap]
    return jnp.mean(feats, axis=(1, 2))


def alexnet_features(
    images01: Float[Any, "n h w c"],
    *,
    weights_dir: str | os.PathLike | None = None,
    layer: str = DEFAULT_LAYER,
    min_side_px: int = DEFAULT_MIN_SIDE,
    batch_size: int = 256,
) -> Float[np.ndarray, "n f"]:
    """Globally average-pooled activations of the LPIPS AlexNet, one row per image.

    The network and input scaling are LPIPS's (ImageNet-trained torchvision
    AlexNet, ``(2 x - 1 - shift) / scale``, grayscale repeated to RGB). Images
    with a side below ``min_side_px`` are bilinearly resized to
    ``min_side_px x min_side_px`` first (half-pixel centres, no antialiasing,
    as LPIPS's ``resize``); larger ones are used as they are.

    Args:
      images01: images ``[N, H, W, C]`` in [0, 1], C in {1, 3}.
      weights_dir: weights root (see :func:`jaxleak.metrics._lpips.load_lpips_params`);
        default ``$JAXLEAK_WEIGHTS_DIR`` or ``<repo>/../shared/weights``.
      layer: one of :data:`LAYERS` (default ``"relu5"``, the last conv block's
        ReLU, 256 features).
      min_side_px: upsampling target for small images (at least AlexNet's
        minimum of 31 px).
      batch_size: images per jitted chunk (memory bound, not a result change).

    Returns:
      float32 ``[N, F]`` features (``F`` = the layer's channels).

    Raises:
      ValueError: a bad layer, channel count, ``min_side_px`` or batch.
      FileNotFoundError: the LPIPS AlexNet weights are missing.

    >>> alexnet_features(np.full((3, 32, 32, 3), 0.5, np.float32)).shape  # doctest: +SKIP
    (3, 256)
    """
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    images = _check_images(images01, "images01")
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[-1]}")
    if min_side_px < min_side("alex"):
        raise ValueError(f"min_side_px must be >= {min_side('alex')} (AlexNet), got {min_side_px}")
    # images at or above the minimum (square or not) are used as they are
    side = int(min_side_px) if min(images.shape[1:3]) < min_side_px else None
    params = load_lpips_params("alex", weights_dir=weights_dir)["params"]["backbone"]
    tap = LAYERS.index(layer)
    return _chunked(
        lambda x: _pooled_features(params, x, tap=tap, side=side), images, batch_size
    ).astype(np.float32)


# --------------------------------------------------------------------------- Frechet distance


def _moments(feats: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"{what} must be [N >= 2, F] features, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError(f"{what} must be finite")
    return feats.mean(axis=0), np.cov(feats, rowvar=False, ddof=1).reshape(
        feats.shape[1], feats.shape[1]
    )


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(
    feats_a: Float[Any, "n f"], feats_b: Float[Any, "m f"]
) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (host side, float64).

    ``||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` with sample means
    and unbiased covariances. The trace of the matrix square root is computed
    as ``tr((C_a^(1/2) C_b C_a^(1/2))^(1/2))`` (same eigenvalues, but a
    symmetric PSD matrix, so two ``eigh`` and no complex round-off as with a
    general ``sqrtm``). Symmetric in its arguments and 0 for identical sets.

    Args:
      feats_a: ``[N, F]`` features, N >= 2.
      feats_b: ``[M, F]`` features, M >= 2.

    Returns:
      The distance (>= 0, up to round-off clipped at 0).

    Raises:
      ValueError: non-2-D, fewer than 2 rows, different F, or non-finite values.

    >>> a = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    >>> round(frechet_distance(a, a + 1.0), 6)  # same covariance: ||shift||^2
    2.0
    """
    mu_a, cov_a = _moments(feats_a, "feats_a")
    mu_b, cov_b = _moments(feats_b, "feats_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature widths differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)))
    distance = np.sum(np.square(mu_a - mu_b)) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross
    return float(max(distance, 0.0))


def fd_alexnet(
    images_a: Float[Any, "n h w c"],
    images_b: Float[Any, "m h w c"],
    *,
    weights_dir: str | os.PathLike | None = None,
    layer: str = DEFAULT_LAYER,
    min_side_px: int = DEFAULT_MIN_SIDE,
    batch_size: int = 256,
) -> float:
    """FD-AlexNet, not comparable to Inception FID: the Frechet distance of two image sets.

    :func:`frechet_distance` of :func:`alexnet_features` (pooled ``layer``
    activations of the LPIPS AlexNet, images below ``min_side_px`` upsampled).
    Only numbers measured with the same layer, size and image counts compare;
    the estimate is biased upwards for small sets (use the same N for the
    reference points).

    Args:
      images_a: images ``[N, H, W, C]`` in [0, 1].
      images_b: images ``[M, H', W', C']`` in [0, 1].
      weights_dir: weights root (see :func:`alexnet_features`).
      layer: AlexNet tap (default ``"relu5"``).
      min_side_px: upsampling target for small images.
      batch_size: images per jitted chunk.

    Returns:
      The distance.

    >>> rng = np.random.default_rng(0)
    >>> x = rng.random((8, 32, 32, 3), dtype=np.float32)
    >>> fd_alexnet(x, x) < 1e-6  # doctest: +SKIP
    True
    """
    options = {"weights_dir": weights_dir, "layer": layer, "min_side_px": min_side_px,
               "batch_size": batch_size}
    return frechet_distance(alexnet_features(images_a, **options),
                            alexnet_features(images_b, **options))


# --------------------------------------------------------------------------- velocity table


def _mean_velocity_norm(prior: Any, images01: np.ndarray, t: float, batch_size: int) -> np.ndarray:
    def fn(x):
        return velocity_norm(prior.params, prior.config, x, t)

    return _chunked(fn, images01, batch_size)


def velocity_table(
    prior: Any,
    images_by_name: Mapping[str, Float[Any, "n h w c"]],
    ts: Sequence[float] = (0.5, 0.8, 0.95),
    noise_stds: Sequence[float] = (0.05, 0.1, 0.2),
    seed: int = 0,
    *,
    batch_size: int = 128,
) -> list[dict[str, Any]]:
    """Mean ``||v(x, t)||^2`` (per pixel) on clean, noisy and noise images: assumption A2 tested.

    For every named set, rows for the images as given (``perturbation`` =
    ``"none"``) and for the same images plus Gaussian noise of each std in
    ``noise_stds`` (clipped to [0, 1]; ``"gaussian"``), each at every ``t``; then
    rows for uniform noise in [0, 1] (``images`` = ``"uniform noise"``, as many
    as the largest set). A prior that serves the attack has small values on
    clean images of its domain and larger ones down the noise rows.

    Args:
      prior: a :class:`jaxleak.priors.Prior` (its ``params`` and ``config``).
      images_by_name: image sets ``[N, H, W, C]`` in [0, 1] of the prior's shape.
      ts: times at which ``v`` is evaluated (``t = 1`` is clean data).
      noise_stds: Gaussian noise levels (in [0, 1] pixel units).
      seed: seeds the noise (the same draw for every ``t``).
      batch_size: images per jitted chunk.

    Returns:
      One dict per row: ``images`` (set name), ``perturbation``
      (``"none"`` / ``"gaussian"`` / ``"uniform"``), ``noise_std`` (float or
      ``None``), ``t``, ``n``, ``mean`` and ``sem`` (standard error of the mean
      over images) of the per-image ``||v||^2 / D``.

    Raises:
      ValueError: no sets, a set of another shape than the prior's, or
        images outside [0, 1].

    >>> from jaxleak.priors import Prior, UNetConfig, init_params
    >>> cfg = UNetConfig(image_size=16, base_width=8, channel_mult=(1,), num_res_blocks=1,
    ...                  attention_resolutions=(), groups=4)
    >>> prior = Prior(None, init_params(cfg, jax.random.key(0)), cfg, {})
    >>> rows = velocity_table(prior, {"grey": np.full((2, 16, 16, 3), 0.5)}, ts=(0.9,),
    ...                       noise_stds=(0.1,), batch_size=2)
    >>> [(r["images"], r["perturbation"]) for r in rows]
    [('grey', 'none'), ('grey', 'gaussian'), ('uniform noise', 'uniform')]
    """
    if not images_by_name:
        raise ValueError("images_by_name must name at least one image set")
    shape = tuple(prior.config.image_shape)
    sets = {}
    for name, images in images_by_name.items():
        images = _check_images(images, f"images_by_name[{name!r}]")
        if tuple(images.shape[1:]) != shape:
            raise ValueError(
                f"images_by_name[{name!r}] must be [N, {', '.join(map(str, shape))}] for this "
                f"prior, got {images.shape}"
            )
        if images.min() < 0.0 or images.max() > 1.0:
            raise ValueError(f"images_by_name[{name!r}] must be in [0, 1]")
        sets[name] = images
    if any(not 0.0 <= float(t) <= 1.0 for t in ts) or any(s < 0 for s in noise_stds):
        raise ValueError("ts must be in [0, 1] and noise_stds >= 0")

    rng = np.random.default_rng(seed)
    variants = []  # (name, perturbation, std, images)
    for name, images in sets.items():
        variants.append((name, "none", None, images))
        for std in noise_stds:
            noise = rng.normal(0.0, float(std), images.shape).astype(np.float32)
            variants.append((name, "gaussian", float(std), np.clip(images + noise, 0.0, 1.0)))
    largest = max(images.shape[0] for images in sets.values())
    uniform = rng.random((largest, *shape), dtype=np.float32)
    variants.append(("uniform noise", "uniform", None, uniform))

    rows = []
    for name, perturbation, std, images in variants:
        for t in ts:
            norms = _mean_velocity_norm(prior, images, float(t), batch_size).astype(np.float64)
            sem = float(norms.std(ddof=1) / np.sqrt(norms.size)) if norms.size > 1 else 0.0
            rows.append({"images": name, "perturbation": perturbation, "noise_std": std,
                         "t": float(t), "n": int(norms.size), "mean": float(norms.mean()),
                         "sem": sem})
    return rows


def format_velocity_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`velocity_table` rows as a Markdown table, one row per image variant, one column per t.

    >>> print(format_velocity_table([{"images": "a", "perturbation": "none", "noise_std": None,
    ...                               "t": 0.5, "n": 2, "mean": 0.25, "sem": 0.01}]))
    | images | noise | n | t=0.5 |
    |---|---|---|---|
    | a | none | 2 | 0.25 |
    """
    ts = sorted({row["t"] for row in rows})
    keyed: dict[tuple, dict[float, Mapping[str, Any]]] = {}
    for row in rows:
        keyed.setdefault((row["images"], row["perturbation"], row["noise_std"]), {})[row["t"]] = row
    lines = ["| images | noise | n | " + " | ".join(f"t={t:g}" for t in ts) + " |",
             "|" + "---|" * (3 + len(ts))]
    for (name, perturbation, std), by_t in keyed.items():
        noise = f"gaussian {std:g}" if perturbation == "gaussian" else perturbation
        n = next(iter(by_t.values()))["n"]
        cells = [f"{by_t[t]['mean']:.4g}" if t in by_t else "" for t in ts]
        lines.append(f"| {name} | {noise} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_LAYER",
    "DEFAULT_MIN_SIDE",
    "LAYERS",
    "alexnet_features",
    "fd_alexnet",
    "format_velocity_table",
    "frechet_distance",
    "velocity_table",
]
