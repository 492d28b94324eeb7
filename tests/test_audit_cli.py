"""``jaxleak audit run | status | report`` and ``jaxleak demo`` on the command line."""

import json
import os

import pytest

from jaxleak.cli import main

TOML = """
name = "cli"
clients = 2
defenses = ["none", "clip-norm:1,gaussian:0.01"]
[data]
datasets = ["mnist-embedded"]
public_n = 16
[[victims]]
model = "mlp"
layer = "first"
[[attacks]]
name = "spe"
"""


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_audit_run_status_report_and_rerun(tmp_path, capsys):
    audit = tmp_path / "a.toml"
    audit.write_text(TOML)
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "audit", "run", str(audit), "--out", str(out_dir), "--quiet")
    assert code == 0, err
    for name in ("report.html", "report.md", "report.json"):
        assert (out_dir / "report" / name).is_file()
    keys = json.loads((out_dir / "audit.json").read_text())["cells"]
    assert len(keys) == 2
    markdown, html = ((out_dir / "report" / name).read_text() for name in ("report.md", "report.html"))
    assert all(key in markdown and key in html for key in keys)  # the report holds every cell
    assert "data:image/png;base64," in html
    json.loads((out_dir / "report" / "report.json").read_text())

    code, out, _ = run(capsys, "audit", "status", str(out_dir))
    assert code == 0 and "2 done" in out.splitlines()[-1]
    code, out, _ = run(capsys, "audit", "status", str(out_dir), "--json")
    assert json.loads(out)["counts"]["done"] == 2

    code, out, _ = run(capsys, "audit", "run", str(audit), "--out", str(out_dir), "--no-report")
    assert code == 0 and "0 cells ran, 2 were done before, 0 failed" in out

    os.remove(out_dir / "report" / "report.md")
    code, out, _ = run(capsys, "audit", "report", str(out_dir), "--format", "md")
    assert code == 0 and (out_dir / "report" / "report.md").is_file()


@pytest.mark.parametrize("text, message", [
    ('[[victims]]\nmodel = "mlp"\n[[attacks]]\nname = "ig2"\n', "attacks[0].name: unknown attack 'ig2'"),
    ('[[victims]]\nmodel = "mlp"\n', "attacks: required"),
    ("name = \n", "not valid TOML"),
])
def test_a_bad_audit_file_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, text, message):
    audit = tmp_path / "bad.toml"
    audit.write_text(text)
    code, out, err = run(capsys, "audit", "run", str(audit), "--out", str(tmp_path / "out"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_shard_and_missing_folders(tmp_path, capsys):
    audit = tmp_path / "a.toml"
    audit.write_text(TOML)
    code, _, err = run(capsys, "audit", "run", str(audit), "--out", str(tmp_path / "o"), "--shard", "3/2")
    assert code == 2 and "--shard takes i/n" in err and not (tmp_path / "o").exists()
    for action in ("status", "report"):
        code, _, err = run(capsys, "audit", action, str(tmp_path))
        assert code == 2 and "holds no audit.json" in err

