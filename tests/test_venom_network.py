"""Venom's Diff-LRN and variants: liquid unit, FiLM, shapes, variants, jit and gradients.

Init compiles dominate the run time, so every architecture is initialised once
(module-scoped fixtures, jitted init with an ``unsafe_rbg`` key, which XLA
compiles several times faster than threefry on CPU).
"""

import dataclasses
import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxleak.attacks.venom import (
    ALPHA_EPS,
    VARIANTS,
    DiffLRN,
    FGLAGenerator,
    LiquidTimeEmbedding,
    RecoveryNetConfig,
    VenomDiff,
    film,
    liquid_alpha,
    liquid_dynamics,
    liquid_update,
    make_recovery_net,
    sinusoidal_embedding,
)
from jaxleak.attacks.venom._embedding import Time2Vec, logit
from jaxleak.attacks.venom._layers import ResnetBlock, depth_to_space, space_to_depth
from jaxleak.attacks.venom._unet import padding_for_downsampling, prime_factors, shuffle_stages

TINY = {
    "base_width": 8,
    "multipliers": (1, 2),
    "resnet_blocks": 1,
    "groups": 4,
    "time_dim": 8,
    "attention_heads": 2,
    "attention_head_dim": 4,
}


def _key(seed=0):
    return jax.random.key(seed, impl="unsafe_rbg")


def _build(feature_shape, image_shape, variant="venom", batch=2, **overrides):
    config = RecoveryNetConfig(
        image_shape=image_shape,
        feature_shape=feature_shape,
        variant=variant,
        **{**TINY, **overrides},
    )
    model = make_recovery_net(config)
    x = jax.random.uniform(jax.random.key(1), (batch, *feature_shape))
    t = jnp.linspace(0.5, 8.0, batch)
    variables = jax.jit(model.init)(_key(), x, t)
    return model, variables, x, t


@functools.cache
def _jit_apply(model):
    """One jitted ``apply`` per model: tests calling it with the same shapes share one compilation."""
    return jax.jit(model.apply)


@pytest.fixture(scope="module")
def small_venom():
    return _build((8, 8, 12), (32, 32, 3))


@pytest.fixture(scope="module")
def mnist_variants():
    return {v: _build((7, 7, 16), (28, 28, 1), variant=v) for v in VARIANTS}


# ----------------------------------------------------------------- liquid unit


def _spectral_scaled(rng, n, norm):
    w = rng.standard_normal((n, n))
    return jnp.asarray(w * (norm / np.linalg.norm(w, 2)), jnp.float32)


def _trajectory(h0, drive, w_rec, alpha, steps):
    hs = [h0]
    for _ in range(steps):
        hs.append(liquid_update(hs[-1], drive, w_rec, alpha))
    return jnp.stack(hs)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("rec_norm", [0.0, 0.5, 0.9])
def test_liquid_update_contracts_at_rate_of_theorem_2(alpha, rec_norm):
    """||h_{k+1} - h_k|| <= ((1 - alpha) + alpha ||W_rec||_2) ||h_k - h_{k-1}||, and for two
    starting states ||F(h) - F(h')|| <= L ||h - h'|| (the contraction of Theorem 2)."""
    rng = np.random.default_rng(int(100 * alpha + 10 * rec_norm))
    n = 16
    w_rec = _spectral_scaled(rng, n, rec_norm)
    drive = jnp.asarray(3 * rng.standard_normal(n), jnp.float32)
    rate = (1 - alpha) + alpha * rec_norm
    hs = _trajectory(jnp.zeros(n), drive, w_rec, alpha, 30)
    diffs = np.linalg.norm(np.diff(np.asarray(hs, np.float64), axis=0), axis=1)
    assert diffs[0] > 0.1
    keep = diffs[:-1] > 1e-5  # float32 round-off dominates below
    assert np.all(diffs[1:][keep] <= rate * diffs[:-1][keep] * (1 + 1e-4) + 1e-7)
    # Two trajectories from different starts approach each other at rate L per step.
    a = _trajectory(jnp.asarray(rng.standard_normal(n), jnp.float32), drive, w_rec, alpha, 10)
    b = _trajectory(jnp.asarray(rng.standard_normal(n), jnp.float32), drive, w_rec, alpha, 10)
    gaps = np.linalg.norm(np.asarray(a - b, np.float64), axis=1)
    assert np.all(gaps[1:] <= rate * gaps[:-1] * (1 + 1e-4) + 1e-7)


