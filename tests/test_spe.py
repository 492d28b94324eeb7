"""Venom's Structural Prior Extraction: exact cases, a float64 PyWavelets reference, batching."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt

from jaxleak.attacks.spe import (
    SPEConfig,
    SPEResult,
    _compiled,
    class_energy,
    estimate_noise_variance,
    fuse,
    noise_strength,
    quantize_noise_strength,
    refinement_levels,
    select_classes,
    selection_gamma,
    spe,
    spe_batch,
    wavelet_refine,
)

RAW = SPEConfig(refine=False)


def _head_gradient(rng, num_classes, features, label=0):
    """Noise-free single-example head gradient: gW = outer(delta, x), gb = delta."""
    logits = rng.standard_normal(num_classes)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    delta = probs - np.eye(num_classes)[label]  # softmax cross-entropy
    return np.outer(delta, features), delta


def _noisy_head(rng, num_classes, feature_shape, sigma):
    x = rng.standard_normal(math.prod(feature_shape))
    gw, gb = _head_gradient(rng, num_classes, x, label=rng.integers(num_classes))
    gw = gw + sigma * rng.standard_normal(gw.shape)
    gb = gb + sigma * rng.standard_normal(gb.shape)
    return gw.astype(np.float32), gb.astype(np.float32)


def _reference_refine(fmap, wavelet="db4", levels=2, clamp=False):
    h, w, _ = fmap.shape
    used = levels
    if clamp:
        used = min(levels, pywt.dwt_max_level(min(h, w), pywt.Wavelet(wavelet).dec_len))
    if used == 0:
        return fmap.copy()
    out = np.empty_like(fmap)
    for ch in range(fmap.shape[2]):
        with warnings.catch_warnings():  # "Level value of 2 is too high" on small maps
            warnings.simplefilter("ignore", UserWarning)
            coeffs = pywt.wavedec2(fmap[..., ch], wavelet, level=used)
        thr = np.median(np.abs(coeffs[-1][2])) / 0.6745 * np.sqrt(2 * np.log(h * w))
        coeffs = [coeffs[0]] + [
            tuple(pywt.threshold(b, thr, "soft") for b in d) for d in coeffs[1:]
        ]
        out[..., ch] = pywt.waverec2(coeffs, wavelet)[:h, :w]
    return out


def _reference_spe(gw, gb, sigma2, feature_shape, gamma_t=2.0):
    """Eqs. 3-5 and 7 written out in float64 NumPy with PyWavelets."""
    gw, gb = gw.astype(np.float64), gb.astype(np.float64)
    energy = np.linalg.norm(gw, axis=1) * np.abs(gb)
    gamma = min(2.0, np.sqrt(np.log(len(energy))))
    sel = energy > energy.mean() + gamma * energy.std()  # population std
    if not sel.any():
        sel[np.argmax(energy)] = True
    w = energy * sel / (energy * sel).sum()
    lam = sigma2 / np.max(gb[sel] ** 2)
    x = sum(w[j] * gw[j] / (gb[j] + lam * sigma2) for j in np.flatnonzero(sel))
    fmap = x.reshape(feature_shape)
    prior = _reference_refine(fmap)
    t = gamma_t * np.log1p(np.sum((fmap - prior) ** 2) / np.sum(prior**2))
    return x, prior, t, sel


# ------------------------------------------------------------------ exact cases


@pytest.mark.parametrize("feature_shape", [(4, 4, 3), (8, 8, 2), (1, 1, 7)])
@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_noise_free_gradient_gives_features_exactly(feature_shape, num_classes):
    rng = np.random.default_rng(num_classes)
    x = rng.uniform(-2, 2, math.prod(feature_shape)).astype(np.float32)
    gw, gb = _head_gradient(rng, num_classes, x, label=num_classes - 1)
    out = spe(
        gw.astype(np.float32),
        gb.astype(np.float32),
        feature_shape=feature_shape,
        sigma2=0.0,
        config=RAW,
    )
    np.testing.assert_allclose(out.features_raw, x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.features, x.reshape(feature_shape), rtol=1e-6, atol=1e-6)
    assert bool(out.selected.any()) and not bool(out.sigma2_estimated)
    assert float(out.sigma2) == 0.0


def test_noise_free_gradient_with_stabiliser_and_estimated_sigma2():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(8 * 8 * 4).astype(np.float32)
    gw, gb = (a.astype(np.float32) for a in _head_gradient(rng, 10, x, label=4))
    out = spe(gw, gb, feature_shape=(8, 8, 4), sigma2=None, config=RAW)
    assert bool(out.sigma2_estimated)
    assert 0.0 <= float(out.sigma2) < 1e-12  # rank-1 input: nothing outside the signal
    np.testing.assert_allclose(out.features_raw, x, rtol=1e-5, atol=1e-5)


def test_stabiliser_shrinks_as_eq5_says():
    # One selected class, gb = 0.5, sigma2 = 0.1: lambda = 0.1 / 0.25, denominator 0.5 + 0.04.
    x = np.linspace(-1, 1, 12, dtype=np.float32)
    gb = np.array([0.5, 0.0, 0.0, 0.0], np.float32)
    gw = np.outer(gb, x)
    out = spe(gw, gb, feature_shape=(2, 2, 3), sigma2=0.1, config=RAW)
    np.testing.assert_array_equal(out.selected, [True, False, False, False])
    np.testing.assert_allclose(out.features_raw, 0.5 * x / 0.54, rtol=1e-6)


def test_fuse_guards_exact_zero_denominators():
    # lambda sigma2 = (0.5 / 1.0) * 0.5 = 0.25 cancels gb_0 = -0.25 exactly: class 0 is dropped.
    gw = jnp.asarray([[4.0, 8.0], [1.0, 2.0]])
    gb = jnp.asarray([-0.25, 1.0])
    energy = jnp.asarray([2.0, 6.0])
    x = fuse(gw, gb, jnp.asarray([True, True]), energy, 0.5)
    np.testing.assert_allclose(x, 0.75 * np.array([1.0, 2.0]) / 1.25, rtol=1e-6)


def test_all_zero_gradient_is_finite():
    out = spe(np.zeros((5, 12), np.float32), np.zeros(5, np.float32), feature_shape=(2, 2, 3))
    assert bool(out.fallback) and int(out.selected.sum()) == 1
    for leaf in (out.features_raw, out.features, out.noise_strength, out.sigma2):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


# ------------------------------------------------------------------ selection


@pytest.mark.parametrize("k", [1, 2, 3, 10, 54, 55, 100, 1000])
def test_gamma_rule(k):
    assert selection_gamma(k) == min(2.0, math.sqrt(math.log(k)))
    assert selection_gamma(k) == (2.0 if k >= 55 else math.sqrt(math.log(k)))  # e^4 = 54.6


@pytest.mark.parametrize(
    "energy,expect,fallback",
    [
        ([1.0] * 9 + [10.0], [9], False),  # mean 1.9, std 2.7, gamma 1.517: threshold 6.0
        ([0, 0, 5, 5, 0, 0, 0, 0, 0, 0], [2, 3], False),  # mean 1, std 2: threshold 4.03
        ([0, 0, 4, 4, 0, 0, 0, 0, 0, 0], [2, 3], False),  # mean 0.8, std 1.6: threshold 3.23
        ([3.0, 3.0, 3.0, 3.0], [0], True),  # std 0: nothing strictly above the mean -> argmax
        ([1.0, 2.0, 2.9, 2.5], [2], True),  # mean 2.1, std 0.71, gamma 1.18: threshold 2.94
        ([7.0], [0], True),  # K = 1: gamma 0, std 0
    ],
)
def test_selection_and_argmax_fallback(energy, expect, fallback):
    energy = np.asarray(energy, np.float32)
    mask, fb = select_classes(jnp.asarray(energy))
    np.testing.assert_array_equal(np.flatnonzero(mask), expect)
    assert bool(fb) == fallback
    # Same selection through spe: unit rows scaled by E_j, gb = 1, so E_j is as given.
    k = len(energy)
    gw = np.zeros((k, 4), np.float32)
    gw[:, 0] = energy
    out = spe(gw, np.ones(k, np.float32), feature_shape=(1, 1, 4), sigma2=0.0, config=RAW)
    np.testing.assert_array_equal(np.flatnonzero(out.selected), expect)
    assert bool(out.fallback) == fallback
    np.testing.assert_allclose(class_energy(jnp.asarray(gw), jnp.ones(k)), energy)


def test_selection_uses_population_std():
    # Thresholds 0.79 (ddof=0) and 0.83 (ddof=1): class 7 (E = 0.8) is kept only with ddof=0.
    energy = np.asarray([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.8], np.float32)
    gamma = selection_gamma(8)
    assert energy.mean() + gamma * energy.std() < 0.8 < energy.mean() + gamma * energy.std(ddof=1)
    energy = jnp.asarray(energy)
    mask, _ = select_classes(energy)
    np.testing.assert_array_equal(np.flatnonzero(mask), [6, 7])


# ------------------------------------------------------- reference and refinement


@pytest.mark.parametrize("feature_shape", [(16, 16, 2), (28, 28, 1), (9, 13, 3)])
def test_matches_float64_pywavelets_reference(feature_shape):
    rng = np.random.default_rng(sum(feature_shape))
    gw, gb = _noisy_head(rng, 10, feature_shape, sigma=0.05)
    out = spe(gw, gb, feature_shape=feature_shape, sigma2=0.05**2)
    x, prior, t, sel = _reference_spe(gw, gb, 0.05**2, feature_shape)
    np.testing.assert_array_equal(out.selected, sel)
    scale = np.abs(x).max()
    np.testing.assert_allclose(out.features_raw, x, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(out.features, prior, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(out.noise_strength, t, rtol=1e-4)
    assert bool(out.refined) == (refinement_levels(*feature_shape[:2]) > 0)


def test_wavelet_refine_matches_pywavelets_per_channel():
    fmap = np.random.default_rng(7).standard_normal((20, 17, 3)).astype(np.float32)
    for levels in (1, 2):
        got = wavelet_refine(jnp.asarray(fmap), levels=levels)
        np.testing.assert_allclose(
            got, _reference_refine(fmap.astype(np.float64), levels=levels), atol=1e-5
        )
    small = fmap[:6, :6]  # below the db4 filter: PyWavelets' boundary-effect levels, or clamped away
    np.testing.assert_allclose(
        wavelet_refine(jnp.asarray(small)), _reference_refine(small.astype(np.float64)), atol=1e-5
    )
    np.testing.assert_array_equal(wavelet_refine(jnp.asarray(small), clamp_levels=True), small)


def _smooth_map(h, w, c):
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    return np.stack(
        [np.sin(2 * np.pi * (k + 1) * xx) * np.cos(np.pi * yy) + k for k in range(c)], -1
    )


def test_refinement_keeps_smooth_map_and_removes_noise():
    clean = _smooth_map(32, 32, 3).astype(np.float32)
    rng = np.random.default_rng(0)
    gw, gb = (a.astype(np.float32) for a in _head_gradient(rng, 10, clean.ravel(), label=2))
    out = spe(gw, gb, feature_shape=clean.shape, sigma2=0.0)
    assert bool(out.refined)
    assert np.linalg.norm(out.features - clean) / np.linalg.norm(clean) < 0.01
    assert float(out.noise_strength) < 1e-3

    noisy = clean + 0.3 * rng.standard_normal(clean.shape).astype(np.float32)
    gw, gb = (a.astype(np.float32) for a in _head_gradient(rng, 10, noisy.ravel(), label=2))
    out = spe(gw, gb, feature_shape=clean.shape, sigma2=0.0)
    err_raw = np.linalg.norm(out.features_raw.reshape(clean.shape) - clean)
    err_ref = np.linalg.norm(out.features - clean)
    assert err_ref < 0.6 * err_raw
    assert float(out.noise_strength) > 0.01


def test_refine_false_returns_raw_map_but_same_noise_strength():
    rng = np.random.default_rng(11)
    gw, gb = _noisy_head(rng, 10, (16, 16, 2), sigma=0.05)
    on = spe(gw, gb, feature_shape=(16, 16, 2), sigma2=0.0025)
    off = spe(gw, gb, feature_shape=(16, 16, 2), sigma2=0.0025, config=RAW)
    np.testing.assert_array_equal(off.features, off.features_raw.reshape(16, 16, 2))
    assert not np.allclose(on.features, off.features)
    np.testing.assert_allclose(on.noise_strength, off.noise_strength, rtol=1e-6)


# ------------------------------------------------------------------ eq. 7


def test_noise_strength_hand_example():
    x = jnp.asarray([[3.0, 4.0]])
    c = jnp.asarray([[0.0, 4.0]])
    assert float(noise_strength(x, c)) == pytest.approx(2 * math.log(1 + 9 / 16), rel=1e-6)
    assert float(noise_strength(x, c, gamma_t=1.0)) == pytest.approx(math.log(25 / 16), rel=1e-6)
    assert float(noise_strength(x, x)) == 0.0
    assert float(noise_strength(jnp.zeros(2), jnp.zeros(2))) == 0.0
    assert float(noise_strength(x, jnp.zeros_like(x))) == math.inf


def test_quantize_noise_strength():
    # 0.25 and 0.75 are exact in binary: 2.5 -> 2 and 7.5 -> 8 (round half to even).
    t = jnp.asarray([0.0, 0.8925, 0.25, 0.75, 0.2501, 3.14, 9.96, 10.0, 12.0, -0.5, jnp.inf])
    np.testing.assert_array_equal(
        quantize_noise_strength(t), [0, 9, 2, 8, 3, 31, 100, 100, 100, 0, 100]
    )
    assert quantize_noise_strength(t).dtype == jnp.int32


# ------------------------------------------------------------- sigma^2 estimator


@pytest.mark.parametrize("sigma", [1e-3, 3e-3, 1e-2])
def test_noise_variance_estimator_recovers_sigma2(sigma):
    rng = np.random.default_rng(int(1 / sigma))
    x = rng.standard_normal(4096)
    gw, gb = _head_gradient(rng, 10, x / np.linalg.norm(x), label=3)  # clipped-size signal
    noise_w, noise_b = rng.standard_normal(gw.shape), rng.standard_normal(gb.shape)
    est = estimate_noise_variance(
        jnp.asarray(gw + sigma * noise_w, jnp.float32),
        jnp.asarray(gb + sigma * noise_b, jnp.float32),
    )
    assert float(est) == pytest.approx(sigma**2, rel=0.03)


def test_noise_variance_estimator_batch_rank():
    rng = np.random.default_rng(5)
    heads = [_head_gradient(rng, 10, rng.standard_normal(4096), label=i) for i in (1, 7)]
    gw, gb = heads[0][0] + heads[1][0], heads[0][1] + heads[1][1]  # batch of two examples
    sigma = 0.05
    noisy_w = jnp.asarray(gw + sigma * rng.standard_normal(gw.shape), jnp.float32)
    noisy_b = jnp.asarray(gb + sigma * rng.standard_normal(10), jnp.float32)
    assert float(estimate_noise_variance(noisy_w, noisy_b, rank=2)) == pytest.approx(
        sigma**2, rel=0.03
    )
    assert float(estimate_noise_variance(noisy_w, noisy_b, rank=1)) > 1.5 * sigma**2  # rank too low
    assert (
        float(estimate_noise_variance(jnp.asarray(gw, jnp.float32), jnp.asarray(gb), rank=2)) < 1e-9
    )


# ------------------------------------------------------------------ batching


def _assert_results_close(a, b, atol=1e-6):
    for name, x, y in zip(SPEResult._fields, a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=atol, err_msg=name)


@pytest.mark.parametrize("sigma2", [None, 0.01, "per-capture"])
def test_spe_batch_equals_spe_one_by_one(sigma2):
    rng = np.random.default_rng(2)
    n, shape = 5, (12, 12, 2)
    heads = [_noisy_head(rng, 10, shape, sigma=0.1) for _ in range(n)]
    gw = np.stack([h[0] for h in heads])
    gb = np.stack([h[1] for h in heads])
    sig = rng.uniform(0.001, 0.02, n).astype(np.float32) if sigma2 == "per-capture" else sigma2
    batched = spe_batch(gw, gb, feature_shape=shape, sigma2=sig)
    assert batched.features.shape == (n, *shape) and batched.selected.shape == (n, 10)
    for i in range(n):
        s = sig[i] if sigma2 == "per-capture" else sigma2
        _assert_results_close(
            jax.tree.map(lambda a, i=i: a[i], batched),
            spe(gw[i], gb[i], feature_shape=shape, sigma2=s),
        )
    assert bool(np.all(batched.sigma2_estimated)) == (sigma2 is None)

    chunked = spe_batch(gw, gb, feature_shape=shape, sigma2=sig, chunk_size=2)  # 2 + 2 + padded 1
    assert isinstance(chunked.features, np.ndarray)
    _assert_results_close(chunked, batched)


def test_spe_batch_compiles_once():
    rng = np.random.default_rng(9)
    shape, config = (6, 6, 2), SPEConfig(gamma_t=1.5)  # fresh static key
    gw = rng.standard_normal((7, 4, 72)).astype(np.float32)
    gb = rng.standard_normal((7, 4)).astype(np.float32)
    for _ in range(2):
        spe_batch(gw, gb, feature_shape=shape, sigma2=0.1, config=config, chunk_size=3)
        spe_batch(
            jnp.asarray(gw[:3]), gb[:3], feature_shape=shape, sigma2=[0.1, 0.2, 0.3], config=config
        )
    assert _compiled(shape, config, False, True)._cache_size() == 1


def test_spe_is_jit_compatible():
    rng = np.random.default_rng(4)
    gw, gb = _noisy_head(rng, 10, (16, 16, 2), sigma=0.05)
    for sigma2 in (None, 0.0025):
        fn = jax.jit(lambda a, b, s=sigma2: spe(a, b, feature_shape=(16, 16, 2), sigma2=s))
        _assert_results_close(fn(gw, gb), spe(gw, gb, feature_shape=(16, 16, 2), sigma2=sigma2))
    traced_sigma = jax.jit(lambda a, b, s: spe(a, b, feature_shape=(16, 16, 2), sigma2=s))(
        gw, gb, 0.0025
    )
    _assert_results_close(traced_sigma, spe(gw, gb, feature_shape=(16, 16, 2), sigma2=0.0025))


@pytest.mark.parametrize(
    "feature_shape,clamp,refined",
    [
        ((64, 64, 16), False, True),
        ((8, 8, 12), False, True),
        ((8, 8, 12), True, False),
        ((4, 4, 512), True, False),
        ((28, 28, 1), True, True),
    ],
)
def test_feature_map_shapes(feature_shape, clamp, refined):
    rng = np.random.default_rng(0)
    n, k, d = 2, 10, math.prod(feature_shape)
    gw = rng.standard_normal((n, k, d)).astype(np.float32) * 1e-3
    gb = rng.standard_normal((n, k)).astype(np.float32)
    out = spe_batch(gw, gb, feature_shape=feature_shape, config=SPEConfig(clamp_levels=clamp))
    assert out.features_raw.shape == (n, d) and out.features.shape == (n, *feature_shape)
    assert out.noise_strength.shape == out.sigma2.shape == out.fallback.shape == (n,)
    assert out.selected.shape == (n, k) and out.selected.dtype == jnp.bool_
    assert bool(np.all(np.isfinite(out.features))) and bool(np.all(np.isfinite(out.noise_strength)))
    np.testing.assert_array_equal(out.refined, refined)
    if refined:
        assert float(out.noise_strength.min()) > 0
    else:
        np.testing.assert_array_equal(out.features, out.features_raw.reshape(n, *feature_shape))
        np.testing.assert_array_equal(out.noise_strength, 0.0)


# ------------------------------------------------------------------ validation


def test_rejects_bad_inputs():
    gw, gb = np.zeros((4, 12), np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="entries"):
        spe(gw, gb, feature_shape=(2, 2, 2))
    with pytest.raises(ValueError, match=r"\[K\]"):
        spe(gw, gb[:3], feature_shape=(2, 2, 3))
    with pytest.raises(ValueError, match="sigma2"):
        spe(gw, gb, feature_shape=(2, 2, 3), sigma2=-1.0)
    with pytest.raises(ValueError, match="finite"):
        spe(gw + np.nan, gb, feature_shape=(2, 2, 3), sigma2=0.0)
    with pytest.raises(ValueError, match="rank"):
        spe(gw[:1], gb[:1], feature_shape=(2, 2, 3))  # K = 1 cannot estimate sigma2
    with pytest.raises(ValueError, match="sigma2"):
        spe_batch(gw[None], gb[None], feature_shape=(2, 2, 3), sigma2=[0.1, 0.2])
    with pytest.raises(ValueError, match="chunk_size"):
        spe_batch(gw[None], gb[None], feature_shape=(2, 2, 3), chunk_size=0)
    with pytest.raises(ValueError, match="levels"):
        SPEConfig(levels=0)
    with pytest.raises(ValueError, match="wavelet"):
        SPEConfig(wavelet="nope")
    with pytest.raises(TypeError, match="SPEConfig"):
        spe(gw, gb, feature_shape=(2, 2, 3), config={"refine": False})
