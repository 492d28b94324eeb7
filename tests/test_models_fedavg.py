"""The FedAvg victims (convnet-sme, vgg11, mlp-mixer) and the PRECODE bottleneck."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak.models import get_victim
from jaxleak.models._mixer import patchify


def _host_variables(victim, seed: int = 0):
    """Random variables of the right structure, drawn with NumPy.

    Compiling ``victim.init`` compiles one sampler per parameter (seconds on a
    busy CPU); the properties tested here hold for any values, so most tests use
    these. Only the init test calls ``victim.init``.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "var" in name:
            values = rng.uniform(0.5, 1.5, leaf.shape)
        elif len(leaf.shape) >= 2:
            values = rng.standard_normal(leaf.shape) / np.sqrt(math.prod(leaf.shape[:-1]))
        else:
            values = 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, victim.abstract_variables())


def _count(victim) -> int:
    shapes = victim.abstract_variables()["params"]
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("k", [2, 10])
def test_shapes_and_parameter_counts_at_32(k):
    sme = get_victim("convnet-sme", image_shape=(32, 32, 3), num_classes=k)
    assert sme.width == 64 and not sme.has_batch_stats and sme.conv_impl == "xla"
    assert sme.layers["head"].feature_shape == (1, 1, 200)
    assert sme.layers["fc"].feature_shape == (8, 8, 128) and sme.layers["fc"].in_features == 8192
    convs = 3 * 3 * 3 * 64 + 64 + 3 * 3 * 64 * 128 + 128
    assert _count(sme) == convs + 8192 * 200 + 200 + 200 * k + k

    vgg = get_victim("vgg11", image_shape=(32, 32, 3), num_classes=k)
    assert vgg.has_batch_stats and vgg.layers["head"].feature_shape == (1, 1, 512)
    channels = [3, 64, 128, 256, 256, 512, 512, 512, 512]
    convs = sum(9 * a * b + b for a, b in zip(channels, channels[1:]))
    batch_norms = sum(2 * c for c in channels[1:])
    assert _count(vgg) == convs + batch_norms + 512 * k + k
    if k == 10:
        assert _count(vgg) == 9_231_114  # the kuangliu-style CIFAR VGG('VGG11')

    mixer = get_victim("mlp-mixer", image_shape=(32, 32, 3), num_classes=k)
    assert mixer.width == 128 and mixer.conv_impl is None and not mixer.has_batch_stats
    assert mixer.layers["head"].feature_shape == (1, 1, 128)
    tokens, c = 64, 128
    block = 2 * (2 * c) + (tokens * 64 + 64 + 64 * tokens + tokens) + (c * 512 + 512 + 512 * c + c)
    assert _count(mixer) == (48 * c + c) + 4 * block + 2 * c + c * k + k


def test_vgg_and_mixer_shape_rules():
    assert get_victim("vgg11", image_shape=(64, 32, 1), num_classes=3, width=2).layers[
        "head"
    ].feature_shape == (2, 1, 16)
    with pytest.raises(ValueError, match="multiples of 32"):
        get_victim("vgg11", image_shape=(16, 16, 3), num_classes=3)
    with pytest.raises(ValueError, match="multiples of 4"):
        get_victim("convnet-sme", image_shape=(30, 32, 3), num_classes=3)
    with pytest.raises(ValueError, match="multiples of 4"):
        get_victim("mlp-mixer", image_shape=(18, 16, 3), num_classes=3)
    with pytest.raises(ValueError, match="no convolutions"):
        get_victim("mlp-mixer", image_shape=(16, 16, 3), num_classes=3, conv_impl="patches")
    with pytest.raises(ValueError, match="takes no hidden"):
        get_victim("vgg11", image_shape=(32, 32, 3), num_classes=3, hidden=4)
    with pytest.raises(ValueError, match="width"):
        get_victim("mlp-mixer", image_shape=(16, 16, 3), num_classes=3, width=1)


def test_patchify_is_row_major_tiles():
    images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Token 1 is the top-right tile, flattened (row, column, channel).
    np.testing.assert_array_equal(patches[1, 1], images[1, :4, 4:, :].reshape(-1))


