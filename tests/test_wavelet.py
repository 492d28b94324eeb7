"""The JAX 2-D DWT against PyWavelets, coefficient for coefficient."""

import functools
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt

from jaxleak.attacks.wavelet import dwt2, idwt2, max_level, wavedec2, waverec2

SHAPES = [(8, 8), (7, 9), (64, 64), (28, 28), (2, 3), (16, 5)]
WAVELETS = ["db4", "haar", "db2", "sym4"]


def _pywt_wavedec2(x, wavelet, level):
    with warnings.catch_warnings():  # pywt warns when level exceeds its max level
        warnings.simplefilter("ignore", UserWarning)
        return pywt.wavedec2(x, wavelet, level=level, mode="symmetric")


def _flatten(coeffs):
    out = [np.asarray(coeffs[0])]
    for bands in coeffs[1:]:
        assert len(bands) == 3
        out.extend(np.asarray(b) for b in bands)
    return out


def _assert_coeffs_close(got, ref, scale):
    got, ref = _flatten(got), _flatten(ref)
    assert [g.shape for g in got] == [r.shape for r in ref]
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * scale)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _analysis_synthesis(x, wavelet, level):
    coeffs = wavedec2(x, wavelet, level=level)
    return coeffs, waverec2(coeffs, wavelet)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("wavelet", WAVELETS)
def test_wavedec2_and_waverec2_match_pywt(shape, wavelet):
    rng = np.random.default_rng(zlib.crc32(f"{shape}{wavelet}".encode()))
    x = rng.standard_normal(shape)
    scale = np.abs(x).max()
    # The deepest level also checks every shallower one (its list holds all their details);
    # on tiny inputs it exceeds pywt's max level, where every coefficient is a boundary one.
    level = max(2, max_level(*shape, wavelet))
    ref = _pywt_wavedec2(x, wavelet, level)
    got, rec = _analysis_synthesis(jnp.asarray(x, jnp.float32), wavelet, level)
    _assert_coeffs_close(got, ref, scale)
    rec_ref = pywt.waverec2(ref, wavelet, mode="symmetric")
    rec = np.asarray(rec)
    assert rec.shape == rec_ref.shape
    np.testing.assert_allclose(rec, rec_ref, rtol=0, atol=1e-5 * scale)
    # Perfect reconstruction after cropping (the result can be 1 larger on odd sides).
    np.testing.assert_allclose(rec[: shape[0], : shape[1]], x, rtol=0, atol=1e-5 * scale)


def test_output_sizes_follow_pywt_formula():
    x = jnp.zeros((13, 30))
    ca, (ch, cv, cd) = dwt2(x, "db4")
    expect = ((13 + 7) // 2, (30 + 7) // 2)
    assert ca.shape == ch.shape == cv.shape == cd.shape == expect
    assert idwt2((ca, (ch, cv, cd)), "db4").shape == (2 * expect[0] - 6, 2 * expect[1] - 6)


def test_band_order_is_horizontal_vertical_diagonal():
    # A signal varying only along axis 0 has energy only in bands that are high-pass along axis 0.
    x = jnp.tile(jnp.asarray([1.0, -1.0] * 4)[:, None], (1, 8))
    _, (ch, cv, cd) = dwt2(x, "haar")
    _, (rh, rv, rd) = pywt.dwt2(np.asarray(x), "haar")
    for got, ref in ((ch, rh), (cv, rv), (cd, rd)):
        np.testing.assert_allclose(got, ref, atol=1e-6)
    assert float(jnp.abs(ch).max()) > 1.0
    assert float(jnp.abs(cv).max()) < 1e-6 and float(jnp.abs(cd).max()) < 1e-6


def test_default_level_is_max_level():
    x = np.random.default_rng(1).standard_normal((64, 40))
    got = wavedec2(jnp.asarray(x, jnp.float32), "db2")
    ref = pywt.wavedec2(x, "db2")
    assert len(got) == len(ref) == max_level(64, 40, "db2") + 1
    _assert_coeffs_close(got, ref, np.abs(x).max())


def test_level_zero_is_identity():
    x = jnp.arange(12.0).reshape(3, 4)
    coeffs = wavedec2(x, "db4", level=0)
    assert len(coeffs) == 1
    np.testing.assert_array_equal(coeffs[0], x)
    np.testing.assert_array_equal(waverec2(coeffs, "db4"), x)


@pytest.mark.parametrize(
    "h,w,wavelet",
    [
        (64, 64, "db4"),
        (28, 28, "db4"),
        (8, 8, "db4"),
        (4, 4, "db4"),
        (7, 100, "haar"),
        (1, 1, "db2"),
    ],
)
def test_max_level_matches_pywt(h, w, wavelet):
    assert max_level(h, w, wavelet) == pywt.dwt_max_level(min(h, w), pywt.Wavelet(wavelet).dec_len)


def test_jit_and_vmap_agree_with_eager_and_leading_axes():
    x = jax.random.normal(jax.random.key(0), (3, 20, 17))

    def roundtrip(m):
        return waverec2(wavedec2(m, "db4", level=2), "db4")[:20, :17]

    eager = [wavedec2(m, "db4", level=2) for m in x]
    batched = jax.jit(jax.vmap(lambda m: wavedec2(m, "db4", level=2)))(x)
    stacked = wavedec2(x, "db4", level=2)  # leading axes carried along
    for i in range(3):
        for got in (
            jax.tree.map(lambda a, i=i: a[i], batched),
            jax.tree.map(lambda a, i=i: a[i], stacked),
        ):
            for g, e in zip(_flatten(got), _flatten(eager[i])):
                np.testing.assert_allclose(g, e, rtol=0, atol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.vmap(roundtrip))(x), x, rtol=0, atol=1e-5)


def test_gradient_flows_through_transform():
    # Analysis followed by synthesis is the identity on the cropped signal, so its VJP is too.
    x = jax.random.normal(jax.random.key(1), (12, 12))
    g = jax.grad(lambda m: jnp.sum(waverec2(wavedec2(m, "sym4", level=1), "sym4")[:12, :12] * x))(x)
    np.testing.assert_allclose(g, x, rtol=0, atol=1e-5)


def test_rejects_bad_arguments():
    x = jnp.zeros((8, 8))
    with pytest.raises(ValueError, match="mode"):
        wavedec2(x, "db4", level=1, mode="periodization")
    with pytest.raises(ValueError, match="wavelet"):
        wavedec2(x, "nope", level=1)
    with pytest.raises(ValueError, match="level"):
        wavedec2(x, "db4", level=-1)
    with pytest.raises(ValueError, match="2 axes"):
        wavedec2(jnp.zeros(8), "db4", level=1)
    with pytest.raises(ValueError, match="one shape"):
        idwt2(
            (jnp.zeros((4, 4)), (jnp.zeros((4, 4)), jnp.zeros((4, 5)), jnp.zeros((4, 4)))), "haar"
        )
