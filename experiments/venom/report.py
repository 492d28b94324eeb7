"""Markdown tables from ``results/*.json`` (written by ``table1.py``), next to the paper's Table 1.

    python experiments/venom/report.py            # prints the tables used in README.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Venom (AAAI 2026) Table 1: (PSNR, SSIM, LPIPS, ASR@0.5) at eps = 1, 5, 10; delta = 1e-5; 256x256 inputs.
PAPER = {
    "mnist": {
        "fgla": [(15.84, 0.472, 0.523, 0.00), (23.81, 0.853, 0.161, 0.92), (26.55, 0.836, 0.092, 0.90)],
        "venom-diff": [(21.04, 0.832, 0.105, 0.89), (27.76, 0.933, 0.058, 0.96), (32.48, 0.973, 0.019, 0.98)],
        "venom": [(21.31, 0.835, 0.099, 0.90), (28.75, 0.940, 0.055, 0.97), (33.38, 0.979, 0.015, 0.99)],
    },
    "cifar10": {
        "fgla": [(15.57, 0.479, 0.651, 0.00), (18.36, 0.602, 0.475, 0.12), (20.11, 0.678, 0.412, 0.25)],
        "venom-diff": [(21.63, 0.804, 0.267, 0.70), (23.74, 0.867, 0.184, 0.84), (24.94, 0.870, 0.179, 0.85)],
        "venom": [(21.77, 0.805, 0.259, 0.72), (25.03, 0.878, 0.179, 0.86), (26.06, 0.895, 0.155, 0.88)],
    },
}
METRICS = (("psnr", "PSNR", 2), ("ssim", "SSIM", 3), ("lpips_alex", "LPIPS", 3), ("asr@0.5", "ASR", 2))


def _cell(entry: dict, key: str, digits: int) -> str:
    if key not in entry:
        return "-"
    m, s = entry[key]["mean"], entry[key]["std"]
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(result: dict, dataset: str) -> str:
    eps_keys = list(next(iter(result["table"].values())).keys())
    lines = []
    header = "| method | eps | " + " | ".join(f"{name}" for _, name, _ in METRICS)
    header += " | paper PSNR / SSIM / LPIPS / ASR |"
    lines += [header, "|" + "---|" * (len(METRICS) + 3)]
    for method in [m for m in ("fgla", "venom-diff", "venom") if m in result["table"]]:
        for i, eps in enumerate(eps_keys):
            entry = result["table"][method][eps]
            paper = PAPER.get(dataset, {}).get(method)
            ref = " / ".join(str(v) for v in paper[i]) if paper and i < len(paper) else "-"
            cells = " | ".join(_cell(entry, k, d) for k, _, d in METRICS)
            lines.append(f"| {method} | {float(eps):g} | {cells} | {ref} |")
    spe = result["table"].get("spe")
    if spe:
        lines.append("")
        lines.append("SPE alone (cosine of the recovered head-input map with the true one, raw fused map / "
                     "after WaveletRefine): "
                     + "; ".join(f"eps {float(e):g}: {v['feature_cosine_raw']['mean']:.4f} / "
                                 f"{v['feature_cosine']['mean']:.4f}" for e, v in spe.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    files = sorted((HERE / "results").glob("*.json")) if not argv else [Path(a) for a in argv]
    for path in files:
        result = json.loads(path.read_text())
        dataset = result["settings"]["dataset"]
        trained = result.get("trained", {})
        print(f"### {path.stem}\n")
        print(f"`{result['command']}` — {result['machine']}, started {result['started']}, "
              f"{result['wall_seconds'] / 60:.0f} min wall\n")
        for variant, summary in trained.items():
            print(f"- {variant}: {summary.get('step')} steps, final held-out PSNR "
                  f"{summary.get('eval_psnr', float('nan')):.2f} dB, trained on "
                  f"{summary['aux_dataset']['name']}:{summary['aux_dataset']['split']} "
                  f"({summary['aux_dataset']['n']} images)")
        print()
        print(table(result, dataset))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
