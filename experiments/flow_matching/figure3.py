"""The FM paper's Figure 3 re-run: reconstruction MSE vs the client batch size B, SME vs FM (PNG + JSON).

Same clients as ``table2.py`` (``convnet-sme``, CIFAR-10 test images, FedAvg with 5 local batches of
B images, the paper's local Adam 0.1 by default), for B in {1, 2, 4, 8, 16}; SME and FM at the same
budget, each with its ``shuffle`` null control (dashed in the plot). MSE is per image after the
Hungarian matching of ``jaxleak.audit.evaluate``, averaged over clients, then over seeds (error bars:
std over seeds). The paper gives Figure 3 only as a plot (its values are not in the text), so no
paper numbers are printed; :data:`PAPER` says so.

    python experiments/flow_matching/figure3.py --quick --prior random     # smoke run
    python experiments/flow_matching/figure3.py                           # CPU budgets, 3 seeds
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as C

ATTACKS = ("sme", "fm")
PAPER = None
"""The FM paper's Figure 3 (MSE vs B): a plot only; the text extraction holds no values, and the text
says only that FM's MSE is lowest at every B and the gap widens with B."""

WHAT = "FM paper Figure 3 re-run: reconstruction MSE vs client batch size B, SME vs FM, with nulls"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--split", default="test")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="client batch sizes (default 1 2 4 8 16)")
    p.add_argument("--optimizer", choices=sorted(C.OPTIMIZERS), default="adam")
    p.add_argument("--png", default=None, help="plot (default: next to --out, .png)")
    p.add_argument("--keep", default=None, metavar="JSON",
                   help="an earlier figure3 results JSON: its points at batch sizes not run here are kept "
                        "(plot, table and output; recorded as kept_from)")
    args = C.parse_common(p, argv)
    args.batches = args.batches or ([1, 2] if args.quick else [1, 2, 4, 8, 16])
    try:
        args.kept, args.kept_source = kept_points(args.keep, args.batches)
    except (OSError, ValueError, KeyError, TypeError) as err:
        p.error(f"--keep {args.keep}: not a readable figure3 results JSON ({err})")
    return args


def kept_points(path: str | None, batches: list[int]) -> tuple[list[dict], dict | None]:
    """The points of an earlier figure3 JSON at batch sizes not in ``batches``, and where they came from.

    The source is the file with its own command and date (the file may be overwritten by this run's output).
    """
    if path is None:
        return [], None
    import json
    from pathlib import Path

    earlier = json.loads(Path(path).read_text())
    points = [p for p in earlier["points"] if p["batch"] not in batches]
    source = {"file": path, "batches": sorted({p["batch"] for p in points}),
              **{k: earlier.get(k) for k in ("command", "date", "machine", "wall_seconds")}}
    return points, source


def plot(points: list[dict], path, *, title: str) -> None:
    """MSE vs B, one solid line per attack and its null control dashed (log-2 x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    C.attack_errorbars(ax, points, x="batch", metric="mse", attacks=ATTACKS)
    ax.set_xscale("log", base=2)
    batches = sorted({p["batch"] for p in points})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("client batch size B")
    ax.set_ylabel("reconstruction MSE (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_json, runs = C.default_paths(args, "figure3")
    png = args.png or str(out_json.with_suffix(".png"))
    iterations = C.budgets(args)
    fm = C.fm_fields(args)
    optimizer, lr = C.OPTIMIZERS[args.optimizer]
    result = {
        **C.result_header("figure3.py", argv, args, what=WHAT, attacks=ATTACKS, iterations=iterations, fm=fm),
        "paper": "Figure 3 is a plot only; no values in the text",
        "png": png,
        "points": [],
    }
    kept = args.kept
    if kept:
        result["kept_from"] = args.kept_source
    prior = None
    t0 = time.time()
    points = []
    for batch in args.batches:
        protocol, samples = C.fedavg_setting(batch=batch, local_batches=args.local_batches, optimizer=optimizer,
                                             lr=lr, reading=args.reading)
        per_attack = {a: {"real": [], "null": []} for a in ATTACKS}
        for seed in args.seeds:
            data, prior = C.seed_clients(args, runs, prior, samples=samples, seed=seed)
            cap = C.client_capture(data, model=args.model, width=args.width, protocol=protocol, samples=samples,
                                   seed=seed, checkpoint=args.victim_checkpoint)
            C.attack_cells(ATTACKS, cap, runs / f"B{batch}" / f"seed{seed}", seed=seed, args=args,
                           iterations=iterations, prior=prior.name, fm=fm, per_attack=per_attack,
                           tag=f"B={batch} seed {seed}")
        points += [{"batch": batch, "samples": samples, "attack": attack, "iterations": iterations[attack],
                    "protocol": {**protocol.as_meta(samples), "reading": args.reading}, **C.seed_summary(v)}
                   for attack, v in per_attack.items()]
        points = sorted(points + [p for p in kept if p["batch"] not in {q["batch"] for q in points}],
                        key=lambda p: (p["batch"], p["attack"]))
        result.update(points=points, prior=prior.info, wall_seconds=round(time.time() - t0, 1))
        C.write_results(out_json, result)

    title = (f"{args.dataset} {args.split}, {args.model}, FedAvg {args.local_batches} x B, local {args.optimizer} "
             f"{lr:g}\n{len(args.seeds)} seed(s) x {args.clients} clients, SME {iterations['sme']} / FM "
             f"{iterations['fm']} iterations"
             + ("; SMOKE (random prior)" if prior.info.get("random") else ""))
    plot(points, png, title=title)
    header = ["B", "images / client", "attack", "iters (paper)", "MSE", "MSE std", "PSNR", "SSIM", "null MSE"]
    table = [[p["batch"], p["samples"], p["attack"], f"{p['iterations']} ({C.PAPER_BUDGETS[p['attack']]})",
              p["real"]["mse"], p["real"]["mse_std"], p["real"]["psnr"], p["real"]["ssim"],
              (p["null"] or {}).get("mse")] for p in points]
    C.print_table(header, table, prior_info=prior.info, written=f"{out_json} and {png}",
                  after="the paper's Figure 3 has no values in its text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
