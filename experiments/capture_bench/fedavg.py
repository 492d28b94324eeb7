"""FedAvg client simulation: jaxleak's vmapped clients next to a PyTorch per-client loop.

Workload (issue 11, section 6): ``convnet-sme`` on 32x32x3 images, K = 10 classes,
N clients of M = 50 images each, local batch B = 10, E = 1 epoch (S = 5 steps),
SGD at lr 0.004 (SME's setting) and Adam at lr 0.1 (the FM paper's). Each client
returns its whole update ``w0 - w1`` (every layer) in both frameworks.

1. Agreement: jaxleak's ``capture_updates(..., keep_update=True)`` for 2 clients
   against the torch loop (``torch_fedavg.py``) on the same weights, images and
   batch schedule, the torch side in float32 and in float64 (the reference).
   Max abs and relative L2 differences are printed; the script exits with
   status 1, before any timing, if jaxleak's relative error against float64
   exceeds ``TOLERANCE`` (1e-4 for SGD, 1e-3 for Adam).
2. Throughput, each measurement in its own process (no thread pool shared
   between the frameworks, nor with the check): jaxleak ``jit(vmap(local_update))``
   over chunks of 1, 8 and N clients with ``Conv(impl="patches")`` (compile
   excluded, median of ``--repeats`` passes over all N clients); the library's
   own ``time_capture`` (what ``jaxleak bench capture`` prints: head-only
   update) with the same convolutions; jaxleak with XLA's convolution (the
   library's CPU default) on ``--xla-clients`` clients only, because it is
   ~10-40x slower here; torch with 1 and 2 threads (median of ``--repeats``
   passes over the same N clients after one warm-up pass).

Run from the repository root with torch installed (the ``compare`` extra)::

    python experiments/capture_bench/fedavg.py --clients 64 --repeats 5
    python experiments/capture_bench/fedavg.py --smoke            # a few seconds, checks it runs

Writes the JSON summary to ``--out`` (default ``experiments/capture_bench/results/fedavg.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak.capture import capture_updates, flatten_tree, time_capture, unflatten_tree
from jaxleak.models import get_victim
from jaxleak.protocols import Protocol, derived_keys, local_update, make_schedule

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODEL = "convnet-sme"
# Relative L2 error of jaxleak's whole update against the float64 torch run.
TOLERANCE = {"sgd": 1e-4, "adam": 1e-3}


def fedavg_protocol(*, optimizer: str, lr: float, local_batch: int, local_epochs: int) -> Protocol:
    """The FedAvg protocol both frameworks follow."""
    return Protocol(
        kind="fedavg",
        local_epochs=local_epochs,
        local_batch=local_batch,
        optimizer=optimizer,
        lr=lr,
    )


def make_data(
    *, clients: int, samples: int, image_size: int, num_classes: int, seed: int
) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """``convnet-sme`` initialised with ``seed``, images ``[N, M, H, W, 3]``, labels ``[N, M]``.

    Pixels are multiples of 1/255 so capture's uint8 quantisation leaves them unchanged.
    """
    victim = get_victim(MODEL, image_shape=(image_size, image_size, 3), num_classes=num_classes)
    variables = victim.init(jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (clients, samples, image_size, image_size, 3)) / 255.0
    labels = rng.integers(0, num_classes, (clients, samples)).astype(np.int32)
    return victim, variables, images.astype(np.float32), labels


def client_schedules(protocol: Protocol, *, samples: int, clients: int, seed: int) -> np.ndarray:
    """``[N, E, S, B]``: the batches of jaxleak's client ``i`` (key ``fold_in(PRNGKey(seed), i)``).

    Same derivation as :func:`local_update`'s shuffle key, checked against a capture.
    """
    base = jax.random.PRNGKey(seed)

    def one(i):
        shuffle, _, _ = derived_keys(jax.random.fold_in(base, i))
        return make_schedule(protocol, samples, shuffle)

    return np.asarray(jax.vmap(one)(jnp.arange(clients, dtype=jnp.uint32)))


def _errors(
    test: list[dict[str, np.ndarray]], ref: list[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Max abs difference and relative L2 error of ``test`` against ``ref`` (per-client dicts)."""
    diff_sq = ref_sq = max_abs = max_ref = 0.0
    for t_client, r_client in zip(test, ref):
        for name, r in r_client.items():
            d = np.asarray(t_client[name], np.float64) - np.asarray(r, np.float64)
            diff_sq += float(np.sum(d * d))
            ref_sq += float(np.sum(np.asarray(r, np.float64) ** 2))
            max_abs = max(max_abs, float(np.abs(d).max()))
            max_ref = max(max_ref, float(np.abs(r).max()))
    return {
        "max_abs_diff": max_abs,
        "max_abs_update": max_ref,
        "relative_l2_error": (diff_sq / ref_sq) ** 0.5,
    }


