"""SME and FM on FedAvg updates: alpha's box and gradient, the IG limit, FM = SME at lambda_fm = 0,
the tau ramp, a noise-free recovery, and ``jaxleak attack sme|fm`` end to end."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import artifacts, metrics
from jaxleak.attacks.fedavg import (
    FMConfig,
    SMEConfig,
    fm_regularizer,
    fm_tau,
    make_fm,
    make_sme,
    sme_total_variation,
    soft_sign,
    surrogate_matching,
)
from jaxleak.attacks.optimization import (
    RunOptions,
    cosine_distance,
    dummy_gradient,
    layer_weights,
    run_problem,
)
from jaxleak.cli import main
from jaxleak.models import get_victim
from jaxleak.priors import KIND, TrainConfig, UNetConfig, init_params, velocity_norm
from jaxleak.priors.unet import make_unet
from jaxleak.protocols import FEDSGD, Protocol, local_update

SGD_STEP = Protocol(kind="fedavg", local_epochs=1, local_batch=None, optimizer="sgd", lr=0.01)
TINY_UNET = {"base_width": 8, "channel_mult": (1,), "num_res_blocks": 1, "attention_resolutions": (),
             "groups": 4}


def _client(victim, m, *, protocol=SGD_STEP, seed=0):
    w0 = victim.init(jax.random.key(seed))
    x = jax.random.uniform(jax.random.key(seed + 1), (m, *victim.image_shape))
    y = jnp.arange(m) % victim.num_classes
    update = local_update(victim, w0, x, y, jax.random.key(seed + 2), protocol=protocol).update
    target = {"update": update, "label_probs": jax.nn.one_hot(y, victim.num_classes)}
    return w0, x, y, target


@functools.partial(jax.jit, static_argnums=(0, 4))
def _trajectory(problem, target, shared, key, steps):
    """``steps`` iterations from ``init(key)``: per step (images in [0, 1], alpha, matching loss)."""
    def body(state, it):
        cand = problem.candidate(state, shared)
        new, loss = problem.step(state, target, shared, it)
        return new, (cand.images, state["alpha"], loss)

    state = problem.init(key, target, shared)
    last, trace = jax.lax.scan(body, state, jnp.arange(steps))
    return last, trace


def _noisy_unet(cfg, seed=0, scale=0.05):
    """A random UNet whose output is not zero (init zeroes the last conv)."""
    params = init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)])


# --------------------------------------------------------------------------- alpha


@pytest.mark.parametrize("space", ["normalized", pytest.param("pixel", marks=pytest.mark.slow)])
def test_alpha_and_images_stay_in_their_boxes_under_huge_steps(space):
    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=6)
    w0, _, _, target = _client(victim, 2)
    config = SMEConfig(iterations=30, alpha_learning_rate=1e3, learning_rate=1e3, lr_decay=False, space=space)
    problem = make_sme(victim, config, batch_size=2, protocol=SGD_STEP, prior=None)
    last, (images, alphas, losses) = _trajectory(problem, target, {"variables": w0, "prior": None},
                                                 jax.random.key(3), 30)
    alphas = np.append(np.asarray(alphas), float(last["alpha"]))
    assert np.all((alphas >= 0.0) & (alphas <= 1.0)), alphas
    assert np.any((alphas == 0.0) | (alphas == 1.0))  # the clamp was exercised, not just never reached
    assert float(np.min(images)) >= 0.0 and float(np.max(images)) <= 1.0
    assert np.isfinite(np.asarray(losses)).all()


@pytest.mark.parametrize("model,shape,options", [
    ("mlp", (4, 4, 1), {"hidden": 5}),
    pytest.param("convnet-sme", (8, 8, 3), {"width": 2}, marks=pytest.mark.slow),  # ~45 s of compiling
])
def test_alpha_gradient_matches_central_finite_differences(model, shape, options):
    """d/d alpha of the matching loss, float64: |autodiff - central FD| <= 1e-6 relative (h = 1e-4)."""
    victim = get_victim(model, image_shape=shape, num_classes=3, **options).with_conv_impl(
        "xla" if model == "mlp" else "patches")
    w0, _, _, target = _client(victim, 2, protocol=Protocol(kind="fedavg", local_epochs=2, local_batch=1,
                                                             optimizer="sgd", lr=0.05))
    with jax.enable_x64(True):
        f64 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)
        w0, update, probs = f64(w0), f64(target["update"]), f64(target["label_probs"])
        images = jax.random.uniform(jax.random.key(7), (2, *shape), jnp.float64)
        weights = layer_weights(w0["params"])
        loss = jax.jit(lambda a: surrogate_matching(victim, w0, update, a, images, probs, weights))
        grad = jax.jit(jax.grad(loss))
        h = 1e-4
        for alpha in (0.2, 0.5, 0.9):
            auto = float(grad(jnp.float64(alpha)))
            fd = float((loss(jnp.float64(alpha + h)) - loss(jnp.float64(alpha - h))) / (2 * h))
            assert abs(auto) > 1e-8  # a real slope, not a trivially zero one
            np.testing.assert_allclose(auto, fd, rtol=1e-6, atol=1e-12)


def test_alpha_moves_against_its_gradient():
    """SME's first Adam step on alpha is -lr * sign(d loss / d alpha) (up to Adam's eps)."""
    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=6)
    w0, _, _, target = _client(victim, 1, protocol=Protocol(kind="fedavg", local_epochs=3, local_batch=1,
                                                             optimizer="sgd", lr=0.1))
    config = SMEConfig(iterations=8, tv=0.0)
    problem = make_sme(victim, config, batch_size=1, protocol=SGD_STEP, prior=None)
    shared = {"variables": w0, "prior": None}
    state = problem.init(jax.random.key(0), target, shared)
    images = problem.candidate(state, shared).images
    weights = layer_weights(w0["params"])
    grad = jax.jit(jax.grad(lambda a: surrogate_matching(victim, w0, target["update"], a, images,
                                                         target["label_probs"], weights)))(state["alpha"])
    new, _ = jax.jit(problem.step)(state, target, shared, jnp.int32(0))
    np.testing.assert_allclose(float(new["alpha"] - state["alpha"]), -1e-3 * float(jnp.sign(grad)), rtol=1e-3)


# --------------------------------------------------------------------------- the IG limit


def test_alpha_zero_after_one_sgd_step_is_the_ig_cosine_loss():
    """One local SGD step on all M images: w0 - w1 = lr * grad at w0, so SME at alpha = 0 is IG's cosine."""
    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=6)
    w0, x, y, target = _client(victim, 2)
    fedsgd = local_update(victim, w0, x, y, jax.random.key(2), protocol=FEDSGD).update
    config = SMEConfig(iterations=4, alpha_init=0.0, learn_alpha=False, tv=0.0)
    problem = make_sme(victim, config, batch_size=2, protocol=SGD_STEP, prior=None)
    _, (images, alphas, losses) = _trajectory(problem, target, {"variables": w0, "prior": None},
                                              jax.random.key(4), 4)
    weights = layer_weights(w0["params"])
    ig = jax.jit(jax.vmap(lambda im: cosine_distance(dummy_gradient(victim, w0, im, target["label_probs"]),
                                                     fedsgd, weights)))(images)
    np.testing.assert_allclose(np.asarray(losses), np.asarray(ig), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(alphas) == 0.0)


