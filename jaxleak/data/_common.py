"""The `Dataset` container and the steps every loader shares.

Every backend (IDX files, image folders, the embedded MNIST digits, tfds) does
the same three things around its own reading code: choose which items of a
split to take, decode/resize them as uint8 HWC arrays, and stack them into one
float32 [0, 1] batch. Those steps live here so that all backends agree on
subset selection, resizing and channel handling.
"""

from __future__ import annotations

import dataclasses
import io
import numbers
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # jaxtyping is a test-time dependency only
    from jaxtyping import Float, Int, UInt8

__all__ = [
    "DataFormatError",
    "Dataset",
    "DatasetNotFoundError",
    "choose_indices",
    "decode_image",
    "parse_image_size",
    "resize_uint8",
    "resolve_split",
    "stack_images",
]


class DatasetNotFoundError(FileNotFoundError):
    """No place that was searched holds the requested dataset.

    Attributes:
        looked: One line per place that was searched, saying why it did not
            match (missing file, unprepared tfds copy, ...).
    """

    def __init__(self, message: str, looked: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.looked = tuple(looked)

    def __str__(self) -> str:
        return str(self.args[0])


class DataFormatError(ValueError):
    """A data file exists but cannot be read: truncated, corrupt or of the wrong kind."""


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Dataset:
    """A labelled image batch taken from one split of a dataset.

    Attributes:
        images: float32 images in [0, 1], channels last; C is 1 for grayscale
            and 3 for RGB.
        labels: int32 class indices in [0, num_classes).
        num_classes: Number of classes of the dataset (not only those present
            in this subset).
        class_names: One name per class index.
        name: Dataset name, e.g. "cifar10".
        split: The split the items were taken from (after aliasing, e.g. "val"
            when "test" was requested from a dataset without a test split).
        source: Human-readable origin, e.g. "idx:/data/mnist/t10k-images-idx3-ubyte.gz".
        indices: Position of each item within the split, in the order of `images`.

    The arrays are read-only; copy them before modifying in place.
    """

    images: Float[np.ndarray, "n h w c"]
    labels: Int[np.ndarray, " n"]
    num_classes: int
    class_names: tuple[str, ...]
    name: str
    split: str
    source: str
    indices: Int[np.ndarray, " n"]

    def __post_init__(self) -> None:
        images, labels, indices = self.images, self.labels, self.indices
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.float32:
            raise ValueError(
                "images must be a float32 array [N, H, W, C], got "
                f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}"
            )
        if images.shape[-1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got shape {images.shape}")
        n = images.shape[0]
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int32 or labels.shape != (n,):
            raise ValueError(f"labels must be an int32 array of shape ({n},)")
        if (
            not isinstance(indices, np.ndarray)
            or indices.dtype.kind not in "iu"
            or indices.shape != (n,)
        ):
            raise ValueError(f"indices must be an integer array of shape ({n},)")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for num_classes={self.num_classes}"
            )
        if n and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        # Read-only views: the caller's arrays keep their own flags.
        for field in ("images", "labels", "indices"):
            view = getattr(self, field).view()
            view.setflags(write=False)
            object.__setattr__(self, field, view)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def parse_image_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """Normalises an `image_size` argument to (height, width).

    Args:
        image_size: None (keep the stored size), one int for square images, or
            a (height, width) pair of positive ints.

    Returns:
        (height, width), or None when no resizing was asked for.

    Raises:
        ValueError: If the value is not one of the accepted forms.
    """
    if image_size is None:
        return None
    if _is_int(image_size):
        size = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, Sequence)
        and not isinstance(image_size, str)
        and len(image_size) == 2
        and all(_is_int(v) for v in image_size)
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(
            f"image_size must be a positive int or a (height, width) pair of ints, got {image_size!r}"
        )
    if min(size) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return size


def check_subset_args(n: int | None, seed: int) -> None:
    """Validates the `n` and `seed` arguments shared by every loader.

    Raises:
        ValueError: If n is not None or a positive int, or seed is not a non-negative int.
    """
    if n is not None and (not _is_int(n) or n < 1):
        raise ValueError(f"n must be None (the whole split) or a positive int, got {n!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def choose_indices(size: int, n: int | None, seed: int, *, what: str) -> Int[np.ndarray, " n"]:
    """Picks which items of a split to load.

    The first n entries of one seeded permutation, so a larger n with the same
    seed extends a smaller subset instead of drawing a new one.

    Args:
        size: Number of items in the split.
        n: How many to take; None takes the whole split in stored order.
        seed: Seed of `np.random.default_rng`.
        what: Name of the split for error messages, e.g. "split 'test' of cifar10".

    Returns:
        int64 positions within the split.

    Raises:
        ValueError: If n exceeds the split size or the split is empty.
    """
    check_subset_args(n, seed)
    if size < 1:
        raise ValueError(f"{what} is empty")
    if n is None:
        return np.arange(size, dtype=np.int64)
    if n > size:
        raise ValueError(f"n={n} is larger than {what}, which has {size} items")
    return np.random.default_rng(seed).permutation(size)[:n].astype(np.int64)


# Alternative split names tried, in order, when the requested one is missing.
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "test": ("val", "validation"),
    "val": ("validation",),
    "validation": ("val",),
}


