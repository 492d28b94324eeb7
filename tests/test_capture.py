"""Capture: per-example gradients, determinism, the capture file format."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak.capture import (
    capture_updates,
    load_capture,
    per_example_grads,
    save_capture,
)
from jaxleak.models import get_victim
from jaxleak.privacy import DPConfig


@pytest.fixture(scope="module")
def victim():
    return get_victim("lenet-venom", image_shape=(8, 8, 1), num_classes=4)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.random((6, 8, 8, 1)).astype(np.float32), np.array([0, 1, 2, 3, 0, 1])


@pytest.fixture(scope="module")
def variables(victim):
    return victim.init(jax.random.PRNGKey(0))


def test_per_example_grads_equal_a_loop_of_single_gradients(victim, variables, data):
    x, y = data
    batched = jax.jit(lambda v, a, b: per_example_grads(victim, v, a, b))(variables, x, y)
    for i in range(len(x)):
        single = jax.grad(victim.loss)(variables["params"], None, x[i], y[i])
        for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(batched)):
            np.testing.assert_allclose(np.asarray(b[i]), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_noise_free_capture_is_the_head_gradient_with_outer_product_structure(victim, variables, data):
    x, y = data
    cap = capture_updates(victim, variables, x, y, dp=DPConfig(calibration="none"))
    feats = np.asarray(victim.layer_input(variables, jnp.asarray(cap.images_float()), layer="head"))
    # row j of the class-major weight gradient is gb_j * features
    np.testing.assert_allclose(cap.fc_weight_grad, cap.fc_bias_grad[:, :, None] * feats[:, None, :],
                               rtol=1e-4, atol=1e-7)
    assert cap.fc_weight_grad.shape == (6, 4, 2 * 2 * 16)
    assert cap.meta["feature_shape"] == [2, 2, 16] and cap.meta["noise_std"] == 0.0


def test_same_seed_same_bits_independent_of_chunking(victim, variables, data):
    x, y = data
    dp = DPConfig(calibration="dpsgd", epsilon=5.0)
    a = capture_updates(victim, variables, x, y, dp=dp, seed=7, chunk_size=4)
    b = capture_updates(victim, variables, x, y, dp=dp, seed=7, chunk_size=6)
    c = capture_updates(victim, variables, x, y, dp=dp, seed=8, chunk_size=4)
    # The noise is drawn per client, so the chunk size changes nothing but XLA's vectorisation of the
    # gradient math: equal up to float rounding (bit-identical on some CPUs, 1 ulp apart on others).
    np.testing.assert_allclose(a.fc_weight_grad, b.fc_weight_grad, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.fc_bias_grad, b.fc_bias_grad, rtol=1e-6, atol=1e-7)
    assert np.max(np.abs(a.fc_weight_grad - c.fc_weight_grad)) > 1e-3  # another seed: other noise


def test_paper_capture_is_clipped_head_plus_noise(victim, variables, data):
    x, y = data
    clean = capture_updates(victim, variables, x, y, dp=DPConfig(calibration="none"))
    dp = DPConfig(calibration="paper", epsilon=1.0, clip=1e-3)
    noisy = capture_updates(victim, variables, x, y, dp=dp, seed=1)
    norms = np.sqrt((clean.fc_weight_grad**2).sum((1, 2)) + (clean.fc_bias_grad**2).sum(1))
    factor = np.minimum(1.0, 1e-3 / norms)
    resid = noisy.fc_weight_grad - clean.fc_weight_grad * factor[:, None, None]
    assert abs(resid.std() - noisy.meta["noise_std"]) < 0.05 * noisy.meta["noise_std"]


def test_client_batches(victim, variables, data):
    x, y = data
    cap = capture_updates(victim, variables, x, y, dp=DPConfig(calibration="none"), batch_size=3)
    assert cap.fc_weight_grad.shape[0] == 2 and cap.labels.shape == (2, 3)
    assert cap.images.shape == (2, 3, 8, 8, 1)
    single = capture_updates(victim, variables, x, y, dp=DPConfig(calibration="none"))
    np.testing.assert_allclose(cap.fc_weight_grad[0], single.fc_weight_grad[:3].mean(0), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("bad", [
    {"n": 5},  # not a multiple of batch_size 2
    {"layer": "first"},
    {"labels": np.array([0, 1, 2, 3, 0, 9])},
])
def test_capture_rejects_bad_arguments(victim, variables, data, bad):
    x, y = data
    kw = {"dp": DPConfig(calibration="none"), "batch_size": 2 if "n" in bad else 1, "layer": bad.get("layer", "head")}
    xs = x[: bad.get("n", 6)]
    ys = bad.get("labels", y)[: bad.get("n", 6)]
    with pytest.raises(ValueError):
        capture_updates(victim, variables, xs, ys, **kw)


@pytest.fixture()
def saved(tmp_path, victim, variables, data):
    x, y = data
    cap = capture_updates(victim, variables, x, y, dp=DPConfig(epsilon=5.0), keep_update=True,
                          keep_params=True, meta={"dataset": "random"})
    path = tmp_path / "caps.npz"
    save_capture(path, cap)
    return path, cap


def test_round_trip_and_plain_numpy_readable(saved):
    path, cap = saved
    back = load_capture(path)
    for k in ("fc_weight_grad", "fc_bias_grad", "labels", "images", "schedule"):
        assert np.array_equal(getattr(back, k), getattr(cap, k))
    assert back.meta["epsilon"] == 5.0 and back.meta["dataset"] == "random"
    assert set(back.update) == set(cap.update) and set(back.params) == set(cap.params)
    with np.load(path, allow_pickle=False) as raw:  # any tool can read it without pickle
        assert raw["update/head/kernel"].dtype == np.float32 and raw["truth/images"].dtype == np.uint8
        assert "fc_weight_grad" not in raw.files  # the head view is derived, never stored twice
        meta = json.loads(str(raw["meta"]))
        assert meta["format_version"] == 2 and meta["calibration"] == "paper"
        assert meta["defenses"][0]["name"] == "dp-paper" and meta["protocol"]["kind"] == "fedsgd"


def test_fedavg_capture_is_the_one_client_function_under_the_chain(victim, variables, data, tmp_path):
    from jaxleak.defenses import chain, clip_value, gaussian
    from jaxleak.protocols import Protocol, client_update

    x, y = data
    protocol = Protocol(kind="fedavg", local_epochs=2, local_batch=2, optimizer="sgd", lr=0.05)
    defenses = chain(clip_value(0.01), gaussian(0.001))
    cap = capture_updates(victim, variables, x, y, protocol=protocol, defenses=defenses, samples=3, seed=4,
                          keep_update=True, keep_params=True, chunk_size=1)
    assert cap.n == 2 and cap.schedule.shape == (2, 2, 2, 2) and cap.labels.shape == (2, 3)
    key = jax.random.fold_in(jax.random.PRNGKey(4), 1)
    xq = cap.images_float()[1]
    one = client_update(victim, variables, jnp.asarray(xq), jnp.asarray(y[3:]), key, protocol=protocol,
                        defenses=defenses)
    np.testing.assert_allclose(cap.update["head/kernel"][1], np.asarray(one.update["head"]["kernel"]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cap.schedule[1], np.asarray(one.schedule))
    assert [d["name"] for d in cap.meta["defenses"]] == ["clip-value", "gaussian"]
    assert cap.meta["protocol"]["optimizer"] == "sgd" and cap.meta["protocol"]["local_steps"] == 2
    save_capture(tmp_path / "fedavg.npz", cap)
    back = load_capture(tmp_path / "fedavg.npz")
    np.testing.assert_array_equal(back.schedule, cap.schedule)


def test_non_finite_client_is_an_error_naming_it(victim, variables, data):
    x, y = data
    bad = x.copy()
    bad[4, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="image 4"):
        capture_updates(victim, variables, bad, y)
    # A NaN weight poisons every client; today's clip would pass it through unclipped.
    poisoned = jax.tree_util.tree_map(lambda a: a, variables)
    poisoned["params"]["head"]["bias"] = poisoned["params"]["head"]["bias"].at[0].set(jnp.nan)
    for dp in (DPConfig(calibration="none"), DPConfig(calibration="paper", epsilon=5.0)):
        with pytest.raises(ValueError, match="client 0 "):
            capture_updates(victim, poisoned, x, y, dp=dp, chunk_size=4)


def test_conv_impl_changes_speed_not_results(victim, variables, data):
    from jaxleak.capture import capture_conv_impl

    x, y = data
    dp = DPConfig(calibration="dpsgd", epsilon=5.0)
    a = capture_updates(victim, variables, x, y, dp=dp, seed=2, conv_impl="xla")
    b = capture_updates(victim, variables, x, y, dp=dp, seed=2, conv_impl="patches")
    np.testing.assert_allclose(a.fc_weight_grad, b.fc_weight_grad, rtol=1e-4, atol=1e-6)
    expected = "xla" if jax.default_backend() == "cpu" else "patches"
    assert capture_conv_impl(victim, "dpsgd") == expected
    assert capture_conv_impl(victim, "paper") == "xla"
    mlp = get_victim("mlp", image_shape=(8, 8, 1), num_classes=4, hidden=8)
    assert capture_conv_impl(mlp, "dpsgd") == "xla"
    with pytest.raises(ValueError, match="patches"):
        capture_updates(mlp, mlp.init(jax.random.PRNGKey(0)), x, y, dp=dp, conv_impl="patches")
