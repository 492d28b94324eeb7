"""The audit report: one audit folder -> an HTML page, a Markdown summary and a JSON record.

Reads what ``jaxleak audit run`` wrote (``docs/audit.md``: ``audit.json`` at the top, one folder
per cell under ``cells/``) and writes ``report/report.html`` (self-contained: images and plots as
base64 data URIs, no external CSS or JS), ``report/report.md``, ``report/report.json`` and the
plots as ``report/plots/*.png``. A partly finished grid is reported as it stands: unfinished cells
are listed with their status and error line.

Cells that share everything but the seed are one overview row: metric means are averaged over the
seeds (the seeds attack different images, so the interval's half-width is
``sqrt(sum h_s^2) / S``), ASR counts are pooled (Clopper-Pearson on the pooled counts), ``kappa``
and the bound are averaged with the envelope of their upper ends kept.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["REPORT_FORMATS", "write_report"]

REPORT_FORMATS = ("html", "md", "json")
"""The formats :func:`write_report` can write."""

_FILES = {"html": "report.html", "md": "report.md", "json": "report.json"}
# Every plot name this module can write; stale ones from an earlier report are removed.
_PLOT_NAMES = (
    "asr_vs_epsilon", "asr_vs_noise_std", "asr_vs_mu", "psnr_vs_epsilon", "psnr_vs_noise_std",
    "quality_vs_global_epoch", "quality_vs_client_batch",
)
_ERROR_LOG_TAIL = 20


# ----------------------------------------------------------------------------
# Reading the folder.
# ----------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _first_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[0].strip() if lines else ""


def _lock_state(folder: Path) -> tuple[str, dict[str, Any]]:
    """``running`` or ``stale`` for a cell holding a LOCK, by the runner's own rule (``audit status``)."""
    from jaxleak.audit.runner import cell_status

    try:
        info = _read_json(folder / "LOCK")
        info = info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        info = {}
    try:
        state, _ = cell_status(str(folder))
    except (KeyError, TypeError, ValueError):  # a LOCK the runner cannot date: nobody can be running it
        state = "stale"
    return (state if state in ("running", "stale") else "stale"), info


def _load_cell(folder: Path) -> dict[str, Any]:
    """One cell folder -> ``{key, status, index, cell, result, error, error_log, lock}``."""
    record: dict[str, Any] = {"key": folder.name, "dir": folder, "index": None, "cell": None,
                              "result": None, "error": None, "error_log": None, "lock": None}
    description = folder / "cell.json"
    if description.is_file():
        try:
            meta = _read_json(description)
            if isinstance(meta, dict):
                record["index"] = meta.get("index")
                record["cell"] = {k: v for k, v in meta.items() if k not in ("key", "index")}
        except (OSError, ValueError):
            pass
    if (folder / "DONE").exists():
        try:
            result = _read_json(folder / "result.json")
        except (OSError, ValueError) as e:
            result = f"DONE but result.json unreadable: {e}"
        if not isinstance(result, dict):
            record["status"] = "failed"
            record["error"] = result if isinstance(result, str) else "DONE but result.json is not an object"
            return record
        record.update(status="done", result=result, cell=result.get("cell", record["cell"]),
                      index=result.get("index", record["index"]))
        return record
    if (folder / "ERROR").exists():
        record["status"] = "failed"
        record["error"] = _first_line(folder / "ERROR") or "(ERROR is empty)"
        log = folder / "error.log"
        if log.is_file():
            tail = log.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()
            record["error_log"] = "\n".join(tail[-_ERROR_LOG_TAIL:])
        return record
    if (folder / "LOCK").exists():
        record["status"], record["lock"] = _lock_state(folder)
        return record
    record["status"] = "missing"
    record["note"] = ("interrupted: no DONE, ERROR or LOCK (redone on the next run)" if folder.is_dir()
                      else "not started")
    return record


def _load_audit(audit_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = audit_dir / "audit.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an audit folder (`jaxleak audit run` writes it)")
    try:
        audit = _read_json(path)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(audit, dict):
        # ValueError: the CLI reports it as one line, like every other malformed input.
        raise ValueError(f"{path} must hold a JSON object, got {type(audit).__name__}")  # noqa: TRY004
    cells_dir = audit_dir / "cells"
    keys = audit.get("cells")
    if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
        # The runner lists the grid's cells in run order: cells without a folder are missing.
        cells = [_load_cell(cells_dir / key) for key in keys]
        for i, c in enumerate(cells):
            if c["index"] is None:
                c["index"] = i
    else:
        folders = sorted(p for p in cells_dir.iterdir() if p.is_dir()) if cells_dir.is_dir() else []
        cells = [_load_cell(folder) for folder in folders]
    cells.sort(key=lambda c: (c["index"] if isinstance(c["index"], int) else math.inf, c["key"]))
    return audit, cells


# ----------------------------------------------------------------------------
# Cells -> rows: labels, the seed aggregation, flags.
# ----------------------------------------------------------------------------


def _dataset_label(d: Any) -> str:
    if not isinstance(d, Mapping):
        return str(d) if d is not None else "-"
    return str(d.get("label") or d.get("name") or d.get("dataset") or "-")


def _victim_label(v: Any) -> str:
    if not isinstance(v, Mapping):
        return str(v) if v is not None else "-"
    if v.get("label"):
        return str(v["label"])
    text = str(v.get("model", "-"))
    if v.get("layer"):
        text += f"/{v['layer']}"
    if v.get("checkpoint"):
        text += f" @{Path(str(v['checkpoint'])).name}"
    return text


def _protocol_label(p: Any) -> str:
    if not isinstance(p, Mapping):
        return str(p) if p is not None else "-"
    if p.get("label"):
        return str(p["label"])
    kind = str(p.get("kind", "-"))
    if kind != "fedavg":
        return kind
    parts = [f"E={p.get('local_epochs')}", f"B={p.get('local_batch')}", str(p.get("optimizer", ""))]
    if p.get("lr") is not None:
        parts.append(f"lr={p['lr']:g}")
    return f"fedavg {' '.join(x for x in parts if x)}"


def _attack_label(a: Any) -> str:
    if isinstance(a, Mapping):
        return str(a.get("label") or a.get("name") or "-")
    return str(a) if a is not None else "-"


def _defense_family(cell: Mapping[str, Any], privacy: Mapping[str, Any] | None) -> str:
    """The chain's defense names without their parameters: one plot series per family."""
    metas = (privacy or {}).get("defenses")
    if isinstance(metas, list) and metas:
        return "+".join(str(m.get("name", "?")) for m in metas if isinstance(m, Mapping))
    text = str(cell.get("defense") or "none")
    # "dp-paper:eps=10,delta=1e-5": parameters are the comma items holding "=" before any ":".
    names = [item.split(":")[0] for item in text.split(",") if "=" not in item.split(":")[0]]
    return "+".join(n.strip() for n in names if n.strip()) or "none"


def _global_epoch(cell: Mapping[str, Any]) -> Any:
    for part in ("protocol", "victim"):
        d = cell.get(part)
        if isinstance(d, Mapping) and d.get("global_epoch") is not None:
            return d["global_epoch"]
    return None


