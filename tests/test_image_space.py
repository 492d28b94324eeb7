"""Image spaces of the optimisation attacks (issue 13): the map, its box, and IG's ``space`` option."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxleak.attacks import optimization as O
from jaxleak.attacks.fedavg import sme
from jaxleak.attacks.optimization import _space
from jaxleak.attacks.optimization._space import CIFAR10_MEAN, CIFAR10_STD, image_space
from jaxleak.attacks.registry import get_attack
from jaxleak.models import get_victim

K = 3


@pytest.fixture(scope="module")
def tiny():
    """An MLP on 4x4 RGB images (CIFAR-10's statistics apply) and one noise-free FedSGD target."""
    victim = get_victim("mlp", image_shape=(4, 4, 3), num_classes=K, hidden=8)
    variables = victim.init(jax.random.key(0))
    image = jax.random.uniform(jax.random.key(1), (1, 4, 4, 3))
    probs = jax.nn.one_hot(jnp.array([2]), K)
    target = {"update": O.dummy_gradient(victim, variables, image, probs), "label_probs": probs}
    return victim, variables, target


# --------------------------------------------------------------------------- the map


@pytest.mark.parametrize("mean,std", [(None, None), ((0.5,), (0.25,)), ((0.1, 0.2, 0.3), (0.3, 0.2, 0.1))])
def test_normalized_map_and_its_inverse_round_trip(mean, std):
    space = image_space("normalized", 3, mean, std)
    x = jax.random.uniform(jax.random.key(0), (2, 5, 5, 3))
    z = space.from_pixels(x)
    np.testing.assert_allclose(space.to_pixels(z), x, atol=1e-6)
    np.testing.assert_allclose(space.from_pixels(space.to_pixels(z)), z, atol=1e-5)
    want_mean = CIFAR10_MEAN if mean is None else np.broadcast_to(mean, (3,))
    want_std = CIFAR10_STD if std is None else np.broadcast_to(std, (3,))
    np.testing.assert_allclose(z, (x - np.asarray(want_mean)) / np.asarray(want_std), rtol=1e-5, atol=1e-6)
    # the box is the image of [0, 1]: its ends map to pixels 0 and 1, per channel
    np.testing.assert_allclose(space.to_pixels(space.lo), 0.0, atol=1e-6)
    np.testing.assert_allclose(space.to_pixels(space.hi), 1.0, atol=1e-6)
    wide = 10.0 * jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
    pixels = space.to_pixels(space.box(wide))
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6


def test_pixel_space_is_the_identity_with_the_unit_box():
    space = image_space("pixel", 3)
    z = 3.0 * jax.random.normal(jax.random.key(0), (1, 4, 4, 3))
    assert space.to_pixels(z) is z and space.from_pixels(z) is z
    np.testing.assert_array_equal(space.box(z), jnp.clip(z, 0.0, 1.0))


@pytest.mark.parametrize("args,needle", [
    (("lab", 3), "space must be one of"),
    (("normalized", 3, (0.5,), None), "both mean and std"),
    (("normalized", 3, (0.5, 0.5), (0.2,)), "equal lengths"),
    (("normalized", 3, (0.5, 0.5), (0.2, 0.2)), "2 values but the images have 3 channels"),
])
def test_bad_spaces_are_one_line_value_errors(args, needle):
    with pytest.raises(ValueError, match=needle) as e:
        image_space(*args)
    assert "\n" not in str(e.value)


def test_measured_defaults_sme_pixel_fm_normalized():
    """SME's default follows the measurement (pixel); FM keeps SME's code's space (its sweep's)."""
    assert sme.SMEConfig().space == "pixel" and sme.FMConfig().space == "normalized"


def test_sme_uses_the_shared_space_helpers_not_a_copy():
    assert sme.SPACES is _space.SPACES and sme.CIFAR10_STD is _space.CIFAR10_STD
    mean, std = sme.image_stats(sme.SMEConfig(), 3)
    np.testing.assert_array_equal(mean, _space.space_stats(3)[0])
    np.testing.assert_array_equal(std, _space.space_stats(3)[1])


# --------------------------------------------------------------------------- IG


def _old_ig(victim, variables, target, config, key, steps):
    """IG as it was before the ``space`` option: pixels, N(0, 1) start, signed Adam, clip to [0, 1]."""
    weights = O.layer_weights(victim.abstract_variables()["params"])
    opt = optax.adam(O.ig_schedule(config.learning_rate, config.iterations, config.lr_decay))
    x = config.init_std * jax.random.normal(key, (1, *victim.image_shape), jnp.float32)

    def objective(images):
        trial = O.dummy_gradient(victim, variables, images, target["label_probs"])
        return O.cosine_distance(trial, target["update"], weights) + config.tv * O.total_variation(images)

    @jax.jit
    def step(x, opt_state):
        updates, opt_state = opt.update(jnp.sign(jax.grad(objective)(x)), opt_state, x)
        return jnp.clip(x + updates, 0.0, 1.0), opt_state

    opt_state = opt.init(x)
    for _ in range(steps):
        x, opt_state = step(x, opt_state)
    return x


def _run(problem, target, variables, key, steps):
    state, step = problem.init(key, target, variables), jax.jit(problem.step)
    for it in range(steps):
        state, _ = step(state, target, variables, jnp.int32(it))
    return state, problem.candidate(state, variables).images


def test_pixel_space_is_exactly_the_old_ig(tiny):
    """``space="pixel"`` is IG before the option (same start, steps and clip); the default is normalised."""
    victim, variables, target = tiny
    key = jax.random.key(7)
    old = _old_ig(victim, variables, target, O.IGConfig(iterations=3), key, 3)
    _, pixel = _run(O.make_ig(victim, O.IGConfig(iterations=3, space="pixel"), 1), target, variables, key, 3)
    np.testing.assert_allclose(pixel, old, atol=1e-6)
    assert O.IGConfig().space == "normalized"  # the measured default (experiments/baselines/README.md)
    _, default = _run(O.make_ig(victim, O.IGConfig(iterations=3), 1), target, variables, key, 3)
    _, normalized = _run(O.make_ig(victim, O.IGConfig(iterations=3, space="normalized"), 1), target,
                         variables, key, 3)
    np.testing.assert_array_equal(default, normalized)
    assert float(jnp.max(jnp.abs(normalized - pixel))) > 1e-2  # the option changes the optimisation


def test_ig_normalized_keeps_candidates_in_the_unit_box_under_huge_steps(tiny):
    victim, variables, target = tiny
    config = O.IGConfig(iterations=6, space="normalized", learning_rate=100.0, lr_decay=False)
    problem = O.make_ig(victim, config, 1)
    space = image_space("normalized", 3)
    state, step = problem.init(jax.random.key(3), target, variables), jax.jit(problem.step)
    start = problem.candidate(state, variables).images
    assert float(start.min()) >= 0.0 and float(start.max()) <= 1.0  # the unboxed N(0, 1) start too
    on_box = []
    for it in range(config.iterations):
        state, loss = step(state, target, variables, jnp.int32(it))
        z, images = state["images"], problem.candidate(state, variables).images
        assert np.isfinite(float(loss))
        assert bool(jnp.all((z >= space.lo) & (z <= space.hi)))
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        on_box.append(float(jnp.mean((z == space.lo) | (z == space.hi))))
    assert max(on_box) > 0.5  # steps of 100 normalised units: the box was exercised


def test_ig_normalized_sees_the_mapped_pixels(tiny):
    """Started at the true image's normalised value, IG's matching loss is zero: the victim gets pixels."""
    victim, variables, target = tiny
    image = jax.random.uniform(jax.random.key(1), (1, 4, 4, 3))
    problem = O.make_ig(victim, O.IGConfig(iterations=2, space="normalized", tv=0.0), 1)
    state = problem.init(jax.random.key(0), target, variables)
    state = {**state, "images": image_space("normalized", 3).from_pixels(image)}
    _, loss = jax.jit(problem.step)(state, target, variables, jnp.int32(0))
    assert float(loss) < 1e-5


def test_ig_space_is_a_config_field_the_cli_can_set():
    config = get_attack("ig").config({"space": "normalized", "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]})
    assert config.space == "normalized" and config.mean == (0.5, 0.5, 0.5) and config.std == (0.2, 0.2, 0.2)
    with pytest.raises(ValueError, match="space must be one of") as e:
        O.IGConfig(space="lab")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="both mean and std"):
        O.IGConfig(space="normalized", mean=(0.5,))
