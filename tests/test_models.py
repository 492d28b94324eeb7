"""Victim models: shapes, the head's outer-product gradient, training and checkpoints."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import models
from jaxleak.models import (
    VICTIMS,
    DenseLayer,
    evaluate_victim,
    get_victim,
    load_variables,
    read_metadata,
    save_variables,
    train_victim,
)

K = 10

# (name, image_shape, options, expected head feature_shape) -- shapes worked out by hand.
CASES = [
    ("lenet-dlg", (32, 32, 3), {}, (8, 8, 12)),  # strides 2, 2, 1
    ("lenet-venom", (32, 32, 3), {}, (8, 8, 16)),  # two 2x2 pools
    ("lenet-venom", (28, 28, 1), {}, (7, 7, 16)),
    ("convnet", (32, 32, 3), {"width": 4}, (3, 3, 16)),  # 32 -> 10 -> 3, 4w channels
    ("resnet18", (16, 16, 3), {"width": 4}, (1, 1, 32)),  # global pool, 8w channels
    ("resnet18-spatial", (16, 16, 3), {"width": 4}, (2, 2, 32)),  # 16 / 8
    ("resnet8", (16, 16, 3), {"width": 4}, (1, 1, 16)),  # global pool, 4w channels
    ("resnet8-spatial", (16, 16, 3), {}, (4, 4, 64)),  # 16 / 4, default w = 16
    ("mlp", (32, 32, 3), {}, (1, 1, 256)),  # default hidden 256
    ("mlp", (28, 28, 1), {"hidden": (24, 12)}, (1, 1, 12)),
    ("convnet-sme", (16, 16, 3), {"width": 4}, (1, 1, 200)),  # fc 200 -> head; fc on 4x4x8
    ("vgg11", (32, 32, 3), {"width": 2}, (1, 1, 16)),  # 32 / 2**5, 8w channels
    ("mlp-mixer", (8, 8, 1), {"width": 4}, (1, 1, 4)),  # token mean of C = width
]
CASE_IDS = [f"{name}-{'x'.join(map(str, shape))}" for name, shape, _, _ in CASES]


def _random_variables(victim, seed: int):
    """Random variables of the right structure, drawn on the host.

    Compiling ``victim.init`` means compiling one threefry sampler per parameter,
    which takes ~10 s for a ResNet on a small CPU; the structural properties
    tested here hold for any parameter values, so the fast tests use these.
    ``victim.init`` itself is exercised on the cheap models (and all, in -m slow).
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        shape = leaf.shape
        if "var" in name:
            values = rng.uniform(0.5, 1.5, shape)
        elif "scale" in name:
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) >= 2:  # kernels: fan-in scaling keeps activations O(1) through depth
            values = rng.standard_normal(shape) / np.sqrt(math.prod(shape[:-1]))
        else:
            values = 0.1 * rng.standard_normal(shape)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, victim.abstract_variables())


@functools.cache
def _built(index: int):
    """Victim, variables and a random labelled batch of two for case ``index`` (built once)."""
    name, shape, options, _ = CASES[index]
    victim = get_victim(name, image_shape=shape, num_classes=K, **options)
    variables = _random_variables(victim, index)
    images = jax.random.uniform(jax.random.key(100 + index), (2, *shape))
    labels = jnp.array([3, 7])
    return victim, variables, images, labels


