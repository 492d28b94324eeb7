"""The FM paper's Figure 4 re-run: attack SSIM and test accuracy vs the global FedAvg epoch (PNG + JSON).

``convnet-sme`` is trained by FedAvg on CIFAR-10 train images (``_common.server_run``, every epoch
kept) to the last of ``--epochs``; at each epoch E, clients of the attack setting (``_common``: 5 local
batches of B images, ``--optimizer``) release their update at the weights after epoch E (epoch 0:
the initial weights) and SME and FM attack it, each with its ``shuffle`` null control (dashed). The
test accuracy of the weights is drawn on the right axis. The paper gives Figure 4 only as a plot.
The point at epoch 2 is the same cell as Table 3's ConvNet row (one shared runs folder).

    python experiments/flow_matching/figure4.py --quick --prior random     # smoke run
    python experiments/flow_matching/figure4.py                           # CPU budgets
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as C

PAPER = None
"""Figure 4 is a plot only; the text says FM's SSIM stays above the baselines' at every epoch and the gap is
largest late in training, where updates are small."""


WHAT = "FM paper Figure 4 re-run: SME / FM SSIM and test accuracy vs global FedAvg epoch, with nulls"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--split", default="test")
    p.add_argument("--epochs", type=int, nargs="+", default=[0, 1, 2], help="global epochs attacked")
    p.add_argument("--attacks", nargs="+", choices=("sme", "fm"), default=["sme", "fm"])
    C.add_attacked_client_args(p)
    p.add_argument("--png", default=None, help="plot (default: next to --out, .png)")
    args = C.parse_common(p, argv, server=True)
    if args.quick:
        args.epochs = [0, 1]
    if any(e < 0 for e in args.epochs):
        raise SystemExit("--epochs must be >= 0")
    args.epochs = sorted(set(args.epochs))
    return args


def plot(points: list[dict], accuracy: dict[int, float | None], path, *, title: str) -> None:
    """SSIM vs epoch per attack (null dashed), test accuracy on the right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    C.attack_errorbars(ax, points, x="epoch", metric="ssim", attacks=sorted({p["attack"] for p in points}))
    ax.set_xlabel("global FedAvg epoch of the attacked weights")
    ax.set_ylabel("reconstruction SSIM")
    epochs = sorted(accuracy)
    ax.set_xticks(epochs)
    ax2 = ax.twinx()
    acc = [accuracy[e] for e in epochs]
    if all(a is not None for a in acc):
        ax2.plot(epochs, [100 * a for a in acc], ":s", color="gray", label="test accuracy")
        ax2.set_ylabel("test accuracy (%)", color="gray")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_json, runs = C.default_paths(args, "figure4", runs_name=C.SERVER_RUNS)
    png = args.png or str(out_json.with_suffix(".png"))
    iterations = C.budgets(args)
    fm = C.fm_fields(args)
    protocol, samples, lr = C.attacked_clients(args)
    result = {
        **C.result_header("figure4.py", argv, args, what=WHAT, attacks=args.attacks,
                          iterations=iterations, fm=fm, protocol=protocol, samples=samples),
        "paper": "Figure 4 is a plot only; no values in the text",
        "png": png,
        "points": [],
    }
    run, history = C.server_run(args, runs, model=args.model, width=args.width, epochs=max(args.epochs))
    accuracy = {e: C.accuracy_at(history, e) for e in args.epochs}
    result.update(server_run=run, accuracy={str(e): a for e, a in accuracy.items()})
    prior = None
    t0 = time.time()
    points = []
    for epoch in args.epochs:
        per_attack = {a: {"real": [], "null": []} for a in args.attacks}
        for seed in args.seeds:
            data, prior = C.seed_clients(args, runs, prior, samples=samples, seed=seed)
            # epoch 0 is the run's initial weights (init seed 0), which the run folder does not keep
            cap = C.client_capture(data, model=args.model, width=args.width, protocol=protocol, samples=samples,
                                   seed=seed, checkpoint=run if epoch else None,
                                   global_epoch=epoch if epoch else None)
            out = C.trained_cell_dir(runs, args, model=args.model, width=args.width, defense="none", epoch=epoch,
                                     seed=seed)
            C.attack_cells(args.attacks, cap, out, seed=seed, args=args, iterations=iterations,
                           prior=prior.name, fm=fm, per_attack=per_attack, tag=f"epoch {epoch} seed {seed}")
        points += [{"epoch": epoch, "attack": attack, "test_accuracy": accuracy[epoch], **entry}
                   for attack, entry in C.summarize(per_attack, iterations).items()]
        result.update(points=points, prior=prior.info, wall_seconds=round(time.time() - t0, 1))
        C.write_results(out_json, result)

    title = (f"{args.dataset}, {args.model}, FedAvg ({args.train_clients} x {args.train_samples} train images, local "
             f"{args.train_optimizer} {args.train_lr:g})\nattacked: B = {args.batch}, local {args.optimizer} {lr:g}; "
             f"{len(args.seeds)} seed(s) x {args.clients} clients"
             + ("; SMOKE (random prior)" if prior.info.get("random") else ""))
    plot(points, accuracy, png, title=title)
    header = ["epoch", "test acc %", "attack", "iters (paper)", "PSNR", "SSIM", "SSIM std", "null SSIM"]
    table = [[p["epoch"], None if p["test_accuracy"] is None else 100 * p["test_accuracy"], p["attack"],
              f"{p['iterations']} ({C.PAPER_BUDGETS[p['attack']]})", p["real"]["psnr"], p["real"]["ssim"],
              p["real"]["ssim_std"], (p["null"] or {}).get("ssim")] for p in points]
    C.print_table(header, table, prior_info=prior.info, written=f"{out_json} and {png}",
                  footer="the paper's Figure 4 has no values in its text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
