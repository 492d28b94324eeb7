"""jaxleak's capture benchmark next to the same work in PyTorch ``torch.func``.

1. Cross-check: the head gradients of both implementations on the same weights
   (jaxleak's Flax params copied into torch) and the same images, for
   ``none`` (raw gradient), ``dpsgd`` with ``z = 0`` (whole-gradient clip, no
   noise) and ``paper`` with a huge epsilon (per-layer clip, noise ~1e-14).
   Exits with status 1 if they differ beyond float32 round-off.
2. Throughput: ``python -m jaxleak.cli bench capture`` and
   ``torch_func_capture.py`` as separate processes (no shared thread pools),
   interleaved for ``--rounds`` rounds per calibration, alternating which goes
   first; the table shows the median over rounds of each run's median step time.

Run from the repository root:
``python experiments/capture_bench/compare.py --calibrations dpsgd paper``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import torch

from jaxleak.audit import build_victim
from jaxleak.capture.simulate import capture_updates
from jaxleak.privacy import DPConfig
from jaxleak.privacy.mechanisms import resolve

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import torch_func_capture as tfc


def bench_config(calibration: str) -> DPConfig:
    """The DPConfig that ``jaxleak bench capture --calibration <c>`` builds from its defaults."""
    return DPConfig(calibration=calibration, epsilon=10.0, delta=1e-5, clip=1.0, lr=1e-3)


def cross_check(*, image_size: int, n: int = 16, seed: int = 0) -> list[dict]:
    """Head gradients of jaxleak's capture and the torch step on identical inputs, per case."""
    victim, variables, _ = build_victim(
        "lenet-dlg", image_shape=(image_size, image_size, 3), num_classes=10
    )
    model = tfc.build_model(image_size=image_size, num_classes=10)
    tfc.load_flax_params(model, jax.device_get(variables["params"]))
    rng = np.random.default_rng(seed)
    # Multiples of 1/255 so capture_updates' uint8 quantisation leaves the images unchanged.
    images = (rng.integers(0, 256, (n, image_size, image_size, 3)) / 255.0).astype(np.float32)
    labels = rng.integers(0, 10, n)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels)

    cases = {
        "none": DPConfig(calibration="none"),
        "dpsgd z=0": DPConfig(calibration="dpsgd", noise_multiplier=0.0, clip=1.0),
        "paper eps=1e12": DPConfig(calibration="paper", epsilon=1e12, clip=1.0),
    }
    rows, raw_w = [], None
    for name, dp in cases.items():
        cap = capture_updates(victim, variables, images, labels, dp=dp, chunk_size=n)
        with torch.no_grad():
            gw, gb = tfc.make_capture_step(
                model, calibration=dp.calibration, clip=1.0, noise_std=0.0
            )(x, y)
        tw = tfc.head_grad_to_hwc(gw, model.feature_shape)
        diff = max(
            np.abs(tw - cap.fc_weight_grad).max(), np.abs(gb.numpy() - cap.fc_bias_grad).max()
        )
        scale = float(np.abs(cap.fc_weight_grad).max())
        if raw_w is None:
            raw_w = cap.fc_weight_grad
        clipped = int(np.sum(np.abs(cap.fc_weight_grad - raw_w).reshape(n, -1).max(1) > 1e-7))
        rows.append(
            {
                "case": name,
                "max_abs_diff": float(diff),
                "max_abs_grad": scale,
                "clients_clipped": clipped,
                "n": n,
                "ok": bool(diff <= 1e-6 + 1e-5 * scale),
            }
        )
    return rows


