"""The FedAvg / defenses CLI: capture with a protocol and a defense chain, train-fedavg, attacks."""

import json

import numpy as np
import pytest

from jaxleak.capture import load_capture
from jaxleak.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_fedavg_capture_with_a_defense_chain(tmp_path, capsys):
    out = tmp_path / "caps.npz"
    code, stdout, err = _run(capsys, "capture", "--model", "mlp", "--hidden", "16", "--n", "3", "--protocol",
                             "fedavg", "--samples", "6", "--local-batch", "4", "--local-epochs", "2",
                             "--local-optimizer", "sgd", "--local-lr", "0.01", "--defense",
                             "clip-value:0.01,gaussian:0.001", "--keep-update", "--keep-params", "--quiet",
                             "--out", str(out))
    assert code == 0, err
    assert "fedavg" in stdout and "clip-value,gaussian" in stdout
    cap = load_capture(out)
    assert cap.n == 3 and cap.samples == 6 and cap.schedule.shape == (3, 2, 2, 4)
    assert (cap.schedule[:, :, -1, 2:] == -1).all()  # 6 images in batches of 4: the last batch is padded
    assert cap.protocol["optimizer"] == "sgd" and cap.meta["dp"] is None
    assert [d["name"] for d in cap.meta["defenses"]] == ["clip-value", "gaussian"]
    # an existing file is refused without --force, and kept
    code, _, err = _run(capsys, "capture", "--model", "mlp", "--n", "1", "--quiet", "--out", str(out))
    assert code == 2 and "--force" in err and load_capture(out).n == 3