def test_convnet_sme_init_is_torch_default_and_forward_by_hand():
    victim = get_victim("convnet-sme", image_shape=(16, 16, 3), num_classes=5, width=4)
    variables = victim.init(jax.random.key(0))
    params = variables["params"]
    assert set(variables) == {"params"}
    assert set(params) == {"conv0", "conv1", "fc", "head"}
    fan_in = {"conv0": 9 * 3, "conv1": 9 * 4, "fc": 4 * 4 * 8, "head": 200}
    assert params["conv0"]["kernel"].shape == (3, 3, 3, 4)  # HWIO
    assert params["fc"]["kernel"].shape == (128, 200)  # [in, out]
    for name, n in fan_in.items():
        bound = 1.0 / math.sqrt(n)
        for leaf in ("kernel", "bias"):
            values = np.asarray(params[name][leaf])
            assert values.min() >= -bound and values.max() <= bound, (name, leaf)
            assert np.abs(values).mean() > 0.1 * bound, (name, leaf)  # biases are not zeroed
            if values.size >= 100:  # U(-b, b) has standard deviation b / sqrt(3)
                np.testing.assert_allclose(values.std(), bound / math.sqrt(3), rtol=0.15)

    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))

    @jax.jit
    def by_hand_and_victim(variables, images):
        params, x = variables["params"], images
        for name in ("conv0", "conv1"):
            p = params[name]
            x = jax.lax.conv_general_dilated(
                x, p["kernel"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            x = jax.nn.relu(x + p["bias"])
            x = x.reshape(2, x.shape[1] // 2, 2, x.shape[2] // 2, 2, x.shape[3]).mean(axis=(2, 4))
        fc_input = x.reshape(2, -1)  # NHWC flatten
        hidden = jax.nn.relu(fc_input @ params["fc"]["kernel"] + params["fc"]["bias"])
        logits = hidden @ params["head"]["kernel"] + params["head"]["bias"]
        outputs = (
            victim.apply(variables, images),
            victim.layer_input(variables, images, layer="fc"),
            victim.layer_input(variables, images),
        )
        return (logits, fc_input, hidden), outputs

    (logits, fc_input, hidden), outputs = by_hand_and_victim(variables, images)
    for got, want in zip(outputs, (logits, fc_input, hidden)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "shape", "width", "gradients"),
    [
        ("convnet-sme", (12, 12, 3), 2, True),
        ("vgg11", (32, 32, 1), 1, False),
        # ~10 s of CPU compile for VGG's per-example gradients in both modes.
        pytest.param("vgg11", (32, 32, 1), 1, True, marks=pytest.mark.slow),
    ],
    ids=["convnet-sme", "vgg11-forward", "vgg11-gradients"],
)
def test_patches_convolution_matches_xla(name, shape, width, gradients):
    from jaxleak.capture import per_example_grads

    kw = {"image_shape": shape, "num_classes": 4, "width": width}
    xla = get_victim(name, conv_impl="xla", **kw)
    patches = get_victim(name, conv_impl="patches", **kw)
    assert xla.with_conv_impl("patches") == patches
    # Same parameter tree (Conv draws nn.Conv's parameters in either mode, see test_models).
    assert xla.abstract_variables() == patches.abstract_variables()
    va = _host_variables(xla, 3)
    x = jnp.asarray(np.random.default_rng(1).random((2, *shape), np.float32))
    y = jnp.array([0, 3])

    @jax.jit
    def both(v, images, labels):  # one compile for the two implementations
        return [
            (
                victim.apply(v, images),
                per_example_grads(victim, v, images, labels) if gradients else {},
            )
            for victim in (xla, patches)
        ]

    (logits_a, ga), (logits_b, gb) = both(va, x, y)
    np.testing.assert_allclose(logits_b, logits_a, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert hash(xla) != hash(patches)


# --------------------------------------------------------------------------- PRECODE

KB = 4


@functools.cache
def _precoded(precode_beta: float | None = None):
    victim = get_victim(
        "mlp", image_shape=(8, 8, 1), num_classes=3, hidden=6, precode=KB,
        precode_beta=precode_beta,
    )  # fmt: skip
    return victim, _host_variables(victim)


def test_precode_structure_and_metadata_round_trip():
    victim, variables = _precoded()
    plain = get_victim("mlp", image_shape=(8, 8, 1), num_classes=3, hidden=6)
    assert victim.stochastic and not plain.stochastic
    assert victim.precode == KB and victim.precode_beta == 1e-3
    bottleneck = variables["params"]["precode"]
    assert bottleneck["encoder"]["kernel"].shape == (6, 2 * KB)
    assert bottleneck["decoder"]["kernel"].shape == (KB, 6)
    # The head still exists and sees the decoder output, shaped as the map it saw before.
    assert victim.layers["head"] == plain.layers["head"]
    assert victim.layers["precode"].path == ("precode", "encoder")
    assert victim.layers["precode"].feature_shape == (1, 1, 6)

    meta = victim.metadata()
    assert meta["options"] == {"hidden": [6], "precode": KB, "precode_beta": 1e-3}
    rebuilt = get_victim(
        meta["model"], image_shape=meta["image_shape"], num_classes=meta["num_classes"],
        **meta["options"],
    )  # fmt: skip
    assert rebuilt == victim and hash(rebuilt) == hash(victim)
    assert hash(plain) != hash(victim)
    other_beta = get_victim(
        "mlp", image_shape=(8, 8, 1), num_classes=3, hidden=6, precode=KB, precode_beta=0.01
    )
    assert other_beta.metadata()["options"]["precode_beta"] == 0.01
    assert hash(other_beta) != hash(victim) and other_beta != victim
    sme = get_victim("convnet-sme", image_shape=(8, 8, 1), num_classes=3, width=2, precode=KB)
    assert sme.with_conv_impl("patches").module.precode == KB


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precode": 0}, "precode"),
        ({"precode": 2.5}, "precode"),
        ({"precode_beta": 1e-3}, "needs precode"),
        ({"precode": 4, "precode_beta": -1.0}, "precode_beta"),
        ({"precode": 4, "precode_beta": float("nan")}, "precode_beta"),
    ],
)
def test_precode_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_victim("mlp", image_shape=(8, 8, 1), num_classes=3, hidden=6, **kwargs)


def test_precode_loss_needs_a_key_and_depends_on_it():
    victim, variables = _precoded()
    image, label = jax.random.uniform(jax.random.key(5), (8, 8, 1)), 2
    params = variables["params"]
    with pytest.raises(ValueError, match="PRNG key"):
        victim.loss(params, None, image, label)
    with pytest.raises(ValueError, match="PRNG key"):
        victim.batch_loss(variables, image[None], jnp.array([label]))
    loss = jax.jit(victim.loss)
    a = loss(params, None, image, label, jax.random.key(1))
    b = loss(params, None, image, label, jax.random.key(2))
    assert a != b
    assert a == loss(params, None, image, label, jax.random.key(1))


def test_precode_loss_by_hand():
    victim, variables = _precoded()
    params = variables["params"]
    image, label, key = jax.random.uniform(jax.random.key(5), (8, 8, 1)), 1, jax.random.key(7)
    loss = jax.jit(victim.loss)(params, None, image, label, key)

    # The eps the loss drew: the same module call, with the sown intermediates kept.
    _, state = victim.module.apply(
        variables, image[None], train=False, rngs={"precode": key}, mutable=["intermediates"]
    )
    eps = np.asarray(state["intermediates"]["precode"]["eps"][-1][0], np.float64)
    assert np.abs(eps).max() > 0
    as64 = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64), params)
    x = np.asarray(image, np.float64).reshape(-1)
    h = np.maximum(x @ as64["fc1"]["kernel"] + as64["fc1"]["bias"], 0.0)
    stats = h @ as64["precode"]["encoder"]["kernel"] + as64["precode"]["encoder"]["bias"]
    mean, std = stats[:KB], np.log1p(np.exp(stats[KB:]))
    z = mean + std * eps
    decoded = z @ as64["precode"]["decoder"]["kernel"] + as64["precode"]["decoder"]["bias"]
    logits = decoded @ as64["head"]["kernel"] + as64["head"]["bias"]
    cross_entropy = np.log(np.sum(np.exp(logits))) - logits[label]
    kl = 0.5 * np.sum(mean**2 + std**2 - 1.0 - 2.0 * np.log(std))
    np.testing.assert_allclose(loss, cross_entropy + 1e-3 * kl / np.log(2.0), rtol=1e-5)


