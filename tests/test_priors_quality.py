"""Prior quality: the Frechet distance, AlexNet features, the velocity-norm table."""

import doctest
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxleak.priors import Prior, UNetConfig, init_params, quality
from jaxleak.priors.quality import (
    alexnet_features,
    fd_alexnet,
    format_velocity_table,
    frechet_distance,
    velocity_table,
)

WEIGHTS_ROOT = Path(
    os.environ.get(
        "JAXLEAK_WEIGHTS_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "weights"
    )
)
ALEX_FILES = ("alexnet_features_torchvision.npz", "lpips_v0.1_lin_alex.npz")

TINY = UNetConfig(image_size=16, base_width=8, channel_mult=(1,), num_res_blocks=1,
                  attention_resolutions=(), groups=4)


def _need_alexnet() -> None:
    missing = [n for n in ALEX_FILES if not (WEIGHTS_ROOT / "lpips" / n).is_file()]
    if missing:
        pytest.skip(f"LPIPS AlexNet weights absent from {WEIGHTS_ROOT / 'lpips'} "
                    f"(set JAXLEAK_WEIGHTS_DIR): {missing}")


def _exact_gaussian(rng, n, mean, variances):
    """Samples whose sample mean and (ddof=1) covariance are exactly ``mean`` and ``diag(variances)``."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    # whiten with the sample covariance's Cholesky factor: sample covariance becomes I
    chol = np.linalg.cholesky(np.cov(z, rowvar=False))
    z = np.linalg.solve(chol, z.T).T
    return z * np.sqrt(variances) + mean


# --------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_zero_for_identical_sets():
    feats = np.random.default_rng(0).normal(size=(50, 6))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    # row order does not matter
    assert frechet_distance(feats, feats[::-1]) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu_a, var_a = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 4.0, 0.25, 2.0])
    mu_b, var_b = np.array([1.0, 1.0, 0.0, 0.5]), np.array([9.0, 1.0, 0.25, 0.5])
    a = _exact_gaussian(rng, 40, mu_a, var_a)
    b = _exact_gaussian(rng, 60, mu_b, var_b)
    # diagonal covariances commute: tr(Ca + Cb - 2 sqrt(Ca Cb)) = sum (sqrt(va) - sqrt(vb))^2
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric_with_full_covariances():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5)) + 0.3
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0.0


def test_frechet_distance_refuses_bad_inputs():
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((4, 2)))


# --------------------------------------------------------------------------- AlexNet features


def test_alexnet_features_shape_layers_and_grayscale():
    _need_alexnet()
    images = np.random.default_rng(3).random((5, 32, 32, 3), dtype=np.float32)
    feats = alexnet_features(images, weights_dir=WEIGHTS_ROOT, batch_size=2)  # padded last chunk
    assert feats.shape == (5, 256) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and (feats >= 0).all()  # pooled ReLUs
    # chunking does not change the result
    np.testing.assert_allclose(
        alexnet_features(images, weights_dir=WEIGHTS_ROOT, batch_size=8), feats, rtol=1e-5,
        atol=1e-6)
    assert alexnet_features(images[:2], weights_dir=WEIGHTS_ROOT, layer="relu2").shape == (2, 192)
    gray = images[..., :1]
    np.testing.assert_allclose(alexnet_features(gray, weights_dir=WEIGHTS_ROOT),
                               alexnet_features(np.repeat(gray, 3, -1), weights_dir=WEIGHTS_ROOT),
                               rtol=1e-5, atol=1e-6)
    assert fd_alexnet(images, images, weights_dir=WEIGHTS_ROOT) == pytest.approx(0.0, abs=1e-6)


def test_alexnet_features_refuses_bad_options():
    images = np.zeros((2, 32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="layer"):
        alexnet_features(images, layer="fc7")
    with pytest.raises(ValueError, match="channels"):
        alexnet_features(np.zeros((2, 32, 32, 2), np.float32))
    with pytest.raises(ValueError, match="min_side_px"):
        alexnet_features(images, min_side_px=16)


# --------------------------------------------------------------------------- velocity table


@pytest.fixture(scope="module")
def tiny_prior():
    return Prior(None, init_params(TINY, jax.random.key(0)), TINY, {})


def test_velocity_table_rows(tiny_prior):
    rng = np.random.default_rng(4)
    sets = {"real": rng.random((5, 16, 16, 3), dtype=np.float32),
            "other": np.full((3, 16, 16, 3), 0.5, np.float32)}
    ts, stds = (0.5, 0.9), (0.05, 0.2)
    rows = velocity_table(tiny_prior, sets, ts=ts, noise_stds=stds, seed=0, batch_size=2)
    keys = {"images", "perturbation", "noise_std", "t", "n", "mean", "sem"}
    assert all(set(row) == keys for row in rows)
    assert len(rows) == (len(sets) * (1 + len(stds)) + 1) * len(ts)
    for name, n in (("real", 5), ("other", 3)):
        mine = [r for r in rows if r["images"] == name]
        assert {(r["perturbation"], r["noise_std"], r["t"]) for r in mine} == {
            ("none", None, t) for t in ts} | {("gaussian", s, t) for s in stds for t in ts}
        assert all(r["n"] == n for r in mine)
    uniform = [r for r in rows if r["perturbation"] == "uniform"]
    assert [r["t"] for r in uniform] == list(ts) and all(r["n"] == 5 for r in uniform)
    assert all(np.isfinite(r["mean"]) and r["mean"] >= 0 and r["sem"] >= 0 for r in rows)
    # the clean rows are velocity_norm's mean, whatever the chunking
    from jaxleak.priors import velocity_norm

    direct = velocity_norm(tiny_prior.params, TINY, sets["real"], 0.5)
    clean = next(r for r in rows if r["images"] == "real" and r["perturbation"] == "none"
                 and r["t"] == 0.5)
    assert clean["mean"] == pytest.approx(float(np.mean(direct)), rel=1e-5)
    # same seed, same noise
    assert velocity_table(tiny_prior, sets, ts=ts, noise_stds=stds, seed=0, batch_size=2) == rows
    table = format_velocity_table(rows)
    assert "gaussian 0.05" in table and "uniform noise" in table and "t=0.9" in table


def test_velocity_table_refuses_wrong_shapes(tiny_prior):
    with pytest.raises(ValueError, match="for this prior"):
        velocity_table(tiny_prior, {"big": np.zeros((2, 32, 32, 3), np.float32)})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        velocity_table(tiny_prior, {"neg": np.full((2, 16, 16, 3), -1.0, np.float32)})
    with pytest.raises(ValueError, match="at least one"):
        velocity_table(tiny_prior, {})


def test_doctests():
    result = doctest.testmod(quality, extraglobs={"np": np, "jax": jax})
    assert result.failed == 0 and result.attempted > 0
