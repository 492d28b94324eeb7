"""``jaxleak attack dlg|idlg|ig|gradinversion|grnn|mjolnir`` end to end, and Mjolnir's pieces."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak.attacks.optimization import mjolnir
from jaxleak.cli import main

WEIGHTS_ROOT = Path(os.environ.get("JAXLEAK_WEIGHTS_DIR", Path(__file__).resolve().parents[2] / "shared" / "weights"))


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    root = tmp_path_factory.mktemp("caps")
    common = ["capture", "--dataset", "mnist-embedded", "--split", "train", "--model", "lenet-dlg",
              "--image-size", "12", "--quiet"]
    paths = {
        "clean": root / "clean.npz", "batch": root / "batch.npz", "dp": root / "dp.npz",
        "head_only": root / "head.npz",
    }
    assert main(common + ["--n", "3", "--calibration", "none", "--keep-update", "--out", str(paths["clean"])]) == 0
    assert main(common + ["--n", "2", "--batch-size", "2", "--calibration", "none", "--keep-update",
                          "--out", str(paths["batch"])]) == 0
    assert main(common + ["--n", "2", "--epsilon", "10", "--keep-update", "--keep-params",
                          "--out", str(paths["dp"])]) == 0
    assert main(common + ["--n", "2", "--out", str(paths["head_only"])]) == 0
    return paths


def test_attack_ig_then_null_control(captures, tmp_path, capsys):
    """IG recovers the 12x12 digits, reports LPIPS (or says why not), and its null control does not."""
    have_lpips = all((WEIGHTS_ROOT / "lpips" / n).is_file()
                     for n in ("alexnet_features_torchvision.npz", "lpips_v0.1_lin_alex.npz"))
    code, out, _ = _run(capsys, "attack", "ig", "--captures", captures["clean"], "--out", tmp_path / "ig",
                        "--iterations", "200", "--weights-dir", WEIGHTS_ROOT if have_lpips else tmp_path / "none",
                        "--quiet", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["means"]["psnr"] > 30 and summary["means"]["label_correct"] == 1.0
    assert summary["timing"]["seconds_per_iteration"] > 0
    rec = np.load(tmp_path / "ig" / "reconstructions.npz")
    assert rec["images"].shape == (3, 12, 12, 1) and rec["labels"].shape == (3,)
    assert 0 <= rec["images"].min() and rec["images"].max() <= 1
    meta = json.loads((tmp_path / "ig" / "metrics.json").read_text())
    assert meta["config"]["iterations"] == 200 and meta["config"]["tv"] == 1e-6
    assert meta["conv_impl"] == "patches"  # auto
    assert meta["timing"]["devices"] == jax.local_device_count()
    assert len(meta["metrics"]["ssim"]["values"]) == 3
    if have_lpips:  # upsampled to 64x64 for AlexNet; near 0 for a > 30 dB reconstruction
        assert len(meta["metrics"]["lpips_alex"]["values"]) == 3 and summary["means"]["lpips_alex"] < 0.1
        assert "upsampled bilinearly from 12x12" in meta["note"]
    else:
        assert "lpips_alex" not in summary["means"] and "lpips_alex not computed" in meta["note"]

    code, out, _ = _run(capsys, "attack", "ig", "--captures", captures["clean"], "--out", tmp_path / "null",
                        "--iterations", "200", "--null", "shuffle", "--conv-impl", "xla", "--quiet", "--json")
    assert code == 0
    null = json.loads(out)
    assert null["null_control"] == "shuffle" and null["means"]["psnr"] < summary["means"]["psnr"] - 15
    null_meta = json.loads((tmp_path / "null" / "metrics.json").read_text())
    assert "NULL CONTROL" in null_meta["note"] and null_meta["conv_impl"] == "xla"


def test_attack_idlg_on_client_batches_uses_hungarian_assignment(captures, tmp_path, capsys):
    code, _out, _ = _run(capsys, "attack", "idlg", "--captures", captures["batch"], "--out", tmp_path / "b",
                        "--iterations", "5", "--set", "linesearch_steps=5", "--quiet")
    assert code == 0
    rec = np.load(tmp_path / "b" / "reconstructions.npz")
    assert rec["images"].shape == (2, 2, 12, 12, 1) and rec["labels"].shape == (2, 2)
    meta = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert len(meta["metrics"]["psnr"]["values"]) == 4 and "Hungarian" in meta["note"]


@pytest.mark.slow  # CI budget: 35 s; test_artifacts runs Mjolnir end to end with a saved denoiser
def test_attack_mjolnir_tiny(captures, tmp_path, capsys):
    code, out, _ = _run(capsys, "attack", "mjolnir", "--captures", captures["dp"], "--out", tmp_path / "m",
                        "--iterations", "3", "--set", "train_steps=20", "--set", "denoiser=mlp", "--set", "hidden=32",
                        "--set", "aux_n=16", "--set", "timesteps=50", "--set", "linesearch_steps=3",
                        "--quiet")
    assert code == 0, out
    meta = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert meta["mjolnir"]["t_start"] >= 0 and meta["mjolnir"]["sigma"] > 0
    assert meta["mjolnir"]["denoiser"] == "mlp" and "MLP" in meta["mjolnir"]["scaled_down"]
    assert np.load(tmp_path / "m" / "reconstructions.npz")["images"].shape == (2, 12, 12, 1)


@pytest.mark.parametrize("argv,needle", [
    (["attack", "ig", "--captures", "{head_only}", "--out", "{tmp}"], "--keep-update"),
    (["attack", "ig", "--captures", "{clean}", "--out", "{tmp}", "--set", "nope=1"], "nope"),
    (["attack", "ig", "--captures", "{clean}", "--out", "{tmp}", "--set", "novalue"], "KEY=VALUE"),
    (["attack", "ig", "--captures", "{clean}", "--out", "{tmp}", "--labels", "joint"], "labels must be"),
    (["attack", "dlg", "--captures", "{clean}", "--out", "{tmp}", "--checkpoint", "x"], "no --checkpoint"),
    (["attack", "ig", "--captures", "{clean}", "--out", "{tmp}", "--set", "layers=nope"], "matches no"),
])
def test_bad_inputs_give_one_line_errors(argv, needle, captures, tmp_path, capsys):
    argv = [str(captures[a[1:-1]]) if a[1:-1] in captures else str(tmp_path) if a == "{tmp}" else a
            for a in argv]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_mjolnir_start_step_and_denoise_identity_without_noise():
    _, abar = mjolnir.alpha_bars(1000, 1e-4, 0.02)
    ratio = np.sqrt((1 - np.asarray(abar)) / np.asarray(abar))
    assert int(mjolnir.start_step(jnp.float32(ratio[123]), abar)) == 123
    assert int(mjolnir.start_step(jnp.float32(0.0), abar)) == -1
    config = mjolnir.MjolnirConfig(timesteps=10, denoiser="mlp", hidden=8, depth=1)
    params = mjolnir.Denoiser(dim=5, hidden=8, depth=1).init(jax.random.key(0), jnp.zeros(5), jnp.zeros(()))
    x = jnp.arange(10.0).reshape(2, 5)
    out, t0 = mjolnir.denoise(params, 2.0, config, x, 0.0)
    assert t0 == -1 and np.allclose(out, x)
    tree = {"a": jnp.ones((2, 3)), "b": {"c": jnp.arange(4.0)}}
    back = mjolnir.unflatten_update(mjolnir.flatten_update(tree), tree)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda u, v: bool(jnp.all(u == v)), tree, back))



@pytest.mark.parametrize("dim,levels", [(1, 1), (16, 1), (17, 1), (19_000, 2), (26, 3), (4_097, 4)])
def test_grid_side_is_the_least_square_that_halves_cleanly(dim, levels):
    side = mjolnir.grid_side(dim, levels)
    step = 2 ** (levels - 1)
    assert side * side >= dim and side % step == 0
    assert (side - step) ** 2 < dim  # one step smaller would not hold the update


def test_unet_denoiser_maps_flat_updates_to_flat_updates():
    net = mjolnir.UNetDenoiser(dim=50, channels=(4, 8), time_dim=8)
    params = jax.jit(net.init)(jax.random.key(0), jnp.zeros(50), jnp.zeros(()))
    x = jax.random.normal(jax.random.key(1), (3, 50))
    out = jax.jit(net.apply)(params, x, jnp.array([3.0, 3.0, 300.0]))
    assert out.shape == (3, 50) and bool(jnp.all(jnp.isfinite(out)))
    assert not np.allclose(out[1], out[2])  # the step enters
    np.testing.assert_allclose(jax.jit(net.apply)(params, x[0], 3.0), out[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="denoiser"):
        mjolnir.MjolnirConfig(denoiser="transformer")


def _low_rank_denoising(kind: str, **fields):
    # Clean "updates" on a 2-D subspace of R^16: a trained denoiser must pull noisy ones back toward it.
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(16, 2)))[0].T * 4.0
    data = jnp.asarray(rng.normal(size=(256, 2)) @ basis, jnp.float32)
    config = mjolnir.MjolnirConfig(denoiser=kind, timesteps=100, train_steps=300, train_batch=32,
                                   learning_rate=3e-3, time_dim=16, **fields)
    params, _ = mjolnir.fit_denoiser(data, config, seed=0)
    clean = data[:16]
    noisy = clean + 0.3 * jax.random.normal(jax.random.key(5), clean.shape)
    out, t0 = mjolnir.denoise(params, 1.0, config, noisy, 0.3)
    assert t0 > 0
    return float(jnp.mean((noisy - clean) ** 2)), float(jnp.mean((out - clean) ** 2))


def test_mlp_denoiser_removes_noise_from_low_rank_updates():
    before, after = _low_rank_denoising("mlp", hidden=64, depth=2)
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow
def test_unet_denoiser_removes_noise_from_low_rank_updates():
    before, after = _low_rank_denoising("unet", unet_channels=(8,))
    assert after < 0.85 * before, (before, after)
