"""Venom's on-the-fly training triplets (Algorithm 1)."""

import jax
import numpy as np
import pytest

from jaxleak.attacks.spe import SPEConfig
from jaxleak.attacks.venom.triplets import TripletConfig, make_triplet_fn, make_triplets
from jaxleak.models import get_victim


@pytest.fixture(scope="module")
def setup():
    victim = get_victim("lenet-venom", image_shape=(64, 64, 1), num_classes=10)
    variables = victim.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    # smooth images so the head's input map is smooth too
    base = rng.random((48, 8, 8, 1)).astype(np.float32)
    images = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)
    labels = rng.integers(0, 10, 48)
    return victim, variables, images, labels


def test_noise_free_triplets_carry_the_true_head_features(setup):
    victim, variables, images, labels = setup
    trip = make_triplets(victim, variables, images[:8], labels[:8], jax.random.PRNGKey(1),
                         config=TripletConfig(calibration="none"), spe_config=SPEConfig(refine=False))
    true = np.asarray(victim.layer_input(variables, images[:8])).reshape(8, 16, 16, 16)
    np.testing.assert_allclose(np.asarray(trip.features), true, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(trip.images), images[:8])
    assert trip.noise_strength.shape == (8,)


def test_epsilons_are_drawn_from_the_set_and_more_noise_means_larger_t(setup):
    victim, variables, images, labels = setup
    config = TripletConfig(calibration="paper", epsilons=(0.1, 100.0))
    trip = make_triplets(victim, variables, images, labels, jax.random.PRNGKey(2), config=config)
    eps = np.asarray(trip.epsilon)
    assert set(np.round(eps.astype(np.float64), 3).tolist()) == {0.1, 100.0}
    t = np.asarray(trip.noise_strength)
    assert t[eps < 1].mean() > t[eps > 1].mean()
    again = make_triplets(victim, variables, images, labels, jax.random.PRNGKey(2), config=config)
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(trip.features))


def test_dpsgd_and_estimated_sigma_run_and_bad_inputs_are_rejected(setup):
    victim, variables, images, labels = setup
    config = TripletConfig(calibration="dpsgd", epsilons=(8.0,), sigma2="estimate")
    trip = make_triplets(victim, variables, images[:4], labels[:4], jax.random.PRNGKey(3), config=config)
    assert np.all(np.isfinite(np.asarray(trip.features)))
    with pytest.raises(ValueError):
        TripletConfig(sigma2="oracle")
    with pytest.raises(ValueError):
        TripletConfig(calibration="dpsgd", mechanism="laplace")
    with pytest.raises(ValueError, match="images"):
        make_triplets(victim, variables, images[:4, :32], labels[:4], jax.random.PRNGKey(0))


def test_chunked_triplets_draw_the_same_noise_as_one_call(setup):
    """Image i uses fold_in(key, i) whatever the chunk size; floats agree to float32 rounding."""
    victim, variables, images, labels = setup
    config = TripletConfig(calibration="paper", epsilons=(0.1, 100.0))
    key = jax.random.PRNGKey(4)
    whole = make_triplets(victim, variables, images[:7], labels[:7], key, config=config)
    direct = make_triplet_fn(victim, config, SPEConfig())(variables, images[:7], labels[:7], key)
    for a, b in zip(whole, direct, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    chunked = make_triplets(victim, variables, images[:7], labels[:7], key, config=config,
                            chunk_size=3)  # 3 + 3 + padded 1
    assert isinstance(chunked.features, np.ndarray) and chunked.features.shape[0] == 7
    np.testing.assert_array_equal(chunked.epsilon, np.asarray(whole.epsilon))  # same draws
    np.testing.assert_array_equal(chunked.images, images[:7])
    scale = np.abs(np.asarray(whole.features)).max()
    np.testing.assert_allclose(chunked.features, np.asarray(whole.features), rtol=0,
                               atol=1e-5 * scale)
    np.testing.assert_allclose(chunked.noise_strength, np.asarray(whole.noise_strength),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        make_triplets(victim, variables, images[:4], labels[:4], key, chunk_size=0)
