"""The audit report (docs/audit.md): a hand-built audit folder -> HTML, Markdown and JSON."""

import base64
import json
import math
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import beta

from jaxleak.report import REPORT_FORMATS, save_image_grid, write_report

SUCCESS = {"ssim": 0.5, "psnr": 20.0}
NO_DP = "no DP guarantee: no defense: the update is released as is, so no DP guarantee"


def _stat(mean, half):
    return {"mean": mean, "ci": [mean - half, mean + half]}


def _asr(threshold, successes, n, ci):
    return {"threshold": threshold, "rate": successes / n, "successes": successes, "n": n, "ci": ci}


def _cell(defense, *, seed=0, attack="spe", images_per_client=1):
    return {"dataset": {"name": "mnist-embedded", "split": "test", "images_per_client": images_per_client,
                        "image_size": 8, "public_split": "train", "public_n": 16},
            "victim": {"model": "mlp", "layer": "first", "init_seed": 0},
            "protocol": {"kind": "fedsgd"},
            "defense": defense,
            "attack": {"name": attack, "label": attack, "config": {}, "options": {}, "artifact": None},
            "seed": seed, "clients": 8, "null": "shuffle"}


def _privacy(defense, *, epsilon, noise_std, bound, bound_hi, mu, exceeds=False):
    if bound is None:
        bounds = {c: {"bound": None, "bound_hi": None, "mu": None, "method": None, "reason": NO_DP}
                  for c in SUCCESS}
    else:
        bounds = {c: {"bound": bound, "bound_hi": bound_hi, "mu": mu, "method": "closed form",
                      "reason": f"paper calibration, mu = {mu}"} for c in SUCCESS}
    return {"defenses": [] if defense == "none" else [{"name": "dp-paper", "epsilon": epsilon}],
            "noise_std": noise_std, "epsilon": epsilon,
            "epsilon_tight": None if epsilon is None else 0.79 * epsilon, "delta": 1e-5,
            "kappa": {c: {"value": 0.0, "ci": [0.0, 0.37]} for c in SUCCESS},
            "bound": bounds,
            "exceeds_bound": {"ssim": exceeds, "psnr": False}}


def _write_done(root, key, index, cell, *, psnr, ssim_successes, privacy, lpips=0.4):
    folder = root / "cells" / key
    (folder / "real").mkdir(parents=True)
    (folder / "null").mkdir()
    (folder / "cell.json").write_text(json.dumps({"key": key, "index": index, **cell}))
    rng = np.random.default_rng(index)
    images = rng.uniform(size=(4, 8, 8, 1))
    save_image_grid(folder / "grid.png", [images, images * 0.5, images[::-1]],
                    row_labels=["truth", "attack", "null"])
    n = 8
    metrics = {"psnr": _stat(psnr, 2.1), "ssim": _stat(0.2 + 0.1 * ssim_successes, 0.05)}
    if lpips is not None:
        metrics["lpips_alex"] = _stat(lpips, 0.02)
    ci = [float(beta.ppf(0.025, ssim_successes, n - ssim_successes + 1)) if ssim_successes else 0.0,
          float(beta.ppf(0.975, ssim_successes + 1, n - ssim_successes)) if ssim_successes < n else 1.0]
    result = {
        "key": key, "index": index, "capture_key": key[:-3] + "cap",
        "cell": cell, "seconds": 1.5 + index,
        "real": {"n": n, "metrics": metrics,
                 "asr": {"ssim": _asr(0.5, ssim_successes, n, ci), "psnr": _asr(20.0, 0, n, [0.0, 0.37])},
                 "cost": {"seconds": 1.0}},
        "null": {"kind": "shuffle", "n": n,
                 "metrics": {"psnr": _stat(8.0, 0.5), "ssim": _stat(0.05, 0.01)},
                 "asr": {"ssim": _asr(0.5, 0, n, [0.0, 0.37]), "psnr": _asr(20.0, 0, n, [0.0, 0.37])}},
        "privacy": privacy,
        "files": {"grid": "grid.png", "real": "real/metrics.json", "null": "null/metrics.json"},
    }
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    (folder / "DONE").write_text("")
    return result