@pytest.mark.parametrize("argv,needle", [
    (["--defense", "gaussian"], "gaussian"),
    (["--defense", "clip-norm:1,bogus:3"], "bogus"),
    (["--defense", "dpsgd:eps=1,dpsgd:eps=2"], "at most one"),
    (["--protocol", "fedavg", "--batch-size", "4"], "--samples"),
    (["--local-epochs", "2"], "fedavg only"),
])
def test_bad_capture_options_give_one_line_and_write_nothing(argv, needle, tmp_path, capsys):
    out = tmp_path / "caps.npz"
    code, _, err = _run(capsys, "capture", "--model", "mlp", "--n", "2", "--quiet", "--out", str(out), *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_dpsgd_inside_fedavg_is_accounted_over_every_local_step(tmp_path, capsys):
    out = tmp_path / "caps.npz"
    code, _, err = _run(capsys, "capture", "--model", "mlp", "--hidden", "8", "--n", "2", "--protocol", "fedavg",
                        "--samples", "8", "--local-batch", "4", "--local-epochs", "3", "--defense", "dpsgd:eps=8",
                        "--quiet", "--out", str(out))
    assert code == 0, err
    dp = load_capture(out).meta["dp"]
    assert dp["calibration"] == "dpsgd" and dp["steps"] == 6 and dp["sampling_rate"] == 0.5


def test_train_fedavg_then_capture_records_the_global_epoch(tmp_path, capsys):
    run = tmp_path / "run"
    code, stdout, err = _run(capsys, "train-fedavg", "--model", "mlp", "--hidden", "8", "--n", "80", "--samples",
                             "10", "--local-batch", "5", "--local-optimizer", "sgd", "--local-lr", "0.05",
                             "--rounds", "2", "--clients-per-round", "4", "--eval-every", "1", "--eval-size", "40",
                             "--quiet", "--json", "--out", str(run))
    assert code == 0, err
    last = json.loads(stdout)
    assert last["round"] == 2 and last["global_epoch"] == 1.0 and 0 <= last["test_accuracy"] <= 1
    caps = tmp_path / "caps.npz"
    assert _run(capsys, "capture", "--model", "mlp", "--hidden", "8", "--victim-checkpoint", str(run), "--n", "1",
                "--protocol", "fedavg", "--samples", "10", "--local-batch", "5", "--quiet",
                "--out", str(caps))[0] == 0
    assert load_capture(caps).protocol["global_epoch"] == 1.0


def test_attacks_lists_the_registry(capsys):
    code, out, _ = _run(capsys, "attacks")
    assert code == 0
    for name in ("spe", "venom", "fgla", "dlg", "ig", "mjolnir"):
        assert f"\n{name} " in f"\n{out}"
    assert "needs: whole_update, weights" in out


def test_attack_on_a_fedavg_capture_end_to_end(tmp_path, capsys):
    caps = tmp_path / "caps.npz"
    assert _run(capsys, "capture", "--model", "mlp", "--hidden", "8", "--image-size", "12", "--n", "2",
                "--protocol", "fedavg", "--samples", "2", "--local-batch", "2", "--local-optimizer", "sgd",
                "--keep-update", "--keep-params", "--quiet", "--out", str(caps))[0] == 0
    out = tmp_path / "ig"
    code, stdout, err = _run(capsys, "attack", "ig", "--capture", str(caps), "--out", str(out), "--iterations",
                             "2", "--quiet", "--lpips-net", "none", "--null", "shuffle")
    assert code == 0, err
    assert "NULL CONTROL (shuffle)" in stdout.splitlines()[0] and err == ""  # --quiet: no "compiling ..."
    # 2 clients x M = 2: the grid shows the 4 Hungarian-matched pairs (12x12 shown 8x: 96 px cells), two rows
    # and a caption line
    from PIL import Image

    width, height = Image.open(out / "grid.png").size
    assert width > 2 + 4 * (96 + 2) and 2 + 2 * (96 + 2) < height < 2 + 2 * (96 + 2) + 30
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["kind"] == "fedavg" and len(metrics["metrics"]["psnr"]["values"]) == 4
    assert np.load(out / "reconstructions.npz")["images"].shape == (2, 2, 12, 12, 1)


def test_dlf_attacks_a_precode_fedavg_capture(tmp_path, capsys):
    """DLF replays a PRECODE client along the bottleneck's mean path (it cannot know the client's draws)."""
    caps = tmp_path / "caps.npz"
    assert _run(capsys, "capture", "--model", "mlp", "--hidden", "8", "--image-size", "8", "--precode", "4",
                "--n", "2", "--protocol", "fedavg", "--samples", "2", "--local-batch", "1", "--local-optimizer",
                "sgd", "--keep-update", "--keep-params", "--quiet", "--out", str(caps))[0] == 0
    out = tmp_path / "dlf"
    code, _, err = _run(capsys, "attack", "dlf", "--capture", str(caps), "--out", str(out), "--iterations", "2",
                        "--quiet", "--lpips-net", "none")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["metrics"]["psnr"]["values"]) == 4
    assert np.isfinite(metrics["metrics"]["psnr"]["values"]).all()


@pytest.mark.slow
def test_train_flow_prior_resume_and_sample(tmp_path, capsys):
    run = tmp_path / "prior"
    common = ("--batch-size", "8", "--warmup", "1", "--checkpoint-every", "1", "--quiet", "--out", str(run))
    code, out, err = _run(capsys, "train", "flow-prior", "--dataset", "mnist-embedded", "--image-size", "16",
                          "--n", "32", "--steps", "2", "--json", *common)
    assert code == 0, err and json.loads(out)["step"] == 2
    code, _, err = _run(capsys, "train", "flow-prior", "--dataset", "cifar10", "--steps", "3", "--resume",
                        "--quiet", "--out", str(run))
    assert code == 2 and "drop the data flag" in err
    code, out, err = _run(capsys, "train", "flow-prior", "--steps", "3", "--resume", "--quiet", "--json",
                          "--out", str(run))
    assert code == 0, err
    assert json.loads(out)["step"] == 3 and json.loads(out)["dataset"]["image_size"] == 16
    grid = tmp_path / "grid.png"
    code, _, err = _run(capsys, "sample", "--prior", str(run), "--n", "4", "--steps", "2", "--out", str(grid))
    assert code == 0 and grid.is_file(), err
