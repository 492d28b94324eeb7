"""DLF (jaxleak.attacks.fedavg.dlf): the replay, the priors, the epoch matching, a toy recovery."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak.attacks.fedavg.dlf import (
    DLFConfig,
    dlf_layer_weights,
    layer_order,
    make_dlf,
    match_epochs,
    order_kernel,
    order_prior,
    pixel_range_penalty,
    replay_protocol,
    simulated_update,
)
from jaxleak.attacks.optimization import RunOptions, run_problem
from jaxleak.capture.io import flatten_tree
from jaxleak.models import get_victim
from jaxleak.protocols import Protocol, local_update


def _mlp(shape=(4, 4, 1), hidden=6):
    return get_victim("mlp", image_shape=shape, num_classes=3, hidden=hidden)


def _in_schedule_order(x, schedule):
    """``[E, M, ...]``: epoch e's copy holds the true images in the order of ``schedule[e]``."""
    flat = np.asarray(schedule).reshape(schedule.shape[0], -1)
    return np.stack([x[row[row >= 0]] for row in flat])


@pytest.mark.parametrize(
    ("victim_name", "epochs", "batch", "optimizer"),
    [("mlp", 2, 1, "sgd"), ("mlp", 3, 2, "sgd"), ("mlp", 2, 2, "adam"),
     pytest.param("convnet-sme", 2, 2, "sgd", marks=pytest.mark.slow)],
)
def test_simulated_update_equals_capture_update(victim_name, epochs, batch, optimizer):
    if victim_name == "mlp":
        victim = _mlp()
    else:
        victim = get_victim("convnet-sme", image_shape=(8, 8, 3), num_classes=3, width=2)
        victim = victim.with_conv_impl("patches")
    w0 = victim.init(jax.random.key(0))
    m = 3  # B = 2 leaves a padded last batch
    x = np.asarray(jax.random.uniform(jax.random.key(1), (m, *victim.image_shape)))
    y = np.array([2, 0, 1])
    protocol = Protocol(kind="fedavg", local_epochs=epochs, local_batch=batch, optimizer=optimizer, lr=0.05)
    truth = jax.jit(lambda k: local_update(victim, w0, x, y, k, protocol=protocol))(jax.random.key(7))
    schedule = np.asarray(truth.schedule)
    assert not np.all(schedule == schedule[:1]), "the epochs should be shuffled differently"
    images = _in_schedule_order(x, schedule)
    probs = np.asarray(jax.nn.one_hot(_in_schedule_order(y, schedule), 3))
    sim = jax.jit(lambda a, p: simulated_update(victim, w0, a, p, protocol=protocol,
                                                eps_root=DLFConfig().eps_root))(images, probs)
    # Soft one-hot vs integer cross-entropy and Adam's eps_root differ only in rounding.
    for path, want in flatten_tree(truth.update).items():
        got = flatten_tree(sim)[path]
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale + 1e-9, err_msg=path)


def test_fedsgd_is_replayed_as_one_full_batch_sgd_step_of_lr_one():
    victim = _mlp()
    w0 = victim.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (3, 4, 4, 1))
    y = jnp.array([2, 0, 1])
    truth = local_update(victim, w0, x, y, jax.random.key(2), protocol=Protocol())
    sim = simulated_update(victim, w0, x[None], jax.nn.one_hot(y, 3)[None], protocol=replay_protocol(Protocol()))
    for path, want in flatten_tree(truth.update).items():
        np.testing.assert_allclose(flatten_tree(sim)[path], want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_precode_victim_is_replayed_along_its_mean_path_with_its_kl():
    """A PRECODE client's draws are unknown to the attacker: DLF's replay takes eps = 0 and keeps the KL."""
    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=5, precode=2)
    w0 = victim.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (3, 4, 4, 1))
    y = jnp.array([2, 0, 1])
    lr = 0.1
    protocol = Protocol(kind="fedavg", local_epochs=1, local_batch=1, optimizer="sgd", lr=lr)

    def mean_path_loss(params, image, label):  # written out: z = mu, plus beta * KL(q || N(0, I)) / ln 2
        logits = victim.apply({"params": params}, image[None])  # no key: the deterministic mode
        ce = -jax.nn.log_softmax(logits[0])[label]
        enc = params["precode"]["encoder"]
        h = victim.layer_input({"params": params}, image[None], layer="precode")[0]  # the encoder's input
        stats = h @ enc["kernel"] + enc["bias"]
        mu, std = stats[:2], jax.nn.softplus(stats[2:])
        kl = 0.5 * jnp.sum(mu**2 + std**2 - 1.0 - 2.0 * jnp.log(std))
        return ce + victim.precode_beta * kl / math.log(2.0)

    params = w0["params"]
    for t in range(3):  # slot order: step t takes image t
        grad = jax.grad(mean_path_loss)(params, x[t], y[t])
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grad)
    want = jax.tree_util.tree_map(jnp.subtract, w0["params"], params)
    sim = simulated_update(victim, w0, x[None], jax.nn.one_hot(y, 3)[None], protocol=protocol)
    for path, w in flatten_tree(want).items():
        np.testing.assert_allclose(flatten_tree(sim)[path], w, rtol=0, atol=1e-5 * float(np.abs(w).max()) + 1e-9,
                                   err_msg=path)
    # The client itself samples eps, so its update is not the mean path's.
    sampled = local_update(victim, w0, x, y, jax.random.key(3), protocol=protocol).update
    assert not np.allclose(flatten_tree(sampled)["precode/decoder/kernel"], flatten_tree(sim)["precode/decoder/kernel"])
    # And DLF runs on it: one step of the attack is finite.
    problem = make_dlf(victim, DLFConfig(iterations=3), batch_size=3, protocol=protocol, prior=None)
    target = {"update": sampled, "label_probs": jax.nn.one_hot(y, 3)}
    shared = {"variables": w0, "prior": None}
    state, match = problem.step(problem.init(jax.random.key(4), target, shared), target, shared, 0)
    assert np.isfinite(float(match)) and np.all(np.isfinite(np.asarray(state["z"])))