def test_public_api_imports():
    for name in models.__all__:
        assert hasattr(models, name), name
    assert set(VICTIMS) == {
        "lenet-dlg",
        "lenet-venom",
        "convnet",
        "resnet18",
        "resnet18-spatial",
        "resnet8",
        "resnet8-spatial",
        "mlp",
        "convnet-sme",
        "vgg11",
        "mlp-mixer",
    }
    assert all(isinstance(text, str) and text for text in VICTIMS.values())


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_forward_shapes_and_rank_one_gradients(index):
    _, shape, _, expected_feature_shape = CASES[index]
    victim, variables, images, labels = _built(index)
    head = victim.layers["head"]
    assert victim.image_shape == shape and victim.num_classes == K
    assert head.path == ("head",)
    assert head.feature_shape == expected_feature_shape
    kernel = head.select(variables["params"])["kernel"]
    assert kernel.shape == (math.prod(head.feature_shape), K) == (head.in_features, K)
    assert victim.has_batch_stats == ("batch_stats" in variables)

    @jax.jit
    def run(variables, images, labels):
        logits = victim.apply(variables, images)
        features = {key: victim.layer_input(variables, images, layer=key) for key in victim.layers}
        grads = jax.grad(victim.loss)(
            variables["params"], variables.get("batch_stats"), images[0], labels[0]
        )
        return logits, features, grads

    logits, features, grads = run(variables, images, labels)
    assert logits.shape == (2, K)
    assert np.all(np.isfinite(logits))
    for key, layer in victim.layers.items():
        assert features[key].shape == (2, layer.in_features)
        g = layer.select(grads)
        gw, gb = np.asarray(g["kernel"], np.float64), np.asarray(g["bias"], np.float64)
        x = np.asarray(features[key][0], np.float64)
        assert np.abs(gb).max() > 1e-6 and np.abs(x).max() > 1e-6  # a non-vacuous check
        # One example: dL/dW = x delta^T with delta = dL/db (Flax kernels are [d, K]).
        # Exactly rank one: every column is the same vector times gb[j] ...
        j = int(np.argmax(np.abs(gb)))
        recovered = gw[:, j] / gb[j]
        np.testing.assert_allclose(
            gw, np.outer(recovered, gb), rtol=1e-5, atol=1e-6 * np.abs(gw).max()
        )
        # ... and that vector is the layer's input (computed here by a separate, batched forward).
        np.testing.assert_allclose(recovered, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())
        singular = np.linalg.svd(gw, compute_uv=False)
        assert singular[1] <= 1e-5 * singular[0]
    if "first" in victim.layers:  # the MLP's fc1 sees the flattened image itself
        assert victim.layers["first"].feature_shape == shape
        assert victim.layers["first"].path == ("fc1",)
        np.testing.assert_array_equal(features["first"], np.asarray(images).reshape(2, -1))


def test_head_features_are_the_nhwc_flattened_map():
    victim, variables, images, _ = _built(1)  # lenet-venom 32x32x3
    feats = victim.layer_input(variables, images)
    # Recompute the map by hand: conv -> relu -> pool twice, then a plain NHWC reshape.
    x = images
    for name in ("conv0", "conv1"):
        p = variables["params"][name]
        x = jax.lax.conv_general_dilated(
            x, p["kernel"], (1, 1), ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(x + p["bias"])
        x = x.reshape(2, x.shape[1] // 2, 2, x.shape[2] // 2, 2, x.shape[3]).max(axis=(2, 4))
    np.testing.assert_allclose(feats, x.reshape(2, -1), rtol=1e-5, atol=1e-6)
    head = variables["params"]["head"]
    np.testing.assert_allclose(
        victim.apply(variables, images), feats @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-5
    )


def test_lenet_dlg_init_is_uniform_half():
    victim = get_victim("lenet-dlg", image_shape=(32, 32, 3), num_classes=K)
    variables = victim.init(jax.random.key(0))
    leaves = np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(variables)])
    assert leaves.min() >= -0.5 and leaves.max() <= 0.5
    assert leaves.min() < -0.45 and leaves.max() > 0.45  # spread over the range, biases too
    biases = np.concatenate([variables["params"][n]["bias"] for n in ("conv0", "head")])
    assert np.abs(biases).mean() > 0.1  # not zero-initialised


def _check_init(victim, key):
    variables = victim.init(key)
    abstract = victim.abstract_variables()
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(abstract)
    for leaf, spec in zip(
        jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(abstract)
    ):
        assert leaf.shape == spec.shape and leaf.dtype == jnp.float32
        assert np.all(np.isfinite(leaf))
    logits = jax.jit(victim.apply)(variables, jnp.ones((1, *victim.image_shape)))
    assert logits.shape == (1, victim.num_classes) and np.all(np.isfinite(logits))
    return variables