def _audit_json(root, defenses, seeds=(0,), cells=None):
    text = f'name = "tiny"\nseeds = {list(seeds)}\nclients = 8\nnull = "shuffle"\n'
    audit = {"name": "tiny", "seeds": list(seeds), "clients": 8, "null": "shuffle", "defenses": defenses,
             "data": {"datasets": ["mnist-embedded"], "split": "test", "images_per_client": 1},
             "success": SUCCESS, "victims": [{"model": "mlp"}], "protocols": [{"kind": "fedsgd"}],
             "attacks": [{"name": "spe", "label": "spe"}], "exclude": [], "text": text,
             "provenance": {"command": "jaxleak audit run tiny.toml --out DIR", "date": "2026-11-02",
                            "machine": "testhost (2 CPUs)",
                            "versions": {"jaxleak": "0.1.0", "jax": "0.4.35"}}}
    if cells is not None:
        audit["cells"] = list(cells)  # the runner's list of the grid's keys, in run order
    root.mkdir(parents=True, exist_ok=True)
    (root / "audit.json").write_text(json.dumps(audit, indent=1))


KEYS = {
    "none": "mnist-embedded_mlp_fedsgd_none_spe_s0_aaaaaaaaaa",
    "eps1": "mnist-embedded_mlp_fedsgd_dp-paper-eps-1_spe_s0_bbbbbbbbbb",
    "eps10": "mnist-embedded_mlp_fedsgd_dp-paper-eps-10_spe_s0_cccccccccc",
    "eps100": "mnist-embedded_mlp_fedsgd_dp-paper-eps-100_spe_s0_dddddddddd",
    "eps100s1": "mnist-embedded_mlp_fedsgd_dp-paper-eps-100_spe_s1_eeeeeeeeee",
}
NEVER_STARTED = [f"mnist-embedded_mlp_fedsgd_{d}_spe_s1_{c * 10}" for d, c in
                 (("none", "f"), ("dp-paper-eps-1", "a"), ("dp-paper-eps-10", "b"))]
ERROR_LINE = "RuntimeError: simulated failure in the attack (cell 3)"


def _build(root):
    """Four cells: no bound, within the bound, EXCEEDS the bound, failed; and one never started."""
    _audit_json(root, ["none", "dp-paper:eps=1", "dp-paper:eps=10", "dp-paper:eps=100"], seeds=(0, 1),
                cells=[*KEYS.values(), *NEVER_STARTED])
    _write_done(root, KEYS["none"], 0, _cell("none"), psnr=31.25, ssim_successes=8, lpips=None,
                privacy=_privacy("none", epsilon=None, noise_std=0.0, bound=None, bound_hi=None, mu=None))
    _write_done(root, KEYS["eps1"], 1, _cell("dp-paper:eps=1"), psnr=9.04, ssim_successes=0,
                privacy=_privacy("dp-paper", epsilon=1.0, noise_std=0.5, bound=0.05, bound_hi=0.6, mu=0.3))
    _write_done(root, KEYS["eps10"], 2, _cell("dp-paper:eps=10"), psnr=24.0, ssim_successes=8,
                privacy=_privacy("dp-paper", epsilon=10.0, noise_std=0.05, bound=0.2, bound_hi=0.5, mu=1.2,
                                 exceeds=True))
    failed = root / "cells" / KEYS["eps100"]
    failed.mkdir(parents=True)
    (failed / "cell.json").write_text(json.dumps({"key": KEYS["eps100"], "index": 3,
                                                  **_cell("dp-paper:eps=100")}))
    (failed / "ERROR").write_text(ERROR_LINE + "\n")
    (failed / "error.log").write_text("Traceback (most recent call last):\n  ...\n" + ERROR_LINE + "\n")
    # Interrupted before anything but its description: no DONE, ERROR or LOCK.
    started = root / "cells" / KEYS["eps100s1"]
    started.mkdir(parents=True)
    (started / "cell.json").write_text(json.dumps({"key": KEYS["eps100s1"], "index": 4,
                                                   **_cell("dp-paper:eps=100", seed=1)}))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    _build(root)
    paths = write_report(root)
    return root, paths, {fmt: Path(path).read_text(encoding="utf-8") for fmt, path in paths.items()}


