"""The FM paper's Table 3 re-run: FM and SME against five architectures after 2 global FedAvg epochs.

Each architecture (``vgg11``, ``mlp-mixer``, ``resnet8``, ``resnet18``, ``convnet-sme``) is first
trained by FedAvg on CIFAR-10 train images (``_common.server_run``: resumable, every epoch kept), to
global epoch ``--epoch`` (the paper: 2). Then clients of the attack setting (``_common``: 5 local
batches of B images, the local optimizer of ``--optimizer``) draw CIFAR-10 *test* images, release
their update at those server weights, and SME and FM attack it, each with its ``shuffle`` null
control. The table gives the test accuracy of the server weights beside the attack, since (the paper
says) attacks are sensitive to the training state and the models train at different rates. The
paper's Table 3 has FM only; SME is our addition.

Widths: ``--widths`` overrides a model's width (``model=WIDTH``). On the 2-core CPU the defaults are
narrower than the paper's for the two big models (``vgg11=16``, ``resnet18=16``; their own width is
64); each row prints the width it used and its parameter count.

    python experiments/flow_matching/table3.py --quick --prior random     # smoke run
    python experiments/flow_matching/table3.py                           # CPU budgets
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as C

MODELS = ("vgg11", "mlp-mixer", "resnet8", "resnet18", "convnet-sme")
ATTACKS = ("sme", "fm")
LABELS = {"vgg11": "VGG-11", "mlp-mixer": "MLP-Mixer", "resnet8": "ResNet-8", "resnet18": "ResNet-18",
          "convnet-sme": "Custom ConvNet (SME)"}
CPU_WIDTHS = {"vgg11": 16, "resnet18": 16}
"""Our CPU default widths (the models' own: 64); the other models run at their own width."""

PAPER = {
    # The FM paper, Table 3 ("after 2 epochs of global training on CIFAR-10"; FM only): PSNR, SSIM,
    # LPIPS(VGG), LPIPS(Alex), MSE, TV. The ConvNet row equals its Table 2 FM row.
    "vgg11": (16.514, 0.491, 0.406, 0.095, 0.051, 0.084),
    "mlp-mixer": (21.823, 0.739, 0.189, 0.033, 0.015, 0.060),
    "resnet8": (17.518, 0.576, 0.351, 0.086, 0.040, 0.086),
    "resnet18": (19.253, 0.642, 0.231, 0.037, 0.022, 0.071),
    "convnet-sme": (20.861, 0.621, 0.288, 0.087, 0.023, 0.057),
}


WHAT = "FM paper Table 3 re-run: SME / FM vs architecture after FedAvg training; every cell with its null"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--split", default="test")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--widths", nargs="*", default=[], metavar="MODEL=WIDTH",
                   help="widths replacing the CPU defaults (vgg11=16 resnet18=16)")
    p.add_argument("--epoch", type=int, default=2, help="global FedAvg epoch of the attacked weights (paper: 2)")
    C.add_attacked_client_args(p)
    C.add_common_args(p)
    C.add_server_args(p)
    args = p.parse_args(argv)
    if args.quick and args.image_size is None:
        args.image_size = 32  # VGG-11 halves the resolution 5 times: 16x16 is too small
    C.apply_quick(args)
    C.apply_quick_server(args)
    widths = dict(CPU_WIDTHS)
    for item in args.widths:
        name, _, value = item.partition("=")
        if name not in MODELS or not value.isdigit():
            raise SystemExit(f"--widths takes MODEL=WIDTH with MODEL in {', '.join(MODELS)}, got {item!r}")
        widths[name] = int(value)
    if args.quick:
        widths = {m: 4 for m in MODELS}
        args.epoch = 1
    args.width_of = widths
    return args


def param_count(model: str, width, data) -> int:
    import jax
    import numpy as np

    from jaxleak import audit

    _, variables, _ = audit.build_victim(model, dataset=data, width=width)
    return int(sum(np.size(v) for v in jax.tree_util.tree_leaves(variables.get("params", variables))))


def main(argv=None) -> int:
    args = parse_args(argv)
    out_json, runs = C.default_paths(args, "table3", runs_name=C.SERVER_RUNS)
    iterations = C.budgets(args)
    fm = C.fm_fields(args)
    protocol, samples, lr = C.attacked_clients(args)
    result = {
        **C.result_header("table3.py", argv, args, what=WHAT, attacks=ATTACKS,
                          iterations=iterations, fm=fm, protocol=protocol, samples=samples),
        "paper": {"columns": ("psnr", "ssim", "lpips_vgg", "lpips_alex", "mse", "tv"), "rows": PAPER,
                  "attack": "fm"},
        "rows": [],
    }
    prior = None
    t0 = time.time()
    rows = []
    for model in args.models:
        width = args.width_of.get(model)
        run, history = C.server_run(args, runs, model=model, width=width, epochs=args.epoch)
        accuracy = C.accuracy_at(history, args.epoch)
        per_attack = {a: {"real": [], "null": []} for a in ATTACKS}
        for seed in args.seeds:
            data, prior = C.seed_clients(args, runs, prior, samples=samples, seed=seed)
            cap = C.client_capture(data, model=model, width=width, protocol=protocol, samples=samples, seed=seed,
                                   checkpoint=run, global_epoch=args.epoch)
            out = C.trained_cell_dir(runs, args, model=model, width=width, defense="none", epoch=args.epoch,
                                     seed=seed)
            C.attack_cells(ATTACKS, cap, out, seed=seed, args=args, iterations=iterations, prior=prior.name,
                           fm=fm, per_attack=per_attack, tag=f"{model} epoch {args.epoch} seed {seed}")
        rows.append({
            "model": model, "width": width, "parameters": param_count(model, width, data), "server_run": run,
            "global_epoch": args.epoch, "test_accuracy": accuracy,
            "attacks": C.summarize(per_attack, iterations),
        })
        result.update(rows=rows, prior=prior.info, wall_seconds=round(time.time() - t0, 1))
        C.write_results(out_json, result)

    header = ["model", "width", "params", "test acc", "attack", "iters (paper)", "PSNR", "SSIM", "LPIPS(V)",
              "LPIPS(A)", "MSE", "TV", "null PSNR / SSIM", "paper (FM) PSNR / SSIM / LPIPS(V) / LPIPS(A) / MSE / TV"]
    table = []
    for row in rows:
        for attack, entry in row["attacks"].items():
            r, n = entry["real"], entry["null"] or {}
            paper = PAPER.get(row["model"]) if attack == "fm" else None
            table.append([LABELS[row["model"]], row["width"] or "own", row["parameters"], row["test_accuracy"],
                          attack, f"{entry['iterations']} ({C.PAPER_BUDGETS[attack]})", r["psnr"], r["ssim"],
                          r["lpips_vgg"], r["lpips_alex"], r["mse"], r["tv"],
                          f"{C.fmt(n.get('psnr'))} / {C.fmt(n.get('ssim'))}",
                          " / ".join(C.fmt(v) for v in paper) if paper else "-"])
    C.print_table(header, table, prior_info=prior.info, written=str(out_json), footer=(
        f"means over {len(args.seeds)} seed(s) x {args.clients} clients, {args.dataset}:{args.split}, B = "
        f"{args.batch}, local {args.optimizer} {lr:g}; server weights after global epoch {args.epoch} of "
        f"FedAvg ({args.train_clients} clients x {args.train_samples} train images, local "
        f"{args.train_optimizer} {args.train_lr:g})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
