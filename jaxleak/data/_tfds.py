"""tensorflow-datasets without tensorflow.

Prepared tfds datasets in the array_record format can be read through
`builder.as_data_source`, which needs neither tensorflow nor a network. This
module looks for such a prepared copy, downloads one only when asked, and
converts tfds examples (uint8 HWC image + ClassLabel) into a `Dataset`. When
tensorflow happens to be importable, copies in tfds's default tfrecord format
are read too, by streaming `builder.as_dataset`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

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

__all__ = ["TfdsAttempt", "load_tfds"]


class TfdsAttempt(NamedTuple):
    """Outcome of looking for a dataset through tfds.

    Attributes:
        dataset: The loaded dataset, or None when tfds has no usable copy.
        looked: One line per place tfds looked at, for error messages.
        known: Whether tfds knows a dataset of this name at all.
    """

    dataset: Dataset | None
    looked: tuple[str, ...]
    known: bool


def _tensorflow_importable() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # Probing an unprepared builder makes absl warn about missing dataset_info.json.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _feature_keys(info: Any, name: str) -> tuple[str, str, Any]:
    """Picks the image and class-label feature of a tfds dataset.

    The dataset's supervised keys win when they name an Image and a
    ClassLabel feature; otherwise the first Image feature and the feature
    called "label" (or the first ClassLabel) are used.
    """
    import tensorflow_datasets as tfds

    features = info.features
    keys = list(features.keys())

    def is_image(key: str) -> bool:
        return isinstance(features[key], tfds.features.Image)

    def is_label(key: str) -> bool:
        return isinstance(features[key], tfds.features.ClassLabel)

    supervised = info.supervised_keys
    if (
        isinstance(supervised, tuple)
        and len(supervised) == 2
        and all(isinstance(k, str) and k in keys for k in supervised)
        and is_image(supervised[0])
        and is_label(supervised[1])
    ):
        image_key, label_key = supervised
    else:
        images = [k for k in keys if is_image(k)]
        labels = sorted((k for k in keys if is_label(k)), key=lambda k: k != "label")
        if not images or not labels:
            raise DataFormatError(
                f"tfds:{name} has no image + class-label features to classify "
                f"(features: {', '.join(keys)})"
            )
        image_key, label_key = images[0], labels[0]
    return image_key, label_key, features[label_key]


def example_image(value: Any, *, where: str) -> UInt8[np.ndarray, "h w c"]:
    """Converts one tfds image value to uint8 HWC with 1 or 3 channels."""
    image = np.asarray(value)
    if image.dtype != np.uint8:
        raise DataFormatError(f"{where}: expected uint8 images, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]  # drop alpha
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise DataFormatError(f"{where}: expected an [H, W, 1|3] image, got shape {image.shape}")
    return image


def _stream_with_tensorflow(builder: Any, split: str, indices: np.ndarray) -> list[Any]:
    """Reads the given positions of a tfrecord split in one ordered pass."""
    import tensorflow_datasets as tfds

    slot = {int(i): k for k, i in enumerate(indices)}
    out: list[Any] = [None] * len(indices)
    last = int(indices.max())
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    for position, example in enumerate(tfds.as_numpy(dataset)):
        if position in slot:
            out[slot[position]] = example
        if position >= last:
            break
    return out


def _load_from_builder(
    builder: Any, name: str, split: str, *, n: int | None, seed: int, size: tuple[int, int] | None
) -> Dataset:
    info = builder.info
    available = list(info.splits.keys()) if info.splits else []
    if available and "[" not in split:  # tfds slicing syntax ("train[:10%]") is passed through
        actual, note = resolve_split(split, available, dataset=f"tfds:{name}")
    else:
        actual, note = split, ""
    image_key, label_key, label_feature = _feature_keys(info, name)
    try:
        source = builder.as_data_source(split=actual)
    except NotImplementedError as err:
        if not _tensorflow_importable():
            raise DataFormatError(
                f"tfds:{name} is prepared at {builder.data_dir} in the {info.file_format} format, "
                "which needs tensorflow to read. Fix: pip install tensorflow, or prepare the "
                "dataset in the array_record format (tfds build --file_format=array_record)"
            ) from err
        total = info.splits[actual].num_examples
        indices = choose_indices(total, n, seed, what=f"split {actual!r} of tfds:{name}")
        examples = _stream_with_tensorflow(builder, actual, indices)
        where = f"{info.file_format} at {builder.data_dir}"
    else:
        indices = choose_indices(len(source), n, seed, what=f"split {actual!r} of tfds:{name}")
        examples = [source[int(i)] for i in indices]
        where = f"array_record at {builder.data_dir}"
    images = [example_image(ex[image_key], where=f"tfds:{name}") for ex in examples]
    labels = np.array([int(np.asarray(ex[label_key])) for ex in examples], dtype=np.int32)
    source_text = f"tfds:{name} ({where}" + (f"; {note})" if note else ")")
    return Dataset(
        images=stack_images(images, size, what=f"tfds:{name}"),
        labels=labels,
        num_classes=int(label_feature.num_classes),
        class_names=tuple(str(c) for c in label_feature.names),
        name=name,
        split=actual,
        source=source_text,
        indices=indices,
    )


def _prepare(builder: Any, name: str, looked: Sequence[str]) -> None:
    """Downloads and prepares a tfds dataset, array_record unless tensorflow is there."""
    has_tf = _tensorflow_importable()
    try:
        if has_tf:
            builder.download_and_prepare()
        else:
            builder.download_and_prepare(file_format="array_record")
    except Exception as err:  # tfds download/prepare fails in many library-specific ways
        hint = ""
        if isinstance(err, ImportError) and "tensorflow" in str(err):
            hint = (
                " Preparing this dataset needs tensorflow: pip install tensorflow, or use an "
                "offline copy through data_dir / JAXLEAK_DATA_DIR."
            )
        places = "".join(f"\n  - {line}" for line in looked)
        raise DatasetNotFoundError(
            f"tensorflow-datasets could not download and prepare {name!r} into "
            f"{builder.data_dir}: {type(err).__name__}: {err}.{hint}\nLooked at:{places}",
            looked,
        ) from err


def load_tfds(
    name: str,
    split: str,
    *,
    n: int | None,
    seed: int,
    size: tuple[int, int] | None,
    data_dirs: Sequence[str | None],
    download: bool,
    download_dir: str | None,
) -> TfdsAttempt:
    """Loads a dataset through tensorflow-datasets if a prepared copy exists.

    Args:
        name: tfds name, optionally with config/version ("cifar10", "mnist:3.0.1").
        split: Split to load; "test" falls back to "validation".
        n: Number of items (None: all).
        seed: Subset seed.
        size: Optional (height, width) to resize to.
        data_dirs: tfds data directories to probe in order; None stands for
            tfds's default (TFDS_DATA_DIR or ~/tensorflow_datasets).
        download: Whether to download and prepare when no copy is found.
        download_dir: Where to prepare a download (None: tfds's default).

    Returns:
        The dataset if found, the places looked at, and whether tfds knows the name.

    Raises:
        DatasetNotFoundError: If a requested download fails.
        DataFormatError: If a prepared copy cannot be read without tensorflow.
        ValueError: For a missing split or too large an n.
    """
    if importlib.util.find_spec("tensorflow_datasets") is None:
        return TfdsAttempt(None, ("tfds: tensorflow-datasets is not installed",), False)
    import tensorflow_datasets as tfds

    looked: list[str] = []
    seen: set[str] = set()
    known = False
    with _quiet_absl():
        for data_dir in data_dirs:
            try:
                builder = tfds.builder(name, data_dir=data_dir)
            except tfds.core.registered.DatasetNotFoundError:
                # Unregistered names can still be prepared copies in another data dir.
                continue
            except (ValueError, AssertionError) as err:  # malformed name, unknown config/version
                first_line = (
                    str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                )
                return TfdsAttempt(None, (f"tfds: {name!r} rejected ({first_line})",), False)
            known = True
            if str(builder.data_dir) in seen:
                continue
            seen.add(str(builder.data_dir))
            if builder.is_prepared():
                dataset = _load_from_builder(builder, name, split, n=n, seed=seed, size=size)
                return TfdsAttempt(dataset, tuple(looked), True)
            looked.append(f"tfds: {name} is not prepared in {builder.data_dir}")
        if not known:
            return TfdsAttempt(None, (f"tfds: no dataset named {name!r}",), False)
        if not download:
            looked.append(
                f"tfds: download not attempted ({name} is a tfds dataset; pass download=True)"
            )
            return TfdsAttempt(None, tuple(looked), True)
        builder = tfds.builder(name, data_dir=download_dir)
        _prepare(builder, name, looked)
        dataset = _load_from_builder(builder, name, split, n=n, seed=seed, size=size)
    return TfdsAttempt(dataset, tuple(looked), True)