def _strict_load(text):
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_paths_and_every_cell_in_every_format(report):
    root, paths, texts = report
    assert set(paths) == set(REPORT_FORMATS)
    assert paths["html"] == str(root / "report" / "report.html")
    assert paths["md"] == str(root / "report" / "report.md")
    for fmt in REPORT_FORMATS:
        for key in KEYS.values():
            assert key in texts[fmt], (fmt, key)
    data = _strict_load(texts["json"])
    assert {c["key"]: c["status"] for c in data["cells"]} == {
        KEYS["none"]: "done", KEYS["eps1"]: "done", KEYS["eps10"]: "done", KEYS["eps100"]: "failed",
        KEYS["eps100s1"]: "missing", **dict.fromkeys(NEVER_STARTED, "missing")}
    for fmt in REPORT_FORMATS:
        assert all(key in texts[fmt] for key in NEVER_STARTED), fmt
    assert "not started" in texts["md"] and "interrupted: no DONE, ERROR or LOCK" in texts["md"]
    # 8 cells in audit.json: 5 folders, of which 1 interrupted, and 3 cells never started.
    assert data["grid_size"] == 8
    assert data["counts"] == {"done": 3, "failed": 1, "running": 0, "stale": 0, "missing": 4}
    assert "3 done, 1 failed, 0 running, 0 stale, 4 missing (of 8 cells in the grid)" in texts["md"]
    assert [r["defense"] for r in data["rows"]] == ["none", "dp-paper:eps=1", "dp-paper:eps=10"]
    for fmt in REPORT_FORMATS:
        assert ERROR_LINE in texts[fmt]


def test_exceeding_cell_flagged_loudly_at_the_top(report):
    _, _, texts = report
    md, page = texts["md"], texts["html"]
    assert md.index("EXCEEDS BOUND") < md.index("## Overview")
    banner = re.search(r"<div class='banner'>(.*?)</div>\s*<h2>Overview", page, re.DOTALL)
    assert banner and KEYS["eps10"] in banner.group(1) and KEYS["eps1"] not in banner.group(1)
    data = _strict_load(texts["json"])
    assert data["flags"] == [{"row": 3, "key": KEYS["eps10"], "criteria": ["ssim"]}]
    assert [r["flagged"] for r in data["rows"]] == [False, False, True]
    # The flagged row is red in the table and its section carries the tag.
    assert page.count("<tr class=flag>") >= 2
    assert re.search(rf"id='cell-{KEYS['eps10']}' class='cell flag'", page)


def test_overview_numbers_rounded_and_missing_shown(report):
    _, _, texts = report
    md = texts["md"]
    row = next(line for line in md.splitlines() if line.startswith("| 2 |"))
    assert "9.0 [6.9, 11.1]" in row  # PSNR: one decimal
    assert "0.400 [0.380, 0.420]" in row  # LPIPS: three
    assert "0.00 [0.00, 0.37]" in row  # ASR with its Clopper-Pearson interval
    assert "0.050 (hi 0.600)" in row  # the bound
    assert "| 0.5 | 1 | 0.79 |" in row  # noise std, eps, eps tight
    none_row = next(line for line in md.splitlines() if line.startswith("| 1 |"))
    assert "no bound (1)" in none_row
    assert "| - |" in none_row  # no LPIPS, no epsilon
    assert f"(1) {NO_DP}" in md
    assert "no bound" in texts["html"] and NO_DP in texts["html"]
    for term in ("ASR", "kappa", "null control", "Phi(Phi^-1(kappa) + mu)"):
        assert term in md and term in texts["html"]
    assert "testhost (2 CPUs)" in md and "jaxleak audit run tiny.toml" in md and "jax 0.4.35" in md


def test_html_self_contained_with_grids_embedded(report):
    root, _, texts = report
    page = texts["html"]
    uris = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    grids = [(root / "cells" / KEYS[k] / "grid.png").read_bytes() for k in ("none", "eps1", "eps10")]
    decoded = [base64.b64decode(u) for u in uris]
    assert all(g in decoded for g in grids)
    assert all(d.startswith(b"\x89PNG") for d in decoded)
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page)
    assert "<script" not in page and "<link" not in page


