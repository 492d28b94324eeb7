"""Capture: per-example gradients, determinism, the capture file format."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak.capture import (
    CaptureFormatError,
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
    for k in ("fc_weight_grad", "fc_bias_grad", "labels", "images"):
        assert np.array_equal(getattr(back, k), getattr(cap, k))
    assert back.meta["epsilon"] == 5.0 and back.meta["dataset"] == "random"
    assert set(back.update) == set(cap.update) and set(back.params) == set(cap.params)
    with np.load(path, allow_pickle=False) as raw:  # any tool can read it without pickle
        assert raw["fc_weight_grad"].dtype == np.float32 and raw["images"].dtype == np.uint8
        meta = json.loads(str(raw["meta"]))
        assert meta["feature_layout"] == "HWC" and meta["calibration"] == "paper"


def _rewrite(path, out, **changes):
    with np.load(path, allow_pickle=False) as raw:
        arrays = {k: raw[k] for k in raw.files}
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    np.savez(out, **arrays)
    return out


@pytest.mark.parametrize("change,message", [
    ({"fc_weight_grad": None}, "missing required key"),
    ({"fc_bias_grad": np.zeros((6, 3), np.float32)}, "fc_bias_grad must be"),
    ({"fc_weight_grad": np.zeros((6, 4, 10), np.float32)}, "feature_shape"),
    ({"labels": np.array([0, 1, 2, 3, 0, 7])}, "labels must be in"),
    ({"labels": np.zeros(6, np.float32)}, "labels must be integers"),
    ({"images": np.zeros((6, 8, 8, 1), np.float32)}, "images must be uint8"),
    ({"images": np.zeros((6, 9, 8, 1), np.uint8)}, "images must have shape"),
    ({"meta": np.array("{not json")}, "not valid JSON"),
    ({"meta": np.array(json.dumps({"model": "x"}))}, "missing field"),
])
def test_malformed_files_are_rejected_with_a_precise_message(saved, tmp_path, change, message):
    path, _ = saved
    bad = _rewrite(path, tmp_path / "bad.npz", **change)
    with pytest.raises(CaptureFormatError, match=message):
        load_capture(bad)


def test_non_finite_and_pickled_and_garbage_files_are_rejected(saved, tmp_path):
    path, cap = saved
    gw = cap.fc_weight_grad.copy()
    gw[2, 1, 3] = np.nan
    with pytest.raises(CaptureFormatError, match="non-finite"):
        load_capture(_rewrite(path, tmp_path / "nan.npz", fc_weight_grad=gw))
    with np.load(path, allow_pickle=False) as raw:
        arrays = {k: raw[k] for k in raw.files}
    arrays["labels"] = np.array([{"evil": 1}] * 6, dtype=object)
    np.savez(tmp_path / "pickled.npz", **arrays)
    with pytest.raises(CaptureFormatError, match="pickled"):
        load_capture(tmp_path / "pickled.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(CaptureFormatError, match="not a readable"):
        load_capture(tmp_path / "garbage.npz")
    with pytest.raises(FileNotFoundError):
        load_capture(tmp_path / "absent.npz")
    assert not os.path.exists(tmp_path / "absent.npz")


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
