"""One Attack interface: the registry, its up-front checks, one evaluation path, strict outputs."""

import json

import jax
import numpy as np
import pytest

from jaxleak.attacks.registry import AttackInputError, AttackOutput, attacks, get_attack
from jaxleak.audit import evaluate, run_attack
from jaxleak.capture import capture_updates
from jaxleak.models import get_victim
from jaxleak.privacy import DPConfig

EXPECTED = {"spe", "venom", "venom-diff", "fgla", "dlg", "idlg", "ig", "gradinversion", "grnn", "mjolnir"}


@pytest.fixture(scope="module")
def tiny():
    victim = get_victim("mlp", image_shape=(12, 12, 1), num_classes=3, hidden=8)
    variables = victim.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.random((4, 12, 12, 1), dtype=np.float32)
    y = np.array([0, 1, 2, 0])
    whole = capture_updates(victim, variables, x, y, dp=DPConfig(calibration="none"), keep_update=True,
                            keep_params=True, layer="first")
    head = capture_updates(victim, variables, x, y, dp=DPConfig(calibration="none"))
    pairs = capture_updates(victim, variables, x, y, dp=DPConfig(calibration="none"), samples=2,
                            keep_update=True, keep_params=True)
    return whole, head, pairs


def test_registry_lists_every_attack_with_its_needs():
    registry = attacks()
    assert EXPECTED <= set(registry)
    for name, attack in registry.items():
        assert attack.summary and attack.name == name
        attack.config()  # the reference config builds
    assert get_attack("spe").needs == ()
    assert set(get_attack("venom").needs) == {"single", "fedsgd", "artifact"}
    with pytest.raises(AttackInputError, match="unknown attack 'nope'"):
        get_attack("nope")


@pytest.mark.parametrize("name", ["spe", "dlg", "idlg", "ig", "gradinversion", "grnn"])
def test_each_attack_runs_end_to_end_on_a_tiny_capture(tiny, name, tmp_path):
    whole, _, _ = tiny
    overrides = {} if name == "spe" else {"iterations": 2}
    if name == "dlg":
        overrides["inner_steps"] = 1
    summary = run_attack(name, whole, out_dir=str(tmp_path / name), overrides=overrides, lpips_net=None)
    assert "metrics.json" in summary["written"]
    text = (tmp_path / name / "metrics.json").read_text()
    meta = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    assert meta["attack"] == name and meta["protocol"]["kind"] == "fedsgd"
    assert len(meta["metrics"]["psnr"]["values"]) == 4
    recon = np.load(tmp_path / name / "reconstructions.npz")
    assert recon["images"].shape == (4, 12, 12, 1)


def test_needs_are_checked_up_front_with_one_line(tiny, tmp_path):
    whole, head, pairs = tiny
    with pytest.raises(AttackInputError, match="every layer's update"):
        run_attack("ig", head, out_dir=str(tmp_path / "a"))
    with pytest.raises(AttackInputError, match="one image per client"):
        run_attack("venom", pairs, out_dir=str(tmp_path / "b"), artifact="somewhere")
    with pytest.raises(AttackInputError, match="trained network"):
        run_attack("fgla", head, out_dir=str(tmp_path / "c"))
    with pytest.raises(AttackInputError, match="takes no --artifact"):
        run_attack("spe", head, out_dir=str(tmp_path / "d"), artifact="x")
    with pytest.raises(AttackInputError, match="setting tv must be a finite number, got 'abc'"):
        run_attack("ig", whole, out_dir=str(tmp_path / "e"), overrides={"tv": "abc"})
    with pytest.raises(AttackInputError, match="no setting 'tvv'"):
        run_attack("ig", whole, out_dir=str(tmp_path / "f"), overrides={"tvv": 1.0})
    assert not any((tmp_path / d).exists() for d in "abcdef")  # nothing written


def test_existing_results_are_refused_unless_force(tiny, tmp_path):
    _, head, _ = tiny
    out = str(tmp_path / "spe")
    run_attack("spe", head, out_dir=out)
    with pytest.raises(FileExistsError, match="--force"):
        run_attack("spe", head, out_dir=out)
    run_attack("spe", head, out_dir=out, force=True)


def test_client_batches_are_matched_before_scoring(tiny):
    _, _, pairs = tiny
    truth = pairs.truth_images.astype(np.float32) / 255.0
    swapped = truth[:, ::-1].copy()
    out = AttackOutput(images=swapped, labels=pairs.truth_labels[:, ::-1], per_target={}, arrays={},
                       info={"notes": []})
    result = evaluate(pairs, out, lpips_net=None)
    assert np.isinf(result["metrics"]["psnr"]).all()  # every image found its own original
    np.testing.assert_array_equal(result["metrics"]["label_correct"], 1.0)
    assert any("Hungarian" in n for n in result["notes"])


def test_null_control_scores_below_the_real_attack(tiny, tmp_path):
    whole, _, _ = tiny
    # Without noise and refinement SPE's estimate is the image itself (the fixture's images are
    # uniform noise, which the wavelet refinement would smooth away).
    real = run_attack("spe", whole, out_dir=str(tmp_path / "real"), overrides={"refine": False})
    null = run_attack("spe", whole, out_dir=str(tmp_path / "null"), overrides={"refine": False}, null="shuffle")
    assert real["means"]["mse"] < 1e-6 < null["means"]["mse"]
    assert json.loads((tmp_path / "null" / "metrics.json").read_text())["null_control"] == "shuffle"
