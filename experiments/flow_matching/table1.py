"""The FM paper's Table 1 re-run: FedAvg test accuracy and FM's SSIM vs the std of Gaussian noise on updates.

For each noise std, ``convnet-sme`` is trained by FedAvg on CIFAR-10 train images with every
client adding N(0, std^2) to its released update (``_common.server_run``; the defense ``gaussian:STD``),
to global epoch ``--epoch``; its test accuracy is read there. Then clients of the attack setting
(``_common``: 5 local batches of B images, ``--optimizer``) release their update at those weights
under the same noise, and FM (``--attacks``: SME too) attacks it, with its ``shuffle`` null control.
The paper's five std values are lost (NOTES.md section 4); its (accuracy, SSIM) pairs are printed
beside ours in order, which is all that can be compared. Std 0 at the same epoch is the same cell
as Table 3's ConvNet row and Figure 4's point at that epoch (one shared runs folder).

    python experiments/flow_matching/table1.py --quick --prior random     # smoke run
    python experiments/flow_matching/table1.py                           # CPU budgets
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as C

PAPER = [(70.32, 0.621), (68.43, 0.618), (59.77, 0.469), (10.00, 0.306), (10.00, 0.070)]
"""The FM paper's Table 1: (test accuracy %, reconstruction SSIM) for its 5 noise stds, smallest first
(the std values did not survive the text extraction; the third is its Table 4 setting)."""


WHAT = "FM paper Table 1 re-run: FedAvg accuracy and attack SSIM vs Gaussian noise std on the update"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--split", default="test")
    p.add_argument("--stds", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 1e-1, 1.0],
                   help="std of the Gaussian noise on every released update (the paper's are lost; ours)")
    p.add_argument("--epoch", type=int, default=2, help="global FedAvg epoch of the accuracy and the attack")
    p.add_argument("--attacks", nargs="+", choices=("sme", "fm"), default=["fm"])
    C.add_attacked_client_args(p)
    args = C.parse_common(p, argv, server=True)
    if args.quick:
        args.epoch, args.stds = 1, args.stds[:2]
    if any(s < 0 for s in args.stds):
        raise SystemExit("--stds must be >= 0")
    return args


def defense_of(std: float) -> str:
    return "none" if std == 0 else f"gaussian:{std:g}"


def main(argv=None) -> int:
    args = parse_args(argv)
    out_json, runs = C.default_paths(args, "table1", runs_name=C.SERVER_RUNS)
    iterations = C.budgets(args)
    fm = C.fm_fields(args)
    protocol, samples, lr = C.attacked_clients(args)
    result = {
        **C.result_header("table1.py", argv, args, what=WHAT, attacks=args.attacks,
                          iterations=iterations, fm=fm, protocol=protocol, samples=samples),
        "paper": {"columns": ("test_accuracy_percent", "ssim"), "rows": PAPER, "stds": "lost in extraction"},
        "rows": [],
    }
    prior = None
    t0 = time.time()
    rows = []
    for std in args.stds:
        defense = defense_of(std)
        run, history = C.server_run(args, runs, model=args.model, width=args.width, epochs=args.epoch,
                                    defense=defense)
        per_attack = {a: {"real": [], "null": []} for a in args.attacks}
        for seed in args.seeds:
            data, prior = C.seed_clients(args, runs, prior, samples=samples, seed=seed)
            cap = C.client_capture(data, model=args.model, width=args.width, protocol=protocol, samples=samples,
                                   seed=seed, defense=defense, checkpoint=run, global_epoch=args.epoch)
            out = C.trained_cell_dir(runs, args, model=args.model, width=args.width, defense=defense,
                                     epoch=args.epoch, seed=seed)
            C.attack_cells(args.attacks, cap, out, seed=seed, args=args, iterations=iterations,
                           prior=prior.name, fm=fm, per_attack=per_attack, tag=f"std {std:g} seed {seed}")
        rows.append({
            "std": std, "defense": defense, "server_run": run, "global_epoch": args.epoch,
            "test_accuracy": C.accuracy_at(history, args.epoch),
            "attacks": C.summarize(per_attack, iterations),
        })
        result.update(rows=rows, prior=prior.info, wall_seconds=round(time.time() - t0, 1))
        C.write_results(out_json, result)

    header = ["noise std", "test acc %"] + [f"{a.upper()} {m}" for a in args.attacks for m in ("PSNR", "SSIM",
                                                                                                "null SSIM")]
    header += ["paper (acc %, SSIM), in order"]
    table = []
    for i, row in enumerate(rows):
        acc = row["test_accuracy"]
        line = [row["std"], None if acc is None else 100 * acc]
        for a in args.attacks:
            r, n = row["attacks"][a]["real"], row["attacks"][a]["null"] or {}
            line += [r["psnr"], r["ssim"], n.get("ssim")]
        line.append(f"{PAPER[i][0]:.2f}, {PAPER[i][1]:.3f}" if i < len(PAPER) else "-")
        table.append(line)
    C.print_table(header, table, prior_info=prior.info, written=str(out_json), footer=(
        f"{args.model} after global epoch {args.epoch} of FedAvg ({args.train_clients} clients x "
        f"{args.train_samples} {args.dataset} train images, local {args.train_optimizer} {args.train_lr:g}, "
        f"noise on every update); attacked clients: B = {args.batch}, local {args.optimizer} {lr:g}, the same "
        f"noise; means over {len(args.seeds)} seed(s) x {args.clients} clients"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