def test_layers_restrict_the_cosine_to_those_leaves():
    """``layers`` / ``layer_weights``: at alpha = 0 after one SGD step, SME is IG's cosine over those leaves."""
    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=6)
    w0, x, y, target = _client(victim, 2)
    fedsgd = local_update(victim, w0, x, y, jax.random.key(2), protocol=FEDSGD).update
    config = SMEConfig(iterations=3, alpha_init=0.0, learn_alpha=False, tv=0.0, layers=["fc1"], layer_weights=[2])
    assert config.layers == ("fc1",) and config.layer_weights == (2.0,) and hash(config)
    problem = make_sme(victim, config, batch_size=2, protocol=SGD_STEP, prior=None)
    _, (images, _, losses) = _trajectory(problem, target, {"variables": w0, "prior": None}, jax.random.key(4), 3)
    cos = lambda a, b: 1.0 - jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
    first = lambda g: jnp.concatenate([g["fc1"]["kernel"].ravel(), g["fc1"]["bias"].ravel()])
    want = [cos(first(dummy_gradient(victim, w0, im, target["label_probs"])), first(fedsgd)) for im in images]
    np.testing.assert_allclose(np.asarray(losses), np.asarray(want), rtol=1e-4, atol=1e-6)
    everything = make_sme(victim, dataclasses.replace(config, layers=None, layer_weights=None), batch_size=2,
                          protocol=SGD_STEP, prior=None)
    _, (_, _, all_losses) = _trajectory(everything, target, {"variables": w0, "prior": None}, jax.random.key(4), 3)
    assert abs(float(all_losses[0]) - float(losses[0])) > 1e-3
    with pytest.raises(ValueError, match="one weight per entry"):
        SMEConfig(layers=["fc1", "head"], layer_weights=[1.0])


# --------------------------------------------------------------------------- FM


