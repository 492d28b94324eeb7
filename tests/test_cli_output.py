"""What the command line prints for people: inspect, result tables, grids, option names, --help defaults."""

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxleak import _console
from jaxleak.capture.io import _example_capture
from jaxleak.cli import build_parser, main
from jaxleak.report import save_image_grid


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- inspect


def test_inspect_a_tiny_capture_prints_the_chain_the_dp_record_and_the_bound(tmp_path, capsys):
    caps = tmp_path / "caps.npz"
    # paper DP inside the step, then a norm clip and unit Gaussian noise on the update: the clip+noise
    # guarantee (mu = C / std = 1) is the tighter one, 0.389 at kappa = 0.1 (the known value)
    code, _, err = _run(capsys, "capture", "--dataset", "mnist-embedded", "--model", "mlp", "--hidden", "8",
                        "--n", "2", "--defense", "dp-paper:eps=10,clip-norm:1,gaussian:1", "--quiet",
                        "--out", caps)
    assert code == 0, err
    code, out, err = _run(capsys, "inspect", caps, "--kappa", "0.1")
    assert code == 0, err
    fields, key = {}, None
    for line in out.splitlines()[1:]:  # "label       text", continuation lines without the label
        key = line[:10].strip() or key
        fields.setdefault(key, []).append(line[12:])
    assert out.splitlines()[0].startswith(f"{caps}: capture format version 2")
    assert fields["clients"] == ["N = 2 clients x M = 1 image(s), images 28x28x1, 10 classes"]
    assert fields["dataset"][0].startswith("mnist-embedded, split train")
    assert fields["victim"][0].startswith("mlp (hidden=8), init seed 0")
    assert fields["protocol"][0].startswith("fedsgd: one gradient")
    chain = " ".join(fields["defenses"])
    assert chain.startswith("1. dp-paper [step]: ") and "epsilon=10" in chain
    assert "2. clip-norm [update]: c=1" in chain and "3. gaussian [update]: std=1" in chain
    assert "epsilon 10 nominal, 10.39 tight, delta 1e-05" in " ".join(fields["DP"])
    bound = " ".join(fields["bound"])
    assert bound.startswith("P[reconstruction succeeds] <= 0.3891 at baseline kappa = 0.1 (mu = 1, closed form")
    assert "mu = C/std" in bound
    assert fields["arrays"][0].split()[:2] == ["truth/images", "uint8"]
    assert fields["arrays"][-1].startswith("total ") and fields["arrays"][-1].endswith("MB in memory")

    code, out, _ = _run(capsys, "inspect", caps, "--json")
    d = json.loads(out)
    assert d["bound"]["kappa"] == _console.DEFAULT_KAPPA == 0.01 and d["bound"]["mu"] == pytest.approx(1.0)
    assert d["bound"]["bound"] < 0.389  # monotone in kappa
    assert [x["name"] for x in d["defenses"]] == ["dp-paper", "clip-norm", "gaussian"]
    assert d["dp"]["epsilon"] == 10 and d["dp"]["epsilon_tight"] == pytest.approx(10.39, abs=0.01)
    assert {a["key"]: a["shape"] for a in d["arrays"]}["update/head/kernel"] == [2, 8, 10]
    assert d["total_mb"] == pytest.approx(sum(a["mb"] for a in d["arrays"]))


def test_inspect_without_a_guarantee_says_no_bound_and_why():
    text = _console.format_capture(_console.describe_capture(_example_capture(), path="x.npz"))
    assert "defenses    none: the update is released as is" in text
    assert "DP          none (no DP defense in the chain)" in text
    assert "bound       no bound (no defense: the update is released as is, so no DP guarantee)" in text