def test_plots_for_what_the_grid_varies(report):
    root, _, texts = report
    plots = root / "report" / "plots"
    made = sorted(p.stem for p in plots.glob("*.png"))
    # epsilon, noise std and mu take 2+ values; the global epoch and the client batch do not vary.
    assert made == ["asr_vs_epsilon", "asr_vs_mu", "asr_vs_noise_std", "psnr_vs_epsilon",
                    "psnr_vs_noise_std"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots.glob("*.png"))
    uris = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", texts["html"])
    assert (plots / "asr_vs_epsilon.png").read_bytes() in [base64.b64decode(u) for u in uris]
    assert "plots/asr_vs_epsilon.png" in texts["md"]
    assert "plots/asr_vs_epsilon.png" in _strict_load(texts["json"])["plots"]


def test_json_strict_and_round_trips(report, tmp_path):
    _, _, texts = report
    assert "NaN" not in texts["json"] and "Infinity" not in texts["json"]
    data = _strict_load(texts["json"])
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["provenance"]["machine"] == "testhost (2 CPUs)"
    row = data["rows"][1]
    assert row["keys"] == [KEYS["eps1"]] and row["seeds"] == [0]
    assert row["metrics"]["psnr"]["mean"] == 9.04
    assert row["privacy"]["bound"]["ssim"]["bound"] == 0.05
    # A non-finite number in a cell (an uncapped PSNR) is written as null, not Infinity.
    bad = tmp_path / "bad"
    _audit_json(bad, ["none"])
    result = _write_done(bad, KEYS["none"], 0, _cell("none"), psnr=1.0, ssim_successes=1,
                         privacy=_privacy("none", epsilon=None, noise_std=0.0, bound=None, bound_hi=None,
                                          mu=None))
    result["real"]["metrics"]["psnr"] = {"mean": math.inf, "ci": [math.inf, math.inf]}
    (bad / "cells" / KEYS["none"] / "result.json").write_text(json.dumps(result))
    text = Path(write_report(bad, formats=["json"])["json"]).read_text()
    assert "Infinity" not in text
    assert _strict_load(text)["rows"][0]["metrics"]["psnr"] is None  # shown as "-"


def test_seeds_aggregated_into_one_row(tmp_path):
    _audit_json(tmp_path, ["dp-paper:eps=1"], seeds=(0, 1))
    for seed, (psnr, successes) in enumerate([(10.0, 2), (20.0, 4)]):
        _write_done(tmp_path, f"cell_s{seed}_{seed:010d}", seed, _cell("dp-paper:eps=1", seed=seed),
                    psnr=psnr, ssim_successes=successes,
                    privacy=_privacy("dp-paper", epsilon=1.0, noise_std=0.5, bound=0.3 + 0.1 * seed,
                                     bound_hi=0.6 + 0.1 * seed, mu=0.3))
    data = _strict_load(Path(write_report(tmp_path, formats=["json"])["json"]).read_text())
    (row,) = data["rows"]
    assert data["grid_size"] == 2  # no cell list in audit.json: the product, 1 defense x 2 seeds
    assert row["seeds"] == [0, 1] and row["n"] == 16
    assert row["keys"] == ["cell_s0_0000000000", "cell_s1_0000000001"]
    psnr = row["metrics"]["psnr"]
    assert psnr["mean"] == pytest.approx(15.0)
    # Independent seeds: half-width sqrt(2.1^2 + 2.1^2) / 2.
    assert psnr["ci"] == pytest.approx([15.0 - 2.1 / math.sqrt(2), 15.0 + 2.1 / math.sqrt(2)])
    asr = row["asr"]["ssim"]
    assert (asr["successes"], asr["n"], asr["rate"]) == (6, 16, 0.375)
    assert asr["ci"] == pytest.approx([beta.ppf(0.025, 6, 11), beta.ppf(0.975, 7, 10)])
    assert row["privacy"]["bound"]["ssim"]["bound"] == pytest.approx(0.35)
    assert row["privacy"]["bound"]["ssim"]["bound_hi"] == pytest.approx(0.7)
    md = Path(write_report(tmp_path, formats=["md"])["md"]).read_text()
    assert "| 1 | mnist-embedded | mlp/first | fedsgd | dp-paper:eps=1 | spe | 0,1 | 16 |" in md


