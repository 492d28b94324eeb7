"""The command line: subcommands, outputs, one-line errors."""

import json
import os

import numpy as np
import pytest

from jaxleak.capture import load_capture
from jaxleak.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_on_every_subcommand(capsys):
    from jaxleak.attacks import attacks

    commands = ["demo", "capture", "inspect", "attack", "attacks", "train", "bench", "train-victim", "train-fedavg",
                "sample", "models", "datasets"]
    trained = ("venom", "venom-diff", "fgla", "mjolnir", "flow-prior")
    for cmd in [*([c] for c in commands), *(["attack", name] for name in attacks()),
                *(["train", what] for what in trained)]:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage: jaxleak" in capsys.readouterr().out


def test_capture_then_attack_spe_on_mlp_first_layer(tmp_path, capsys, monkeypatch):
    caps = tmp_path / "caps.npz"
    code, out, _ = _run(capsys, "capture", "--dataset", "mnist-embedded", "--split", "train", "--model", "mlp",
                        "--hidden", "32", "--layer", "first", "--n", "8", "--epsilon", "10", "--quiet",
                        "--dp-scope", "layer", "--out", str(caps))
    assert code == 0 and "wrote" in out
    cap = load_capture(caps)
    assert cap.fc_weight_grad.shape == (8, 32, 784) and cap.images.shape == (8, 28, 28, 1)
    assert cap.meta["calibration"] == "paper" and cap.meta["layer"] == "first" and cap.meta["scope"] == "layer"
    assert cap.meta["model_options"] == {"hidden": [32]} and cap.meta["init_seed"] == 0

    out_dir = tmp_path / "spe"
    monkeypatch.setattr("jaxleak.cli._interactive", lambda: True)  # as on a terminal
    code, out, err = _run(capsys, "attack", "spe", "--capture", str(caps), "--out", str(out_dir))
    assert code == 0, err
    assert err.splitlines()[0].endswith("compiling ... (the first compiled call can take a while; progress follows)")
    # the human end: which run, one row per metric with its 95% interval, the cost, the files
    lines = out.splitlines()
    assert lines[0].startswith(f"spe on {caps}: 8 image(s), the real updates")
    assert lines[1].split() == ["metric", "mean", "95%", "CI", "n"]
    psnr_row = next(line for line in lines if line.startswith("PSNR (dB)"))
    assert psnr_row.split()[-1] == "8" and "[" in psnr_row
    assert any(line.startswith("ASR (SSIM > 0.5)") for line in lines)
    assert any(line.startswith("cost: ") and "peak RSS" in line for line in lines)
    assert lines[-1].startswith("wrote ") and lines[-1].endswith(str(out_dir / "grid.png"))
    from PIL import Image

    grid = Image.open(out_dir / "grid.png")  # 8 digits x3 above their reconstructions, PSNR captions below
    assert grid.size[0] > 8 * 84 and grid.size[1] > 2 * 84 + 10
    feats = np.load(out_dir / "features.npz")
    assert feats["features"].shape == (8, 28, 28, 1) and feats["selected"].shape == (8, 32)
    recon = np.load(out_dir / "reconstructions.npz")["images"]
    assert recon.shape == (8, 28, 28, 1) and recon.min() >= 0 and recon.max() <= 1
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert len(metrics["metrics"]["psnr"]["values"]) == 8 and metrics["sigma2_source"] == "mechanism"
    assert metrics["metrics"]["ssim"]["mean"] > 0.5  # eps=10 paper noise is small: digits come back
    assert f"{metrics['metrics']['psnr']['mean']:.4g}" in psnr_row


def test_attack_spe_on_head_reports_feature_cosine_with_estimated_sigma(tmp_path, capsys):
    caps = tmp_path / "caps.npz"
    assert _run(capsys, "capture", "--model", "lenet-venom", "--n", "4", "--calibration", "dpsgd",
                "--noise-multiplier", "0.001", "--quiet", "--out", str(caps))[0] == 0
    code, out, _ = _run(capsys, "attack", "spe", "--capture", str(caps), "--out", str(tmp_path / "o"),
                        "--sigma2", "estimate", "--json")
    assert code == 0
    summary = json.loads(out)  # --json: the machine-readable summary, nothing else on stdout
    assert summary["sigma2_source"] == "estimated"
    assert summary["means"]["feature_cosine_raw"] > 0.9
    assert not os.path.exists(tmp_path / "o" / "reconstructions.npz")
    assert not os.path.exists(tmp_path / "o" / "grid.png") and "grid.png" not in summary["written"]


