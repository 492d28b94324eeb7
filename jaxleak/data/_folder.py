"""Image folders `<root>/<split>/<class>/<image>`, as a directory or a tar archive.

An archive is read in place: one pass over the (decompressed) stream parses
the tar headers and records where each image's bytes start, and a second pass
reads only the members that were selected. Nothing is extracted to disk and
only the selected images are decoded, so taking 256 images from the 60,000 of
the CIFAR-10 archive costs two decompression passes (well under a second)
rather than 60,000 JPEG decodes. The member index is cached per archive.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple, Self

import numpy as np

from jaxleak.data._common import (
    DataFormatError,
    Dataset,
    check_subset_args,
    choose_indices,
    decode_image,
    parse_image_size,
    resolve_split,
    stack_images,
)

__all__ = ["ARCHIVE_SUFFIXES", "archive_stem", "is_archive", "load_image_folder"]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


class _Item(NamedTuple):
    """One image of a split: where its bytes are and its class index."""

    member: str  # path inside the archive, or the file path for a directory
    label: int
    offset: int  # start of the data in the uncompressed tar stream (-1 for files)
    size: int


@dataclasses.dataclass(frozen=True)
class _FolderIndex:
    classes: tuple[str, ...]
    splits: Mapping[str, tuple[_Item, ...]]


def is_archive(path: Path) -> bool:
    """Whether a path names a tar archive by its suffix."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path: Path) -> str:
    """The dataset name an archive or folder stands for: "cifar10" for "cifar10.tar.gz"."""
    lower = path.name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _is_image_name(name: str) -> bool:
    stem, dot, suffix = name.rpartition(".")
    return bool(dot and stem) and f".{suffix.lower()}" in IMAGE_SUFFIXES


def _build_index(files: Iterable[tuple[tuple[str, ...], tuple[str, int, int]]]) -> _FolderIndex:
    """Groups (split, class, file) paths into splits with sorted class indices.

    Class indices come from the sorted union of class folders over all splits,
    so a class missing from one split does not shift the labels of the others.
    Within a split, items are ordered by (class, file name).
    """
    by_split: dict[str, dict[tuple[str, str], tuple[str, int, int]]] = {}
    for (split, cls, fname), where in files:
        # A tar may hold a path twice; like tar extraction, the later copy wins.
        by_split.setdefault(split, {})[cls, fname] = where
    ordered = tuple(sorted({cls for items in by_split.values() for cls, _ in items}))
    label_of = {cls: k for k, cls in enumerate(ordered)}
    splits = {
        split: tuple(
            _Item(items[key][0], label_of[key[0]], items[key][1], items[key][2])
            for key in sorted(items)
        )
        for split, items in by_split.items()
    }
    return _FolderIndex(classes=ordered, splits=splits)


def _visible(relpath: str) -> bool:
    # Skips macOS resource forks ("._x.jpg", "__MACOSX/") and other hidden entries.
    return "/." not in f"/{relpath}" and "__MACOSX" not in relpath and "//" not in relpath


def _index_directory(root: Path) -> _FolderIndex:
    files = []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            for entry in os.scandir(class_dir):
                parts = (split_dir.name, class_dir.name, entry.name)
                if _visible("/".join(parts)) and _is_image_name(entry.name) and entry.is_file():
                    files.append((parts, (entry.path, -1, -1)))
    return _build_index(files)


