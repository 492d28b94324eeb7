"""The artifact store: round trips, refusals, atomic writes, resumable runs, Mjolnir's saved denoiser."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import artifacts
from jaxleak.artifacts import ArtifactError, load_artifact, save_artifact

TREE = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.ones(3, np.int32)}}
CONFIG = {"width": 4, "shape": (2, 3), "nested": {"depth": 2}}


def _assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def _no_leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_round_trip_with_config_and_extra(tmp_path):
    path = save_artifact(tmp_path / "a", kind="prior/flow", config=CONFIG, tree=TREE,
                         extra={"steps": 10, "data": "cifar10:train"})
    assert path == (tmp_path / "a").absolute()
    header = json.loads((path / "config.json").read_text())
    assert header["kind"] == "prior/flow" and header["format"] == artifacts.FORMAT
    assert header["jaxleak_version"] and header["config"]["shape"] == [2, 3]  # tuples stored as lists
    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), TREE)
    for tgt in (target, None):
        tree, config, extra = load_artifact(path, kind="prior/flow", expect={"width": 4}, target=tgt)
        _assert_tree_equal(tree, TREE)
        assert config == {"width": 4, "shape": [2, 3], "nested": {"depth": 2}}
        assert extra == {"steps": 10, "data": "cifar10:train"}
    # a kind may be one of several
    assert load_artifact(path, kind=("recovery/venom", "prior/flow")).config["width"] == 4


@pytest.mark.parametrize("call, message", [
    (lambda p: load_artifact(p / "missing", kind="prior/flow"), "missing does not exist"),
    (lambda p: load_artifact(p / "a", kind="victim"), "holds a 'prior/flow' checkpoint, not 'victim'"),
    (lambda p: load_artifact(p / "a", kind="prior/flow", expect={"width": 8, "nested": {"depth": 3}}),
     "nested.depth: checkpoint has 2, expected 3; width: checkpoint has 4, expected 8"),
    (lambda p: load_artifact(p / "a", kind="prior/flow", expect={"heads": 2}),
     "heads: checkpoint lacks it, expected 2"),
    (lambda p: load_artifact(p, kind="prior/flow"), "is not a jaxleak checkpoint"),
    (lambda p: save_artifact(p / "a", kind="prior/flow", config=CONFIG, tree=TREE),
     "already holds a checkpoint; pass force=True"),
    (lambda p: save_artifact(p / "b", kind="prior/flow", config={"x": float("nan")}, tree=TREE),
     "config must be strict JSON"),
])
def test_refusals_are_one_line_and_name_the_problem(tmp_path, call, message):
    save_artifact(tmp_path / "a", kind="prior/flow", config=CONFIG, tree=TREE)
    with pytest.raises(ArtifactError) as info:
        call(tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "b").exists() and not _no_leftovers(tmp_path)


def test_a_failed_save_leaves_no_folder_and_keeps_the_old_artifact(tmp_path, monkeypatch):
    class Broken:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def save(self, path, tree):
            path.mkdir()
            (path / "half-written").write_text("x")
            raise OSError("disk full")

    save_artifact(tmp_path / "old", kind="victim", config={"v": 1}, tree=TREE)
    monkeypatch.setattr(artifacts.ocp, "StandardCheckpointer", Broken)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(tmp_path / "new", kind="victim", config={"v": 2}, tree=TREE)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(tmp_path / "old", kind="victim", config={"v": 2}, tree=TREE, force=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert load_artifact(tmp_path / "old", kind="victim").config == {"v": 1}
    # replacing works once saving does, and again leaves nothing behind
    save_artifact(tmp_path / "old", kind="victim", config={"v": 3}, tree=TREE, force=True)
    assert load_artifact(tmp_path / "old", kind="victim").config == {"v": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_check_target_refuses_occupied_paths_before_work(tmp_path):
    assert artifacts.check_target(tmp_path / "new" / "deeper") == (tmp_path / "new" / "deeper").absolute()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a folder"):
        artifacts.check_target(tmp_path / "file")
    with pytest.raises(ArtifactError, match="not a jaxleak checkpoint; refusing"):
        artifacts.check_target(tmp_path)


def test_a_resumable_run_keeps_its_config_and_last_steps(tmp_path):
    run = tmp_path / "run"
    settings = {"train": {"steps": 8, "lr": 1e-3}, "network": {"width": 4}}
    artifacts.start_run(run, kind="recovery/venom", config=settings, extra={"data": "aux"})
    with pytest.raises(ArtifactError, match="holds no arrays yet"):
        load_artifact(run, kind="recovery/venom")
    assert artifacts.latest_step(run) is None
    with artifacts.StepCheckpoints(run, max_to_keep=2) as steps:
        for step in (2, 4, 6):
            steps.save_step(step, {"w": np.full(3, step, np.float32)}, extra={"history": [step]})
        assert steps.all_steps() == [4, 6]
    assert artifacts.latest_step(run) == 6
    # resuming reads every setting; those given again must agree (the others come from the folder)
    info = artifacts.resume_run(run, kind="recovery/venom", expect={"train": {"steps": 8}})
    assert info.config == settings and info.extra == {"data": "aux"}
    with pytest.raises(ArtifactError, match=r"other settings: train.lr: checkpoint has 0.001, expected 0.01"):
        artifacts.resume_run(run, kind="recovery/venom", expect={"train": {"lr": 1e-2}})
    with pytest.raises(ArtifactError, match="cannot resume .*nowhere: it does not exist"):
        artifacts.resume_run(tmp_path / "nowhere", kind="recovery/venom")
    with pytest.raises(ArtifactError, match="resume it"):
        artifacts.start_run(run, kind="recovery/venom", config=settings)
    tree, config, extra = load_artifact(run, kind="recovery/venom")
    np.testing.assert_array_equal(tree["w"], np.full(3, 6, np.float32))
    assert extra == {"data": "aux", "history": [6], "step": 6} and config == settings
    assert load_artifact(run, kind="recovery/venom", step=4).extra["step"] == 4
    with pytest.raises(ArtifactError, match="no step 2"):
        load_artifact(run, kind="recovery/venom", step=2)


def test_victim_checkpoints_are_victim_artifacts(tmp_path):
    from jaxleak.models import get_victim, load_variables, read_metadata, save_variables

    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=5)
    variables = victim.init(jax.random.key(0))
    save_variables(tmp_path / "v", variables, metadata={**victim.metadata(), "options": {}, "steps": 3})
    info = artifacts.read_artifact(tmp_path / "v", kind="victim")
    assert info.config["options"] == {"hidden": [256]}  # partial options stored resolved
    assert info.extra == {"steps": 3}
    with pytest.raises(ArtifactError, match="different model: options"):
        load_variables(tmp_path / "v", victim)
    save_variables(tmp_path / "w", variables, metadata={**victim.metadata(), "steps": 3})
    loaded, metadata = load_variables(tmp_path / "w", victim)
    _assert_tree_equal(loaded, variables)
    assert metadata == read_metadata(tmp_path / "w") and metadata["steps"] == 3
    with pytest.raises(ArtifactError, match="holds a 'victim' checkpoint, not 'recovery/venom'"):
        from jaxleak.attacks.venom.train import load_recovery_net

        load_recovery_net(tmp_path / "w")


# --------------------------------------------------------------------------- Mjolnir


@pytest.fixture(scope="module")
def mjolnir_setup():
    from jaxleak.attacks.optimization import dummy_gradient, mjolnir
    from jaxleak.models import get_victim

    victim = get_victim("lenet-dlg", image_shape=(8, 8, 1), num_classes=4)
    variables = victim.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    config = mjolnir.MjolnirConfig(denoiser="mlp", hidden=16, depth=1, time_dim=8, timesteps=20,
                                   train_steps=3, train_batch=4, iterations=2, inner_steps=2)
    trained = mjolnir.train_denoiser(victim, variables, rng.random((6, 8, 8, 1), dtype=np.float32),
                                     np.arange(6) % 4, config, seed=1, extra={"aux": "random"})
    images = jax.random.uniform(jax.random.key(1), (2, 1, 8, 8, 1))
    labels = jnp.array([[2], [1]])
    grad = lambda x, y: dummy_gradient(victim, variables, x, jax.nn.one_hot(y, 4))
    updates = jax.vmap(grad)(images, labels)
    updates = jax.tree_util.tree_map(
        lambda a: a + 0.01 * jax.random.normal(jax.random.key(2), a.shape), updates)
    cap = types.SimpleNamespace(meta={"noise_std": 0.01, "batch_size": 1}, labels=np.asarray(labels),
                                n=2, image_shape=(8, 8, 1))
    return mjolnir, victim, variables, config, trained, updates, cap


def _attack(mjolnir_setup, **kwargs):
    mjolnir, victim, variables, config, _, updates, cap = mjolnir_setup
    overrides = {k: getattr(config, k) for k in ("iterations", "inner_steps")}
    overrides.update(kwargs.pop("overrides", {}))
    return mjolnir.reconstruct_capture(cap, victim, variables, updates, overrides=overrides, chunk=2,
                                       target_batch=2, patience=None, min_delta=0.0, seed=0,
                                       progress=False, **kwargs)


def test_mjolnir_with_a_saved_denoiser_equals_the_same_denoiser_in_memory(mjolnir_setup, tmp_path):
    mjolnir, victim, _, config, trained, updates, _ = mjolnir_setup
    path = mjolnir.save_denoiser(tmp_path / "den", trained)
    info = artifacts.read_artifact(path, kind="denoiser/mjolnir")
    assert info.config["dim"] == trained.dim and info.config["victim"]["model"] == "lenet-dlg"
    assert info.config["denoiser"]["denoiser"] == "mlp" and info.extra["train"]["train_steps"] == 3
    loaded = mjolnir.load_denoiser(path, victim=victim)
    _assert_tree_equal(loaded.params, trained.params)
    assert loaded.scale == pytest.approx(trained.scale, rel=1e-7)
    assert mjolnir.architecture(loaded.config) == mjolnir.architecture(config)
    assert loaded.config.train_steps == 3 and loaded.extra["aux"] == "random"

    config_mem, res_mem, extra_mem = _attack(mjolnir_setup, denoiser=trained)
    # the saved one named by path, as the CLI does (--set denoiser_path=DIR), with the default
    # architecture fields: the stored ones replace them
    config_disk, res_disk, extra_disk = _attack(mjolnir_setup, overrides={"denoiser_path": str(path)})
    np.testing.assert_allclose(res_disk.images, res_mem.images, rtol=1e-6, atol=1e-6)
    assert extra_disk["mjolnir"]["t_start"] == extra_mem["mjolnir"]["t_start"] >= 0
    assert extra_disk["mjolnir"]["denoiser_source"] == f"loaded from {path}"
    assert extra_mem["mjolnir"]["denoiser_source"] == "given in memory"
    assert config_disk.hidden == config_mem.hidden == 16 and "note" not in extra_disk["mjolnir"]


def test_mjolnir_refuses_a_denoiser_made_for_something_else(mjolnir_setup, tmp_path):
    mjolnir, _, _, _, trained, updates, _ = mjolnir_setup
    from jaxleak.models import get_victim

    path = mjolnir.save_denoiser(tmp_path / "den", trained)
    other = get_victim("lenet-dlg", image_shape=(8, 8, 1), num_classes=5)
    with pytest.raises(ArtifactError, match="victim.num_classes: checkpoint has 4, expected 5"):
        mjolnir.load_denoiser(path, victim=other)
    with pytest.raises(ArtifactError, match="denoiser.hidden: checkpoint has 16, expected 32"):
        _attack(mjolnir_setup, denoiser=path, overrides={"hidden": 32})
    with pytest.raises(ArtifactError, match="trained for something else: denoiser.hidden"):
        _attack(mjolnir_setup, denoiser=trained, overrides={"hidden": 32})
    head_only = {"head": updates["head"]}
    with pytest.raises(ArtifactError, match="update_shapes"):
        mjolnir.load_denoiser(path, like=jax.tree_util.tree_map(lambda a: a[0], head_only))
    with pytest.raises(ArtifactError, match="already holds a checkpoint"):
        mjolnir.train_mjolnir_denoiser(None, None, out=path)  # refused before any data or training


def test_mjolnir_without_a_denoiser_trains_in_call_and_says_so(mjolnir_setup):
    mjolnir, *_ = mjolnir_setup
    _, _, extra = _attack(mjolnir_setup, overrides={"denoiser": "mlp", "hidden": 16, "depth": 1,
                                                    "time_dim": 8, "timesteps": 20, "train_steps": 2,
                                                    "aux_n": 8})
    assert extra["mjolnir"]["denoiser_source"] == mjolnir.IN_CALL_NOTE
    assert "jaxleak train mjolnir" in mjolnir.IN_CALL_NOTE
