"""Cost of one flow-prior regulariser evaluation per image: XLA's FLOP count and wall time.

One evaluation is what the flow-matching attack pays per iteration for its prior
term: the value and the gradient with respect to the images ``x`` (in [0, 1]) of
``R(x) = mean_b ||v(x_b, t)||^2 / D`` (:func:`jaxleak.priors.velocity_norm`, the
UNet's forward pass and its backward pass to the input, no parameter gradients),
jitted as one function of ``(params, x, t)``.

For each preset and batch size it reports, per image (the batch's number / B):

- ``flops``: the ``"flops"`` entry of XLA's cost analysis of the compiled function
  (``jax.jit(f).lower(...).compile().cost_analysis()``; XLA counts a
  multiply-add as 2 FLOPs), and the same for the forward pass alone, for scale;
- ``bytes``: the ``"bytes accessed"`` entry (a rough memory-traffic figure);
- ``wall``: the median over ``--repeats`` timed calls after one untimed call
  (compilation excluded; its time is reported on its own), on whatever device
  JAX uses (XLA on every CPU core by default).

The weights are a fresh initialisation: neither the FLOP count nor the (dense
float32) run time depends on their values.

    python experiments/flow_prior/regularizer_cost.py --quick   # smoke check: small, batch 1 and 4, 3 calls
    python experiments/flow_prior/regularizer_cost.py --presets small paper --batch-sizes 1 64 \\
        --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak._provenance import machine
from jaxleak.priors import count_params, init_params, preset, velocity_norm


def cost_entry(compiled: Any, name: str) -> float:
    """One entry of a compiled function's cost analysis (a dict, a list of dicts, or ``None``).

    Returns ``nan`` when XLA gives no analysis or no such entry.

    >>> cost_entry(None, "flops"), cost_entry([{"flops": 4.0}], "flops"), cost_entry({"flops": 2}, "flops")
    (nan, 4.0, 2.0)
    """
    analysis = compiled.cost_analysis() if hasattr(compiled, "cost_analysis") else compiled
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    if not analysis or name not in analysis:
        return math.nan
    return float(analysis[name])


def regularizer_fns(config):
    """``(value_and_grad, forward)``: ``R(x)`` and ``dR/dx`` of ``(params, x01, t)``, and ``R`` alone."""

    def regularizer(params, images01, t):
        return jnp.mean(velocity_norm(params, config, images01, t))

    value_and_grad = jax.jit(jax.value_and_grad(regularizer, argnums=1))
    return value_and_grad, jax.jit(regularizer)


def measure(name: str, batch: int, *, repeats: int, t: float, seed: int = 0) -> dict[str, Any]:
    """FLOPs (from XLA) and median wall time of one regulariser evaluation at one (preset, batch)."""
    config = preset(name)
    key = jax.random.PRNGKey(seed)
    params = init_params(config, key)
    images = jax.random.uniform(jax.random.fold_in(key, 1), (batch, *config.image_shape), jnp.float32)
    times = jnp.full((batch,), t, jnp.float32)
    value_and_grad, forward = regularizer_fns(config)

    t0 = time.perf_counter()
    compiled = value_and_grad.lower(params, images, times).compile()
    compile_s = time.perf_counter() - t0
    forward_compiled = forward.lower(params, images, times).compile()
    flops, traffic = cost_entry(compiled, "flops"), cost_entry(compiled, "bytes accessed")
    forward_flops = cost_entry(forward_compiled, "flops")

    jax.block_until_ready(compiled(params, images, times))  # untimed first call
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, images, times))
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    return {
        "preset": name, "batch": batch, "params": count_params(config), "t": t,
        "flops_per_image": flops / batch, "forward_flops_per_image": forward_flops / batch,
        "bytes_per_image": traffic / batch, "wall_s_per_image": wall / batch, "wall_s_per_call": wall,
        "compile_s": compile_s, "times": walls,
    }


def format_table(rows: list[dict]) -> str:
    """Markdown table: per image GFLOPs (value+grad, forward alone), MB accessed, ms."""
    header = ("| preset | batch | GFLOP/image (value+grad) | GFLOP/image (forward) | MB accessed/image "
              "| ms/image (median) | GFLOP/s |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = r["flops_per_image"] / r["wall_s_per_image"] / 1e9
        lines.append(f"| {r['preset']} | {r['batch']} | {r['flops_per_image'] / 1e9:.3f} "
                     f"| {r['forward_flops_per_image'] / 1e9:.3f} | {r['bytes_per_image'] / 1e6:.1f} "
                     f"| {1e3 * r['wall_s_per_image']:.2f} | {rate:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", choices=("small", "paper"), default=None,
                        help="default: small paper (--quick: small)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                        help="default: 1 64 (--quick: 1 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 20; --quick 3)")
    parser.add_argument("--t", type=float, default=0.9, help="the time at which v is evaluated")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke check: small preset, batch 1 and 4, 3 timed calls")
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    args = parser.parse_args(argv)
    presets = args.presets or (["small"] if args.quick else ["small", "paper"])
    batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 64])
    repeats = args.repeats or (3 if args.quick else 20)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])

    devices = ", ".join(str(d) for d in jax.devices())
    print(f"jax {jax.__version__} ({devices}), {os.cpu_count()} CPUs", flush=True)
    rows = []
    for name in presets:
        for batch in batch_sizes:
            row = measure(name, batch, repeats=repeats, t=args.t)
            print(f"  [{name} b={batch}] {row['flops_per_image'] / 1e9:.3f} GFLOP/image, "
                  f"{1e3 * row['wall_s_per_image']:.2f} ms/image (compile {row['compile_s']:.1f} s)",
                  flush=True)
            rows.append(row)
    print()
    print(format_table(rows))
    print(f"\nvalue and gradient w.r.t. x of mean ||v(x, t={args.t})||^2 / D; FLOPs from XLA's cost analysis "
          f"(multiply-add = 2); wall: median of {repeats} calls, compile excluded")
    if args.out is not None:
        import jaxlib

        result = {
            "what": "flow-prior regulariser cost: value and d/dx of mean ||v(x, t)||^2, per image",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": command,
            "machine": machine(),
            "versions": {"python": platform.python_version(), "jax": jax.__version__,
                         "jaxlib": jaxlib.__version__, "numpy": np.__version__},
            "settings": {"presets": presets, "batch_sizes": batch_sizes, "repeats": repeats, "t": args.t,
                         "quick": args.quick},
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