class _Uncompressed:
    """Forward-only reader over the uncompressed bytes of a tar or tar.gz file.

    Written for the access pattern of tar scanning (read a 512-byte header,
    skip the data): far less per-call overhead than `gzip.GzipFile`.
    """

    _CHUNK = 1 << 20

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed in __exit__
        gzipped = self._file.read(2) == b"\x1f\x8b"
        self._file.seek(0)
        self._inflate = zlib.decompressobj(wbits=31) if gzipped else None
        self._buf = b""
        self._pos = 0
        self._base = 0  # stream offset of self._buf[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def _fill(self) -> bool:
        chunk = self._file.read(self._CHUNK)
        if not chunk:
            return False
        data = chunk
        if self._inflate is not None:
            data = self._inflate.decompress(chunk)
            while self._inflate.eof and self._inflate.unused_data:  # concatenated gzip members
                rest = self._inflate.unused_data
                self._inflate = zlib.decompressobj(wbits=31)
                data += self._inflate.decompress(rest)
        self._base += self._pos
        self._buf = self._buf[self._pos :] + data
        self._pos = 0
        return True

    @property
    def truncated(self) -> bool:
        """Whether the input ended inside a gzip stream (only meaningful at the end)."""
        return self._inflate is not None and not self._inflate.eof

    def tell(self) -> int:
        return self._base + self._pos

    def read(self, size: int) -> bytes:
        while len(self._buf) - self._pos < size and self._fill():
            pass
        out = self._buf[self._pos : self._pos + size]
        self._pos += len(out)
        return out

    def skip_to(self, offset: int) -> None:
        while self._base + len(self._buf) < offset:
            self._pos = len(self._buf)
            if not self._fill():
                raise EOFError(f"stream ends before offset {offset}")
        self._pos = offset - self._base


def _octal(field: bytes, *, where: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 encoding for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as err:
        raise DataFormatError(
            f"{where}: not a tar archive or corrupt (bad header field {text!r})"
        ) from err


def _pax_records(data: bytes) -> dict[str, str]:
    """Parses a pax extended header: records "<len> <key>=<value>\\n"."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            length = 0
        if length < 1:
            raise DataFormatError("corrupt pax extended header in tar archive")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


def _tar_members(stream: _Uncompressed, *, where: str) -> Iterator[tuple[str, int, int]]:
    """Yields (name, data offset, size) of the regular files of a tar stream.

    Parses ustar/GNU headers directly (much faster than `tarfile` for tens of
    thousands of small members), including GNU long names and pax `path`/`size`
    records. File data is skipped, not read.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK or header == _ZERO_BLOCK:
            if (header and len(header) < _BLOCK) or (not header and stream.truncated):
                raise DataFormatError(f"{where}: truncated archive")
            return
        checksum = _octal(header[148:156], where=where)
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
            raise DataFormatError(
                f"{where}: not a tar archive or corrupt (header checksum mismatch)"
            )
        size = _octal(header[124:136], where=where)
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:263] == b"ustar\x00":  # POSIX: a prefix field extends the name
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            name = f"{prefix}/{name}" if prefix else name
        if kind in (b"L", b"x"):
            payload = stream.read(size)
            if len(payload) < size:
                raise DataFormatError(f"{where}: truncated tar archive")
            stream.skip_to(stream.tell() + (-size % _BLOCK))
            if kind == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                pax = _pax_records(payload)
            continue
        if pax.get("size", "").isdigit():
            size = int(pax["size"])
        name = pax.get("path", long_name or name)
        long_name, pax = None, {}
        offset = stream.tell()
        if kind in (b"0", b"\0", b"7"):
            yield name, offset, size
        stream.skip_to(offset + size + (-size % _BLOCK))


@functools.lru_cache(maxsize=8)
def _index_archive_cached(path: str, _size: int, _mtime_ns: int) -> _FolderIndex:
    # Size and mtime are part of the key so that a replaced archive is re-indexed.
    files = []
    try:
        with _Uncompressed(Path(path)) as stream:
            for name, offset, size in _tar_members(stream, where=path):
                clean = name.removeprefix("./")
                if _visible(clean) and _is_image_name(clean):
                    files.append((tuple(clean.split("/")), (name, offset, size)))
    except (OSError, EOFError, zlib.error) as err:
        raise DataFormatError(f"{path}: cannot read archive ({err})") from err
    # Archives hold `<name>/<split>/<class>/<img>`; also accept `<split>/<class>/<img>`.
    tops = {parts[0] for parts, _ in files}
    strip = 1 if len(tops) == 1 and all(len(parts) == 4 for parts, _ in files) else 0
    layout = [(parts[strip:], item) for parts, item in files if len(parts) - strip == 3]
    return _build_index(layout)


