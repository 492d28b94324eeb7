"""Host-side summaries of per-image metrics: JSON records and terminal tables."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxleak.metrics import asr

ASR_TAU = 0.5
"""Threshold of the ``asr@0.5`` entry added by :func:`summarize`."""

_RESERVED_KEYS = ("metrics", "n")


def _as_python_floats(values: np.ndarray) -> list[float]:
    if values.dtype.itemsize <= 4:
        # str() of a float32 is its shortest round-tripping decimal, so the JSON
        # reads 0.3 rather than 0.30000001192092896.
        return [float(str(v)) for v in values]
    return [float(v) for v in values]


def _per_image(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(
            f"metric {name!r} must be a non-empty per-image array [N], got shape {array.shape}."
        )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"metric {name!r} must be real numbers, got dtype {array.dtype}.")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    return array


def _check_metrics(metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(metrics, Mapping) or not metrics:
        raise ValueError("metrics must be a non-empty mapping of name -> per-image array [N].")
    arrays = {}
    for name, values in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"metric names must be strings, got {name!r}.")
        arrays[name] = _per_image(name, values)
    lengths = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"all metrics must cover the same images, got lengths {lengths}.")
    return arrays


def summarize(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Summarizes per-image metrics into a JSON-ready dict.

    For each metric the result holds ``values`` (the per-image list), ``mean``
    and ``std`` (population std, ddof 0) over the finite values only, and the
    counts ``n_finite``, ``n_inf`` and ``n_nan``. PSNR of a perfect
    reconstruction is ``+inf``: it stays in ``values`` and is counted in
    ``n_inf``, but does not enter ``mean``/``std``. ``mean``/``std`` are
    ``None`` when no value is finite. When an ``ssim`` metric is present, the
    top level also holds ``"asr@0.5"``, the share of images with SSIM > 0.5.

    Args:
        metrics: Mapping from metric name to a per-image array ``[N]``; every
            metric must have the same ``N >= 1``.

    Returns:
        ``{name: {"values", "mean", "std", "n_finite", "n_inf", "n_nan"}, ...}``
        plus ``"asr@0.5"`` if ``"ssim"`` is a key. Only Python floats, ints,
        lists and ``None``; infinities and NaNs stay as floats (``json``
        writes them as ``Infinity`` / ``NaN``).

    Raises:
        ValueError: If ``metrics`` is empty, a value is not a non-empty 1-D
            real array, or the lengths differ.
        TypeError: If a metric name is not a string.

    >>> out = summarize({"psnr": [10.0, 20.0, float("inf")], "ssim": [0.2, 0.6, 1.0]})
    >>> out["psnr"]["mean"], out["psnr"]["n_inf"], round(out["asr@0.5"], 4)
    (15.0, 1, 0.6667)
    """
    summary: dict[str, Any] = {}
    for name, values in _check_metrics(metrics).items():
        finite = values[np.isfinite(values)].astype(np.float64)
        summary[name] = {
            "values": _as_python_floats(values),
            "mean": float(finite.mean()) if finite.size else None,
            "std": float(finite.std()) if finite.size else None,
            "n_finite": int(finite.size),
            "n_inf": int(np.isinf(values).sum()),
            "n_nan": int(np.isnan(values).sum()),
        }
    if "ssim" in metrics:
        summary[f"asr@{ASR_TAU}"] = float(asr(np.asarray(metrics["ssim"]), tau=ASR_TAU))
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


def _strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def write_metrics_json(
    path: str | Path,
    metrics: Mapping[str, Any],
    *,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``{"metrics": summarize(metrics), "n": N, **extra}`` as indented, strict JSON.

    Non-finite numbers (a perfect reconstruction's PSNR is +inf) are written as
    ``null``: the file has no ``Infinity`` / ``NaN`` tokens; ``n_inf`` / ``n_nan``
    count them per metric.

    Args:
        path: Output file; parent folders are created.
        metrics: Per-image metrics, as for :func:`summarize`.
        extra: Further top-level entries (run settings, eps, seed, ...). NumPy
            and JAX scalars/arrays are converted to Python values.

    Returns:
        The path written.

    Raises:
        ValueError: If ``metrics`` is invalid (see :func:`summarize`) or
            ``extra`` uses the reserved keys ``"metrics"`` or ``"n"``.
        TypeError: If a value in ``extra`` cannot be written as JSON.
    """
    extra = dict(extra or {})
    clashes = sorted(set(extra) & set(_RESERVED_KEYS))
    if clashes:
        raise ValueError(f"extra must not use the reserved keys {clashes}.")
    summary = summarize(metrics)
    n = len(next(iter(summary.values()))["values"])
    payload = _strict(json.loads(json.dumps({"metrics": summary, "n": n, **extra}, default=_json_default)))
    # Strict JSON: no Infinity / NaN tokens, which many JSON readers reject. A non-finite value
    # (a perfect reconstruction's PSNR is +inf) is written as null; n_inf / n_nan count them.
    text = json.dumps(payload, indent=2, allow_nan=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------
# Terminal tables.
# ----------------------------------------------------------------------------


def _format_cell(value: Any) -> tuple[str, bool]:
    """Returns the cell text and whether it is numeric (right-aligned)."""
    if value is None:
        return "", False
    if hasattr(value, "ndim") and getattr(value, "ndim", None) == 0:
        value = value.item()  # NumPy / JAX scalar
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, numbers.Integral):
        return str(int(value)), True
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return str(value), True
        # 4 significant digits: 23.46 dB, 0.9123 SSIM, 1e-05 delta alike.
        return f"{value:.4g}", True
    return str(value), False


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Formats dict rows as a plain, aligned text table.

    Numbers are right-aligned (floats with 4 significant digits), other values
    left-aligned; a missing key or ``None`` gives an empty cell. A column whose
    cells are all numeric has a right-aligned header.

    Args:
        rows: One mapping per table row.
        columns: Keys to show, in order; also the header.

    Returns:
        The table: header, a dashed rule, one line per row, no trailing newline.

    Raises:
        ValueError: If ``columns`` is empty.
        TypeError: If a row is not a mapping.

    >>> print(format_table([{"eps": 1, "psnr": 12.3456}, {"eps": 10, "psnr": 20.0}],
    ...                    ["eps", "psnr"]))
    eps   psnr
    ---  -----
      1  12.35
     10     20
    """
    columns = list(columns)
    if not columns:
        raise ValueError("columns must name at least one key.")
    for row in rows:
        if not isinstance(row, Mapping):
            raise TypeError(f"each row must be a mapping, got {type(row).__name__}.")
    cells = [[_format_cell(row.get(col)) for col in columns] for row in rows]
    widths = [len(str(col)) for col in columns]
    for line in cells:
        widths = [max(w, len(text)) for w, (text, _) in zip(widths, line)]
    numeric_col = [
        bool(rows) and all(line[j][1] or line[j][0] == "" for line in cells)
        for j in range(len(columns))
    ]

    def join(parts: list[tuple[str, bool]]) -> str:
        padded = [
            text.rjust(w) if right else text.ljust(w) for (text, right), w in zip(parts, widths)
        ]
        return "  ".join(padded).rstrip()

    header = join([(str(col), numeric_col[j]) for j, col in enumerate(columns)])
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([header, rule, *(join(line) for line in cells)])
