"""Where PRECODE hides the images: per layer, how much of a client's update is its private draw.

Table 4's PRECODE clients (``convnet-sme`` with a 256-wide bottleneck at initialisation, CIFAR-10 test
images, 5 local SGD steps at 0.004, B = 1). For each client the released update ``u`` (the client drew
``eps``) is compared, layer by layer, with the update of the same client on the bottleneck's mean path
``u_mu`` (``eps = 0``, true images in the client's own order: what an attacker who knew the images
would replay, :func:`jaxleak.attacks.fedavg.dlf.simulated_update`). Printed per layer: the cosine of
``u`` and ``u_mu``, the layer's share of ``||u||^2`` (what a single cosine over all parameters weighs,
SME / FM) and of DLF's ``e^{-i}``-weighted squared norm.

With ``--attacks sme fm`` it then runs each attack twice on the same clients, with its null control:
matching every layer (the default) and matching only the layers before the bottleneck's sample (the
ones whose update the draw does not hide: ``layers`` = those before ``precode/decoder``).

    python experiments/flow_matching/precode_layers.py --out experiments/flow_matching/results/precode_layers.json
    python experiments/flow_matching/precode_layers.py --attacks sme fm --budget sme=200 fm=200
"""

from __future__ import annotations

import argparse
import functools
import sys

import _common as C
import jax
import numpy as np

WHAT = "per-layer cosine between a PRECODE client's sampled update and its mean-path (eps = 0) update"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--split", default="test")
    p.add_argument("--precode", type=int, default=256)
    C.add_attacked_client_args(p)
    p.add_argument("--attacks", nargs="*", choices=("sme", "fm"), default=[],
                   help="also run these attacks on every layer and on the layers before the sample only")
    args = C.parse_common(p, argv)
    out_json, runs = C.default_paths(args, "precode_layers")
    iterations = C.budgets(args)
    fm = C.fm_fields(args)
    attack_rows = {}
    prior = None

    from jaxleak.attacks.fedavg.dlf import dlf_layer_weights, layer_order, simulated_update
    from jaxleak.audit import build_victim
    from jaxleak.capture.io import flatten_tree, unflatten_tree

    protocol, samples, _ = C.attacked_clients(args)
    rows, per_seed = [], []
    for seed in args.seeds:
        data, prior = C.seed_clients(args, runs, prior, samples=samples, seed=seed)
        cap = C.client_capture(data, model=args.model, width=args.width, protocol=protocol, samples=samples,
                               seed=seed, precode=args.precode)
        victim, _, _ = build_victim(args.model, dataset=data, width=args.width, precode=args.precode)
        variables = unflatten_tree(dict(cap.params))
        owners = layer_order(victim)
        variants = {"all layers": None, "before the sample": tuple(owners[:owners.index("precode/decoder")])}
        dlf_w = flatten_tree(dlf_layer_weights(victim))
        simulate = jax.jit(functools.partial(simulated_update, victim, variables, protocol=protocol))
        for c in range(cap.n):
            x = cap.truth_images[c].astype(np.float32) / 255.0
            y = cap.truth_labels[c]
            order = cap.schedule[c].reshape(cap.schedule.shape[1], -1)
            images = np.stack([x[row[row >= 0]] for row in order])
            probs = np.stack([np.eye(victim.num_classes, dtype=np.float32)[y[row[row >= 0]]] for row in order])
            mean_path = flatten_tree(simulate(images, probs))
            released = {k.removeprefix("params/"): v[c] for k, v in cap.update.items()}
            for owner in owners:
                keys = [k for k in mean_path if k.rsplit("/", 1)[0] == owner]
                u = np.concatenate([np.ravel(released[k]) for k in keys]).astype(np.float64)
                m = np.concatenate([np.ravel(mean_path[k]) for k in keys]).astype(np.float64)
                w = float(dlf_w[keys[0]])
                per_seed.append({"seed": seed, "client": c, "layer": owner,
                                 "cosine": float(u @ m / (np.linalg.norm(u) * np.linalg.norm(m) + 1e-30)),
                                 "sq_norm": float(u @ u), "dlf_weighted_sq_norm": w * float(u @ u)})
        for attack in args.attacks:
            for label, layers in variants.items():
                entry = attack_rows.setdefault(attack, {}).setdefault(label, {"layers": layers, "real": [],
                                                                                "null": []})
                extra = {attack: {} if layers is None else {"layers": list(layers)}}
                cell = {attack: {"real": entry["real"], "null": entry["null"]}}
                C.attack_cells([attack], cap, runs / label.replace(" ", "_") / f"seed{seed}", seed=seed, args=args,
                               iterations=iterations, prior=prior.name, fm=fm,
                               per_attack=cell, tag=f"{attack}, {label}, seed {seed}", extra=extra)
    for owner in dict.fromkeys(r["layer"] for r in per_seed):
        mine = [r for r in per_seed if r["layer"] == owner]
        rows.append({"layer": owner, "cosine": float(np.mean([r["cosine"] for r in mine])),
                     "share_sq_norm": float(np.mean([r["sq_norm"] / sum(q["sq_norm"] for q in per_seed
                                                     if (q["seed"], q["client"]) == (r["seed"], r["client"]))
                                                     for r in mine])),
                     "share_dlf_weighted": float(np.mean([r["dlf_weighted_sq_norm"] / sum(
                         q["dlf_weighted_sq_norm"] for q in per_seed if (q["seed"], q["client"]) == (r["seed"], r["client"]))
                         for r in mine]))})
    # What each attack's matching sees overall: the share-weighted cosine of u and u_mu.
    summary = {k: float(sum(r[k] * r["cosine"] for r in rows)) for k in ("share_sq_norm", "share_dlf_weighted")}
    result = {"what": WHAT, **C.provenance("precode_layers.py", argv),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "runs")},
              "protocol": protocol.as_meta(samples), "layers": rows,
              "weighted_cosine": {"uniform (SME / FM cosine)": summary["share_sq_norm"],
                                  "DLF e^-i": summary["share_dlf_weighted"]},
              "per_client": per_seed,
              "attacks": {a: {label: {"layers": e["layers"], "iterations": iterations[a],
                                      **C.seed_summary({"real": e["real"], "null": e["null"]})}
                              for label, e in v.items()} for a, v in attack_rows.items()}}
    C.write_results(out_json, result)
    print("| layer | cos(u, u_mu) | share of ||u||^2 | share under DLF's e^-i |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['cosine']:.3f} | {r['share_sq_norm']:.3g} | {r['share_dlf_weighted']:.3g} |")
    print(f"\nshare-weighted cosine: uniform {summary['share_sq_norm']:.3f}, DLF e^-i "
          f"{summary['share_dlf_weighted']:.3f}")
    if attack_rows:
        print("\n| attack | matched layers | PSNR | SSIM | MSE | null PSNR / SSIM |\n|---|---|---|---|---|---|")
        for a, v in result["attacks"].items():
            for label, e in v.items():
                r, n = e["real"], e["null"] or {}
                print(f"| {a} | {label} | {C.fmt(r['psnr'])} | {C.fmt(r['ssim'])} | {C.fmt(r['mse'])} | "
                      f"{C.fmt(n.get('psnr'))} / {C.fmt(n.get('ssim'))} |")
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
