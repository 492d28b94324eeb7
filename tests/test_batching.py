"""The batching edge (jaxleak._batching): padding, pytrees, indices, devices, one compile, chunk size."""

import json
import os
import subprocess
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak._batching import map_chunked, placement, take_rows
from jaxleak.attacks.spe import SPEConfig, spe_batch

CHUNK = 4


class Pair(NamedTuple):
    total: jax.Array
    scaled: dict


def _one(item, index):
    """One item: a pytree in, a pytree out, exact in float32 (small integers)."""
    x, (y, z) = item["x"], item["yz"]
    return Pair(total=jnp.sum(x) + y, scaled={"z": 2.0 * z, "index": index})


def _expected(item, index):
    x, (y, z) = item["x"], item["yz"]
    return Pair(total=x.sum(axis=1) + y, scaled={"z": 2.0 * z, "index": index})


def _items(n):
    rng = np.random.default_rng(n)
    x = rng.integers(-5, 5, (n, 3)).astype(np.float32)
    y = rng.integers(-5, 5, (n,)).astype(np.float32)
    z = rng.integers(-5, 5, (n, 2, 2)).astype(np.float32)
    return {"x": x, "yz": (y, z)}


@pytest.mark.parametrize("n", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 2])
@pytest.mark.parametrize("pad", ["edge", "zeros"])
def test_pads_the_last_chunk_and_drops_the_padding(n, pad):
    items, index = _items(n), np.arange(n, dtype=np.int32)
    out = map_chunked(jax.jit(jax.vmap(_one)), items, index, chunk=CHUNK, pad=pad)
    want = _expected(items, index)
    assert isinstance(out, Pair)
    for got, ref in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want), strict=True):
        assert isinstance(got, np.ndarray) and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)


def test_shared_arguments_device_output_and_a_plain_callable():
    w = np.float32(3.0)
    x = np.arange(7, dtype=np.float32)
    out = map_chunked(jax.vmap(lambda s, v: s * v, in_axes=(None, 0)), x, shared=(w,), chunk=3,
                      out="device")
    assert isinstance(out, jax.Array)
    np.testing.assert_array_equal(np.asarray(out), 3.0 * x)
    on_device = map_chunked(jax.jit(jax.vmap(lambda v: v + 1)), jnp.asarray(x), chunk=3)
    np.testing.assert_array_equal(on_device, x + 1)


def test_indices_make_random_draws_independent_of_the_chunk_size():
    """fold_in(key, index) per item: threefry and the samplers are exact, so draws are bit for bit."""
    key = jax.random.PRNGKey(7)
    draw = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (5, 3))))
    index = np.arange(11, dtype=np.uint32)
    runs = [map_chunked(draw, index, chunk=c) for c in (1, 4, 11)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other, runs[0])


def test_one_trace_for_many_chunks():
    traces = []

    def one(x):
        traces.append(x.shape)  # runs once per trace, not per call
        return x * 2

    fn = jax.jit(jax.vmap(one))
    out = map_chunked(fn, np.arange(10.0), chunk=3)  # 3 + 3 + 3 + padded 1
    np.testing.assert_array_equal(out, 2 * np.arange(10.0))
    map_chunked(fn, np.arange(5.0), chunk=3)  # same chunk shape: no new trace
    assert traces == [()]


def test_empty_input_gives_empty_output_of_the_right_shape():
    out = map_chunked(jax.jit(jax.vmap(lambda x: (x.sum(), x * 2))), np.zeros((0, 3), np.float32),
                      chunk=4)
    assert out[0].shape == (0,) and out[1].shape == (0, 3) and out[1].dtype == np.float32


def test_take_rows_and_placement():
    a = np.arange(12).reshape(6, 2)
    assert np.shares_memory(take_rows(a, 2, 3), a)  # a full chunk is a view, not a copy
    np.testing.assert_array_equal(take_rows(a, 4, 3), [[8, 9], [10, 11], [10, 11]])
    np.testing.assert_array_equal(take_rows(jnp.asarray(a), 4, 3, pad="zeros"),
                                  [[8, 9], [10, 11], [0, 0]])
    layout = placement(5, devices=1)
    assert (layout.size, layout.devices) == (5, 1)


