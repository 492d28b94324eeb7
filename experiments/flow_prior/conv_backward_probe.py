"""Where a CPU training step of the flow prior loses its time: XLA's 3x3 convolution, forward vs backward.

One 3x3 "same" convolution (NHWC / HWIO, the UNet's layout) at the UNet's stage shapes, three compiled
functions timed apart, each the same 2 * B*H*W * 9*C_in * C_out FLOPs:

* ``forward``: ``y = conv(x, w)``;
* ``input grad``: ``dx`` from ``dy`` (XLA's transposed convolution);
* ``kernel grad``: ``dw`` from ``x`` and ``dy``, once as XLA lowers ``jax.vjp`` of the convolution and once
  as an im2col matrix product (``patches(x)^T @ dy``), the alternative a custom VJP could use.

and then the whole small-preset training step at batch 64 (random weights and images), its loss forward
alone, forward + gradient, and the full step (plus Adam and EMA), with FLOPs from XLA's cost analysis.

The script prints GFLOP/s per row and writes them to ``--out``::

    python experiments/flow_prior/conv_backward_probe.py --out experiments/flow_prior/results/conv_backward_probe.json

Nothing here is used by the library; it records why the training aim of BENCHMARKS.md is out of reach.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DIMS = ("NHWC", "HWIO", "NHWC")
# (batch, side, channels): the small preset's stages at batch 64 (32 at 32x32, 64 at 16x16) and the paper
# preset's (64 at 32x32, 128 at 16x16).
SHAPES = ((64, 32, 32), (64, 16, 64), (64, 32, 64), (64, 16, 128))


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)], dimension_numbers=DIMS)


def patches(x):
    """The 9 shifted views of the zero-padded ``x`` side by side: ``[b, h, w, 9 c]`` in HWI order."""
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    return jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], axis=-1)


def functions():
    def forward(x, w, dy):
        return conv(x, w)

    def input_grad(x, w, dy):
        return jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]

    def kernel_grad_xla(x, w, dy):
        return jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]

    def kernel_grad_im2col(x, w, dy):
        return jnp.einsum("bhwk,bhwf->kf", patches(x), dy).reshape(w.shape)

    return {"forward": forward, "input grad": input_grad, "kernel grad (XLA)": kernel_grad_xla,
            "kernel grad (im2col)": kernel_grad_im2col}


def median_seconds(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def step_breakdown(reps: int) -> dict:
    """Seconds and GFLOP/s of the small preset's loss forward, forward + gradient, and full training step."""
    from jaxleak.priors.flow import TrainConfig, init_state, make_train_step, sampled_flow_loss
    from jaxleak.priors.unet import make_unet, preset

    config, train_config = preset("small"), TrainConfig(batch_size=64)
    model = make_unet(config)
    params = init_state(config, train_config).params
    x1 = 2.0 * jax.random.uniform(jax.random.PRNGKey(1), (64, 32, 32, 3)) - 1.0
    key = jax.random.PRNGKey(0)

    def loss(p, x1, key):
        return sampled_flow_loss(
            lambda x, t: model.apply({"params": p}, x, t, train=True, rngs={"dropout": key}), x1, key)

    out = {}
    for name, fn in (("loss forward", jax.jit(loss)), ("forward + gradient", jax.jit(jax.value_and_grad(loss)))):
        cost = fn.lower(params, x1, key).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        s = median_seconds(fn, (params, x1, key), reps)
        out[name] = {"s": s, "gflop": cost["flops"] / 1e9, "gflops_per_s": cost["flops"] / 1e9 / s}
    step = make_train_step(config, train_config)
    images = jnp.asarray(np.random.RandomState(0).randint(0, 256, (1024, 32, 32, 3), np.uint8))
    box = [init_state(config, train_config)]

    def run():
        box[0], loss_value = step(box[0], images)
        return loss_value

    out["full step"] = {"s": median_seconds(run, (), reps)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    key = jax.random.PRNGKey(0)
    fns = {name: jax.jit(fn) for name, fn in functions().items()}
    rows = []
    for b, side, c in SHAPES:
        x = jax.random.normal(key, (b, side, side, c))
        w = 0.05 * jax.random.normal(jax.random.fold_in(key, 1), (3, 3, c, c))
        dy = jax.random.normal(jax.random.fold_in(key, 2), (b, side, side, c))
        ref = fns["kernel grad (XLA)"](x, w, dy)
        err = float(jnp.max(jnp.abs(fns["kernel grad (im2col)"](x, w, dy) - ref)) / jnp.max(jnp.abs(ref)))
        gflop = 2 * b * side * side * 9 * c * c / 1e9
        row = {"batch": b, "side": side, "channels": c, "gflop": gflop, "im2col_rel_err": err}
        for name, fn in fns.items():
            s = median_seconds(fn, (x, w, dy), args.reps)
            row[name] = {"ms": 1e3 * s, "gflops_per_s": gflop / s}
        rows.append(row)
        print(f"B={b} {side}x{side} C={c} ({gflop:.2f} GFLOP): " + ", ".join(
            f"{n} {row[n]['ms']:.0f} ms ({row[n]['gflops_per_s']:.0f} GFLOP/s)" for n in fns), flush=True)
    breakdown = step_breakdown(args.reps)
    for name, r in breakdown.items():
        print(f"small preset, batch 64, {name}: {r['s']:.3f} s" + (
            f" ({r['gflop']:.1f} GFLOP, {r['gflops_per_s']:.0f} GFLOP/s)" if "gflop" in r else ""), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python experiments/flow_prior/conv_backward_probe.py " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
            platform.machine(), "jax": jax.__version__, "devices": str(jax.devices()), "rows": rows,
            "small_step_batch64": breakdown}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
