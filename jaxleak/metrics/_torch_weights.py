"""Read PyTorch ``.pth`` state dicts into NumPy arrays without importing torch.

Two on-disk layouts exist:

* the zip layout (``torch.save`` since 1.6): a zip archive with one top-level
  folder holding ``data.pkl`` (the pickled object), ``data/<key>`` (one raw
  little-endian buffer per storage) and, in newer files, ``byteorder``;
* the legacy layout (before 1.6, e.g. the LPIPS package's ``v0.1/*.pth``): five
  pickles written back to back (magic number, protocol version, system info,
  the object, the list of storage keys) followed by each storage as an int64
  element count and its raw bytes.

In both, tensors are pickled as ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, requires_grad, hooks)`` where ``storage`` comes from a
persistent id ``('storage', <torch.XStorage>, key, location, numel, ...)``.
The unpickler below resolves exactly those globals (plus ``OrderedDict``) to
NumPy reconstruction and refuses every other global, so a malicious file cannot
run code the way ``torch.load(weights_only=False)`` would let it.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _StorageType:
    """Stand-in for a ``torch.XStorage`` class: only its element dtype matters."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)


class _Storage:
    """A flat buffer whose bytes may arrive after unpickling (legacy layout)."""

    def __init__(self, dtype: np.dtype, numel: int) -> None:
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _PendingTensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage = storage
        self.offset = offset
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    def materialize(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise ValueError("a tensor refers to a storage that the file never provides")
        if not self.size:
            return np.array(flat[self.offset])
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or any(s < 0 for s in self.stride) or last >= flat.size:
            raise ValueError(
                f"tensor view (offset {self.offset}, size {self.size}, stride {self.stride}) "
                f"does not fit in its storage of {flat.size} elements"
            )
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * flat.itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view)  # copy: detach from the shared storage buffer


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None
):
    del requires_grad, hooks, metadata  # meaningless for inference weights
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 called without a storage")
    return _PendingTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    del requires_grad, hooks
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Maps torch's tensor/storage globals to NumPy and refuses everything else."""

    def __init__(self, file, storage_source) -> None:
        super().__init__(file)
        self._storage_source = storage_source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only torch tensors, storages and "
                "OrderedDict may appear in a weights file"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        key = str(key)
        if key not in self.storages:
            storage = _Storage(storage_type.dtype, int(numel))
            storage.data = self._storage_source(key, storage)
            self.storages[key] = storage
        storage = self.storages[key]
        view = pid[5] if len(pid) > 5 else None
        if view is not None:  # legacy storage views: (view_key, offset, view_size)
            _view_key, offset, view_size = view
            return _StorageView(storage, int(offset), int(view_size))
        return storage


class _StorageView(_Storage):
    """A legacy sub-storage: a window into another storage, filled in later."""

    def __init__(self, base: _Storage, offset: int, numel: int) -> None:
        super().__init__(base.dtype, numel)
        self._base = base
        self._offset = offset

    @property
    def data(self):
        if self._base.data is None:
            return None
        return self._base.data[self._offset : self._offset + self.numel]

    @data.setter
    def data(self, value):
        del value  # the base storage owns the bytes


def _materialize(obj):
    if isinstance(obj, _PendingTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _load_zip(path: Path) -> object:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        order = "<"
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).decode().strip() == "big":
            order = ">"

        def source(key: str, storage: _Storage) -> np.ndarray:
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ValueError(f"{path}: storage {member} is missing from the archive")
            raw = archive.read(member)
            dtype = (
                storage.dtype.newbyteorder(order) if storage.dtype.itemsize > 1 else storage.dtype
            )
            expected = storage.numel * dtype.itemsize
            if len(raw) < expected:
                raise ValueError(
                    f"{path}: storage {member} holds {len(raw)} bytes, needs {expected}"
                )
            return np.frombuffer(raw[:expected], dtype=dtype).astype(storage.dtype)

        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), source)
        return _materialize(unpickler.load())


def _load_legacy(path: Path) -> object:
    with open(path, "rb") as handle:
        data = handle.read()
    stream = io.BytesIO(data)

    def plain_load():
        return _RestrictedUnpickler(stream, lambda key, storage: None).load()

    if plain_load() != _LEGACY_MAGIC:
        raise ValueError(f"{path}: not a PyTorch file (neither a zip archive nor legacy magic)")
    if plain_load() != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy PyTorch protocol version")
    sys_info = plain_load()
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    unpickler = _RestrictedUnpickler(stream, lambda key, storage: None)
    result = unpickler.load()
    keys = plain_load()
    order = "<" if little else ">"
    for key in keys:
        (numel,) = struct.unpack(order + "q", stream.read(8))
        storage = unpickler.storages.get(str(key))
        if storage is None:
            raise ValueError(f"{path}: storage {key} is listed but never referenced")
        dtype = storage.dtype.newbyteorder(order) if storage.dtype.itemsize > 1 else storage.dtype
        raw = stream.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise ValueError(f"{path}: file ends inside storage {key}")
        storage.data = np.frombuffer(raw, dtype=dtype).astype(storage.dtype)
    return _materialize(result)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a PyTorch ``.pth`` state dict as ``{name: np.ndarray}`` without torch.

    Args:
        path: A file written by ``torch.save(module.state_dict(), path)``, in the
            zip layout or the legacy (pre-1.6) layout.

    Returns:
        The flat mapping from parameter names (e.g. ``features.0.weight``) to
        arrays in torch layout (conv weights OIHW).

    Raises:
        pickle.UnpicklingError: If the file references any global other than
            torch tensors/storages and ``OrderedDict``.
        ValueError: If the file is malformed or holds no tensors.
        TypeError: If the pickled object is not a dict.
    """
    path = Path(path)
    state = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # checkpoints that wrap the state dict
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a state dict, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            out[str(key)] = value
    if not out:
        raise ValueError(f"{path}: the file holds no tensors")
    return out
