"""Running any registered attack on a capture: check, run, evaluate once, write.

``run_attack`` is the one path from a capture file to ``reconstructions.npz``
(or SPE's ``features.npz``) and ``metrics.json`` for every attack in
:mod:`jaxleak.attacks.registry`. Besides the per-image metrics
(:func:`jaxleak.audit.evaluate.evaluate`), ``metrics.json`` and the returned summary
hold the run's ``"cost"`` (:func:`attack_cost`).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxleak.audit.evaluate import LPIPS_ALSO

OUTPUT_FILES = ("reconstructions.npz", "features.npz", "metrics.json")


def check_output_dir(out_dir: str, *, force: bool = False) -> None:
    """Refuses an output folder holding earlier results unless ``force`` (then removes them).

    Raises:
      FileExistsError: results are there and ``force`` is off (one line naming ``--force``).
      NotADirectoryError / PermissionError: ``out_dir`` is a file, or cannot be written.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"--out {out_dir} is a file, not a folder")
    stale = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, f))]
    if stale and not force:
        raise FileExistsError(f"--out {out_dir} already holds results ({', '.join(stale)}); pass --force to "
                              f"replace them")
    parent = out_dir if os.path.isdir(out_dir) else (os.path.dirname(os.path.abspath(out_dir)) or ".")
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--out {out_dir}: {parent} is not writable")
    for f in stale:
        os.remove(os.path.join(out_dir, f))


def null_capture(cap, kind: str, *, seed: int = 0):
    """``cap`` with updates that carry no information about each client's images (the null control).

    ``"shuffle"``: client ``i`` gets the update of client ``(i + 1) % N``; ``"noise"``: Gaussian
    noise with each leaf's per-client RMS (see :func:`jaxleak.attacks.optimization.null_updates`).
    """
    from jaxleak.attacks.optimization import null_updates

    update = null_updates(dict(cap.update), kind=kind, seed=seed)
    return dataclasses.replace(cap, update={k: np.asarray(v, np.float32) for k, v in update.items()})


def peak_memory() -> dict[str, int | None]:
    """The process's peak device memory and peak host RSS so far, in bytes.

    ``peak_device_bytes``: the largest ``memory_stats()["peak_bytes_in_use"]`` of the
    local devices (the allocator's peak since the process started), ``None`` where the
    backend reports none (XLA:CPU). ``peak_rss_bytes``: ``getrusage(RUSAGE_SELF).ru_maxrss``
    (KiB on Linux, bytes on macOS), the peak resident set of the whole process since it
    started. Both cover everything the process ran before, not one call alone.

    >>> sorted(peak_memory())
    ['peak_device_bytes', 'peak_rss_bytes']
    """
    import jax

    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in jax.local_devices()]
    peaks = [int(p) for p in peaks if p is not None]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_device_bytes": max(peaks) if peaks else None,
            "peak_rss_bytes": int(rss) * (1 if sys.platform == "darwin" else 1024)}