def test_partial_grid_does_not_crash(tmp_path):
    _audit_json(tmp_path, ["none"])
    lock = tmp_path / "cells" / "locked_0000000000"
    lock.mkdir(parents=True)
    (lock / "cell.json").write_text(json.dumps({"key": "locked_0000000000", "index": 0, **_cell("none")}))
    # A dead process on this host: stale (the runner's rule, as `jaxleak audit status` says).
    (lock / "LOCK").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(),
                                           "started": "2026-11-02T10:00:00+00:00"}))
    alive = tmp_path / "cells" / "alive_0000000003"
    alive.mkdir()
    (alive / "LOCK").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                            "started": "2026-11-02T10:00:00+00:00"}))
    broken = tmp_path / "cells" / "broken_0000000001"
    broken.mkdir()
    (broken / "ERROR").write_text("ValueError: bad\n")  # no cell.json at all
    done_no_result = tmp_path / "cells" / "noresult_0000000002"
    done_no_result.mkdir()
    (done_no_result / "DONE").write_text("")
    paths = write_report(tmp_path)
    texts = {fmt: Path(p).read_text() for fmt, p in paths.items()}
    data = _strict_load(texts["json"])
    assert data["rows"] == [] and data["plots"] == []
    statuses = {c["key"]: c["status"] for c in data["cells"]}
    assert statuses == {"locked_0000000000": "stale", "broken_0000000001": "failed",
                        "noresult_0000000002": "failed", "alive_0000000003": "running"}
    assert f"pid {os.getpid()} on {socket.gethostname()}" in texts["md"]
    assert "No finished cells yet" in texts["html"] and "no finished cells yet" in texts["md"]
    assert "ValueError: bad" in texts["md"] and "result.json unreadable" in texts["md"]
    assert not (tmp_path / "report" / "plots").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="audit.json"):
        write_report(tmp_path)
    _audit_json(tmp_path, ["none"])
    with pytest.raises(ValueError, match="unknown format 'pdf'; allowed: html, md, json"):
        write_report(tmp_path, formats=["pdf"])
    with pytest.raises(ValueError, match="no format given"):
        write_report(tmp_path, formats=[])
    (tmp_path / "audit.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        write_report(tmp_path)


def test_out_dir_and_one_format(tmp_path):
    _audit_json(tmp_path / "a", ["none"])
    paths = write_report(tmp_path / "a", formats="md", out_dir=tmp_path / "elsewhere")
    assert paths == {"md": str(tmp_path / "elsewhere" / "report.md")}
    assert not (tmp_path / "a" / "report").exists()


def test_feature_attack_without_asr_nor_null(tmp_path):
    # SPE on a head layer recovers features: its own metrics, no ASR; null = "none" gives no null block.
    _audit_json(tmp_path, ["none"])
    result = _write_done(tmp_path, KEYS["none"], 0, _cell("none"), psnr=1.0, ssim_successes=0,
                         privacy=_privacy("none", epsilon=None, noise_std=0.0, bound=None, bound_hi=None,
                                          mu=None))
    result["real"] = {"n": 8, "metrics": {"feature_cosine": _stat(0.93, 0.01)}, "cost": {}}
    result["null"] = None
    (tmp_path / "cells" / KEYS["none"] / "result.json").write_text(json.dumps(result))
    texts = {f: Path(p).read_text() for f, p in write_report(tmp_path).items()}
    row = next(line for line in texts["md"].splitlines() if line.startswith("| 1 |"))
    assert "| - | - | - |" in row  # no PSNR / SSIM / LPIPS
    assert "feature_cosine" in texts["html"] and "0.930 [0.920, 0.940]" in texts["html"]
    assert _strict_load(texts["json"])["rows"][0]["null"] is None
