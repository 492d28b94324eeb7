"""Tests for jaxleak.metrics.lpips and the torch-free .pth reader.

The reference values come from the lpips package's README
(``lpips.LPIPS(net="alex")`` on its ``imgs/ex_*.png``, v0.1). Tests that need
the weights find them via ``JAXLEAK_WEIGHTS_DIR`` (default
``<repo>/../shared/weights``) and skip when absent.
"""

import doctest
import importlib
import os
import pickle
import struct
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak.metrics import lpips
from jaxleak.metrics._torch_weights import load_state_dict

lpips_module = importlib.import_module("jaxleak.metrics._lpips")

WEIGHTS_ROOT = Path(
    os.environ.get(
        "JAXLEAK_WEIGHTS_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "weights"
    )
)
LPIPS_DIR = WEIGHTS_ROOT / "lpips"


def _need(*names: str) -> None:
    missing = [n for n in names if not (LPIPS_DIR / n).is_file()]
    if missing:
        pytest.skip(
            f"LPIPS weights/images absent from {LPIPS_DIR} (set JAXLEAK_WEIGHTS_DIR): {missing}"
        )


ALEX_FILES = ("alexnet_features_torchvision.npz", "lpips_v0.1_lin_alex.npz")
SQUEEZE_FILES = ("squeezenet1_1_features_torchvision.npz", "lpips_v0.1_lin_squeeze.npz")


def _png(name: str) -> np.ndarray:
    from PIL import Image

    with Image.open(LPIPS_DIR / f"{name}.png") as image:
        return np.asarray(image.convert("RGB"), np.float32)[None] / 255.0


def _random_images(seed: int, n: int = 3, side: int = 32, c: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, side, side, c)).astype(np.float32)


# ----------------------------------------------------------------------------
# Reference values and metric properties.
# ----------------------------------------------------------------------------


def test_reference_values_alex():
    _need(*ALEX_FILES, "ex_ref.png", "ex_p0.png", "ex_p1.png")
    ref, p0, p1 = _png("ex_ref"), _png("ex_p0"), _png("ex_p1")
    d = lpips(
        np.concatenate([ref, ref]), np.concatenate([p0, p1]), "alex", weights_dir=WEIGHTS_ROOT
    )
    assert d.shape == (2,) and d.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(d), [0.7219, 0.1376], atol=1e-3)


def test_squeeze_runs_and_ranks_like_alex():
    # No published value for squeeze; the distances measured here were
    # 0.7110 (p0) and 0.1479 (p1). Pin them loosely and check the ranking.
    _need(*SQUEEZE_FILES, "ex_ref.png", "ex_p0.png", "ex_p1.png")
    ref, p0, p1 = _png("ex_ref"), _png("ex_p0"), _png("ex_p1")
    d = np.asarray(
        lpips(
            np.concatenate([ref, ref]),
            np.concatenate([p0, p1]),
            "squeeze",
            weights_dir=WEIGHTS_ROOT,
        )
    )
    np.testing.assert_allclose(d, [0.7110, 0.1479], atol=1e-3)


@pytest.mark.parametrize("net,files", [("alex", ALEX_FILES), ("squeeze", SQUEEZE_FILES)])
def test_identity_symmetry_and_batching(net, files):
    _need(*files)
    x, y = _random_images(0), _random_images(1)
    # Not bit-exact: XLA's batched convs may round the two copies differently.
    d_xx = np.asarray(lpips(x, x, net, weights_dir=WEIGHTS_ROOT))
    assert d_xx.shape == (3,) and np.all(np.abs(d_xx) < 1e-7)
    d_xy = np.asarray(lpips(x, y, net, weights_dir=WEIGHTS_ROOT))
    d_yx = np.asarray(lpips(y, x, net, weights_dir=WEIGHTS_ROOT))
    assert np.all(d_xy > 0.01)
    np.testing.assert_allclose(d_xy, d_yx, rtol=1e-5)
    one_by_one = [
        float(lpips(x[i : i + 1], y[i : i + 1], net, weights_dir=WEIGHTS_ROOT)[0]) for i in range(3)
    ]
    np.testing.assert_allclose(d_xy, one_by_one, rtol=1e-5)