@pytest.mark.slow  # heavy for the default suite (CI budget); run with -m slow
def test_fm_with_lambda_zero_is_sme_step_for_step_and_lambda_positive_is_not():
    victim = get_victim("mlp", image_shape=(8, 8, 1), num_classes=3, hidden=6)
    w0, _, _, target = _client(victim, 2)
    unet = UNetConfig(image_size=8, channels=1, **TINY_UNET)
    params = _noisy_unet(unet)
    fields = {"iterations": 6, "tv": 0.01}
    sme = make_sme(victim, SMEConfig(**fields), batch_size=2, protocol=SGD_STEP, prior=None)
    fm0 = make_fm(victim, FMConfig(**fields, lambda_fm=0.0), batch_size=2, protocol=SGD_STEP, prior=unet)
    fm1 = make_fm(victim, FMConfig(**fields, lambda_fm=10.0), batch_size=2, protocol=SGD_STEP, prior=unet)
    key = jax.random.key(5)
    _, a = _trajectory(sme, target, {"variables": w0, "prior": None}, key, 6)
    _, b = _trajectory(fm0, target, {"variables": w0, "prior": params}, key, 6)
    _, c = _trajectory(fm1, target, {"variables": w0, "prior": params}, key, 6)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert not np.array_equal(np.asarray(a[0][-1]), np.asarray(c[0][-1]))


def test_fm_needs_a_prior_that_fits():
    victim = get_victim("mlp", image_shape=(8, 8, 1), num_classes=3, hidden=6)
    with pytest.raises(ValueError, match="needs the prior"):
        make_fm(victim, FMConfig(iterations=2), batch_size=1, protocol=SGD_STEP, prior=None)
    with pytest.raises(ValueError, match=r"\(8, 8, 3\) images, the victim's are \(8, 8, 1\)"):
        make_fm(victim, FMConfig(iterations=2), batch_size=1, protocol=SGD_STEP,
                prior=UNetConfig(image_size=8, channels=3, **TINY_UNET))
    with pytest.raises(TypeError, match="FMConfig"):
        make_fm(victim, SMEConfig(iterations=2), batch_size=1, protocol=SGD_STEP, prior=None)


def test_tau_ramp_ends_and_the_one_minus_tau_squared_variant():
    ramp = functools.partial(fm_tau, iterations=101, tau_start=0.6, tau_end=0.95)
    np.testing.assert_allclose([float(ramp(0)), float(ramp(50)), float(ramp(100)), float(ramp(500))],
                               [0.6, 0.775, 0.95, 0.95], rtol=1e-6)
    assert FMConfig().tau_start == 0.6 and FMConfig().tau_end == 0.95 and FMConfig().iterations == 20_000
    cfg = UNetConfig(image_size=8, channels=1, **TINY_UNET)
    params = _noisy_unet(cfg)
    images = jax.random.uniform(jax.random.key(2), (3, 8, 8, 1))
    velocity = jax.jit(functools.partial(make_unet(cfg).apply, {"params": params}))
    for tau in (0.6, 0.95):
        plain = float(fm_regularizer(velocity, images, jnp.float32(tau), "none"))
        scaled = float(fm_regularizer(velocity, images, jnp.float32(tau), "one_minus_tau_sq"))
        # per-pixel mean of v^2 over the batch = mean of jaxleak.priors.velocity_norm's per-image values
        np.testing.assert_allclose(plain, float(jnp.mean(velocity_norm(params, cfg, images, tau))), rtol=1e-5)
        np.testing.assert_allclose(scaled, (1 - tau) ** 2 * plain, rtol=1e-6)
        assert plain > 0


def test_sme_total_variation_is_the_mean_of_both_directions():
    x = jnp.arange(12.0).reshape(1, 3, 4, 1)  # |dw| = 1 everywhere, |dh| = 4 everywhere
    np.testing.assert_allclose(float(sme_total_variation(x)), 2.5)


@pytest.mark.parametrize("fields,needle", [
    ({"labels": "joint"}, "labels must be one of"),
    ({"space": "lab"}, "space must be one of"),
    ({"alpha_init": 1.5}, "alpha_init"),
    ({"mean": (0.5,)}, "both mean and std"),
    ({"fm_scale": "cubic"}, "fm_scale"),
    ({"tau_end": 1.2}, "tau_start and tau_end"),
    ({"lambda_fm": -1.0}, "lambda_fm"),
    ({"update_model": "rmsprop"}, "update_model must be one of"),
    ({"sign_kappa": -1.0}, "sign_kappa"),
])
def test_bad_configs_are_one_line_value_errors(fields, needle):
    with pytest.raises(ValueError, match=needle) as e:
        FMConfig(**fields)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- recovery


