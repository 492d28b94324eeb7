"""Running an audit: resume after a failure mid-cell, shared captures, failures recorded, status."""

import json
import os

import numpy as np
import pytest

from jaxleak.audit import runner
from jaxleak.audit.grid import expand, parse_audit

# Two cells sharing one capture (SPE twice, the second scoring at a different success threshold
# through its own label), plus a second defense: 3 cells, 2 captures. MNIST digits embedded in a
# dependency: no data folder needed.
RAW = {
    "name": "tiny",
    "clients": 2,
    "defenses": ["none", "clip-norm:1,gaussian:0.01"],
    "data": {"datasets": ["mnist-embedded"], "public_n": 16},
    "victims": [{"model": "mlp", "layer": "first"}],
    "attacks": [{"name": "spe"}, {"name": "spe", "label": "spe-b", "options": {"sigma2": "estimate"}}],
    "exclude": [{"defense": "clip-norm:1,gaussian:0.01", "attack": "spe-b"}],
}


def spec():
    return parse_audit(RAW, source="tiny.toml")


def comparable(result):
    """result.json without what legitimately differs between two runs (times, memory)."""
    out = json.loads(json.dumps(result))
    out.pop("seconds")
    out["real"].pop("cost")
    return out


def results(out_dir):
    cells = expand(spec())
    return {c.key: json.load(open(os.path.join(out_dir, "cells", c.key, "result.json"))) for c in cells}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("audit") / "a")
    summary = runner.run_audit(spec(), out, progress=False, say=lambda *_: None)
    assert summary == {"cells": 3, "done_before": 0, "ran": 3, "failed": []}
    return out


def test_a_finished_cell_holds_its_results(uninterrupted):
    cells = expand(spec())
    assert len({c.capture_key for c in cells}) == 2
    for c in cells:
        folder = os.path.join(uninterrupted, "cells", c.key)
        assert sorted(os.listdir(folder)) == ["DONE", "cell.json", "grid.png", "null", "real", "result.json"]
        r = json.load(open(os.path.join(folder, "result.json")))
        assert r["key"] == c.key and r["cell"] == c.description and r["null"]["kind"] == "shuffle"
        assert set(r["real"]["asr"]) == {"ssim", "psnr"} and r["real"]["n"] == 2
        kappa = r["privacy"]["kappa"]["ssim"]
        assert 0 <= kappa["ci"][0] <= kappa["value"] <= kappa["ci"][1] <= 1
    none, noisy = (json.load(open(os.path.join(uninterrupted, "cells", c.key, "result.json")))
                   for c in (cells[0], cells[2]))
    # No defense: SPE on the first dense layer recovers the digits; no DP guarantee, no bound.
    assert none["real"]["metrics"]["ssim"]["mean"] > 0.95 and none["real"]["asr"]["ssim"]["rate"] == 1.0
    assert none["privacy"]["bound"]["ssim"]["bound"] is None and "no DP guarantee" in \
        none["privacy"]["bound"]["ssim"]["reason"]
    # clip-norm then Gaussian noise: mu = C / std = 100, so at kappa's upper end the bound is ~1 (at
    # kappa itself it may be 0: no public digit passes for a client's), and it is not exceeded.
    bound = noisy["privacy"]["bound"]["ssim"]
    assert bound["mu"] == pytest.approx(100.0) and bound["bound_hi"] > 0.99 and bound["bound"] <= bound["bound_hi"]
    assert noisy["privacy"]["exceeds_bound"] == {"ssim": False, "psnr": False}
    # The null control (another client's update) does not recover the digits.
    assert none["null"]["metrics"]["ssim"]["mean"] < 0.5


def test_a_rerun_skips_done_cells(uninterrupted):
    summary = runner.run_audit(spec(), uninterrupted, progress=False, say=lambda *_: None)
    assert summary == {"cells": 3, "done_before": 3, "ran": 0, "failed": []}
    status = runner.audit_status(uninterrupted)
    assert status["counts"]["done"] == 3