def _run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_pair(
    calibration: str,
    *,
    image_size: int,
    batch: int,
    repeats: int,
    rounds: int,
    torch_compile: bool,
    torch_device: str,
) -> dict:
    """Interleaved jaxleak / torch runs for one calibration; medians over rounds."""
    noise_std = resolve(bench_config(calibration), batch_size=1).noise_scale
    common = [
        "--image-size",
        str(image_size),
        "--batch",
        str(batch),
        "--repeats",
        str(repeats),
        "--calibration",
        calibration,
    ]
    jax_cmd = [
        sys.executable,
        "-m",
        "jaxleak.cli",
        "bench",
        "capture",
        "--model",
        "lenet-dlg",
        *common,
    ]
    torch_cmd = [
        sys.executable,
        str(HERE / "torch_func_capture.py"),
        *common,
        "--noise-std",
        repr(noise_std),
        "--clip",
        "1.0",
        "--device",
        torch_device,
    ]
    cmds = {"jaxleak": jax_cmd, "torch": torch_cmd}
    if torch_compile:
        cmds["torch.compile"] = [*torch_cmd, "--compile"]
    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    for r in range(rounds):
        order = list(cmds) if r % 2 == 0 else list(reversed(cmds))
        for name in order:
            runs[name].append(_run_json(cmds[name]))
            print(
                f"  {calibration} round {r + 1}/{rounds} {name}: "
                f"{runs[name][-1]['median_seconds']:.4f} s",
                file=sys.stderr,
                flush=True,
            )
    # Runs of one round ran back to back, so their ratio is the paired comparison.
    ratios = [
        t["median_seconds"] / j["median_seconds"] for j, t in zip(runs["jaxleak"], runs["torch"])
    ]
    result = {
        "calibration": calibration,
        "noise_std": noise_std,
        "runs": runs,
        "round_ratios": ratios,
    }
    for name, rs in runs.items():
        meds = [x["median_seconds"] for x in rs]
        result[name] = {
            "median_seconds": statistics.median(meds),
            "min_seconds": min(meds),
            "max_seconds": max(meds),
            "examples_per_second": batch / statistics.median(meds),
        }
    return result


def _spread(stats: dict) -> str:
    return f"{stats['median_seconds']:.4g} ({stats['min_seconds']:.4g}-{stats['max_seconds']:.4g})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="jaxleak vs torch.func capture throughput")
    p.add_argument(
        "--calibrations", nargs="+", choices=("dpsgd", "paper", "none"), default=["dpsgd", "paper"]
    )
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument(
        "--repeats", type=int, default=10, help="timed steps per run (each run reports its median)"
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved runs per framework and calibration"
    )
    p.add_argument(
        "--torch-compile", action="store_true", help="also time the torch step under torch.compile"
    )
    p.add_argument(
        "--torch-device", default="cpu", help="cpu or cuda (jaxleak uses JAX's default backend)"
    )
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--out", default=None, help="also write all results as JSON here")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    check = [] if args.skip_check else cross_check(image_size=args.image_size)
    for row in check:
        print(
            f"check {row['case']:>15}: max |torch - jaxleak| = {row['max_abs_diff']:.2e} "
            f"(max |grad| {row['max_abs_grad']:.3g}, clipped {row['clients_clipped']}/{row['n']}) "
            f"{'OK' if row['ok'] else 'MISMATCH'}"
        )
    if not all(row["ok"] for row in check):
        print("head gradients differ: the two implementations do different work", file=sys.stderr)
        return 1

    results = [
        bench_pair(
            c,
            image_size=args.image_size,
            batch=args.batch,
            repeats=args.repeats,
            rounds=args.rounds,
            torch_compile=args.torch_compile,
            torch_device=args.torch_device,
        )
        for c in args.calibrations
    ]
    load_after = os.getloadavg()

    j0 = results[0]["runs"]["jaxleak"][0]
    t0 = results[0]["runs"]["torch"][0]
    print(
        f"\nlenet-dlg, {args.image_size}x{args.image_size}x3, batch {args.batch} (B=1 clients), "
        f"{args.repeats} steps/run, median of {args.rounds} interleaved runs"
    )
    print(
        f"jax {jax.__version__} ({j0['platform']}: {j0['device']}), torch {t0['torch_version']} "
        f"({t0['device']}: {t0['device_name']}, "
        f"{t0['threads']} threads), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}\n")
    extra = ["torch.compile"] if args.torch_compile else []
    head = "| calibration | jaxleak ex/s | torch.func ex/s | " + "".join(
        f"{e} ex/s | " for e in extra
    )
    head += "jaxleak/torch | per-round ratio (min-max) | jaxleak s (min-max) | torch s (min-max) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for res in results:
        j, t = res["jaxleak"], res["torch"]
        cells = [
            res["calibration"],
            f"{j['examples_per_second']:.0f}",
            f"{t['examples_per_second']:.0f}",
        ]
        cells += [f"{res[e]['examples_per_second']:.0f}" for e in extra]
        rr = res["round_ratios"]
        cells += [
            f"{j['examples_per_second'] / t['examples_per_second']:.2f}",
            f"{statistics.median(rr):.2f} ({min(rr):.2f}-{max(rr):.2f})",
            _spread(j),
            _spread(t),
        ]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "check": check,
                    "results": results,
                    "load_before": load_before,
                    "load_after": load_after,
                    "args": vars(args),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
