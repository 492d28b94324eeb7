"""Venom's Structural Prior Extraction (SPE): features from a protected FC-head gradient.

For a dense head ``z = W x + b`` (``W`` is ``classes x dim``) and one example,
``gW_j = delta_j * x`` and ``gb_j = delta_j`` (Venom eq. 2), so every class row
divided by its bias gradient gives the head's input ``x``. Under DP noise SPE

1. scores classes by energy ``E_j = ||gW_j||_2 * |gb_j|`` (eq. 3);
2. keeps ``S = {j : E_j > mean(E) + gamma * std(E)}`` with
   ``gamma = min(2, sqrt(ln K))`` (eq. 4), ``std`` the population standard
   deviation (``ddof=0``); an empty ``S`` falls back to ``{argmax E}``
   (Algorithm 1, line 8);
3. fuses ``x = sum_{j in S} w_j gW_j / (gb_j + lambda sigma^2)`` with
   ``w_j = E_j / sum_S E`` and ``lambda = sigma^2 / max_{j in S} gb_j^2`` (eq. 5);
4. refines ``x``, reshaped to the head's input feature map ``(H, W, C)``, per
   channel by wavelet soft-thresholding (``WaveletRefine``); the result ``c`` is
   the structural prior;
5. measures the residual noise ``T = gamma_T log(1 + ||x - c||^2 / ||c||^2)`` (eq. 7).

``sigma^2`` is the noise variance of the mechanism. It can be passed in (as
Venom's public code does) or estimated from the gradient itself with
:func:`estimate_noise_variance` (the paper's "no knowledge of the noise");
:class:`SPEResult` records which one a run used.

Everything below is written for one capture; :func:`spe_batch` is the single
place where captures are batched (one jitted ``vmap``).

>>> import numpy as np
>>> x = np.linspace(0.0, 1.0, 8 * 8 * 2, dtype=np.float32)
>>> delta = np.array([0.2, -0.5, 0.3], dtype=np.float32)
>>> out = spe(np.outer(delta, x), delta, feature_shape=(8, 8, 2), sigma2=0.0)
>>> bool(np.allclose(out.features_raw, x, atol=1e-6))
True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxleak._batching import map_chunked
from jaxleak.attacks.wavelet import max_level, wavedec2, waverec2

# Median absolute deviation of a standard normal: sigma = MAD / 0.6745.
MAD_TO_SIGMA = 0.6745

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class SPEConfig:
    """Settings of SPE (defaults are those of Venom's public code).

    Attributes:
      wavelet: PyWavelets wavelet of ``WaveletRefine``.
      levels: decomposition levels of ``WaveletRefine``.
      clamp_levels: ``False`` (default, as the public code's
        ``pywt.wavedec2(x, "db4", level=2)``): always ``levels`` levels, also on
        maps smaller than the filter (e.g. the 7x7 and 8x8 head maps of
        ``lenet-venom`` at 28 and 32 px), where PyWavelets warns that boundary
        effects reach every coefficient and computes them anyway. ``True``:
        ``min(levels, max_level(H, W, wavelet))`` and no refinement (``T = 0``)
        when that is 0.
      gamma_t: ``gamma_T`` of the noise strength (eq. 7).
      refine: return the refined map ``c`` as features (``True``) or the raw fused
        map ``x`` (``False``). The noise strength uses ``c`` either way.
      noise_rank: rank ``r`` of the noise-free head gradient assumed by the sigma^2
        estimator (1 for one example per capture, at most the batch size).
    """

    wavelet: str = "db4"
    levels: int = 2
    clamp_levels: bool = False
    gamma_t: float = 2.0
    refine: bool = True
    noise_rank: int = 1

    def __post_init__(self):
        try:
            max_level(1, 1, self.wavelet)
        except ValueError as err:
            raise ValueError(f"SPEConfig.wavelet: {err}") from None
        if not isinstance(self.levels, int) or self.levels < 1:
            raise ValueError(f"levels must be an int >= 1, got {self.levels!r}")
        if not (math.isfinite(self.gamma_t) and self.gamma_t >= 0):
            raise ValueError(f"gamma_t must be finite and >= 0, got {self.gamma_t}")
        if not isinstance(self.refine, bool):
            raise TypeError(f"refine must be a bool, got {self.refine!r}")
        if not isinstance(self.clamp_levels, bool):
            raise TypeError(f"clamp_levels must be a bool, got {self.clamp_levels!r}")
        if not isinstance(self.noise_rank, int) or self.noise_rank < 1:
            raise ValueError(f"noise_rank must be an int >= 1, got {self.noise_rank!r}")


class SPEResult(NamedTuple):
    """What SPE extracts from one capture (every field gains a leading ``N`` when batched).

    Attributes:
      features_raw: fused feature vector ``x`` of eq. 5, ``[dim]``, in the flat
        order of the gradient (NHWC, channel fastest).
      features: ``[H, W, C]``: the structural prior ``c`` when ``config.refine``
        and refinement is possible, else ``x`` reshaped.
      noise_strength: ``T`` of eq. 7, ``[]`` (0 when refinement is skipped, since
        then ``c = x``; ``+inf`` if ``c = 0`` while ``x != 0``).
      selected: class mask ``S``, ``[K]`` bool.
      sigma2: noise variance used in eq. 5, ``[]``.
      sigma2_estimated: ``[]`` bool, True when ``sigma2`` came from
        :func:`estimate_noise_variance` rather than the caller.
      fallback: ``[]`` bool, True when eq. 4 selected nothing and ``S = {argmax E}``
        (Algorithm 1 line 8, where the paper also sets ``T = T_max``; that choice is
        left to the caller).
      refined: ``[]`` bool, False when no wavelet level was applied (a map too
        small for one level under ``clamp_levels``)
        and ``c = x``.
    """

    features_raw: Float[Array, "*n dim"]
    features: Float[Array, "*n h w c"]
    noise_strength: Float[Array, "*n"]
    selected: Bool[Array, "*n classes"]
    sigma2: Float[Array, "*n"]
    sigma2_estimated: Bool[Array, "*n"]
    fallback: Bool[Array, "*n"]
    refined: Bool[Array, "*n"]


# ---------------------------------------------------------------- eqs. 3-5


def selection_gamma(num_classes: int) -> float:
    """``gamma = min(2, sqrt(ln K))`` of eq. 4.

    >>> selection_gamma(10), selection_gamma(1000)
    (1.5174271293851465, 2.0)
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return min(2.0, math.sqrt(math.log(num_classes)))


def class_energy(
    fc_weight_grad: Float[Array, "classes dim"], fc_bias_grad: Float[Array, " classes"]
) -> Float[Array, " classes"]:
    """Energy ``E_j = ||gW_j||_2 * |gb_j|`` of every class (eq. 3)."""
    return jnp.linalg.norm(fc_weight_grad, axis=-1) * jnp.abs(fc_bias_grad)


def select_classes(
    energy: Float[Array, " classes"],
) -> tuple[Bool[Array, " classes"], Bool[Array, ""]]:
    """Reliable classes ``S = {j : E_j > mean(E) + gamma std(E)}`` (eq. 4).

    ``std`` is the population standard deviation (``ddof=0``). When no class
    passes, ``S = {argmax E}`` (first maximiser on ties).

    Args:
      energy: ``E`` of every class.

    Returns:
      ``(mask, fallback)``: the class mask and whether the argmax fallback was used.
    """
    gamma = selection_gamma(energy.shape[-1])
    mask = energy > jnp.mean(energy) + gamma * jnp.std(energy)
    fallback = ~jnp.any(mask)
    best = jax.nn.one_hot(jnp.argmax(energy), energy.shape[-1], dtype=jnp.bool_)
    return jnp.where(fallback, best, mask), fallback


def _safe_divide(num: Array, den: Array) -> Array:
    """``num / den`` where ``den != 0``, else 0 (only exact zeros are touched)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def fuse(
    fc_weight_grad: Float[Array, "classes dim"],
    fc_bias_grad: Float[Array, " classes"],
    selected: Bool[Array, " classes"],
    energy: Float[Array, " classes"],
    sigma2: Float[Array, ""] | float,
) -> Float[Array, " dim"]:
    """Energy-weighted fusion of eq. 5 over the selected classes.

    ``x = sum_{j in S} w_j gW_j / (gb_j + lambda sigma^2)``, ``w_j = E_j / sum_S E``,
    ``lambda = sigma^2 / max_{j in S} gb_j^2``. Exact zeros are guarded without
    changing any other result: ``lambda = 0`` when ``max_S gb_j^2 = 0``, a class
    whose denominator is exactly 0 contributes nothing, and all weights are 0
    when ``sum_S E = 0``.

    Args:
      fc_weight_grad: protected weight gradient, row ``j`` for class ``j``.
      fc_bias_grad: protected bias gradient.
      selected: class mask ``S``.
      energy: ``E`` from :func:`class_energy`.
      sigma2: noise variance ``sigma^2`` (0 disables the stabiliser).

    Returns:
      The fused feature vector ``x``.
    """
    weights = jnp.where(selected, energy, 0)
    weights = _safe_divide(weights, jnp.sum(weights))
    lam = _safe_divide(sigma2, jnp.max(jnp.where(selected, fc_bias_grad**2, 0)))
    denom = fc_bias_grad + lam * sigma2
    coef = jnp.where(selected, _safe_divide(weights, denom), 0)
    return jnp.einsum("k,kd->d", coef, fc_weight_grad, precision=_HIGHEST)


# ------------------------------------------------------------ sigma^2 estimate


def estimate_noise_variance(
    fc_weight_grad: Float[Array, "classes dim"],
    fc_bias_grad: Float[Array, " classes"],
    rank: int = 1,
) -> Float[Array, ""]:
    """Per-coordinate noise variance of a protected head gradient, from the gradient alone.

    The noise-free matrix ``G = [gW | gb]`` (``K x (d + 1)``) has rank 1 for one
    example (rank <= B for a batch of B); i.i.d. noise of variance ``sigma^2``
    makes it full rank. The energy outside the top-``r`` singular subspace
    estimates ``sigma^2 (K - r)(d + 1 - r)``:

    ``sigma^2 = (||G||_F^2 - sum of the top r eigenvalues of G G^T) / ((K - r)(d + 1 - r))``.

    The residual is computed as ``||(I - U U^T) G||_F^2`` with ``U`` the top-``r``
    eigenvectors of the ``K x K`` Gram matrix, which equals the formula above
    but avoids cancellation when the signal dominates. Slightly low when the
    noise is comparable to the signal (the top eigenvalues absorb some noise).

    Args:
      fc_weight_grad: protected weight gradient ``[K, d]``.
      fc_bias_grad: protected bias gradient ``[K]``.
      rank: assumed rank ``r`` of the noise-free gradient, ``1 <= r < K``.

    Returns:
      The estimate of ``sigma^2`` (a scalar).

    Raises:
      ValueError: if the shapes disagree or ``rank`` is out of range.
    """
    num_classes, dim = _check_head(fc_weight_grad, fc_bias_grad)
    _check_rank(rank, num_classes, dim)
    gw, gb = _as_float(fc_weight_grad), _as_float(fc_bias_grad)
    gram = jnp.einsum("kd,jd->kj", gw, gw, precision=_HIGHEST) + jnp.outer(gb, gb)
    _, vecs = jnp.linalg.eigh(gram)  # ascending eigenvalues
    top = vecs[:, num_classes - rank :]
    proj = jnp.eye(num_classes, dtype=gw.dtype) - jnp.matmul(top, top.T, precision=_HIGHEST)
    resid = jnp.sum(jnp.einsum("kj,jd->kd", proj, gw, precision=_HIGHEST) ** 2)
    resid = resid + jnp.sum(jnp.matmul(proj, gb, precision=_HIGHEST) ** 2)
    return resid / ((num_classes - rank) * (dim + 1 - rank))


# ------------------------------------------------------------- WaveletRefine


def refinement_levels(
    height: int, width: int, wavelet: str = "db4", levels: int = 2, clamp: bool = False
) -> int:
    """Levels ``WaveletRefine`` uses: ``levels``, or with ``clamp`` ``min(levels, max_level)``.

    With ``clamp`` 0 means the map is smaller than the filter and refinement is skipped.

    >>> refinement_levels(8, 8), refinement_levels(8, 8, clamp=True), refinement_levels(28, 28, clamp=True)
    (2, 0, 2)
    """
    if not clamp:
        return int(levels)
    return min(levels, max_level(height, width, wavelet))


def _soft_threshold(x: Array, threshold: Array) -> Array:
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0)


def _refine_channel(channel: Float[Array, "h w"], wavelet: str, levels: int) -> Float[Array, "h w"]:
    height, width = channel.shape
    coeffs = wavedec2(channel, wavelet, level=levels)
    sigma_hat = jnp.median(jnp.abs(coeffs[-1][2])) / MAD_TO_SIGMA
    # Universal threshold with N = pixels of this channel map.
    threshold = sigma_hat * math.sqrt(2.0 * math.log(height * width))
    shrunk = [coeffs[0]] + [
        tuple(_soft_threshold(b, threshold) for b in bands) for bands in coeffs[1:]
    ]
    return waverec2(shrunk, wavelet)[:height, :width]


def wavelet_refine(
    feature_map: Float[Array, "h w c"],
    *,
    wavelet: str = "db4",
    levels: int = 2,
    clamp_levels: bool = False,
) -> Float[Array, "h w c"]:
    """``WaveletRefine``: per-channel wavelet soft-threshold denoising.

    For every channel: ``levels``-level 2-D DWT (symmetric extension), noise level
    ``sigma_hat = median(|cD_1|) / 0.6745`` from the finest diagonal band, universal
    soft threshold ``sigma_hat * sqrt(2 ln N)`` with ``N = H * W`` (pixels of
    one channel map) on every detail band of every level (the approximation is
    kept), inverse DWT, crop to ``H x W``, exactly as PyWavelets computes it
    (also for ``levels`` above the map's useful maximum). With ``clamp_levels``
    the levels are clipped by :func:`refinement_levels` and a map smaller than
    the filter is returned unchanged.

    Args:
      feature_map: ``(H, W, C)`` map.
      wavelet: PyWavelets wavelet name.
      levels: decomposition levels.
      clamp_levels: clip ``levels`` to the useful maximum (see :class:`SPEConfig`).

    Returns:
      The refined map, same shape.
    """
    if feature_map.ndim != 3:
        raise ValueError(f"feature_map must be (H, W, C), got shape {feature_map.shape}")
    height, width, _ = feature_map.shape
    used = refinement_levels(height, width, wavelet, levels, clamp_levels)
    if used == 0:
        return feature_map
    refine = functools.partial(_refine_channel, wavelet=wavelet, levels=used)
    return jax.vmap(refine, in_axes=2, out_axes=2)(feature_map)


# ----------------------------------------------------------------- eq. 7


def noise_strength(
    features: Float[Array, "*shape"], prior: Float[Array, "*shape"], gamma_t: float = 2.0
) -> Float[Array, ""]:
    """``T = gamma_T * log(1 + ||x - c||^2 / ||c||^2)`` (eq. 7), norms over the whole map.

    ``||c|| = 0`` gives ``T = 0`` when also ``x = c`` and ``T = +inf`` otherwise.

    >>> round(float(noise_strength(jnp.array([3.0, 4.0]), jnp.array([0.0, 4.0]))), 6)  # 2 ln(25/16)
    0.892574
    """
    num = jnp.sum((features - prior) ** 2)
    den = jnp.sum(prior**2)
    ratio = jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.where(num > 0, jnp.inf, 0))
    return gamma_t * jnp.log1p(ratio)


def quantize_noise_strength(noise_strength: Float[Array, "*n"]) -> Int[Array, "*n"]:
    """Integer step ``clip(round(10 T), 0, 100)`` used by Venom's public code (half to even).

    >>> quantize_noise_strength(jnp.array([0.89, 12.0, -1.0])).tolist()
    [9, 100, 0]
    """
    return jnp.clip(jnp.round(10.0 * jnp.asarray(noise_strength)), 0, 100).astype(jnp.int32)


# ------------------------------------------------------------------- SPE


def _spe_single(
    fc_weight_grad: Float[Array, "classes dim"],
    fc_bias_grad: Float[Array, " classes"],
    sigma2: Float[Array, ""],
    *,
    feature_shape: tuple[int, int, int],
    config: SPEConfig,
    estimate: bool,
) -> SPEResult:
    if estimate:
        sigma2 = estimate_noise_variance(fc_weight_grad, fc_bias_grad, rank=config.noise_rank)
    energy = class_energy(fc_weight_grad, fc_bias_grad)
    selected, fallback = select_classes(energy)
    raw = fuse(fc_weight_grad, fc_bias_grad, selected, energy, sigma2)
    fmap = raw.reshape(feature_shape)
    levels = refinement_levels(
        feature_shape[0], feature_shape[1], config.wavelet, config.levels, config.clamp_levels
    )
    prior = wavelet_refine(fmap, wavelet=config.wavelet, levels=levels) if levels else fmap
    return SPEResult(
        features_raw=raw,
        features=prior if config.refine else fmap,
        noise_strength=noise_strength(fmap, prior, config.gamma_t),
        selected=selected,
        sigma2=jnp.asarray(sigma2, raw.dtype),
        sigma2_estimated=jnp.asarray(estimate),
        fallback=fallback,
        refined=jnp.asarray(levels > 0),
    )


@functools.lru_cache(maxsize=64)
def _compiled(
    feature_shape: tuple[int, int, int], config: SPEConfig, estimate: bool, batched: bool
):
    """One jitted (and for batches vmapped) SPE per static setting, reused across calls."""
    fn = functools.partial(
        _spe_single, feature_shape=feature_shape, config=config, estimate=estimate
    )
    return jax.jit(jax.vmap(fn) if batched else fn)


def spe(
    fc_weight_grad: Float[Array, "classes dim"],
    fc_bias_grad: Float[Array, " classes"],
    *,
    feature_shape: tuple[int, int, int],
    sigma2: float | Float[Array, ""] | None = None,
    config: SPEConfig = SPEConfig(),
) -> SPEResult:
    """Structural Prior Extraction for one captured FC-head gradient.

    Jit-compatible (``feature_shape`` and ``config`` are static; value checks are
    skipped on tracers).

    Args:
      fc_weight_grad: protected gradient of the head's weight, ``[K, d]``, class-major
        (row ``j`` is the gradient of the weights of logit ``j``); ``d = H * W * C``
        is the head's input feature map flattened in NHWC order (channel fastest).
      fc_bias_grad: protected gradient of the head's bias, ``[K]``.
      feature_shape: ``(H, W, C)`` of the head's input feature map.
      sigma2: noise variance of the mechanism; ``None`` estimates it from the
        gradient with :func:`estimate_noise_variance` (rank ``config.noise_rank``).
      config: SPE settings.

    Returns:
      :class:`SPEResult` of this capture.

    Raises:
      ValueError: on inconsistent shapes, ``d != H * W * C``, a negative or
        non-finite ``sigma2``, non-finite gradients, or too few classes to estimate
        ``sigma2``.
      TypeError: if ``config`` is not an :class:`SPEConfig`.
    """
    feature_shape = _check_inputs(fc_weight_grad, fc_bias_grad, feature_shape, sigma2, config)
    gw, gb = _as_float(fc_weight_grad), _as_float(fc_bias_grad)
    estimate = sigma2 is None
    sig = jnp.zeros((), gw.dtype) if estimate else jnp.asarray(sigma2, gw.dtype)
    if sig.shape != ():
        raise ValueError(f"sigma2 must be a scalar for one capture, got shape {sig.shape}")
    return _compiled(feature_shape, config, estimate, False)(gw, gb, sig)


def spe_batch(
    fc_weight_grad: Float[Array, "n classes dim"],
    fc_bias_grad: Float[Array, "n classes"],
    *,
    feature_shape: tuple[int, int, int],
    sigma2: float | Float[Array, " n"] | None = None,
    config: SPEConfig = SPEConfig(),
    chunk_size: int | None = None,
) -> SPEResult:
    """SPE over ``N`` captures with one jitted ``vmap`` of :func:`spe`'s math.

    The compiled function is cached per ``(feature_shape, config, sigma2 is None)``,
    so repeated calls with the same shapes do not recompile.

    Args:
      fc_weight_grad: ``[N, K, d]`` protected weight gradients (see :func:`spe`).
      fc_bias_grad: ``[N, K]`` protected bias gradients.
      feature_shape: ``(H, W, C)`` with ``H * W * C = d``.
      sigma2: ``None`` (estimate per capture), one variance for all, or ``[N]``.
      config: SPE settings.
      chunk_size: process at most this many captures per call
        (:func:`jaxleak._batching.map_chunked`: the last chunk is padded with
        copies of the last capture so one compilation serves all chunks). Chunk
        results are moved to the host and concatenated there, so the fields are
        NumPy arrays when ``chunk_size < N``. ``None`` runs everything at once
        and returns device arrays. Results agree across chunk sizes to float32
        rounding, not bit for bit (docs/pitfalls.md, "The batching edge").

    Returns:
      :class:`SPEResult` with a leading ``N`` axis on every field.

    Raises:
      ValueError: on inconsistent shapes or values (see :func:`spe`) or a
        ``chunk_size`` below 1.
    """
    gw_shape, gb_shape = np.shape(fc_weight_grad), np.shape(fc_bias_grad)
    if len(gw_shape) != 3 or len(gb_shape) != 2 or gw_shape[:2] != gb_shape:
        raise ValueError(
            f"expected fc_weight_grad [N, K, d] and fc_bias_grad [N, K], got {gw_shape} and {gb_shape}"
        )
    n = gw_shape[0]
    if n < 1:
        raise ValueError("need at least one capture")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    estimate = sigma2 is None
    if not estimate:
        sig = np.asarray(sigma2, dtype=np.float64)
        if sig.shape not in ((), (n,)):
            raise ValueError(f"sigma2 must be a scalar or have shape ({n},), got {sig.shape}")
        sig = np.broadcast_to(sig, (n,))
    feature_shape = _check_inputs(
        fc_weight_grad[0], fc_bias_grad[0], feature_shape, None if estimate else sig, config
    )
    if not (_all_finite(fc_weight_grad) and _all_finite(fc_bias_grad)):
        raise ValueError("gradients must be finite")
    dtype = _float_dtype(fc_weight_grad)
    sig = np.zeros((n,), dtype) if estimate else sig.astype(dtype)
    fn = _compiled(feature_shape, config, estimate, True)
    gw, gb = _cast(fc_weight_grad, dtype), _cast(fc_bias_grad, dtype)
    whole = chunk_size is None or chunk_size >= n
    return map_chunked(
        fn, gw, gb, sig, chunk=n if whole else chunk_size, out="device" if whole else "numpy"
    )


# -------------------------------------------------------------- validation



def _cast(a, dtype: np.dtype):
    """``a`` as ``dtype`` where it is (host or device); no copy when it already is."""
    return jnp.asarray(a, dtype) if isinstance(a, jax.Array) else np.asarray(a, dtype)


def _float_dtype(a) -> np.dtype:
    dtype = np.dtype(getattr(a, "dtype", np.float32))
    if (
        not np.issubdtype(dtype, np.floating)
        or dtype == np.float64
        and not jax.config.jax_enable_x64
    ):
        return np.dtype(np.float32)
    return dtype


def _as_float(a) -> Array:
    return jnp.asarray(a, _float_dtype(a))


def _is_tracer(a) -> bool:
    return isinstance(a, jax.core.Tracer)


def _all_finite(a) -> bool:
    if _is_tracer(a):
        return True
    if isinstance(a, jax.Array):
        return bool(jnp.all(jnp.isfinite(a)))
    return bool(np.all(np.isfinite(np.asarray(a))))


def _check_head(fc_weight_grad, fc_bias_grad) -> tuple[int, int]:
    gw_shape, gb_shape = np.shape(fc_weight_grad), np.shape(fc_bias_grad)
    if len(gw_shape) != 2 or len(gb_shape) != 1 or gw_shape[0] != gb_shape[0]:
        raise ValueError(
            f"expected fc_weight_grad [K, d] and fc_bias_grad [K], got {gw_shape} and {gb_shape}"
        )
    if gw_shape[0] < 1 or gw_shape[1] < 1:
        raise ValueError(f"need K >= 1 classes and d >= 1 features, got {gw_shape}")
    return int(gw_shape[0]), int(gw_shape[1])


def _check_rank(rank: int, num_classes: int, dim: int) -> None:
    if not isinstance(rank, (int, np.integer)) or not 1 <= rank < min(num_classes, dim + 1):
        raise ValueError(
            f"noise rank must be an int with 1 <= rank < min(K, d + 1) = {min(num_classes, dim + 1)}, "
            f"got {rank!r}; estimating sigma^2 needs more classes than the signal rank"
        )


def _check_inputs(
    fc_weight_grad, fc_bias_grad, feature_shape, sigma2, config
) -> tuple[int, int, int]:
    if not isinstance(config, SPEConfig):
        raise TypeError(f"config must be an SPEConfig, got {type(config).__name__}")
    num_classes, dim = _check_head(fc_weight_grad, fc_bias_grad)
    try:
        feature_shape = tuple(int(s) for s in feature_shape)
    except TypeError:
        raise ValueError(f"feature_shape must be (H, W, C), got {feature_shape!r}") from None
    if len(feature_shape) != 3 or min(feature_shape) < 1:
        raise ValueError(
            f"feature_shape must be three positive ints (H, W, C), got {feature_shape}"
        )
    if math.prod(feature_shape) != dim:
        raise ValueError(
            f"feature_shape {feature_shape} has {math.prod(feature_shape)} entries but the gradient has d = {dim}"
        )
    if sigma2 is None:
        _check_rank(config.noise_rank, num_classes, dim)
    elif not _is_tracer(sigma2):
        values = np.asarray(sigma2, dtype=np.float64)
        if not (np.all(np.isfinite(values)) and np.all(values >= 0)):
            raise ValueError(f"sigma2 must be finite and >= 0, got {sigma2}")
    if not (_all_finite(fc_weight_grad) and _all_finite(fc_bias_grad)):
        raise ValueError("gradients must be finite")
    return feature_shape