def test_sme_recovers_a_tiny_image_from_one_sgd_step():
    """Noise-free: mlp on 4x4x1, M = 1, one local SGD step; SME's defaults except tv = 0 (a random
    4x4 target is the worst case for a TV prior), 200 iterations: PSNR > 40 dB (measured ~54)."""
    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=16)
    protocol = Protocol(kind="fedavg", local_epochs=1, local_batch=1, optimizer="sgd", lr=0.004)
    w0, x, _, target = _client(victim, 1, protocol=protocol)
    config = SMEConfig(iterations=200, tv=0.0)
    problem = make_sme(victim, config, batch_size=1, protocol=protocol, prior=None)
    targets = jax.tree_util.tree_map(lambda a: a[None], target)
    res = run_problem(problem, targets, {"variables": w0, "prior": None}, RunOptions(iterations=200))
    assert float(metrics.psnr(jnp.asarray(res.images[0]), x)[0]) > 40.0


def test_fm_recovers_a_tiny_image_with_a_non_zero_prior():
    """SME's toy case with a random UNet whose velocity is not zero, so FM's regulariser pulls the
    images away from the truth, at lambda_fm = 1 (100x the default, where it is clearly active: measured
    56.7 dB at lambda_fm = 0, 40.0 at 1, 12.1 at 100) and FM's tau ramp: 200 iterations, PSNR > 35 dB."""
    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=16)
    protocol = Protocol(kind="fedavg", local_epochs=1, local_batch=1, optimizer="sgd", lr=0.004)
    w0, x, _, target = _client(victim, 1, protocol=protocol)
    unet = UNetConfig(image_size=4, channels=1, **TINY_UNET)
    params = _noisy_unet(unet)
    assert float(velocity_norm(params, unet, x, 0.8)[0]) > 1e-3
    config = FMConfig(iterations=200, tv=0.0, lambda_fm=1.0)
    problem = make_fm(victim, config, batch_size=1, protocol=protocol, prior=unet)
    targets = jax.tree_util.tree_map(lambda a: a[None], target)
    res = run_problem(problem, targets, {"variables": w0, "prior": params}, RunOptions(iterations=200))
    assert float(metrics.psnr(jnp.asarray(res.images[0]), x)[0]) > 35.0


# --------------------------------------------------------------------------- Adam clients

ADAM_STEP = Protocol(kind="fedavg", local_epochs=1, local_batch=1, optimizer="adam", lr=0.1)


def test_soft_sign_tends_to_sign_and_to_a_multiple_of_g():
    g = jax.random.normal(jax.random.key(0), (50,)) * jnp.logspace(-3, 1, 50)
    np.testing.assert_allclose(soft_sign(g, 1e-12), jnp.sign(g), atol=1e-4)
    big = soft_sign(g, 1e6)
    np.testing.assert_allclose(big / jnp.linalg.norm(big), g / jnp.linalg.norm(g), atol=1e-5)


def test_adam_update_model_fits_one_adam_step_where_the_gradient_model_does_not():
    """One local Adam step: u = lr * g / (|g| + eps) at w0. At alpha = 0 and the true image the soft
    sign of the trial gradient is nearly parallel to u; the raw gradient is not."""
    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=16)
    w0, x, _, target = _client(victim, 1, protocol=ADAM_STEP)
    weights = layer_weights(w0["params"])
    def loss(model, kappa=1e-4):
        return float(surrogate_matching(victim, w0, target["update"], jnp.float32(0.0), x,
                                        target["label_probs"], weights, update_model=model, kappa=kappa))
    assert loss("adam") < 1e-3
    assert loss("gradient") > 0.1
    with pytest.raises(ValueError, match="update_model"):
        loss("sign")


# --------------------------------------------------------------------------- CLI


def _save_prior(path, size):
    """A random (untrained, nonzero-output) 1-channel prior folder, as :func:`export_prior` writes one."""
    cfg = UNetConfig(image_size=size, channels=1, **TINY_UNET)
    train = {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "steps"}
    config = {"unet": cfg.to_dict(), "train": train, "data": {"count": 0, "image_shape": [size, size, 1]}}
    params = jax.tree_util.tree_map(np.asarray, _noisy_unet(cfg))
    return artifacts.save_artifact(path, kind=KIND, config=config, tree={"params": params},
                                   extra={"steps": 1})


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fedavg_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedavg")
    caps = root / "caps.npz"
    assert main(["capture", "--dataset", "mnist-embedded", "--split", "train", "--model", "mlp",
                 "--hidden", "8", "--image-size", "8", "--n", "2", "--protocol", "fedavg", "--samples", "2",
                 "--local-batch", "1",
                 "--local-optimizer", "sgd", "--local-lr", "0.004", "--keep-update", "--quiet",
                 "--out", str(caps)]) == 0
    priors = {name: _save_prior(root / f"prior_{name}", size)
              for name, size in (("fits", 8), ("too_big", 16))}
    return {"caps": caps, **priors}


