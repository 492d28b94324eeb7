"""The one-client function: FedSGD / FedAvg local training, schedules, finiteness."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxleak.models import get_victim
from jaxleak.protocols import FEDSGD, Protocol, derived_keys, local_update, make_schedule


@pytest.fixture(scope="module")
def setup():
    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=6)
    variables = victim.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((7, 4, 4, 1), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 3, 7), dtype=jnp.int32)
    return victim, variables, x, y


def _mean_loss(victim, params, x, y):
    return jnp.mean(jax.vmap(lambda a, b: victim.loss(params, None, a, b))(x, y))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fedavg_equals_hand_written_loop(setup, optimizer):
    victim, variables, x, y = setup
    protocol = Protocol(kind="fedavg", local_epochs=2, local_batch=3, optimizer=optimizer, lr=0.05)
    key = jax.random.key(3)
    result = jax.jit(lambda k: local_update(victim, variables, x, y, k, protocol=protocol))(key)
    schedule = np.asarray(result.schedule)
    assert schedule.shape == (2, 3, 3)
    opt = optax.sgd(0.05) if optimizer == "sgd" else optax.adam(0.05)
    params = variables["params"]
    state = opt.init(params)
    for epoch in schedule:
        for batch in epoch:
            idx = batch[batch >= 0]
            grad = jax.grad(lambda p: _mean_loss(victim, p, x[idx], y[idx]))(params)
            upd, state = opt.update(grad, state, params)
            params = optax.apply_updates(params, upd)
    expected = jax.tree_util.tree_map(lambda a, b: a - b, variables["params"], params)
    chex.assert_trees_all_close(result.update, expected, atol=2e-6, rtol=1e-4)
    assert bool(result.finite)


def test_fedavg_one_sgd_step_lr1_full_batch_is_fedsgd_gradient(setup):
    victim, variables, x, y = setup
    key = jax.random.key(1)
    avg = local_update(victim, variables, x, y, key,
                       protocol=Protocol(kind="fedavg", local_batch=7, optimizer="sgd", lr=1.0))
    sgd = local_update(victim, variables, x, y, key, protocol=FEDSGD)
    chex.assert_trees_all_close(avg.update, sgd.update, atol=1e-6)
    grad = jax.grad(lambda p: _mean_loss(victim, p, x, y))(variables["params"])
    chex.assert_trees_all_close(sgd.update, grad, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(sgd.schedule), np.arange(7)[None, None])


def test_schedule_reshuffles_each_epoch_and_pads():
    protocol = Protocol(kind="fedavg", local_epochs=3, local_batch=4)
    schedule = np.asarray(make_schedule(protocol, 10, jax.random.key(0)))
    assert schedule.shape == (3, 3, 4)
    for epoch in schedule:
        flat = epoch.reshape(-1)
        assert sorted(flat[flat >= 0]) == list(range(10))
        assert (flat[-2:] == -1).all()
    assert not (schedule[0] == schedule[1]).all()
    # The schedule is a function of the client's shuffle key only.
    again = np.asarray(make_schedule(protocol, 10, jax.random.key(0)))
    np.testing.assert_array_equal(schedule, again)


def test_schedule_is_what_was_trained_on(setup):
    """Training on the images the schedule names, in that order, gives the update; another order does not."""
    victim, variables, x, y = setup
    protocol = Protocol(kind="fedavg", local_epochs=1, local_batch=2, optimizer="sgd", lr=0.5)
    key = jax.random.key(5)
    result = local_update(victim, variables, x, y, key, protocol=protocol)
    k_shuffle, _, _ = derived_keys(key)
    np.testing.assert_array_equal(np.asarray(result.schedule),
                                  np.asarray(make_schedule(protocol, 7, k_shuffle)))
    other = local_update(victim, variables, x, y, jax.random.key(6), protocol=protocol)
    assert not np.allclose(np.asarray(other.update["head"]["kernel"]), np.asarray(result.update["head"]["kernel"]))


def test_non_finite_images_are_flagged(setup):
    victim, variables, x, y = setup
    bad = x.at[2, 0, 0, 0].set(jnp.nan)
    for protocol in (FEDSGD, Protocol(kind="fedavg", local_batch=3, optimizer="sgd", lr=0.1)):
        assert not bool(local_update(victim, variables, bad, y, jax.random.key(0), protocol=protocol).finite)


def test_dp_step_needs_divisible_batches(setup):
    victim, variables, x, y = setup
    step = lambda grads, key: jax.tree_util.tree_map(lambda g: g.mean(0), grads)
    with pytest.raises(ValueError, match="divide"):
        local_update(victim, variables, x, y, jax.random.key(0),
                     protocol=Protocol(kind="fedavg", local_batch=3), step=step)
    # With the plain mean as the "defense", the per-example path equals the mean-loss path.
    plain = local_update(victim, variables, x, y, jax.random.key(0), protocol=FEDSGD)
    stepped = local_update(victim, variables, x, y, jax.random.key(0), protocol=FEDSGD, step=step)
    chex.assert_trees_all_close(plain.update, stepped.update, atol=1e-6)


def test_protocol_validation():
    with pytest.raises(ValueError, match="kind"):
        Protocol(kind="fedprox")
    with pytest.raises(ValueError, match="optimizer"):
        Protocol(kind="fedavg", optimizer="rmsprop")
    with pytest.raises(ValueError, match="local_epochs"):
        Protocol(kind="fedsgd", local_epochs=2)
    with pytest.raises(ValueError, match="lr"):
        Protocol(kind="fedavg", lr=0.0)
    p = Protocol(kind="fedavg", local_epochs=5, local_batch=10, optimizer="sgd", lr=0.004)
    assert Protocol.from_meta(p.as_meta(50)) == p
    assert p.as_meta(50)["local_steps"] == 5 and p.total_steps(50) == 25