def test_init_is_deterministic_and_keyed():
    victim = get_victim("mlp", image_shape=(8, 8, 1), num_classes=3, hidden=(5, 4))
    a = _check_init(victim, jax.random.key(0))
    b = victim.init(jax.random.key(0))
    c = victim.init(jax.random.PRNGKey(1))  # raw uint32 keys work too
    assert set(a["params"]) == {"fc1", "fc2", "head"}
    np.testing.assert_array_equal(a["params"]["fc1"]["kernel"], b["params"]["fc1"]["kernel"])
    assert not np.allclose(a["params"]["fc1"]["kernel"], c["params"]["fc1"]["kernel"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lenet-venom", "convnet", "resnet8-spatial", "resnet18"])
def test_init_of_the_other_victims(name):
    # ~10-30 s each on 2 CPU cores: compiling one threefry sampler per parameter dominates.
    options = {} if name.startswith("lenet") else {"width": 2}
    victim = get_victim(name, image_shape=(16, 16, 3), num_classes=K, **options)
    variables = _check_init(victim, jax.random.key(0))
    if victim.has_batch_stats:  # BatchNorm starts from mean 0, variance 1
        stats = jax.tree_util.tree_leaves_with_path(variables["batch_stats"])
        for path, leaf in stats:
            expected = 1.0 if "var" in jax.tree_util.keystr(path) else 0.0
            np.testing.assert_array_equal(leaf, np.full(leaf.shape, expected))


def test_parameter_counts_match_the_reference_architectures():
    def count(victim):
        shapes = jax.eval_shape(victim.init, jax.random.key(0))["params"]
        return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))

    # DLG LeNet on CIFAR: convs 912 + 3612 + 3612, FC 768 -> 10.
    assert count(get_victim("lenet-dlg", image_shape=(32, 32, 3), num_classes=10)) == 15826
    # The CIFAR ResNet-18 (kuangliu / breaching): 11,173,962 parameters.
    assert count(get_victim("resnet18", image_shape=(32, 32, 3), num_classes=10)) == 11_173_962
    # ResNet-8, w = 16: stem 432+32, blocks 4672, 14528 (+576 shortcut), 55552 (+2176), head 650.
    assert count(get_victim("resnet8", image_shape=(32, 32, 3), num_classes=10)) == 78042
    # IG ConvNet (conv biases + BN scale/bias), head on 36w inputs at 32x32.
    w = 64
    channels = [3, w, 2 * w, 2 * w, 4 * w, 4 * w, 4 * w, 4 * w, 4 * w]
    convs = sum(9 * cin * cout + cout + 2 * cout for cin, cout in itertools.pairwise(channels))
    convnet = get_victim("convnet", image_shape=(32, 32, 3), num_classes=10)
    assert convnet.layers["head"].in_features == 36 * w
    assert count(convnet) == convs + 36 * w * 10 + 10


def test_venom_lenet_head_at_256_has_65536_inputs():
    victim = get_victim("lenet-venom", image_shape=(256, 256, 3), num_classes=10)
    assert victim.layers["head"].feature_shape == (64, 64, 16)
    assert victim.layers["head"].in_features == 65_536


def test_convnet_layer_names_follow_the_reference():
    _, variables, _, _ = _built(3)
    names = set(variables["params"])
    assert names == {f"conv{i}" for i in range(8)} | {f"bn{i}" for i in range(8)} | {"head"}
    assert set(variables["batch_stats"]) == {f"bn{i}" for i in range(8)}