def test_simulated_update_depends_on_order_when_epochs_differ():
    victim = _mlp()
    w0 = victim.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (1, 2, 4, 4, 1))
    probs = jnp.broadcast_to(jax.nn.one_hot(jnp.array([0, 1]), 3), (1, 2, 3))
    protocol = Protocol(kind="fedavg", local_epochs=1, local_batch=1, optimizer="sgd", lr=0.5)
    a = simulated_update(victim, w0, x, probs, protocol=protocol)
    b = simulated_update(victim, w0, x[:, ::-1], probs[:, ::-1], protocol=protocol)
    assert float(jnp.abs(a["fc1"]["kernel"] - b["fc1"]["kernel"]).max()) > 1e-5


def test_simulated_update_is_differentiable_in_the_images():
    victim = _mlp()
    w0 = victim.init(jax.random.key(0))
    protocol = Protocol(kind="fedavg", local_epochs=2, local_batch=1, optimizer="adam", lr=0.1)
    probs = jnp.broadcast_to(jax.nn.one_hot(jnp.array([0, 1]), 3), (2, 2, 3))

    def f(x):
        u = simulated_update(victim, w0, x, probs, protocol=protocol, eps_root=1e-16)
        return sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(u))

    g = jax.jit(jax.grad(f))(jax.random.uniform(jax.random.key(1), (2, 2, 4, 4, 1)))
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_layer_weights_are_exp_minus_layer_index():
    victim = get_victim("convnet-sme", image_shape=(8, 8, 3), num_classes=3, width=2).with_conv_impl("patches")
    assert layer_order(victim) == ("conv0", "conv1", "fc", "head")
    flat = flatten_tree(dlf_layer_weights(victim))
    for i, layer in enumerate(("conv0", "conv1", "fc", "head")):
        for leaf in ("kernel", "bias"):
            assert flat[f"{layer}/{leaf}"] == pytest.approx(math.exp(-i), rel=1e-12)
    assert {float(w) for w in flatten_tree(dlf_layer_weights(victim, decay=False)).values()} == {1.0}
    mlp = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=(5, 4, 3))
    assert layer_order(mlp) == ("fc1", "fc2", "fc3", "head")
    assert flatten_tree(dlf_layer_weights(mlp))["head/kernel"] == pytest.approx(math.exp(-3), rel=1e-12)


def test_order_prior_zero_iff_epochs_hold_the_same_images():
    x = jax.random.uniform(jax.random.key(0), (4, 5, 5, 3))
    kernel = order_kernel(3, 96, 0)
    assert kernel.shape == (27, 96)
    perms = [np.arange(4), np.array([2, 0, 3, 1]), np.array([3, 2, 1, 0])]
    same = jnp.stack([x[p] for p in perms])
    assert float(order_prior(same, kernel)) == pytest.approx(0.0, abs=1e-12)
    other = same.at[1, 2].add(0.1 * jax.random.normal(jax.random.key(1), (5, 5, 3)))
    assert float(order_prior(other, kernel)) > 1e-6
    swapped = same.at[2, 0].set(jax.random.uniform(jax.random.key(2), (5, 5, 3)))
    assert float(order_prior(swapped, kernel)) > 1e-6
    # One epoch has nothing to compare with.
    assert float(order_prior(other[:1], kernel)) == 0.0