def cross_check(
    victim, variables, images, labels, protocol: Protocol, *, seed: int
) -> dict[str, Any]:
    """Whole-update agreement of jaxleak's capture and the torch loop for ``len(images)`` clients.

    Three updates per client: jaxleak (float32), torch float32 (``w0 - w1`` after
    in-place optimizer steps, as a PyTorch user writes it) and torch float64 (the
    reference). The float32 torch update loses digits in the subtraction ``w0 - w1``
    (its weights are rounded to ``ulp(w)`` at every step, and SGD's update is ~1e-3
    of the weights); jaxleak accumulates the steps themselves and does not, so
    "same work" is judged against the float64 run.
    """
    import torch
    import torch_fedavg as tf

    n, m = labels.shape
    cap = capture_updates(
        victim,
        variables,
        images.reshape(n * m, *images.shape[2:]),
        labels.reshape(-1),
        protocol=protocol,
        samples=m,
        seed=seed,
        keep_update=True,
        chunk_size=n,
    )
    ours = client_schedules(protocol, samples=m, clients=n, seed=seed)
    if not np.array_equal(cap.schedule, ours):
        raise AssertionError("client_schedules does not reproduce the capture's schedule")
    params = flatten_tree(jax.device_get(variables["params"]))
    jaxleak = [{k: v[i] for k, v in cap.update.items()} for i in range(n)]
    torch_updates = {}
    for dtype in (torch.float32, torch.float64):
        model = tf.ConvNetSME(image_size=images.shape[2], num_classes=victim.num_classes).to(dtype)
        w0 = {k: v.to(dtype) for k, v in tf.state_from_flax(params, model.feature_shape).items()}
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 1, 4, 2, 3))).to(dtype)
        y = torch.from_numpy(labels.astype(np.int64))
        torch_updates[str(dtype).removeprefix("torch.")] = [
            tf.state_to_flax(
                tf.client_update(
                    model,
                    w0,
                    x[i],
                    y[i],
                    cap.schedule[i],
                    optimizer=protocol.optimizer,
                    lr=protocol.lr,
                ),
                model.feature_shape,
            )
            for i in range(n)
        ]
    ref = torch_updates["float64"]
    return {
        "optimizer": protocol.optimizer,
        "lr": protocol.lr,
        "clients": n,
        "jaxleak_vs_torch64": _errors(jaxleak, ref),
        "torch32_vs_torch64": _errors(torch_updates["float32"], ref),
        "jaxleak_vs_torch32": _errors(jaxleak, torch_updates["float32"]),
    }


# ---------------------------------------------------------------- timing workers (own process)


def _load_worker_data(path: str):
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    params = unflatten_tree(
        {k.removeprefix("param:"): v for k, v in data.items() if k.startswith("param:")}
    )
    images, labels = data["images"], data["labels"]
    victim = get_victim(
        MODEL, image_shape=images.shape[2:], num_classes=params["head"]["bias"].shape[0]
    )
    return victim, {"params": jax.tree_util.tree_map(jnp.asarray, params)}, images, labels


def clients_fn(victim, protocol: Protocol):
    """``jit(vmap(local_update))`` over a chunk of clients, every layer of the update returned.

    The same keys as capture (``fold_in(PRNGKey(seed), client_id)``), so the work per
    client is what :func:`capture_updates` does with ``keep_update=True``.
    """

    def one(variables, images, labels, key):
        return local_update(victim, variables, images, labels, key, protocol=protocol).update

    def chunk(variables, images, labels, seed, ids):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(ids)
        return jax.vmap(one, in_axes=(None, 0, 0, 0))(variables, images, labels, keys)

    return jax.jit(chunk)


def time_jax_clients(
    victim, variables, images, labels, protocol: Protocol, *, chunk: int, repeats: int
) -> dict[str, Any]:
    """Median wall time of one pass over all N clients in chunks of ``chunk`` (compile excluded)."""
    n = images.shape[0]
    if n % chunk:
        raise ValueError(f"chunk {chunk} must divide the {n} clients")
    fn = clients_fn(victim, protocol)
    xs = [jnp.asarray(images[i : i + chunk]) for i in range(0, n, chunk)]
    ys = [jnp.asarray(labels[i : i + chunk]) for i in range(0, n, chunk)]
    ids = [jnp.arange(i, i + chunk, dtype=jnp.uint32) for i in range(0, n, chunk)]
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, xs[0], ys[0], 0, ids[0]))
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        outs = [fn(variables, x, y, r + 1, i) for x, y, i in zip(xs, ys, ids)]
        jax.block_until_ready(outs)
        times.append(time.perf_counter() - t0)
        del outs
    return {"median_seconds": float(np.median(times)), "times": times, "compile_seconds": compile_s}


