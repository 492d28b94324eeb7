"""Tests for jaxleak.metrics against scikit-image references and hand values."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import jaxleak.metrics
from jaxleak.metrics import SSIM_WIN_SIZE, _image, _vectors, asr, cosine_similarity, mse, psnr, ssim

TOL = 1e-4


def _skimage_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0, full: bool = False):
    return structural_similarity(
        x,
        y,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        full=full,
    )


def _smooth_batch(rng: np.random.Generator, n: int, h: int, w: int, c: int) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    images = []
    for _ in range(n):
        phase = rng.uniform(0, 2 * np.pi, size=c)
        freq = rng.uniform(1, 4, size=c)
        chans = [
            0.5 + 0.4 * np.sin(2 * np.pi * f * (xx + 0.5 * yy) + p) * (0.5 + 0.5 * yy)
            for f, p in zip(freq, phase)
        ]
        images.append(np.stack(chans, axis=-1))
    return np.asarray(images)


def test_public_api() -> None:
    assert set(jaxleak.metrics.__all__) == {
        "SSIM_WIN_SIZE",
        "asr",
        "cosine_similarity",
        "lpips",
        "mse",
        "psnr",
        "ssim",
    }
    for name in jaxleak.metrics.__all__:
        assert getattr(jaxleak.metrics, name) is not None
    assert SSIM_WIN_SIZE == 11


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3), (11, 11, 1), (11, 11, 3)])
def test_ssim_matches_skimage_on_random_images(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    x = rng.random((3, *shape))
    y = rng.random((3, *shape))
    ours = np.asarray(ssim(x, y))
    ref = np.array([_skimage_ssim(x[i], y[i]) for i in range(3)])
    assert ours.shape == (3,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3), (11, 11, 1)])
def test_ssim_matches_skimage_on_smooth_vs_noisy(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(7)
    x = _smooth_batch(rng, 2, *shape)
    y = np.clip(x + rng.normal(scale=0.05, size=x.shape), 0.0, 1.0)
    ours = np.asarray(ssim(x, y))
    ref = np.array([_skimage_ssim(x[i], y[i]) for i in range(2)])
    # The pair is neither identical nor unrelated, so this checks the formula, not a limit.
    assert np.all((ref > 0.2) & (ref < 0.99))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_ssim_map_matches_skimage_including_borders() -> None:
    # The border strip is cropped from the score, so check the reflect padding on the map.
    rng = np.random.default_rng(3)
    x = rng.random((2, 16, 13, 2))
    y = np.clip(x + rng.normal(scale=0.2, size=x.shape), 0, 1)
    ours = np.asarray(
        _image._ssim_map_batch(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), 1.0)
    )
    ref = np.stack([_skimage_ssim(x[i], y[i], full=True)[1] for i in range(2)])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_ssim_data_range() -> None:
    rng = np.random.default_rng(4)
    x = 2.0 * rng.random((2, 20, 20, 3))
    y = np.clip(x + rng.normal(scale=0.3, size=x.shape), 0, 2)
    ref = np.array([_skimage_ssim(x[i], y[i], data_range=2.0) for i in range(2)])
    np.testing.assert_allclose(np.asarray(ssim(x, y, data_range=2.0)), ref, rtol=0, atol=TOL)


def test_ssim_per_image_equals_batched_and_works_under_jit() -> None:
    rng = np.random.default_rng(5)
    x = rng.random((4, 16, 16, 3)).astype(np.float32)
    y = rng.random((4, 16, 16, 3)).astype(np.float32)
    batched = np.asarray(ssim(x, y))
    singles = np.array([ssim(x[i : i + 1], y[i : i + 1])[0] for i in range(4)])
    np.testing.assert_allclose(batched, singles, rtol=0, atol=1e-6)
    jitted = jax.jit(lambda a, b: ssim(a, b))(x, y)
    np.testing.assert_allclose(np.asarray(jitted), batched, rtol=0, atol=1e-6)


def test_ssim_gradient_is_finite() -> None:
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.random((2, 12, 12, 1)), jnp.float32)
    y = jnp.asarray(rng.random((2, 12, 12, 1)), jnp.float32)
    grad = jax.grad(lambda a: ssim(a, y).sum())(x)
    assert grad.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_psnr_matches_skimage(data_range: float) -> None:
    rng = np.random.default_rng(8)
    x = data_range * rng.random((5, 28, 28, 1))
    y = np.clip(x + rng.normal(scale=0.1 * data_range, size=x.shape), 0, data_range)
    ref = np.array([peak_signal_noise_ratio(y[i], x[i], data_range=data_range) for i in range(5)])
    ours = np.asarray(psnr(x, y, data_range=data_range))
    assert ours.shape == (5,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)


def test_psnr_hand_value_and_mse() -> None:
    x = np.zeros((2, 4, 4, 3), np.float32)
    y = np.zeros((2, 4, 4, 3), np.float32)
    y[0] = 0.1  # mse 0.01 -> exactly 20 dB
    y[1, 0, 0, 0] = 1.0  # one pixel of 48 off by 1 -> mse 1/48
    np.testing.assert_allclose(np.asarray(mse(x, y)), [0.01, 1 / 48], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(psnr(x, y)), [20.0, 10 * np.log10(48)], rtol=1e-5)


def test_identical_images() -> None:
    rng = np.random.default_rng(9)
    x = rng.random((3, 28, 28, 1)).astype(np.float32)
    assert np.all(np.asarray(mse(x, x)) == 0.0)
    assert np.all(np.isposinf(np.asarray(psnr(x, x))))
    np.testing.assert_allclose(np.asarray(ssim(x, x)), 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("metric", [mse, psnr, ssim])
def test_shape_and_dtype_errors(metric) -> None:
    good = np.zeros((2, 16, 16, 1), np.float32)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        metric(good[0], good[0])
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        metric(good[..., None], good[..., None])
    with pytest.raises(ValueError, match="same shape"):
        metric(good, good[:1])
    with pytest.raises(ValueError, match="same shape"):
        metric(good, np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="floating-point"):
        metric(good.astype(np.uint8), good.astype(np.uint8))


@pytest.mark.parametrize("metric", [psnr, ssim])
@pytest.mark.parametrize("data_range", [0.0, -1.0, float("inf")])
def test_bad_data_range(metric, data_range: float) -> None:
    good = np.zeros((1, 16, 16, 1), np.float32)
    with pytest.raises(ValueError, match="data_range"):
        metric(good, good, data_range=data_range)


@pytest.mark.parametrize("hw", [(10, 28), (28, 10), (7, 7)])
def test_ssim_rejects_images_smaller_than_window(hw: tuple[int, int]) -> None:
    x = np.zeros((1, *hw, 1), np.float32)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x, x)
    # skimage refuses the same sizes.
    with pytest.raises(ValueError):
        _skimage_ssim(x[0].astype(np.float64), x[0].astype(np.float64))


def test_asr_hand_values() -> None:
    values = [0.2, 0.5, 0.51, 0.9]
    assert float(asr(values)) == 0.5  # 0.5 itself is not a success
    assert float(asr(values, tau=0.1)) == 1.0
    assert float(asr(values, tau=0.95)) == 0.0
    assert float(asr(np.array([0.7, np.nan, 0.1, 0.8]))) == 0.5
    assert float(asr(jnp.array([0.6]))) == 1.0


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], 0.3])
def test_asr_rejects_non_vectors(bad) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        asr(bad)


def test_cosine_similarity_hand_values() -> None:
    a = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [0.0, 0.0]])
    b = np.array([[0.0, 3.0], [2.0, 2.0], [-2.0, -4.0], [1.0, 1.0]])
    out = cosine_similarity(a, b)
    assert out.shape == (4,) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), [0.0, 1.0, -1.0, 0.0], atol=1e-6)


def test_cosine_similarity_flattens_non_batch_axes() -> None:
    rng = np.random.default_rng(10)
    a = rng.normal(size=(5, 2, 3, 4))
    b = rng.normal(size=(5, 2, 3, 4))
    fa, fb = a.reshape(5, -1), b.reshape(5, -1)
    ref = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
    np.testing.assert_allclose(np.asarray(cosine_similarity(a, b)), ref, rtol=0, atol=1e-5)


def test_cosine_similarity_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        cosine_similarity(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="at least two axes"):
        cosine_similarity(np.ones(3), np.ones(3))


@pytest.mark.parametrize("module", [_image, _vectors])
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
