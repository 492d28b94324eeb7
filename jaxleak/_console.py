"""What the command line prints for people: capture descriptions, result tables, image grids.

Small functions from plain values (a capture, ``metrics.json``, a training summary) to
text; :mod:`jaxleak.cli` prints the text and, with ``--json``, the dicts instead.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_KAPPA = 0.01
"""Baseline success probability for ``jaxleak inspect``'s bound: an attacker who guesses
without the update succeeds this often. The audit estimates it from public images instead
(:func:`jaxleak.privacy.baseline_kappa`)."""

PSNR_CAP_DB = 100.0
"""An exact reconstruction's PSNR is +inf; means and intervals count it as this many dB."""

GRID_IMAGES = 8
"""Images shown in an attack's ``grid.png`` (the first ones, client-major)."""

_WIDTH = 100  # wrap long lines (dataset sources, bound reasons) at this many characters
_LABEL = 10  # the label column of the key-value layouts

_METRIC_NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "mse": "MSE", "lpips_alex": "LPIPS (alex)",
                 "lpips_vgg": "LPIPS (vgg)", "lpips_squeeze": "LPIPS (squeeze)", "fmse": "FMSE",
                 "tv": "TV", "tv_truth": "TV (truth)", "label_accuracy": "label accuracy"}


# --------------------------------------------------------------------------- numbers


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float as ``None`` (strict JSON, as in ``metrics.json``).

    >>> json_ready({"mu": float("inf"), "bound": [1.0, float("nan")]})
    {'mu': None, 'bound': [1.0, None]}
    """
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def fmt(value: Any) -> str:
    """A value as people read it: 4 significant digits, ``-`` for ``None``, lists space-separated.

    >>> fmt(0.000968961), fmt(10.0), fmt(None), fmt([16, 8]), fmt(True)
    ('0.000969', '10', '-', '16 8', 'yes')
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    if isinstance(value, list | tuple):
        return " ".join(fmt(v) for v in value) or "-"
    return str(value)


def mean_ci(values: Sequence[float], *, z: float = 1.96) -> dict[str, Any]:
    """The mean and its normal 95% interval ``mean +- z s / sqrt(n)`` over the finite values.

    Args:
      values: per-image numbers; NaN and infinities are left out (cap them first to keep them).
      z: the normal quantile (1.96: 95%).

    Returns:
      ``{"mean", "lo", "hi", "n"}``; ``None`` for the numbers when no value is finite; the
      interval collapses to the mean for a single value.

    >>> out = mean_ci([10.0, 12.0, 14.0])
    >>> out["mean"], round(out["lo"], 3), round(out["hi"], 3), out["n"]
    (12.0, 9.737, 14.263, 3)
    """
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(x.mean())
    half = z * float(x.std(ddof=1)) / math.sqrt(x.size) if x.size > 1 else 0.0
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(x.size)}


