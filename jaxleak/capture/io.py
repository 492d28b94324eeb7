"""The capture file: what an attacker observed, as a plain ``.npz``.

Readable with ``numpy.load(path, allow_pickle=False)`` by any tool. Keys:

* ``fc_weight_grad`` float32 ``[N, K, d]``: the attacked dense layer's weight
  gradient, class-major (row ``j`` belongs to output unit ``j``), ``d`` the layer
  input flattened in the model's NHWC order (``meta.feature_layout == "HWC"``).
* ``fc_bias_grad`` float32 ``[N, K]``.
* ``labels`` int ``[N]`` (``[N, B]`` for client batches of ``B > 1``).
* ``images`` uint8 ``[N, H, W, C]`` (``[N, B, H, W, C]``), when known.
* ``update/<param path>`` ``[N, ...]``: optionally the whole protected update.
* ``params/<param path>`` (and ``batch_stats/<path>``): optionally the victim's
  variables at capture time; ``meta.init_seed`` / ``meta.checkpoint`` recreate them too.
* ``meta``: a JSON string (see :data:`REQUIRED_META`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

REQUIRED_META = (
    "model",
    "dataset",
    "image_shape",
    "feature_shape",
    "feature_layout",
    "layer",
    "protocol",
    "batch_size",
    "calibration",
    "mechanism",
    "epsilon",
    "delta",
    "clip",
    "noise_std",
    "seed",
    "jaxleak_version",
)
_TREES = ("update", "params", "batch_stats")


class CaptureFormatError(ValueError):
    """A capture file is unreadable or inconsistent; the message says exactly how."""


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Capture:
    """Observed protected updates of ``N`` clients (host arrays).

    Attributes:
      fc_weight_grad: float32 ``[N, K, d]``.
      fc_bias_grad: float32 ``[N, K]``.
      labels: int32 ``[N]`` or ``[N, B]``.
      images: uint8 ``[N, H, W, C]`` / ``[N, B, H, W, C]`` or ``None``.
      meta: JSON-ready description (model, dataset, DP settings, ...).
      update: flattened ``{"path/to/leaf": [N, ...]}`` protected update, or ``None``.
      params: flattened victim variables ``{"params/...": array}``, or ``None``.
    """

    fc_weight_grad: np.ndarray
    fc_bias_grad: np.ndarray
    labels: np.ndarray
    images: np.ndarray | None
    meta: dict[str, Any]
    update: dict[str, np.ndarray] | None = None
    params: dict[str, np.ndarray] | None = None

    @property
    def n(self) -> int:
        return int(self.fc_weight_grad.shape[0])

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.meta["feature_shape"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.meta["image_shape"])

    def images_float(self) -> np.ndarray | None:
        """Images as float32 in [0, 1] (the exact pixels the gradients were taken on)."""
        return None if self.images is None else self.images.astype(np.float32) / 255.0


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (host copies)."""
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_tree(value, path))
        else:
            out[path] = np.asarray(value)
    return out


