"""Amortised seconds per image of Inverting Gradients (ConvNet, CIFAR-10 32x32), measured then extrapolated.

Runs the IG attack (reference CIFAR setting: cosine over all layers, signed Adam
0.1, TV 1e-6, boxed, step decay) on ``T`` targets at once for ``--iterations``
steps, excluding compilation, and extrapolates linearly to the reference budget
of 24,000 iterations (the per-iteration cost is constant: fixed shapes, no
data-dependent control flow). Images are random: the cost does not depend on
their content. Prints one JSON line per batch of targets and convolution
implementation (``--conv-impl xla patches`` measures both side by side).

    python experiments/baselines/bench_ig.py --targets 1 16 --iterations 200
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak.attacks import optimization as O
from jaxleak.models import get_victim


@functools.lru_cache(maxsize=8)
def victim_and_variables(model: str, width: int | None):
    """The untrained 32x32x3, 10-class victim (init seed 0) and its variables, built once per setting."""
    victim = get_victim(model, image_shape=(32, 32, 3), num_classes=10,
                        **({"width": width} if width else {}))
    return victim, victim.init(jax.random.key(0))


def measure(targets: int, iterations: int, budget: int, model: str, width: int | None, chunk: int,
            batching: str, unroll: int, conv_impl: str = "auto") -> dict:
    """Times ``iterations`` IG steps of one block of ``targets`` targets; the JSON-ready row of main()."""
    victim, variables = victim_and_variables(model, width)
    t = targets
    images = jax.random.uniform(jax.random.key(1), (t, 1, 32, 32, 3))
    labels = jnp.arange(t)[:, None] % 10
    grad = jax.jit(jax.vmap(lambda x, y: O.dummy_gradient(victim, variables, x, jax.nn.one_hot(y, 10))))
    # Observed updates, 16 targets at a time into one host array per leaf (ResNet-18: 45 MB per target).
    step = min(t, 16)
    shapes = jax.eval_shape(grad, images[:step], labels[:step])
    updates = jax.tree_util.tree_map(lambda a: np.empty((t, *a.shape[1:]), a.dtype), shapes)
    for i in range(0, t, step):
        piece = grad(images[i:i + step], labels[i:i + step])
        jax.tree_util.tree_map(lambda out, p, i=i: out.__setitem__(slice(i, i + p.shape[0]), np.asarray(p)),
                               updates, piece)
    # The step-decay milestones are placed for the full budget, as in a real 24k-iteration run.
    config = O.IGConfig(iterations=budget)
    conv_impl = O.attack_conv_impl(victim, conv_impl)
    problem = O.make_ig(victim.with_conv_impl(conv_impl), config, 1)
    options = O.RunOptions(iterations=iterations, chunk=min(chunk, iterations),
                           target_batch=t, batching=batching,
                           unroll=unroll)
    observed = O.prepare_targets(victim, updates, labels="known", batch_size=1,
                                 true_labels=np.asarray(labels))
    t0 = time.perf_counter()
    res = O.run_problem(problem, observed, dict(variables), options)
    wall = time.perf_counter() - t0
    per_iter = res.seconds_total / iterations
    return {
        "attack": "ig", "model": model, "width": width, "image": "32x32x3", "targets": t, "batching": batching, "chunk": chunk, "unroll": unroll,
        "conv_impl": conv_impl,
        "measured_iterations": iterations, "seconds_per_iteration": per_iter,
        "compile_seconds": res.compile_seconds, "wall_seconds": wall,
        "extrapolated_budget": budget,
        "extrapolated_seconds_per_image": per_iter * budget / t,
        "platform": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__, "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--iterations", type=int, default=200, help="measured iterations")
    parser.add_argument("--budget", type=int, default=24_000, help="iterations extrapolated to")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--batching", choices=("vmap", "map"), default="vmap")
    parser.add_argument("--unroll", type=int, default=1)
    parser.add_argument("--conv-impl", nargs="+", choices=("auto", "xla", "patches"), default=["auto"],
                        help="victim convolutions (O.attack_conv_impl); several values run side by side")
    args = parser.parse_args()
    for t in args.targets:
        for conv_impl in args.conv_impl:
            row = measure(t, args.iterations, args.budget, args.model, args.width, args.chunk,
                          args.batching, args.unroll, conv_impl)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
