"""IDX files (the MNIST distribution format), plain or gzip-compressed.

An IDX file is: two zero bytes, one type byte, one byte with the number of
dimensions d, d big-endian uint32 sizes, then the values in C order, big-endian.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

import numpy as np

from jaxleak.data._common import (
    DataFormatError,
    Dataset,
    choose_indices,
    resolve_split,
    stack_images,
)

__all__ = ["find_idx_splits", "load_idx_folder", "read_idx"]

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# "t10k-images-idx3-ubyte.gz", also the "t10k-images.idx3-ubyte" spelling of some mirrors.
_IDX_NAME = re.compile(
    r"^(?P<prefix>.+?)[-.](?P<kind>images|labels)[-.]idx(?P<ndim>\d)[-.]ubyte(?:\.gz)?$"
)
# IDX file prefixes whose split has a conventional name.
_PREFIX_SPLITS = {"t10k": "test"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads one IDX file, plain or gzip-compressed (detected from its content).

    Args:
        path: The file, e.g. "mnist/t10k-images-idx3-ubyte.gz".

    Returns:
        The array in native byte order with the file's shape and element type,
        e.g. uint8 [N, 28, 28] for MNIST images and uint8 [N] for labels.

    Raises:
        FileNotFoundError: If the file does not exist.
        DataFormatError: If it is not a valid IDX file (bad magic, unknown
            type, truncated or corrupt gzip stream).

    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "x-labels-idx1-ubyte")
    >>> _ = open(p, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    >>> read_idx(p)
    array([7, 8, 9], dtype=uint8)
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataFormatError(f"{path}: corrupt gzip stream ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFormatError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] not in _IDX_DTYPES:
        raise DataFormatError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFormatError(
            f"{path}: IDX header says shape {shape} ({expected} bytes of data) but the file "
            f"holds {len(raw) - header}"
        )
    values = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def find_idx_splits(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Finds the IDX image/label file pairs in a folder.

    Args:
        folder: A folder such as `<data_dir>/mnist`.

    Returns:
        split name -> (images file, labels file). The prefix "t10k" is named
        "test"; other prefixes ("train", "train5k") keep their name.
    """
    found: dict[str, dict[str, Path]] = {}
    for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
        match = _IDX_NAME.match(entry.name)
        if match and entry.is_file():
            prefix = match["prefix"]
            split = _PREFIX_SPLITS.get(prefix, prefix)
            found.setdefault(split, {}).setdefault(match["kind"], entry)
    return {
        split: (files["images"], files["labels"])
        for split, files in found.items()
        if {"images", "labels"} <= files.keys()
    }


def load_idx_folder(
    folder: Path,
    split: str,
    *,
    name: str,
    n: int | None,
    seed: int,
    size: tuple[int, int] | None,
    num_classes: int | None = None,
    class_names: tuple[str, ...] | None = None,
) -> Dataset:
    """Loads one split of a folder of IDX image/label pairs.

    Args:
        folder: The folder holding `<prefix>-images-idx3-ubyte[.gz]` and
            `<prefix>-labels-idx1-ubyte[.gz]`.
        split: Requested split; "train" falls back to "train5k" when that is all there is.
        name: Dataset name.
        n: Number of items (None: all).
        seed: Subset seed.
        size: Optional (height, width) to resize to.
        num_classes: Class count when known (10 for MNIST); otherwise max label + 1.
        class_names: Names per class; defaults to the class indices as strings.

    Returns:
        The loaded `Dataset`.

    Raises:
        ValueError: If the split is missing or n is too large.
        DataFormatError: If the files are corrupt or their counts disagree.
    """
    splits = find_idx_splits(folder)
    actual, note = resolve_split(split, splits, dataset=f"{name} (IDX files in {folder})")
    images_path, labels_path = splits[actual]
    labels = read_idx(labels_path)
    images = read_idx(images_path)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise DataFormatError(
            f"{images_path}: expected uint8 images [N, H, W] or [N, H, W, C], "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
        raise DataFormatError(
            f"{labels_path}: expected {len(images)} integer labels to match {images_path}, "
            f"got {labels.dtype} {labels.shape}"
        )
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(f"{labels_path}: labels outside [0, {num_classes})")
    indices = choose_indices(len(images), n, seed, what=f"split {actual!r} of {name}")
    batch = stack_images(list(images[indices]), size, what=name)
    source = f"idx:{images_path}" + (f" ({note})" if note else "")
    return Dataset(
        images=batch,
        labels=labels[indices].astype(np.int32),
        num_classes=num_classes,
        class_names=class_names or tuple(str(k) for k in range(num_classes)),
        name=name,
        split=actual,
        source=source,
        indices=indices,
    )