def test_grayscale_and_resize():
    _need(*ALEX_FILES)
    x, y = _random_images(2, n=2, side=28, c=1), _random_images(3, n=2, side=28, c=1)
    with pytest.raises(ValueError, match=r"at least 31x31.*got 28x28.*resize"):
        lpips(x, y, weights_dir=WEIGHTS_ROOT)
    d = np.asarray(lpips(x, y, weights_dir=WEIGHTS_ROOT, resize=64))
    d_rgb = np.asarray(
        lpips(np.repeat(x, 3, -1), np.repeat(y, 3, -1), weights_dir=WEIGHTS_ROOT, resize=64)
    )
    assert d.shape == (2,) and np.all(d > 0)
    # Same math; XLA may fuse the grey -> RGB repeat differently (1 ulp seen on some CPUs).
    np.testing.assert_allclose(d, d_rgb, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------
# VGG16 end to end: synthetic backbone weights, real v0.1 heads, and an
# independent NCHW reference (torchvision's VGG16 weights are not available).
# ----------------------------------------------------------------------------

VGG_LIN = "lpips_v0.1_lin_vgg.npz"
# torchvision vgg16().features config "D": ints are 3x3 pad-1 convs (+ReLU), M is
# MaxPool2d(2, 2). Conv k sits at features.<index>, ReLU at index + 1, pool after.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# lpips.pretrained_networks.vgg16 slices end after features[3], [8], [15], [22],
# [29]: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, i.e. the ReLUs of these convs.
VGG16_TAP_CONVS = (2, 7, 14, 21, 28)


def _synthetic_vgg16_features(seed: int = 0) -> dict[str, np.ndarray]:
    """torchvision-named OIHW VGG16 ``features`` weights, He-scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    state, index, channels = {}, 0, 3
    for item in VGG16_CFG:
        if item == "M":
            index += 1
            continue
        std = np.sqrt(2.0 / (channels * 9))
        state[f"features.{index}.weight"] = (
            rng.standard_normal((item, channels, 3, 3)) * std
        ).astype(np.float32)
        state[f"features.{index}.bias"] = (0.1 * rng.standard_normal(item)).astype(np.float32)
        channels, index = item, index + 2  # conv, ReLU
    # torchvision checkpoints also hold the classifier; LPIPS must ignore it.
    state["classifier.0.weight"] = np.zeros((8, 4), np.float32)
    return state


def _reference_lpips_vgg(x, y, state, heads):
    """LPIPS v0.1 (VGG) written from the paper / the lpips repo, in torch layout.

    Constants and steps, as in github.com/richzhang/PerceptualSimilarity
    (``lpips/lpips.py`` and ``lpips/pretrained_networks.py``) and Zhang et al.
    2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
    Metric", called as ``LPIPS(net="vgg", version="0.1")(x, y, normalize=True)``:

    * ``normalize=True``: images in [0, 1] become ``2 x - 1``;
    * ``ScalingLayer``: ``(x - shift) / scale`` with
      ``shift = [-.030, -.088, -.188]``, ``scale = [.458, .448, .450]``;
    * torchvision ``vgg16().features`` (config D above), tapped after
      relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
    * ``normalize_tensor``: ``f / (sqrt(sum_c f**2) + 1e-10)``;
    * ``NetLinLayer``: (dropout off in eval) 1x1 conv, no bias, weights
      ``lin<k>.model.1.weight`` [1, C, 1, 1]; then ``spatial_average`` (mean
      over H, W, keepdim) and the sum over the five layers.
    """
    shift = jnp.array([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = jnp.array([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)
    hi = jax.lax.Precision.HIGHEST

    def features(img):  # img: NCHW
        h, taps, index = (2.0 * img - 1.0 - shift) / scale, [], 0
        for item in VGG16_CFG:
            if item == "M":
                n, c, hh, ww = h.shape
                h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))
                index += 1
                continue
            h = jax.lax.conv_general_dilated(
                h,
                jnp.asarray(state[f"features.{index}.weight"]),
                window_strides=(1, 1),
                padding=((1, 1), (1, 1)),
                dimension_numbers=("NCHW", "OIHW", "NCHW"),
                precision=hi,
            ) + jnp.asarray(state[f"features.{index}.bias"]).reshape(1, -1, 1, 1)
            h = jnp.maximum(h, 0.0)
            if index in VGG16_TAP_CONVS:
                taps.append(h)
            index += 2
        return taps

    def unit(f):
        return f / (jnp.sqrt(jnp.sum(f**2, axis=1, keepdims=True)) + 1e-10)

    n = len(x)
    taps = jax.jit(features)(jnp.transpose(jnp.asarray(np.concatenate([x, y])), (0, 3, 1, 2)))
    total = 0.0
    for k, (a, b) in enumerate((f[:n], f[n:]) for f in taps):
        w = jnp.asarray(heads[f"lin{k}.model.1.weight"])  # [1, C, 1, 1]
        diff = (unit(a) - unit(b)) ** 2
        lin = jnp.sum(diff * w, axis=1, keepdims=True)  # 1x1 conv, one output channel
        total = total + jnp.mean(lin, axis=(1, 2, 3))
    return np.asarray(total)


@pytest.fixture
def vgg_weights_dir(tmp_path):
    _need(VGG_LIN)
    folder = tmp_path / "lpips"
    folder.mkdir()
    np.savez(folder / "vgg16_features_torchvision.npz", **_synthetic_vgg16_features())
    (folder / VGG_LIN).symlink_to(LPIPS_DIR / VGG_LIN)
    return tmp_path


def test_vgg_matches_independent_reference(vgg_weights_dir):
    with np.load(LPIPS_DIR / VGG_LIN) as f:
        heads = {k: f[k] for k in f.files}
    assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
    assert [heads[f"lin{k}.model.1.weight"].shape for k in range(5)] == [
        (1, c, 1, 1) for c in (64, 128, 256, 512, 512)
    ]
    assert all(np.all(w >= 0) for w in heads.values())  # v0.1 heads are non-negative
    state = _synthetic_vgg16_features()
    x, y = _random_images(10, n=2), _random_images(11, n=2)
    got = np.asarray(lpips(x, y, "vgg", weights_dir=vgg_weights_dir))
    want = _reference_lpips_vgg(x, y, state, heads)
    assert got.shape == (2,) and np.all(want > 0.01)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # Identity (up to conv rounding, as for the other nets) and symmetry.
    d_xx = np.asarray(lpips(x, x, "vgg", weights_dir=vgg_weights_dir))
    assert np.all(np.abs(d_xx) < 1e-7)
    d_yx = np.asarray(lpips(y, x, "vgg", weights_dir=vgg_weights_dir))
    np.testing.assert_allclose(got, d_yx, rtol=1e-5)


def test_vgg_missing_backbone_message(tmp_path):
    _need(VGG_LIN)
    (tmp_path / "lpips").mkdir()
    (tmp_path / "lpips" / VGG_LIN).symlink_to(LPIPS_DIR / VGG_LIN)
    x = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(FileNotFoundError) as info:
        lpips(x, x, "vgg", weights_dir=tmp_path)
    message = str(info.value)
    assert "vgg backbone" in message
    assert str(tmp_path / "lpips" / "vgg16_features_torchvision.npz") in message
    assert str(tmp_path / "lpips" / "vgg16-*.pth") in message


# ----------------------------------------------------------------------------
# Validation and architecture details (no weights needed).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,y,kwargs,match",
    [
        (np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 32, 32, 3), np.uint8), {}, "floating"),
        (np.zeros((32, 32, 3)), np.zeros((32, 32, 3)), {}, r"\[N, H, W"),
        (np.zeros((1, 32, 32, 2)), np.zeros((1, 32, 32, 2)), {}, r"\[N, H, W"),
        (np.zeros((0, 32, 32, 3)), np.zeros((0, 32, 32, 3)), {}, "non-empty"),
        (np.zeros((1, 32, 32, 3)), np.zeros((2, 32, 32, 3)), {}, "same shape"),
        (np.zeros((1, 32, 32, 3)), np.zeros((1, 32, 32, 3)), {"net": "resnet"}, "net must be"),
        (np.zeros((1, 32, 32, 3)), np.zeros((1, 32, 32, 3)), {"resize": 0}, "resize"),
        (np.zeros((1, 32, 32, 3)), np.zeros((1, 32, 32, 3)), {"resize": 2.5}, "resize"),
        (np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 3)), {"net": "squeeze"}, "17x17"),
        (np.zeros((1, 15, 40, 3)), np.zeros((1, 15, 40, 3)), {"net": "vgg"}, "16x16"),
    ],
)
def test_validation_errors(x, y, kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        lpips(x, y, weights_dir=tmp_path, **kwargs)


def test_min_sides_match_torch_shape_rules():
    # Hand-derived from torch's pooling formula (floor, or ceil dropping a window
    # that starts past the input): alex 31 -> 7 -> 3 -> 3 -> 1; squeeze 17 -> 8
    # -> 4 -> 2 -> 1; vgg 16 -> 8 -> 4 -> 2 -> 1.
    assert [lpips_module.min_side(n) for n in ("alex", "squeeze", "vgg")] == [31, 17, 16]
    assert lpips_module._deepest_side("alex", 64) == 3
    assert lpips_module._deepest_side("squeeze", 64) == 3
    assert lpips_module._deepest_side("vgg", 64) == 4


def test_ceil_mode_max_pool():
    x = jnp.arange(25.0).reshape(5, 5, 1)
    # floor: one window; ceil: the partial second window (rows/cols 2..4) counts.
    np.testing.assert_array_equal(lpips_module._max_pool(x[:4, :4], 3, 2, False)[..., 0], [[12.0]])
    np.testing.assert_array_equal(
        lpips_module._max_pool(x[:4, :4], 3, 2, True)[..., 0], [[12.0, 13.0], [17.0, 18.0]]
    )
    np.testing.assert_array_equal(
        lpips_module._max_pool(-x, 3, 2, True)[..., 0], [[0.0, -2.0], [-10.0, -12.0]]
    )


def test_missing_weights_message(tmp_path, monkeypatch):
    x = np.zeros((1, 32, 32, 3), np.float32)
    with pytest.raises(FileNotFoundError) as info:
        lpips(x, x, "squeeze", weights_dir=tmp_path)
    message = str(info.value)
    assert "squeeze backbone" in message
    assert str(tmp_path / "lpips" / "squeezenet1_1_features_torchvision.npz") in message
    assert str(tmp_path / "squeezenet1_1-*.pth") in message
    assert "JAXLEAK_WEIGHTS_DIR" in message
    # The environment variable is honoured when no argument is given.
    monkeypatch.setenv("JAXLEAK_WEIGHTS_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        lpips(x, x, "alex")


# ----------------------------------------------------------------------------
# The .pth reader on hand-assembled files (no torch needed).
# ----------------------------------------------------------------------------


def _op_str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _op_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _torch_pickle(tensors: dict, legacy: bool) -> bytes:
    """Protocol-2 pickle of an OrderedDict of tensors, as torch.save writes it.

    ``tensors`` maps name -> (storage key, numel, offset, size, stride).
    """
    body = [b"\x80\x02", _op_global("collections", "OrderedDict"), b")R", b"("]
    for name, (key, numel, offset, size, stride) in tensors.items():
        pid = [
            _op_str("storage"),
            _op_global("torch", "FloatStorage"),
            _op_str(key),
            _op_str("cpu"),
            _op_int(numel),
        ]
        if legacy:
            pid.append(b"N")  # no view metadata
        body += [
            _op_str(name),
            _op_global("torch._utils", "_rebuild_tensor_v2"),
            _op_tuple(
                [
                    _op_tuple(pid) + b"Q",
                    _op_int(offset),
                    _op_tuple([_op_int(s) for s in size]),
                    _op_tuple([_op_int(s) for s in stride]),
                    b"\x89",
                    _op_global("collections", "OrderedDict") + b")R",
                ]
            ),
            b"R",
        ]
    body += [b"u", b"."]
    return b"".join(body)


def _write_pth(path: Path, arrays: dict[str, np.ndarray], legacy: bool) -> None:
    """Writes contiguous float32 arrays, one storage each, in torch's file layout."""
    specs, storages = {}, {}
    for i, (name, value) in enumerate(arrays.items()):
        value = np.ascontiguousarray(value, np.float32)
        strides = tuple(s // 4 for s in value.strides)
        specs[name] = (str(i), value.size, 0, value.shape, strides)
        storages[str(i)] = value.ravel()
    _write_raw_pth(path, specs, storages, legacy)


def _write_raw_pth(path: Path, specs: dict, storages: dict, legacy: bool) -> None:
    data_pkl = _torch_pickle(specs, legacy)
    if legacy:
        with open(path, "wb") as handle:
            handle.write(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
            handle.write(pickle.dumps(1001, protocol=2))
            handle.write(
                pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
            )
            handle.write(data_pkl)
            handle.write(pickle.dumps(list(storages), protocol=2))
            handle.writelines(
                struct.pack("<q", flat.size) + flat.astype("<f4").tobytes()
                for flat in storages.values()
            )
    else:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("archive/data.pkl", data_pkl)
            archive.writestr("archive/byteorder", "little")
            for key, flat in storages.items():
                archive.writestr(f"archive/data/{key}", flat.astype("<f4").tobytes())
            archive.writestr("archive/version", "3\n")


@pytest.mark.parametrize("legacy", [False, True])
def test_pth_reader_offsets_and_strides(tmp_path, legacy):
    storage = np.arange(12, dtype=np.float32)
    specs = {
        "whole": ("0", 12, 0, (3, 4), (4, 1)),
        "transposed_view": ("0", 12, 2, (2, 3), (1, 2)),  # shares storage 0
        "other.bias": ("1", 2, 0, (2,), (1,)),
    }
    path = tmp_path / "w.pth"
    _write_raw_pth(path, specs, {"0": storage, "1": np.array([5.0, -1.0], np.float32)}, legacy)
    state = load_state_dict(path)
    assert list(state) == ["whole", "transposed_view", "other.bias"]
    np.testing.assert_array_equal(state["whole"], storage.reshape(3, 4))
    # element [i, j] sits at 2 + i*1 + j*2 in the storage
    np.testing.assert_array_equal(state["transposed_view"], [[2, 4, 6], [3, 5, 7]])
    np.testing.assert_array_equal(state["other.bias"], [5.0, -1.0])
    assert state["whole"].dtype == np.float32


def test_pth_reader_refuses_other_globals(tmp_path):
    evil = b"\x80\x02" + _op_global("os", "system") + _op_tuple([_op_str("true")]) + b"R."
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", evil)
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        load_state_dict(path)


def test_pth_weights_give_the_npz_distances(tmp_path):
    # torchvision-style zip .pth for the backbone (with a classifier key that
    # must be ignored), lpips-package-style legacy .pth for the heads.
    _need(*ALEX_FILES)
    with np.load(LPIPS_DIR / ALEX_FILES[0]) as f:
        backbone = {k: f[k] for k in f.files}
    with np.load(LPIPS_DIR / ALEX_FILES[1]) as f:
        heads = {k: f[k] for k in f.files}
    backbone["classifier.1.weight"] = np.zeros((4, 3), np.float32)
    (tmp_path / "lpips").mkdir()
    (tmp_path / "weights" / "v0.1").mkdir(parents=True)
    _write_pth(tmp_path / "lpips" / "alexnet-owt-7be5be79.pth", backbone, legacy=False)
    _write_pth(tmp_path / "weights" / "v0.1" / "alex.pth", heads, legacy=True)
    x, y = _random_images(4, n=2), _random_images(5, n=2)
    np.testing.assert_array_equal(
        np.asarray(lpips(x, y, weights_dir=tmp_path)),
        np.asarray(lpips(x, y, weights_dir=WEIGHTS_ROOT)),
    )


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_pth_reader_matches_torch_save(tmp_path):
    import torch

    state = {
        "a.weight": torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1),
        "a.bias": torch.arange(6.0)[1::2],
    }
    for legacy in (False, True):
        path = tmp_path / f"t{legacy}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        loaded = load_state_dict(path)
        for key, value in state.items():
            np.testing.assert_array_equal(loaded[key], value.numpy())


def test_doctests():
    results = doctest.testmod(lpips_module)
    assert results.failed == 0 and results.attempted >= 1