@pytest.mark.parametrize("alpha", [0.1, 0.6])
def test_liquid_rate_is_exactly_one_minus_alpha_without_recurrence(alpha):
    """With W_rec = 0 the fixed point is tanh(drive) and the error shrinks by exactly 1 - alpha."""
    drive = jnp.array([-2.0, -0.3, 0.0, 0.7, 5.0])
    hs = _trajectory(jnp.zeros(5), drive, jnp.zeros((5, 5)), alpha, 8)
    err = np.asarray(hs, np.float64) - np.tanh(np.asarray(drive, np.float64))
    np.testing.assert_allclose(err[1:], (1 - alpha) * err[:-1], rtol=1e-5, atol=1e-7)
    h10 = liquid_dynamics(drive, jnp.zeros((5, 5)), alpha, 8)
    np.testing.assert_allclose(h10, hs[-1], rtol=1e-6)


def test_liquid_update_formula():
    h = jnp.array([0.5, -1.0])
    drive = jnp.array([0.2, 0.1])
    w = jnp.array([[0.1, 0.2], [0.3, 0.4]])
    expected = h + 0.25 * (np.tanh(np.asarray(drive) + np.asarray(h) @ np.asarray(w)) - h)
    np.testing.assert_allclose(liquid_update(h, drive, w, 0.25), expected, rtol=1e-6)


@pytest.mark.parametrize("a", [-np.inf, -1e4, -50.0, -17.0, 0.0, 17.0, 50.0, 1e4, np.inf])
def test_alpha_stays_strictly_inside_unit_interval(a):
    alpha = float(liquid_alpha(jnp.float32(a)))
    assert 0.0 < alpha < 1.0
    assert np.float32(ALPHA_EPS) <= alpha <= np.float32(1 - ALPHA_EPS)


def test_liquid_embedding_init_and_matches_the_equations():
    t = jnp.array([0.0, 1.5, 7.0])
    module = LiquidTimeEmbedding(8, steps=5)
    params = module.init(_key(), t)["params"]
    alpha = float(liquid_alpha(params["alpha_logit"]))
    assert alpha == pytest.approx(0.1, abs=1e-7)
    assert float(params["alpha_logit"]) == pytest.approx(math.log(0.1 / 0.9), abs=1e-6)
    assert float(np.linalg.norm(np.asarray(params["w_rec"]), 2)) == pytest.approx(0.5, abs=1e-5)
    # Recompute eqs. 9-12 by hand from the parameters.
    p = jax.tree.map(np.asarray, params)
    tt = np.asarray(t)[:, None]
    t2v = p["time2vec"]
    t_enc = np.concatenate(
        [
            tt @ t2v["linear"]["kernel"] + t2v["linear"]["bias"],
            np.sin(tt @ t2v["periodic"]["kernel"] + t2v["periodic"]["bias"]),
        ],
        axis=1,
    )
    drive = t_enc @ p["w_in"]["kernel"] + p["w_in"]["bias"]
    h = np.zeros_like(drive)
    for _ in range(5):
        h = h + alpha * (np.tanh(drive + h @ p["w_rec"]) - h)
    proj = h @ p["proj"]["kernel"] + p["proj"]["bias"]
    gate = 1 / (1 + np.exp(-(proj @ p["gate"]["kernel"] + p["gate"]["bias"])))
    np.testing.assert_allclose(module.apply({"params": params}, t), gate * h, rtol=1e-4, atol=1e-6)
    # Extreme alpha parameters keep the embedding finite.
    for a in (-1e4, 1e4):
        extreme = {**params, "alpha_logit": jnp.float32(a)}
        assert np.all(np.isfinite(module.apply({"params": extreme}, t)))


def test_time2vec_halves():
    module = Time2Vec(6)
    params = module.init(_key(), jnp.zeros(2))
    out = module.apply(params, jnp.array([0.0, 2.0]))
    assert out.shape == (2, 6)
    assert np.all(np.abs(out[:, 3:]) <= 1.0)
    p = params["params"]
    np.testing.assert_allclose(
        out[1, :3], 2.0 * p["linear"]["kernel"][0] + p["linear"]["bias"], rtol=1e-6
    )