def worker(args) -> int:
    victim, variables, images, labels = _load_worker_data(args.data)
    images, labels = images[: args.limit], labels[: args.limit]
    victim = victim.with_conv_impl(args.conv_impl)
    protocol = fedavg_protocol(
        optimizer=args.optimizer,
        lr=args.lr,
        local_batch=args.local_batch,
        local_epochs=args.local_epochs,
    )
    n, m = labels.shape
    if args.worker == "jax":
        res = time_jax_clients(
            victim, variables, images, labels, protocol, chunk=args.chunk, repeats=args.repeats
        )
        res["chunk"] = args.chunk
    else:  # jax-bench: the library's time_capture, one chunk of N clients, head-only update
        res = time_capture(
            victim,
            variables,
            protocol=protocol,
            samples=m,
            batch=n,
            repeats=args.repeats,
            conv_impl=args.conv_impl,
        )
        res = {k: res[k] for k in ("median_seconds", "compile_seconds", "conv_impl")} | {"chunk": n}
    med = res["median_seconds"]
    res.update(
        framework="jaxleak",
        clients=n,
        samples=m,
        optimizer=args.optimizer,
        lr=args.lr,
        conv_impl=victim.conv_impl,
        clients_per_second=n / med,
        examples_per_second=n * m * args.local_epochs / med,
        device=str(jax.devices()[0].device_kind),
    )
    print(json.dumps(res))
    return 0


# ---------------------------------------------------------------- driver