@pytest.mark.parametrize("kappa", ["0", "1", "-0.5", "x"])
def test_inspect_refuses_a_kappa_outside_the_open_unit_interval(kappa, capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect", "caps.npz", "--kappa", kappa])
    assert e.value.code == 2 and "probability in (0, 1)" in capsys.readouterr().err


# --------------------------------------------------------------------------- tables


def test_mean_ci_and_the_metric_rows_are_exact():
    out = _console.mean_ci([1.0, 2.0, 3.0, 4.0])
    half = 1.96 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert out == {"mean": 2.5, "lo": pytest.approx(2.5 - half), "hi": pytest.approx(2.5 + half), "n": 4}
    assert _console.mean_ci([math.nan, math.inf])["mean"] is None
    # metrics.json writes +inf PSNR (an exact reconstruction) as null and counts it in n_inf
    rows = _console.metric_rows({"psnr": {"values": [20.0, None], "n_inf": 1, "n_nan": 0},
                                 "ssim": {"values": [0.9, 0.1, None], "n_inf": 0, "n_nan": 1}})
    by_name = {r["metric"]: r for r in rows}
    assert by_name["PSNR (dB)"]["mean"] == 60.0 and by_name["PSNR (dB)"]["n"] == 2
    assert by_name["SSIM"]["mean"] == 0.5 and by_name["SSIM"]["n"] == 2
    asr = by_name["ASR (SSIM > 0.5)"]
    assert asr["mean"] == 0.5 and asr["n"] == 2 and asr["95% CI"] == "[0.01258, 0.9874]"


def test_the_attack_table_names_a_null_control_and_the_cost():
    doc = {"attack": "ig", "n": 3, "null_control": "noise", "note": "a note",
           "metrics": {"psnr": {"values": [5.0, 6.0, 7.0]}, "ssim": {"values": [0.1, 0.2, 0.3]}},
           "cost": {"attack_seconds": 2.0, "flops_per_iteration": 1.5e6, "flops_lower_bound": True,
                    "peak_rss_bytes": 2**30, "peak_device_bytes": 3 * 2**30}}
    text = _console.format_attack_result(doc, capture="c.npz", written=["o/metrics.json"], grid_note="why")
    lines = text.splitlines()
    assert lines[0].startswith("ig on c.npz: 3 image(s), NULL CONTROL (noise)")
    assert lines[3].split()[:3] == ["PSNR", "(dB)", "6"] and lines[4].split()[:2] == ["SSIM", "0.2"]
    assert lines[5].startswith("ASR (SSIM > 0.5)")
    assert lines[6] == ("cost: 2 s, 1.5e+06 FLOPs/iteration (a lower bound), peak RSS 1.00 GiB, "
                        "peak device memory 3.00 GiB")
    assert lines[7:] == ["note: a note", "no grid.png: why", "wrote o/metrics.json"]


def test_training_tables_leave_unknown_values_out():
    text = _console.format_fields("train x: done", [("steps", 3), ("eval PSNR", None), ("written", "/o")])
    assert text.splitlines() == ["train x: done", "  steps    3", "  written  /o"]


# --------------------------------------------------------------------------- grids


def test_grid_captions_add_one_text_line_under_their_row(tmp_path):
    images = np.full((3, 10, 10, 1), 0.5)
    plain = np.asarray(Image.open(save_image_grid(tmp_path / "plain.png", [images, images], pad=2, scale=2)))
    captioned = np.asarray(Image.open(save_image_grid(tmp_path / "captioned.png", [images, images], pad=2, scale=2,
                                                      captions=[None, ["1.0 dB", "2.0 dB", "exact"]])))
    assert captioned.shape[1] == plain.shape[1] and captioned.shape[0] > plain.shape[0]
    assert (captioned[: plain.shape[0] - 2] == plain[: plain.shape[0] - 2]).all()  # the images are unchanged
    band = captioned[plain.shape[0] - 2:]  # below the last row: the captions, dark text on white
    assert band.min() < 128 and (band[:, :2] == 255).all()
    with pytest.raises(ValueError, match="one entry"):
        save_image_grid(tmp_path / "x.png", [images, images], captions=[None])
    with pytest.raises(ValueError, match=r"captions\[1\]"):
        save_image_grid(tmp_path / "x.png", [images, images], captions=[None, ["only one"]])


def test_grid_rows_flatten_clients_and_caption_psnr():
    truth = np.random.default_rng(0).random((2, 3, 4, 4, 1))
    rows, captions = _console.grid_rows(truth, truth[:, ::-1], {"values": [10.04, None, 3.0, 4.0, 5.0, 6.0],
                                                                "n_inf": 0, "n_nan": 1}, limit=5)
    assert rows[0].shape == (5, 4, 4, 1) and np.array_equal(rows[0][3], truth[1, 0])
    assert np.array_equal(rows[1][0], truth[0, 2]) and captions == [None, ["10.0 dB", "n/a", "3.0 dB", "4.0 dB",
                                                                           "5.0 dB"]]
    with pytest.raises(ValueError, match="do not match"):
        _console.grid_rows(truth, truth[:, :, :2], None)


# --------------------------------------------------------------------------- option names and --help


@pytest.mark.parametrize("argv,dest,value", [
    (["capture", "--checkpoint", "v", "--out", "o.npz"], "victim_checkpoint", "v"),
    (["capture", "--steps", "3", "--out", "o.npz"], "dp_steps", 3),
    (["train-fedavg", "--checkpoint", "v", "--out", "o"], "victim_checkpoint", "v"),
    (["train", "venom", "--checkpoint", "v", "--out", "o"], "victim_checkpoint", "v"),
    (["train", "venom", "--epsilon", "1", "inf", "--out", "o"], "epsilons", [1.0, math.inf]),
    (["train-victim", "--train-steps", "7", "--out", "o"], "steps", 7),
    (["train", "mjolnir", "--captures", "c.npz", "--out", "o"], "capture", "c.npz"),
    (["attack", "ig", "--captures", "c.npz", "--out", "o"], "capture", "c.npz"),
    (["attack", "venom", "--capture", "c.npz", "--checkpoint", "net", "--out", "o"], "artifact", "net"),
])
def test_old_spellings_still_parse(argv, dest, value):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value


def test_new_spellings_parse_and_old_ones_are_hidden_from_help(capsys):
    parser = build_parser()
    args = parser.parse_args(["attack", "venom", "--capture", "c.npz", "--artifact", "net", "--out", "o"])
    assert (args.capture, args.artifact) == ("c.npz", "net")
    assert parser.parse_args(["train", "fgla", "--epsilons", "5", "--out", "o"]).epsilons == [5.0]
    assert parser.parse_args(["capture", "--victim-checkpoint", "v", "--out", "o"]).victim_checkpoint == "v"
    helps = {}
    for argv in (["capture"], ["attack", "venom"], ["train", "venom"], ["train-victim"], ["train", "mjolnir"]):
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        helps[" ".join(argv)] = capsys.readouterr().out
    assert "--victim-checkpoint" in helps["capture"] and "--checkpoint " not in helps["capture"]
    assert "--dp-steps" in helps["capture"] and "--steps" not in helps["capture"]
    attack = helps["attack venom"]
    assert "--artifact" in attack and "--checkpoint " not in attack
    assert "--captures" not in attack and "--capture CAPTURE" in attack
    assert "--epsilons" in helps["train venom"] and "--epsilon " not in helps["train venom"]
    assert "--victim-checkpoint" in helps["train venom"] and "--checkpoint " not in helps["train venom"]
    assert "--train-steps" not in helps["train-victim"] and "--checkpoint" not in helps["train-victim"]
    assert "--captures" not in helps["train mjolnir"]


def test_a_missing_required_option_names_the_new_spelling(capsys):
    with pytest.raises(SystemExit) as e:
        main(["attack", "ig", "--out", "o"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--capture is required" in err and "--captures" not in err


def test_help_shows_every_options_default(capsys):
    with pytest.raises(SystemExit):
        main(["capture", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "number of clients (default: 256)" in text and "noise seed (default: 0)" in text
    assert "--epsilon EPSILON privacy budget, one value (inf: no protection) (default: 10.0)" in text

    def check(parser, path):
        required_groups = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from check(sub, [*path, name])
            elif (action.option_strings and action.help is not argparse.SUPPRESS and action.nargs != 0
                  and not action.required and id(action) not in required_groups
                  and "default" not in (action.help or "").lower()):
                yield f"{' '.join(path)} {action.option_strings[0]}"

    assert list(check(build_parser(), ["jaxleak"])) == []


# --------------------------------------------------------------------------- progress


def _fit_tiny_denoiser(progress: bool):
    from jaxleak.attacks.optimization import mjolnir

    config = mjolnir.MjolnirConfig(denoiser="mlp", hidden=8, depth=1, timesteps=10, train_steps=5)
    data = jnp.asarray(np.random.default_rng(0).random((6, 7), dtype=np.float32))
    return mjolnir.fit_denoiser(data, config, progress=progress)


def test_mjolnir_denoiser_training_shows_a_progress_bar(capsys):
    _fit_tiny_denoiser(progress=True)
    assert "mjolnir denoiser" in capsys.readouterr().err


@pytest.mark.slow  # two compilations of the training loop, ~12 s on 2 busy cores
def test_mjolnir_denoiser_progress_bar_does_not_change_the_weights(capsys):
    quiet, loss_quiet = _fit_tiny_denoiser(progress=False)
    assert "mjolnir denoiser" not in capsys.readouterr().err
    shown, loss_shown = _fit_tiny_denoiser(progress=True)
    assert loss_quiet == loss_shown
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), quiet, shown))