def attack_cost(seconds: float, timing: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``"cost"`` entry of ``metrics.json``: what one attack run took.

    Args:
      seconds: wall time of the attack's ``run`` (compilation included, evaluation excluded).
      timing: the attack's ``info["timing"]`` (optimisation attacks: the driver's
        :meth:`~jaxleak.attacks.optimization.RunResult.timing`), or ``None``.

    Returns:
      ``{"attack_seconds", "flops_per_iteration", "flops_lower_bound", "peak_device_bytes",
      "peak_rss_bytes", "backend"}``: FLOPs of one iteration of one run (one target, one
      restart) from XLA's cost analysis (``None`` for attacks without an iteration driver
      or a backend without the figure; ``flops_lower_bound`` when loops inside an
      iteration were counted once); the memory peaks of :func:`peak_memory`, read right
      after the attack.

    >>> cost = attack_cost(1.5, {"flops_per_iteration": 2e6})
    >>> cost["attack_seconds"], cost["flops_per_iteration"], cost["peak_rss_bytes"] > 0
    (1.5, 2000000.0, True)
    """
    import jax

    timing = timing or {}
    return {"attack_seconds": float(seconds), "flops_per_iteration": timing.get("flops_per_iteration"),
            "flops_lower_bound": timing.get("flops_lower_bound"), **peak_memory(),
            "backend": jax.default_backend()}


def _json_ready(value):
    import json

    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def run_attack(
    name: str,
    cap,
    *,
    out_dir: str,
    overrides: Mapping[str, Any] | None = None,
    artifact: str | None = None,
    seed: int = 0,
    progress: bool = False,
    options: Mapping[str, Any] | None = None,
    null: str | None = None,
    lpips_net: str | None = "alex",
    lpips_also: Sequence[str] = LPIPS_ALSO,
    weights_dir: str | None = None,
    match_metric: str = "psnr",
    force: bool = False,
) -> dict[str, Any]:
    """Runs attack ``name`` on every client of ``cap`` and writes its results to ``out_dir``.

    Args:
      name: a registered attack (``jaxleak attacks``).
      cap: a :class:`jaxleak.capture.Capture`.
      out_dir: output folder (refused when it holds results, unless ``force``).
      overrides: fields of the attack's config (its reference defaults otherwise).
      artifact: a trained network's folder, for attacks that need one.
      seed: the attack's initialisation seed.
      progress: progress bars.
      options: attack-family run options (driver chunking, SPE's ``sigma2``, ...).
      null: ``None``, or ``"shuffle"`` / ``"noise"``: attack updates that carry no information
        about the targets (the floor that leakage is measured against).
      lpips_net, weights_dir: LPIPS backbone (``None``: no LPIPS) and weights root.
      lpips_also: further LPIPS backbones scored where their weights exist (VGG by default).
      match_metric: Hungarian assignment criterion when clients hold ``M > 1`` images.
      force: replace earlier results in ``out_dir``.

    Returns:
      A JSON-ready summary: what was written, metric means, the run's ``"cost"``
      (:func:`attack_cost`: wall time, FLOPs per iteration, memory peaks), timing when
      the attack reports it. ``metrics.json`` holds the per-image metrics (``psnr``,
      ``ssim``, ``mse``, ``lpips_alex``, ``fmse``, ``tv``, ``tv_truth``, ...: ``values``
      and ``mean`` each), the same ``"cost"`` and the attack's ``timing``.

    Raises:
      AttackInputError: unknown attack or setting, or a capture lacking what the attack needs.
      FileExistsError: ``out_dir`` holds results and ``force`` is off.
    """
    from jaxleak.attacks.registry import Context, check_needs, get_attack
    from jaxleak.audit.evaluate import evaluate
    from jaxleak.audit.workflow import victim_from_capture
    from jaxleak.report.summary import write_metrics_json

    attack = get_attack(name)
    config = attack.config(overrides)
    wants_victim = "weights" in attack.needs or attack.family == "analytic"
    rebuilt = victim_from_capture(cap) if wants_victim else None
    check_needs(attack, cap, artifact=artifact, weights_available=rebuilt is not None)
    if null not in (None, "shuffle", "noise"):
        raise ValueError(f"null control must be 'shuffle' or 'noise', got {null!r}")
    check_output_dir(out_dir, force=force)
    victim, variables = rebuilt if rebuilt is not None else (None, None)
    attacked = cap if null is None else null_capture(cap, null, seed=seed)
    context = Context(victim=victim, variables=variables, artifact=artifact, seed=seed, progress=progress,
                      options=dict(options or {}))
    t0 = time.perf_counter()
    output = attack.run(attacked, config, context)
    cost = attack_cost(time.perf_counter() - t0, output.info.get("timing"))
    result = evaluate(cap, output, victim=victim, variables=variables, lpips_net=lpips_net,
                      lpips_also=lpips_also, weights_dir=weights_dir, match_metric=match_metric)

    os.makedirs(out_dir, exist_ok=True)
    written = []
    arrays = dict(output.arrays)
    if attack.family == "analytic" and arrays:
        np.savez(os.path.join(out_dir, "features.npz"), **arrays)
        written.append("features.npz")
        arrays = {}
    if result["images"] is not None:
        images, labels = result["images"], result["labels"]
        single = cap.samples == 1
        payload = {"images": images[:, 0] if single else images, **arrays}
        if labels is not None:
            payload["labels"] = np.asarray(labels)[:, 0] if single else np.asarray(labels)
        np.savez(os.path.join(out_dir, "reconstructions.npz"), **payload)
        written.append("reconstructions.npz")
    notes = list(result["notes"])
    if null is not None:
        notes.append(f"NULL CONTROL ({null}): the attacked updates carry no information about the images; "
                     f"these scores are the floor leakage must be measured against")
    info = {k: v for k, v in output.info.items() if k != "notes"}
    meta = cap.meta
    extra = {
        "attack": name,
        "config": _json_ready(dataclasses.asdict(config)),
        "null_control": null,
        **_json_ready(info),
        "cost": cost,
        "captures": meta,
        "protocol": meta.get("protocol"),
        "defenses": meta.get("defenses"),
        "calibration": meta.get("calibration"),
        "epsilon": meta.get("epsilon"),
    }
    if notes:
        extra["note"] = "; ".join(notes)
    metrics = result["metrics"]
    path = os.path.join(out_dir, "metrics.json")
    if metrics:
        write_metrics_json(path, metrics, extra=extra)
    else:
        import json

        from jaxleak.report.summary import _strict

        with open(path, "w", encoding="utf-8") as f:
            json.dump(_strict({"metrics": {}, "n": 0, **extra}), f, indent=2, allow_nan=False)
    written.append("metrics.json")
    means = {k: float(np.nanmean(np.where(np.isinf(v), np.nan, v))) if np.isfinite(v).any() else None
             for k, v in metrics.items()}
    summary = {"out": out_dir, "written": written, "n": cap.n, "attack": name, "null_control": null,
               "means": means, "cost": cost}
    for key in ("timing", "sigma2_source", "trained_on"):
        if key in info:
            summary[key] = info[key]
    return summary