def _run_json(cmd: list[str]) -> dict[str, Any]:
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(
            ["lscpu"], check=False, capture_output=True, text=True
        ).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def _versions() -> dict[str, str]:
    import flax
    import jaxlib
    import optax
    import torch

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="jaxleak vs PyTorch FedAvg client simulation throughput"
    )
    p.add_argument("--clients", type=int, default=64, help="N clients per timed pass")
    p.add_argument("--samples", type=int, default=50, help="M images per client")
    p.add_argument("--local-batch", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--sgd-lr", type=float, default=0.004)
    p.add_argument("--adam-lr", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--chunks", type=int, nargs="+", default=None, help="jaxleak chunk sizes (default 1 8 N)"
    )
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    p.add_argument("--no-adam", action="store_true", help="time SGD only")
    p.add_argument(
        "--conv-impl",
        default="patches",
        choices=("patches", "xla"),
        help="jaxleak's Conv implementation for the main rows (see the README: 'xla' is very "
        "slow inside the local-training scan on CPU)",
    )
    p.add_argument(
        "--xla-clients",
        type=int,
        default=2,
        help="also time jaxleak with conv_impl='xla' on this many clients (chunk 1 and all "
        "at once, --xla-repeats each); 0 skips",
    )
    p.add_argument("--xla-repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--smoke", action="store_true", help="2 clients, 1 repeat: checks the script runs"
    )
    p.add_argument("--out", default=str(HERE / "results" / "fedavg.json"))
    p.add_argument("--worker", choices=("jax", "jax-bench"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    p.add_argument("--optimizer", default="sgd", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.clients, args.repeats, args.chunks, args.threads = 2, 1, [1, 2], [1]
    chunks = args.chunks or [1, 8, args.clients]
    chunks = sorted({c for c in chunks if c <= args.clients and args.clients % c == 0})

    sys.path.insert(0, str(HERE))
    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    victim, variables, images, labels = make_data(
        clients=args.clients,
        samples=args.samples,
        image_size=args.image_size,
        num_classes=args.num_classes,
        seed=args.seed,
    )
    settings = {"sgd": args.sgd_lr} if args.no_adam else {"sgd": args.sgd_lr, "adam": args.adam_lr}
    protocols = {
        opt: fedavg_protocol(
            optimizer=opt, lr=lr, local_batch=args.local_batch, local_epochs=args.local_epochs
        )
        for opt, lr in settings.items()
    }

    checks = []
    for opt, protocol in protocols.items():
        row = cross_check(victim, variables, images[:2], labels[:2], protocol, seed=args.seed)
        row["ok"] = bool(row["jaxleak_vs_torch64"]["relative_l2_error"] <= TOLERANCE[opt])
        checks.append(row)
        for pair in ("jaxleak_vs_torch64", "torch32_vs_torch64", "jaxleak_vs_torch32"):
            e = row[pair]
            print(
                f"check {opt} lr {protocol.lr} {pair:>18}: max abs diff {e['max_abs_diff']:.2e} "
                f"(max |update| {e['max_abs_update']:.3g}), "
                f"relative L2 error {e['relative_l2_error']:.2e}",
                flush=True,
            )
        print(
            f"check {opt}: {'OK' if row['ok'] else 'MISMATCH'} (tolerance {TOLERANCE[opt]:g})",
            flush=True,
        )
    if not all(row["ok"] for row in checks):
        print(
            "updates differ: the two implementations do different work; not timing", file=sys.stderr
        )
        return 1

    schedules = client_schedules(
        protocols["sgd"], samples=args.samples, clients=args.clients, seed=args.seed
    )
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.npz")
        params = flatten_tree(jax.device_get(variables["params"]))
        np.savez(
            data,
            images=images,
            labels=labels,
            schedules=schedules,
            **{f"param:{k}": v for k, v in params.items()},
        )
        common = ["--data", data, "--repeats", str(args.repeats)]
        plan: list[tuple[str, list[str]]] = []
        for opt, protocol in protocols.items():
            lr = ["--optimizer", opt, "--lr", repr(protocol.lr)]
            jax_common = [
                sys.executable,
                __file__,
                *common,
                *lr,
                "--local-batch",
                str(args.local_batch),
                "--local-epochs",
                str(args.local_epochs),
                "--conv-impl",
                args.conv_impl,
            ]
            torch_cmds = [
                (
                    f"{opt} torch {t} thread(s)",
                    [
                        sys.executable,
                        str(HERE / "torch_fedavg.py"),
                        *common,
                        *lr,
                        "--threads",
                        str(t),
                    ],
                )
                for t in args.threads
            ]
            jax_cmds = [
                (f"{opt} jaxleak chunk {c}", [*jax_common, "--worker", "jax", "--chunk", str(c)])
                for c in (reversed(chunks) if opt == "sgd" else chunks[-1:])
            ]
            if opt == "sgd":
                jax_cmds.append(
                    (
                        f"{opt} jaxleak time_capture (head only)",
                        [*jax_common, "--worker", "jax-bench"],
                    )
                )
                k = min(args.xla_clients, args.clients)
                xla = [
                    *jax_common,
                    "--conv-impl",
                    "xla",
                    "--limit",
                    str(k),
                    "--repeats",
                    str(args.xla_repeats),
                ]
                jax_cmds += (
                    [
                        (
                            f"{opt} jaxleak xla, {k} clients, chunk {c}",
                            [*xla, "--worker", "jax", "--chunk", str(c)],
                        )
                        for c in sorted({1, k})
                    ]
                    if k > 0
                    else []
                )
            # Alternate frameworks so a change in the machine's load hits both alike.
            for i in range(max(len(torch_cmds), len(jax_cmds))):
                plan += torch_cmds[i : i + 1] + jax_cmds[i : i + 1]
        for label, cmd in plan:
            before = os.getloadavg()[0]
            try:
                res = _run_json(cmd)
            except subprocess.CalledProcessError as err:  # keep the other measurements
                print(f"  {label}: FAILED\n{err.stderr[-2000:]}", file=sys.stderr, flush=True)
                runs.append({"label": label, "error": err.stderr[-2000:]})
                continue
            res.update(label=label, load_before=before, load_after=os.getloadavg()[0])
            runs.append(res)
            print(
                f"  {label}: {res['median_seconds']:.3f} s per {res['clients']} clients, "
                f"{res['clients_per_second']:.2f} clients/s, {res['examples_per_second']:.0f} ex/s "
                f"(load {before:.2f} -> {res['load_after']:.2f})",
                flush=True,
            )

    ratios = {}
    for opt in protocols:
        best_jax = next(r for r in runs if r["label"] == f"{opt} jaxleak chunk {chunks[-1]}")
        for r in runs:
            if (
                r["label"].startswith(f"{opt} torch")
                and "error" not in r
                and "error" not in best_jax
            ):
                ratios[f"{opt}: jaxleak chunk {chunks[-1]} / torch {r['threads']} thread(s)"] = (
                    best_jax["clients_per_second"] / r["clients_per_second"]
                )
    summary = {
        "benchmark": "fedavg client simulation",
        "model": MODEL,
        "image_shape": [args.image_size, args.image_size, 3],
        "num_classes": args.num_classes,
        "clients": args.clients,
        "samples": args.samples,
        "local_batch": args.local_batch,
        "local_epochs": args.local_epochs,
        "repeats": args.repeats,
        "date": started.isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": _versions(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "check": checks,
        "runs": runs,
        "ratios": ratios,
        "command": " ".join(
            ["python", "experiments/capture_bench/fedavg.py", *(argv or sys.argv[1:])]
        ),
    }
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
