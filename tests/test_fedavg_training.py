"""Server-side FedAvg training: one round against hand-written math, resume, accuracy, files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak.models import evaluate_victim, get_victim, load_variables
from jaxleak.protocols import Protocol, local_update
from jaxleak.protocols.server import (
    FedAvgTraining,
    client_keys,
    fedavg_round,
    partition,
    rounds_for_epochs,
    sample_clients,
    train_fedavg,
)

SGD = Protocol(kind="fedavg", local_epochs=1, local_batch=None, optimizer="sgd", lr=0.1)
# One protocol and round shape (3 clients of 8 images) for most tests: the round compiles once.
PROTOCOL = Protocol(kind="fedavg", local_epochs=1, local_batch=4, optimizer="sgd", lr=0.2)


@pytest.fixture(scope="module")
def victim():
    return get_victim("mlp", image_shape=(8, 8, 1), num_classes=2, hidden=8)


@pytest.fixture(scope="module")
def toy():
    """Linearly separable: class 1 images are brighter (mean 0.8 vs 0.2)."""
    rng = np.random.default_rng(0)
    y = (np.arange(96) % 2).astype(np.int32)
    x = (0.2 + 0.6 * y[:, None, None, None] + 0.1 * rng.standard_normal((96, 8, 8, 1))).astype(
        np.float32
    )
    return np.clip(x, 0, 1), y


def _tree_close(a, b, **tol):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **tol)


def test_one_client_one_sgd_step_is_centralised_sgd(victim, toy):
    x, y = toy[0][:6], toy[1][:6]
    w0 = victim.init(jax.random.key(0))
    new = fedavg_round(
        victim,
        w0,
        x[None],
        y[None],
        jax.random.split(jax.random.PRNGKey(1), 1),
        protocol=SGD,
        server_lr=1.0,
    )

    def mean_loss(p):
        return jnp.mean(jax.vmap(lambda a, b: victim.loss(p, None, a, b))(x, y))

    grad = jax.grad(mean_loss)(w0["params"])
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, w0["params"], grad)
    _tree_close(new["params"], expected, rtol=1e-5, atol=1e-6)


def test_weighted_mean_of_two_clients(victim, toy):
    # Three clients with weights (1, 3, 0): the mean is (u0 + 3 u1) / 4, the third ignored.
    x, y = jnp.asarray(toy[0][:24].reshape(3, 8, 8, 8, 1)), jnp.asarray(toy[1][:24].reshape(3, 8))
    w0 = victim.init(jax.random.key(0))
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    one = jax.jit(lambda a, b, k: local_update(victim, w0, a, b, k, protocol=PROTOCOL).update)
    u = [one(x[i], y[i], keys[i]) for i in range(2)]
    new = fedavg_round(
        victim, w0, x, y, keys, protocol=PROTOCOL, server_lr=0.5, weights=jnp.array([1.0, 3.0, 0.0])
    )
    expected = jax.tree_util.tree_map(
        lambda p, a, b: p - 0.5 * (a + 3 * b) / 4, w0["params"], u[0], u[1]
    )
    _tree_close(new["params"], expected, rtol=1e-5, atol=1e-7)


def test_partition_and_sampling():
    labels = np.arange(40) % 4
    iid = partition(labels, 5, 6, seed=3)
    assert iid.shape == (5, 6) and len(np.unique(iid)) == 30
    np.testing.assert_array_equal(iid, partition(labels, 5, 6, seed=3))
    skew = partition(labels, 5, 6, seed=3, alpha=0.05)
    assert skew.shape == (5, 6) and len(np.unique(skew)) == 30 and skew.max() < 40
    # A small concentration leaves most clients with few classes.
    assert np.mean([len(np.unique(labels[c])) for c in skew]) < np.mean(
        [len(np.unique(labels[c])) for c in iid]
    )
    with pytest.raises(ValueError, match="need 42"):
        partition(labels, 7, 6, seed=0)
    ids = sample_clients(0, 5, 10, 4)
    assert len(np.unique(ids)) == 4 and ids.max() < 10
    assert client_keys(0, 5, ids).shape[0] == 4
    assert rounds_for_epochs(3, num_clients=12, clients_per_round=4) == 9


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one"):
        FedAvgTraining(rounds=2, epochs=1.0, clients_per_round=2, samples=4, protocol=SGD)
    with pytest.raises(ValueError, match="server_lr"):
        FedAvgTraining(rounds=2, clients_per_round=2, samples=4, protocol=SGD, server_lr=0.0)
    cfg = FedAvgTraining(epochs=2, clients_per_round=3, samples=4, protocol=SGD)
    assert cfg.total_rounds(12) == 8 and cfg.global_epoch(8, 12) == 2.0


def _config(rounds, **kw):
    return FedAvgTraining(
        rounds=rounds, clients_per_round=3, samples=8, protocol=PROTOCOL, seed=5, eval_every=2, **kw
    )


def test_resume_equals_uninterrupted_and_files(victim, toy, tmp_path):
    x, y = toy
    w0 = victim.init(jax.random.key(1))
    full, history = train_fedavg(
        victim,
        w0,
        x,
        y,
        config=_config(4),
        test_images=x,
        test_labels=y,
        out=tmp_path / "full",
        checkpoint_every=1,
        progress=False,
    )
    half, _ = train_fedavg(
        victim,
        w0,
        x,
        y,
        config=_config(2),
        test_images=x,
        test_labels=y,
        out=tmp_path / "run",
        checkpoint_every=1,
        progress=False,
    )
    resumed, resumed_history = train_fedavg(
        victim,
        w0,
        x,
        y,
        config=_config(4),
        test_images=x,
        test_labels=y,
        out=tmp_path / "run",
        resume=True,
        checkpoint_every=1,
        progress=False,
    )
    # The same compiled round on the same inputs: bit-identical.
    _tree_close(resumed, full, rtol=0, atol=0)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(half), jax.tree_util.tree_leaves(full), strict=True
        )
    )
    assert [h["round"] for h in resumed_history] == [1, 2, 3, 4]
    assert [h["train_loss"] for h in resumed_history] == [h["train_loss"] for h in history]
    # 96 images / 8 = 12 clients, 3 per round: one global epoch is 4 rounds.
    assert history[-1]["global_epoch"] == 1.0
    assert [("test_accuracy" in h) for h in history] == [False, True, False, True]

    document = json.loads((tmp_path / "run" / "history.json").read_text())
    assert document["rounds"] == 4 and [h["round"] for h in document["history"]] == [1, 2, 3, 4]
    assert document["config"]["fedavg"]["num_clients"] == 12
    loaded, meta = load_variables(tmp_path / "run", victim)  # the newest round, as capture reads it
    _tree_close(loaded, full, rtol=0, atol=0)
    assert meta["fedavg"]["clients_per_round"] == 3

    with pytest.raises(ValueError, match="already holds"):
        train_fedavg(victim, w0, x, y, config=_config(4), out=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train_fedavg(
            victim,
            w0,
            x,
            y,
            config=_config(6, server_lr=0.5),
            out=tmp_path / "run",
            resume=True,
            progress=False,
        )
    with pytest.raises(ValueError, match="past the 3"):
        train_fedavg(
            victim, w0, x, y, config=_config(3), out=tmp_path / "run", resume=True, progress=False
        )


def test_accuracy_rises_above_chance(victim, toy):
    x, y = toy
    w0 = victim.init(jax.random.key(2))
    # 12 clients, 3 per round: global epoch 2 is 8 rounds.
    config = FedAvgTraining(
        epochs=2, clients_per_round=3, samples=8, protocol=PROTOCOL, eval_every=4
    )
    trained, history = train_fedavg(
        victim, w0, x, y, config=config, test_images=x[:80], test_labels=y[:80], progress=False
    )
    reference = evaluate_victim(victim, trained, x[:80], y[:80])
    assert history[-1]["test_accuracy"] == reference["accuracy"]
    assert history[-1]["test_loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert len(history) == 8 and history[-1]["global_epoch"] == 2.0
    assert history[3]["global_epoch"] == 1.0 and "test_accuracy" in history[3]
    assert history[-1]["test_accuracy"] > 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]
