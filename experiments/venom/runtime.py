"""Venom runtime: seconds per image of SPE + the recovery network, batch 1 and batched.

Times the attack as a user runs it on captured updates: SPE on the captured
head gradients, then one recovery-network forward pass, both jitted; compile
time is measured separately (first call) and excluded from the per-image
figures. Runtime does not depend on the trained weights, so freshly
initialised networks of the requested architecture are timed.

    python experiments/venom/runtime.py                      # CPU defaults
    python experiments/venom/runtime.py --image-size 256 --base-width 64 --multipliers 1 2 4  # paper scale

Prints one JSON line per setting (median of ``--repeats`` timed calls).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak.attacks.spe import SPEConfig, spe_batch
from jaxleak.attacks.venom import RecoveryNetConfig, make_recovery_net
from jaxleak.attacks.venom.infer import make_infer_fn
from jaxleak.capture import capture_updates
from jaxleak.models import get_victim
from jaxleak.privacy import DPConfig


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--variant", default="venom", choices=("venom", "venom-diff", "fgla"))
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--multipliers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--time-dim", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    shape = (args.image_size, args.image_size, args.channels)
    victim = get_victim("lenet-venom", image_shape=shape, num_classes=10)
    variables = victim.init(jax.random.PRNGKey(0))
    fshape = tuple(victim.layers["head"].feature_shape)
    net = RecoveryNetConfig(image_shape=shape, feature_shape=fshape, variant=args.variant,
                            base_width=args.base_width, multipliers=tuple(args.multipliers),
                            time_dim=args.time_dim)
    model = make_recovery_net(net)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, *fshape)), jnp.ones((1,)))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    infer = make_infer_fn(model)
    dp = DPConfig(calibration="paper", epsilon=5.0, delta=1e-5)
    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    for b in args.batches:
        images = rng.random((b, *shape), dtype=np.float32)
        labels = rng.integers(0, 10, b)
        cap = capture_updates(victim, variables, images, labels, dp=dp, seed=0)
        gw, gb = jnp.asarray(cap.fc_weight_grad), jnp.asarray(cap.fc_bias_grad)
        s2 = float(cap.meta["noise_std"]) ** 2

        def run_spe(gw=gw, gb=gb, s2=s2):
            return spe_batch(gw, gb, feature_shape=fshape, sigma2=s2, config=SPEConfig())

        t = time.perf_counter()
        res = jax.block_until_ready(run_spe())
        spe_compile = time.perf_counter() - t
        feats, tt = res.features.reshape(b, *fshape), res.noise_strength
        t = time.perf_counter()
        jax.block_until_ready(infer(params, feats, tt))
        net_compile = time.perf_counter() - t
        spe_s = _median_seconds(run_spe, args.repeats)
        net_s = _median_seconds(lambda f=feats, t=tt: infer(params, f, t), args.repeats)
        total = spe_s + net_s
        print(json.dumps({
            "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
            "host": f"{platform.machine()}, {jax.local_device_count()} device(s)",
            "jax": jax.__version__, "image_shape": list(shape), "feature_shape": list(fshape),
            "variant": args.variant, "base_width": args.base_width, "multipliers": args.multipliers,
            "network_params": int(n_params), "batch": b,
            "compile_s": {"spe": round(spe_compile, 2), "network": round(net_compile, 2)},
            "median_s": {"spe": spe_s, "network": net_s, "total": total},
            "s_per_image": total / b, "images_per_s": b / total,
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
