"""Pixel vs normalised image space for Inverting Gradients and SME on the same CIFAR-10 targets (issue 13).

IG (``IGConfig.space``) and SME (``SMEConfig.space``) can optimise [0, 1] pixels or per-channel
normalised images ``(x - mean) / std`` (``jaxleak.attacks.optimization._space``). This script runs
both attacks in both spaces, each with its ``shuffle`` null control, on the same ``--n`` CIFAR-10 test
images (data seed ``--seed``), one image per client:

* IG: the ``convnet`` victim (``--ig-width``), untrained (init seed 0), FedSGD with B = 1, as in
  ``quality.py``;
* SME: the ``convnet-sme`` victim, untrained, FedAvg with SGD 0.004 and 5 local steps of B = 1 on the
  client's one image (``experiments/flow_matching/_common.py``'s ``repeat`` reading, so that every
  client holds exactly the image IG's client holds).

Every other field is the attack's default; the attack's start is drawn from the same keys in both
spaces (seed 0), so the comparison is paired per target. It also measures, on the real updates, the
fraction of start pixels outside the box and of pixels on the box after the first step. Writes
``results/image_space.json`` (per-target values, means, paired differences, provenance) and prints
the table. The CPU run of experiments/baselines/README.md ("Image space"):

    JAXLEAK_DATA_DIR=../shared/data nice -n 5 python experiments/baselines/image_space.py \\
        --n 8 --ig-width 16 --ig-iterations 500 --sme-iterations 500

the SME budget check at SME's code's 1,000 iterations (no null runs, so no verdict is "clear"):

    ... image_space.py --n 8 --attacks sme --sme-iterations 1000 --no-null \\
        --out experiments/baselines/results/image_space_sme1000.json --runs experiments/baselines/runs/image_space_sme1000

and SME on clients of 5 distinct images (``--sme-samples 5``: Table 2's clients, 5 local steps of B = 1
over the client's 5 images; ``--n`` clients, so 5 x ``--n`` images; the paired differences and the verdict
are then over clients, each client's images averaged, since one run reconstructs them together).

Smoke run (seconds of attack time, results to /tmp): ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "flow_matching"))
import _common as C  # the flow-matching experiments' helpers (captures, provenance, output)

SPACES = ("pixel", "normalized")
ATTACKS = ("ig", "sme")
PER_TARGET = ("psnr", "ssim", "lpips_alex")


def captures(args: argparse.Namespace) -> dict[str, Any]:
    """The capture each attack runs on: IG's FedSGD ``convnet`` clients, SME's FedAvg ``convnet-sme`` ones."""
    from jaxleak import audit

    data = audit.load_data("cifar10", split="test", n=args.n, seed=args.seed, image_size=args.image_size)
    out = {}
    if "ig" in args.attacks:
        victim, variables, meta = audit.build_victim("convnet", dataset=data, width=args.ig_width)
        out["ig"] = audit.capture(victim, variables, data, keep_update=True, keep_params=True, extra_meta=meta)
    reading = "repeat" if args.sme_samples == 1 else "distinct"
    protocol, samples = C.fedavg_setting(batch=1, local_batches=5, optimizer="sgd", lr=0.004, reading=reading)
    if samples > 1:
        data = audit.load_data("cifar10", split="test", n=args.n * samples, seed=args.seed,
                               image_size=args.image_size)
    out["sme"] = C.client_capture(data, model="convnet-sme", width=args.sme_width, protocol=protocol,
                                  samples=samples, seed=args.seed)
    return out


def box_fractions(attack: str, cap, overrides: dict[str, Any], seed: int) -> dict[str, float]:
    """Fractions of the start's values outside the box and of the values on the box after step 1.

    Uses the attack's own ``Problem`` on ``cap``'s real updates with the driver's keys for restart 0
    (``fold_in(fold_in(PRNGKey(seed), t), 0)``). IG starts unboxed, so "outside" counts its N(0, 1)
    start; SME boxes its start, so "outside" counts the values the start's box moved onto it.
    """
    import jax
    import jax.numpy as jnp

    from jaxleak.attacks import optimization as opt
    from jaxleak.attacks.fedavg import make_sme
    from jaxleak.attacks.optimization._space import image_space
    from jaxleak.attacks.registry import get_attack
    from jaxleak.audit.workflow import victim_from_capture
    from jaxleak.capture import unflatten_tree
    from jaxleak.protocols import Protocol

    config = get_attack(attack).config(overrides)
    victim, variables = victim_from_capture(cap)
    victim = victim.with_conv_impl(opt.attack_conv_impl(victim))
    updates = jax.tree_util.tree_map(np.asarray, unflatten_tree(cap.whole_update))
    labels = np.asarray(cap.truth_labels).reshape(cap.n, 1)
    targets = opt.prepare_targets(victim, updates, labels="known", batch_size=1, true_labels=labels)
    if attack == "ig":
        problem, shared = opt.make_ig(victim, config, 1), variables
    else:
        problem = make_sme(victim, config, batch_size=1, protocol=Protocol.from_meta(cap.protocol), prior=None)
        shared = {"variables": variables, "prior": None}
    space = image_space(config.space, victim.image_shape[-1], config.mean, config.std)
    init, step = jax.jit(problem.init), jax.jit(problem.step)
    outside, on_box = [], []
    for t in range(cap.n):
        target = jax.tree_util.tree_map(lambda a, t=t: a[t], targets)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), t), 0)
        state = init(key, target, shared)
        z0 = state["images" if attack == "ig" else "x"]
        state, _ = step(state, target, shared, jnp.int32(0))
        z1 = state["images" if attack == "ig" else "x"]
        if attack == "ig":
            outside.append(float(jnp.mean((z0 < space.lo) | (z0 > space.hi))))
        else:
            outside.append(float(jnp.mean((z0 == space.lo) | (z0 == space.hi))))
        on_box.append(float(jnp.mean((z1 == space.lo) | (z1 == space.hi))))
    return {"start_outside_box": float(np.mean(outside)), "on_box_after_step1": float(np.mean(on_box))}


def per_target(out: Path) -> dict[str, list[float]]:
    """Per-image values of :data:`PER_TARGET` from an attack run's ``metrics.json``."""
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    return {k: [float("nan") if v is None else float(v) for v in metrics[k]["values"]]
            for k in PER_TARGET if k in metrics}


