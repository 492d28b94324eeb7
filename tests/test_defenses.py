"""Defenses as composable transforms: each one's property, chains, the text spelling, DP."""

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import defenses
from jaxleak.defenses import (
    Chain,
    Defense,
    DefenseSpecError,
    chain,
    clip_norm,
    clip_value,
    dp_from_config,
    dp_paper,
    dpsgd,
    format_chain,
    gaussian,
    keep_largest,
    laplace,
    parse_chain,
    protect_update,
    prune_smallest,
    quantize,
)
from jaxleak.privacy import DPConfig, dpsgd_noise_multiplier, global_norm, resolve

KEY = jax.random.PRNGKey(0)


def _update(seed: int = 0) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4))},
            "head": {"kernel": jax.random.normal(k2, (7, 3)), "bias": jax.random.normal(k3, (3,))}}


def _per_example(batch: int) -> dict:
    # optax's trick: example i is all i's, so every clipped norm and mean is known exactly.
    return {
        "head": {"kernel": jnp.stack([jnp.full((3, 2), float(i)) for i in range(batch)]),
                 "bias": jnp.stack([jnp.full((2,), float(i)) for i in range(batch)])},
        "conv": {"kernel": jnp.stack([jnp.full((4,), float(i)) for i in range(batch)])},
    }


def test_public_api_resolves():
    for name in defenses.__all__:
        assert getattr(defenses, name) is not None, name


def test_clip_norm_bounds_the_global_norm_and_keeps_small_updates_bit_identical():
    u = _update()
    assert float(global_norm(u)) > 2.0
    out = jax.jit(clip_norm(2.0).apply)(u, KEY)
    assert float(global_norm(out)) == pytest.approx(2.0, rel=1e-6)
    chex.assert_trees_all_close(out, jax.tree_util.tree_map(lambda x: x * 2.0 / global_norm(u), u),
                                rtol=1e-6)
    inside = jax.jit(clip_norm(100.0).apply)(u, KEY)
    chex.assert_trees_all_equal(inside, u)


def test_clip_value_clamps_every_coordinate():
    u = _update()
    out = jax.jit(clip_value(0.5).apply)(u, KEY)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(u)):
        assert float(jnp.max(jnp.abs(a))) == pytest.approx(0.5)
        inside = np.abs(np.asarray(b)) <= 0.5
        np.testing.assert_array_equal(np.asarray(a)[inside], np.asarray(b)[inside])


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.5, 0.95, 1.0])
def test_sparsifiers_prune_and_keep_exactly_round_fraction_per_leaf(fraction):
    u = {**_update(1), "flat": jnp.ones((13,)), "tie": jnp.array([2.0, 1.0, 1.0, 1.0, 1.0, 3.0])}
    pruned = jax.jit(prune_smallest(fraction).apply)(u, KEY)
    kept = jax.jit(keep_largest(fraction).apply)(u, KEY)
    for leaf, p, k in zip(*(jax.tree_util.tree_leaves(t) for t in (u, pruned, kept))):
        leaf, p, k = np.asarray(leaf), np.asarray(p), np.asarray(k)
        n = round(fraction * leaf.size)
        assert np.count_nonzero(p == 0) == n  # no input coordinate is 0
        assert np.count_nonzero(k) == n
        np.testing.assert_array_equal(p[p != 0], leaf[p != 0])  # survivors keep their value
        np.testing.assert_array_equal(k[k != 0], leaf[k != 0])
        if 0 < n < leaf.size:  # the magnitude rule: every survivor is at least every removed one
            assert np.abs(leaf[p != 0]).min() >= np.abs(leaf[p == 0]).max()
            assert np.abs(leaf[k != 0]).min() >= np.abs(leaf[k == 0]).max()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_quantization_levels(bits):
    u = _update(2)
    out = jax.jit(quantize(bits).apply)(u, KEY)
    levels = 2 ** (bits - 1) - 1
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(u)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        step = np.abs(b).max() / levels
        assert len(np.unique(a)) <= 2**bits - 1
        np.testing.assert_allclose(a / step, np.round(a / step), atol=1e-4)  # on the grid
        assert np.abs(a - b).max() <= step / 2 * (1 + 1e-5)
        assert np.abs(a).max() == pytest.approx(np.abs(b).max(), rel=1e-6)
    zeros = quantize(8).apply({"z": jnp.zeros(5)}, KEY)["z"]
    assert np.asarray(zeros).tolist() == [0.0] * 5