def test_sinusoidal_embedding():
    emb = sinusoidal_embedding(jnp.array([0.0, 2.0]), 8)
    np.testing.assert_array_equal(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(emb[1, 0], np.sin(2.0), rtol=1e-6)  # lowest frequency is 1
    np.testing.assert_allclose(emb[1, 3], np.sin(2.0 * 1e-4), rtol=1e-4)  # highest is 1e-4
    with pytest.raises(ValueError):
        sinusoidal_embedding(jnp.zeros(1), 7)


# ------------------------------------------------------------------------ FiLM


def test_film_with_zero_scale_and_shift_is_exactly_identity():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4)) * 1e3
    zeros = jnp.zeros((2, 4))
    np.testing.assert_array_equal(film(x, zeros, zeros), x)
    scale = jnp.arange(8.0).reshape(2, 4)
    shift = -jnp.ones((2, 4))
    np.testing.assert_allclose(
        film(x, scale, shift)[1, 2, 1], x[1, 2, 1] * (scale[1] + 1) - 1, rtol=1e-6
    )


def test_resnet_block_with_zeroed_film_equals_unconditioned_block():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    cond = jax.random.normal(jax.random.key(1), (2, 5))
    block = ResnetBlock(8, groups=4)
    params = jax.jit(block.init)(_key(), x, cond)["params"]
    assert params["film"]["kernel"].shape == (5, 16)
    zeroed = {**params, "film": jax.tree.map(jnp.zeros_like, params["film"])}
    plain = {k: v for k, v in params.items() if k != "film"}
    apply = jax.jit(block.apply)
    np.testing.assert_array_equal(
        apply({"params": zeroed}, x, cond), apply({"params": plain}, x, None)
    )
    assert not np.allclose(apply({"params": params}, x, cond), apply({"params": plain}, x, None))


def _resnet_blocks(params):
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return {k.rsplit("/", 2)[0] for k in flat if "/conv1/" in k}, flat


def test_every_resnet_block_has_film_except_in_fgla(mnist_variants):
    for variant in ("venom", "venom-diff"):
        blocks, flat = _resnet_blocks(mnist_variants[variant][1]["params"])
        # 1 block per stage x 2 stages x (down + up) + 2 mid + 1 out
        assert len(blocks) == 7
        for block in blocks:
            assert f"{block}/film/kernel" in flat, block
    blocks, flat = _resnet_blocks(mnist_variants["fgla"][1]["params"])
    assert len(blocks) == 7
    assert not any("film" in k for k in flat)
    assert not any("time_embedding" in k for k in flat)


# ------------------------------------------------------------- shapes and range


@pytest.mark.parametrize(
    "feature_shape,image_shape",
    [((8, 8, 12), (32, 32, 3)), ((4, 4, 512), (32, 32, 3)), ((7, 7, 16), (28, 28, 1))],
)
def test_output_shape_and_range(feature_shape, image_shape, small_venom, mnist_variants):
    if feature_shape == (8, 8, 12):
        model, variables, x, t = small_venom
    elif feature_shape == (7, 7, 16):
        model, variables, x, t = mnist_variants["venom"]
    else:
        model, variables, x, t = _build(feature_shape, image_shape, batch=1, resnet_blocks=1)
    y = _jit_apply(model)(variables, x, t)
    assert y.shape == (x.shape[0], *image_shape)
    assert np.all(np.isfinite(y)) and np.all(y > 0) and np.all(y < 1)


@pytest.mark.slow
def test_output_shape_and_range_venom_lenet_256():
    model, variables, x, t = _build((64, 64, 16), (256, 256, 3), batch=1)
    y = jax.jit(model.apply)(variables, x, t)
    assert y.shape == (1, 256, 256, 3)
    assert np.all(y > 0) and np.all(y < 1)


def test_non_integer_upsampling_and_odd_maps():
    model, variables, x, t = _build(
        (5, 3, 2), (12, 10, 1), variant="fgla", batch=1, linear_attention=False
    )
    y = jax.jit(model.apply)(variables, x, t)
    assert y.shape == (1, 12, 10, 1) and np.all((y > 0) & (y < 1))


# ----------------------------------------------------------------- variants


def test_variants_build_run_and_use_t_as_documented(mnist_variants):
    x = mnist_variants["venom"][2]
    outs = {}
    for variant, (model, variables, _, _) in mnist_variants.items():
        apply = _jit_apply(model)
        outs[variant] = (
            apply(variables, x, jnp.array([0.0, 0.0])),
            apply(variables, x, jnp.array([9.0, 2.0])),
        )
        assert outs[variant][0].shape == (2, 28, 28, 1)
    assert isinstance(mnist_variants["venom"][0], DiffLRN)
    assert isinstance(mnist_variants["venom-diff"][0], VenomDiff)
    assert isinstance(mnist_variants["fgla"][0], FGLAGenerator)
    assert not np.allclose(*outs["venom"], atol=1e-6)
    assert not np.allclose(*outs["venom-diff"], atol=1e-6)
    np.testing.assert_array_equal(*outs["fgla"])  # FGLA ignores T


