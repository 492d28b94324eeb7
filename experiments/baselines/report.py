"""Markdown table of ``quality.py`` runs (``results.json`` files), real attack vs null control vs paper.

    python experiments/baselines/report.py experiments/baselines/runs/cifar10-lenet-dlg*/results.json

Each row: one (setting, attack); the attack's PSNR / SSIM / LPIPS (alex) / ASR@0.5 on the real updates,
the same for its ``shuffle`` null control, and Venom Table 1's CIFAR-10 row for that attack and epsilon
(256x256 inputs, its LeNet; "-" where the paper has none: no-defense runs, GradInversion, iDLG).
"head-only" settings protect only the FC layer (``--dp-scope layer``); the others every layer.
Runs of several victims give one table per victim.
"""

from __future__ import annotations

import json
import sys

# Venom (AAAI 2026) Table 1, CIFAR-10: PSNR, SSIM, LPIPS, ASR (fraction) at eps 1, 5, 10.
PAPER_CIFAR10 = {
    "grnn": {1: (11.58, 0.408, 0.629, 0.0), 5: (14.98, 0.431, 0.562, 0.0), 10: (16.67, 0.416, 0.480, 0.0)},
    "ig": {1: (7.44, 0.056, 0.897, 0.0), 5: (7.45, 0.051, 0.895, 0.0), 10: (7.51, 0.045, 0.900, 0.0)},
    "dlg": {1: (5.67, 0.014, 0.969, 0.0), 5: (9.60, 0.077, 0.910, 0.0), 10: (15.19, 0.394, 0.529, 0.0)},
    "mjolnir": {1: (18.42, 0.664, 0.379, 0.30), 5: (19.24, 0.691, 0.299, 0.35),
                10: (21.78, 0.752, 0.332, 0.62)},
}
ORDER = ("dlg", "idlg", "ig", "gradinversion", "grnn", "mjolnir")


def _fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _cells(row) -> str:
    if row is None:
        return "- / - / - / -"
    return (f"{_fmt(row['psnr'])} / {_fmt(row['ssim'])} / {_fmt(row.get('lpips_alex'))} / "
            f"{_fmt(row.get('asr@0.5'))}")


def _epsilon(setting: str) -> float | None:
    """``"paper eps=10"`` / ``"paper eps=10 head-only"`` -> 10.0; ``"none"`` -> None."""
    return None if setting == "none" else float(setting.split("=")[1].split()[0])


def _setting_key(setting: str) -> tuple[int, bool, float]:
    eps = _epsilon(setting)
    return (0, False, 0.0) if eps is None else (1, "head-only" in setting, -eps)


def main(paths: list[str]) -> int:
    rows = {}
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        model = result["args"]["model"]
        for r in result["rows"]:
            rows[(model, r["setting"], r["attack"], r["null"])] = r
    models = sorted({k[0] for k in rows})
    for i, model in enumerate(models):
        if len(models) > 1:
            print(("\n" if i else "") + f"victim: {model}\n")
        _table({k[1:]: r for k, r in rows.items() if k[0] == model})
    return 0


def _table(rows: dict) -> None:
    """Rows keyed by (setting, attack, null) of one victim."""
    print("| setting | attack | iterations | PSNR / SSIM / LPIPS / ASR | null control (shuffle) | "
          "label acc | s / image | paper (Venom Table 1, CIFAR-10) |")
    print("|---|---|---|---|---|---|---|---|")
    settings = sorted({k[0] for k in rows}, key=_setting_key)
    for setting in settings:
        eps = _epsilon(setting)
        for attack in ORDER:
            real, null = rows.get((setting, attack, None)), rows.get((setting, attack, "shuffle"))
            if real is None and null is None:
                continue
            paper = PAPER_CIFAR10.get(attack, {}).get(eps) if eps is not None else None
            paper_txt = " / ".join(str(v) for v in paper) if paper else "-"
            ref = real or null
            print(f"| {setting} | {attack} | {ref['iterations'] or 'ref'} | {_cells(real)} | {_cells(null)} | "
                  f"{_fmt(real and real['label_correct'])} | {_fmt(real and real['seconds_per_image'], 1)} | "
                  f"{paper_txt} |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
