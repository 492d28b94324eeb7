"""Venom Table 1 re-run: SPE, FGLA, Venom-Diff and Venom under DP, on CPU-sized settings.

For each cell (dataset x calibration) this script

1. trains three recovery networks (``fgla``, ``venom-diff``, ``venom``) on the
   dataset's *train* split (the attacker's auxiliary data), each serving every
   epsilon of the table (triplets draw eps from {1, 5, 10} per image);
2. for every evaluation seed and epsilon, captures the protected updates of
   ``--n`` clients holding *test* images (one image each, FedSGD, the chosen
   calibration, delta = 1e-5; the seed picks both the images and the noise),
   runs SPE alone (feature-space fidelity: the head input of ``lenet-venom`` is a
   conv feature map, not an image) and the three networks, and scores PSNR,
   SSIM, LPIPS (alex) and ASR@0.5;
3. writes ``results/<dataset>-<calibration>.json``: per method and epsilon the
   mean and std over seeds of the per-seed means.

Everything is resumable: finished checkpoints and evaluations are reused, an
interrupted training continues from its last checkpoint. ``report.py`` turns
the results into the tables in ``README.md``.

    python experiments/venom/table1.py --dataset mnist --calibration paper
    python experiments/venom/table1.py --quick   # a 2-minute smoke run of the whole pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from jaxleak import audit
from jaxleak.capture import load_capture, save_capture
from jaxleak.attacks import run_spe
from jaxleak.privacy import DPConfig

HERE = Path(__file__).resolve().parent
METHODS = ("spe", "fgla", "venom-diff", "venom")
NETWORKS = ("fgla", "venom-diff", "venom")
EPSILONS = (1.0, 5.0, 10.0)
IMAGE_METRICS = ("psnr", "ssim", "lpips_alex", "asr@0.5")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", help="mnist | cifar10 | tinyimagenet32 | ... (default mnist)")
    p.add_argument("--calibration", default="paper", choices=("paper", "dpsgd"))
    p.add_argument("--model", default="lenet-venom")
    p.add_argument("--aux-n", type=int, default=20_000, help="auxiliary (train split) images; the whole split when it is smaller")
    p.add_argument("--n", type=int, default=200, help="attacked test images per seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    p.add_argument("--steps", type=int, default=2000, help="training steps per network")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--multipliers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--loss", default="mse+cos", choices=("mse", "mse+cos"),
                   help="Venom / Venom-Diff loss (FGLA always trains with MSE)")
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS,
                   help="which recovery networks to train and evaluate")
    p.add_argument("--clamp-levels", action="store_true",
                   help="ablation: SPEConfig(clamp_levels=True) for the networks' SPE (cell name gets -clamp)")
    p.add_argument("--runs", default=str(HERE / "runs"), help="checkpoints and per-run outputs (not committed)")
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--quick", action="store_true", help="tiny smoke run (mnist-embedded, 20 steps, 16 images)")
    args = p.parse_args(argv)
    if args.quick:
        args.dataset, args.aux_n, args.n, args.seeds = "mnist-embedded", 300, 16, [0]
        args.steps, args.batch_size, args.base_width, args.multipliers = 20, 8, 8, [1, 2]
        if args.runs == str(HERE / "runs"):
            args.runs = "/tmp/jaxleak-venom-quick/runs"
        if args.results == str(HERE / "results"):
            args.results = "/tmp/jaxleak-venom-quick/results"
    return args


def train_networks(args, cell: Path) -> dict[str, str]:
    """Trains (or resumes / reuses) the three networks of a cell; returns their checkpoint dirs."""
    try:
        aux = audit.load_data(args.dataset, split="train", n=args.aux_n, seed=0)
    except ValueError as error:  # a smaller train split (the shared MNIST copy has 5,000): take all of it
        if "larger than" not in str(error):
            raise
        aux = audit.load_data(args.dataset, split="train", seed=0)
    out = {}
    for variant in args.networks:
        ckpt = cell / variant
        done = ckpt / "DONE"
        out[variant] = str(ckpt)
        if done.exists():
            continue
        network = {"base_width": args.base_width, "multipliers": tuple(args.multipliers)}
        if variant != "fgla":
            network["time_dim"] = 32
        # FGLA's generator is trained with plain MSE (its paper); Venom's networks with --loss
        loss = "mse" if variant == "fgla" else args.loss
        train = {"steps": args.steps, "batch_size": args.batch_size, "loss": loss,
                 "eval_every": max(args.steps // 10, 1), "eval_size": min(256, args.aux_n // 4),
                 "checkpoint_every": max(args.steps // 10, 1), "seed": 0}
        start = time.time()
        summary = audit.train_recovery(
            variant, aux, model=args.model, out=str(ckpt), calibration=args.calibration,
            epsilons=tuple(args.epsilons), delta=1e-5, network=network, train=train,
            resume=(ckpt / "config.json").exists(), spe={"clamp_levels": args.clamp_levels},
            progress=True)
        summary["train_seconds_this_process"] = round(time.time() - start, 1)
        done.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary), flush=True)
    return out


def _means(metrics_file: Path) -> dict[str, float]:
    data = json.loads(metrics_file.read_text())["metrics"]
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):  # scalar summaries such as asr@0.5
            out[name] = float(entry)
            continue
        v = np.asarray(entry["values"], np.float64)
        v = np.where(np.isinf(v), np.nan, v)
        out[name] = float(np.nanmean(v))
    return out


def evaluate(args, cell: Path, checkpoints: dict[str, str]) -> dict:
    victim = None
    methods = ("spe", *args.networks)
    per_seed: dict[str, dict[str, list[dict]]] = {m: {str(e): [] for e in args.epsilons} for m in methods}
    for seed in args.seeds:
        data = audit.load_data(args.dataset, split="test", n=args.n, seed=1000 + seed)
        for eps in args.epsilons:
            run = cell / "eval" / f"seed{seed}" / f"eps{eps:g}"
            run.mkdir(parents=True, exist_ok=True)
            cap_file = run / "captures.npz"
            if cap_file.exists():
                cap = load_capture(str(cap_file))
            else:
                if victim is None:
                    victim, variables, vmeta = audit.build_victim(args.model, dataset=data, init_seed=0)
                dp = DPConfig(calibration=args.calibration, epsilon=eps, delta=1e-5)
                cap = audit.capture(victim, variables, data, dp=dp, seed=seed,
                                    extra_meta=vmeta)
                save_capture(str(cap_file), cap)
            # SPE alone: fidelity of the recovered head-input map (no image for lenet-venom)
            spe_file = run / "spe.json"
            if not spe_file.exists():
                res, source = run_spe(cap)
                v, variables_ = audit.victim_from_capture(cap)
                true = audit.layer_inputs(v, variables_, cap.images_float())
                fm = audit.feature_metrics(res.features_raw, res.features, true)
                spe_file.write_text(json.dumps({k: float(np.nanmean(x)) for k, x in fm.items()}
                                               | {"sigma2_source": source}) + "\n")
            per_seed["spe"][str(eps)].append(json.loads(spe_file.read_text()))
            for variant in args.networks:
                out = run / variant
                if not (out / "metrics.json").exists():
                    audit.run_attack(variant, cap, artifact=checkpoints[variant], out_dir=str(out),
                                     force=True)
                per_seed[variant][str(eps)].append(_means(out / "metrics.json"))
            print(f"[{cell.name}] seed {seed} eps {eps:g}: "
                  + ", ".join(f"{m} {per_seed[m][str(eps)][-1].get('psnr', float('nan')):.2f} dB"
                              for m in args.networks), flush=True)
    table = {}
    for method, by_eps in per_seed.items():
        table[method] = {}
        for eps, rows in by_eps.items():
            keys = sorted(set().union(*(r.keys() for r in rows)) - {"sigma2_source"})
            table[method][eps] = {
                k: {"mean": float(np.mean([r[k] for r in rows])),
                    "std": float(np.std([r[k] for r in rows])), "per_seed": [r[k] for r in rows]}
                for k in keys}
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    name = f"{args.dataset}-{args.calibration}" + ("-clamp" if args.clamp_levels else "")
    cell = Path(args.runs) / name
    cell.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    t0 = time.time()
    checkpoints = train_networks(args, cell)
    t_train = time.time() - t0
    table = evaluate(args, cell, checkpoints)
    trained = {v: json.loads((Path(c) / "DONE").read_text()) for v, c in checkpoints.items()}
    import jax

    result = {
        "command": "python experiments/venom/table1.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": started,
        "wall_seconds": round(time.time() - t0, 1),
        "train_wall_seconds_this_process": round(t_train, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} "
                   f"{jax.devices()[0].platform}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("runs", "results")},
        "protocol": ("FedSGD, one image per client, untrained lenet-venom (init seed 0); networks trained on "
                     "the train split, attacked images from the test split (seed s draws n images with "
                     "data seed 1000+s and the DP noise with seed s); std over seeds of per-seed means"),
        "trained": trained,
        "table": table,
    }
    Path(args.results).mkdir(parents=True, exist_ok=True)
    path = Path(args.results) / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