def test_bad_arguments():
    fn = jax.jit(jax.vmap(lambda x, y: x + y))
    x = np.zeros(3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk"):
            map_chunked(fn, x, x, chunk=bad)
    with pytest.raises(ValueError, match="leading axis"):
        map_chunked(fn, x, np.zeros(4), chunk=2)
    with pytest.raises(ValueError, match="leading axis"):
        map_chunked(fn, x, np.float32(1.0), chunk=2)
    with pytest.raises(ValueError, match="at least one"):
        map_chunked(lambda: 0, chunk=2)
    with pytest.raises(ValueError, match="pad"):
        map_chunked(fn, x, x, chunk=2, pad="reflect")
    with pytest.raises(ValueError, match="out"):
        map_chunked(fn, x, x, chunk=2, out="list")
    with pytest.raises(ValueError, match="devices"):
        map_chunked(fn, x, x, chunk=2, devices=jax.local_device_count() + 1)


# Chunk-size invariance, measured on the 2-core CPU dev machine (jax 0.10.2, 2026-12-01): results are
# NOT bit for bit across chunk sizes. XLA compiles one program per chunk shape and may vectorise
# reductions differently, so SPE features (K=100, d=768, N=64) moved by up to 8.9e-7 of the
# field's largest magnitude between chunk 1, 7 and 64, per-example gradients of LeNet by up to
# 3.9e-7, and capture_updates (LeNet, paper calibration) by up to 1.3e-7 in absolute value;
# FGLA (one einsum) and random draws were bit for bit. Discrete outputs (SPE's selected classes)
# agreed. The tolerance below is ten times the largest measured difference.
REL_TO_MAX = 1e-5


def _close(got, ref):
    """|got - ref| <= REL_TO_MAX * max|ref|, leaf by leaf; integer and boolean leaves exactly."""
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
        g, r = np.asarray(g), np.asarray(r)
        if np.issubdtype(r.dtype, np.floating):
            scale = float(np.max(np.abs(r), initial=0.0)) or 1.0
            np.testing.assert_allclose(g, r, rtol=0, atol=REL_TO_MAX * scale)
        else:
            np.testing.assert_array_equal(g, r)


def test_spe_agrees_across_chunk_sizes_to_float32_rounding():
    rng = np.random.default_rng(0)
    n, k, shape = 15, 10, (8, 8, 2)
    gw = rng.normal(size=(n, k, int(np.prod(shape)))).astype(np.float32)
    gb = rng.normal(size=(n, k)).astype(np.float32)
    config = SPEConfig(noise_rank=1)
    run = lambda c: jax.tree_util.tree_map(  # noqa: E731
        np.asarray, spe_batch(gw, gb, feature_shape=shape, config=config, chunk_size=c))
    ref = run(None)
    for c in (1, 7):
        _close(run(c), ref)
    again = run(7)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(run(7)), strict=True):
        np.testing.assert_array_equal(a, b)  # the same chunk size is bit for bit


def test_vmapped_gradient_agrees_across_chunk_sizes_to_float32_rounding():
    rng = np.random.default_rng(1)
    params = {"w1": rng.normal(size=(12, 16)).astype(np.float32) / 4,
              "w2": rng.normal(size=(16, 5)).astype(np.float32) / 4}
    x = rng.normal(size=(20, 12)).astype(np.float32)
    y = rng.integers(0, 5, 20)

    def loss(p, xi, yi):
        logits = jnp.tanh(xi @ p["w1"]) @ p["w2"]
        return -jax.nn.log_softmax(logits)[yi]

    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
    ref = map_chunked(grads, x, y, shared=(params,), chunk=20)
    for c in (1, 7):
        _close(map_chunked(grads, x, y, shared=(params,), chunk=c), ref)


_TWO_DEVICES = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jaxleak._batching import map_chunked, placement
assert jax.local_device_count() == 2
traces = []
def loss(p, xi, yi):
    traces.append(1)
    return -jax.nn.log_softmax(jnp.tanh(xi @ p["w1"]) @ p["w2"])[yi]
rng = np.random.default_rng(1)
params = {"w1": rng.normal(size=(12, 16)).astype(np.float32), "w2": rng.normal(size=(16, 5)).astype(np.float32)}
x, y = rng.normal(size=(7, 12)).astype(np.float32), rng.integers(0, 5, 7)
grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
one = map_chunked(grads, x, y, shared=(params,), chunk=3, devices=1)
n_one = len(traces)
both = map_chunked(grads, x, y, shared=(params,), chunk=3, devices=None)  # 3 rounded up to 4
dev = map_chunked(grads, x, y, shared=(params,), chunk=3, devices=2, out="device")
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(both)))
print(json.dumps({"diff": diff, "size": placement(3, 2).size, "shape": list(both["w1"].shape),
                  "sharded": len(dev["w1"].sharding.device_set), "traces": [n_one, len(traces)]}))
"""


def test_two_host_devices_give_the_same_result_as_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _TWO_DEVICES], env=env, capture_output=True,
                         text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["size"] == 4 and got["shape"] == [7, 12, 16] and got["sharded"] == 2
    # one trace for one device; the sharded chunk has another shape (4), one more trace for it
    assert got["traces"] == [1, 2]
    assert got["diff"] < 1e-6
