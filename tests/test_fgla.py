"""FGLA's feature extraction (offset-corrected label row) and its use in training triplets."""

import jax
import numpy as np
import pytest

from jaxleak.attacks.fgla import fgla_batch, fgla_features, infer_label
from jaxleak.attacks.venom.triplets import TripletConfig, make_triplets
from jaxleak.capture.simulate import per_example_grads
from jaxleak.models import get_victim


@pytest.fixture(scope="module")
def lenet():
    victim = get_victim("lenet-venom", image_shape=(16, 16, 1), num_classes=10)
    variables = victim.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    images = rng.random((6, 16, 16, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 6).astype(np.int32)
    grads = per_example_grads(victim, variables, images, labels)
    head = victim.layers["head"].select(grads)
    gw = np.asarray(head["kernel"]).transpose(0, 2, 1)  # [N, K, d]
    gb = np.asarray(head["bias"])
    return victim, variables, images, labels, gw, gb


def test_noise_free_features_equal_the_head_input_and_labels_are_inferred(lenet):
    victim, variables, images, labels, gw, gb = lenet
    out = fgla_batch(gw, gb, feature_shape=victim.layers["head"].feature_shape)
    true = np.asarray(victim.layer_input(variables, images)).reshape(out.features.shape)
    np.testing.assert_allclose(out.features, true, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.labels, labels)
    assert out.label_inferred.all()


def test_given_labels_are_used_and_chunking_does_not_change_results(lenet):
    victim, _, _, labels, gw, gb = lenet
    fshape = victim.layers["head"].feature_shape
    wrong = (labels + 1) % 10
    given = fgla_batch(gw, gb, feature_shape=fshape, labels=wrong)
    np.testing.assert_array_equal(given.labels, wrong)
    assert not given.label_inferred.any()
    whole = fgla_batch(gw, gb, feature_shape=fshape)
    chunked = fgla_batch(gw, gb, feature_shape=fshape, chunk_size=4)  # 4 + padded 2
    np.testing.assert_array_equal(whole.features, chunked.features)
    # noise-free, every row is proportional to x; under noise the label row (largest |gb|) is the clean one
    noise = np.random.default_rng(2).normal(scale=1e-3, size=gw.shape).astype(np.float32)
    true_rows = fgla_batch(gw + noise, gb, feature_shape=fshape, labels=labels).features
    wrong_rows = fgla_batch(gw + noise, gb, feature_shape=fshape, labels=wrong).features
    err = lambda f: np.linalg.norm((f - whole.features).reshape(6, -1), axis=1)
    assert np.all(err(true_rows) < err(wrong_rows))


def test_offset_removes_what_every_row_shares():
    # rows = delta_j * x + c (a common additive term): the offset cancels c exactly
    rng = np.random.default_rng(1)
    x, c = rng.normal(size=20).astype(np.float32), rng.normal(size=20).astype(np.float32)
    delta = np.array([0.1, -0.7, 0.3, 0.3], np.float32)
    gw = np.outer(delta, x) + c
    gb = delta + 0.05
    got = np.asarray(fgla_features(gw, gb, infer_label(gb)))
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)
    # an all-zero update gives zeros, not NaN
    assert np.all(np.asarray(fgla_features(np.zeros((4, 3), np.float32), np.zeros(4, np.float32), 0)) == 0)


def test_bad_inputs_are_rejected(lenet):
    victim, _, _, _, gw, gb = lenet
    fshape = victim.layers["head"].feature_shape
    with pytest.raises(ValueError, match="feature_shape"):
        fgla_batch(gw, gb, feature_shape=(3, 3, 3))
    with pytest.raises(ValueError, match="labels"):
        fgla_batch(gw, gb, feature_shape=fshape, labels=np.full(6, 10))
    with pytest.raises(ValueError, match="finite"):
        fgla_batch(np.where(gw == gw.max(), np.nan, gw), gb, feature_shape=fshape)
    with pytest.raises(ValueError, match=r"\[N, K, d\]"):
        fgla_batch(gw[0], gb, feature_shape=fshape)


def test_fgla_triplets_carry_label_row_features_and_zero_t(lenet):
    victim, variables, images, labels, _, _ = lenet
    config = TripletConfig(calibration="none", features="fgla")
    trip = make_triplets(victim, variables, images, labels, jax.random.PRNGKey(1), config=config)
    true = np.asarray(victim.layer_input(variables, images)).reshape(trip.features.shape)
    np.testing.assert_allclose(np.asarray(trip.features), true, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(trip.noise_strength) == 0)
    noisy = make_triplets(victim, variables, images, labels, jax.random.PRNGKey(1),
                          config=TripletConfig(calibration="paper", epsilons=(1.0,), features="fgla"))
    assert np.all(np.isfinite(np.asarray(noisy.features)))
    with pytest.raises(ValueError, match="features"):
        TripletConfig(features="oracle")
