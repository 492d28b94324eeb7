"""2-D discrete wavelet transform in JAX, coefficient-for-coefficient equal to PyWavelets.

Only PyWavelets' default boundary mode ``"symmetric"`` (half-sample symmetric
extension, ``... x1 x0 | x0 x1 ... x_{n-1} | x_{n-1} x_{n-2} ...``) is provided.
The filter taps come from ``pywt.Wavelet``; everything else is ``jnp``, so the
transforms jit and vmap. Shapes are static: every boundary extension is a fixed
gather index computed with NumPy at trace time, followed by a small contraction
with the filter taps, i.e. a strided convolution written as gather + einsum.

The transforms act on the last two axes; leading axes are carried along, so a
``(channels, h, w)`` stack needs no explicit ``vmap`` (one still works).

Conventions, as in ``pywt.wavedec2`` / ``pywt.waverec2``:

* one analysis level maps a length ``n`` axis to ``(n + L - 1) // 2``
  coefficients, ``L`` the filter length;
* the detail tuple is ``(cH, cV, cD)``: ``cH`` is high-pass along axis ``-2`` and
  low-pass along axis ``-1``, ``cV`` the reverse, ``cD`` high-pass along both;
* synthesis of ``m`` coefficients yields ``2 * m - L + 2`` samples, so
  ``waverec2(wavedec2(x))`` can be one sample larger than ``x`` along odd axes;
  the caller crops (``waverec2`` crops intermediate approximations itself).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pywt
from jaxtyping import Array, Float

MODES = ("symmetric",)

Coeffs2D = list  # [cA_n, (cH_n, cV_n, cD_n), ..., (cH_1, cV_1, cD_1)]

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.cache
def _filters(wavelet: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dec_lo, dec_hi, rec_lo, rec_hi) of a named PyWavelets wavelet, float64."""
    try:
        w = pywt.Wavelet(wavelet)
    except ValueError as err:
        raise ValueError(f"unknown wavelet {wavelet!r}: {err}") from None
    taps = tuple(np.asarray(f, dtype=np.float64) for f in (w.dec_lo, w.dec_hi, w.rec_lo, w.rec_hi))
    length = len(taps[0])
    if length < 2 or length % 2 or any(len(t) != length for t in taps):
        raise ValueError(f"wavelet {wavelet!r} needs four filters of one even length >= 2")
    return taps


def filter_length(wavelet: str) -> int:
    """Length of the decomposition filters of ``wavelet`` (8 for ``db4``, 2 for ``haar``)."""
    return len(_filters(wavelet)[0])


def max_level(h: int, w: int, wavelet: str = "db4") -> int:
    """Deepest useful decomposition level, as ``pywt.dwt_max_level(min(h, w), filter_len)``.

    Args:
      h: height of the 2-D signal.
      w: width of the 2-D signal.
      wavelet: PyWavelets wavelet name.

    Returns:
      The level; 0 when the signal is shorter than ``filter_len - 1`` along an axis
      (every coefficient would be a boundary artefact).

    >>> max_level(64, 64, "db4"), max_level(8, 8, "db4")
    (3, 0)
    """
    if h < 1 or w < 1:
        raise ValueError(f"signal sides must be >= 1, got {(h, w)}")
    return int(pywt.dwt_max_level(min(h, w), filter_length(wavelet)))


def _symmetric_index(pos: np.ndarray, n: int) -> np.ndarray:
    # Half-sample symmetric extension is periodic with period 2n (a mirrored copy
    # follows each copy), which also covers filters longer than the signal.
    m = np.mod(pos, 2 * n)
    return np.where(m >= n, 2 * n - 1 - m, m)


@functools.cache
def _analysis_index(n: int, length: int) -> np.ndarray:
    """Gather index (out, length) into the raw signal for one analysis level.

    PyWavelets computes ``out[o] = sum_k f[k] * ext[2 o + 1 - k]``; with the
    reversed filter that is a stride-2 correlation over ``ext[2 o + 2 - L + k]``.
    """
    out = (n + length - 1) // 2
    pos = 2 * np.arange(out)[:, None] + 2 - length + np.arange(length)[None, :]
    return _symmetric_index(pos, n).astype(np.int32)


