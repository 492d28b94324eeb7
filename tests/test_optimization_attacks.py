"""Optimisation attacks: recovery from noise-free gradients, vmap = per target, labels, null control."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import metrics
from jaxleak.attacks import optimization as O
from jaxleak.capture import capture_updates
from jaxleak.models import get_victim
from jaxleak.privacy import DPConfig

K = 4


@pytest.fixture(scope="module")
def tiny():
    """DLG's sigmoid LeNet on 8x8 grey images, two targets with their noise-free FedSGD updates."""
    victim = get_victim("lenet-dlg", image_shape=(8, 8, 1), num_classes=K)
    variables = victim.init(jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (3, 1, 8, 8, 1))
    labels = jnp.array([[2], [1], [3]])
    grad = lambda x, y: O.dummy_gradient(victim, variables, x, jax.nn.one_hot(y, K))
    updates = jax.vmap(grad)(images, labels)
    return victim, variables, np.asarray(images), np.asarray(labels), updates


def _psnr(result, images):
    return np.asarray(metrics.psnr(jnp.clip(result.images[:, 0], 0, 1), images[:, 0]))


@pytest.mark.parametrize("attack,config,min_psnr", [
    ("dlg", O.DLGConfig(iterations=50), 30.0),
    ("idlg", O.idlg_config(iterations=50), 40.0),
    ("ig", O.IGConfig(iterations=300), 40.0),
    ("gradinversion", O.GradInversionConfig(iterations=300, matching_scale=1.0, group_size=2), 35.0),
    ("grnn", O.GRNNConfig(iterations=300, learning_rate=1e-3), 18.0),
])
def test_attack_recovers_single_image_from_noise_free_gradient(tiny, attack, config, min_psnr):
    victim, variables, images, labels, updates = tiny
    one = jax.tree_util.tree_map(lambda a: a[:1], updates)
    res = O.reconstruct(attack, victim, variables, one, config=config, true_labels=labels[:1], chunk=50)
    assert res.images.shape == (1, 1, 8, 8, 1) and res.label_probs.shape == (1, 1, K)
    assert _psnr(res, images[:1])[0] > min_psnr
    assert res.label_probs.argmax(-1)[0, 0] == labels[0, 0]
    assert 0 <= res.best_iteration[0] < config.iterations
    assert res.seconds_total > 0 and res.seconds_per_iteration > 0


@pytest.mark.slow  # CI budget: 50 s; the sharded-blocks test checks the same equality
def test_vmapped_attack_equals_per_target_attack(tiny):
    victim, variables, _, labels, updates = tiny
    config = O.IGConfig(iterations=20, restarts=2)
    together = O.reconstruct("ig", victim, variables, updates, config=config, true_labels=labels,
                             chunk=10, target_batch=3)
    alone = O.reconstruct("ig", victim, variables, updates, config=config, true_labels=labels,
                          chunk=20, target_batch=1)
    padded = O.reconstruct("ig", victim, variables, updates, config=config, true_labels=labels,
                           chunk=20, target_batch=2)  # last block padded
    mapped = O.reconstruct("ig", victim, variables, updates, config=config, true_labels=labels,
                           chunk=10, target_batch=3, batching="map")
    unrolled = O.reconstruct("ig", victim, variables, updates, config=config, true_labels=labels,
                             chunk=5, target_batch=3, unroll=5)
    for other in (alone, padded, mapped, unrolled):
        chex.assert_trees_all_close(together.images, other.images, atol=1e-5)
        chex.assert_trees_all_close(together.restart_loss, other.restart_loss, atol=1e-6)
    assert together.restart_loss.shape == (3, 2)


_SHARDED = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jaxleak.attacks import optimization as O
from jaxleak.models import get_victim
assert jax.local_device_count() == 2
victim = get_victim("lenet-dlg", image_shape=(8, 8, 1), num_classes=4)
variables = victim.init(jax.random.key(0))
images = jax.random.uniform(jax.random.key(1), (3, 1, 8, 8, 1))
labels = jnp.array([[2], [1], [3]])
updates = jax.vmap(lambda x, y: O.dummy_gradient(victim, variables, x, jax.nn.one_hot(y, 4)))(images, labels)
config = O.IGConfig(iterations=10, restarts=1)
run = lambda devices: O.reconstruct("ig", victim, variables, updates, config=config, true_labels=labels,
                                    chunk=5, target_batch=3, devices=devices)