def _index_archive(path: Path) -> _FolderIndex:
    stat = path.stat()
    return _index_archive_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _read_members(path: Path, items: Iterable[_Item]) -> dict[str, bytes]:
    """Reads the bytes of the given archive members in one forward pass."""
    out = {}
    try:
        with _Uncompressed(path) as stream:
            for item in sorted(items, key=lambda it: it.offset):
                stream.skip_to(item.offset)
                data = stream.read(item.size)
                if len(data) != item.size:
                    raise DataFormatError(f"{path}: truncated archive at member {item.member}")
                out[item.member] = data
    except (OSError, EOFError, zlib.error) as err:
        raise DataFormatError(f"{path}: cannot read archive ({err})") from err
    return out


def load_image_folder(
    root: str | os.PathLike[str],
    split: str,
    *,
    n: int | None = None,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
    name: str | None = None,
) -> Dataset:
    """Loads one split of an image folder, from a directory or a tar(.gz) archive.

    The layout is `<root>/<split>/<class>/<image>` for a directory and
    `<name>/<split>/<class>/<image>` (or `<split>/<class>/<image>`) inside an
    archive. The class index is the position of the class folder in the sorted
    list of class folders of all splits. A requested "test" split falls back
    to "val"/"validation" when the folder has no "test" (the note is put in
    `Dataset.source`).

    Args:
        root: The directory, or a `.tar.gz`/`.tgz`/`.tar` archive.
        split: Split folder name, e.g. "train" or "test".
        n: Number of images; None takes the whole split.
        seed: The subset is `default_rng(seed).permutation(split_size)[:n]`.
        image_size: Optional resize target: an int or (height, width).
        name: Dataset name to report; defaults to the folder/archive stem.

    Returns:
        The loaded `Dataset`.

    Raises:
        FileNotFoundError: If root does not exist.
        ValueError: If the split is missing (the message lists the available
            ones), has no images, n is too large or image_size is invalid.
        DataFormatError: If the archive or an image is corrupt.

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for cls in ("cat", "dog"):
    ...     (root / "test" / cls).mkdir(parents=True)
    ...     Image.new("RGB", (8, 8)).save(root / "test" / cls / "0.png")
    >>> ds = load_image_folder(root, "test", image_size=4)
    >>> ds.images.shape, ds.labels.tolist(), ds.class_names
    ((2, 4, 4, 3), [0, 1], ('cat', 'dog'))
    """
    size = parse_image_size(image_size)
    check_subset_args(n, seed)
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    archive = root.is_file()
    name = name or archive_stem(root)
    index = _index_archive(root) if archive else _index_directory(root)
    if not index.splits:
        layout = "<name>/<split>/<class>/<image>" if archive else "<split>/<class>/<image>"
        raise ValueError(f"{root} holds no images in the layout {layout}")
    actual, note = resolve_split(split, index.splits, dataset=f"{name} ({root})")
    items = index.splits[actual]
    indices = choose_indices(len(items), n, seed, what=f"split {actual!r} of {name}")
    chosen = [items[i] for i in indices]
    if archive:
        blobs = _read_members(root, chosen)
        decoded = [decode_image(blobs[it.member], where=f"{it.member} in {root}") for it in chosen]
    else:
        decoded = [decode_image(Path(it.member).read_bytes(), where=it.member) for it in chosen]
    source = f"image-folder:{root}" + (f" ({note})" if note else "")
    return Dataset(
        images=stack_images(decoded, size, what=name),
        labels=np.array([it.label for it in chosen], dtype=np.int32),
        num_classes=len(index.classes),
        class_names=index.classes,
        name=name,
        split=actual,
        source=source,
        indices=indices,
    )