def test_resume_after_a_failure_mid_cell_gives_identical_results(tmp_path, monkeypatch, uninterrupted):
    from jaxleak.audit import run as run_module

    out = str(tmp_path / "b")
    real_run_attack = run_module.run_attack
    calls = {"n": 0}

    def dies_on_the_second_cells_null_run(name, cap, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # cell 1: real run done, null run dies (as a kill would leave it)
            raise RuntimeError("injected failure")
        return real_run_attack(name, cap, **kwargs)

    monkeypatch.setattr(run_module, "run_attack", dies_on_the_second_cells_null_run)
    summary = runner.run_audit(spec(), out, progress=False, say=lambda *_: None)
    assert summary["ran"] == 2 and [line for _, line in summary["failed"]] == ["RuntimeError: injected failure"]
    failed_key = summary["failed"][0][0]
    assert runner.cell_status(os.path.join(out, "cells", failed_key)) == ("failed", "RuntimeError: injected failure")
    assert os.path.exists(os.path.join(out, "cells", failed_key, "real", "metrics.json"))  # the partial result

    monkeypatch.setattr(run_module, "run_attack", real_run_attack)
    builds = []
    monkeypatch.setattr(runner, "build_capture", lambda *a, **k: builds.append(1))  # must not be needed
    summary = runner.run_audit(spec(), out, progress=False, say=lambda *_: None)
    assert summary == {"cells": 3, "done_before": 2, "ran": 1, "failed": []} and not builds
    a, b = results(uninterrupted), results(out)
    assert {k: comparable(v) for k, v in a.items()} == {k: comparable(v) for k, v in b.items()}
    for key in a:
        with np.load(os.path.join(uninterrupted, "cells", key, "real", "reconstructions.npz")) as x, \
                np.load(os.path.join(out, "cells", key, "real", "reconstructions.npz")) as y:
            np.testing.assert_array_equal(x["images"], y["images"])


def test_a_capture_is_computed_once_per_group(tmp_path, monkeypatch):
    built = []
    real_build = runner.build_capture

    def counting(description, **kwargs):
        built.append(description["defense"])
        return real_build(description, **kwargs)

    monkeypatch.setattr(runner, "build_capture", counting)
    raw = {**RAW, "defenses": ["none"], "exclude": [], "null": "none"}
    runner.run_audit(parse_audit(raw, source="t.toml"), str(tmp_path / "c"), progress=False, say=lambda *_: None)
    assert built == ["none"]  # two attacks, one capture


def test_status_reports_stale_and_missing_cells(tmp_path):
    out = str(tmp_path / "d")
    cells = expand(spec())
    runner.write_audit_json(out, spec(), cells)
    folder = os.path.join(out, "cells", cells[0].key)
    os.makedirs(folder)
    with open(os.path.join(folder, runner.LOCK), "w") as f:
        json.dump({"pid": 2**22 + 12345, "host": __import__("socket").gethostname(),
                   "started": "2026-01-01T00:00:00+00:00"}, f)
    states = {key: state for key, state, _ in runner.audit_status(out)["cells"]}
    assert states == {cells[0].key: "stale", cells[1].key: "missing", cells[2].key: "missing"}
    with pytest.raises(FileNotFoundError, match="holds no audit.json"):
        runner.audit_status(str(tmp_path))


def test_a_victim_after_global_epoch_e_of_a_fedavg_run(tmp_path):
    """``global_epoch = E`` loads the kept round that reached epoch E, not the run's last."""
    import jax

    from jaxleak.audit.grid import AuditSpecError
    from jaxleak.audit.workflow import build_victim, load_data, victim_from_capture
    from jaxleak.capture import load_capture
    from jaxleak.protocols import Protocol
    from jaxleak.protocols.server import FedAvgTraining, train_fedavg

    data = load_data("mnist-embedded", split="train", n=16, seed=3)
    victim, w0, _ = build_victim("mlp", dataset=data, hidden=[8])
    config = FedAvgTraining(rounds=4, clients_per_round=2, samples=4, num_clients=4,
                            protocol=Protocol(kind="fedavg", lr=0.01, optimizer="sgd"))  # an epoch = 2 rounds
    run = tmp_path / "run"
    final, _ = train_fedavg(victim, w0, data.images, data.labels, config=config, out=run, checkpoint_every=2,
                            keep=4, progress=False)
    raw = {**RAW, "clients": 2, "defenses": ["none"], "exclude": [], "null": "none", "attacks": [{"name": "spe"}],
           "victims": [{"model": "mlp", "hidden": [8], "layer": "first", "checkpoint": str(run), "global_epoch": 1},
                       {"model": "mlp", "hidden": [8], "layer": "first", "checkpoint": str(run), "label": "last"}]}
    out = str(tmp_path / "a")
    runner.run_audit(parse_audit(raw, source="t.toml"), out, progress=False, say=lambda *_: None)
    at_epoch_1, last = (load_capture(os.path.join(out, "captures", c.capture_key, "capture.npz"))
                        for c in expand(parse_audit(raw, source="t.toml")))
    assert at_epoch_1.meta["checkpoint_round"] == 2 and at_epoch_1.protocol["global_epoch"] == 1
    assert last.protocol["global_epoch"] == 2.0 and "checkpoint_round" not in last.meta
    leaves = jax.tree_util.tree_leaves
    w_last, w_1 = (victim_from_capture(cap)[1] for cap in (last, at_epoch_1))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(w_last), leaves(final), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(w_1), leaves(w_last), strict=True))
    with pytest.raises(AuditSpecError, match=r"victims\[0\].global_epoch: .* stops at global epoch 2"):
        parse_audit({**raw, "victims": [{"model": "mlp", "checkpoint": str(run), "global_epoch": 3}]}, source="t")
    with pytest.raises(AuditSpecError, match=r"victims\[0\].global_epoch: needs checkpoint"):
        parse_audit({**raw, "victims": [{"model": "mlp", "global_epoch": 1}]}, source="t")
