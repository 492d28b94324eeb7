"""Training, checkpointing, resuming and batched inference of Venom's recovery networks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak.artifacts import ArtifactError, read_artifact
from jaxleak.attacks.spe import SPEConfig
from jaxleak.attacks.venom import RecoveryNetConfig, TripletConfig
from jaxleak.attacks.venom.infer import recover_images
from jaxleak.attacks.venom.train import (
    TrainConfig,
    _compiled,
    _step_relevant,
    init_state,
    load_recovery_net,
    reconstruction_loss,
    train_recovery_net,
)
from jaxleak.models import get_victim

# The smallest network that trains (one UNet stage, no linear attention): these tests are about
# the training loop, checkpoints and caches; test_venom_network covers the architecture. Every
# test shares it, so its initialiser, update and eval steps compile once per process.
NET = RecoveryNetConfig(
    image_shape=(16, 16, 1),
    feature_shape=(4, 4, 16),
    base_width=8,
    multipliers=(1,),
    linear_attention=False,
    resnet_blocks=1,
    liquid_steps=2,
    time_dim=8,
    attention_heads=1,
    attention_head_dim=8,
)
TRAIN = TrainConfig(steps=4, batch_size=4, eval_every=2, eval_size=8, checkpoint_every=2, seed=3)
TRIPLETS = TripletConfig(calibration="paper", epsilons=(5.0, 10.0))


@pytest.fixture(scope="module")
def setup():
    victim = get_victim("lenet-venom", image_shape=(16, 16, 1), num_classes=10)
    variables = victim.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    base = rng.random((40, 4, 4, 1)).astype(np.float32)
    images = np.repeat(
        np.repeat(base, 4, axis=1), 4, axis=2
    )  # smooth, so there is something to learn
    labels = rng.integers(0, 10, 40)
    return victim, variables, images, labels


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """An uninterrupted 4-step run, and the same run stopped after step 2 and resumed."""
    victim, variables, images, labels = setup
    root = tmp_path_factory.mktemp("venom")
    kwargs = {
        "config": TRAIN,
        "triplet_config": TRIPLETS,
        "info": {"aux_dataset": {"name": "random"}},
    }
    full = train_recovery_net(
        NET, victim, variables, images, labels, out_dir=root / "full", **kwargs
    )
    first = train_recovery_net(
        NET, victim, variables, images, labels, out_dir=root / "split", until=2, **kwargs
    )
    # resuming reads every setting from the folder: none is repeated here
    rest = train_recovery_net(
        None, victim, variables, images, labels, out_dir=root / "split", resume=True
    )
    return full, first, rest, root


def test_loss_formulas():
    x = jnp.ones((2, 2, 2, 1))
    y = jnp.zeros((2, 2, 2, 1)).at[1].set(2.0)
    # per image: mse 1 and 1 -> 1; cosine 0 (x vs 0, guarded) and 1 (parallel)
    assert float(reconstruction_loss(x, y, "mse")) == pytest.approx(1.0)
    assert float(reconstruction_loss(x, y, "mse+cos")) == pytest.approx((1.0 + 0.5) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="l1")
    with pytest.raises(ValueError, match="max_lr"):
        TrainConfig(learning_rate=1e-2, max_lr=1e-3)


def test_one_training_step_lowers_the_loss_on_a_fixed_batch(setup, runs):
    victim, variables, images, labels = setup
    # the runs' own compiled update (same configs and shapes: a cache hit, no new compilation)
    model, optimizer, update, _, _ = _compiled(
        NET, victim, _step_relevant(TRAIN), TRIPLETS, SPEConfig()
    )
    assert model == runs[0].model
    n = len(images) - TRAIN.eval_size  # the training part of the runs' auxiliary set
    images, labels = jnp.asarray(images[:n]), jnp.asarray(labels[:n], jnp.int32)
    state = init_state(model, optimizer, NET, seed=0)
    state1, m0 = update(state, variables, images, labels)
    # the same key draws the same minibatch and noise: the loss of step 1's params on that batch
    _, m1 = update(state1._replace(key=state.key), variables, images, labels)
    assert int(state1.step) == 1 and not np.array_equal(state1.key, state.key)
    assert float(m1["loss"]) < float(m0["loss"])


def test_resume_after_interruption_continues_the_same_run(runs):
    full, first, rest, _ = runs
    assert first.step == 2 and rest.step == 4 == full.step
    assert first.history["loss"] == full.history["loss"][:2]
    assert rest.history["loss"] == full.history["loss"]  # history carries over the interruption
    assert rest.history["eval_step"] == full.history["eval_step"] == [2, 4]
    np.testing.assert_allclose(rest.history["eval_psnr"], full.history["eval_psnr"], rtol=1e-6)
    leaves_a = jax.tree_util.tree_leaves(full.params)
    leaves_b = jax.tree_util.tree_leaves(rest.params)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_round_trip_gives_identical_outputs(runs, setup):
    full, _, _, root = runs
    model, params, info = load_recovery_net(root / "full")
    stored = read_artifact(root / "full", kind="recovery/venom")
    assert stored.config["train"]["seed"] == 3 and stored.extra["aux_dataset"]["name"] == "random"
    assert (
        info["step"] == 4 and info["train"]["seed"] == 3 and info["aux_dataset"]["name"] == "random"
    )
    assert info["triplets"]["epsilons"] == [5.0, 10.0] and info["network"]["base_width"] == 8
    assert model == full.model
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(7), (3, 4, 4, 16)))
    t = np.array([0.5, 1.0, 2.0], np.float32)
    # batch_size 2: the compiled chunk of the padded-chunks test below
    np.testing.assert_array_equal(
        recover_images(model, params, x, t, batch_size=2),
        recover_images(full.model, full.params, x, t, batch_size=2),
    )


def test_mismatched_checkpoints_are_refused(runs, setup):
    _, _, _, root = runs
    victim, variables, images, labels = setup
    with pytest.raises(ArtifactError, match="network.base_width: checkpoint has 8, expected 16"):
        load_recovery_net(root / "full", expected=dataclasses.replace(NET, base_width=16))
    with pytest.raises(ArtifactError, match="resume"):  # occupied directory without resume
        train_recovery_net(
            NET,
            victim,
            variables,
            images,
            labels,
            config=TRAIN,
            triplet_config=TRIPLETS,
            out_dir=root / "full",
        )
    with pytest.raises(ArtifactError, match="train.max_lr"):  # resuming with other settings
        train_recovery_net(
            NET,
            victim,
            variables,
            images,
            labels,
            triplet_config=TRIPLETS,
            config=dataclasses.replace(TRAIN, max_lr=2e-3),
            out_dir=root / "full",
            resume=True,
        )
    with pytest.raises(ArtifactError, match="not a jaxleak checkpoint"):
        load_recovery_net(root)
    with pytest.raises(ArtifactError, match="cannot resume .*missing: it does not exist"):
        train_recovery_net(None, victim, variables, images, labels, out_dir=root / "missing",
                           resume=True)
    assert not (root / "missing").exists()
    with pytest.raises(ArtifactError, match="triplet_source: checkpoint has 'on-the-fly'"):
        train_recovery_net(None, victim, variables, images, labels, out_dir=root / "full",
                           resume=True, triplet_cache=root / "cache.npz")
    with pytest.raises(ValueError, match="variant"):
        train_recovery_net(
            NET, victim, variables, images, labels, config=TrainConfig(variant="fgla")
        )


def test_recover_images_in_padded_chunks_equals_one_by_one(runs):
    full = runs[0]
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 4, 4, 16)).astype(np.float32)
    t = np.array([0.1, 0.5, 1.0, np.inf, 2.0], np.float32)
    batched = recover_images(full.model, full.params, x, t, batch_size=2)
    assert batched.shape == (5, 16, 16, 1) and batched.dtype == np.float32
    assert np.all((batched > 0) & (batched < 1))
    t_used = np.where(np.isfinite(t), t, 2.0)  # inf is replaced by the largest finite T
    single = np.concatenate(
        [
            recover_images(full.model, full.params, x[i : i + 1], t_used[i : i + 1], batch_size=1)
            for i in range(5)
        ]
    )
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="noise_strength"):
        recover_images(full.model, full.params, x, t[:3])


@pytest.mark.slow
def test_mixed_precision_trains_with_float32_params_and_loss(setup):
    victim, variables, images, labels = setup
    config = dataclasses.replace(TRAIN, mixed_precision=True, loss="mse+cos", checkpoint_every=0)
    result = train_recovery_net(
        NET, victim, variables, images, labels, config=config, triplet_config=TRIPLETS
    )
    assert all(np.isfinite(result.history["loss"])) and len(result.history["loss"]) == 4
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(result.params)} == {
        jnp.dtype("float32")
    }


def test_triplet_cache_is_built_once_reused_and_refused_for_other_settings(setup, tmp_path):
    from jaxleak.attacks.venom.train import load_triplet_cache

    victim, variables, images, labels = setup
    cache = tmp_path / "triplets.npz"
    kwargs = {"config": TRAIN, "triplet_config": TRIPLETS, "triplet_cache": cache}
    first = train_recovery_net(NET, victim, variables, images, labels, out_dir=tmp_path / "a", **kwargs)
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    second = train_recovery_net(NET, victim, variables, images, labels, out_dir=tmp_path / "b", **kwargs)
    assert cache.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    np.testing.assert_array_equal(first.history["loss"], second.history["loss"])
    assert np.all(np.isfinite(first.history["loss"]))
    # one fixed triplet per training image (the last eval_size images are held out)
    with np.load(cache) as data:
        assert data["features"].shape == (40 - TRAIN.eval_size, *NET.feature_shape)
    # the cache differs from the on-the-fly run, and the checkpoint says which one it was
    fresh = train_recovery_net(NET, victim, variables, images, labels, config=TRAIN,
                               triplet_config=TRIPLETS)
    assert fresh.history["loss"] != first.history["loss"]
    assert '"triplet_source": "cache"' in (tmp_path / "a" / "config.json").read_text()
    # other epsilons or other images: refused with the differing field named
    other = dataclasses.replace(TRIPLETS, epsilons=(1.0,))
    with pytest.raises(ValueError, match="epsilons"):
        train_recovery_net(NET, victim, variables, images, labels, config=TRAIN, triplet_config=other,
                           triplet_cache=cache)
    with pytest.raises(ValueError, match="aux_images"):
        train_recovery_net(NET, victim, variables, images[::-1].copy(), labels[::-1].copy(), config=TRAIN,
                           triplet_config=TRIPLETS, triplet_cache=cache)
    with pytest.raises(ValueError, match="not a readable triplet cache"):
        bad = tmp_path / "bad.npz"
        bad.write_bytes(b"nope")
        load_triplet_cache(bad, {})