def test_sign_quantization_keeps_the_sign_and_the_mean_magnitude():
    u = _update(3)
    out = jax.jit(quantize(1).apply)(u, KEY)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(u)):
        a, b = np.asarray(a), np.asarray(b)
        assert len(np.unique(a)) == 2 and len(np.unique(np.abs(a))) == 1
        assert np.abs(a)[0] == pytest.approx(np.abs(b).mean(), rel=1e-6)
        np.testing.assert_array_equal(np.sign(a), np.sign(b))


@pytest.mark.parametrize("defense,std,kurtosis", [
    (gaussian(0.01), 0.01, 3.0), (laplace(0.02), 0.02 * math.sqrt(2), 6.0),
])
def test_noise_std_is_the_given_one(defense, std, kurtosis):
    n = 100_000
    out = np.asarray(jax.jit(defense.apply)({"w": jnp.zeros((n,))}, KEY)["w"], np.float64)
    # The standard error of a sample std is ~ std * sqrt((kurtosis - 1) / (4 n)); 6 of them.
    assert abs(out.std() - std) < 6 * std * math.sqrt((kurtosis - 1) / (4 * n))
    assert abs(out.mean()) < 6 * std / math.sqrt(n)
    assert defense.meta["noise_std"] == pytest.approx(std)


def test_chain_order_matters_and_is_recorded():
    u = {"w": jnp.linspace(-1.0, 1.0, 1000)}
    clip_then_noise = chain(clip_value(0.1), gaussian(0.05))
    noise_then_clip = chain(gaussian(0.05), clip_value(0.1))
    a = jax.jit(clip_then_noise.update)(u, KEY)["w"]
    b = jax.jit(noise_then_clip.update)(u, KEY)["w"]
    assert float(jnp.max(jnp.abs(b))) <= 0.1 + 1e-7 < float(jnp.max(jnp.abs(a)))
    assert [m["name"] for m in clip_then_noise.meta] == ["clip-value", "gaussian"]
    assert [m["name"] for m in noise_then_clip.meta] == ["gaussian", "clip-value"]
    assert all(m["stage"] == "update" for m in clip_then_noise.meta)
    assert clip_then_noise != noise_then_clip
    assert clip_then_noise == chain(clip_value(0.1), gaussian(0.05))
    assert hash(clip_then_noise) == hash(chain(clip_value(0.1), gaussian(0.05)))


def test_chain_gives_each_update_defense_its_own_key_and_empty_chain_is_the_identity():
    u = {"w": jnp.zeros((64,))}
    twice = chain(gaussian(1.0), gaussian(1.0)).update(u, KEY)["w"]
    once = gaussian(1.0).apply(u, jax.random.fold_in(KEY, 0))["w"]
    assert not np.allclose(np.asarray(twice), 2 * np.asarray(once))
    empty = chain()
    assert empty.update(u, KEY) is u
    assert empty.step is None and empty.dp is None and empty.meta == []


