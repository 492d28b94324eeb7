"""Why SME and FM fail on the paper's Adam 0.1 clients, and what an Adam-aware matching recovers.

The paper's Table 2 setting (local Adam lr 0.1) leaves every attack at its null here
(results/table2_adam.json). This script separates the two things Adam changes:

* **One local step** (``--local-steps 1``, B = 1): the update is ``lr * g / (|g| + eps)``, i.e.
  ``lr * sign(g)`` of ONE gradient at ``w0``. Any failure here comes from the sign, not from the
  trajectory.
* **Five local steps** (the paper's), each on its own image: later steps run at weights that the first
  step moved by ~0.1 per parameter.

Variants of SME (FM where named) on the same captures, each with its ``shuffle`` null:

* ``sme``: SME's defaults (alpha_init 0.5, cosine to the raw gradient);
* ``sme-alpha0``: alpha_init 0 (the surrogate at ``w0``);
* ``sme-adam``: ``update_model="adam"`` (soft sign ``g / (|g| + 0.01 rms(g))``), alpha_init 0;
* ``sme-adam-k0.1``: the same with ``sign_kappa=0.1``;
* ``sme-adam-alpha0.5``: soft sign with SME's alpha_init 0.5;
* ``fm`` / ``fm-adam``: FM's defaults, and FM with ``sme-adam``'s fields;
* ``sme`` on SGD 0.004 clients of the same images (the control: the same attack where it works).

    python experiments/flow_matching/adam_clients.py --quick --prior random   # smoke run
    python experiments/flow_matching/adam_clients.py                          # CPU budget (results/)
    python experiments/flow_matching/adam_clients.py --saturation             # the check below only

``--saturation`` measures failure (1) directly: after ONE local Adam step on each client's image, the
norm of the trial gradient at ``w_alpha = w0 - alpha u`` for the attack's start images (``N(0, 1)``
boxed to [0, 1], SME's pixel-space start) and the victim's probability of the label there.
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as C

ADAM_AWARE = {"update_model": "adam", "alpha_init": 0.0, "sign_kappa": 0.01}
VARIANTS = {  # name -> (attack, overrides beyond budget / labels / prior)
    "sme": ("sme", {}),
    "sme-alpha0": ("sme", {"alpha_init": 0.0}),
    "sme-adam": ("sme", ADAM_AWARE),
    "sme-adam-k0.1": ("sme", {**ADAM_AWARE, "sign_kappa": 0.1}),
    "sme-adam-alpha0.5": ("sme", {**ADAM_AWARE, "alpha_init": 0.5}),
    "fm": ("fm", {}),
    "fm-adam": ("fm", ADAM_AWARE),
}
WHAT = "SME / FM on Adam 0.1 clients: one vs five local steps, the Adam-aware soft-sign matching"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--split", default="test")
    p.add_argument("--local-steps", type=int, nargs="+", default=[1, 5],
                   help="local steps of B = 1 each (overrides --local-batches)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--sgd-control", action=argparse.BooleanOptionalAction, default=True,
                   help="also run `sme` on SGD 0.004 clients of the same images")
    p.add_argument("--saturation", action="store_true",
                   help="only measure the trial gradient's norm along alpha after one Adam step (seconds)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.01, 0.1, 0.25, 0.5])
    return C.parse_common(p, argv)


def saturation(args: argparse.Namespace, argv) -> int:
    """Trial-gradient norm and label probability along ``alpha`` after one local Adam 0.1 step."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxleak import audit
    from jaxleak.attacks.fedavg import surrogate_variables
    from jaxleak.attacks.optimization import dummy_gradient
    from jaxleak.protocols import local_update

    out_json, _ = C.default_paths(args, "adam_saturation")
    optimizer, lr = C.OPTIMIZERS["adam"]
    protocol, _ = C.fedavg_setting(batch=1, local_batches=1, optimizer=optimizer, lr=lr, reading=args.reading)
    rows = []
    for seed in args.seeds:
        data = C.load_clients(args.dataset, args.split, clients=args.clients, samples=1, seed=seed,
                              image_size=args.image_size)
        victim, w0, _ = audit.build_victim(args.model, dataset=data, width=args.width,
                                           checkpoint=args.victim_checkpoint)  # the attack cells' weights
        for i in range(args.clients):
            x = jnp.asarray(data.images[i:i + 1], jnp.float32)
            y = jnp.asarray(data.labels[i:i + 1])
            u = local_update(victim, w0, x, y, jax.random.key(seed), protocol=protocol).update
            start = jnp.clip(jax.random.normal(jax.random.key(1000 + i), x.shape), 0.0, 1.0)
            probs = jax.nn.one_hot(y, victim.num_classes)
            for alpha in args.alphas:
                v = surrogate_variables(w0, u, jnp.float32(alpha))
                g = dummy_gradient(victim, v, start, probs)
                norm = float(optax.global_norm(g))
                logits = victim.module.apply(v, start, train=False)
                p_label = float(jax.nn.softmax(logits)[0, y[0]])
                rows.append({"seed": seed, "client": i, "alpha": alpha, "grad_norm": norm, "p_label": p_label})
                print(f"seed {seed} client {i} alpha {alpha:g}: |trial gradient| {norm:.3e}, "
                      f"p(label) {p_label:.6f}", flush=True)
    C.write_results(out_json, {"what": "trial gradient norm along alpha after one local Adam 0.1 step",
                               **C.provenance("adam_clients.py", argv),
                               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "runs")},
                               "rows": rows})
    print(f"wrote {out_json}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.saturation:
        return saturation(args, argv)
    out_json, runs = C.default_paths(args, "adam_clients")
    iterations = C.budgets(args)
    fm = C.fm_fields(args)
    result = {**C.result_header("adam_clients.py", argv, args, what=WHAT, attacks=sorted({a for a, _ in
                                VARIANTS.values()}), iterations=iterations, fm=fm),
              "variants": {k: {"attack": a, "overrides": o} for k, (a, o) in VARIANTS.items()}, "cells": []}
    prior: C.Prior | None = None
    t0 = time.time()
    rows = []
    for steps in args.local_steps:
        settings = [("adam", v) for v in args.variants] + ([("sgd", "sme")] if args.sgd_control else [])
        for opt_name, variant in settings:
            attack, extra = VARIANTS[variant]
            optimizer, lr = C.OPTIMIZERS[opt_name]
            protocol, samples = C.fedavg_setting(batch=1, local_batches=steps, optimizer=optimizer, lr=lr,
                                                 reading=args.reading)
            per_attack = {attack: {"real": [], "null": []}}
            for seed in args.seeds:
                data, prior = C.seed_clients(args, runs, prior, samples=samples, seed=seed)
                cap = C.client_capture(data, model=args.model, width=args.width, protocol=protocol,
                                       samples=samples, seed=seed, checkpoint=args.victim_checkpoint)
                out = runs / args.dataset / f"{opt_name}-steps{steps}" / variant / f"seed{seed}"
                C.attack_cells([attack], cap, out, seed=seed, args=args, iterations=iterations, prior=prior.name,
                               fm=fm, per_attack=per_attack, extra={attack: extra},
                               tag=f"{opt_name} {steps} step(s) {variant} seed {seed}")
            summary = C.seed_summary(per_attack[attack])
            result["cells"].append({"local_steps": steps, "optimizer": opt_name, "lr": lr, "variant": variant,
                                    "attack": attack, "overrides": extra, "iterations": iterations[attack],
                                    "protocol": protocol.as_meta(samples),
                                    "prior": prior.info if attack in C.PRIOR_ATTACKS else None, **summary})
            result["wall_seconds"] = round(time.time() - t0, 1)
            C.write_results(out_json, result)
            r, n = summary["real"], summary["null"] or {}
            rows.append([steps, f"{opt_name} {lr:g}", variant, iterations[attack], r["psnr"], r["ssim"],
                         r["matching_loss"], f"{C.fmt(n.get('psnr'))} / {C.fmt(n.get('ssim'))}"])
    C.print_table(["local steps", "local opt", "variant", "iters", "PSNR", "SSIM", "matching loss",
                   "null PSNR / SSIM"], rows, footer=f"means over {len(args.seeds)} seed(s) x {args.clients} clients",
                  prior_info=prior.info, written=str(out_json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
