"""Full-reference image-quality metrics: MSE, PSNR, SSIM and ASR.

Each kernel is written for one image pair ``[H, W, C]``; the public functions
validate a batch ``[N, H, W, C]`` once on the host and call a jitted ``vmap``.

SSIM follows Wang et al. (2004) with the conventions of
``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, channel_axis=-1)``:

* an 11-tap Gaussian window (sigma 1.5, truncated at 3.5 sigma, i.e. radius
  ``int(3.5 * 1.5 + 0.5) = 5``), applied separably over H and W and never
  across channels;
* ``scipy.ndimage`` ``'reflect'`` boundaries (``d c b a | a b c d | d c b a``,
  which is ``jnp.pad(..., mode="symmetric")``);
* ``C1 = (0.01 * data_range)**2``, ``C2 = (0.03 * data_range)**2``;
* population (not sample) local covariances;
* the SSIM map is cropped by the window radius on every side before the
  mean, and the per-channel means are averaged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # jaxtyping is a test-time dependency only
    from jax import Array
    from jaxtyping import ArrayLike, Float

_SIGMA = 1.5
_TRUNCATE = 3.5
_K1 = 0.01
_K2 = 0.03
# Same rounding as scipy.ndimage.gaussian_filter, so the tap count matches skimage.
_RADIUS = int(_TRUNCATE * _SIGMA + 0.5)
WIN_SIZE = 2 * _RADIUS + 1
"""Side of the SSIM Gaussian window (11); images must be at least this large."""


def _gaussian_taps() -> np.ndarray:
    offsets = np.arange(-_RADIUS, _RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / _SIGMA) ** 2)
    return (taps / taps.sum()).astype(np.float32)


_TAPS = _gaussian_taps()


# ----------------------------------------------------------------------------
# Per-image kernels.
# ----------------------------------------------------------------------------


def _mse_one(x: Float[Array, "h w c"], y: Float[Array, "h w c"]) -> Float[Array, ""]:
    return jnp.mean(jnp.square(x - y))


def _psnr_one(
    x: Float[Array, "h w c"], y: Float[Array, "h w c"], data_range: Float[Array, ""]
) -> Float[Array, ""]:
    # mse == 0 divides to +inf and log10(inf) == inf: identical images score +inf.
    return 10.0 * jnp.log10(jnp.square(data_range) / _mse_one(x, y))


def _blur_axis(image: Float[Array, "h w c"], axis: int) -> Float[Array, "h w c"]:
    n = image.shape[axis]
    pad = [(0, 0)] * image.ndim
    pad[axis] = (_RADIUS, _RADIUS)
    padded = jnp.pad(image, pad, mode="symmetric")
    out = jnp.zeros_like(image)
    for k, tap in enumerate(_TAPS):
        out = out + tap * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
    return out


def _blur(image: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
    return _blur_axis(_blur_axis(image, 0), 1)


def _ssim_map_one(
    x: Float[Array, "h w c"], y: Float[Array, "h w c"], data_range: Float[Array, ""]
) -> Float[Array, "h w c"]:
    """Uncropped local SSIM map of one image pair (same size as the inputs)."""
    c1 = jnp.square(_K1 * data_range)
    c2 = jnp.square(_K2 * data_range)
    mu_x = _blur(x)
    mu_y = _blur(y)
    var_x = _blur(x * x) - mu_x * mu_x
    var_y = _blur(y * y) - mu_y * mu_y
    cov_xy = _blur(x * y) - mu_x * mu_y
    numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return numerator / denominator


def _ssim_one(
    x: Float[Array, "h w c"], y: Float[Array, "h w c"], data_range: Float[Array, ""]
) -> Float[Array, ""]:
    # Border pixels see padded (reflected) data; dropping them as skimage does
    # makes the score independent of the boundary rule.
    full = _ssim_map_one(x, y, data_range)
    inner = full[_RADIUS : full.shape[0] - _RADIUS, _RADIUS : full.shape[1] - _RADIUS]
    return jnp.mean(jnp.mean(inner, axis=(0, 1)))


_mse_batch = jax.jit(jax.vmap(_mse_one))
_psnr_batch = jax.jit(jax.vmap(_psnr_one, in_axes=(0, 0, None)))
_ssim_batch = jax.jit(jax.vmap(_ssim_one, in_axes=(0, 0, None)))
_ssim_map_batch = jax.jit(jax.vmap(_ssim_map_one, in_axes=(0, 0, None)))


# ----------------------------------------------------------------------------
# Validation at the API boundary.
# ----------------------------------------------------------------------------


def _as_image_batch(name: str, value: ArrayLike) -> Float[Array, "n h w c"]:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        value = np.asarray(value)
        dtype = value.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name} must hold floating-point images in [0, 1], got dtype {dtype} "
            "(convert integer images with x / 255 first)."
        )
    if jnp.ndim(value) != 4:
        raise ValueError(
            f"{name} must be a batch of images [N, H, W, C], got shape {jnp.shape(value)}."
        )
    return jnp.asarray(value, dtype=jnp.float32)


def _check_pair(
    x: ArrayLike, y: ArrayLike
) -> tuple[Float[Array, "n h w c"], Float[Array, "n h w c"]]:
    x = _as_image_batch("x", x)
    y = _as_image_batch("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}.")
    return x, y


def _check_data_range(data_range: float) -> Float[Array, ""]:
    value = float(data_range)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}.")
    return jnp.asarray(value, dtype=jnp.float32)


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def mse(x: Float[ArrayLike, "n h w c"], y: Float[ArrayLike, "n h w c"]) -> Float[Array, " n"]:
    """Per-image mean squared error.

    Args:
        x: Batch of images ``[N, H, W, C]``, floats (nominally in [0, 1]).
        y: Batch of images with the same shape as ``x``.

    Returns:
        ``[N]`` float32, the mean of ``(x - y)**2`` over H, W and C.

    Raises:
        ValueError: If an input is not a 4-D floating array or the shapes differ.

    >>> import numpy as np
    >>> x = np.zeros((2, 4, 4, 1), np.float32)
    >>> y = np.full((2, 4, 4, 1), 0.5, np.float32)
    >>> mse(x, y).tolist()
    [0.25, 0.25]
    """
    x, y = _check_pair(x, y)
    return _mse_batch(x, y)


def psnr(
    x: Float[ArrayLike, "n h w c"], y: Float[ArrayLike, "n h w c"], data_range: float = 1.0
) -> Float[Array, " n"]:
    """Per-image peak signal-to-noise ratio in dB, ``10 log10(data_range**2 / mse)``.

    Symmetric in ``x`` and ``y``. Identical images have zero error and give
    ``+inf``; summaries should count those rather than average them
    (see :func:`jaxleak.report.summarize`).

    Args:
        x: Batch of images ``[N, H, W, C]``, floats in [0, data_range].
        y: Batch of images with the same shape as ``x``.
        data_range: Difference between the largest and smallest possible pixel value.

    Returns:
        ``[N]`` float32 PSNR values; ``inf`` where ``x[i] == y[i]`` exactly.

    Raises:
        ValueError: If an input is not a 4-D floating array, the shapes differ,
            or ``data_range`` is not positive.

    >>> import numpy as np
    >>> x = np.zeros((1, 4, 4, 3), np.float32)
    >>> psnr(x, x + 0.1).round(2).tolist()
    [20.0]
    >>> psnr(x, x).tolist()
    [inf]
    """
    x, y = _check_pair(x, y)
    return _psnr_batch(x, y, _check_data_range(data_range))


def ssim(
    x: Float[ArrayLike, "n h w c"], y: Float[ArrayLike, "n h w c"], data_range: float = 1.0
) -> Float[Array, " n"]:
    """Per-image structural similarity (Gaussian-window SSIM of Wang et al., 2004).

    Matches ``skimage.metrics.structural_similarity(x[i], y[i], channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=data_range)``: 11x11 Gaussian window with sigma 1.5, reflect
    boundaries, K1 = 0.01, K2 = 0.03, a 5-pixel border dropped before averaging,
    channels averaged with equal weight.

    Args:
        x: Batch of images ``[N, H, W, C]``, floats in [0, data_range],
            with ``H, W >= 11``.
        y: Batch of images with the same shape as ``x``.
        data_range: Difference between the largest and smallest possible pixel value.

    Returns:
        ``[N]`` float32 SSIM values in [-1, 1]; 1 for identical images.

    Raises:
        ValueError: If an input is not a 4-D floating array, the shapes differ,
            an image side is smaller than the 11-pixel window, or
            ``data_range`` is not positive.

    >>> import numpy as np
    >>> x = np.linspace(0, 1, 2 * 16 * 16 * 3, dtype=np.float32).reshape(2, 16, 16, 3)
    >>> ssim(x, x).round(4).tolist()
    [1.0, 1.0]
    """
    x, y = _check_pair(x, y)
    _, height, width, _ = x.shape
    if height < WIN_SIZE or width < WIN_SIZE:
        raise ValueError(
            f"SSIM uses an {WIN_SIZE}x{WIN_SIZE} Gaussian window, so images must be at "
            f"least {WIN_SIZE}x{WIN_SIZE}; got {height}x{width}. Upsample the images or "
            "use psnr/mse instead."
        )
    return _ssim_batch(x, y, _check_data_range(data_range))


def asr(ssim_values: Float[ArrayLike, " n"], tau: float = 0.5) -> Float[Array, ""]:
    """Attack success rate ASR@tau: share of images whose SSIM exceeds ``tau``.

    The comparison is strict (``ssim > tau``); NaN scores count as failures.

    Args:
        ssim_values: ``[N]`` per-image SSIM scores, N >= 1.
        tau: Success threshold.

    Returns:
        Scalar float32 in [0, 1].

    Raises:
        ValueError: If ``ssim_values`` is not a non-empty 1-D array.

    >>> float(asr([0.2, 0.5, 0.51, 0.9]))
    0.5
    """
    values = jnp.asarray(ssim_values, dtype=jnp.float32)
    if values.ndim != 1 or values.shape[0] == 0:
        raise ValueError(f"ssim_values must be a non-empty [N] array, got shape {values.shape}.")
    return jnp.mean((values > tau).astype(jnp.float32))
