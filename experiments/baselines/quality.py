"""Quality of the optimisation baselines: mean PSNR per attack, without defense and under DP.

Captures ``--n`` single-image FedSGD clients of an untrained victim with the
whole update kept, then runs every attack (and the ``shuffle`` null control of
each) with the given iteration budgets. The DP rows use the paper calibration
of the Venom table (eps in {1, 5, 10}, delta 1e-5, C = 1, lr 1e-3). Prints a
markdown table and writes ``results.json`` under ``--out``.

Smoke run (CPU, minutes; budgets far below the references):

    python experiments/baselines/quality.py --dataset mnist-embedded --split train --image-size 32 \
        --model lenet-dlg --n 4 --budget dlg=100 idlg=100 ig=1000 gradinversion=1000 grnn=1000 mjolnir=20

Reference budgets (drop ``--budget``) need a GPU: 24,000 IG iterations per image.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from jaxleak import audit
from jaxleak.privacy import DPConfig

ATTACKS = ("dlg", "idlg", "ig", "gradinversion", "grnn", "mjolnir")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--model", default="lenet-dlg")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 5.0, 10.0])
    parser.add_argument("--budget", nargs="*", default=[], metavar="ATTACK=ITERATIONS")
    parser.add_argument("--null", action="store_true", help="also run the shuffle null control")
    parser.add_argument("--no-clean", action="store_true", help="skip the no-defense setting")
    parser.add_argument("--seed", type=int, default=0, help="which test images (data seed)")
    parser.add_argument("--out", default="baselines-quality")
    parser.add_argument("--dp-scope", choices=("all", "layer"), default="all",
                        help="paper rows: protect every layer (default) or only the FC head (DPConfig.scope)")
    parser.add_argument("--mjolnir-aux", default=None, metavar="DATASET[:SPLIT]",
                        help="Mjolnir's auxiliary images (default: MjolnirConfig's, embedded MNIST)")
    parser.add_argument("--mjolnir-denoiser", choices=("mlp", "unet"), default="mlp",
                        help="Mjolnir's denoiser (default mlp: the UNet of the reference design takes hours "
                             "to train on a CPU)")
    parser.add_argument("--batching", choices=("vmap", "map"), default="vmap",
                        help="driver option; on CPU 'map' avoids grouped convolutions (docs/baselines.md)")
    parser.add_argument("--chunk", type=int, default=100, help="iterations per compiled call")
    parser.add_argument("--unroll", type=int, default=1, help="iterations unrolled per loop trip")
    parser.add_argument("--target-batch", type=int, default=16, help="targets per compiled block")
    parser.add_argument("--conv-impl", choices=("auto", "xla", "patches"), default="auto",
                        help="victim convolutions during the attacks (auto: patches for conv victims)")
    args = parser.parse_args()
    budget = {k: int(v) for k, v in (item.split("=") for item in args.budget)}
    data = audit.load_data(args.dataset, split=args.split, n=args.n, image_size=args.image_size,
                           seed=args.seed)
    victim, variables, vmeta = audit.build_victim(args.model, dataset=data, width=args.width)
    settings = ([] if args.no_clean else [("none", DPConfig(calibration="none"))]) + [
        (f"paper eps={e:g}" + ("" if args.dp_scope == "all" else " head-only"),
         DPConfig(calibration="paper", epsilon=e, scope=args.dp_scope)) for e in args.epsilons]
    driver = {"batching": args.batching, "chunk": args.chunk, "unroll": args.unroll,
              "target_batch": args.target_batch, "conv_impl": args.conv_impl}
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for name, dp in settings:
        cap = audit.capture(victim, variables, data, dp=dp, keep_update=True, keep_params=True,
                            extra_meta=vmeta)
        for attack in args.attacks:
            for null in ([None, "shuffle"] if args.null else [None]):
                overrides = {"iterations": budget[attack]} if attack in budget else {}
                if attack == "mjolnir":
                    overrides["denoiser"] = args.mjolnir_denoiser
                if attack == "mjolnir" and args.mjolnir_aux:
                    aux, _, split = args.mjolnir_aux.partition(":")
                    overrides.update(aux_dataset=aux, aux_split=split or "train")
                out = os.path.join(args.out, name.replace(" ", "_").replace("=", "").replace("-", ""), attack + ("-null" if null else ""))
                rows.append(_row(cap, attack, out, overrides, null, name, driver))
                with open(os.path.join(args.out, "results.json"), "w") as f:  # after every row: resumable
                    json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    print("| setting | attack | null | iterations | PSNR | SSIM | LPIPS | ASR@0.5 | label acc | s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v: "-" if v is None or not np.isfinite(v) else f"{v:.2f}"
        print(f"| {r['setting']} | {r['attack']} | {r['null'] or ''} | {r['iterations'] or 'ref'} | "
              f"{fmt(r['psnr'])} | {fmt(r['ssim'])} | {fmt(r.get('lpips_alex'))} | {fmt(r.get('asr@0.5'))} | "
              f"{fmt(r['label_correct'])} | {fmt(r['seconds_per_image'])} |")


def _row(cap, attack: str, out: str, overrides: dict, null, setting: str, driver: dict) -> dict:
    """Runs one attack (or reuses a finished ``out``) and summarises its metrics.json."""
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        audit.run_attack(attack, cap, out_dir=out, overrides=overrides, null=null, options=driver, force=True)
    with open(path) as f:
        meta = json.load(f)
    metrics = meta["metrics"]
    mean = lambda k: float(np.mean(metrics[k]["values"])) if k in metrics else None
    ssim = np.asarray(metrics["ssim"]["values"]) if "ssim" in metrics else None
    row = {"setting": setting, "attack": attack, "null": null, "iterations": overrides.get("iterations"),
           "psnr": mean("psnr"), "ssim": mean("ssim"), "lpips_alex": mean("lpips_alex"),
           "asr@0.5": None if ssim is None else float(np.mean(ssim > 0.5)),
           "label_correct": mean("label_correct"),
           "seconds_per_image": meta["timing"]["seconds_per_target"]}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