def resolve_split(requested: str, available: Collection[str], *, dataset: str) -> tuple[str, str]:
    """Maps a requested split name onto one the dataset has.

    "test" falls back to "val"/"validation" (folder datasets such as
    tinyimagenet32 ship only train/val), and "train" falls back to the one
    split whose name starts with "train" (the offline MNIST copy has "train5k").

    Args:
        requested: The split the caller asked for.
        available: The splits the dataset has.
        dataset: Dataset name for messages.

    Returns:
        (split actually used, a note for the source string; "" when no aliasing happened).

    Raises:
        ValueError: If neither the split nor an alias exists; the message lists
            the available splits.
    """
    if requested in available:
        return requested, ""
    candidates = list(_SPLIT_ALIASES.get(requested, ()))
    if requested == "train":
        candidates += sorted(s for s in available if s.startswith("train"))[:1]
    for alias in candidates:
        if alias in available:
            return (
                alias,
                f"split '{alias}' used for requested '{requested}'; {dataset} has no '{requested}' split",
            )
    listed = ", ".join(repr(s) for s in sorted(available)) or "none"
    raise ValueError(f"{dataset} has no split {requested!r}; available splits: {listed}")


def _pil_to_uint8(image: Image.Image, *, where: str) -> UInt8[np.ndarray, "h w c"]:
    if image.mode in ("1", "L", "LA", "La"):
        return np.asarray(image.convert("L"), dtype=np.uint8)[..., None]
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise DataFormatError(
            f"{where}: {image.mode} images (16-bit/float) are not supported; convert to 8-bit"
        )
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, *, where: str) -> UInt8[np.ndarray, "h w c"]:
    """Decodes one encoded image (JPEG, PNG, ...) to uint8 HWC with C in {1, 3}.

    Grayscale stays one channel; every other mode (palette, RGBA, CMYK, ...)
    becomes RGB, dropping alpha.

    Args:
        data: The encoded file content.
        where: File or archive member name for error messages.

    Returns:
        The decoded image.

    Raises:
        DataFormatError: If PIL cannot decode the bytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _pil_to_uint8(image, where=where)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataFormatError(f"cannot decode image {where}: {err}") from err


def resize_uint8(
    image: UInt8[np.ndarray, "h w c"], size: tuple[int, int]
) -> UInt8[np.ndarray, "h2 w2 c"]:
    """Resizes one image with PIL bilinear filtering.

    Pillow widens the bilinear kernel when shrinking, so downscaling is
    antialiased (the same as torchvision's Resize on PIL images).

    Args:
        image: uint8 [H, W, C] with C in {1, 3}.
        size: Target (height, width).

    Returns:
        uint8 [height, width, C]; the input itself when it already has that size.
    """
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    mode = "L" if image.shape[-1] == 1 else "RGB"
    pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode)
    out = np.asarray(pil.resize((width, height), resample=Image.Resampling.BILINEAR))
    return out[..., None] if mode == "L" else out


def stack_images(
    images: Sequence[UInt8[np.ndarray, "h w c"]], size: tuple[int, int] | None, *, what: str
) -> Float[np.ndarray, "n h w c"]:
    """Resizes, unifies channels and stacks uint8 images into float32 [0, 1].

    When the selection mixes grayscale and RGB images (ImageNet has a few
    grayscale JPEGs) the grayscale ones are repeated to three channels, so C is
    1 only when every selected image is grayscale.

    Args:
        images: uint8 [H, W, C] arrays with C in {1, 3}.
        size: Target (height, width), or None to require equal stored sizes.
        what: Dataset description for error messages.

    Returns:
        float32 [N, H, W, C] with values in [0, 1].

    Raises:
        ValueError: If the images differ in size and no `size` was given.
    """
    if size is not None:
        images = [resize_uint8(image, size) for image in images]
    shapes = sorted({image.shape[:2] for image in images})
    if len(shapes) > 1:
        raise ValueError(
            f"images of {what} have different sizes ({', '.join(map(str, shapes[:4]))}"
            f"{', ...' if len(shapes) > 4 else ''}); pass image_size to resize them"
        )
    channels = max((image.shape[-1] for image in images), default=1)
    batch = np.empty((len(images), *(shapes[0] if shapes else (0, 0)), channels), np.float32)
    for k, image in enumerate(images):
        batch[k] = image  # broadcasting repeats a grayscale channel into RGB
    batch /= 255.0
    return batch
