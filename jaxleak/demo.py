"""``jaxleak demo``: a small offline audit on the MNIST digits shipped with a dependency.

FedSGD clients holding one digit each, protected by the paper calibration and by DP-SGD at
the same epsilons (and not at all), attacked with SPE at an ``mlp``'s first dense layer
(where SPE's output is the image itself), scored against the reconstruction bound each
defense promises. The grid is an ordinary audit file (written to ``OUT/demo.toml``), run by
:func:`jaxleak.audit.runner.run_audit`, so ``jaxleak audit run OUT/demo.toml --out OUT``
resumes or repeats it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

DEMO_DATASET = "mnist-embedded"


def demo_audit_text(*, clients: int = 64, epsilons: Sequence[float] = (1.0, 5.0, 10.0), seed: int = 0) -> str:
    """The demo's audit file (TOML).

    >>> print(demo_audit_text(clients=4, epsilons=(10,)).splitlines()[4])
    defenses = ["none", "dp-paper:eps=10", "dpsgd:eps=10"]
    """
    defenses = ["none", *(f"dp-paper:eps={e:g}" for e in epsilons), *(f"dpsgd:eps={e:g}" for e in epsilons)]
    quoted = ", ".join(f'"{d}"' for d in defenses)
    return f"""# jaxleak demo: FedSGD, one digit per client, SPE on an untrained mlp's first dense layer.
name = "demo"
clients = {clients}
seeds = [{seed}]
defenses = [{quoted}]
null = "shuffle"

[data]
datasets = ["{DEMO_DATASET}"]
split = "test"
public_split = "train"
public_n = 256

[success]
ssim = 0.5
psnr = 20.0

[[victims]]
model = "mlp"
layer = "first"
init_seed = {seed}

[[protocols]]
kind = "fedsgd"

[[attacks]]
name = "spe"
"""


def run_demo(*, out_dir: str = "jaxleak-demo", n: int = 64, epsilons: Sequence[float] = (1.0, 5.0, 10.0),
             seed: int = 0, verbose: bool = True) -> list[dict]:
    """Writes and runs the demo audit in ``out_dir`` and its report; returns one row per defense.

    Each row: ``defense``, ``epsilon`` (nominal, tight), ``noise_std``, ``psnr``, ``ssim``,
    ``asr`` (SSIM > 0.5), ``null_asr``, ``bound`` (``None`` without a DP guarantee) and
    ``report`` (the HTML file).
    """
    from jaxleak.audit.grid import load_audit
    from jaxleak.audit.runner import run_audit
    from jaxleak.report.audit import write_report
    from jaxleak.report.summary import format_table

    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "demo.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(demo_audit_text(clients=n, epsilons=epsilons, seed=seed))
    spec = load_audit(path)
    say(f"jaxleak demo: {n} clients x 1 digit ({DEMO_DATASET}), FedSGD, SPE on an untrained mlp's first layer; "
        f"no DP, the paper calibration and DP-SGD at eps = {', '.join(f'{e:g}' for e in epsilons)}")
    summary = run_audit(spec, out_dir, progress=verbose, say=say, argv=["demo"])
    written = write_report(out_dir)
    rows = []
    import json

    from jaxleak.audit.grid import expand

    for cell in expand(spec):
        result_path = os.path.join(out_dir, "cells", cell.key, "result.json")
        if not os.path.exists(result_path):
            continue
        with open(result_path, encoding="utf-8") as f:
            r = json.load(f)
        p, real = r["privacy"], r["real"]
        rows.append({
            "defense": cell.description["defense"],
            "eps (tight)": "-" if p["epsilon"] is None else f"{p['epsilon']:g} ({p['epsilon_tight']:.3g})",
            "noise std": p["noise_std"],
            "PSNR": real["metrics"]["psnr"]["mean"],
            "SSIM": real["metrics"]["ssim"]["mean"],
            "ASR": real["asr"]["ssim"]["rate"],
            "null ASR": (r["null"] or {}).get("asr", {}).get("ssim", {}).get("rate"),
            "bound": p["bound"]["ssim"]["bound"] if "ssim" in p["bound"] else None,
        })
    if rows:
        say(format_table(rows, list(rows[0])))
    say("ASR: share of clients whose digit came back with SSIM > 0.5; bound: the most any attack can reach "
        "under the defense's DP guarantee (Hayes et al.), '-' = no guarantee.")
    if summary["failed"]:
        say(f"{len(summary['failed'])} cell(s) failed: see `jaxleak audit status {out_dir}`")
    say(f"finished in {time.perf_counter() - t0:.1f} s; report: {written['html']}")
    return [{**row, "report": written["html"]} for row in rows]
