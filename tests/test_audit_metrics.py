"""The metrics of issue 13: FMSE, TV, FLOPs per iteration, wall time and memory peaks in metrics.json."""

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

from jaxleak.attacks import optimization as O
from jaxleak.attacks.optimization._driver import flops_of
from jaxleak.attacks.registry import AttackOutput
from jaxleak.audit import run_attack
from jaxleak.audit.evaluate import evaluate, fmse_metric, tv_metric
from jaxleak.capture import capture_updates
from jaxleak.models import get_victim
from jaxleak.privacy import DPConfig

K = 3


@pytest.fixture(scope="module")
def mlp():
    victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=K, hidden=4)
    return victim, victim.init(jax.random.key(0))


def _numpy_logits(variables, images):
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    h = np.maximum(images.reshape(len(images), -1) @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0.0)
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def test_fmse_is_zero_on_the_truth_and_breachings_logit_mse_otherwise(mlp):
    victim, variables = mlp
    rng = np.random.default_rng(0)
    truth = rng.random((2, 3, 4, 4, 1), dtype=np.float32)
    recon = rng.random((2, 3, 4, 4, 1), dtype=np.float32)
    labels = np.array([[0, 2, 2], [1, 1, 0]])
    np.testing.assert_array_equal(fmse_metric(victim, variables, truth, truth, labels), 0.0)

    got = fmse_metric(victim, variables, recon, truth, labels)
    want = []
    for n in range(2):
        diff = _numpy_logits(variables, recon[n]) - _numpy_logits(variables, truth[n])  # [M, K]
        # breaching: (feats_rec - feats_true)[..., labels].pow(2); image i's row, every label's column
        want += [np.mean([diff[i, y] ** 2 for y in labels[n]]) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert got.min() > 0
    every = fmse_metric(victim, variables, recon, truth, None)
    diff = _numpy_logits(variables, recon.reshape(6, 4, 4, 1)) - _numpy_logits(variables, truth.reshape(6, 4, 4, 1))
    np.testing.assert_allclose(every, (diff**2).mean(-1), rtol=1e-5, atol=1e-7)


def test_tv_of_a_constant_is_zero_and_of_known_patterns_the_hand_value():
    constant = np.full((1, 5, 5, 3), 0.7, np.float32)
    checker = (np.indices((4, 4)).sum(0) % 2).astype(np.float32)[None, :, :, None]  # every neighbour differs by 1
    stripes = np.repeat(np.array([0.0, 0.5, 0.5, 1.0], np.float32)[:, None], 6, axis=1)[None, :, :, None]
    # stripes: dx = 0; |dy| over the 3 row pairs = 0.5, 0, 0.5 -> mean 1/3
    np.testing.assert_allclose(tv_metric(constant), [0.0], atol=1e-7)
    np.testing.assert_allclose(tv_metric(checker), [2.0], rtol=1e-6)  # mean |dx| = mean |dy| = 1
    np.testing.assert_allclose(tv_metric(stripes), [1 / 3], rtol=1e-6)


def test_evaluate_reports_fmse_only_with_a_victim_and_tv_of_both(mlp):
    victim, variables = mlp
    rng = np.random.default_rng(1)
    x = rng.random((2, 4, 4, 1), dtype=np.float32)
    cap = capture_updates(victim, variables, x, np.array([0, 1]), dp=DPConfig(calibration="none"))
    truth = cap.truth_images.astype(np.float32) / 255.0
    flat = np.full_like(truth, 0.5)
    out = AttackOutput(images=flat, labels=None, per_target={}, arrays={}, info={"notes": []})
    with_victim = evaluate(cap, out, victim=victim, variables=variables, lpips_net=None)["metrics"]
    np.testing.assert_allclose(with_victim["fmse"], fmse_metric(victim, variables, flat, truth, cap.truth_labels))
    np.testing.assert_allclose(with_victim["tv"], 0.0, atol=1e-7)
    np.testing.assert_allclose(with_victim["tv_truth"], tv_metric(truth.reshape(2, 4, 4, 1)))
    without = evaluate(cap, out, lpips_net=None)
    assert "fmse" not in without["metrics"]
    assert any("no fmse" in note for note in without["notes"])


def test_flops_of_reads_every_backends_shape():
    assert flops_of({"flops": 7.0}) == 7.0
    assert flops_of([{"flops": 1.0}, {"flops": 2.0}]) == 3.0
    assert flops_of(None) is None and flops_of([]) is None and flops_of({"bytes accessed": 1.0}) is None
    assert flops_of({"flops": -1.0}) is None and flops_of([{"flops": 1.0}, None]) is None


@functools.cache
def _ig_flops(m: int, **driver) -> float:
    # FLOPs depend on shapes only: random updates of the victim's shape stand in for captured ones.
    victim = get_victim("mlp", image_shape=(8, 8, 3), num_classes=K, hidden=16)
    variables = victim.init(jax.random.key(0))
    rng = np.random.default_rng(m)
    updates = jax.tree_util.tree_map(lambda p: rng.normal(size=(2, *p.shape)).astype(np.float32),
                                     variables["params"])
    config = dataclasses.replace(O.default_config("ig"), iterations=2, labels="known")
    res = O.reconstruct("ig", victim, variables, updates, config=config, batch_size=m,
                        true_labels=rng.integers(0, K, (2, m)), chunk=2, **driver)
    assert res.timing()["flops_per_iteration"] == res.flops_per_iteration
    assert res.flops_lower_bound is False  # IG's iteration has no inner loop
    return res.flops_per_iteration


@pytest.mark.slow  # heavy for the default suite (CI budget); run with -m slow
def test_flops_per_iteration_is_positive_and_affine_in_the_image_count():
    f1, f2, f4 = (_ig_flops(m) for m in (1, 2, 4))
    assert 0 < f1 < f2 < f4
    # Per-image work (forward, backward, Adam on the images) grows with M; the gradient
    # comparison is parameter-sized and fixed: f(M) = a + b M, so f4 - f2 = 2 (f2 - f1).
    # Measured (mlp 8x8x3, hidden 16): 76206, 120166, 208842 FLOPs, 0.9% from affine.
    np.testing.assert_allclose(f4 - f2, 2 * (f2 - f1), rtol=0.05)


def test_flops_from_the_chunk_agree_with_a_one_iteration_program():
    # The default path reads the chunk's compiled program (XLA counts its loop body, one
    # iteration of the block, once) and divides by the block's 2 runs; "map" batching
    # compiles one iteration of a 1-run block instead. Equal within 1% (measured: 0.04%):
    # a change in how XLA counts loops, or in the per-run division, fails here.
    np.testing.assert_allclose(_ig_flops(2, target_batch=1, batching="map"), _ig_flops(2), rtol=0.01)


def test_metrics_json_of_a_tiny_ig_run_holds_every_new_metric(tmp_path):
    victim = get_victim("mlp", image_shape=(12, 12, 1), num_classes=K, hidden=8)
    variables = victim.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.random((2, 12, 12, 1), dtype=np.float32)
    cap = capture_updates(victim, variables, x, np.array([0, 1]), dp=DPConfig(calibration="none"),
                          keep_update=True, keep_params=True, layer="first")
    summary = run_attack("ig", cap, out_dir=str(tmp_path / "ig"), overrides={"iterations": 2}, lpips_net=None)
    text = (tmp_path / "ig" / "metrics.json").read_text()
    meta = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    for key in ("fmse", "tv", "tv_truth"):
        values = meta["metrics"][key]["values"]
        assert len(values) == 2 and all(v >= 0 for v in values) and meta["metrics"][key]["mean"] is not None
    cost = meta["cost"]
    assert cost["flops_per_iteration"] > 0 and cost["flops_lower_bound"] is False
    assert cost["flops_per_iteration"] == meta["timing"]["flops_per_iteration"]
    assert cost["attack_seconds"] >= meta["timing"]["seconds_total"] > 0
    assert cost["peak_rss_bytes"] > 10 * 2**20  # a JAX process holds tens of MB at least
    if cost["backend"] == "cpu":
        assert cost["peak_device_bytes"] is None
    assert summary["cost"] == cost and summary["means"]["fmse"] == pytest.approx(meta["metrics"]["fmse"]["mean"])


def test_vgg_lpips_is_scored_where_its_weights_exist_and_noted_otherwise(mlp, tmp_path):
    victim, variables = mlp
    x = np.random.default_rng(2).random((1, 4, 4, 1), dtype=np.float32)
    cap = capture_updates(victim, variables, x, np.array([0]), dp=DPConfig(calibration="none"))
    out = AttackOutput(images=np.zeros((1, 1, 4, 4, 1), np.float32), labels=None, per_target={}, arrays={},
                       info={})
    # An empty weights folder: neither backbone is found; each gets its own note and no error.
    result = evaluate(cap, out, lpips_net="alex", weights_dir=str(tmp_path))
    assert not any(k.startswith("lpips") for k in result["metrics"])
    assert any(n.startswith("lpips_alex not computed") for n in result["notes"])
    assert any(n.startswith("lpips_vgg not computed") for n in result["notes"])
