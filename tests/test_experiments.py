"""The experiment scripts run end to end (slow: run with ``pytest -m slow``)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_venom_table1_quick_pipeline_writes_a_result_the_report_reads(tmp_path, capsys):
    table1 = _load(ROOT / "experiments/venom/table1.py")
    assert table1.main(["--quick", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]) == 0
    result = json.loads((tmp_path / "res" / "mnist-embedded-paper.json").read_text())
    for method in ("fgla", "venom-diff", "venom"):
        for eps in ("1.0", "5.0", "10.0"):
            entry = result["table"][method][eps]
            assert {"psnr", "ssim", "lpips_alex", "asr@0.5"} <= set(entry)
    assert result["table"]["spe"]["10.0"]["feature_cosine_raw"]["mean"] > 0.99
    # a second run reuses every checkpoint and evaluation
    assert table1.main(["--quick", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]) == 0
    report = _load(ROOT / "experiments/venom/report.py")
    capsys.readouterr()
    assert report.main([str(tmp_path / "res" / "mnist-embedded-paper.json")]) == 0
    assert "| venom | 10 |" in capsys.readouterr().out


def test_figure3_keep_takes_the_earlier_points_at_batch_sizes_not_run(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "experiments/flow_matching"))
    figure3 = _load(ROOT / "experiments/flow_matching/figure3.py")
    earlier = tmp_path / "figure3.json"
    earlier.write_text(json.dumps({"command": "figure3.py --batches 1 8", "date": "d",
                                   "points": [{"batch": b, "attack": a} for b in (1, 8, 16) for a in ("sme", "fm")]}))
    args = figure3.parse_args(["--batches", "16", "--keep", str(earlier)])
    assert sorted((p["batch"], p["attack"]) for p in args.kept) == [(1, "fm"), (1, "sme"), (8, "fm"), (8, "sme")]
    assert args.kept_source["batches"] == [1, 8] and args.kept_source["command"] == "figure3.py --batches 1 8"
    assert figure3.parse_args(["--batches", "16"]).kept == []
    for bad in (tmp_path / "missing.json", tmp_path / "figure3.png"):
        if bad.suffix == ".png":
            bad.write_bytes(b"\x89PNG")
        with pytest.raises(SystemExit) as exit_info:
            figure3.parse_args(["--keep", str(bad)])
        assert exit_info.value.code == 2
        assert "not a readable figure3 results JSON" in capsys.readouterr().err


def test_flow_matching_aggregate_keeps_the_flops_lower_bound_flag(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments/flow_matching"))
    common = _load(ROOT / "experiments/flow_matching/_common.py")
    rows = [{"psnr": 10.0, "flops_per_iteration": 4e9, "flops_lower_bound": True, "out": "a"},
            {"psnr": 12.0, "flops_per_iteration": 4e9, "flops_lower_bound": False, "out": "b"}]
    agg = common.aggregate(rows)
    assert agg["psnr"] == 11.0 and agg["psnr_std"] == 1.0 and agg["seeds"] == 2
    assert agg["flops_lower_bound"] is True and "flops_lower_bound_std" not in agg
    assert common.aggregate([{**r, "flops_lower_bound": False} for r in rows])["flops_lower_bound"] is False
    assert common.aggregate([{**r, "flops_lower_bound": None} for r in rows])["flops_lower_bound"] is None