def test_scalar_t_broadcasts(small_venom):
    model, variables, x, _ = small_venom
    apply = _jit_apply(model)
    np.testing.assert_allclose(
        apply(variables, x, 3.0), apply(variables, x, jnp.full(x.shape[:1], 3.0, jnp.float32)),
        rtol=1e-6,
    )


def test_bad_inputs_raise(small_venom):
    model, variables, x, t = small_venom
    with pytest.raises(ValueError, match="features"):
        model.apply(variables, x[0], t)
    with pytest.raises(ValueError, match="features"):
        model.apply(variables, x[..., :4], t)
    with pytest.raises(ValueError, match="noise_strength"):
        model.apply(variables, x, jnp.zeros(5))
    with pytest.raises(ValueError, match="noise_strength"):
        model.apply(variables, x, None)


@pytest.mark.parametrize(
    "bad",
    [
        {"variant": "gan"},
        {"groups": 3},
        {"time_dim": 7},
        {"multipliers": ()},
        {"liquid_steps": 0},
        {"alpha_init": 1.0},
        {"image_shape": (32, 32)},
        {"feature_shape": (0, 4, 4)},
    ],
)
def test_config_validation(bad):
    kwargs = {"image_shape": (32, 32, 3), "feature_shape": (8, 8, 12), **TINY}
    with pytest.raises(ValueError):
        RecoveryNetConfig(**{**kwargs, **bad})


def test_config_is_frozen_and_keyword_only():
    config = RecoveryNetConfig(image_shape=(32, 32, 3), feature_shape=[8, 8, 12])
    assert config.feature_shape == (8, 8, 12)
    assert (config.base_width, config.multipliers, config.variant) == (64, (1, 2, 4), "venom")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.base_width = 8
    with pytest.raises(TypeError):
        RecoveryNetConfig((32, 32, 3), (8, 8, 12))
    with pytest.raises(TypeError):
        make_recovery_net({"variant": "venom"})


# --------------------------------------------------------- jit and gradients


def test_one_adam_step_changes_params_and_lowers_mse(small_venom):
    model, variables, x, t = small_venom
    target = jax.random.uniform(jax.random.key(7), (x.shape[0], 32, 32, 3))
    params = variables["params"]

    def loss(p):
        return jnp.mean((model.apply({"params": p}, x, t) - target) ** 2)

    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value, grads

    state = opt.init(params)
    new, _, before, grads = step(params, state)
    _, _, after, _ = step(new, state)  # the loss at the new params, from the compiled step
    assert float(after) < float(before)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # The liquid leak rate and the recurrence get gradients, so T conditioning is trained.
    emb = grads["time_embedding"]
    assert float(jnp.abs(emb["alpha_logit"])) > 0 and float(jnp.abs(emb["w_rec"]).max()) > 0
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new)
    assert all(jax.tree.leaves(changed))


# ------------------------------------------------------------------- helpers


def test_resampling_helpers():
    assert padding_for_downsampling(7, 2) == (0, 1)
    assert padding_for_downsampling(4, 2) == (0, 0)
    assert padding_for_downsampling(1, 2) == (1, 2)
    assert (
        prime_factors(1) == [] and prime_factors(8) == [2, 2, 2] and prime_factors(12) == [3, 2, 2]
    )
    assert shuffle_stages((64, 64), (256, 256)) == ((2, 2), (2, 2))
    assert shuffle_stages((4, 4), (32, 32)) == ((2, 2),) * 3
    assert shuffle_stages((8, 8), (8, 8)) == ()
    assert shuffle_stages((4, 8), (24, 8)) == ((3, 1), (2, 1))
    x = jnp.arange(2 * 4 * 6 * 3.0).reshape(2, 4, 6, 3)
    np.testing.assert_array_equal(depth_to_space(space_to_depth(x, 2), 2, 2), x)
    y = depth_to_space(jnp.arange(4.0).reshape(1, 1, 1, 4), 2, 2)
    np.testing.assert_array_equal(y[0, :, :, 0], [[0, 1], [2, 3]])


def test_logit():
    assert logit(0.5) == 0.0
    with pytest.raises(ValueError):
        logit(1.0)