@functools.cache
def _synthesis_index(m: int, length: int) -> np.ndarray:
    """Gather index (m - L/2 + 1, L/2) into the coefficients for one synthesis level.

    PyWavelets keeps only the fully overlapping part of the upsampled convolution:
    ``out[2 t + p] = sum_j f[2 j + p] * c[t + L/2 - 1 - j]`` for phase ``p`` in {0, 1}.
    """
    half = length // 2
    t = np.arange(m - half + 1)[:, None]
    return (t + half - 1 - np.arange(half)[None, :]).astype(np.int32)


def _dwt_last_axis(x: Array, dec: np.ndarray) -> tuple[Array, Array]:
    """One analysis level along the last axis; ``dec`` is (2, L): low- and high-pass."""
    length = dec.shape[1]
    windows = x[..., _analysis_index(x.shape[-1], length)]  # (..., out, L)
    taps = jnp.asarray(dec[:, ::-1].T, dtype=x.dtype)  # (L, 2), reversed for correlation
    both = jnp.einsum("...ol,lb->...bo", windows, taps, precision=_HIGHEST)
    return both[..., 0, :], both[..., 1, :]


def _idwt_last_axis(a: Array, d: Array, rec: np.ndarray) -> Array:
    """One synthesis level along the last axis; ``rec`` is (2, L): low- and high-pass."""
    length = rec.shape[1]
    m = a.shape[-1]
    if m < length // 2:
        raise ValueError(f"{m} coefficients are too few for a filter of length {length}")
    idx = _synthesis_index(m, length)
    # taps[band, j, phase] = rec[band, 2 j + phase]
    taps = jnp.asarray(rec.reshape(2, length // 2, 2), dtype=a.dtype)
    stacked = jnp.stack([a[..., idx], d[..., idx]], axis=-3)  # (..., 2, out, L/2)
    phases = jnp.einsum("...bos,bsp->...op", stacked, taps, precision=_HIGHEST)
    return phases.reshape(*phases.shape[:-2], -1)  # interleave even/odd samples


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def dwt2(
    x: Float[Array, "*batch h w"], wavelet: str = "db4", mode: str = "symmetric"
) -> tuple[Float[Array, "*batch h2 w2"], tuple[Array, Array, Array]]:
    """Single-level 2-D DWT over the last two axes, equal to ``pywt.dwt2``.

    Args:
      x: signal, at least 2-D; floating dtype is kept.
      wavelet: PyWavelets wavelet name.
      mode: boundary extension; only ``"symmetric"``.

    Returns:
      ``(cA, (cH, cV, cD))``, each ``(*batch, (h + L - 1) // 2, (w + L - 1) // 2)``.

    Raises:
      ValueError: for an unknown wavelet or mode, or ``x`` with fewer than 2 axes.
    """
    _check_mode(mode)
    x = _as_float(x)
    dec_lo, dec_hi, _, _ = _filters(wavelet)
    dec = np.stack([dec_lo, dec_hi])
    lo, hi = _dwt_last_axis(jnp.swapaxes(x, -1, -2), dec)
    lo, hi = jnp.swapaxes(lo, -1, -2), jnp.swapaxes(hi, -1, -2)
    ca, cv = _dwt_last_axis(lo, dec)
    ch, cd = _dwt_last_axis(hi, dec)
    return ca, (ch, cv, cd)


def idwt2(
    coeffs: tuple[Array, tuple[Array, Array, Array]], wavelet: str = "db4", mode: str = "symmetric"
) -> Float[Array, "*batch h w"]:
    """Single-level inverse 2-D DWT, equal to ``pywt.idwt2`` (no ``None`` bands).

    Args:
      coeffs: ``(cA, (cH, cV, cD))`` of one shape ``(*batch, m, n)``.
      wavelet: PyWavelets wavelet name.
      mode: boundary extension; only ``"symmetric"``.

    Returns:
      The signal, ``(*batch, 2 m - L + 2, 2 n - L + 2)``.

    Raises:
      ValueError: for an unknown wavelet or mode or bands of different shapes.
    """
    _check_mode(mode)
    ca, (ch, cv, cd) = coeffs
    shapes = {jnp.shape(c) for c in (ca, ch, cv, cd)}
    if len(shapes) != 1:
        raise ValueError(f"all four bands must have one shape, got {sorted(shapes)}")
    _, _, rec_lo, rec_hi = _filters(wavelet)
    rec = np.stack([rec_lo, rec_hi])
    ca, ch, cv, cd = (_as_float(c) for c in (ca, ch, cv, cd))
    lo = _idwt_last_axis(ca, cv, rec)  # low-pass along axis -2
    hi = _idwt_last_axis(ch, cd, rec)  # high-pass along axis -2
    lo, hi = jnp.swapaxes(lo, -1, -2), jnp.swapaxes(hi, -1, -2)
    return jnp.swapaxes(_idwt_last_axis(lo, hi, rec), -1, -2)


def wavedec2(
    x: Float[Array, "*batch h w"],
    wavelet: str = "db4",
    level: int | None = None,
    mode: str = "symmetric",
) -> Coeffs2D:
    """Multilevel 2-D DWT over the last two axes, equal to ``pywt.wavedec2``.

    Args:
      x: signal, at least 2-D.
      wavelet: PyWavelets wavelet name.
      level: number of levels (static); ``None`` means :func:`max_level`. Levels
        above :func:`max_level` are computed as PyWavelets does (boundary effects
        everywhere) without its warning.
      mode: boundary extension; only ``"symmetric"``.

    Returns:
      ``[cA_n, (cH_n, cV_n, cD_n), ..., (cH_1, cV_1, cD_1)]``, coarsest first.

    Raises:
      ValueError: for an unknown wavelet or mode, a negative level or ``x`` below 2-D.

    >>> x = jnp.arange(64.0).reshape(8, 8)
    >>> ca, (ch, cv, cd), level1 = wavedec2(x, "haar", level=2)
    >>> ca.shape, cd.shape, level1[2].shape
    ((2, 2), (2, 2), (4, 4))
    """
    _check_mode(mode)
    x = _as_float(x)
    if level is None:
        level = max_level(x.shape[-2], x.shape[-1], wavelet)
    if not isinstance(level, (int, np.integer)) or level < 0:
        raise ValueError(f"level must be a non-negative int, got {level!r}")
    details = []
    approx = x
    for _ in range(int(level)):
        approx, bands = dwt2(approx, wavelet, mode)
        details.append(bands)
    return [approx, *details[::-1]]


def waverec2(
    coeffs: Coeffs2D, wavelet: str = "db4", mode: str = "symmetric"
) -> Float[Array, "*batch h w"]:
    """Multilevel inverse 2-D DWT, equal to ``pywt.waverec2``.

    Each intermediate approximation is cropped to the shape of the next detail
    bands (it is one larger after an odd-sized level), as PyWavelets does. The
    result itself is not cropped: it can be one larger than the original signal
    along odd axes, so crop with ``[..., :h, :w]``.

    Args:
      coeffs: list as returned by :func:`wavedec2`.
      wavelet: PyWavelets wavelet name.
      mode: boundary extension; only ``"symmetric"``.

    Returns:
      The reconstructed signal.

    Raises:
      ValueError: for an empty or malformed coefficient list, unknown wavelet or mode.
    """
    _check_mode(mode)
    if not isinstance(coeffs, (list, tuple)) or len(coeffs) < 1:
        raise ValueError("coeffs must be a non-empty list [cA_n, (cH_n, cV_n, cD_n), ...]")
    approx = _as_float(coeffs[0])
    for bands in coeffs[1:]:
        if not isinstance(bands, (list, tuple)) or len(bands) != 3:
            raise ValueError("each detail entry must be a (cH, cV, cD) tuple")
        rows, cols = jnp.shape(bands[0])[-2:]
        if approx.shape[-2] < rows or approx.shape[-1] < cols:
            raise ValueError(
                f"approximation {approx.shape} is smaller than detail {jnp.shape(bands[0])}"
            )
        approx = idwt2((approx[..., :rows, :cols], tuple(bands)), wavelet, mode)
    return approx


def _as_float(x) -> Array:
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"expected an array with at least 2 axes, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x