def clopper_pearson(successes: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a success rate.

    >>> [round(v, 3) for v in clopper_pearson(2, 8)]
    [0.032, 0.651]
    """
    from scipy.stats import beta

    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    alpha = 1.0 - confidence
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return lo, hi


def metric_values(name: str, entry: Mapping[str, Any]) -> list[float]:
    """Per-image values of one ``metrics.json`` metric, as numbers.

    ``metrics.json`` is strict JSON: a non-finite value is ``null`` and ``n_inf`` / ``n_nan``
    count them. When every ``null`` of a PSNR is an infinity (an exact reconstruction) it
    counts as :data:`PSNR_CAP_DB`; any other ``null`` is NaN.

    >>> metric_values("psnr", {"values": [20.0, None], "n_inf": 1, "n_nan": 0})
    [20.0, 100.0]
    >>> metric_values("ssim", {"values": [0.5, None], "n_inf": 0, "n_nan": 1})
    [0.5, nan]
    """
    exact = name == "psnr" and not entry.get("n_nan") and entry.get("n_inf")
    fill = PSNR_CAP_DB if exact else math.nan
    return [fill if v is None else float(v) for v in entry.get("values") or []]


# --------------------------------------------------------------------------- attack results


def metric_rows(metrics: Mapping[str, Any], *, asr_tau: float = 0.5) -> list[dict[str, Any]]:
    """One table row per metric of ``metrics.json["metrics"]``: mean, 95% interval, n.

    The attack success rate (SSIM > ``asr_tau``) gets its exact binomial interval.

    >>> rows = metric_rows({"psnr": {"values": [10.0, 14.0]}, "ssim": {"values": [0.2, 0.9]},
    ...                     "asr@0.5": 0.5})
    >>> [(r["metric"], r["mean"], r["n"]) for r in rows]
    [('PSNR (dB)', 12.0, 2), ('SSIM', 0.55, 2), ('ASR (SSIM > 0.5)', 0.5, 2)]
    """
    rows = []
    for name, entry in metrics.items():
        if not isinstance(entry, Mapping) or "values" not in entry:
            continue  # "asr@0.5" is a rate, shown below from the SSIM values
        stats = mean_ci(metric_values(name, entry))
        rows.append({"metric": _METRIC_NAMES.get(name, name), "key": name, "mean": stats["mean"],
                     "95% CI": _interval(stats["lo"], stats["hi"]), "n": stats["n"]})
    ssim = metrics.get("ssim")
    if isinstance(ssim, Mapping):
        values = [v for v in metric_values("ssim", ssim) if not math.isnan(v)]
        if values:
            hits = sum(v > asr_tau for v in values)
            rows.append({"metric": f"ASR (SSIM > {asr_tau:g})", "key": f"asr@{asr_tau:g}",
                         "mean": hits / len(values), "95% CI": _interval(*clopper_pearson(hits, len(values))),
                         "n": len(values)})
    return rows


def _interval(lo: float | None, hi: float | None) -> str | None:
    return None if lo is None else f"[{lo:.4g}, {hi:.4g}]"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def format_cost(cost: Mapping[str, Any] | None) -> str:
    """``metrics.json``'s ``cost`` block as one line.

    >>> format_cost({"attack_seconds": 3.21, "flops_per_iteration": 2.5e6, "flops_lower_bound": True,
    ...              "peak_rss_bytes": 900 * 2**20, "peak_device_bytes": None})
    'cost: 3.21 s, 2.5e+06 FLOPs/iteration (a lower bound), peak RSS 900 MiB'
    """
    cost = cost or {}
    parts = [f"{fmt(cost.get('attack_seconds'))} s"]
    flops = cost.get("flops_per_iteration")
    if flops is not None:
        bound = " (a lower bound)" if cost.get("flops_lower_bound") else ""
        parts.append(f"{flops:.3g} FLOPs/iteration{bound}")
    else:
        parts.append("FLOPs/iteration: - (no iteration driver)")
    parts.append(f"peak RSS {_bytes(cost.get('peak_rss_bytes'))}")
    if cost.get("peak_device_bytes") is not None:
        parts.append(f"peak device memory {_bytes(cost['peak_device_bytes'])}")
    return "cost: " + ", ".join(parts)


def format_attack_result(doc: Mapping[str, Any], *, capture: str, written: Sequence[str],
                         grid_note: str | None = None) -> str:
    """The human end of ``jaxleak attack``: which run, a metric table, the cost, the files.

    Args:
      doc: the run's ``metrics.json``.
      capture: the capture file attacked (named in the first line).
      written: paths of the files written.
      grid_note: why no ``grid.png`` was written, if none was.

    >>> doc = {"attack": "ig", "n": 2, "null_control": None, "metrics": {"psnr": {"values": [10.0, 14.0]}},
    ...        "cost": {"attack_seconds": 1.0}}
    >>> print(format_attack_result(doc, capture="caps.npz", written=["out/metrics.json"]))
    ig on caps.npz: 2 image(s), the real updates (no null control)
    metric     mean  95% CI         n
    ---------  ----  -------------  -
    PSNR (dB)    12  [8.08, 15.92]  2
    cost: 1 s, FLOPs/iteration: - (no iteration driver), peak RSS -
    wrote out/metrics.json
    """
    null = doc.get("null_control")
    run = ("the real updates (no null control)" if null is None else
           f"NULL CONTROL ({null}): updates that carry nothing about the images, the floor leakage is "
           f"measured against")
    lines = [f"{doc.get('attack')} on {capture}: {doc.get('n')} image(s), {run}"]
    rows = metric_rows(doc.get("metrics") or {})
    if rows:
        from jaxleak.report.summary import format_table

        lines.append(format_table(rows, ["metric", "mean", "95% CI", "n"]))
    else:
        lines.append("no metrics (the capture holds no true images)")
    lines.append(format_cost(doc.get("cost")))
    if doc.get("note"):
        lines.append(textwrap.fill(f"note: {doc['note']}", _WIDTH, subsequent_indent="  "))
    if grid_note:
        lines.append(f"no grid.png: {grid_note}")
    lines.append("wrote " + ", ".join(written))
    return "\n".join(lines)


def grid_rows(truth: np.ndarray, recon: np.ndarray, psnr: Mapping[str, Any] | None, *,
              limit: int = GRID_IMAGES) -> tuple[list[np.ndarray], list[list[str] | None]]:
    """The rows and captions of an attack's ``grid.png``: originals above reconstructions.

    Args:
      truth: float ``[N, M, H, W, C]`` (or ``[N, H, W, C]``) in [0, 1].
      recon: the reconstructions in the same order (after matching), same shape.
      psnr: ``metrics.json``'s ``psnr`` entry (client-major, ``N * M`` values) or ``None``.
      limit: the first ``limit`` images are shown.

    Returns:
      ``(rows, captions)`` for :func:`jaxleak.report.save_image_grid`: the reconstructions'
      PSNR under each (``exact`` for +inf).

    >>> x = np.zeros((3, 1, 4, 4, 1))
    >>> rows, captions = grid_rows(x, x, {"values": [12.345, None, 7.0], "n_inf": 1}, limit=2)
    >>> [r.shape for r in rows], captions
    ([(2, 4, 4, 1), (2, 4, 4, 1)], [None, ['12.3 dB', 'exact']])
    """
    shape = truth.shape[-3:]
    truth = np.asarray(truth).reshape(-1, *shape)[:limit]
    recon = np.asarray(recon).reshape(-1, *shape)[:limit]
    if truth.shape != recon.shape:
        raise ValueError(f"reconstructions {recon.shape} do not match the originals {truth.shape}")
    captions = None
    if psnr is not None:
        values = metric_values("psnr", psnr)[:limit]
        captions = ["exact" if v >= PSNR_CAP_DB else "n/a" if math.isnan(v) else f"{v:.1f} dB" for v in values]
    return [truth, recon], [None, captions]


# --------------------------------------------------------------------------- captures


def _layer_count(cap) -> int | None:
    """Separately clipped layers (innermost dicts of arrays) the stored release depends on."""
    if cap.meta.get("update_scope") == "all":
        keys = list(cap.update)
    elif cap.params:
        keys = [k.split("/", 1)[1] for k in cap.params if k.startswith("params/")]
    else:
        return None
    return len({k.rsplit("/", 1)[0] for k in keys if "/" in k}) or None


def capture_arrays(cap) -> list[dict[str, Any]]:
    """The arrays a capture holds, as stored: key, shape, dtype, megabytes in memory."""
    arrays = {f"update/{k}": v for k, v in cap.update.items()}
    arrays.update(cap.params or {})
    for key, value in (("truth/images", cap.truth_images), ("truth/labels", cap.truth_labels),
                       ("truth/schedule", cap.schedule)):
        if value is not None:
            arrays[key] = value
    return [{"key": key, "shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype),
             "mb": np.asarray(v).nbytes / 1e6} for key, v in sorted(arrays.items())]


def capture_bound(cap, kappa: float) -> dict[str, Any]:
    """:func:`jaxleak.privacy.bound_for_meta` for a capture, with ``kappa`` added.

    A meta the bound cannot read gives ``bound = None`` and the reason, never an error.
    """
    from jaxleak.privacy import bound_for_meta

    try:
        out = bound_for_meta(cap.meta, kappa, layers=_layer_count(cap))
    except (ValueError, KeyError, TypeError) as e:
        out = {"bound": None, "mu": None, "method": None, "reason": f"cannot read the defenses: {e}"}
    return {"kappa": kappa, **out}


def describe_capture(cap, *, path: str, kappa: float = DEFAULT_KAPPA) -> dict[str, Any]:
    """Everything ``jaxleak inspect`` shows about a capture, JSON-ready.

    Args:
      cap: a loaded :class:`jaxleak.capture.Capture`.
      path: the file it came from.
      kappa: the baseline success probability of the reconstruction bound.

    Returns:
      ``{"path", "file_mb", "format_version", "jaxleak_version", "clients", "samples",
      "image_shape", "num_classes", "dataset", "victim", "protocol", "defenses", "dp", "bound",
      "arrays", "total_mb"}``.

    >>> from jaxleak.capture.io import _example_capture
    >>> d = describe_capture(_example_capture(), path="x.npz")
    >>> d["clients"], d["samples"], [a["key"] for a in d["arrays"]][:2], d["bound"]["kappa"]
    (2, 1, ['truth/images', 'truth/labels'], 0.01)
    """
    meta = cap.meta
    dp = meta.get("dp")
    arrays = capture_arrays(cap)
    return {
        "path": path,
        "file_mb": os.path.getsize(path) / 1e6 if os.path.isfile(path) else None,
        "format_version": meta.get("format_version"),
        "jaxleak_version": meta.get("jaxleak_version"),
        "clients": cap.n,
        "samples": cap.samples,
        "image_shape": list(cap.image_shape),
        "num_classes": meta.get("num_classes"),
        "dataset": {"name": meta.get("dataset"), "split": meta.get("dataset_split"),
                    "source": meta.get("dataset_source"), "seed": meta.get("data_seed")},
        "victim": {"model": meta.get("model"), "options": meta.get("model_options") or {},
                   "init_seed": meta.get("init_seed"), "checkpoint": meta.get("checkpoint"),
                   "layer": meta.get("layer"), "layer_path": meta.get("layer_path"),
                   "feature_shape": meta.get("feature_shape"), "update_scope": meta.get("update_scope"),
                   "params_stored": bool(cap.params)},
        "protocol": dict(meta.get("protocol") or {}),
        "defenses": [dict(d) for d in meta.get("defenses") or []],
        "dp": None if not dp else {
            "calibration": dp.get("calibration"), "mechanism": dp.get("mechanism"),
            "epsilon": dp.get("epsilon"), "epsilon_tight": dp.get("epsilon_tight"),
            "delta": dp.get("delta"), "noise_std": dp.get("noise_std"), "clip": dp.get("clip"),
            "noise_multiplier": dp.get("noise_multiplier"), "accountant": dp.get("accountant"),
            "steps": dp.get("steps"), "sampling_rate": dp.get("sampling_rate")},
        "bound": capture_bound(cap, kappa),
        "arrays": arrays,
        "total_mb": sum(a["mb"] for a in arrays),
    }


def _field(label: str, text: str) -> list[str]:
    """``label`` then ``text`` wrapped to the page, continuation lines under the text."""
    indent = " " * (_LABEL + 2)
    return textwrap.wrap(text, _WIDTH, initial_indent=f"{label:<{_LABEL}}  ", subsequent_indent=indent,
                         break_on_hyphens=False) or [label]


def _size(mb: float) -> str:
    nbytes = mb * 1e6
    return f"{nbytes:.0f} B" if nbytes < 1e3 else f"{nbytes / 1e3:.1f} kB" if nbytes < 1e6 else f"{mb:.1f} MB"


def _defense_text(d: Mapping[str, Any]) -> str:
    # Copies: noise_variance is noise_std squared; noise_scale (DP Gaussian) and std (the gaussian item)
    # say noise_std again.
    same = {"name", "stage", "noise_variance"}
    same |= {"noise_scale"} if d.get("noise_scale") == d.get("noise_std") else set()
    same |= {"noise_std"} if d.get("std") is not None and d.get("std") == d.get("noise_std") else set()
    params = ", ".join(f"{k}={fmt(v)}" for k, v in d.items() if k not in same and v is not None)
    return f"{d.get('name')} [{d.get('stage', '?')}]" + (f": {params}" if params else "")


def _protocol_text(p: Mapping[str, Any]) -> str:
    epoch = p.get("global_epoch")
    when = f"; weights of global epoch {fmt(epoch)}" if epoch is not None else "; global epoch not recorded"
    if p.get("kind") == "fedsgd":
        return f"fedsgd: one gradient on the client's M = {fmt(p.get('samples'))} image(s){when}"
    return (f"fedavg: E = {fmt(p.get('local_epochs'))} epoch(s) x S = {fmt(p.get('local_steps'))} step(s) of "
            f"B = {fmt(p.get('local_batch'))}, {p.get('optimizer')} lr {fmt(p.get('lr'))}{when}")


def format_capture(d: Mapping[str, Any]) -> str:
    """:func:`describe_capture`'s dict as the text ``jaxleak inspect`` prints.

    >>> from jaxleak.capture.io import _example_capture
    >>> text = format_capture(describe_capture(_example_capture(), path="x.npz"))
    >>> print(text.splitlines()[1])
    clients     N = 2 clients x M = 1 image(s), images 2x2x1, 3 classes
    """
    lines = [f"{d['path']}: capture format version {fmt(d['format_version'])}, written by jaxleak "
             f"{d['jaxleak_version'] or '?'}" + (f", {d['file_mb']:.3g} MB on disk" if d.get("file_mb") else "")]
    lines += _field("clients", f"N = {d['clients']} clients x M = {d['samples']} image(s), images "
                               f"{'x'.join(map(str, d['image_shape']))}, {fmt(d['num_classes'])} classes")
    ds = d["dataset"]
    lines += _field("dataset", f"{ds['name']}, split {fmt(ds['split'])}"
                               + (f" (source: {ds['source']})" if ds.get("source") else ""))
    v = d["victim"]
    options = ", ".join(f"{k}={fmt(x)}" for k, x in v["options"].items()) or "default options"
    weights = (f"checkpoint {v['checkpoint']}" if v.get("checkpoint") else
               f"init seed {v['init_seed']}" if v.get("init_seed") is not None else "weights not recorded")
    stored = "weights stored" if v.get("params_stored") else "weights not stored"
    scope = "every layer" if v.get("update_scope") == "all" else "the attacked layer only"
    lines += _field("victim", f"{v['model']} ({options}), {weights} ({stored}); attacked layer {v['layer']}, "
                              f"input {'x'.join(map(str, v['feature_shape'] or []))}; update holds {scope}")
    lines += _field("protocol", _protocol_text(d["protocol"]))
    defenses = d["defenses"]
    if not defenses:
        lines += _field("defenses", "none: the update is released as is")
    for i, item in enumerate(defenses):
        lines += _field("defenses" if i == 0 else "", f"{i + 1}. {_defense_text(item)}")
    dp = d["dp"]
    if dp is None:
        lines += _field("DP", "none (no DP defense in the chain)")
    else:
        tight = dp.get("epsilon_tight")
        lines += _field("DP", f"{dp['calibration']} calibration, {dp['mechanism']}: epsilon {fmt(dp['epsilon'])} "
                              f"nominal, {fmt(tight)} tight, delta {fmt(dp['delta'])}, noise std "
                              f"{fmt(dp['noise_std'])}, clip {fmt(dp['clip'])}")
    b = d["bound"]
    if b["bound"] is None:
        lines += _field("bound", f"no bound ({b['reason']})")
    else:
        mu = "" if b.get("mu") is None else f"mu = {fmt(b['mu'])}, "
        lines += _field("bound", f"P[reconstruction succeeds] <= {b['bound']:.4g} at baseline kappa = "
                                 f"{b['kappa']:g} ({mu}{b['method']}; --kappa to change)")
        lines += _field("", f"why: {b['reason']}")
    width = max(len(a["key"]) for a in d["arrays"])
    for i, a in enumerate(d["arrays"]):
        shape = "[" + ", ".join(map(str, a["shape"])) + "]"
        lines.append(f"{'arrays' if i == 0 else '':<{_LABEL}}  {a['key']:<{width}}  {a['dtype']:<7}  "
                     f"{shape:<18}  {_size(a['mb']):>8}")
    lines.append(f"{'':<{_LABEL}}  total {d['total_mb']:.3g} MB in memory")
    return "\n".join(lines)


# --------------------------------------------------------------------------- training summaries


def format_fields(title: str, fields: Sequence[tuple[str, Any]]) -> str:
    """A title line and aligned ``name  value`` lines (rows whose value is ``None`` are left out).

    >>> print(format_fields("train venom: done",
    ...                     [("steps", 2), ("final loss", 0.12345), ("eval PSNR", None)]))
    train venom: done
      steps       2
      final loss  0.1235
    """
    shown = [(name, value) for name, value in fields if value is not None]
    width = max((len(name) for name, _ in shown), default=0)
    return "\n".join([title, *(f"  {name:<{width}}  {fmt(value)}" for name, value in shown)])
