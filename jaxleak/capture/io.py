"""The capture file: what an attacker observed, as a plain ``.npz`` (format version 2).

Readable with ``numpy.load(path, allow_pickle=False)`` by any tool. ``N`` clients, each
holding ``M`` images and running ``E`` local epochs of ``S`` steps of batch ``B``:

* ``update/<param path>`` float32 ``[N, ...]``: each client's protected update in the
  descent direction (``w0 - w1``; FedSGD: the gradient), as a flattened params tree
  (``update/head/kernel`` ``[N, d, K]``). Every layer (``meta.update_scope == "all"``) or
  only the attacked dense layer at ``meta.layer_path`` (``"head"``).
* ``params/<path>``, ``batch_stats/<path>``: the server weights ``w0``, stored once
  (optional; ``meta.init_seed`` / ``meta.checkpoint`` may recreate them instead).
* ``truth/images`` uint8 ``[N, M, H, W, C]``, ``truth/labels`` int32 ``[N, M]``,
  ``truth/schedule`` int32 ``[N, E, S, B]`` (indices into the client's ``M`` images,
  ``-1`` pads a short last batch): the ground truth, all optional.
* ``meta``: a 0-d string holding a JSON object (:data:`REQUIRED_META`).

``meta`` is strict JSON: it never holds the ``NaN`` / ``Infinity`` tokens that many JSON
parsers reject. A non-finite float in a capture's ``meta`` (an ``epsilon`` of ``inf`` when
nothing is protected) is written as ``null``, so it reads back as ``None``.

The FC view ``[N, K, d]`` / ``[N, K]`` that SPE, Venom and FGLA read
(:attr:`Capture.fc_weight_grad`, :attr:`Capture.fc_bias_grad`) is derived from
``update/<layer path>/kernel|bias``, never stored twice. Version 1 files (keys
``fc_weight_grad``, ``fc_bias_grad``, ``labels``, ``images``) still load, converted to a
version 2 :class:`Capture` in memory; :func:`save_capture` always writes version 2.

Loading checks every ``.npy`` header before reading the array, then validates shapes,
dtypes, finiteness, label and schedule ranges and ``meta``: anything that is not a valid
capture raises :class:`CaptureFormatError` with a one-line message naming the key or field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import numbers
import os
import uuid
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import numpy as np

FORMAT_VERSION = 2

REQUIRED_META = (
    "format_version",
    "model",
    "image_shape",
    "num_classes",
    "feature_shape",
    "feature_layout",
    "layer",
    "layer_path",
    "update_scope",
    "protocol",
    "defenses",
    "dp",
    "dataset",
    "seed",
    "jaxleak_version",
    # Flat copies that today's readers use.
    "batch_size",
    "calibration",
    "mechanism",
    "epsilon",
    "delta",
    "clip",
    "noise_std",
    "noise_variance",
)
"""Fields every version 2 ``meta`` holds (see :func:`validate_capture` for their types)."""

REQUIRED_META_V1 = (
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
"""Fields a version 1 ``meta`` had to hold."""

PROTOCOL_FIELDS = (
    "kind", "local_epochs", "local_batch", "local_steps", "samples", "optimizer", "lr",
)
UPDATE_SCOPES = ("all", "head")
PROTOCOL_KINDS = ("fedsgd", "fedavg")

# Flat meta fields that copy the DP record of ``meta.dp``.
_DP_COPIES = ("calibration", "mechanism", "epsilon", "delta", "clip", "noise_std", "noise_variance")
# Numbers (or null) wherever they appear, flat or in ``meta.dp``.
_NUMBERS = ("epsilon", "delta", "clip", "noise_std", "noise_variance", "noise_multiplier",
            "noise_scale", "dp_lr", "epsilon_tight", "sampling_rate")
_TRUTH = ("truth/images", "truth/labels", "truth/schedule")
_VARIABLE_PREFIXES = ("params/", "batch_stats/")
_INT32 = np.iinfo(np.int32)


class CaptureFormatError(ValueError):
    """A capture file is unreadable or inconsistent; the one-line message says exactly how."""


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Capture:
    """Observed protected updates of ``N`` clients (host arrays), as stored in a version 2 file.

    Construction does not validate (:func:`validate_capture` does; :func:`save_capture`
    and :func:`load_capture` call it).

    Attributes:
      update: flat ``{"head/kernel": [N, d, K], "head/bias": [N, K], ...}`` float32
        protected updates in the descent direction; holds at least the attacked dense
        layer (``meta["layer_path"]``), every layer when ``meta["update_scope"] == "all"``.
      meta: JSON-ready description (:data:`REQUIRED_META`).
      params: the server weights ``w0``, flat ``{"params/...": a, "batch_stats/...": b}``,
        or ``None``.
      truth_images: uint8 ``[N, M, H, W, C]`` or ``None``.
      truth_labels: int32 ``[N, M]`` or ``None``.
      schedule: int32 ``[N, E, S, B]`` indices into each client's ``M`` images
        (``-1`` pads a short last batch), or ``None``.

    >>> import numpy as np
    >>> cap = Capture(update={"head/kernel": np.ones((2, 3, 4), np.float32),
    ...                       "head/bias": np.ones((2, 4), np.float32)},
    ...               meta={"layer_path": ["head"], "update_scope": "head"})
    >>> cap.n, cap.fc_weight_grad.shape, cap.whole_update is None
    (2, (2, 4, 3), True)
    """

    update: dict[str, np.ndarray]
    meta: dict[str, Any]
    params: dict[str, np.ndarray] | None = None
    truth_images: np.ndarray | None = None
    truth_labels: np.ndarray | None = None
    schedule: np.ndarray | None = None

    def __repr__(self) -> str:
        try:
            n = self.n
        except (KeyError, TypeError, IndexError, AttributeError):
            n = "?"
        return (f"Capture(n={n}, model={self.meta.get('model')!r}, "
                f"layer_path={self.meta.get('layer_path')!r}, update_keys={len(self.update)}, "
                f"params={'yes' if self.params else 'no'}, "
                f"truth_images={'yes' if self.truth_images is not None else 'no'})")

    @property
    def layer_key(self) -> str:
        """The update path of the attacked dense layer, e.g. ``"head"``."""
        return "/".join(self.meta["layer_path"])

    @property
    def n(self) -> int:
        """Number of clients ``N``."""
        return int(np.shape(self.update[f"{self.layer_key}/kernel"])[0])

    @property
    def samples(self) -> int:
        """Images per client ``M``."""
        return int(self.meta["protocol"]["samples"])

    @property
    def protocol(self) -> dict[str, Any]:
        """``meta["protocol"]``: ``kind``, ``local_epochs``, ``local_batch``, ``samples``, ..."""
        return self.meta["protocol"]

    @functools.cached_property
    def fc_weight_grad(self) -> np.ndarray:
        """float32 ``[N, K, d]``: the attacked layer's update, class-major (computed once)."""
        kernel = np.asarray(self.update[f"{self.layer_key}/kernel"])
        return np.ascontiguousarray(np.swapaxes(kernel, 1, 2))

    @property
    def fc_bias_grad(self) -> np.ndarray:
        """float32 ``[N, K]``."""
        return np.asarray(self.update[f"{self.layer_key}/bias"])

    @property
    def labels(self) -> np.ndarray | None:
        """int32 ``[N]`` when ``M == 1``, else ``[N, M]``; ``None`` when unknown."""
        if self.truth_labels is None:
            return None
        labels = np.asarray(self.truth_labels)
        return labels[:, 0] if labels.shape[1] == 1 else labels

    @property
    def images(self) -> np.ndarray | None:
        """uint8 ``[N, H, W, C]`` when ``M == 1``, else ``[N, M, H, W, C]``; ``None`` if unknown."""
        if self.truth_images is None:
            return None
        images = np.asarray(self.truth_images)
        return images[:, 0] if images.shape[1] == 1 else images

    def images_float(self) -> np.ndarray | None:
        """:attr:`images` as float32 in [0, 1] (the exact pixels the updates were taken on)."""
        images = self.images
        return None if images is None else images.astype(np.float32) / 255.0

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """The attacked layer's input as an ``[H, W, C]`` map (``d = H * W * C``)."""
        return tuple(int(v) for v in self.meta["feature_shape"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""
        return tuple(int(v) for v in self.meta["image_shape"])

    @property
    def num_classes(self) -> int:
        """``K`` of the classifier."""
        return int(self.meta["num_classes"])

    @property
    def whole_update(self) -> dict[str, np.ndarray] | None:
        """:attr:`update` when it holds every layer (``update_scope == "all"``), else ``None``."""
        return self.update if self.meta.get("update_scope") == "all" else None


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (host copies).

    >>> flatten_tree({"head": {"bias": [1.0]}})
    {'head/bias': array([1.])}
    """
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_tree(value, path))
        else:
            out[path] = np.asarray(value)
    return out


def unflatten_tree(flat: Mapping[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten_tree`.

    >>> unflatten_tree({"head/bias": 1, "head/kernel": 2})
    {'head': {'bias': 1, 'kernel': 2}}
    """
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


# --------------------------------------------------------------------------- helpers


def _failer(source: str) -> Callable[[str], NoReturn]:
    def fail(msg: str) -> NoReturn:
        # One line, always: the CLI prints it as the whole error.
        raise CaptureFormatError(" ".join(f"{source}: {msg}".split()))

    return fail


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)


def _same(a: Any, b: Any) -> bool:
    """Equal as written to the file (where every non-finite float is null)."""

    def norm(v):
        return None if isinstance(v, float | np.floating) and not math.isfinite(v) else v

    return norm(a) == norm(b)


def _json_ready(value: Any, where: str, fail: Callable[[str], NoReturn]) -> Any:
    """``value`` as plain JSON types; non-finite floats become ``None`` (strict JSON)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                fail(f"{where} has a non-string key {_show(k)} (JSON objects have string keys)")
            out[k] = _json_ready(v, f"{where}.{k}", fail)
        return out
    if isinstance(value, list | tuple):
        return [_json_ready(v, f"{where}[{i}]", fail) for i, v in enumerate(value)]
    fail(f"{where} is not JSON-ready: a {type(value).__name__}")


def _encode_meta(meta: Mapping[str, Any], fail: Callable[[str], NoReturn]) -> str:
    return json.dumps(_json_ready(meta, "meta", fail), sort_keys=True, allow_nan=False)


def _reject_constant(token: str) -> NoReturn:
    raise ValueError(f"{token} is not strict JSON")


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _decode_meta(arr: np.ndarray, fail: Callable[[str], NoReturn]) -> dict[str, Any]:
    if arr.shape != () or arr.dtype.kind not in "US":
        fail(f"key 'meta' must be a 0-d string (JSON), got {arr.dtype} {arr.shape}")
    text = arr.item()
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            fail("key 'meta' is not UTF-8 text")
    try:
        meta = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        fail(f"key 'meta' is not valid strict JSON ({e})")
    if not isinstance(meta, dict):
        fail(f"key 'meta' must be a JSON object, got a JSON {_JSON_TYPES.get(type(meta), 'value')}")
    return meta


# ----------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What the meta says the arrays must look like."""

    image_shape: tuple[int, ...]
    feature_shape: tuple[int, ...]
    num_classes: int
    layer_key: str
    head_layer: bool
    epochs: int
    steps: int
    batch: int
    samples: int
    scope: str


def _shape3(meta: Mapping, field: str, fail) -> tuple[int, ...]:
    v = meta[field]
    if (not isinstance(v, list | tuple) or len(v) != 3
            or not all(_is_int(x) and x >= 1 for x in v)):
        fail(f"meta.{field} must be [H, W, C] of positive integers, got {_show(v)}")
    return tuple(int(x) for x in v)


def _check_numbers(record: Mapping, where: str, fail) -> None:
    for field in _NUMBERS:
        if field in record and record[field] is not None and not _is_number(record[field]):
            fail(f"{where}.{field} must be a number or null, got {_show(record[field])}")


def _check_protocol(p: Any, fail) -> tuple[int, int, int, int]:
    if not isinstance(p, Mapping):
        fail(f"meta.protocol must be an object with {list(PROTOCOL_FIELDS)}, got {_show(p)}")
    missing = [k for k in PROTOCOL_FIELDS if k not in p]
    if missing:
        fail(f"meta.protocol is missing field(s) {missing}")
    if p["kind"] not in PROTOCOL_KINDS:
        fail(f"meta.protocol.kind must be one of {PROTOCOL_KINDS}, got {_show(p['kind'])}")
    for k in ("local_epochs", "local_batch", "local_steps", "samples"):
        if not _is_int(p[k]) or p[k] < 1:
            fail(f"meta.protocol.{k} must be an integer >= 1, got {_show(p[k])}")
    if p["optimizer"] is not None and not isinstance(p["optimizer"], str):
        fail(f"meta.protocol.optimizer must be a string or null, got {_show(p['optimizer'])}")
    if p["lr"] is not None and not _is_number(p["lr"]):
        fail(f"meta.protocol.lr must be a number or null, got {_show(p['lr'])}")
    if p.get("global_epoch") is not None and not (_is_number(p["global_epoch"]) and p["global_epoch"] >= 0):
        fail("meta.protocol.global_epoch must be a number >= 0 or null, "
             f"got {_show(p['global_epoch'])}")
    e, s, b, m = (int(p[k]) for k in ("local_epochs", "local_steps", "local_batch", "samples"))
    if b > m:
        fail(f"meta.protocol.local_batch {b} exceeds meta.protocol.samples {m}")
    if s != -(-m // b):
        fail(f"meta.protocol.local_steps must be ceil(samples / local_batch) = {-(-m // b)}, "
             f"got {s}")
    if p["kind"] == "fedsgd" and (e != 1 or b != m):
        fail(f"meta.protocol: fedsgd takes one step on all samples (local_epochs 1, local_batch "
             f"{m}), got local_epochs {e}, local_batch {b}")
    return e, s, b, m


def _check_meta(meta: Any, fail) -> _Shape:
    if not isinstance(meta, Mapping):
        fail(f"meta must be a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        fail(f"meta.format_version must be {FORMAT_VERSION}, got {_show(version)}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        fail(f"meta is missing field(s) {missing}")
    for field in ("model", "layer", "dataset", "jaxleak_version", "calibration"):
        if not isinstance(meta[field], str):
            fail(f"meta.{field} must be a string, got {_show(meta[field])}")
    if meta["mechanism"] is not None and not isinstance(meta["mechanism"], str):
        fail(f"meta.mechanism must be a string or null, got {_show(meta['mechanism'])}")
    if meta["feature_layout"] != "HWC":
        fail(f"meta.feature_layout must be 'HWC', got {_show(meta['feature_layout'])}")
    image_shape = _shape3(meta, "image_shape", fail)
    feature_shape = _shape3(meta, "feature_shape", fail)
    num_classes = meta["num_classes"]
    if not _is_int(num_classes) or num_classes < 2:
        fail(f"meta.num_classes must be an integer >= 2, got {_show(num_classes)}")
    for field in ("seed", "batch_size"):
        if not _is_int(meta[field]):
            fail(f"meta.{field} must be an integer, got {_show(meta[field])}")
    if meta.get("init_seed") is not None and not _is_int(meta["init_seed"]):
        fail(f"meta.init_seed must be an integer or null, got {_show(meta['init_seed'])}")
    if meta.get("checkpoint") is not None and not isinstance(meta["checkpoint"], str):
        fail(f"meta.checkpoint must be a string or null, got {_show(meta['checkpoint'])}")
    _check_numbers(meta, "meta", fail)
    path = meta["layer_path"]
    if (not isinstance(path, list | tuple) or not path
            or not all(isinstance(k, str) and k and "/" not in k for k in path)):
        fail(f"meta.layer_path must be a non-empty list of key names, got {_show(path)}")
    if meta["update_scope"] not in UPDATE_SCOPES:
        fail(f"meta.update_scope must be one of {UPDATE_SCOPES}, got {_show(meta['update_scope'])}")
    e, s, b, m = _check_protocol(meta["protocol"], fail)
    if meta["batch_size"] != b:
        fail(f"meta.batch_size must equal meta.protocol.local_batch {b}, got {meta['batch_size']}")
    defenses = meta["defenses"]
    if not isinstance(defenses, list | tuple):
        fail(f"meta.defenses must be a list of objects, got {_show(defenses)}")
    for i, d in enumerate(defenses):
        if not isinstance(d, Mapping) or not isinstance(d.get("name"), str):
            fail(f"meta.defenses[{i}] must be an object with a string 'name', got {_show(d)}")
    dp = meta["dp"]
    if dp is None:
        if meta["calibration"] != "none":
            fail("meta.calibration must be 'none' when meta.dp is null, "
                 f"got {_show(meta['calibration'])}")
    elif isinstance(dp, Mapping):
        _check_numbers(dp, "meta.dp", fail)
        for k in _DP_COPIES:
            if k in dp and not _same(dp[k], meta[k]):
                fail(f"meta.{k} {_show(meta[k])} must copy meta.dp.{k} {_show(dp[k])}")
    else:
        fail(f"meta.dp must be an object or null, got {_show(dp)}")
    _json_ready(meta, "meta", fail)
    return _Shape(image_shape=image_shape, feature_shape=feature_shape,
                  num_classes=int(num_classes), layer_key="/".join(path),
                  head_layer=meta["layer"] == "head", epochs=e, steps=s, batch=b, samples=m,
                  scope=meta["update_scope"])


def _check_float_leaf(key: str, value: Any, fail) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype.kind != "f":
        fail(f"{key} must be floating point, got {value.dtype}")
    finite = np.isfinite(value)
    if not finite.all():
        fail(f"{key} contains {int(finite.size - np.count_nonzero(finite))} non-finite value(s) "
             "(NaN or inf)")
    return value


def _check_int_array(key: str, value: Any, want: tuple[int, ...], low: int, high: int,
                     fail) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype.kind not in "iu":
        fail(f"{key} must hold integers, got {value.dtype}")
    if value.shape != want:
        fail(f"{key} must have shape {want}, got {value.shape}")
    if value.size and (value.min() < low or value.max() >= high):
        fail(f"{key} must be in [{low}, {high}), got range [{value.min()}, {value.max()}]")
    return value


def _check_update(update: Any, s: _Shape, fail) -> int:
    if not isinstance(update, Mapping) or not update:
        fail("update must be a non-empty mapping of param paths to [N, ...] arrays")
    kernel_key, bias_key = f"{s.layer_key}/kernel", f"{s.layer_key}/bias"
    for key in (kernel_key, bias_key):
        if key not in update:
            fail(f"update/{key} is missing (meta.layer_path names the attacked layer "
                 f"{s.layer_key!r}); present: {_show(sorted(map(str, update)), 120)}")
    kernel = np.asarray(update[kernel_key])
    if kernel.ndim != 3 or 0 in kernel.shape:
        fail(f"update/{kernel_key} must be [N, d, K] with no empty axis, got {kernel.shape}")
    n, d, k = kernel.shape
    if d != math.prod(s.feature_shape):
        fail(f"update/{kernel_key} has d = {d} inputs but meta.feature_shape "
             f"{list(s.feature_shape)} has {math.prod(s.feature_shape)}")
    if s.head_layer and k != s.num_classes:
        fail(f"update/{kernel_key} has K = {k} outputs but meta.num_classes is {s.num_classes}")
    bias = np.asarray(update[bias_key])
    if bias.shape != (n, k):
        fail(f"update/{bias_key} must be [N, K] = {(n, k)}, got {bias.shape}")
    for key, value in update.items():
        if not isinstance(key, str) or not key or not all(key.split("/")):
            fail(f"update key {_show(key)} is not a param path like 'head/kernel'")
        value = _check_float_leaf(f"update/{key}", value, fail)
        if value.ndim < 1 or value.shape[0] != n:
            fail(f"update/{key} must lead with N = {n} clients, got shape {value.shape}")
    return n


def _check_params(params: Any, update: Mapping, scope: str, fail) -> None:
    if not isinstance(params, Mapping):
        fail("params must be a mapping {'params/...': array, 'batch_stats/...': array} or None")
    for key, value in params.items():
        if not isinstance(key, str) or not key.startswith(_VARIABLE_PREFIXES):
            fail(f"params key {_show(key)} must start with 'params/' or 'batch_stats/'")
        value = np.asarray(value)
        if value.dtype.kind not in "fiu":
            fail(f"{key} must be numeric, got {value.dtype}")
        if value.dtype.kind == "f":
            _check_float_leaf(key, value, fail)
    for key, value in update.items():
        want = params.get(f"params/{key}")
        if want is None:
            fail(f"update/{key} has no matching params/{key} in the server weights")
        if np.shape(value)[1:] != np.shape(want):
            fail(f"update/{key} is {np.shape(value)[1:]} per client but params/{key} is "
                 f"{np.shape(want)}")
    if scope == "all":
        for key in params:
            if key.startswith("params/") and key[len("params/"):] not in update:
                fail(f"meta.update_scope is 'all' but update/{key[len('params/'):]} is missing")


def validate_capture(capture: Capture, *, source: str = "capture") -> None:
    """Checks shapes, dtypes, finiteness, ranges and ``meta`` of ``capture``.

    Args:
      capture: the capture to check.
      source: the file name (or other label) every message starts with.

    Raises:
      CaptureFormatError: one line naming the key or meta field and what is wrong.

    >>> validate_capture(Capture(update={}, meta=[]))
    Traceback (most recent call last):
    ...
    jaxleak.capture.io.CaptureFormatError: capture: meta must be a JSON object, got list
    """
    fail = _failer(source)
    s = _check_meta(capture.meta, fail)
    n = _check_update(capture.update, s, fail)
    if capture.params is not None:
        _check_params(capture.params, capture.update, s.scope, fail)
    m = s.samples
    if capture.truth_images is not None:
        images = np.asarray(capture.truth_images)
        if images.dtype != np.uint8:
            fail(f"truth/images must be uint8, got {images.dtype}")
        want = (n, m, *s.image_shape)
        if images.shape != want:
            fail(f"truth/images must have shape [N, M, *image_shape] = {want}, got {images.shape}")
    if capture.truth_labels is not None:
        _check_int_array("truth/labels", capture.truth_labels, (n, m), 0, s.num_classes, fail)
    if capture.schedule is not None:
        sched = _check_int_array("truth/schedule", capture.schedule,
                                 (n, s.epochs, s.steps, s.batch), -1, m, fail)
        # Every epoch visits each of the M images once; the rest is -1 padding.
        rows = np.sort(sched.reshape(n * s.epochs, -1), axis=1)
        expected = np.concatenate([np.full(s.steps * s.batch - m, -1), np.arange(m)])
        bad = np.flatnonzero(np.any(rows != expected, axis=1))
        if bad.size:
            client, epoch = divmod(int(bad[0]), s.epochs)
            fail(f"truth/schedule: epoch {epoch} of client {client} does not visit each of the "
                 f"M = {m} images exactly once")


# ----------------------------------------------------------------------- writing


def check_output_path(path: str | os.PathLike, *, force: bool = False) -> None:
    """Checks that ``path`` can receive an output file; call it BEFORE long work.

    Args:
      path: the file to be written (missing parent folders will be created).
      force: allow replacing an existing file.

    Raises:
      IsADirectoryError: ``path`` is a directory.
      FileExistsError: ``path`` exists and ``force`` is False.
      NotADirectoryError: a parent of ``path`` is a file.
      PermissionError: the folder that would hold ``path`` is not writable.

    >>> import tempfile
    >>> check_output_path(os.path.join(tempfile.mkdtemp(), "new", "caps.npz"))
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; give a file name, e.g. "
                                f"{os.path.join(path, 'captures.npz')}")
    if os.path.lexists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise NotADirectoryError(f"{path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: the folder {ancestor} is not writable")


def _arrays(capture: Capture, fail) -> dict[str, np.ndarray]:
    arrays = {f"update/{k}": np.asarray(v, np.float32) for k, v in capture.update.items()}
    arrays.update({k: np.asarray(v) for k, v in (capture.params or {}).items()})
    for key, value, dtype in (("truth/images", capture.truth_images, np.uint8),
                              ("truth/labels", capture.truth_labels, np.int32),
                              ("truth/schedule", capture.schedule, np.int32)):
        if value is not None:
            arrays[key] = np.asarray(value, dtype)
    arrays["meta"] = np.array(_encode_meta(capture.meta, fail))
    return arrays


def save_capture(path: str | os.PathLike, capture: Capture, *, force: bool = False,
                 compress: bool = False) -> None:
    """Validates ``capture`` and writes it to ``path`` as a version 2 ``.npz``, atomically.

    The file is written under a hidden temporary name in the target's folder and
    renamed over ``path`` only when complete: a killed writer leaves no file at ``path``.

    Args:
      path: the output file (parent folders are created).
      capture: what to write.
      force: replace an existing file.
      compress: zip-deflate the arrays (smaller, slower).

    Raises:
      CaptureFormatError: ``capture`` is invalid (nothing is written).
      FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError: see
        :func:`check_output_path`.

    >>> import tempfile
    >>> from jaxleak.capture.io import _example_capture
    >>> out = os.path.join(tempfile.mkdtemp(), "caps.npz")
    >>> save_capture(out, _example_capture())
    >>> load_capture(out).fc_weight_grad.shape
    (2, 3, 4)
    """
    path = os.fspath(path)
    fail = _failer(path)
    validate_capture(capture, source=path)
    check_output_path(path, force=force)
    arrays = _arrays(capture, fail)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)[:100]}.{uuid.uuid4().hex[:12]}.tmp.npz")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        if not force and os.path.lexists(path):  # appeared while we were writing
            raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------- reading


def _read_members(path: str, fail) -> dict[str, np.ndarray]:
    """Every ``.npy`` member, its header checked before any allocation."""
    try:
        zf = zipfile.ZipFile(path)
    except PermissionError:
        fail("permission denied")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        fail(f"not a readable .npz file ({type(e).__name__}: {e})")
    arrays: dict[str, np.ndarray] = {}
    with zf:
        for info in zf.infolist():
            name = info.filename
            if not name.endswith(".npy"):
                fail(f"member {name!r} is not a .npy array (not a capture file)")
            key = name[: -len(".npy")]
            if key in arrays:
                fail(f"key {key!r} appears twice")
            try:
                arrays[key] = _read_member(zf, info, key, fail)
            except CaptureFormatError:
                raise
            except MemoryError:
                fail(f"key {key!r} is too large to load into memory")
            # A broken zip or .npy raises any of a dozen types from zipfile, zlib and numpy;
            # the contract is one CaptureFormatError naming the key.
            except Exception as e:  # noqa: BLE001
                fail(f"key {key!r} is unreadable ({type(e).__name__}: {e})")
    return arrays


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, fail) -> np.ndarray:
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            fail(f"key {key!r} uses .npy format version {version}, which captures never use")
    if dtype.hasobject:
        fail(f"key {key!r} holds pickled Python objects, which captures never contain "
             "(plain numeric arrays and a JSON string only)")
    if any(s < 0 for s in shape):
        fail(f"key {key!r} has a negative dimension in its shape {shape}")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > info.file_size:
        fail(f"key {key!r}: its header claims shape {shape} of {dtype} ({claimed} bytes) but the "
             f"file holds {info.file_size} bytes for it")
    with zf.open(info) as f:
        return fmt.read_array(f, allow_pickle=False)


def _as_float32(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind != "f" or arr.dtype == np.float32:
        return arr  # validation names a non-float dtype
    with np.errstate(over="ignore"):  # an overflow becomes inf, which validation reports
        return arr.astype(np.float32)


def _as_int32(key: str, arr: np.ndarray | None, fail) -> np.ndarray | None:
    if arr is None or arr.dtype.kind not in "iu" or arr.dtype == np.int32:
        return arr
    if arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
        fail(f"{key} holds values outside the int32 range")
    return arr.astype(np.int32)


def _from_v2(arrays: dict[str, np.ndarray], meta: dict, fail) -> Capture:
    update, params, truth = {}, {}, {}
    for key, arr in arrays.items():
        if key.startswith("update/"):
            update[key[len("update/"):]] = _as_float32(arr)
        elif key.startswith(_VARIABLE_PREFIXES):
            params[key] = _as_float32(arr)
        elif key in _TRUTH:
            truth[key] = arr
        else:
            fail(f"unexpected key {key!r} in a version 2 capture (expected update/..., "
                 "params/..., batch_stats/..., truth/images|labels|schedule, meta)")
    return Capture(
        update=update, meta=meta, params=params or None,
        truth_images=truth.get("truth/images"),
        truth_labels=_as_int32("truth/labels", truth.get("truth/labels"), fail),
        schedule=_as_int32("truth/schedule", truth.get("truth/schedule"), fail),
    )


_V1_KEYS = ("fc_weight_grad", "fc_bias_grad", "labels", "images")
_V1_DP = ("calibration", "mechanism", "epsilon", "delta", "clip", "noise_std", "noise_variance",
          "noise_multiplier", "noise_scale", "accountant", "scope")
_V1_DEFENSE_NAMES = {"paper": "dp-paper", "dpsgd": "dpsgd"}


def _from_v1(arrays: dict[str, np.ndarray], meta: dict, fail) -> Capture:
    """A version 1 file as a version 2 capture: one FedSGD step on all B images."""
    for key in arrays:
        if key not in _V1_KEYS and not key.startswith(("update/", *_VARIABLE_PREFIXES)):
            fail(f"unexpected key {key!r} in a version 1 capture")
    missing = [k for k in ("fc_weight_grad", "fc_bias_grad", "labels") if k not in arrays]
    if missing:
        fail(f"missing required key(s) {missing}; present: {_show(sorted(arrays), 120)}")
    missing = [k for k in REQUIRED_META_V1 if k not in meta]
    if missing:
        fail(f"meta is missing field(s) {missing}")
    gw, gb, labels = arrays["fc_weight_grad"], arrays["fc_bias_grad"], arrays["labels"]
    if gw.ndim != 3 or gw.dtype.kind != "f":
        fail(f"fc_weight_grad must be float [N, K, d], got {gw.dtype} {gw.shape}")
    n, k, _ = gw.shape
    if gb.shape != (n, k):
        fail(f"fc_bias_grad must be [N, K] = {(n, k)} to match fc_weight_grad, got {gb.shape}")
    if labels.dtype.kind not in "iu":
        fail(f"labels must be integers, got {labels.dtype}")
    if labels.ndim not in (1, 2) or labels.shape[0] != n:
        fail(f"labels must be [N] or [N, B] with N = {n}, got {labels.shape}")
    images = arrays.get("images")
    if images is not None and images.ndim != labels.ndim + 3:
        fail("images must be [N, H, W, C] (or [N, B, H, W, C] with [N, B] labels), "
             f"got {images.shape}")
    batch = labels.shape[1] if labels.ndim == 2 else 1
    if not _is_int(meta["batch_size"]) or meta["batch_size"] != batch:
        fail(f"meta.batch_size must be {batch}, the labels' B, got {_show(meta['batch_size'])}")
    layer = meta["layer"]
    path = meta.get("layer_path", [layer])
    if not isinstance(path, list) or not path or not all(isinstance(p, str) and p for p in path):
        fail(f"meta.layer_path must be a non-empty list of key names, got {_show(path)}")
    calibration = meta["calibration"]
    if not isinstance(calibration, str):
        fail(f"meta.calibration must be a string, got {_show(calibration)}")
    if "num_classes" not in meta and layer != "head":
        fail(f"meta.num_classes is missing (needed for layer {_show(layer)})")

    new = dict(meta)
    for field in ("epsilon", "noise_std", "noise_variance", "clip"):
        if isinstance(new.get(field), str) and new[field] in ("inf", "-inf", "nan"):
            new[field] = float(new[field])  # v1 spelled non-finite floats as strings
    if "noise_variance" not in new:
        std = new["noise_std"]
        new["noise_variance"] = std * std if _is_number(std) else None
    dp = None
    defenses = []
    if calibration != "none":
        dp = {f: new[f] for f in _V1_DP if f in new}
        if new.get("dp_lr") is not None:
            dp["lr"] = new["dp_lr"]
        name = _V1_DEFENSE_NAMES.get(calibration, calibration)
        defenses = [{"name": name, **{f: v for f, v in dp.items() if f != "calibration"}}]
    update = {key[len("update/"):]: _as_float32(a) for key, a in arrays.items()
              if key.startswith("update/")}
    head = "/".join(path)
    scope = "all" if update else "head"
    # The v1 FC arrays are what its attacks read; they win over a copy inside update/.
    update[f"{head}/kernel"] = np.swapaxes(_as_float32(gw), 1, 2)
    update[f"{head}/bias"] = _as_float32(gb)
    new.update(
        format_version=FORMAT_VERSION, upgraded_from=1, layer_path=list(path), update_scope=scope,
        num_classes=meta.get("num_classes", k), defenses=defenses, dp=dp,
        protocol={"kind": "fedsgd", "local_epochs": 1, "local_batch": batch, "local_steps": 1,
                  "samples": batch, "optimizer": None, "lr": None, "global_epoch": None},
    )
    params = {key: _as_float32(a) for key, a in arrays.items()
              if key.startswith(_VARIABLE_PREFIXES)}
    labels = _as_int32("labels", labels, fail)
    return Capture(
        update=update, meta=new, params=params or None,
        truth_labels=labels[:, None] if labels.ndim == 1 else labels,
        truth_images=None if images is None else (images[:, None] if labels.ndim == 1 else images),
        schedule=np.broadcast_to(np.arange(batch, dtype=np.int32), (n, 1, 1, batch)).copy(),
    )


def load_capture(path: str | os.PathLike) -> Capture:
    """Reads and validates a capture file (version 2, or version 1 converted to 2).

    Args:
      path: the ``.npz`` file.

    Returns:
      The validated :class:`Capture`: update and params float32, labels and schedule int32.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      CaptureFormatError: anything else; the one-line message names the key or meta
        field and what is wrong with it.

    >>> import tempfile
    >>> from jaxleak.capture.io import _example_capture
    >>> out = os.path.join(tempfile.mkdtemp(), "caps.npz")
    >>> save_capture(out, _example_capture())
    >>> cap = load_capture(out)
    >>> cap.n, cap.samples, cap.labels.shape, cap.meta["epsilon"]
    (2, 1, (2,), None)
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"capture file not found: {path}")
    fail = _failer(path)
    if os.path.isdir(path):
        fail("is a directory, not a capture file")
    arrays = _read_members(path, fail)
    if "meta" not in arrays:
        fail(f"missing required key 'meta'; present: {_show(sorted(arrays), 120)}")
    meta = _decode_meta(arrays.pop("meta"), fail)
    version = meta.get("format_version", 1)
    if _is_int(version) and version == FORMAT_VERSION:
        capture = _from_v2(arrays, meta, fail)
        source = path
    elif _is_int(version) and version == 1:
        capture = _from_v1(arrays, meta, fail)
        source = f"{path} (version 1 file)"
    else:
        fail(f"meta.format_version {_show(version)} is not supported (this jaxleak reads 1 and 2)")
    validate_capture(capture, source=source)
    return capture


def _example_capture(n: int = 2, d: int = 4, k: int = 3) -> Capture:
    """A tiny valid FedSGD capture without protection (docstring examples and tests)."""
    rng = np.random.default_rng(0)
    meta = {
        "format_version": FORMAT_VERSION, "model": "mlp", "image_shape": [2, 2, 1],
        "num_classes": k, "feature_shape": [1, 1, d], "feature_layout": "HWC",
        "layer": "head", "layer_path": ["head"], "update_scope": "head",
        "protocol": {"kind": "fedsgd", "local_epochs": 1, "local_batch": 1, "local_steps": 1,
                     "samples": 1, "optimizer": None, "lr": None, "global_epoch": None},
        "defenses": [], "dp": None, "dataset": "random", "seed": 0, "jaxleak_version": "0",
        "batch_size": 1, "calibration": "none", "mechanism": None, "epsilon": math.inf,
        "delta": None, "clip": None, "noise_std": 0.0, "noise_variance": 0.0,
    }
    return Capture(
        update={"head/kernel": rng.standard_normal((n, d, k)).astype(np.float32),
                "head/bias": rng.standard_normal((n, k)).astype(np.float32)},
        meta=meta,
        truth_images=rng.integers(0, 256, (n, 1, 2, 2, 1), dtype=np.uint8),
        truth_labels=rng.integers(0, k, (n, 1), dtype=np.int32),
        schedule=np.zeros((n, 1, 1, 1), np.int32),
    )