def test_batchnorm_train_and_eval_modes():
    victim, variables, images, _ = _built(3)  # convnet
    logits, new_stats = victim.apply(variables, images, train=True)
    assert logits.shape == (2, K)
    assert jax.tree_util.tree_structure(new_stats) == jax.tree_util.tree_structure(
        variables["batch_stats"]
    )
    assert not np.allclose(new_stats["bn0"]["mean"], variables["batch_stats"]["bn0"]["mean"])
    # Inference mode is per-example: a batch gives the same logits as its members one by one.
    together = victim.apply(variables, images)
    alone = jnp.concatenate([victim.apply(variables, images[i : i + 1]) for i in range(2)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    # Models without BatchNorm return an empty collection in training mode.
    mlp, mlp_vars, mlp_images, _ = _built(8)
    _, stats = mlp.apply(mlp_vars, mlp_images, train=True)
    assert stats == {}


def test_loss_is_cross_entropy_of_one_example():
    victim, variables, images, labels = _built(8)
    loss = victim.loss(variables["params"], None, images[1], labels[1])
    logits = victim.apply(variables, images[1:2])[0]
    np.testing.assert_allclose(loss, jax.nn.logsumexp(logits) - logits[labels[1]], rtol=1e-6)
    with pytest.raises(ValueError, match="ONE image"):
        victim.loss(variables["params"], None, images, labels[0])
    with pytest.raises(ValueError, match="NHWC"):
        victim.apply(variables, images[0])
    bn_victim, bn_vars, bn_images, _ = _built(3)
    with pytest.raises(ValueError, match="batch_stats"):
        bn_victim.loss(bn_vars["params"], None, bn_images[0], 1)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("lenet-5", {"image_shape": (32, 32, 3)}, "known victims: convnet, convnet-sme, lenet-dlg"),
        ("lenet-dlg", {"image_shape": (30, 30, 3)}, "multiples of 4"),
        ("resnet18", {"image_shape": (36, 36, 3)}, "multiples of 8"),
        ("resnet8-spatial", {"image_shape": (30, 32, 3)}, "multiples of 4"),
        ("convnet", {"image_shape": (8, 8, 3)}, "at least 9x9"),
        ("mlp", {"image_shape": (8, 8, 2)}, "1 or 3 channels"),
        ("mlp", {"image_shape": (8, 8)}, r"\(H, W, C\)"),
        ("mlp", {"image_shape": (8, 8, 1), "num_classes": 1}, "num_classes"),
        ("lenet-venom", {"image_shape": (8, 8, 1), "width": 8}, "takes no width"),
        ("convnet", {"image_shape": (32, 32, 3), "hidden": 8}, "takes no hidden"),
        ("convnet", {"image_shape": (32, 32, 3), "width": 0}, "width"),
        ("mlp", {"image_shape": (8, 8, 1), "width": 8, "hidden": 8}, "not both"),
        ("mlp", {"image_shape": (8, 8, 1), "hidden": ()}, "non-empty"),
        ("mlp", {"image_shape": (8, 8, 1), "hidden": (8, -1)}, "hidden width"),
    ],
)
def test_get_victim_rejects_bad_requests(name, kwargs, match):
    kwargs = {"num_classes": K, **kwargs}
    with pytest.raises(ValueError, match=match):
        get_victim(name, **kwargs)


def test_options_and_hashing():
    a = get_victim("mlp", image_shape=(8, 8, 1), num_classes=4, width=np.int64(16))
    b = get_victim("mlp", image_shape=[8, 8, 1], num_classes=4, hidden=[16])
    assert a.hidden == b.hidden == (16,) and a.width is None
    assert a.metadata() == b.metadata()
    assert a.metadata()["options"] == {"hidden": [16]}
    assert hash(a) == hash(b)
    assert get_victim("convnet", image_shape=(16, 16, 1), num_classes=4).width == 64
    with pytest.raises(ValueError, match="not found"):
        DenseLayer(path=("nope",), feature_shape=(1, 1, 1)).select({"head": {}})