def test_chain_rejects_two_dp_defenses_dp_after_an_update_defense_and_non_defenses():
    with pytest.raises(ValueError, match="at most one DP"):
        chain(dp_paper(epsilon=10.0), dpsgd(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="before 'gaussian'"):
        chain(gaussian(0.1), dpsgd(noise_multiplier=1.0))
    with pytest.raises(TypeError, match="Defense"):
        chain(lambda u, k: u)
    c = chain(dpsgd(noise_multiplier=1.0), gaussian(0.1))
    assert c.step.name == "dpsgd" and c.dp["noise_multiplier"] == 1.0
    assert [m["stage"] for m in c.meta] == ["step", "update"]


CANONICAL = [
    "none",
    "gaussian:0.001",
    "laplace:0.5",
    "clip-norm:1",
    "clip-value:0.05",
    "prune-smallest:0.05",
    "keep-largest:0.05",
    "quantize:1",
    "quantize:8",
    "dp-paper:eps=10,delta=1e-05,lr=0.001,clip=1",
    "dp-paper:eps=2.5,delta=1e-06,lr=0.01,clip=0.5,mechanism=laplace,scope=layer",
    "dpsgd:eps=8,delta=1e-05,clip=1,q=1",
    "dpsgd:z=1.1,delta=1e-05,clip=2,q=0.1,accountant=pld",
    "dpsgd:z=0,delta=1e-05,clip=1,q=1",
    "dp-paper:eps=10,delta=1e-05,lr=0.001,clip=1,clip-norm:1,gaussian:0.001,quantize:8",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_parse_format_round_trip(text):
    c = parse_chain(text, batch_size=2, steps=3)
    assert isinstance(c, Chain)
    assert format_chain(c) == text
    assert parse_chain(format_chain(c), batch_size=2, steps=3) == c
    json.dumps(c.meta, allow_nan=False)  # JSON-ready, no Infinity


def test_parse_reads_loose_spellings_and_the_protocol_values():
    c = parse_chain(" dp-paper:eps=10, delta=1e-5 ,clip-norm:1.0, gaussian:1e-3")
    canonical = "dp-paper:eps=10,delta=1e-05,lr=0.001,clip=1,clip-norm:1,gaussian:0.001"
    assert format_chain(c) == canonical
    d = parse_chain("dpsgd:eps=4", batch_size=5, steps=20, sampling_rate=0.2).dp
    assert (d["steps"], d["sampling_rate"], d["batch_size"]) == (20, 0.2, 5)
    assert parse_chain("dpsgd:eps=4,q=0.5", sampling_rate=0.2).dp["sampling_rate"] == 0.5
    layer = parse_chain("dp-paper:eps=10,scope=layer", layer_path=("Dense_1",)).dp
    assert layer["layer_path"] == ["Dense_1"]


@pytest.mark.parametrize("text", [
    "", "  ", "gausian:0.1", "gaussian", "gaussian:", "gaussian:abc", "gaussian:-1", "gaussian:nan",
    "gaussian:inf", "laplace:-0.1", "clip-norm:0", "clip-value:-1", "prune-smallest:1.5",
    "keep-largest:-0.1", "quantize:8.0", "quantize:0", "quantize:25", "none,gaussian:0.1", "none:1",
    "dp-paper", "dp-paper:", "dp-paper:delta=1e-5", "dp-paper:eps=10,foo=1",
    "dp-paper:eps=10,eps=5",
    "dp-paper:eps=abc", "dp-paper:eps=0", "dp-paper:eps=inf", "dp-paper:eps=10,scope=head",
    "dp-paper:eps=10,mechanism=cauchy", "dp-paper:eps=10,delta", "dp-paper:eps=10,delta=",
    "dp-paper:eps=10,z=1", "dpsgd:eps=8,z=1", "dpsgd:delta=1e-5", "dpsgd:eps=8,q=0",
    "dpsgd:z=-1", "dpsgd:eps=8,accountant=moments", "dpsgd:eps=8,lr=0.1", "gaussian:0.1,delta=1e-5",
    "delta=1e-5", "gaussian:0.1,,laplace:0.1", "gaussian:0.1,", ",gaussian:0.1",
    "dp-paper:eps=10,dpsgd:eps=8", "gaussian:0.1,dp-paper:eps=10",
])
def test_malformed_chains_are_rejected_in_one_line(text):
    with pytest.raises(DefenseSpecError) as info:
        parse_chain(text)
    message = str(info.value)
    assert "\n" not in message and "bad defense item" in message and "dpsgd:eps=E|z=Z" in message


def test_dp_paper_equals_protect_update_and_the_exact_clipped_mean():
    g = _per_example(3)  # head layer of example i: norm i * sqrt(8); conv: i * 2
    d = dp_paper(epsilon=2.0, batch_size=3)
    r = resolve(DPConfig(calibration="paper", epsilon=2.0), batch_size=3)
    assert d.stage == "step" and d.meta["noise_std"] == r.noise_std
    ours = jax.jit(d.apply)(g, KEY)
    today = jax.jit(lambda g, k: protect_update(g, k, calibration="paper", mechanism="gaussian",
                                                clip=1.0, noise_scale=r.noise_scale))(g, KEY)
    chex.assert_trees_all_equal(ours, today)
    quiet = dp_from_config(DPConfig(calibration="paper", epsilon=1e12), batch_size=3).apply(g, KEY)
    head = sum(i * min(1.0, 1.0 / (i * math.sqrt(8))) if i else 0.0 for i in range(3)) / 3
    conv = sum(i * min(1.0, 1.0 / (i * 2.0)) if i else 0.0 for i in range(3)) / 3
    np.testing.assert_allclose(quiet["head"]["kernel"], np.full((3, 2), head), rtol=1e-6)
    np.testing.assert_allclose(quiet["conv"]["kernel"], np.full((4,), conv), rtol=1e-6)
    layer = dp_paper(epsilon=2.0, batch_size=3, scope="layer", layer_path=("head",))
    ours = jax.jit(layer.apply)(g, KEY)
    today = jax.jit(lambda g, k: protect_update(g, k, calibration="paper", mechanism="gaussian",
                                                clip=1.0, noise_scale=r.noise_scale,
                                                only=("head",)))(g, KEY)
    chex.assert_trees_all_equal(ours, today)
    assert np.asarray(ours["conv"]["kernel"]).tolist() == [1.0] * 4  # the plain mean of 0, 1, 2


def test_dp_meta_holds_the_whole_calibration():
    keys = {"calibration", "mechanism", "epsilon", "epsilon_tight", "delta", "clip", "noise_std",
            "noise_variance", "noise_multiplier", "accountant", "steps", "sampling_rate", "scope"}
    paper = dp_paper(epsilon=10.0, batch_size=2).meta
    assert keys <= set(paper) and paper["name"] == "dp-paper"
    assert paper["epsilon_tight"] == pytest.approx(10.39, abs=0.01)
    assert paper["noise_variance"] == pytest.approx(paper["noise_std"] ** 2)
    assert dp_paper(epsilon=3.0, mechanism="laplace").meta["epsilon_tight"] == 3.0
    sgd = dpsgd(epsilon=4.0, batch_size=4, steps=10, sampling_rate=0.5).meta
    assert keys <= set(sgd) and sgd["epsilon_tight"] == sgd["epsilon"] == 4.0
    z = dpsgd_noise_multiplier(4.0, 1e-5, sampling_rate=0.5, steps=10)
    assert sgd["noise_multiplier"] == z and sgd["noise_std"] == pytest.approx(z / 4)
    off = dpsgd(noise_multiplier=0.0).meta
    assert off["epsilon"] is None and off["epsilon_tight"] is None and "no noise" in off["note"]
    json.dumps([paper, sgd, off], allow_nan=False)
    assert dp_from_config(DPConfig(calibration="none"), batch_size=1) is None
    assert dp_from_config(DPConfig(epsilon=10.0), batch_size=2).meta == paper


def test_dpsgd_without_noise_is_the_exact_clipped_mean():
    g = _per_example(4)  # example i has global norm i * sqrt(12)
    out = jax.jit(dpsgd(noise_multiplier=0.0, batch_size=4).apply)(g, KEY)
    per_coord = sum(i * min(1.0, 1.0 / (i * math.sqrt(12))) if i else 0.0 for i in range(4)) / 4
    np.testing.assert_allclose(out["head"]["kernel"], np.full((3, 2), per_coord), rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: dpsgd(epsilon=1.0, noise_multiplier=1.0),
    lambda: dpsgd(),
    lambda: dpsgd(noise_multiplier=1.0, steps=0),
    lambda: dpsgd(noise_multiplier=1.0, batch_size=0),
    lambda: dp_paper(epsilon=10.0, scope="layer"),
    lambda: dp_paper(epsilon=10.0, lr=0.0),
    lambda: gaussian(float("nan")),
    lambda: quantize(True),
    lambda: prune_smallest("0.1"),
])
def test_factories_reject_bad_parameters_in_one_line(make):
    with pytest.raises(ValueError) as info:
        make()
    assert "\n" not in str(info.value)


def test_step_defense_checks_the_batch_axis():
    with pytest.raises(ValueError, match="batch_size=2"):
        dp_paper(epsilon=10.0, batch_size=2).apply(_per_example(3), KEY)


def test_a_whole_chain_under_jit_and_vmap_over_three_clients():
    c = parse_chain("dpsgd:z=1,clip-norm:0.5,quantize:8,gaussian:0.01", batch_size=4)

    def client(grads, key):
        return c.update(c.step.apply(grads, jax.random.fold_in(key, 0)), jax.random.fold_in(key, 1))

    grads = jax.tree_util.tree_map(lambda x: jnp.stack([x, -x, 2 * x]), _per_example(4))
    keys = jax.random.split(KEY, 3)
    out = jax.jit(jax.vmap(client))(grads, keys)
    chex.assert_shape(out["head"]["kernel"], (3, 3, 2))
    one = jax.jit(client)(jax.tree_util.tree_map(lambda x: x[1], grads), keys[1])
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[1], out), one, atol=1e-6)
    assert isinstance(c.step, Defense) and c.step.meta["noise_multiplier"] == 1.0