one, both = run(1), run(None)
print(json.dumps({"images": float(np.abs(one.images - both.images).max()),
                  "loss": float(np.abs(one.restart_loss - both.restart_loss).max()),
                  "shape": list(both.images.shape), "devices": [one.devices, both.devices]}))
"""


@pytest.mark.slow  # ~35 s of CI time on 2 cores (a subprocess with forced host devices); run with -m slow
def test_blocks_are_sharded_across_devices_with_the_same_results():
    """Two forced host devices share each vmapped block (3 targets padded to 4); results unchanged."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, check=False,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    diff = json.loads(out.stdout.strip().splitlines()[-1])
    assert diff["shape"] == [3, 1, 8, 8, 1] and diff["devices"] == [1, 2]
    assert diff["images"] < 1e-5 and diff["loss"] < 1e-6
    with pytest.raises(ValueError, match="devices"):
        O.RunOptions(iterations=1, devices=jax.local_device_count() + 1)


def test_driver_matches_an_unbatched_python_loop(tiny):
    victim, variables, _, labels, updates = tiny
    config = O.IGConfig(iterations=15)
    res = O.reconstruct("ig", victim, variables, updates, config=config, true_labels=labels, chunk=5,
                        conv_impl="xla")
    problem = O.make_ig(victim, config, 1)
    t = 1
    target = {"update": jax.tree_util.tree_map(lambda a: a[t], updates),
              "label_probs": jax.nn.one_hot(labels[t], K)}
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), t), 0)
    state = problem.init(key, target, variables)
    best, best_loss = None, np.inf
    step, candidate = jax.jit(problem.step), jax.jit(problem.candidate)
    for it in range(config.iterations):
        cand = candidate(state, variables)
        state, loss = step(state, target, variables, jnp.int32(it))
        if loss < best_loss:
            best, best_loss = cand, float(loss)
    np.testing.assert_allclose(res.images[t], best.images, atol=1e-5)
    np.testing.assert_allclose(res.loss[t], best_loss, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("model", ["convnet", pytest.param("resnet8", marks=pytest.mark.slow)])
def test_patches_and_xla_convolutions_give_the_same_attack_objective_and_gradient(model):
    """The attacks' double backward is the same under both convolution implementations."""
    victim = get_victim(model, image_shape=(12, 12, 1), num_classes=K, width=2)
    variables = victim.init(jax.random.key(0))
    x_true, x = jax.random.uniform(jax.random.key(1), (2, 1, 12, 12, 1))
    y = jax.nn.one_hot(jnp.array([3]), K)
    target = O.dummy_gradient(victim, variables, x_true, y)
    weights = O.layer_weights(variables["params"])

    def objective(impl):
        v = victim.with_conv_impl(impl)
        loss = lambda z: O.cosine_distance(O.dummy_gradient(v, variables, z, y), target, weights)
        return jax.jit(jax.value_and_grad(loss))(x)

    (la, ga), (lb, gb) = objective("xla"), objective("patches")
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    np.testing.assert_allclose(gb, ga, rtol=1e-3, atol=1e-3 * float(jnp.abs(ga).max()))
    assert O.attack_conv_impl(victim) == "patches" and O.attack_conv_impl(victim, "xla") == "xla"
    mlp = get_victim("mlp", image_shape=(4, 4, 1), num_classes=K, hidden=4)
    assert O.attack_conv_impl(mlp) == "xla"


def test_dlg_inner_steps_chain_lbfgs_updates_like_torch_max_iter(tiny):
    """One iteration of ``inner_steps=k`` = k consecutive fixed-step L-BFGS updates (torch's max_iter)."""
    victim, variables, _, labels, updates = tiny
    target = {"update": jax.tree_util.tree_map(lambda a: a[0], updates),
              "label_probs": jax.nn.one_hot(labels[0], K)}
    inner = O.make_dlg(victim, O.DLGConfig(iterations=2, inner_steps=3), 1)
    single = O.make_dlg(victim, O.DLGConfig(iterations=6, inner_steps=1), 1)
    key = jax.random.key(5)
    a, b = inner.init(key, target, variables), single.init(key, target, variables)
    a_losses, b_losses = [], []
    for it in range(2):
        a, loss = jax.jit(inner.step)(a, target, variables, jnp.int32(it))
        a_losses.append(float(loss))
    for it in range(6):
        b, loss = jax.jit(single.step)(b, target, variables, jnp.int32(it))
        b_losses.append(float(loss))
    chex.assert_trees_all_close(a["x"], b["x"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a_losses, b_losses[::3], rtol=1e-4)  # loss at the start of each iteration
    assert np.all(np.isfinite(b_losses))
    with pytest.raises(ValueError, match="inner_steps"):
        O.DLGConfig(inner_steps=0)


def test_early_stop_when_matching_loss_stops_improving(tiny):
    victim, variables, _, labels, updates = tiny
    one = jax.tree_util.tree_map(lambda a: a[:1], updates)
    res = O.reconstruct("idlg", victim, variables, one, config=O.idlg_config(iterations=400),
                        true_labels=labels[:1], chunk=20, patience=40, min_delta=0.5)
    assert res.iterations_run[0] < 400


@pytest.mark.parametrize("model,shape", [("lenet-venom", (16, 16, 3)), ("convnet", (12, 12, 1)),
                                         ("lenet-dlg", (8, 8, 3))])
def test_label_inference_exact_on_single_sample_fedsgd(model, shape):
    kw = {"width": 4} if model == "convnet" else {}
    victim = get_victim(model, image_shape=shape, num_classes=10, **kw)
    variables = victim.init(jax.random.key(3))
    rng = np.random.default_rng(0)
    images = rng.random((32, *shape), dtype=np.float32)
    labels = rng.integers(0, 10, 32)
    cap = capture_updates(victim, variables, images, labels, dp=DPConfig(calibration="none"))
    gw, gb = jnp.asarray(cap.fc_weight_grad), jnp.asarray(cap.fc_bias_grad)
    np.testing.assert_array_equal(jax.vmap(O.infer_label)(gw, gb), labels)
    np.testing.assert_array_equal(jax.vmap(lambda w, b: O.infer_labels(w, b, 1))(gw, gb)[:, 0], labels)
    if model != "convnet":  # non-negative features (sigmoid / ReLU + pool): weight rows alone suffice
        np.testing.assert_array_equal(jax.vmap(O.infer_label)(gw), labels)


def test_batch_label_counts():
    # Mean bias gradient of a batch whose predictions are uniform: 1/K - counts / B.
    counts = jnp.array([2, 0, 1, 0, 1])
    g = 1 / 5 - counts / 4
    np.testing.assert_array_equal(O.infer_label_counts(jnp.zeros((5, 3)), g, 4), counts)
    np.testing.assert_array_equal(O.labels_from_counts(counts, 4), [0, 0, 2, 4])
    # On a real untrained model's FedSGD batch gradient.
    victim = get_victim("lenet-dlg", image_shape=(8, 8, 3), num_classes=10)
    variables = victim.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    labels = np.array([1, 1, 4, 7])
    cap = capture_updates(victim, variables, rng.random((4, 8, 8, 3), dtype=np.float32), labels,
                          dp=DPConfig(calibration="none"), batch_size=4)
    got = O.infer_label_counts(jnp.asarray(cap.fc_weight_grad[0]), jnp.asarray(cap.fc_bias_grad[0]), 4)
    np.testing.assert_array_equal(got, np.bincount(labels, minlength=10))


def test_null_control_scores_near_the_prior_not_the_truth(tiny):
    victim, variables, images, labels, updates = tiny
    config = O.IGConfig(iterations=200)
    real = _psnr(O.reconstruct("ig", victim, variables, updates, config=config, true_labels=labels), images)
    gray = np.asarray(metrics.psnr(jnp.full_like(images[:, 0], 0.5), images[:, 0]))
    for kind in ("shuffle", "noise"):
        null = O.null_updates(updates, kind=kind)
        score = _psnr(O.reconstruct("ig", victim, variables, null, config=config, true_labels=labels), images)
        assert np.all(real > 35) and np.all(score < gray + 5), (kind, real, score, gray)


def test_distances_and_layer_weights():
    params = {"conv": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones(3), "bias": jnp.ones(1)}}
    w = O.layer_weights(params, layers=("head/kernel",), weights=(2.0,))
    assert w == {"conv": {"kernel": 0.0}, "head": {"kernel": 2.0, "bias": 0.0}}
    other = jax.tree_util.tree_map(lambda a: -a, params)
    assert float(O.l2_distance(params, other, w)) == pytest.approx(2 * 4 * 3)
    assert float(O.cosine_distance(params, other, w)) == pytest.approx(2.0)
    everything = O.layer_weights(params)
    assert float(O.cosine_distance(params, params, everything)) == pytest.approx(0.0, abs=1e-6)
    mixed = {"conv": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": -jnp.ones(3), "bias": jnp.ones(1)}}
    assert float(O.cosine_distance(params, mixed, everything)) == pytest.approx(1 - 2 / 8)
    with pytest.raises(ValueError, match="matches no parameter"):
        O.layer_weights(params, layers=("nope",))
    with pytest.raises(ValueError, match="one value per"):
        O.layer_weights(params, layers=("conv",), weights=(1.0, 2.0))
    img = jnp.zeros((4, 4, 1)).at[:, 2:].set(1.0)
    assert float(O.total_variation(img)) == pytest.approx(1 / 3)


def test_batchnorm_prior_only_for_bn_models():
    victim = get_victim("convnet", image_shape=(9, 9, 1), num_classes=3, width=1)
    variables = victim.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (2, 9, 9, 1))
    value, grad = jax.jit(jax.value_and_grad(lambda im: O.batchnorm_prior(victim, variables, im)))(x)
    assert float(value) > 0 and np.all(np.isfinite(grad)) and float(jnp.abs(grad).sum()) > 0
    lenet = get_victim("lenet-dlg", image_shape=(8, 8, 1), num_classes=3)
    assert float(O.batchnorm_prior(lenet, lenet.init(jax.random.key(0)), x[:, :8, :8])) == 0.0


def test_hungarian_match_batch():
    rng = np.random.default_rng(0)
    truth = rng.random((5, 12, 12, 1)).astype(np.float32)
    perm = np.array([3, 0, 4, 1, 2])
    recon = truth[perm] + 0.01 * rng.standard_normal(truth.shape).astype(np.float32)
    for metric in ("psnr", "ssim", "mse"):
        got = O.match_batch(recon, truth, metric=metric)
        np.testing.assert_allclose(recon[got], recon[np.argsort(perm)])


def test_bad_inputs(tiny):
    victim, variables, _, labels, updates = tiny
    with pytest.raises(ValueError, match="unknown optimisation attack"):
        O.default_config("nope")
    with pytest.raises(ValueError, match="labels must be one of"):
        O.IGConfig(labels="joint")
    with pytest.raises(ValueError, match="iterations"):
        O.DLGConfig(iterations=0)
    broken = jax.tree_util.tree_map(lambda a: a, updates)
    del broken["head"]
    with pytest.raises(ValueError, match="no entry for parameter"):
        O.reconstruct("ig", victim, variables, broken, config=O.IGConfig(iterations=2), true_labels=labels)
    with pytest.raises(ValueError, match="needs the true labels"):
        O.reconstruct("ig", victim, variables, updates, config=O.IGConfig(iterations=2))
    with pytest.raises(ValueError, match="at least 2 targets"):
        O.null_updates(jax.tree_util.tree_map(lambda a: a[:1], updates))


def test_public_names_resolve():
    from jaxleak.attacks.optimization import mjolnir

    for module in (O, mjolnir):
        for name in module.__all__:
            assert hasattr(module, name), name
    assert len(set(O.__all__)) == len(O.__all__)
    for name in O.ATTACKS:
        assert O.default_config(name).iterations >= 1