def test_pixel_range_penalty_form():
    x = jnp.zeros((2, 2, 2, 1)).at[0, 0, 0, 0].set(1.5).at[1, 1, 1, 0].set(-2.0)
    # sum over pixels of the mean over images: (0.25 + 0) / 2 + (0 + 4) / 2
    assert float(pixel_range_penalty(x)) == pytest.approx(2.125)
    assert float(pixel_range_penalty(jnp.clip(x, 0, 1))) == 0.0


@pytest.mark.parametrize("m", [3, 9])  # exact assignment (M <= 7) and greedy
def test_match_epochs_undoes_permutations(m):
    x = jax.random.uniform(jax.random.key(0), (m, 3, 3, 1))
    rng = np.random.default_rng(0)
    perms = [np.arange(m), rng.permutation(m), rng.permutation(m)]
    copies = jnp.stack([x[p] for p in perms]) + 0.01 * jax.random.normal(jax.random.key(1), (3, m, 3, 3, 1))
    out = jax.jit(match_epochs)(copies)
    np.testing.assert_array_equal(out[0], copies[0])
    for e in (1, 2):
        np.testing.assert_allclose(out[e], x[perms[0]], atol=0.05)


def test_config_validation():
    with pytest.raises(ValueError, match="labels"):
        DLFConfig(labels="joint")
    with pytest.raises(ValueError, match="iterations"):
        DLFConfig(iterations=0)
    with pytest.raises(ValueError, match="restarts"):
        DLFConfig(restarts=0)
    with pytest.raises(ValueError, match="learning_rate"):
        DLFConfig(learning_rate=-0.1)
    with pytest.raises(ValueError, match="lr_decay"):
        DLFConfig(lr_decay=1.5)
    with pytest.raises(ValueError, match="order_prior"):
        DLFConfig(order_prior=float("nan"))
    with pytest.raises(ValueError, match="order_filters"):
        DLFConfig(order_filters=0)
    with pytest.raises(TypeError):
        DLFConfig(400)  # keyword-only
    c = DLFConfig()
    assert (c.iterations, c.learning_rate, c.lr_decay, c.lr_decay_steps, c.tv, c.pixel_range, c.order_prior,
            c.order_filters, c.match_start, c.match_end, c.labels) == (
        400, 0.1, 0.997, 20, 2e-4, 10.0, 6.075, 96, 4.0, 2.0, "known")
    victim = _mlp()
    fedavg = Protocol(kind="fedavg", local_epochs=1, local_batch=1, optimizer="sgd", lr=0.1)
    with pytest.raises(ValueError, match="batch_size"):
        make_dlf(victim, c, batch_size=0, protocol=fedavg, prior=None)
    with pytest.raises(ValueError, match="prior"):
        make_dlf(victim, c, batch_size=2, protocol=fedavg, prior="x")
    assert make_dlf(victim, c, batch_size=2, protocol=fedavg, prior=None) is make_dlf(
        victim, c, batch_size=2, protocol=fedavg, prior=None)


def _psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((np.asarray(a) - np.asarray(b)) ** 2))


@pytest.mark.parametrize("epochs", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_recovers_toy_images(epochs):
    """Noise-free toy: MLP, 4x4x1 images, M = 2, B = 1, DLF's SGD lr 0.004; 200 iterations.

    The replay's fixed order need not be the client's shuffle (E = 2 shuffles each epoch);
    at lr 0.004 the update barely depends on the order, so both images come back (measured
    48.5 dB for E = 1 and 2 on CPU).
    """
    victim = _mlp(hidden=32)
    w0 = victim.init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1))
    y = jnp.array([0, 1])
    protocol = Protocol(kind="fedavg", local_epochs=epochs, local_batch=1, optimizer="sgd", lr=0.004)
    truth = local_update(victim, w0, x, y, jax.random.key(2), protocol=protocol)
    targets = {"update": jax.tree_util.tree_map(lambda a: a[None], truth.update),
               "label_probs": jax.nn.one_hot(y, 3)[None]}
    config = DLFConfig(iterations=200)
    problem = make_dlf(victim, config, batch_size=2, protocol=protocol, prior=None)
    res = run_problem(problem, targets, {"variables": w0, "prior": None},
                      RunOptions(iterations=config.iterations, chunk=100))
    # Slot m carries label m, so the labels fix the order: compared without matching.
    psnr = _psnr(res.images[0], x)
    assert psnr > 40.0, psnr
    np.testing.assert_array_equal(res.label_probs[0], np.asarray(targets["label_probs"][0]))