@pytest.mark.parametrize("argv,needle", [
    (["attack", "spe", "--capture", "/nonexistent.npz", "--out", "/tmp/x"], "not found"),
    (["inspect", "/nonexistent.npz"], "not found"),
    (["inspect", "{garbage}"], "not a readable .npz"),
    (["capture", "--dataset", "no-such-dataset", "--out", "/tmp/x.npz"], "no-such-dataset"),
    (["capture", "--model", "no-such-model", "--n", "2", "--out", "/tmp/x.npz"], "unknown victim"),
    (["capture", "--calibration", "dpsgd", "--mechanism", "laplace", "--n", "2", "--out", "/tmp/x.npz"],
     "Gaussian"),
    (["capture", "--calibration", "dpsgd", "--dp-scope", "layer", "--n", "2", "--out", "/tmp/x.npz"], "scope"),
    (["attack", "spe", "--capture", "{garbage}", "--out", "/tmp/x"], "not a readable .npz"),
])
def test_bad_inputs_give_one_line_errors_and_exit_2(argv, needle, capsys, tmp_path):
    if "{garbage}" in argv:
        bad = tmp_path / "bad.npz"
        bad.write_bytes(b"nope")
        argv = [str(bad) if a == "{garbage}" else a for a in argv]
    code, _out, err = _run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxleak ") and needle in lines[0]
    assert "Traceback" not in err


def test_bad_argument_values_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["capture", "--n", "0", "--out", "x.npz"])
    assert e.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_bench_capture_prints_one_json_line(capsys):
    code, out, _ = _run(capsys, "bench", "capture", "--model", "lenet-dlg", "--image-size", "8",
                        "--batch", "4", "--repeats", "2", "--calibration", "dpsgd")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["examples_per_second"] > 0 and result["clients"] == 4 and result["calibration"] == "dpsgd"
    assert result["device"]


def test_train_victim_then_capture_from_its_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "victim"
    code, _out, _ = _run(capsys, "train-victim", "--model", "mlp", "--hidden", "16", "--n", "64",
                        "--steps", "3", "--batch-size", "16", "--quiet", "--out", str(ckpt))
    assert code == 0 and (ckpt / "config.json").exists()
    assert _out.splitlines()[0] == "train-victim: done" and f"written  {ckpt}" in _out
    caps = tmp_path / "caps.npz"
    assert _run(capsys, "capture", "--model", "mlp", "--hidden", "16", "--victim-checkpoint", str(ckpt), "--n", "2",
                "--quiet", "--keep-params", "--out", str(caps))[0] == 0
    cap = load_capture(caps)
    assert cap.meta["checkpoint"] == str(ckpt) and cap.meta["init_seed"] is None
    # the stored parameters are the trained ones, not a fresh initialisation
    from jaxleak.models import get_victim, load_variables

    victim = get_victim("mlp", image_shape=(28, 28, 1), num_classes=10, hidden=16)
    trained, _ = load_variables(ckpt, victim)
    np.testing.assert_array_equal(cap.params["params/head/kernel"], np.asarray(trained["params"]["head"]["kernel"]))
    code, _, err = _run(capsys, "capture", "--model", "mlp", "--hidden", "32", "--victim-checkpoint", str(ckpt),
                        "--n", "2", "--quiet", "--force", "--out", str(caps))
    assert code == 2 and "different model" in err


_TINY_NET = ("--base-width", "8", "--multipliers", "1", "2", "--resnet-blocks", "1", "--time-dim", "8",
             "--attention-heads", "1", "--attention-head-dim", "8")


