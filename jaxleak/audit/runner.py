"""Running an audit: cells in a fixed order, resumable, shardable, failures recorded.

Folder layout and ``result.json`` schema: ``docs/audit.md``. A cell is done when its ``DONE``
marker exists (written last, atomically); anything else is redone from scratch, so a run
killed at any point and rerun ends with the same files as an uninterrupted one (every
random choice comes from the cell's seed). Cells sharing a capture (they differ only in the
attack) reuse one capture, itself marked done the same way.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxleak.audit.grid import Cell, expand, shard

DONE = "DONE"
LOCK = "LOCK"
ERROR = "ERROR"
PSNR_CAP = 100.0
"""dB given to exact reconstructions (infinite PSNR) before averaging."""
STALE_AFTER = 3600.0
"""Seconds after which another host's lock counts as stale."""


# --------------------------------------------------------------------------- files


def _write_json(path: str, payload: Any) -> None:
    """Writes strict JSON atomically (temporary file, then ``os.replace``)."""
    from jaxleak.report.summary import _strict

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_strict(payload), f, indent=2, allow_nan=False, default=_default)
    os.replace(tmp, path)


def _default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _mark_done(folder: str, payload: Mapping[str, Any] | None = None) -> None:
    _write_json(os.path.join(folder, DONE), {"finished": _now(), **(payload or {})})


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def is_done(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, DONE))


def _fresh(folder: str) -> None:
    """Empties ``folder`` (a partial result of an interrupted run) and recreates it."""
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command, date, machine and versions, so that every number can be regenerated."""
    import jax

    from jaxleak._provenance import machine
    from jaxleak._version import __version__

    return {
        "command": " ".join(["jaxleak", *(argv if argv is not None else sys.argv[1:])]),
        "date": _now(),
        "machine": {"host": socket.gethostname(), **machine()},
        "versions": {"jaxleak": __version__, "jax": jax.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }


# --------------------------------------------------------------------------- data and captures


@functools.lru_cache(maxsize=8)
def _dataset(name: str, split: str, n: int, seed: int, image_size: int | None, data_dir: str | None):
    from jaxleak.audit.workflow import load_data

    return load_data(name, split=split, n=n, seed=seed, image_size=image_size, data_dir=data_dir)


def _clients_data(d: Mapping[str, Any], clients: int, seed: int, data_dir: str | None):
    return _dataset(d["name"], d["split"], clients * d["images_per_client"], seed, d["image_size"], data_dir)


def _public_pool(d: Mapping[str, Any], data_dir: str | None):
    return _dataset(d["name"], d["public_split"], d["public_n"], 0, d["image_size"], data_dir)


def _protocol(p: Mapping[str, Any]):
    from jaxleak.audit.grid import _protocol_object

    return _protocol_object(p)


def build_capture(description: Mapping[str, Any], *, data_dir: str | None = None, progress: bool = False):
    """The capture a cell's description asks for (clients' images, victim, protocol, defenses)."""
    import dataclasses

    from jaxleak.audit.workflow import build_victim, capture
    from jaxleak.defenses import parse_chain

    d, v = description["dataset"], description["victim"]
    m = d["images_per_client"]
    data = _clients_data(d, description["clients"], description["seed"], data_dir)
    victim, variables, vmeta = build_victim(v["model"], dataset=data, width=v["width"], hidden=v["hidden"],
                                            precode=v["precode"], checkpoint=v["checkpoint"],
                                            init_seed=v["init_seed"], global_epoch=v["global_epoch"])
    if v["layer"] not in victim.layers:
        raise ValueError(f"victim {v['model']} has no dense layer {v['layer']!r}; it has {sorted(victim.layers)}")
    protocol = _protocol(description["protocol"])
    if v["global_epoch"] is not None:  # the weights at that epoch of a `jaxleak train-fedavg` run
        protocol = dataclasses.replace(protocol, global_epoch=v["global_epoch"])
    elif v["checkpoint"] and protocol.global_epoch is None:
        from jaxleak.protocols.server import HISTORY_FILE

        history = os.path.join(v["checkpoint"], HISTORY_FILE)
        if os.path.exists(history):  # the weights of a `jaxleak train-fedavg` run: record its global epoch
            with open(history, encoding="utf-8") as f:
                epoch = (json.load(f).get("history") or [{}])[-1].get("global_epoch")
            protocol = dataclasses.replace(protocol, global_epoch=epoch)
    batch = protocol.batch(m)
    defenses = parse_chain(description["defense"], batch_size=batch, steps=protocol.total_steps(m),
                           sampling_rate=batch / m, layer_path=tuple(victim.layers[v["layer"]].path))
    store = description["store"]
    return capture(victim, variables, data, defenses=defenses, protocol=protocol, samples=m,
                   seed=description["seed"], layer=v["layer"], chunk_size=8 if protocol.kind == "fedavg" else 256,
                   keep_update=store["keep_update"], keep_params=store["keep_params"], extra_meta=vmeta,
                   progress=progress)


def ensure_capture(out_dir: str, cell: Cell, *, data_dir: str | None = None, progress: bool = False) -> str:
    """The path of the cell's shared capture, computed (once) when not done yet."""
    from jaxleak.audit.grid import capture_description
    from jaxleak.capture import save_capture

    folder = os.path.join(out_dir, "captures", cell.capture_key)
    path = os.path.join(folder, "capture.npz")
    if is_done(folder):
        return path
    _fresh(folder)
    _write_json(os.path.join(folder, "capture.json"),
                {"key": cell.capture_key, **capture_description(cell.description)})
    cap = build_capture(cell.description, data_dir=data_dir, progress=progress)
    save_capture(path, cap)
    _mark_done(folder)
    return path