def test_every_present_fedavg_attack_is_registered_with_its_needs():
    from jaxleak.attacks.fedavg._runner import SPECS, needs_prior
    from jaxleak.attacks.registry import attacks

    registry = attacks()
    assert {"sme", "fm"} <= set(registry)
    for name in SPECS:
        if name in registry:
            attack = registry[name]
            assert attack.family == "fedavg" and attack.needs == ("whole_update", "weights")
            assert attack.config().labels in ("known", "infer")
    assert needs_prior(FMConfig()) and not needs_prior(FMConfig(lambda_fm=0.0))
    assert not needs_prior(SMEConfig())


def test_attack_sme_and_fm_on_a_fedavg_capture(fedavg_files, tmp_path, capsys):
    code, out, err = _run(capsys, "attack", "sme", "--captures", fedavg_files["caps"],
                          "--out", tmp_path / "sme", "--space", "normalized",  # SME's default is pixel
                          "--iterations", "20", "--lpips-net", "none", "--quiet", "--json")
    assert code == 0, err
    meta = json.loads((tmp_path / "sme" / "metrics.json").read_text())
    assert meta["attack"] == "sme" and meta["config"]["iterations"] == 20 and meta["config"]["tv"] == 0.01
    assert meta["config"]["space"] == "normalized"
    assert meta["attack_protocol"]["kind"] == "fedavg" and meta["attack_protocol"]["optimizer"] == "sgd"
    assert meta["labels"] == "known" and meta["prior"] is None and meta["normalization"]["std"] == [
        pytest.approx(0.3081)]
    assert len(meta["metrics"]["psnr"]["values"]) == 4  # 2 clients x M = 2, Hungarian-matched
    assert json.loads(out)["timing"]["seconds_per_iteration"] > 0

    code, out, err = _run(capsys, "attack", "fm", "--captures", fedavg_files["caps"],
                          "--out", tmp_path / "fm",
                          "--prior", fedavg_files["fits"], "--iterations", "10", "--lambda-fm", "0.1",
                          "--fm-scale", "one_minus_tau_sq", "--labels", "infer", "--lpips-net", "none",
                          "--quiet")
    assert code == 0, err
    meta = json.loads((tmp_path / "fm" / "metrics.json").read_text())
    assert meta["attack"] == "fm" and meta["config"]["lambda_fm"] == 0.1 and meta["labels"] == "infer"
    assert meta["config"]["fm_scale"] == "one_minus_tau_sq"
    assert meta["prior"]["source"] == str(fedavg_files["fits"].resolve())
    recon = np.load(tmp_path / "fm" / "reconstructions.npz")
    assert recon["images"].shape == (2, 2, 8, 8, 1)
    assert 0 <= recon["images"].min() <= recon["images"].max() <= 1


def test_a_prior_of_another_size_is_a_one_line_error(fedavg_files, tmp_path, capsys):
    code, _, err = _run(capsys, "attack", "fm", "--captures", fedavg_files["caps"], "--out", tmp_path / "x",
                        "--prior", fedavg_files["too_big"], "--iterations", "2", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "16x16x1" in err and "8x8x1" in err
    code, _, err = _run(capsys, "attack", "fm", "--captures", fedavg_files["caps"], "--out", tmp_path / "y",
                        "--prior", tmp_path / "nowhere", "--iterations", "2", "--quiet")
    assert code == 2 and "no prior" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_attack_sme_adam_variant_from_the_cli_and_a_bad_update_model(fedavg_files, tmp_path, capsys):
    code, _, err = _run(capsys, "attack", "sme", "--captures", fedavg_files["caps"], "--out", tmp_path / "a",
                        "--set", "update_model=adam", "--set", "alpha_init=0", "--iterations", "5",
                        "--lpips-net", "none", "--quiet")
    assert code == 0, err
    meta = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert meta["config"]["update_model"] == "adam" and meta["config"]["alpha_init"] == 0.0
    assert meta["config"]["sign_kappa"] == 0.01
    code, _, err = _run(capsys, "attack", "sme", "--captures", fedavg_files["caps"], "--out", tmp_path / "b",
                        "--set", "update_model=rmsprop", "--iterations", "5", "--quiet")
    assert code == 2 and "update_model must be one of" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
