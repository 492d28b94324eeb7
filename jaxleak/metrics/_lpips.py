"""LPIPS v0.1 (Zhang et al., 2018) with AlexNet, SqueezeNet-1.1 and VGG16 backbones.

Follows the reference ``lpips`` package (``LPIPS(net=..., version="0.1")``
called with ``normalize=True``):

1. images in [0, 1] become ``2 x - 1``;
2. the ScalingLayer maps ``(x - shift) / scale`` with
   ``shift = (-0.030, -0.088, -0.188)``, ``scale = (0.458, 0.448, 0.450)``;
3. features are taken after the ReLUs the reference taps (AlexNet: relu1..relu5,
   i.e. torchvision ``features[0:2], [2:5], [5:8], [8:10], [10:12]``;
   SqueezeNet-1.1: ``features[0:2], [2:5], [5:8], [8:10], [10], [11], [12]``;
   VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3);
4. each feature map is divided by ``sqrt(sum_c f**2) + 1e-10`` per pixel;
5. the squared difference goes through the layer's 1x1 linear head (no bias),
   is averaged over H and W, and the layers are summed.

Backbones follow torchvision exactly, including ``ceil_mode=True`` max-pools in
SqueezeNet-1.1. Weights are read from torchvision-named ``.npz`` files
(``features.<i>.weight`` in OIHW) or the original ``.pth`` files, read without
torch by :mod:`jaxleak.metrics._torch_weights`.

Small images: the reference LPIPS never resizes, and breaching's
``analysis.report`` calls ``lpips.LPIPS(net="alex")`` directly on the clamped
[0, 1] reconstructions (``normalize=True``), so CIFAR scores in the FL-leakage
literature are computed on raw 32x32 images. The default ``resize=None``
does the same. AlexNet needs at least 31x31 input (its second max-pool
otherwise has nothing to pool), so 28x28 MNIST needs ``resize`` (or
``net="squeeze"``, which accepts 17x17 and up); ``resize=n`` bilinearly
resizes both images to ``n x n`` first (half-pixel centres, no antialiasing,
like ``F.interpolate(mode="bilinear", align_corners=False)``).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxleak.metrics._image import _check_pair
from jaxleak.metrics._torch_weights import load_state_dict

if TYPE_CHECKING:  # jaxtyping is a test-time dependency only
    from jax import Array
    from jaxtyping import ArrayLike, Float

NETS = ("alex", "squeeze", "vgg")
"""Backbones :func:`lpips` accepts."""

WEIGHTS_ENV = "JAXLEAK_WEIGHTS_DIR"
"""Environment variable naming the weights root (files live in its ``lpips/``)."""

_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_EPS = 1e-10

# (npz name, .pth glob patterns) per backbone; torchvision's hub names the
# files <arch>-<hash>.pth.
_BACKBONE_FILES = {
    "alex": ("alexnet_features_torchvision.npz", ("alexnet-owt-*.pth", "alexnet*.pth")),
    "squeeze": ("squeezenet1_1_features_torchvision.npz", ("squeezenet1_1-*.pth",)),
    "vgg": ("vgg16_features_torchvision.npz", ("vgg16-*.pth", "vgg16*.pth")),
}
_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_TAPS = (2, 7, 14, 21, 28)  # the conv whose ReLU ends each slice
_VGG_POOL_AFTER = (2, 7, 14, 21)


# ----------------------------------------------------------------------------
# Backbones (one image [H, W, C]; torchvision layer names as module names).
# ----------------------------------------------------------------------------


def _max_pool(x: Float[Array, "*b h w c"], window: int, stride: int, ceil_mode: bool) -> Array:
    extra = []
    for size in x.shape[-3:-1]:
        if ceil_mode:
            out = -(-(size - window) // stride) + 1
            # torch drops a last window that would start beyond the input.
            if (out - 1) * stride >= size:
                out -= 1
        else:
            out = (size - window) // stride + 1
        extra.append(max(0, (out - 1) * stride + window - size))
    lead = x.ndim - 3
    return jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        (1,) * lead + (window, window, 1),
        (1,) * lead + (stride, stride, 1),
        ((0, 0),) * lead + ((0, extra[0]), (0, extra[1]), (0, 0)),
    )


def _conv(name: str, features: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        name=name,
    )


class _AlexFeatures(nn.Module):
    @nn.compact
    def __call__(self, x: Float[Array, "*b h w 3"]) -> list[Array]:
        taps = []
        x = nn.relu(_conv("features_0", 64, 11, 4, 2)(x))
        taps.append(x)
        x = _max_pool(x, 3, 2, False)
        x = nn.relu(_conv("features_3", 192, 5, 1, 2)(x))
        taps.append(x)
        x = _max_pool(x, 3, 2, False)
        x = nn.relu(_conv("features_6", 384, 3, 1, 1)(x))
        taps.append(x)
        x = nn.relu(_conv("features_8", 256, 3, 1, 1)(x))
        taps.append(x)
        x = nn.relu(_conv("features_10", 256, 3, 1, 1)(x))
        taps.append(x)
        return taps


class _Fire(nn.Module):
    squeeze: int
    expand: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = nn.relu(_conv("squeeze", self.squeeze, 1)(x))
        e1 = nn.relu(_conv("expand1x1", self.expand, 1)(s))
        e3 = nn.relu(_conv("expand3x3", self.expand, 3, 1, 1)(s))
        return jnp.concatenate([e1, e3], axis=-1)


class _SqueezeFeatures(nn.Module):
    @nn.compact
    def __call__(self, x: Float[Array, "*b h w 3"]) -> list[Array]:
        x = nn.relu(_conv("features_0", 64, 3, 2)(x))
        taps = [x]
        x = _max_pool(x, 3, 2, True)
        x = _Fire(16, 64, name="features_3")(x)
        x = _Fire(16, 64, name="features_4")(x)
        taps.append(x)
        x = _max_pool(x, 3, 2, True)
        x = _Fire(32, 128, name="features_6")(x)
        x = _Fire(32, 128, name="features_7")(x)
        taps.append(x)
        x = _max_pool(x, 3, 2, True)
        x = _Fire(48, 192, name="features_9")(x)
        taps.append(x)
        x = _Fire(48, 192, name="features_10")(x)
        taps.append(x)
        x = _Fire(64, 256, name="features_11")(x)
        taps.append(x)
        x = _Fire(64, 256, name="features_12")(x)
        taps.append(x)
        return taps


class _VGGFeatures(nn.Module):
    @nn.compact
    def __call__(self, x: Float[Array, "*b h w 3"]) -> list[Array]:
        widths = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
        taps = []
        for index, width in zip(_VGG_CONVS, widths):
            x = nn.relu(_conv(f"features_{index}", width, 3, 1, 1)(x))
            if index in _VGG_TAPS:
                taps.append(x)
            if index in _VGG_POOL_AFTER:
                x = _max_pool(x, 2, 2, False)
        return taps


_BACKBONES = {"alex": _AlexFeatures, "squeeze": _SqueezeFeatures, "vgg": _VGGFeatures}
_CHANNELS = {
    "alex": (64, 192, 384, 256, 256),
    "squeeze": (64, 128, 256, 384, 384, 512, 512),
    "vgg": (64, 128, 256, 512, 512),
}


def _unit_normalize(f: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
    # eps added to the norm (not inside the sqrt), as the reference does.
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + _EPS)


class _LPIPS(nn.Module):
    net: str

    @nn.compact
    def __call__(self, x: Float[Array, "h w 3"], y: Float[Array, "h w 3"]) -> Float[Array, ""]:
        backbone = _BACKBONES[self.net](name="backbone")
        # One backbone pass over the stacked pair (a batch of 2 for XLA).
        pair = (2.0 * jnp.stack([x, y]) - 1.0 - _SHIFT) / _SCALE
        total = jnp.zeros((), jnp.float32)
        for k, feats in enumerate(backbone(pair)):
            fx, fy = feats[0], feats[1]
            diff = jnp.square(_unit_normalize(fx) - _unit_normalize(fy))
            head = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}")
            total = total + jnp.mean(head(diff))
        return total


# ----------------------------------------------------------------------------
# Input sizes.
# ----------------------------------------------------------------------------


def _pool_out(size: int, window: int, stride: int, ceil_mode: bool) -> int:
    if ceil_mode:
        out = -(-(size - window) // stride) + 1
        if (out - 1) * stride >= size:
            out -= 1
        return out
    return (size - window) // stride + 1


def _deepest_side(net: str, side: int) -> int:
    """Spatial side of the deepest tapped feature map (< 1: the net cannot run)."""
    if net == "alex":
        s = (side + 4 - 11) // 4 + 1
        s = _pool_out(s, 3, 2, False) if s >= 1 else 0
        return _pool_out(s, 3, 2, False) if s >= 1 else 0
    if net == "squeeze":
        s = (side - 3) // 2 + 1
        for _ in range(3):
            s = _pool_out(s, 3, 2, True) if s >= 1 else 0
        return s
    s = side
    for _ in range(4):
        s = _pool_out(s, 2, 2, False) if s >= 1 else 0
    return s


@functools.cache
def min_side(net: str) -> int:
    """Smallest image side (pixels) the backbone ``net`` accepts without resizing.

    Args:
        net: One of :data:`NETS`.

    Returns:
        31 for ``"alex"``, 17 for ``"squeeze"``, 16 for ``"vgg"``.

    >>> min_side("alex")
    31
    """
    _check_net(net)
    return next(side for side in range(1, 1024) if _deepest_side(net, side) >= 1)


# ----------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------


def _default_weights_root() -> Path:
    return Path(__file__).resolve().parents[2].parent / "shared" / "weights"


def _search_dirs(weights_dir: str | os.PathLike | None) -> list[Path]:
    if weights_dir is not None:
        root = Path(weights_dir)
    elif os.environ.get(WEIGHTS_ENV):
        root = Path(os.environ[WEIGHTS_ENV])
    else:
        root = _default_weights_root()
    # The root itself is searched too, so a folder holding the files directly works.
    return [root / "lpips", root / "lpips" / "v0.1", root / "weights" / "v0.1", root]


def _find(what: str, names: Sequence[str], dirs: Sequence[Path]) -> Path:
    for folder in dirs:
        for pattern in names:
            hits = sorted(folder.glob(pattern)) if folder.is_dir() else []
            if hits:
                return hits[0]
    looked = "\n".join(f"  {folder / pattern}" for folder in dirs for pattern in names)
    raise FileNotFoundError(
        f"LPIPS {what} weights not found. Looked for:\n{looked}\n"
        f"Pass weights_dir=... or set {WEIGHTS_ENV} to a folder with an lpips/ subfolder "
        "holding these files."
    )


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path) as archive:
            return {key: np.asarray(archive[key]) for key in archive.files}
    return load_state_dict(path)


def _nest(tree: dict, path: Sequence[str], value: np.ndarray) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _convert_backbone(state: dict[str, np.ndarray], source: Path) -> dict:
    params: dict = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features" or len(parts) < 3:
            continue  # e.g. torchvision's classifier.*: not part of LPIPS
        module = [f"features_{parts[1]}", *parts[2:-1]]
        if parts[-1] == "weight":
            if value.ndim != 4:
                raise ValueError(f"{source}: {key} should be a 4-D OIHW conv weight")
            _nest(params, [*module, "kernel"], np.transpose(value, (2, 3, 1, 0)).astype(np.float32))
        elif parts[-1] == "bias":
            _nest(params, [*module, "bias"], value.astype(np.float32))
    return params


_LIN_KEY = re.compile(r"^(?:net\.)?lin(\d+)\.model\.\d+\.weight$")


def _convert_heads(state: dict[str, np.ndarray], source: Path, net: str) -> dict:
    heads = {}
    for key, value in state.items():
        match = _LIN_KEY.match(key)
        if match:
            heads[f"lin{match.group(1)}"] = {
                "kernel": np.transpose(value, (2, 3, 1, 0)).astype(np.float32)
            }
    expected = [f"lin{k}" for k in range(len(_CHANNELS[net]))]
    if sorted(heads) != sorted(expected):
        raise ValueError(
            f"{source}: expected heads {expected} for net={net!r}, found {sorted(heads)}"
        )
    for k, channels in enumerate(_CHANNELS[net]):
        if heads[f"lin{k}"]["kernel"].shape != (1, 1, channels, 1):
            raise ValueError(f"{source}: lin{k} should have shape (1, {channels}, 1, 1)")
    return heads


@functools.lru_cache(maxsize=8)
def _load_params(net: str, backbone_file: Path, head_file: Path) -> dict:
    backbone = _convert_backbone(_read_arrays(backbone_file), backbone_file)
    heads = _convert_heads(_read_arrays(head_file), head_file, net)
    params = {"backbone": backbone, **heads}
    # Check names and shapes against the module once, on the host.
    expected = jax.eval_shape(
        _LPIPS(net).init, jax.random.PRNGKey(0), jnp.zeros((64, 64, 3)), jnp.zeros((64, 64, 3))
    )["params"]
    got = jax.tree_util.tree_map(lambda a: a.shape, params)
    want = jax.tree_util.tree_map(lambda a: a.shape, expected)
    if got != want:
        raise ValueError(
            f"weights in {backbone_file} / {head_file} do not match the {net} LPIPS network"
        )
    return jax.tree_util.tree_map(jnp.asarray, {"params": params})


def load_lpips_params(net: str = "alex", *, weights_dir: str | os.PathLike | None = None) -> dict:
    """Locates and loads (cached) the backbone and linear-head weights for ``net``.

    Looks in ``weights_dir`` if given, else ``$JAXLEAK_WEIGHTS_DIR``, else
    ``<repo>/../shared/weights``; inside it in ``lpips/``, ``lpips/v0.1/``,
    ``weights/v0.1/`` and the folder itself. ``.npz`` files are preferred; the
    original ``.pth`` files (torchvision ``alexnet-owt-*.pth``,
    ``squeezenet1_1-*.pth``, ``vgg16-*.pth``; the lpips package's
    ``v0.1/{alex,squeeze,vgg}.pth``) work too.

    Args:
        net: One of :data:`NETS`.
        weights_dir: Weights root overriding the environment variable.

    Returns:
        Flax variables ``{"params": ...}`` for the internal LPIPS module.

    Raises:
        ValueError: If ``net`` is unknown or a file does not fit the network.
        FileNotFoundError: If a file is missing; the message lists every path tried.
    """
    _check_net(net)
    dirs = _search_dirs(weights_dir)
    npz, pth = _BACKBONE_FILES[net]
    backbone_file = _find(f"{net} backbone", (npz, *pth), dirs)
    head_file = _find(f"v0.1 {net} linear-head", (f"lpips_v0.1_lin_{net}.npz", f"{net}.pth"), dirs)
    return _load_params(net, backbone_file.resolve(), head_file.resolve())


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


@functools.cache
def _batched(net: str):
    model = _LPIPS(net)
    return jax.jit(jax.vmap(model.apply, in_axes=(None, 0, 0)))


@functools.partial(jax.jit, static_argnums=(1,))
def _resize(images: Float[Array, "n h w c"], side: int) -> Float[Array, "n s s c"]:
    n, _, _, c = images.shape
    return jax.image.resize(images, (n, side, side, c), method="bilinear", antialias=False)


def _check_net(net: str) -> None:
    if net not in NETS:
        raise ValueError(f"net must be one of {NETS}, got {net!r}.")


def lpips(
    x: Float[ArrayLike, "n h w c"],
    y: Float[ArrayLike, "n h w c"],
    net: str = "alex",
    *,
    weights_dir: str | os.PathLike | None = None,
    resize: int | None = None,
) -> Float[Array, " n"]:
    """Per-image LPIPS v0.1 distance (lower is more similar).

    Equals ``lpips.LPIPS(net=net, version="0.1")(x, y, normalize=True)`` of the
    reference package on the same images (NCHW there, NHWC here). Grayscale
    images (C = 1) are repeated to three channels, the usual convention since
    the backbones are RGB networks. Loaded weights and the compiled function are
    cached per ``net``.

    Args:
        x: Batch of images ``[N, H, W, C]``, C in {1, 3}, floats in [0, 1].
        y: Batch of images with the same shape as ``x``.
        net: Backbone, one of ``"alex"``, ``"squeeze"``, ``"vgg"``.
        weights_dir: Weights root (see :func:`load_lpips_params`); defaults to
            ``$JAXLEAK_WEIGHTS_DIR`` or ``<repo>/../shared/weights``.
        resize: ``None`` (default) scores the images as they are, as breaching's
            evaluation does; an int ``s`` first resizes both to ``s x s``
            (bilinear, no antialiasing). Needed below :func:`min_side` (31 for
            AlexNet, so 28x28 MNIST needs e.g. ``resize=64``).

    Returns:
        ``[N]`` float32 distances; 0 for identical images (up to float
        rounding in the convolutions, below 1e-7).

    Raises:
        ValueError: On non-float or non-4-D inputs, a channel count other than
            1 or 3, mismatched shapes, an unknown ``net``, a bad ``resize``, or
            images smaller than the network accepts.
        FileNotFoundError: If the weights are missing (the message lists where
            it looked).

    >>> import numpy as np
    >>> x = np.full((2, 32, 32, 3), 0.5, np.float32)
    >>> lpips(x, x).tolist()  # doctest: +SKIP
    [0.0, 0.0]
    """
    _check_net(net)
    x, y = _check_pair(x, y)
    if x.shape[0] == 0 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"x and y must be non-empty batches of RGB or grayscale images [N, H, W, 3 or 1], "
            f"got shape {x.shape}."
        )
    if resize is not None:
        if isinstance(resize, bool) or not isinstance(resize, (int, np.integer)) or resize < 1:
            raise ValueError(f"resize must be None or a positive int, got {resize!r}.")
        x = _resize(x, int(resize))
        y = _resize(y, int(resize))
    _, height, width, channels = x.shape
    smallest = min_side(net)
    if min(height, width) < smallest:
        raise ValueError(
            f"net={net!r} needs images of at least {smallest}x{smallest} pixels, got "
            f"{height}x{width}; pass resize=<side> (e.g. resize=64) or use a net that "
            f"accepts smaller inputs (squeeze: {min_side('squeeze')}, vgg: {min_side('vgg')})."
        )
    if channels == 1:
        x = jnp.repeat(x, 3, axis=-1)
        y = jnp.repeat(y, 3, axis=-1)
    params = load_lpips_params(net, weights_dir=weights_dir)
    return _batched(net)(params, x, y)