# --------------------------------------------------------------------------- scoring


def _interval(values: np.ndarray) -> dict[str, Any]:
    """Mean and its 95% normal interval (mean +- 1.96 s / sqrt(n)) over the finite values."""
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"mean": None, "ci": None, "n": 0}
    mean = float(finite.mean())
    half = 1.96 * float(finite.std(ddof=1)) / math.sqrt(finite.size) if finite.size > 1 else 0.0
    return {"mean": mean, "ci": [mean - half, mean + half], "n": int(finite.size)}


def _per_image(metrics_json: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per-image arrays from ``metrics.json`` (``null`` PSNR with a finite MSE was +inf: capped)."""
    raw = metrics_json.get("metrics") or {}
    out = {}
    for name, entry in raw.items():
        if isinstance(entry, Mapping) and "values" in entry:
            out[name] = np.array([np.nan if v is None else v for v in entry["values"]], np.float64)
    if "psnr" in out and "mse" in out:
        exact = np.isnan(out["psnr"]) & np.isfinite(out["mse"])
        out["psnr"] = np.where(exact, PSNR_CAP, np.minimum(out["psnr"], PSNR_CAP))
    return out


def _asr(values: np.ndarray, threshold: float) -> dict[str, Any]:
    from jaxleak.privacy.reconstruction import _clopper_pearson

    n = int(values.size)
    successes = int(np.sum(np.nan_to_num(values, nan=-np.inf) > threshold))
    lo, hi = _clopper_pearson(successes, n, 0.95)
    return {"threshold": threshold, "rate": successes / n if n else None, "successes": successes, "n": n,
            "ci": [lo, hi]}


def score(metrics_json: Mapping[str, Any], success: Mapping[str, float]) -> dict[str, Any]:
    """``{"n", "metrics": {name: {mean, ci, n}}, "asr": {criterion: ...}}`` of one attack run."""
    per_image = _per_image(metrics_json)
    out = {"n": int(metrics_json.get("n") or 0),
           "metrics": {name: _interval(values) for name, values in per_image.items()},
           "asr": {c: _asr(per_image[c], float(t)) for c, t in success.items() if c in per_image}}
    return out


def public_pool_without(truth: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(truth, pool)`` with every pool image equal to a target removed.

    The attacker's public pool must not hold the private images; a dataset with one split
    (``mnist-embedded`` serves "train" and "test" from the same 5,000 digits) would otherwise put
    targets in the pool and inflate kappa.

    >>> t = np.zeros((1, 2, 2, 1), np.float32); p = np.stack([t[0], t[0] + 0.5])
    >>> public_pool_without(t, p)[1].shape
    (1, 2, 2, 1)
    """
    private = {np.asarray(x).tobytes() for x in truth}
    keep = np.array([np.asarray(x).tobytes() not in private for x in pool], bool)
    return truth, pool[keep]


def privacy(cap, truth_pool: tuple[np.ndarray, np.ndarray] | None, success: Mapping[str, float]) -> dict[str, Any]:
    """What the cell's defenses promise: epsilons, noise, the baseline kappa and the bound per criterion."""
    from jaxleak.privacy.reconstruction import baseline_kappa, bound_for_meta

    meta = cap.meta
    parents = {k.rsplit("/", 1)[0] for k in cap.update}
    out: dict[str, Any] = {
        "defenses": meta.get("defenses") or [], "noise_std": meta.get("noise_std"),
        "epsilon": meta.get("epsilon"), "epsilon_tight": meta.get("epsilon_tight"), "delta": meta.get("delta"),
        "kappa": {}, "bound": {}, "exceeds_bound": {}}
    for criterion, threshold in success.items():
        if truth_pool is None:
            out["kappa"][criterion] = {"value": None, "ci": None, "reason": "no ground-truth images"}
            continue
        try:
            kappa, (lo, hi) = baseline_kappa(truth_pool[0], truth_pool[1], criterion=criterion,
                                             threshold=float(threshold))
        except ValueError as e:
            out["kappa"][criterion] = {"value": None, "ci": None, "reason": str(e).splitlines()[0]}
            continue
        out["kappa"][criterion] = {"value": kappa, "ci": [lo, hi]}
        bound = bound_for_meta(meta, kappa, layers=len(parents))
        if bound["bound"] is not None:
            bound["bound_hi"] = bound_for_meta(meta, hi, layers=len(parents))["bound"]
        out["bound"][criterion] = bound
    return out


def _flag(result: dict[str, Any]) -> None:
    """``privacy.exceeds_bound[c]``: the ASR interval lies wholly above the bound (at kappa's upper end)."""
    real = result["real"]
    for criterion, bound in result["privacy"]["bound"].items():
        asr = real["asr"].get(criterion)
        hi = bound.get("bound_hi")
        result["privacy"]["exceeds_bound"][criterion] = bool(
            asr is not None and hi is not None and asr["ci"][0] > hi)


def _grid(path: str, cap, real_dir: str, null_dir: str | None, *, limit: int = 8) -> bool:
    """``grid.png``: the clients' images, the reconstructions below, the null control's below those."""
    from jaxleak.report.grid import save_image_grid

    truth = cap.images_float()
    recon_path = os.path.join(real_dir, "reconstructions.npz")
    if truth is None or not os.path.exists(recon_path):
        return False
    shape = cap.image_shape

    def flat(x):
        return np.asarray(x, np.float32).reshape(-1, *shape)[:limit]

    rows, labels = [flat(truth)], ["original"]
    with np.load(recon_path) as z:
        rows.append(flat(z["images"]))
        labels.append("attack")
    if null_dir and os.path.exists(os.path.join(null_dir, "reconstructions.npz")):
        with np.load(os.path.join(null_dir, "reconstructions.npz")) as z:
            rows.append(flat(z["images"]))
            labels.append("null control")
    save_image_grid(path, rows, row_labels=labels)
    return True


# --------------------------------------------------------------------------- one cell


def run_cell(out_dir: str, cell: Cell, *, data_dir: str | None = None, weights_dir: str | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Runs one cell from scratch (its capture reused when done) and returns its ``result.json``."""
    from jaxleak.audit.run import run_attack
    from jaxleak.capture import load_capture

    folder = os.path.join(out_dir, "cells", cell.key)
    _fresh(folder)
    d = cell.description
    _write_json(os.path.join(folder, "cell.json"),
                {"key": cell.key, "index": cell.index, "capture_key": cell.capture_key, **d})
    _write_json(os.path.join(folder, LOCK), {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()})
    t0 = time.perf_counter()
    cap_path = ensure_capture(out_dir, cell, data_dir=data_dir, progress=progress)
    cap = load_capture(cap_path)
    a = d["attack"]
    kwargs = dict(overrides=a["config"], artifact=a["artifact"], seed=d["seed"], progress=progress,
                  options=a["options"], weights_dir=weights_dir)
    real_dir = os.path.join(folder, "real")
    real = run_attack(a["name"], cap, out_dir=real_dir, **kwargs)
    null_dir = None
    if d["null"] != "none" and cap.n >= 2 or d["null"] == "noise":
        null_dir = os.path.join(folder, "null")
        run_attack(a["name"], cap, out_dir=null_dir, null=d["null"], **kwargs)
    success = d["success"]
    result: dict[str, Any] = {"key": cell.key, "index": cell.index, "capture_key": cell.capture_key, "cell": d}
    with open(os.path.join(real_dir, "metrics.json"), encoding="utf-8") as f:
        result["real"] = {**score(json.load(f), success), "cost": real["cost"]}
    result["null"] = None
    if null_dir:
        with open(os.path.join(null_dir, "metrics.json"), encoding="utf-8") as f:
            result["null"] = {"kind": d["null"], **score(json.load(f), success)}
    truth = cap.images_float()
    pool = None
    if truth is not None:
        public = _public_pool(d["dataset"], data_dir)
        pool = public_pool_without(truth.reshape(-1, *cap.image_shape), np.asarray(public.images, np.float32))
    result["privacy"] = privacy(cap, pool, success)
    _flag(result)
    files = {"real": "real/metrics.json"}
    if null_dir:
        files["null"] = "null/metrics.json"
    if _grid(os.path.join(folder, "grid.png"), cap, real_dir, null_dir):
        files["grid"] = "grid.png"
    result["files"] = files
    result["seconds"] = time.perf_counter() - t0
    _write_json(os.path.join(folder, "result.json"), result)
    _mark_done(folder)
    os.remove(os.path.join(folder, LOCK))
    return result


def _record_failure(folder: str, error: BaseException) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    line = f"{type(error).__name__}: {line}"
    with open(os.path.join(folder, "error.log"), "w", encoding="utf-8") as f:
        f.write("".join(traceback.format_exception(error)))
    with open(os.path.join(folder, ERROR), "w", encoding="utf-8") as f:
        f.write(line + "\n")
    lock = os.path.join(folder, LOCK)
    if os.path.exists(lock):
        os.remove(lock)
    return line


def one_line(result: Mapping[str, Any]) -> str:
    """The one-line summary printed when a cell finishes."""
    d = result["cell"]
    real, null = result["real"], result["null"]
    parts = [f"{d['dataset']['name']} {d['victim']['label']} {d['protocol']['label']} [{d['defense']}] "
             f"{d['attack']['label']} seed {d['seed']}:"]
    for name, fmt in (("psnr", "PSNR {:.1f}"), ("ssim", "SSIM {:.3f}"), ("feature_cosine", "cos {:.3f}")):
        mean = (real["metrics"].get(name) or {}).get("mean")
        if mean is not None:
            parts.append(fmt.format(mean))
    for criterion, asr in real["asr"].items():
        text = f"ASR[{criterion}>{asr['threshold']:g}] {asr['rate']:.2f}"
        if null and criterion in null["asr"]:
            text += f" (null {null['asr'][criterion]['rate']:.2f})"
        bound = result["privacy"]["bound"].get(criterion, {}).get("bound")
        text += f" bound {bound:.2f}" if bound is not None else " no bound"
        if result["privacy"]["exceeds_bound"].get(criterion):
            text += " EXCEEDS BOUND"
        parts.append(text)
    parts.append(f"({result['seconds']:.1f} s)")
    return " ".join(parts)


# --------------------------------------------------------------------------- the run


def write_audit_json(out_dir: str, spec: Mapping[str, Any], cells: Sequence[Cell], argv=None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "audit.json"),
                {**spec, "cells": [c.key for c in cells], "provenance": provenance(argv)})


def run_audit(spec: Mapping[str, Any], out_dir: str, *, shard_of: tuple[int, int] = (0, 1),
              data_dir: str | None = None, weights_dir: str | None = None, progress: bool = True,
              say: Callable[[str], None] = print, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs every cell of ``spec`` in ``shard_of = (i, n)`` that is not done yet.

    Failed cells record their error (``ERROR``, ``error.log``) and the run goes on; cells that
    another live process holds (its ``LOCK``) are skipped.

    Returns:
      ``{"cells": total in the shard, "done_before", "ran", "failed": [(key, line)]}``, plus
      ``"skipped": [key]`` when cells were held elsewhere.
    """
    cells = expand(spec)
    write_audit_json(out_dir, spec, cells, argv)
    mine = shard(cells, *shard_of)
    todo = [c for c in mine if not is_done(os.path.join(out_dir, "cells", c.key))]
    summary = {"cells": len(mine), "done_before": len(mine) - len(todo), "ran": 0, "failed": []}
    say(f"audit {spec['name']}: {len(cells)} cells, shard {shard_of[0]}/{shard_of[1]} holds {len(mine)}, "
        f"{summary['done_before']} done before, {len(todo)} to run -> {out_dir}")
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="cells", unit="cell", file=sys.stderr, dynamic_ncols=True)
    for i, cell in enumerate(todo):
        state, detail = cell_status(os.path.join(out_dir, "cells", cell.key))
        if state == "running":  # another process holds it (a second run of the same shard)
            summary.setdefault("skipped", []).append(cell.key)
            say(f"[{i + 1}/{len(todo)}] skipped {cell.key}: running elsewhere ({detail})")
            if bar is not None:
                bar.update(1)
            continue
        try:
            result = run_cell(out_dir, cell, data_dir=data_dir, weights_dir=weights_dir, progress=progress)
        except Exception as e:  # noqa: BLE001 - a failed cell is recorded and the grid goes on
            line = _record_failure(os.path.join(out_dir, "cells", cell.key), e)
            summary["failed"].append((cell.key, line))
            say(f"[{i + 1}/{len(todo)}] FAILED {cell.key}: {line}")
        else:
            summary["ran"] += 1
            say(f"[{i + 1}/{len(todo)}] {one_line(result)}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return summary


# --------------------------------------------------------------------------- status


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cell_status(folder: str) -> tuple[str, str]:
    """``(state, detail)``: ``done``, ``failed`` (the error line), ``running``, ``stale`` or ``missing``."""
    if is_done(folder):
        return "done", ""
    if os.path.exists(os.path.join(folder, ERROR)):
        with open(os.path.join(folder, ERROR), encoding="utf-8") as f:
            return "failed", f.read().strip()
    lock = os.path.join(folder, LOCK)
    if os.path.exists(lock):
        try:
            with open(lock, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, ValueError):
            return "stale", "unreadable lock"
        started = datetime.datetime.fromisoformat(info["started"])
        age = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
        detail = f"pid {info['pid']} on {info['host']}, started {info['started']}"
        if info["host"] == socket.gethostname():
            return ("running" if _pid_alive(int(info["pid"])) else "stale"), detail
        return ("running" if age < STALE_AFTER else "stale"), detail
    return "missing", ""


def audit_status(out_dir: str) -> dict[str, Any]:
    """Every cell of the audit in ``out_dir`` with its state (from ``audit.json``'s cell list).

    Raises:
      FileNotFoundError: ``out_dir`` holds no ``audit.json``.
    """
    path = os.path.join(out_dir, "audit.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{out_dir} holds no audit.json (not an audit folder; run `jaxleak audit run` "
                                f"first)")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    cells = [(key, *cell_status(os.path.join(out_dir, "cells", key))) for key in spec["cells"]]
    counts = {s: sum(1 for _, state, _ in cells if state == s) for s in ("done", "failed", "running", "stale",
                                                                          "missing")}
    return {"name": spec.get("name"), "cells": cells, "counts": counts}