@pytest.mark.slow  # ~110 s of CI time on 2 cores (two UNet compilations); run with -m slow
def test_train_venom_then_attack_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    code, out, err = _run(capsys, "train", "venom", "--aux-dataset", "mnist-embedded", "--aux-split", "train",
                          "--aux-n", "40", "--image-size", "16", "--model", "lenet-venom", "--epsilons", "1", "5",
                          "10", "--calibration", "paper", "--steps", "2", "--batch-size", "4", "--eval-size", "8",
                          "--eval-every", "0", *_TINY_NET, "--quiet", "--out", str(ckpt))
    assert code == 0, err
    table = dict(line.strip().split("  ", 1) for line in out.splitlines()[1:])
    assert out.startswith("train venom: done\n") and table["steps"].strip() == "2"
    assert table["written"].strip() == str(ckpt) and float(table["seconds"]) > 0 and "final loss" in table
    from jaxleak.attacks.venom.train import read_checkpoint_info

    # --resume continues from the folder alone: a missing folder and any setting flag are refused
    code, _, err = _run(capsys, "train", "venom", "--out", str(tmp_path / "absent"), "--resume")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "train", "venom", "--out", str(ckpt), "--resume", "--lr", "0.1")
    assert code == 2 and "drop --lr" in err
    code, out, err = _run(capsys, "train", "venom", "--out", str(ckpt), "--resume", "--quiet", "--json")
    assert code == 0, err
    assert json.loads(out)["step"] == 2 and json.loads(out)["aux_dataset"]["request"]["image_size"] == 16
    stored = read_checkpoint_info(ckpt)
    assert stored["victim"]["model"] == "lenet-venom" and stored["victim"]["image_shape"] == [16, 16, 1]
    assert stored["triplets"]["epsilons"] == [1.0, 5.0, 10.0] and stored["train"]["loss"] == "mse+cos"

    caps = tmp_path / "caps.npz"
    assert _run(capsys, "capture", "--image-size", "16", "--n", "4", "--epsilon", "5", "--quiet",
                "--out", str(caps))[0] == 0
    out_dir = tmp_path / "venom"
    code, out, err = _run(capsys, "attack", "venom", "--artifact", str(ckpt), "--capture", str(caps),
                          "--out", str(out_dir))
    assert code == 0, err
    assert out.startswith(f"venom on {caps}: 4 image(s)") and (out_dir / "grid.png").is_file()
    recon = np.load(out_dir / "reconstructions.npz")["images"]
    assert recon.shape == (4, 16, 16, 1) and recon.dtype == np.float32
    assert recon.min() > 0 and recon.max() < 1
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert {"psnr", "ssim", "mse", "asr@0.5"} <= set(metrics["metrics"])
    assert len(metrics["metrics"]["psnr"]["values"]) == 4
    assert metrics["trained_on"]["name"] == "mnist-embedded" and metrics["checkpoint_step"] == 2
    assert "upsampled bilinearly from 16x16 to 64x64" in metrics["note"]  # below AlexNet's 31 px

    # a checkpoint trained for 16x16 refuses 28x28 captures; the wrong variant and spe+checkpoint too
    caps28 = tmp_path / "caps28.npz"
    assert _run(capsys, "capture", "--n", "2", "--quiet", "--out", str(caps28))[0] == 0
    code, _, err = _run(capsys, "attack", "venom", "--artifact", str(ckpt), "--capture", str(caps28),
                        "--out", str(tmp_path / "x"), "--quiet")
    assert code == 2 and "image_shape" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "attack", "fgla", "--artifact", str(ckpt), "--capture", str(caps),
                        "--out", str(tmp_path / "y"), "--quiet")
    assert code == 2 and "'venom' network" in err
    code, _, err = _run(capsys, "attack", "venom", "--capture", str(caps), "--out", str(tmp_path / "z"))
    assert code == 2 and "--artifact DIR" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # 60 s; train venom -> attack covers the same path in the default suite
def test_train_fgla_uses_label_row_features_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "fgla"
    code, _out, err = _run(capsys, "train", "fgla", "--aux-dataset", "mnist-embedded", "--aux-split", "train",
                          "--aux-n", "40", "--image-size", "16", "--model", "lenet-venom", "--epsilons", "5",
                          "--steps", "2", "--batch-size", "4", "--eval-size", "8", "--eval-every", "0",
                          *_TINY_NET, "--triplet-cache", str(tmp_path / "trip.npz"), "--quiet", "--out", str(ckpt))
    assert code == 0, err
    from jaxleak.attacks.venom.train import read_checkpoint_info

    assert read_checkpoint_info(ckpt)["triplets"]["features"] == "fgla"
    assert (tmp_path / "trip.npz").is_file()
    caps = tmp_path / "caps.npz"
    assert _run(capsys, "capture", "--image-size", "16", "--n", "3", "--epsilon", "5", "--quiet",
                "--out", str(caps))[0] == 0
    out_dir = tmp_path / "attack"
    code, _, err = _run(capsys, "attack", "fgla", "--artifact", str(ckpt), "--capture", str(caps),
                        "--out", str(out_dir))
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["features"] == "fgla" and "noise_strength" not in metrics["metrics"]
    assert "FGLA label row inferred" in metrics["note"]
    assert np.load(out_dir / "reconstructions.npz")["images"].shape == (3, 16, 16, 1)


def test_demo_runs_end_to_end_on_embedded_digits(tmp_path, capsys):
    """The README's main job (smaller: 16 digits, one epsilon): a small audit and its report."""
    code, out, err = _run(capsys, "demo", "--n", "16", "--epsilons", "10", "--out", str(tmp_path))
    assert code == 0, err
    report = tmp_path / "report" / "report.html"
    assert out.strip().splitlines()[-1].endswith(f"report: {report}")  # its last line says where
    results = sorted(tmp_path.glob("cells/*/result.json"))
    assert len(results) == 3 and report.is_file()  # none, dp-paper eps 10, dpsgd eps 10
    docs = [json.loads(r.read_text()) for r in results]
    paper = next(d for d in docs if [x["name"] for x in d["privacy"]["defenses"]] == ["dp-paper"])
    assert paper["real"]["metrics"]["psnr"]["mean"] > 20  # eps 10 paper noise: the digits come back