def _toy_data(n: int = 64, shape=(8, 8, 1), seed: int = 0):
    """Images whose class is which half (left/right) is brighter: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, *shape), dtype=np.float32) * 0.5
    labels = rng.integers(0, 2, n)
    half = shape[1] // 2
    for i, label in enumerate(labels):
        images[i, :, label * half : (label + 1) * half] += 0.5
    return images, labels


def test_training_a_tiny_mlp_lowers_the_loss():
    victim = get_victim("mlp", image_shape=(8, 8, 1), num_classes=2, hidden=16)
    images, labels = _toy_data()
    start = victim.init(jax.random.key(0))
    before = evaluate_victim(victim, start, images, labels)
    trained = train_victim(
        victim, images, labels, steps=20, batch_size=16, learning_rate=1e-2, seed=0,
        variables=start,
    )  # fmt: skip
    after = evaluate_victim(victim, trained, images, labels)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] >= 0.9
    again = train_victim(
        victim, images, labels, steps=20, batch_size=16, learning_rate=1e-2, seed=0,
        variables=start,
    )  # fmt: skip
    for x, y in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(x, y)  # deterministic given the seed
    sgd = train_victim(
        victim, images, labels, steps=20, batch_size=16, learning_rate=0.5, seed=0,
        optimizer="sgd", variables=start,
    )  # fmt: skip
    assert evaluate_victim(victim, sgd, images, labels)["loss"] < before["loss"]


def test_training_updates_batch_statistics():
    victim = get_victim("convnet", image_shape=(9, 9, 1), num_classes=2, width=2)
    images, labels = _toy_data(16, (9, 9, 1))
    start = _random_variables(victim, 0)
    trained = train_victim(
        victim, images, labels, steps=2, batch_size=8, learning_rate=1e-3, seed=1, variables=start
    )
    assert set(trained) == {"params", "batch_stats"}
    for name in ("mean", "var"):
        before, after = start["batch_stats"]["bn0"][name], trained["batch_stats"]["bn0"][name]
        assert not np.allclose(before, after)
    assert not np.allclose(start["params"]["conv0"]["kernel"], trained["params"]["conv0"]["kernel"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 65}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"labels": np.full(64, 2)}, r"\[0, 2\)"),
        ({"images": np.zeros((64, 8, 8, 3), np.float32)}, "images must have shape"),
    ],
)
def test_train_victim_validates(kwargs, match):
    victim = get_victim("mlp", image_shape=(8, 8, 1), num_classes=2, hidden=4)
    images, labels = _toy_data()
    args = {"images": images, "labels": labels, "steps": 1, "batch_size": 8,
            "learning_rate": 0.1, "seed": 0, **kwargs}  # fmt: skip
    with pytest.raises(ValueError, match=match):
        train_victim(victim, **args)


def test_save_load_round_trip_and_refusals(tmp_path):
    victim, variables, images, _ = _built(3)  # convnet: params and batch_stats
    path = tmp_path / "ckpt"
    out = save_variables(path, variables, metadata={**victim.metadata(), "steps": 7})
    assert out == path.absolute() and (path / "config.json").is_file()
    loaded, metadata = load_variables(path, victim)
    assert metadata["steps"] == 7 and metadata["model"] == "convnet"
    assert read_metadata(path) == metadata
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(variables)
    for x, y in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(victim.apply(loaded, images), victim.apply(variables, images))

    # Saved for a different class count / width / model: refused with the reason.
    for other, reason in [
        (get_victim("convnet", image_shape=(32, 32, 3), num_classes=5, width=4), "num_classes"),
        (get_victim("convnet", image_shape=(32, 32, 3), num_classes=K, width=8), "width"),
        (get_victim("lenet-venom", image_shape=(32, 32, 3), num_classes=K), "model"),
        (get_victim("convnet", image_shape=(32, 32, 1), num_classes=K, width=4), "image_shape"),
    ]:
        with pytest.raises(ValueError, match=f"different model.*{reason}"):
            load_variables(path, other)

    with pytest.raises(ValueError, match="overwrite=True"):
        save_variables(path, variables, metadata=victim.metadata())
    save_variables(path, variables, metadata={**victim.metadata(), "steps": 8}, overwrite=True)
    assert read_metadata(path)["steps"] == 8
    with pytest.raises(ValueError, match="not a jaxleak checkpoint"):
        load_variables(tmp_path, victim)
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a jaxleak checkpoint"):
        save_variables(tmp_path / "other", variables, metadata=victim.metadata(), overwrite=True)
    with pytest.raises(ValueError, match="lacks"):
        save_variables(tmp_path / "new", variables, metadata={"model": "convnet"})


def test_load_resolves_partially_stored_options(tmp_path):
    # Callers may store only the options they set (here: an MLP's width, not its hidden tuple).
    victim, variables, _, _ = _built(8)  # mlp, default hidden 256
    metadata = {"model": "mlp", "image_shape": [32, 32, 3], "num_classes": K, "options": {}}
    save_variables(tmp_path / "a", variables, metadata=metadata)
    loaded, _ = load_variables(tmp_path / "a", victim)
    np.testing.assert_array_equal(
        loaded["params"]["head"]["kernel"], variables["params"]["head"]["kernel"]
    )
    save_variables(tmp_path / "b", variables, metadata={**metadata, "options": {"width": 256}})
    load_variables(tmp_path / "b", victim)
    with pytest.raises(ValueError, match="hidden"):
        load_variables(
            tmp_path / "b", get_victim("mlp", image_shape=(32, 32, 3), num_classes=K, hidden=8)
        )


@pytest.mark.parametrize(
    "name, width", [pytest.param("lenet-dlg", None, marks=pytest.mark.slow), ("lenet-venom", None),
                     pytest.param("convnet", 2, marks=pytest.mark.slow),
                     pytest.param("resnet8", 2, marks=pytest.mark.slow)]
)
def test_patches_convolution_matches_xla_with_the_same_parameters(name, width):
    import jax.numpy as jnp

    from jaxleak.capture import per_example_grads

    kw = {"image_shape": (12, 12, 3), "num_classes": 5, "width": width}
    xla = get_victim(name, conv_impl="xla", **kw)
    patches = get_victim(name, conv_impl="patches", **kw)
    va, vb = xla.init(jax.random.PRNGKey(3)), patches.init(jax.random.PRNGKey(3))
    assert jax.tree_util.tree_structure(va) == jax.tree_util.tree_structure(vb)
    for a, b in zip(jax.tree_util.tree_leaves(va), jax.tree_util.tree_leaves(vb)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.asarray(np.random.default_rng(1).random((3, 12, 12, 3), np.float32))
    y = jnp.array([0, 2, 4])
    np.testing.assert_allclose(patches.apply(va, x), xla.apply(va, x), rtol=1e-5, atol=1e-6)
    ga, gb = per_example_grads(xla, va, x, y), per_example_grads(patches, va, x, y)
    for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert hash(xla) != hash(patches)


def test_conv_impl_is_validated():
    with pytest.raises(ValueError, match="conv_impl"):
        get_victim("lenet-dlg", image_shape=(8, 8, 1), num_classes=3, conv_impl="cudnn")
    with pytest.raises(ValueError, match="patches"):
        get_victim("mlp", image_shape=(16, 16, 3), num_classes=3, conv_impl="patches")
    lenet = get_victim("lenet-dlg", image_shape=(8, 8, 1), num_classes=3)
    assert lenet.conv_impl == "xla" and lenet.with_conv_impl("xla") is lenet
    swapped = lenet.with_conv_impl("patches")
    assert swapped.conv_impl == "patches" and swapped.module.conv_impl == "patches"
    mlp = get_victim("mlp", image_shape=(16, 16, 3), num_classes=3, width=4)
    assert mlp.conv_impl is None and mlp.with_conv_impl("xla") is mlp
    with pytest.raises(ValueError, match="patches"):
        mlp.with_conv_impl("patches")