def unflatten_tree(flat: Mapping[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten_tree`."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _encode_meta(meta: Mapping[str, Any]) -> str:
    def fix(v):  # JSON has no inf; keep it readable and round-trippable.
        if isinstance(v, float) and not math.isfinite(v):
            return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
        if isinstance(v, Mapping):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [fix(x) for x in v]
        return v

    return json.dumps(fix(dict(meta)), default=_json_default, sort_keys=True)


def _decode_meta(text: str) -> dict[str, Any]:
    meta = json.loads(text)
    for k in ("epsilon", "noise_std", "noise_variance", "clip"):
        if isinstance(meta.get(k), str) and meta[k] in ("inf", "-inf", "nan"):
            meta[k] = float(meta[k])
    return meta


def save_capture(path: str | os.PathLike, capture: Capture, *, compress: bool = False) -> None:
    """Writes ``capture`` to ``path`` (``.npz``), validating it first."""
    validate_capture(capture, source=str(path))
    arrays: dict[str, np.ndarray] = {
        "fc_weight_grad": np.asarray(capture.fc_weight_grad, np.float32),
        "fc_bias_grad": np.asarray(capture.fc_bias_grad, np.float32),
        "labels": np.asarray(capture.labels, np.int32),
        "meta": np.array(_encode_meta(capture.meta)),
    }
    if capture.images is not None:
        arrays["images"] = np.asarray(capture.images, np.uint8)
    for name, flat in (("update", capture.update), ("params", capture.params)):
        for key, value in (flat or {}).items():
            # params holds both "params/..." and "batch_stats/..." variables.
            full = key if name == "params" else f"update/{key}"
            arrays[full] = np.asarray(value)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp.npz"
    (np.savez_compressed if compress else np.savez)(tmp, **arrays)
    os.replace(tmp, path)


def load_capture(path: str | os.PathLike) -> Capture:
    """Reads and validates a capture file.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CaptureFormatError: the file is not a valid capture; the message names the
        key and what is wrong with it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"capture file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CaptureFormatError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CaptureFormatError(f"{path}: not a readable .npz file ({e})") from e
    with npz:
        arrays: dict[str, np.ndarray] = {}
        for key in npz.files:
            try:
                arrays[key] = npz[key]
            except ValueError as e:
                raise CaptureFormatError(
                    f"{path}: key {key!r} holds pickled Python objects, which captures never contain "
                    "(plain numeric arrays and a JSON string only)"
                ) from e
    missing = [k for k in ("fc_weight_grad", "fc_bias_grad", "labels", "meta") if k not in arrays]
    if missing:
        raise CaptureFormatError(f"{path}: missing required key(s) {missing}; present: {sorted(arrays)}")
    meta_arr = arrays["meta"]
    if meta_arr.shape != () or meta_arr.dtype.kind not in "US":
        raise CaptureFormatError(f"{path}: 'meta' must be a 0-d string (JSON), got {meta_arr.dtype} {meta_arr.shape}")
    try:
        meta = _decode_meta(str(meta_arr))
    except json.JSONDecodeError as e:
        raise CaptureFormatError(f"{path}: 'meta' is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CaptureFormatError(f"{path}: 'meta' must be a JSON object")
    update = {k[len("update/"):]: v for k, v in arrays.items() if k.startswith("update/")}
    params = {k: v for k, v in arrays.items() if k.startswith(("params/", "batch_stats/"))}
    capture = Capture(
        fc_weight_grad=arrays["fc_weight_grad"],
        fc_bias_grad=arrays["fc_bias_grad"],
        labels=arrays["labels"],
        images=arrays.get("images"),
        meta=meta,
        update=update or None,
        params=params or None,
    )
    validate_capture(capture, source=path)
    return dataclasses.replace(
        capture,
        fc_weight_grad=capture.fc_weight_grad.astype(np.float32, copy=False),
        fc_bias_grad=capture.fc_bias_grad.astype(np.float32, copy=False),
        labels=capture.labels.astype(np.int32, copy=False),
    )


def validate_capture(capture: Capture, *, source: str = "capture") -> None:
    """Checks shapes, dtypes, finiteness and metadata; raises :class:`CaptureFormatError`."""

    def fail(msg: str):
        raise CaptureFormatError(f"{source}: {msg}")

    gw, gb, labels, images, meta = (
        np.asarray(capture.fc_weight_grad), np.asarray(capture.fc_bias_grad),
        np.asarray(capture.labels), capture.images, capture.meta,
    )
    if gw.ndim != 3:
        fail(f"fc_weight_grad must be [N, K, d], got shape {gw.shape}")
    if gw.dtype.kind != "f":
        fail(f"fc_weight_grad must be floating point, got {gw.dtype}")
    n, k, d = gw.shape
    if n < 1 or k < 1 or d < 1:
        fail(f"fc_weight_grad has an empty axis: shape {gw.shape}")
    if gb.shape != (n, k):
        fail(f"fc_bias_grad must be [N, K] = {(n, k)} to match fc_weight_grad, got {gb.shape}")
    if gb.dtype.kind != "f":
        fail(f"fc_bias_grad must be floating point, got {gb.dtype}")
    for name, arr in (("fc_weight_grad", gw), ("fc_bias_grad", gb)):
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            fail(f"{name} contains {bad} non-finite value(s) (NaN or inf)")
    if labels.dtype.kind not in "iu":
        fail(f"labels must be integers, got {labels.dtype}")
    if labels.ndim not in (1, 2) or labels.shape[0] != n:
        fail(f"labels must be [N] or [N, B] with N = {n}, got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        fail(f"labels must be in [0, K) = [0, {k}), got range [{labels.min()}, {labels.max()}]")
    if not isinstance(meta, Mapping):
        fail("meta must be a JSON object")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        fail(f"meta is missing field(s) {missing}")
    try:
        feature_shape = tuple(int(v) for v in meta["feature_shape"])
        image_shape = tuple(int(v) for v in meta["image_shape"])
    except (TypeError, ValueError):
        fail("meta.feature_shape and meta.image_shape must be lists of integers")
    if len(feature_shape) != 3 or len(image_shape) != 3:
        fail(f"meta.feature_shape and meta.image_shape must be [H, W, C], got {feature_shape}, {image_shape}")
    if int(np.prod(feature_shape)) != d:
        fail(f"meta.feature_shape {list(feature_shape)} has {int(np.prod(feature_shape))} elements "
             f"but fc_weight_grad has d = {d}")
    if meta["feature_layout"] != "HWC":
        fail(f"meta.feature_layout must be 'HWC', got {meta['feature_layout']!r}")
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            fail(f"images must be uint8, got {images.dtype}")
        want = (n, *labels.shape[1:], *image_shape)
        if images.shape != want:
            fail(f"images must have shape {want} (N{', B' if labels.ndim == 2 else ''}, *image_shape), "
                 f"got {images.shape}")
    for name, flat in (("update", capture.update), ("params", capture.params)):
        for key, value in (flat or {}).items():
            value = np.asarray(value)
            if value.dtype.kind not in "fiu":
                fail(f"{name} entry {key!r} must be numeric, got {value.dtype}")
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                fail(f"{name} entry {key!r} contains non-finite values")
            if name == "update" and (value.ndim < 1 or value.shape[0] != n):
                fail(f"update entry {key!r} must have leading axis N = {n}, got {value.shape}")