def test_precode_gradients_reach_the_bottleneck_and_the_encoder_leaks():
    victim, variables = _precoded()
    params = variables["params"]
    image = jax.random.uniform(jax.random.key(5), (8, 8, 1))
    grads = jax.jit(jax.grad(victim.loss))(params, None, image, 0, jax.random.key(3))
    for part in ("encoder", "decoder"):
        assert np.abs(np.asarray(grads["precode"][part]["kernel"])).max() > 1e-6, part
    # Both halves of the encoder (mean and std) learn.
    encoder = np.asarray(grads["precode"]["encoder"]["kernel"], np.float64)
    assert np.abs(encoder[:, :KB]).max() > 1e-6 and np.abs(encoder[:, KB:]).max() > 1e-6
    # One example: the encoder's gradient is rank one, x delta^T, with x its input.
    bias = np.asarray(grads["precode"]["encoder"]["bias"], np.float64)
    j = int(np.argmax(np.abs(bias)))
    features = victim.layer_input(variables, image[None], layer="precode")[0]
    np.testing.assert_allclose(encoder[:, j] / bias[j], features, rtol=1e-4, atol=1e-6)


def test_precode_apply_is_deterministic_without_a_key():
    victim, variables = _precoded()
    images = jax.random.uniform(jax.random.key(5), (3, 8, 8, 1))
    apply = jax.jit(victim.apply)
    a, b = apply(variables, images), apply(variables, images)
    np.testing.assert_array_equal(a, b)
    sampled = apply(variables, images, key=jax.random.key(1))
    assert not np.allclose(sampled, a)
    np.testing.assert_array_equal(sampled, apply(variables, images, key=jax.random.key(1)))
    # Without a key the bottleneck passes its mean: z = mu by hand.
    p = variables["params"]
    h = jax.nn.relu(images.reshape(3, -1) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    mean = (h @ p["precode"]["encoder"]["kernel"] + p["precode"]["encoder"]["bias"])[:, :KB]
    decoded = mean @ p["precode"]["decoder"]["kernel"] + p["precode"]["decoder"]["bias"]
    logits = decoded @ p["head"]["kernel"] + p["head"]["bias"]
    np.testing.assert_allclose(a, logits, rtol=1e-5, atol=1e-6)
    # Non-PRECODE victims ignore the key, in apply and in loss (positional 4-argument calls work).
    plain = get_victim("mlp", image_shape=(8, 8, 1), num_classes=3, hidden=6)
    pv = _host_variables(plain)
    np.testing.assert_array_equal(
        jax.jit(plain.apply)(pv, images), jax.jit(plain.apply)(pv, images, key=jax.random.key(1))
    )
    loss = jax.jit(plain.loss)
    assert loss(pv["params"], None, images[0], 1) == loss(
        pv["params"], None, images[0], 1, jax.random.key(4)
    )


def test_batch_loss_with_batchnorm_and_precode():
    victim = get_victim("convnet", image_shape=(9, 9, 1), num_classes=3, width=1, precode=KB)
    variables = _host_variables(victim)
    images = jax.random.uniform(jax.random.key(1), (4, 9, 9, 1))
    labels = jnp.array([0, 1, 2, 0])
    batch_loss = jax.jit(victim.batch_loss, static_argnames="train")
    loss, stats = batch_loss(variables, images, labels, train=True, key=jax.random.key(2))
    assert loss.shape == () and np.isfinite(loss)
    assert not np.allclose(stats["bn0"]["mean"], variables["batch_stats"]["bn0"]["mean"])
    eval_loss, same = batch_loss(variables, images, labels, train=False, key=jax.random.key(2))
    assert np.isfinite(eval_loss)
    np.testing.assert_array_equal(same["bn0"]["mean"], variables["batch_stats"]["bn0"]["mean"])


def test_per_example_losses_with_split_keys():
    victim, variables = _precoded()
    images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    labels = jnp.array([0, 1, 2, 0])
    keys = jax.random.split(jax.random.key(3), 4)
    losses = jax.jit(jax.vmap(victim.loss, in_axes=(None, None, 0, 0, 0)))
    per_example = losses(variables["params"], None, images, labels, keys)
    assert per_example.shape == (4,) and np.all(np.isfinite(per_example))
    # Example 0 with its own key is the same as computed alone.
    alone = jax.jit(victim.loss)(variables["params"], None, images[0], labels[0], keys[0])
    np.testing.assert_allclose(per_example[0], alone, rtol=1e-6)
    # Without PRECODE, batch_loss is the mean cross-entropy.
    plain = get_victim("mlp", image_shape=(8, 8, 1), num_classes=3, hidden=5)
    pv = _host_variables(plain)
    mean_ce, stats = jax.jit(plain.batch_loss)(pv, images, labels)
    per_ce = jax.jit(jax.vmap(plain.loss, in_axes=(None, None, 0, 0)))
    per = per_ce(pv["params"], None, images, labels)
    np.testing.assert_allclose(mean_ce, per.mean(), rtol=1e-6)
    assert stats == {}