def _identity(cell: Mapping[str, Any]) -> dict[str, Any]:
    dataset = cell.get("dataset") if isinstance(cell.get("dataset"), Mapping) else {}
    return {
        "dataset": _dataset_label(cell.get("dataset")),
        "victim": _victim_label(cell.get("victim")),
        "protocol": _protocol_label(cell.get("protocol")),
        "defense": str(cell.get("defense") or "none"),
        "attack": _attack_label(cell.get("attack")),
        "images_per_client": dataset.get("images_per_client"),
        "global_epoch": _global_epoch(cell),
    }


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def _clopper_pearson(successes: int, n: int) -> list[float]:
    from scipy.stats import beta

    lo = 0.0 if successes == 0 else float(beta.ppf(0.025, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(beta.ppf(0.975, successes + 1, n - successes))
    return [lo, hi]


def _mean_ci(entries: Sequence[Any]) -> dict[str, Any] | None:
    """Mean over seeds of per-seed ``{"mean", "ci"}``; half-width ``sqrt(sum h^2) / S``."""
    entries = [e for e in entries if isinstance(e, Mapping) and _finite(e.get("mean")) is not None]
    if not entries:
        return None
    if len(entries) == 1:
        return {"mean": float(entries[0]["mean"]), "ci": entries[0].get("ci")}
    mean = float(np.mean([e["mean"] for e in entries]))
    halves = []
    for e in entries:
        ci = e.get("ci")
        if not (isinstance(ci, Sequence) and len(ci) == 2 and all(_finite(x) is not None for x in ci)):
            return {"mean": mean, "ci": None}
        halves.append((ci[1] - ci[0]) / 2.0)
    half = math.sqrt(sum(h * h for h in halves)) / len(entries)
    return {"mean": mean, "ci": [mean - half, mean + half]}


def _pool_asr(entries: Sequence[Any]) -> dict[str, Any] | None:
    entries = [e for e in entries if isinstance(e, Mapping)]
    if not entries:
        return None
    if len(entries) == 1:
        return dict(entries[0])
    try:
        successes = int(sum(e["successes"] for e in entries))
        n = int(sum(e["n"] for e in entries))
    except (KeyError, TypeError):
        return None
    return {"threshold": entries[0].get("threshold"), "rate": successes / n if n else None,
            "successes": successes, "n": n, "ci": _clopper_pearson(successes, n) if n else None}


def _metrics_of(block: Any) -> dict[str, Any]:
    return block.get("metrics") or {} if isinstance(block, Mapping) else {}


def _asr_of(block: Any) -> dict[str, Any]:
    return block.get("asr") or {} if isinstance(block, Mapping) else {}


def _names(blocks: Iterable[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for block in blocks:
        seen.update(dict.fromkeys(block))
    return list(seen)


def _cell_flags(result: Mapping[str, Any]) -> list[str]:
    """Criteria on which the cell's measured success exceeds its bound (docs/audit.md's rule)."""
    privacy = result.get("privacy") or {}
    flagged = {c for c, v in (privacy.get("exceeds_bound") or {}).items() if v is True}
    # The same rule recomputed, so a runner that forgot the flag does not hide an excess.
    for c, a in _asr_of(result.get("real")).items():
        b = (privacy.get("bound") or {}).get(c)
        lo = (a.get("ci") or [None])[0] if isinstance(a, Mapping) else None
        hi = b.get("bound_hi", b.get("bound")) if isinstance(b, Mapping) else None
        if _finite(lo) is not None and _finite(hi) is not None and lo > hi:
            flagged.add(c)
    return sorted(flagged)


def _same_or_mean(values: Sequence[Any]) -> float | None:
    values = [_finite(v) for v in values]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _aggregate_privacy(privacies: Sequence[Mapping[str, Any]], criteria: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        k: _same_or_mean([p.get(k) for p in privacies])
        for k in ("noise_std", "epsilon", "epsilon_tight", "delta")
    }
    kappa, bound = {}, {}
    for c in criteria:
        ks = [(p.get("kappa") or {}).get(c) for p in privacies]
        ks = [k for k in ks if isinstance(k, Mapping) and _finite(k.get("value")) is not None]
        if ks:
            cis = [k.get("ci") for k in ks if isinstance(k.get("ci"), Sequence) and len(k["ci"]) == 2]
            kappa[c] = {"value": float(np.mean([k["value"] for k in ks])),
                        "ci": [min(ci[0] for ci in cis), max(ci[1] for ci in cis)] if cis else None}
        bs = [(p.get("bound") or {}).get(c) for p in privacies]
        bs = [b for b in bs if isinstance(b, Mapping)]
        if not bs:
            continue
        if any(_finite(b.get("bound")) is None for b in bs):
            reason = next((b.get("reason") for b in bs if _finite(b.get("bound")) is None), None)
            bound[c] = {"bound": None, "bound_hi": None, "mu": None, "method": None,
                        "reason": reason or "no bound recorded"}
            continue
        his = [_finite(b.get("bound_hi")) for b in bs]
        bound[c] = {"bound": float(np.mean([b["bound"] for b in bs])),
                    "bound_hi": max(h for h in his if h is not None) if any(h is not None for h in his)
                    else None,
                    "mu": _same_or_mean([b.get("mu") for b in bs]), "method": bs[0].get("method"),
                    "reason": bs[0].get("reason")}
    out["kappa"], out["bound"] = kappa, bound
    return out


def _rows(cells: Sequence[dict[str, Any]], criteria: Sequence[str]) -> list[dict[str, Any]]:
    """Done cells -> overview rows, one per description without its seed."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        if c["status"] != "done":
            continue
        cell = c["result"].get("cell") or {}
        group = json.dumps({k: v for k, v in cell.items() if k != "seed"}, sort_keys=True, default=str)
        groups.setdefault(group, []).append(c)
    rows = []
    for members in groups.values():
        results = [m["result"] for m in members]
        cell = results[0].get("cell") or {}
        reals = [r.get("real") or {} for r in results]
        nulls = [r.get("null") for r in results if isinstance(r.get("null"), Mapping)]
        real_metrics = [_metrics_of(r) for r in reals]
        null_metrics = [_metrics_of(n) for n in nulls]
        crits = list(dict.fromkeys([*criteria, *_names(_asr_of(r) for r in reals)]))
        privacies = [r.get("privacy") or {} for r in results]
        flags = {m["key"]: _cell_flags(r) for m, r in zip(members, results)}
        row = {
            **_identity(cell),
            "keys": [m["key"] for m in members],
            "seeds": [(r.get("cell") or {}).get("seed") for r in results],
            "n": int(sum(r.get("n") or 0 for r in reals)),
            "seconds": sum(x for r in results if (x := _finite(r.get("seconds"))) is not None),
            "defense_family": _defense_family(cell, privacies[0]),
            "metrics": {name: _mean_ci([m.get(name) for m in real_metrics])
                        for name in _names(real_metrics)},
            "asr": {c: _pool_asr([_asr_of(r).get(c) for r in reals]) for c in crits
                    if any(c in _asr_of(r) for r in reals)},
            "null": None if not nulls else {
                "kind": nulls[0].get("kind"),
                "metrics": {name: _mean_ci([m.get(name) for m in null_metrics])
                            for name in _names(null_metrics)},
                "asr": {c: _pool_asr([_asr_of(n).get(c) for n in nulls]) for c in crits
                        if any(c in _asr_of(n) for n in nulls)},
            },
            "privacy": _aggregate_privacy(privacies, crits),
            "flags": {k: v for k, v in flags.items() if v},
        }
        row["flagged"] = bool(row["flags"])
        rows.append(row)
    for i, row in enumerate(rows, start=1):
        row["row"] = i
    return rows


# ----------------------------------------------------------------------------
# Number formatting.
# ----------------------------------------------------------------------------


def _num(x: Any, digits: int = 3) -> str:
    x = _finite(x)
    # "+ 0.0" turns the -0.0 of a tiny negative into 0.0: "0.000", not "-0.000".
    return "-" if x is None else f"{round(x, digits) + 0.0:.{digits}f}"


def _metric_number(metric: str, x: Any) -> str:
    """PSNR with 1 decimal, scores in [0, 1] (SSIM, LPIPS, cosines) with 3, the rest 3 significant digits."""
    if metric.startswith("psnr"):
        return _num(x, 1)
    if metric.startswith(("ssim", "lpips", "feature_cosine", "asr")):
        return _num(x, 3)
    return _sig(x, 3)


def _sig(x: Any, digits: int = 2) -> str:
    """``digits`` significant digits without an exponent for everyday magnitudes."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    x = _finite(x)
    if x is None:
        return "-"
    if x == 0:
        return "0"
    exponent = math.floor(math.log10(abs(x)))
    if not -4 <= exponent < 6:
        return f"{x:.{digits}g}"
    if exponent >= digits:  # "120", not "1.2e+02"
        return f"{round(x, digits - 1 - exponent):.0f}"
    return f"{x:.{digits}g}"


def _mean_ci_text(entry: Any, metric: str) -> str:
    if not isinstance(entry, Mapping) or _finite(entry.get("mean")) is None:
        return "-"
    ci = entry.get("ci")
    text = _metric_number(metric, entry["mean"])
    if isinstance(ci, Sequence) and len(ci) == 2 and all(_finite(v) is not None for v in ci):
        text += f" [{_metric_number(metric, ci[0])}, {_metric_number(metric, ci[1])}]"
    return text


def _asr_text(entry: Any) -> str:
    if not isinstance(entry, Mapping) or _finite(entry.get("rate")) is None:
        return "-"
    ci = entry.get("ci")
    text = f"{entry['rate']:.2f}"
    if isinstance(ci, Sequence) and len(ci) == 2:
        text += f" [{_num(ci[0], 2)}, {_num(ci[1], 2)}]"
    return text


def _kappa_text(entry: Any) -> str:
    if not isinstance(entry, Mapping) or _finite(entry.get("value")) is None:
        return "-"
    return _num(entry["value"], 3)


def _criterion_text(criterion: str, threshold: Any) -> str:
    if _finite(threshold) is None:
        return criterion.upper()
    return f"{criterion.upper()} > {threshold:g}{' dB' if criterion == 'psnr' else ''}"


class _Reasons:
    """Numbers the distinct "no bound" reasons so tables stay narrow (footnotes below them)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def number(self, reason: str) -> int:
        if reason not in self.items:
            self.items.append(reason)
        return self.items.index(reason) + 1


def _bound_text(entry: Any, reasons: _Reasons) -> str:
    if not isinstance(entry, Mapping):
        return "-"
    if _finite(entry.get("bound")) is None:
        return f"no bound ({reasons.number(str(entry.get('reason') or 'no reason recorded'))})"
    text = _num(entry["bound"], 3)
    if _finite(entry.get("bound_hi")) is not None:
        text += f" (hi {_num(entry['bound_hi'], 3)})"
    return text


# ----------------------------------------------------------------------------
# The overview table, shared by Markdown and HTML.
# ----------------------------------------------------------------------------

_QUALITY = (("psnr", "PSNR dB"), ("ssim", "SSIM"), ("lpips_alex", "LPIPS (alex)"))


def _criteria(audit: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    success = dict(audit.get("success") or {})
    for row in rows:
        for c, a in row["asr"].items():
            success.setdefault(c, (a or {}).get("threshold"))
    return success


def _overview(rows: Sequence[Mapping[str, Any]], success: Mapping[str, Any],
              reasons: _Reasons) -> tuple[list[tuple[str, list[str]]], list[list[str]]]:
    """Header groups ``[(group, [column, ...]), ...]`` and the text of each row's cells."""
    vary_m = len({r["images_per_client"] for r in rows}) > 1
    vary_e = len({r["global_epoch"] for r in rows}) > 1
    cell_cols = ["#", "dataset", "victim", "protocol", "defense", "attack", "seeds", "n"]
    cell_cols += ["M"] if vary_m else []
    cell_cols += ["epoch"] if vary_e else []
    groups = [("cell", cell_cols), ("quality: mean [95% CI]", [label for _, label in _QUALITY])]
    for c, t in success.items():
        groups.append((f"ASR {_criterion_text(c, t)}", ["attack", "null", "kappa", "bound"]))
    groups.append(("null control", ["SSIM"]))
    groups.append(("privacy", ["noise std", "eps", "eps tight"]))
    body = []
    for r in rows:
        seeds = r["seeds"]
        line = [str(r["row"]) + (" ⚠" if r["flagged"] else ""), r["dataset"], r["victim"],
                r["protocol"], r["defense"], r["attack"],
                ",".join(str(s) for s in seeds) if len(seeds) > 1 else str(seeds[0]), str(r["n"])]
        line += [str(r["images_per_client"])] if vary_m else []
        line += [str(r["global_epoch"])] if vary_e else []
        line += [_mean_ci_text(r["metrics"].get(name), name) for name, _ in _QUALITY]
        privacy = r["privacy"]
        null = r["null"] or {}
        for c in success:
            line += [_asr_text(r["asr"].get(c)),
                     _asr_text((null.get("asr") or {}).get(c)) if r["null"] else "-",
                     _kappa_text(privacy["kappa"].get(c)), _bound_text(privacy["bound"].get(c), reasons)]
        line.append(_num(((null.get("metrics") or {}).get("ssim") or {}).get("mean"), 3))
        line += [_sig(privacy.get("noise_std"), 3), _sig(privacy.get("epsilon")),
                 _sig(privacy.get("epsilon_tight"))]
        body.append(line)
    return groups, body


def _flag_lines(rows: Sequence[Mapping[str, Any]], success: Mapping[str, Any]) -> list[str]:
    lines = []
    for r in rows:
        for key, criteria in r["flags"].items():
            for c in criteria:
                result_asr = r["asr"].get(c) or {}
                bound = r["privacy"]["bound"].get(c) or {}
                lines.append(
                    f"row {r['row']}: {r['attack']} on {r['dataset']} / {r['victim']} / {r['protocol']} "
                    f"/ {r['defense']} (cell {key}): ASR {_criterion_text(c, success.get(c))} "
                    f"{_asr_text(result_asr)} exceeds the bound {_num(bound.get('bound'), 3)} "
                    f"(hi {_num(bound.get('bound_hi'), 3)})")
    return lines


def _grid_size(audit: Mapping[str, Any]) -> int | None:
    """The grid's cell count: the runner's cell list, else the product (None with exclusions)."""
    if isinstance(audit.get("cells"), list):
        return len(audit["cells"])
    if audit.get("exclude"):
        return None
    try:
        parts = [(audit.get("data") or {})["datasets"], audit["victims"], audit["protocols"],
                 audit["defenses"], audit["attacks"], audit["seeds"]]
    except (KeyError, TypeError):
        return None
    return math.prod(len(p) for p in parts) if all(isinstance(p, list) for p in parts) else None


def _counts(cells: Sequence[Mapping[str, Any]], grid_size: int | None) -> dict[str, int]:
    """Cells per status; cells of the grid without a folder yet count as missing."""
    counts = {s: 0 for s in ("done", "failed", "running", "stale", "missing")}
    for c in cells:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    if grid_size is not None:
        counts["missing"] += max(0, grid_size - len(cells))
    return counts


def _counts_text(ctx: Mapping[str, Any]) -> str:
    counts = ctx["counts"]
    size = ctx["grid_size"]
    total = f"of {size} cells in the grid" if size is not None else f"{len(ctx['cells'])} cell folders"
    return (f"{counts['done']} done, {counts['failed']} failed, {counts['running']} running, "
            f"{counts['stale']} stale, {counts['missing']} missing ({total})")


def _unfinished(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in cells:
        if c["status"] == "done":
            continue
        ident = _identity(c["cell"]) if isinstance(c["cell"], Mapping) else {}
        lock = c["lock"] or {}
        detail = c["error"] or (f"LOCK: pid {lock.get('pid')} on {lock.get('host')} since "
                                f"{lock.get('started')}" if c["lock"] else c.get("note", ""))
        out.append({"key": c["key"], "index": c["index"], "status": c["status"],
                    "seed": (c["cell"] or {}).get("seed"), **ident, "error": detail})
    return out


LEGEND = (
    ("ASR", (
        "attack success rate: the share of the attacked clients' images whose reconstruction meets "
        "the criterion (SSIM above its threshold, or PSNR above its threshold in dB); the interval is "
        "the exact Clopper-Pearson 95% interval.")),
    ("null control", (
        "the same attack run on updates that carry no information about the target (shuffle: "
        "another client's update; noise: Gaussian noise of the update's RMS). Its ASR is what the "
        "pipeline scores without any leakage; an attack is only informative where it clearly beats it.")),
    ("kappa", (
        "the baseline success of a guess made without the release: the best fixed image from a "
        "public pool of the same domain, scored with the same criterion against the targets. With few "
        "targets it is often 0 (no pool image met the criterion); the bound at kappa = 0 is 0 at every "
        "mu, so read the bound at kappa's upper end (\"hi\"), which the check uses.")),
    ("bound", (
        "the reconstruction-robustness bound of Hayes et al. (2023): under mu-GDP no attack succeeds "
        "with probability above Phi(Phi^-1(kappa) + mu) (a Monte Carlo estimate for subsampled "
        "DP-SGD); \"hi\" is the bound at the upper end of kappa's interval. Defenses without a "
        "clip and Gaussian noise give no bound, with the reason.")),
    ("EXCEEDS BOUND", (
        "the lower end of the ASR interval lies above the bound at kappa's upper end: the bound, the "
        "metric or the defense has a bug.")),
    ("eps / eps tight", (
        "the defense's nominal epsilon and the epsilon its noise really buys (at the recorded delta).")),
    ("quality", (
        "PSNR (dB, infinite values capped at 100), SSIM and LPIPS (AlexNet) of the reconstructions: "
        "mean over the targets and its 95% normal interval.")),
)


# ----------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------

_MEASURED = {"marker": "o", "linestyle": "-", "capsize": 3, "markersize": 4}
_IDENTITY = ("attack", "defense_family", "defense", "dataset", "victim", "protocol", "images_per_client",
             "global_epoch")
_BOUND_DASHES = ("--", (0, (6, 2, 1, 2)), (0, (2, 2)))


def _varying(rows: Sequence[Mapping[str, Any]], drop: Sequence[str], *, attack: bool = True) -> list[str]:
    """The identity fields that name a plot series: those that vary, less ``drop`` (and the x-axis's)."""
    fields = [f for f in _IDENTITY if f not in drop and (attack or f != "attack")
              and len({str(r[f]) for r in rows}) > 1]
    if attack and "attack" not in fields:
        fields.insert(0, "attack")
    return fields


def _series(rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> dict[str, list[Mapping[str, Any]]]:
    series: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        parts = [f"M={r[f]}" if f == "images_per_client" else f"epoch {r[f]}" if f == "global_epoch"
                 else str(r[f]) for f in fields]
        series.setdefault(" · ".join(parts), []).append(r)
    return series


def _dig(d: Any, *path: str) -> Any:
    for p in path:
        d = d.get(p) if isinstance(d, Mapping) else None
    return d


def _entry(path: Sequence[str], field: str):
    """A getter of the block at ``path`` of a row, or None where its ``field`` is not a finite number."""
    def get(r: Mapping[str, Any]) -> Any:
        e = _dig(r, *path)
        return e if isinstance(e, Mapping) and _finite(e.get(field)) is not None else None
    return get


def _points(rows: Sequence[Mapping[str, Any]], x_of, y_of) -> list[tuple[float, Any, Mapping[str, Any]]]:
    out = []
    for r in rows:
        x, y = _finite(x_of(r)), y_of(r)
        if x is not None and y is not None:
            out.append((x, y, r))
    return sorted(out, key=lambda p: p[0])


def _x_scale(ax: Any, xs: Sequence[float]) -> None:
    """A log axis for x spanning 20x or more, ticked at the grid's own values ("1, 3, 10", not "10^0")."""
    positive = [x for x in xs if x > 0]
    if not positive or max(positive) / min(positive) < 20:
        return
    if min(xs) > 0:
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=min(positive))
    ticks = sorted(set(xs))
    if len(ticks) <= 8:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()


def _errorbar(ax: Any, points: Sequence[tuple[float, Mapping[str, Any], Any]], field: str, **style: Any):
    ys = [p[1][field] for p in points]
    lo, hi = [], []
    for p, y in zip(points, ys):
        ci = p[1].get("ci")
        ok = isinstance(ci, Sequence) and len(ci) == 2 and all(_finite(v) is not None for v in ci)
        lo.append(max(0.0, y - ci[0]) if ok else 0.0)
        hi.append(max(0.0, ci[1] - y) if ok else 0.0)
    ax.errorbar([p[0] for p in points], ys, yerr=[lo, hi], **style)


def _figure(nrows: int, ncols: int):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4 * ncols + 2.8, 3.1 * nrows + 0.3), dpi=100, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _finish(fig: Any, colors: Mapping[str, str], styles: Sequence[tuple[str, dict[str, Any]]]) -> bytes:
    """One legend for the whole figure, right of the panels: the series' colours, then the line styles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color=c, linewidth=3) for c in colors.values()]
    labels = list(colors)
    for label, style in styles:
        handles.append(Patch(**style) if "facecolor" in style else Line2D([], [], **style))
        labels.append(label)
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


_STYLE_MEASURED = ("measured, 95% interval", {"color": "0.2", "marker": "o", "linestyle": "-"})
_STYLE_NULL = ("null control", {"color": "0.2", "linestyle": ":"})
_STYLE_NONE = ("no defense (reference)", {"color": "0.2", "linewidth": 3, "alpha": 0.3})
_STYLE_BOUND = ("DP bound at kappa", {"color": "black", "linestyle": "--", "marker": "_", "markersize": 14})
_STYLE_BAND = ("bound up to kappa's upper end", {"facecolor": "black", "alpha": 0.12})


def _draw(ax, rows, reference, x_of, path, field, fields, colors) -> None:
    """Measured values (with bars) and the null control per series; the no-defense level as a band."""
    for name, members in _series(rows, fields).items():
        color = colors[name]
        pts = _points(members, x_of, _entry(path, field))
        if pts:
            _errorbar(ax, pts, field, color=color, **_MEASURED)
        nulls = _points(members, x_of, _entry(("null", *path), field))
        if nulls:
            ax.plot([p[0] for p in nulls], [p[1][field] for p in nulls], color=color, linestyle=":")
    for name, members in _series(reference, fields).items():
        values = [e[field] for r in members if (e := _entry(path, field)(r)) is not None]
        if name in colors and values:
            ax.axhline(float(np.mean(values)), color=colors[name], linewidth=3, alpha=0.3)


def _draw_bounds(ax, rows, x_of, criterion, drop) -> None:
    """The bound at each x: one line per group of rows sharing it (the attacks of one defense do)."""
    for j, members in enumerate(_series(rows, _varying(rows, drop, attack=False)).values()):
        by_x: dict[float, list[Mapping[str, Any]]] = {}
        for x, e, _ in _points(members, x_of, _entry(("privacy", "bound", criterion), "bound")):
            by_x.setdefault(x, []).append(e)
        if not by_x:
            continue
        xs = sorted(by_x)
        bound = [float(np.mean([e["bound"] for e in by_x[x]])) for x in xs]
        # A wide "_" marker keeps a lone point's bound visible (a one-point line draws nothing).
        ax.plot(xs, bound, color="black", linestyle=_BOUND_DASHES[j % len(_BOUND_DASHES)], linewidth=1.2,
                marker="_", markersize=14)
        his = [[_finite(e.get("bound_hi")) for e in by_x[x]] for x in xs]
        if all(h is not None for hs in his for h in hs):
            # The flag compares with the bound at kappa's upper end: shade up to it.
            ax.fill_between(xs, bound, [max(hs) for hs in his], color="black", alpha=0.12, linewidth=0)


def _by_family_plot(rows, success, x_of, xlabel, *, asr: bool):
    """ASR per criterion (or PSNR) against epsilon / noise std: one panel row per defense family."""
    reference = [r for r in rows if r["defense_family"] == "none"]
    families = {}
    for r in rows:
        if r["defense_family"] != "none" and _finite(x_of(r)) is not None:
            families.setdefault(r["defense_family"], []).append(r)
    crits = [c for c in success if any(c in r["asr"] for r in rows)] if asr else ["psnr"]
    if _distinct([r for members in families.values() for r in members], x_of) < 2 or not crits:
        return None
    drop = ("defense", "defense_family")
    fields = _varying(rows, drop)
    colors = {name: f"C{i % 10}" for i, name in enumerate(_series(rows, fields))}
    fig, axes = _figure(len(families), len(crits))
    for i, (family, members) in enumerate(families.items()):
        for ax, c in zip(axes[i], crits):
            if asr:
                _draw(ax, members, reference, x_of, ("asr", c), "rate", fields, colors)
                _draw_bounds(ax, members, x_of, c, drop)
                ax.set_ylim(-0.03, 1.03)
                ax.set_ylabel(f"ASR ({_criterion_text(c, success.get(c))})")
            else:
                _draw(ax, members, reference, x_of, ("metrics", "psnr"), "mean", fields, colors)
                if _finite(success.get("psnr")) is not None:
                    ax.axhline(success["psnr"], color="grey", linewidth=0.8, linestyle="-.")
                ax.set_ylabel("PSNR (dB)")
            ax.set_title(f"{family}: {_criterion_text(c, success.get(c)) if asr else 'PSNR'}", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            _x_scale(ax, [x for r in members if (x := _finite(x_of(r))) is not None])
    styles = [_STYLE_MEASURED, _STYLE_NULL]
    styles += [_STYLE_NONE] if reference else []
    if asr:
        styles += [_STYLE_BOUND, _STYLE_BAND]
    elif _finite(success.get("psnr")) is not None:
        styles.append((f"success threshold {success['psnr']:g} dB",
                       {"color": "grey", "linestyle": "-.", "linewidth": 0.8}))
    return _finish(fig, colors, styles)


def _asr_mu_plot(rows, success):
    """ASR against the bound's mu, with ``Phi(Phi^-1(kappa) + mu)`` drawn as a continuous curve."""
    from jaxleak.privacy import reconstruction_bound

    mu_of = {c: (lambda r, c=c: (_dig(r, "privacy", "bound", c) or {}).get("mu")) for c in success}
    crits = [c for c in success if any(c in r["asr"] for r in rows) and _distinct(rows, mu_of[c]) >= 2]
    if not crits:
        return None
    with_mu = [r for r in rows if any(_finite(mu_of[c](r)) is not None for c in crits)]
    fields = _varying(with_mu, ("defense",))
    colors = {name: f"C{i % 10}" for i, name in enumerate(_series(with_mu, fields))}
    fig, axes = _figure(1, len(crits))
    for ax, c in zip(axes[0], crits):
        _draw(ax, with_mu, [], mu_of[c], ("asr", c), "rate", fields, colors)
        mus = [m for r in with_mu if (m := _finite(mu_of[c](r))) is not None]
        positive = [m for m in mus if m > 0]
        if positive and max(positive) / min(positive) >= 20:
            # The paper calibration's mu runs into the thousands beside DP-SGD's ~1: log axis.
            grid = np.geomspace(min(positive) / 2, max(positive) * 2, 160)
            ax.set_xscale("log")
        else:
            grid = np.linspace(0.0, 1.15 * max(mus), 120)
        # One curve per distinct baseline (kappa depends on the dataset and the criterion only).
        kappas: dict[tuple[float, float | None], None] = {}
        for r in with_mu:
            k = _dig(r, "privacy", "kappa", c) or {}
            ci = k.get("ci") if isinstance(k.get("ci"), Sequence) and len(k.get("ci")) == 2 else [None, None]
            if _finite(k.get("value")) is not None:
                high = _finite(ci[1])
                kappas[(round(k["value"], 3), None if high is None else round(high, 3))] = None
        for j, (kappa, high) in enumerate(kappas):
            curve = [reconstruction_bound(kappa, mu=float(m)) for m in grid]
            ax.plot(grid, curve, color="black", linestyle=_BOUND_DASHES[j % len(_BOUND_DASHES)],
                    linewidth=1.2)
            if high is not None:
                upper = [reconstruction_bound(min(1.0, high), mu=float(m)) for m in grid]
                ax.fill_between(grid, curve, upper, color="black", alpha=0.12, linewidth=0)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("mu (GDP parameter of the release)")
        ax.set_ylabel(f"ASR ({_criterion_text(c, success.get(c))})")
        ax.set_title(f"ASR vs mu: {_criterion_text(c, success.get(c))}", fontsize=10)
        ax.grid(alpha=0.3)
    return _finish(fig, colors, [_STYLE_MEASURED, _STYLE_NULL,
                                 ("bound Phi(Phi^-1(kappa) + mu)", {"color": "black", "linestyle": "--"}),
                                 _STYLE_BAND])


def _quality_plot(rows, success, x_of, xlabel, drop):
    """SSIM and PSNR against the global epoch or the client batch size."""
    fields = _varying(rows, drop)
    colors = {name: f"C{i % 10}" for i, name in enumerate(_series(rows, fields))}
    fig, axes = _figure(1, 2)
    for ax, metric in zip(axes[0], ("ssim", "psnr")):
        _draw(ax, rows, [], x_of, ("metrics", metric), "mean", fields, colors)
        if _finite(success.get(metric)) is not None:
            ax.axhline(success[metric], color="grey", linewidth=0.8, linestyle="-.")
        ax.set_xlabel(xlabel)
        ax.set_ylabel({"psnr": "PSNR (dB)", "ssim": "SSIM"}[metric])
        ax.set_title(f"{metric.upper()} vs {xlabel.split(' (')[0]}", fontsize=10)
        ax.grid(alpha=0.3)
        _x_scale(ax, [x for r in rows if (x := _finite(x_of(r))) is not None])
    threshold = ("success threshold", {"color": "grey", "linestyle": "-.", "linewidth": 0.8})
    return _finish(fig, colors, [_STYLE_MEASURED, _STYLE_NULL, threshold])


def _distinct(rows: Sequence[Mapping[str, Any]], x_of) -> int:
    return len({x for r in rows if (x := _finite(x_of(r))) is not None})


def _plots(rows: Sequence[Mapping[str, Any]], success: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every plot the grid supports: ``[{"name", "title", "png"}]`` (an x-axis needs 2+ values)."""
    def eps(r):
        return r["privacy"].get("epsilon")

    def std(r):
        return r["privacy"].get("noise_std")

    def epoch(r):
        return r["global_epoch"]

    def batch(r):
        return r["images_per_client"]

    specs = [
        ("asr_vs_epsilon", "ASR vs epsilon (nominal)",
         lambda: _by_family_plot(rows, success, eps, "epsilon (nominal)", asr=True)),
        ("psnr_vs_epsilon", "PSNR vs epsilon (nominal)",
         lambda: _by_family_plot(rows, success, eps, "epsilon (nominal)", asr=False)),
        ("asr_vs_noise_std", "ASR vs noise std",
         lambda: _by_family_plot(rows, success, std, "noise std", asr=True)),
        ("psnr_vs_noise_std", "PSNR vs noise std",
         lambda: _by_family_plot(rows, success, std, "noise std", asr=False)),
        ("asr_vs_mu", "ASR vs mu, with the bound curve", lambda: _asr_mu_plot(rows, success)),
    ]
    if _distinct(rows, epoch) >= 2:
        specs.append(("quality_vs_global_epoch", "Quality vs global epoch",
                      lambda: _quality_plot(rows, success, epoch, "global epoch (FL training)",
                                            ("global_epoch", "victim"))))
    if _distinct(rows, batch) >= 2:
        specs.append(("quality_vs_client_batch", "Quality vs client batch size",
                      lambda: _quality_plot(rows, success, batch, "images per client (M)",
                                            ("images_per_client",))))
    plots = []
    for name, title, make in specs:
        png = make()
        if png is not None:
            plots.append({"name": name, "title": title, "png": png})
    return plots


# ----------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(x) for x in line) + " |" for line in body]
    return lines


def _provenance_items(audit: Mapping[str, Any]) -> list[tuple[str, str]]:
    prov = audit.get("provenance") or {}

    def flat(value: Any) -> str:
        if isinstance(value, Mapping):
            return ", ".join(f"{k} {flat(v)}" for k, v in value.items())
        if isinstance(value, list | tuple):
            return " ".join(str(v) for v in value)
        return str(value)

    items = [(k, flat(prov[k])) for k in ("command", "date", "machine", "versions") if k in prov]
    items += [(k, flat(v)) for k, v in prov.items() if k not in ("command", "date", "machine", "versions")]
    items.append(("seeds", flat(audit.get("seeds", "-"))))
    items.append(("clients per cell", flat(audit.get("clients", "-"))))
    items.append(("null control", flat(audit.get("null", "-"))))
    return items


def _markdown(ctx: Mapping[str, Any]) -> str:
    audit, rows, success = ctx["audit"], ctx["rows"], ctx["success"]
    reasons = _Reasons()
    out = [f"# Audit report: {audit.get('name', '(unnamed)')}", ""]
    if ctx["flag_lines"]:
        out += [(f"> **EXCEEDS BOUND: {len(ctx['flag_lines'])} case(s) where the measured success is "
                 "above the DP bound by more than its confidence interval (a bug in the bound, the "
                 "metric or the defense):**"), ">"]
        out += [f"> - {line}" for line in ctx["flag_lines"]]
        out.append("")
    out += [f"Cells: {_counts_text(ctx)}. Generated {ctx['generated']} from `{ctx['audit_dir']}`.", ""]
    out += ["## Overview", ""]
    groups, body = _overview(rows, success, reasons)
    header = []
    for group, cols in groups:
        if group.startswith("ASR "):
            crit = group[len("ASR "):]
            header += [f"ASR {crit}", f"null ASR {crit}", f"kappa {crit}", f"bound {crit}"]
        elif group == "null control":
            header += [f"null {c}" for c in cols]
        else:
            header += cols
    out += _md_table(header, body) if body else ["(no finished cells yet)"]
    out.append("")
    if reasons.items:
        out += [f"({i}) {reason}" for i, reason in enumerate(reasons.items, 1)] + [""]
    out += ["## Legend", ""] + [f"- **{term}**: {text}" for term, text in LEGEND] + [""]
    unfinished = ctx["unfinished"]
    if unfinished:
        out += ["## Unfinished cells", ""]
        out += _md_table(["key", "status", "dataset", "victim", "protocol", "defense", "attack", "seed",
                          "error / lock"],
                         [[u["key"], u["status"], u.get("dataset", "-"), u.get("victim", "-"),
                           u.get("protocol", "-"), u.get("defense", "-"), u.get("attack", "-"),
                           str(u.get("seed", "-")), u["error"] or "-"] for u in unfinished])
        out.append("")
    out += ["## Cells", ""]
    row_of = {k: r["row"] for r in rows for k in r["keys"]}
    out += _md_table(["key", "row", "status", "seed", "seconds"],
                     [[c["key"], str(row_of.get(c["key"], "-")), c["status"],
                       str((c["cell"] or {}).get("seed", "-")),
                       _sig((c["result"] or {}).get("seconds"), 3)] for c in ctx["cells"]])
    out.append("")
    if ctx["plots"]:
        out += ["## Plots", ""] + [f"![{p['title']}](plots/{p['name']}.png)" for p in ctx["plots"]] + [""]
    out += ["## Provenance", ""] + [f"- **{k}**: `{_md_escape(v)}`" for k, v in _provenance_items(audit)]
    if audit.get("text"):
        out += ["", "### Audit file", "", "```toml", str(audit["text"]).rstrip(), "```"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------
# HTML.
# ----------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px 32px;
color:#1d2330;background:#fff;line-height:1.45;font-size:15px}
h1{margin:0 0 4px;font-size:26px}h2{margin-top:36px;border-bottom:2px solid #dde3ec;padding-bottom:4px}
h3{margin:0 0 6px;font-size:17px}.muted{color:#5d6778;font-size:13px}
code,.key{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.banner{background:#b3141b;color:#fff;padding:14px 18px;border-radius:6px;margin:16px 0}
.banner h2{color:#fff;border:0;margin:0 0 6px;font-size:20px}.banner li{margin:2px 0}
.ok{background:#e8f5e9;border:1px solid #a5d6a7;padding:8px 14px;border-radius:6px;margin:16px 0}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d5dbe5;padding:4px 7px;text-align:left;vertical-align:top}
table.overview{font-size:12.5px}table.overview td,table.overview th{padding:3px 5px}
th{background:#eef2f8;font-weight:600}thead tr.group th{background:#dfe6f1;text-align:center}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.id{white-space:nowrap}.ci{color:#6b7280;font-size:11.5px}
tbody tr:nth-child(even){background:#f8fafc}tr.flag td{background:#fde2e2 !important}
td.nobound{color:#6b7280;font-style:italic;white-space:nowrap}
.status-failed{color:#b3141b;font-weight:600}.status-running{color:#8a6d00}
.status-stale,.status-missing{color:#6b7280}
dl.legend{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;font-size:14px}
dl.legend dt{font-weight:600}dl.legend dd{margin:0}
.footnotes{font-size:12.5px;color:#4b5563}.footnotes li{margin:2px 0}
.plot{margin:14px 0}.plot img{max-width:100%;border:1px solid #e3e8ef}
section.cell{border:1px solid #d5dbe5;border-radius:6px;padding:12px 16px;margin:14px 0}
section.cell.flag{border:2px solid #b3141b}
.grid img{image-rendering:pixelated;max-width:100%;border:1px solid #e3e8ef;margin-top:6px}
pre{background:#f4f6fa;padding:10px;overflow-x:auto;font-size:12.5px}
.tag{display:inline-block;background:#b3141b;color:#fff;border-radius:4px;padding:0 6px;font-size:12px;
font-weight:600;margin-left:6px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_HIDE_IF_CONSTANT = ("dataset", "victim", "protocol", "seeds", "n")


def _html_number(text: str) -> str:
    """``"14.1 [12.0, 16.2]"`` -> the mean, its interval small on a second line (narrow columns)."""
    match = re.fullmatch(r"(.*?) (\[.*\]|\(hi .*\))", text)
    if not match:
        return _e(text)
    return f"{_e(match.group(1))}<br><span class='ci'>{_e(match.group(2).strip('()'))}</span>"


def _html_overview(rows, success, reasons) -> str:
    """The overview table; identity columns equal on every row move to one line above it."""
    groups, body = _overview(rows, success, reasons)
    columns = [(g, c) for g, cols in groups for c in cols]
    constant = [j for j, (g, c) in enumerate(columns) if g == "cell" and c in _HIDE_IF_CONSTANT
                and len(rows) > 1 and len({line[j] for line in body}) == 1]
    shown = [j for j in range(len(columns)) if j not in constant]
    parts = []
    if constant:
        parts.append("<p class='muted'>Every row: " + " · ".join(
            f"{_e(columns[j][1])} <b>{_e(body[0][j])}</b>" for j in constant) + "</p>")
    parts.append("<div class='scroll'><table class='overview'><thead><tr class='group'>")
    for g, cols in groups:
        width = sum(1 for j in shown if columns[j][0] == g)
        parts.append(f"<th colspan='{width}'>{_e(g)}</th>")
    parts.append("</tr><tr>")
    parts += [f"<th>{_e(columns[j][1])}</th>" for j in shown]
    parts.append("</tr></thead><tbody>")
    for r, line in zip(rows, body):
        parts.append(f"<tr{' class=flag' if r['flagged'] else ''}>")
        for j in shown:
            text, (group, _) = line[j], columns[j]
            if j == 0:
                parts.append(f"<td><a href='#cell-{_e(r['keys'][0])}'>{_e(text)}</a></td>")
            elif text.startswith("no bound"):
                number = text[len("no bound ("):-1]
                reason = reasons.items[int(number) - 1]
                parts.append(f"<td class='nobound' title='{_e(reason)}'>no bound "
                             f"(<a href='#reason-{number}'>{number}</a>)</td>")
            elif group == "cell":
                parts.append(f"<td class='id'>{_e(text)}</td>")
            else:
                parts.append(f"<td class=num>{_html_number(text)}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _metric_table(result: Mapping[str, Any]) -> str:
    real, null = _metrics_of(result.get("real")), _metrics_of(result.get("null"))
    names = list(dict.fromkeys([*real, *null]))
    if not names:
        return ""
    rows = "".join(f"<tr><td>{_e(n)}</td><td class=num>{_e(_mean_ci_text(real.get(n), n))}</td>"
                   f"<td class=num>{_e(_mean_ci_text(null.get(n), n))}</td></tr>" for n in names)
    return ("<table><thead><tr><th>metric</th><th>attack: mean [95% CI]</th><th>null control</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>")


def _asr_table(result: Mapping[str, Any], success: Mapping[str, Any], flags: Sequence[str]) -> str:
    real, null = _asr_of(result.get("real")), _asr_of(result.get("null"))
    privacy = result.get("privacy") or {}
    crits = list(dict.fromkeys([*real, *null]))
    if not crits:
        return "<p class='muted'>No ASR: this attack's metrics have no success criterion.</p>"
    body = []
    for c in crits:
        a, k = real.get(c) or {}, (privacy.get("kappa") or {}).get(c) or {}
        b = (privacy.get("bound") or {}).get(c) or {}
        counts = f" ({a['successes']}/{a['n']})" if "successes" in a and "n" in a else ""
        kappa = _kappa_text(k)
        if isinstance(k.get("ci"), Sequence) and len(k["ci"]) == 2:
            kappa += f" [{_num(k['ci'][0], 3)}, {_num(k['ci'][1], 3)}]"
        if _finite(b.get("bound")) is not None:
            bound = (f"{_num(b['bound'], 3)} (hi {_num(b.get('bound_hi'), 3)}), mu {_sig(b.get('mu'), 3)}, "
                     f"{b.get('method') or '-'}")
        else:
            bound = "no bound"
        if c in flags:
            verdict = "<span class='tag'>EXCEEDS BOUND</span>"
        else:
            verdict = "within the bound" if _finite(b.get("bound")) is not None else "-"
        criterion = _criterion_text(c, success.get(c, a.get("threshold")))
        body.append(f"<tr{' class=flag' if c in flags else ''}><td>{_e(criterion)}</td>"
                    f"<td class=num>{_e(_asr_text(a) + counts)}</td>"
                    f"<td class=num>{_e(_asr_text(null.get(c)))}</td><td class=num>{_e(kappa)}</td>"
                    f"<td>{_e(bound)}</td><td>{verdict}</td></tr>"
                    f"<tr><td></td><td colspan=5 class=muted>{_e(b.get('reason') or '')}</td></tr>")
    return ("<table><thead><tr><th>criterion</th><th>ASR [95% CI]</th><th>null control</th>"
            "<th>kappa [95% CI]</th><th>bound</th><th>check</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _html_cell(c: Mapping[str, Any], row_of: Mapping[str, int], success: Mapping[str, Any]) -> str:
    cell = c["cell"] if isinstance(c["cell"], Mapping) else {}
    ident = _identity(cell) if cell else {}
    title = " · ".join(str(ident[k]) for k in ("dataset", "victim", "protocol", "defense", "attack")
                       if k in ident) or c["key"]
    seed = cell.get("seed", "-")
    flags = _cell_flags(c["result"]) if c["status"] == "done" else []
    parts = [f"<section id='cell-{_e(c['key'])}' class='cell{' flag' if flags else ''}'>",
             f"<h3>{_e(title)} · seed {_e(seed)}"
             + ("<span class='tag'>EXCEEDS BOUND</span>" if flags else "") + "</h3>",
             (f"<div class='muted'><span class='key'>{_e(c['key'])}</span> · "
              f"<span class='status-{_e(c['status'])}'>{_e(c['status'])}</span>")]
    if c["key"] in row_of:
        parts.append(f" · overview row {row_of[c['key']]}")
    if c["status"] != "done":
        parts.append("</div>")
        if c["error"]:
            parts.append(f"<p class='status-failed'>{_e(c['error'])}</p>")
        if c.get("note"):
            parts.append(f"<p class='muted'>{_e(c['note'])}</p>")
        if c["lock"]:
            lock = c["lock"]
            parts.append(f"<p class='muted'>LOCK: pid {_e(lock.get('pid'))} on {_e(lock.get('host'))} "
                         f"since {_e(lock.get('started'))}</p>")
        if c["error_log"]:
            parts.append(f"<details><summary>error.log (last lines)</summary><pre>{_e(c['error_log'])}"
                         "</pre></details>")
        parts.append("</section>")
        return "".join(parts)
    result = c["result"]
    privacy = result.get("privacy") or {}
    seconds = _finite(result.get("seconds"))
    parts.append(f" · {_sig(seconds, 3)} s" if seconds is not None else "")
    null = result.get("null")
    parts.append(f" · {_e((result.get('real') or {}).get('n', '-'))} targets · null control: "
                 f"{_e(null.get('kind') if isinstance(null, Mapping) else 'none')}</div>")
    parts.append(f"<p>noise std {_e(_sig(privacy.get('noise_std'), 3))} · epsilon "
                 f"{_e(_sig(privacy.get('epsilon')))} (tight {_e(_sig(privacy.get('epsilon_tight')))}) · "
                 f"delta {_e(_sig(privacy.get('delta')))}</p>")
    parts.append(_asr_table(result, success, flags))
    parts.append(_metric_table(result))
    grid = c["dir"] / str((result.get("files") or {}).get("grid") or "grid.png")
    if grid.is_file():
        parts.append("<div class='grid'><div class='muted'>top: the clients' images (the first few); below: "
                     "the attack's reconstructions, then the null control's</div>"
                     f"<img alt='image grid of {_e(c['key'])}' src='{_data_uri(grid.read_bytes())}'></div>")
    else:
        parts.append("<p class='muted'>no grid.png</p>")
    parts.append("</section>")
    return "".join(parts)


def _html(ctx: Mapping[str, Any]) -> str:
    audit, rows, success = ctx["audit"], ctx["rows"], ctx["success"]
    reasons = _Reasons()
    name = audit.get("name", "(unnamed)")
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>jaxleak audit: {_e(name)}</title><style>{_CSS}</style></head><body>",
           f"<h1>Audit report: {_e(name)}</h1>"]
    out.append(f"<div class='muted'>Cells: {_e(_counts_text(ctx))} · generated {_e(ctx['generated'])} "
               f"from <code>{_e(ctx['audit_dir'])}</code></div>")
    if ctx["flag_lines"]:
        out.append("<div class='banner'><h2>EXCEEDS BOUND</h2><div>The measured success is above the DP "
                   "bound by more than its confidence interval: a bug in the bound, the metric or the "
                   "defense.</div><ul>" + "".join(f"<li>{_e(x)}</li>" for x in ctx["flag_lines"])
                   + "</ul></div>")
    elif rows:
        out.append("<div class='ok'>No cell exceeds its DP bound.</div>")
    out.append("<h2>Overview</h2>")
    out.append(_html_overview(rows, success, reasons) if rows else "<p>No finished cells yet.</p>")
    if reasons.items:
        out.append("<ol class='footnotes'>" + "".join(
            f"<li id='reason-{i}'>{_e(r)}</li>" for i, r in enumerate(reasons.items, 1)) + "</ol>")
    out.append("<h2>Legend</h2><dl class='legend'>" + "".join(
        f"<dt>{_e(t)}</dt><dd>{_e(d)}</dd>" for t, d in LEGEND) + "</dl>")
    if ctx["unfinished"]:
        out.append("<h2>Unfinished cells</h2><div class='scroll'><table><thead><tr><th>key</th>"
                   "<th>status</th><th>cell</th><th>seed</th><th>error / lock</th></tr></thead><tbody>")
        for u in ctx["unfinished"]:
            what = " · ".join(str(u[k]) for k in ("dataset", "victim", "protocol", "defense", "attack")
                              if k in u) or "(no cell.json)"
            out.append(f"<tr><td><a class='key' href='#cell-{_e(u['key'])}'>{_e(u['key'])}</a></td>"
                       f"<td class='status-{_e(u['status'])}'>{_e(u['status'])}</td><td>{_e(what)}</td>"
                       f"<td>{_e(u.get('seed', '-'))}</td><td>{_e(u['error'] or '-')}</td></tr>")
        out.append("</tbody></table></div>")
    if ctx["plots"]:
        out.append("<h2>Plots</h2><p class='muted'>Solid: measured (95% interval bars); dashed: the DP "
                   "bound; dotted: the null control.</p>")
        out += [f"<div class='plot'><h3>{_e(p['title'])}</h3><img alt='{_e(p['title'])}' "
                f"src='{_data_uri(p['png'])}'></div>" for p in ctx["plots"]]
    out.append("<h2>Cells</h2>")
    row_of = {k: r["row"] for r in rows for k in r["keys"]}
    out += [_html_cell(c, row_of, success) for c in ctx["cells"]]
    out.append("<h2>Provenance</h2><table><tbody>" + "".join(
        f"<tr><th>{_e(k)}</th><td><code>{_e(v)}</code></td></tr>" for k, v in _provenance_items(audit))
        + "</tbody></table>")
    if audit.get("text"):
        out.append(f"<details><summary>The audit file</summary><pre>{_e(audit['text'])}</pre></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------
# JSON and the entry point.
# ----------------------------------------------------------------------------


def _strict(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return _strict(value.item())
    return value


def _json(ctx: Mapping[str, Any]) -> str:
    audit = ctx["audit"]
    payload = {
        "name": audit.get("name"), "audit_dir": ctx["audit_dir"], "generated": ctx["generated"],
        "success": ctx["success"], "grid_size": ctx["grid_size"], "counts": ctx["counts"],
        "rows": ctx["rows"],
        "flags": [{"row": r["row"], "key": key, "criteria": crits}
                  for r in ctx["rows"] for key, crits in r["flags"].items()],
        "flag_lines": ctx["flag_lines"],
        "cells": [{"key": c["key"], "index": c["index"], "status": c["status"], "error": c["error"],
                   "seed": (c["cell"] or {}).get("seed")} for c in ctx["cells"]],
        "unfinished": ctx["unfinished"],
        "plots": [f"plots/{p['name']}.png" for p in ctx["plots"]],
        "provenance": audit.get("provenance"),
        "seeds": audit.get("seeds"),
    }
    return json.dumps(_strict(payload), indent=2, allow_nan=False) + "\n"


def write_report(
    audit_dir: str | Path,
    *,
    formats: Sequence[str] = REPORT_FORMATS,
    out_dir: str | Path | None = None,
) -> dict[str, str]:
    """Writes the report of an audit folder (finished or not): HTML, Markdown and/or JSON.

    Reads ``audit.json`` and every ``cells/*/`` (``result.json`` of done cells; ``cell.json``,
    ``ERROR`` and ``LOCK`` of the others) and writes into ``out_dir``:

    * ``report.html``: a self-contained page (every image a base64 data URI): a red banner listing
      the cells whose success exceeds their DP bound, the overview table, a legend, the unfinished
      cells, plots, one section per cell with its ``grid.png``, and the provenance;
    * ``report.md``: the same overview, flags, cells and provenance in Markdown (plots linked);
    * ``report.json``: the overview rows, flags, cell statuses and provenance as strict JSON
      (non-finite numbers written as ``null``);
    * ``plots/*.png`` (with ``html`` or ``md``): ASR per criterion and PSNR against the nominal
      epsilon and the noise std with the DP bound at each point, ASR against ``mu`` with the bound
      curve ``Phi(Phi^-1(kappa) + mu)``, and SSIM/PSNR against the global epoch and the client
      batch size; each only when the grid gives its x-axis two or more values.

    Args:
      audit_dir: the folder ``jaxleak audit run --out`` wrote.
      formats: any of ``"html"``, ``"md"``, ``"json"``.
      out_dir: where to write; default ``audit_dir/report``.

    Returns:
      ``{format: path written}``.

    Raises:
      FileNotFoundError: when ``audit_dir/audit.json`` does not exist.
      ValueError: on an unknown or empty ``formats`` or an ``audit.json`` that is not a JSON object.

    >>> import json, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "audit.json").write_text(json.dumps({"name": "empty", "success": {"ssim": 0.5}}))
    >>> paths = write_report(d, formats=["json"])
    >>> json.loads(pathlib.Path(paths["json"]).read_text())["counts"]["done"]
    0
    """
    if isinstance(formats, str):
        formats = [formats]
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in REPORT_FORMATS]
    if unknown or not formats:
        what = f"unknown format {unknown[0]!r}" if unknown else "no format given"
        raise ValueError(f"formats: {what}; allowed: {', '.join(REPORT_FORMATS)}")
    audit_dir = Path(audit_dir)
    audit, cells = _load_audit(audit_dir)
    out = Path(out_dir) if out_dir is not None else audit_dir / "report"
    rows = _rows(cells, list((audit.get("success") or {}).keys()))
    success = _criteria(audit, rows)
    ctx: dict[str, Any] = {
        "audit": audit, "cells": cells, "rows": rows, "success": success,
        "audit_dir": str(audit_dir), "grid_size": _grid_size(audit), "unfinished": _unfinished(cells),
        "flag_lines": _flag_lines(rows, success),
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "plots": _plots(rows, success) if {"html", "md"} & set(formats) and rows else [],
    }
    ctx["counts"] = _counts(cells, ctx["grid_size"])
    out.mkdir(parents=True, exist_ok=True)
    if ctx["plots"] or {"html", "md"} & set(formats):
        plots_dir = out / "plots"
        made = {p["name"] for p in ctx["plots"]}
        for name in _PLOT_NAMES:
            if name not in made and (plots_dir / f"{name}.png").exists():
                (plots_dir / f"{name}.png").unlink()
        if ctx["plots"]:
            plots_dir.mkdir(exist_ok=True)
            for p in ctx["plots"]:
                (plots_dir / f"{p['name']}.png").write_bytes(p["png"])
    writers = {"html": _html, "md": _markdown, "json": _json}
    written = {}
    for fmt in formats:
        path = out / _FILES[fmt]
        path.write_text(writers[fmt](ctx), encoding="utf-8")
        written[fmt] = str(path)
    return written