def client_means(values: list[float], samples: int) -> list[float]:
    """Per-client means of per-image ``values`` (client-major order, ``samples`` images each)."""
    return np.nanmean(np.asarray(values, float).reshape(-1, samples), axis=1).tolist()


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Per-target difference ``b - a``: mean, std, standard error of the mean, and how many targets are > 0."""
    d = np.asarray(b) - np.asarray(a)
    d = d[np.isfinite(d)]
    sd = float(np.std(d, ddof=1)) if d.size > 1 else float("nan")
    return {"mean": float(np.mean(d)), "std": sd, "sem": sd / math.sqrt(d.size), "positive": int(np.sum(d > 0)),
            "n": int(d.size)}


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Whether one space is clearly better for one attack, and which.

    Clear means all of: the paired PSNR difference (normalized - pixel) is beyond two standard errors
    of its mean over targets; SSIM and LPIPS move the same way (LPIPS down); the real attack beats its
    null control by more than twice the null's spread over targets in the better space; and the real
    difference is larger, in the better space's favour, than the difference under the null control (what
    the space alone does to a reconstruction that gets no information, e.g. a greyer start).
    """
    d, dn = result["difference"], result.get("difference_null")
    better = "normalized" if d["psnr"]["mean"] > 0 else "pixel"
    sign = 1 if better == "normalized" else -1
    beyond_spread = bool(abs(d["psnr"]["mean"]) > 2 * d["psnr"]["sem"])
    agree = bool(sign * d["ssim"]["mean"] > 0 and ("lpips_alex" not in d or sign * d["lpips_alex"]["mean"] < 0))
    above_null = not_null_effect = None  # unknown without the null runs (--no-null): never "clear" then
    if dn is not None:
        real, null = result["spaces"][better]["real"], result["spaces"][better]["null"]
        above_null = bool(real["psnr"] - null["psnr"] > 2 * null["psnr_std"])
        not_null_effect = bool(sign * (d["psnr"]["mean"] - dn["psnr"]["mean"]) > 0)
    return {"better": better, "clear": bool(beyond_spread and agree and above_null and not_null_effect),
            "psnr_beyond_2_sem": beyond_spread, "ssim_lpips_agree": agree,
            "above_null": above_null, "exceeds_null_difference": not_null_effect}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="CIFAR-10 test images = clients (>= 2 for the null)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (which images)")
    parser.add_argument("--image-size", type=int, default=None, help="resize the images (default 32)")
    parser.add_argument("--ig-width", type=int, default=None, help="IG victim `convnet` width (default 64)")
    parser.add_argument("--sme-width", type=int, default=None, help="SME victim `convnet-sme` width (default 64)")
    parser.add_argument("--ig-iterations", type=int, default=1000)
    parser.add_argument("--sme-iterations", type=int, default=1000)
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--sme-samples", type=int, choices=(1, 5), default=1,
                        help="SME's images per client: 1 (5 local steps on the one image, IG's image) or 5 "
                             "(5 distinct images, Table 2's clients)")
    parser.add_argument("--chunk", type=int, default=50, help="driver: iterations per compiled call")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16x16, width 8, 2 images, 3 iterations")
    parser.add_argument("--out", default=None, help="results JSON (default results/image_space.json here)")
    parser.add_argument("--runs", default=None, help="per-run outputs (default runs/image_space/ here)")
    parser.add_argument("--force", action="store_true", help="re-run runs whose metrics.json exists")
    parser.add_argument("--no-null", action="store_true",
                        help="skip the null controls (a budget check only: no verdict is 'clear' without them)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.image_size, args.ig_width, args.sme_width = 2, 16, 8, 8
        args.ig_iterations = args.sme_iterations = 3
    if args.n < 2:
        raise SystemExit("--n must be >= 2: the shuffle null control gives client i the update of client i + 1")
    root = Path("/tmp/jaxleak-image-space-quick") if args.quick else HERE
    out_json = Path(args.out or root / "results" / "image_space.json")
    runs = Path(args.runs or root / "runs" / "image_space")
    iterations = {"ig": args.ig_iterations, "sme": args.sme_iterations}

    caps = captures(args)
    payload: dict[str, Any] = {
        **C.provenance("image_space.py", argv),
        "setting": {"dataset": "cifar10", "split": "test", "n": args.n, "data_seed": args.seed,
                    "image_size": args.image_size or 32, "attack_seed": 0, "iterations": iterations,
                    "ig": {"victim": "convnet", "width": args.ig_width or 64, "protocol": "fedsgd B=1",
                           "labels": "known"},
                    "sme": {"victim": "convnet-sme", "width": args.sme_width or 64,
                            "protocol": ("fedavg sgd lr 0.004, 5 local steps of B=1 on the client's one image"
                                         if args.sme_samples == 1 else
                                         "fedavg sgd lr 0.004, 5 local steps of B=1 over the client's 5 images"),
                            "images_per_client": args.sme_samples, "labels": "known",
                            "differences_over": "images" if args.sme_samples == 1 else "clients"}},
        "results": {},
    }
    payload["command"] = payload["command"].replace("experiments/flow_matching/", "experiments/baselines/")
    for attack in args.attacks:
        options = {"chunk": min(args.chunk, iterations[attack])}
        result: dict[str, Any] = {"spaces": {}}
        for space in SPACES:
            overrides = {"iterations": iterations[attack], "space": space}
            out = runs / f"{attack}-{space}"
            rows = C.run_cell(attack, caps[attack], out, overrides=overrides, options=options, seed=0,
                              null=not args.no_null, force=args.force)
            samples = args.sme_samples if attack == "sme" else 1
            # the box fractions take one image per target; with several they are not measured
            fractions = (box_fractions(attack, caps[attack], overrides, 0) if samples == 1 else
                         {"start_outside_box": None, "on_box_after_step1": None})
            entry: dict[str, Any] = {"overrides": overrides, **fractions}
            for kind, sub in (("real", attack), ("null", attack + "-null"))[:1 if args.no_null else 2]:
                values = per_target(out / sub)
                entry[kind] = {
                    **{k: float(np.nanmean(v)) for k, v in values.items()},
                    **{k + "_std": float(np.nanstd(v, ddof=1)) for k, v in values.items()},
                    "per_target": values,
                    "seconds_per_iteration": rows[kind]["seconds_per_iteration"],
                    "attack_seconds": rows[kind]["attack_seconds"],
                }
            result["spaces"][space] = entry
            print(json.dumps({"attack": attack, "space": space,
                              **{k: entry[k] for k in ("start_outside_box", "on_box_after_step1")},
                              **{f"{kind}_{k}": entry[kind].get(k) for kind in ("real", "null")
                                 if kind in entry for k in PER_TARGET}}), flush=True)
        for kind, key in (("real", "difference"), ("null", "difference_null"))[:1 if args.no_null else 2]:
            a, b = (result["spaces"][s][kind]["per_target"] for s in SPACES)
            m = args.sme_samples if attack == "sme" else 1
            result[key] = {k: paired(client_means(a[k], m), client_means(b[k], m)) for k in PER_TARGET if k in a}
        result["verdict"] = verdict(result)
        payload["results"][attack] = result
        C.write_results(out_json, payload)
    print(table(payload))
    print(f"wrote {out_json}")


def table(payload: dict[str, Any]) -> str:
    """The README's table: one row per (attack, space), real and null means with their spread."""
    rows = []
    for attack, result in payload["results"].items():
        for space in SPACES:
            e = result["spaces"][space]
            cell = lambda part, k, e=e: (f"{e[part][k]:.2f} ± {e[part][k + '_std']:.2f}"
                                         if k in e.get(part, {}) else "-")
            rows.append([attack, space, payload["setting"]["iterations"][attack], cell("real", "psnr"),
                         cell("real", "ssim"), cell("real", "lpips_alex"), cell("null", "psnr"),
                         cell("null", "ssim"), cell("null", "lpips_alex"),
                         "-" if e["start_outside_box"] is None else e["start_outside_box"],
                         "-" if e["on_box_after_step1"] is None else e["on_box_after_step1"]])
        d, dn = result["difference"], result.get("difference_null", {})
        psnr = (f"{d['psnr']['mean']:+.2f} (sem {d['psnr']['sem']:.2f}, "
                f"{d['psnr']['positive']}/{d['psnr']['n']} > 0)")
        rows.append([attack, "normalized - pixel", "", psnr, f"{d['ssim']['mean']:+.3f}",
                     f"{d['lpips_alex']['mean']:+.3f}" if "lpips_alex" in d else "-",
                     f"{dn['psnr']['mean']:+.2f}" if dn else "-", f"{dn['ssim']['mean']:+.3f}" if dn else "-",
                     f"{dn['lpips_alex']['mean']:+.3f}" if "lpips_alex" in dn else "-", "", ""])
    header = ["attack", "space", "iterations", "PSNR", "SSIM", "LPIPS", "null PSNR", "null SSIM", "null LPIPS",
              "start outside box", "on box after step 1"]
    return C.markdown_table(header, rows)


if __name__ == "__main__":
    main()
