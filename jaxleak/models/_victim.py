"""The ``Victim`` bundle (a Flax module plus what attacks need to know) and its registry."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PyTree

from jaxleak.models._common import CONV_IMPLS, INTERMEDIATES, input_name
from jaxleak.models._convnet import ConvNet
from jaxleak.models._lenet import LeNetDLG, LeNetVenom
from jaxleak.models._mlp import MLP
from jaxleak.models._resnet import CifarResNet

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseLayer:
    """A Dense layer whose gradient for one example is the outer product ``x delta^T``.

    Flax stores the kernel as ``[d, K]`` (inputs first), so for one example
    ``grad(kernel) == outer(x, grad(bias))`` with ``x`` the layer's flattened
    input.

    Attributes:
      path: keys leading from ``params`` to the Dense module, e.g. ``("head",)``
        for ``params["head"]["kernel"]`` (shape ``[d, K]``) and ``["bias"]`` (``[K]``).
      feature_shape: the layer input as an ``[H, W, C]`` map; ``d = H * W * C``
        and the input vector is that map flattened in NHWC order.
    """

    path: tuple[str, ...]
    feature_shape: tuple[int, int, int]

    @property
    def in_features(self) -> int:
        """Input dimension ``d = prod(feature_shape)``."""
        return math.prod(self.feature_shape)

    def select(self, tree: Mapping[str, Any]) -> Mapping[str, Any]:
        """The ``{"kernel", "bias"}`` subtree of ``tree`` (params or their gradients).

        Args:
          tree: a ``params`` pytree, or a gradient pytree of the same structure.

        Returns:
          The mapping at ``path``, holding ``kernel`` ``[d, K]`` and ``bias`` ``[K]``.

        Raises:
          ValueError: if ``path`` does not exist in ``tree``.
        """
        node = tree
        for key in self.path:
            if not isinstance(node, Mapping) or key not in node:
                raise ValueError(f"path {self.path} not found in the given tree")
            node = node[key]
        return node


@dataclasses.dataclass(frozen=True, kw_only=True)
class Victim:
    """A victim model: Flax module, input shape, classes and its invertible Dense layers.

    Build one with :func:`get_victim`. Images are NHWC float32.

    Attributes:
      name: registry name (see ``VICTIMS``).
      module: the Flax linen module; ``module.apply(variables, x, train=...)``.
      image_shape: ``(H, W, C)`` of one input image.
      num_classes: number of logits K.
      layers: at least ``"head"``; the MLP also has ``"first"`` (its ``fc1``).
      has_batch_stats: whether the variables hold a ``batch_stats`` collection.
      width: base width for the conv nets that have one (``None`` otherwise).
      hidden: hidden widths of the MLP (``None`` for the other models).
      conv_impl: how the convolutions run (``"xla"`` or ``"patches"``);
        parameters are the same either way. ``None`` for ``mlp``.
    """

    name: str
    module: nn.Module
    image_shape: tuple[int, int, int]
    num_classes: int
    layers: Mapping[str, DenseLayer]
    has_batch_stats: bool = False
    width: int | None = None
    hidden: tuple[int, ...] | None = None
    conv_impl: str | None = None

    def __hash__(self) -> int:
        # Every other field is determined by these; hashable so a Victim can be a jit static arg.
        return hash((self.name, self.image_shape, self.num_classes, self.width, self.hidden, self.conv_impl))

    def init(self, key: jax.Array) -> Variables:
        """Fresh variables: ``{"params": ...}`` plus ``"batch_stats"`` for BatchNorm models.

        Args:
          key: a JAX PRNG key.

        Returns:
          The Flax variables dict.
        """
        dummy = jnp.zeros((1, *self.image_shape), jnp.float32)
        variables = jax.jit(lambda k: self.module.init(k, dummy, train=False))(key)
        return dict(variables)

    def abstract_variables(self) -> Variables:
        """Shapes and dtypes of :meth:`init`'s output (``jax.ShapeDtypeStruct`` leaves), no compute."""
        return jax.eval_shape(self.init, jax.random.key(0))

    def _check_batch(self, images: Float[Array, "b h w c"]) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{self.name} expects images of shape (batch, {', '.join(map(str, self.image_shape))})"
                f" in NHWC order, got {tuple(images.shape)}"
            )

    def apply(
        self,
        variables: Variables,
        images: Float[Array, "b h w c"],
        *,
        train: bool = False,
    ) -> Float[Array, "b k"] | tuple[Float[Array, "b k"], PyTree]:
        """Logits for a batch of images.

        Args:
          variables: as returned by :meth:`init` (or training).
          images: NHWC batch of shape ``(b, *image_shape)``.
          train: ``False`` (default) uses BatchNorm running statistics, so each
            example's output depends on that example alone: this is the mode for
            gradient capture. ``True`` normalises with the batch statistics and
            updates the running ones, for training the victim.

        Returns:
          ``train=False``: logits ``[b, K]``. ``train=True``: ``(logits,
          new_batch_stats)``, where ``new_batch_stats`` is the updated
          ``batch_stats`` collection (an empty dict for models without BatchNorm).

        Raises:
          ValueError: if ``images`` does not have shape ``(b, *image_shape)``.
        """
        self._check_batch(images)
        if not train:
            return self.module.apply(variables, images, train=False)
        logits, updates = self.module.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits, dict(updates.get("batch_stats", {}))

    def loss(
        self,
        params: PyTree,
        batch_stats: PyTree | None,
        image: Float[Array, "h w c"],
        label: Int[Array, ""] | int,
    ) -> Float[Array, ""]:
        """Cross-entropy of ONE example, BatchNorm in inference mode; vmap over examples.

        ``jax.grad(victim.loss)(params, batch_stats, image, label)`` is that
        example's gradient, the quantity a federated client reveals.

        Args:
          params: the ``params`` collection.
          batch_stats: the ``batch_stats`` collection (ignored, may be ``None``,
            for models without BatchNorm).
          image: one image of shape ``image_shape``.
          label: its integer class in ``[0, K)``.

        Returns:
          The scalar loss.

        Raises:
          ValueError: if ``image`` has the wrong shape or batch statistics are missing.
        """
        if tuple(image.shape) != self.image_shape:
            raise ValueError(
                f"{self.name}.loss takes ONE image of shape {self.image_shape} (vmap over a "
                f"batch), got {tuple(image.shape)}"
            )
        variables = {"params": params}
        if self.has_batch_stats:
            if batch_stats is None:
                raise ValueError(f"{self.name} uses BatchNorm: pass its batch_stats")
            variables["batch_stats"] = batch_stats
        logits = self.module.apply(variables, image[None], train=False)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, label)

    def layer_input(
        self,
        variables: Variables,
        images: Float[Array, "b h w c"],
        *,
        layer: str = "head",
    ) -> Float[Array, "b d"]:
        """The flattened input of a Dense layer (inference mode): what SPE tries to recover.

        Args:
          variables: model variables.
          images: NHWC batch.
          layer: a key of ``layers``.

        Returns:
          ``[b, d]``; reshape a row to ``layers[layer].feature_shape`` for the map.

        Raises:
          ValueError: for an unknown layer or a badly shaped batch.
        """
        if layer not in self.layers:
            raise ValueError(f"{self.name} has no layer {layer!r}; it has {sorted(self.layers)}")
        self._check_batch(images)
        _, state = self.module.apply(variables, images, train=False, mutable=[INTERMEDIATES])
        fmap = state[INTERMEDIATES][input_name(layer)][-1]
        return fmap.reshape(fmap.shape[0], -1)

    def with_conv_impl(self, conv_impl: str) -> Victim:
        """The same victim (same variables) with its convolutions run by ``conv_impl``.

        Args:
          conv_impl: ``"xla"`` or ``"patches"``.

        Returns:
          ``self`` when nothing changes, else a victim with a cloned module.

        Raises:
          ValueError: ``"patches"`` for a model without that implementation.
        """
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        if conv_impl == self.conv_impl or (self.conv_impl is None and conv_impl == "xla"):
            return self
        if self.conv_impl is None:
            raise ValueError(f"conv_impl='patches' is not implemented for {self.name}")
        return dataclasses.replace(self, module=self.module.clone(conv_impl=conv_impl), conv_impl=conv_impl)

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description that identifies this architecture (stored with checkpoints)."""
        options: dict[str, Any] = {}
        if self.width is not None:
            options["width"] = self.width
        if self.hidden is not None:
            options["hidden"] = list(self.hidden)
        # ``get_victim(model, image_shape=..., num_classes=..., **options)`` rebuilds this victim.
        return {
            "model": self.name,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "options": options,
        }


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Built:
    module: nn.Module
    paths: dict[str, tuple[str, ...]]
    width: int | None = None
    hidden: tuple[int, ...] | None = None
    conv_impl: str | None = None


# (name, image_shape, num_classes, width, hidden, conv_impl) -> module and layer paths.
_Builder = Callable[[str, tuple[int, int, int], int, int | None, Any, str], _Built]
_HEAD_ONLY = {"head": ("head",)}


def _reject_option(name: str, option: str, value: Any) -> None:
    if value is not None:
        raise ValueError(f"{name} has a fixed architecture and takes no {option} (got {value!r})")


def _require_multiple(name: str, image_shape: tuple[int, int, int], factor: int) -> None:
    height, width, _ = image_shape
    if height % factor or width % factor:
        raise ValueError(
            f"{name} halves the resolution {int(math.log2(factor))} times: image height and "
            f"width must be multiples of {factor}, got {height}x{width}"
        )


def _lenet_builder(cls: type[nn.Module]) -> Callable[..., _Built]:
    def build(
        name: str,
        image_shape: tuple[int, int, int],
        num_classes: int,
        width: int | None,
        hidden: Any,
        conv_impl: str = "xla",
    ) -> _Built:
        _reject_option(name, "width", width)
        _reject_option(name, "hidden", hidden)
        _require_multiple(name, image_shape, 4)
        module = cls(num_classes=num_classes, conv_impl=conv_impl)
        return _Built(module=module, paths=_HEAD_ONLY, conv_impl=conv_impl)

    return build


_build_lenet_dlg = _lenet_builder(LeNetDLG)
_build_lenet_venom = _lenet_builder(LeNetVenom)


def _build_convnet(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    width: int | None,
    hidden: Any,
    conv_impl: str = "xla",
) -> _Built:
    _reject_option(name, "hidden", hidden)
    if min(image_shape[:2]) < 9:
        raise ValueError(
            f"{name} max-pools twice with window 3: images must be at least 9x9, got "
            f"{image_shape[0]}x{image_shape[1]}"
        )
    width = 64 if width is None else width
    return _Built(
        module=ConvNet(num_classes=num_classes, width=width, conv_impl=conv_impl),
        paths=_HEAD_ONLY,
        width=width,
        conv_impl=conv_impl,
    )


def _resnet_builder(stage_sizes: tuple[int, ...], default_width: int, spatial: bool) -> _Builder:
    def build(
        name: str,
        image_shape: tuple[int, int, int],
        num_classes: int,
        width: int | None,
        hidden: Any,
        conv_impl: str = "xla",
    ) -> _Built:
        _reject_option(name, "hidden", hidden)
        _require_multiple(name, image_shape, 2 ** (len(stage_sizes) - 1))
        width = default_width if width is None else width
        module = CifarResNet(
            num_classes=num_classes,
            stage_sizes=stage_sizes,
            width=width,
            spatial_head=spatial,
            conv_impl=conv_impl,
        )
        return _Built(module=module, paths=_HEAD_ONLY, width=width, conv_impl=conv_impl)

    return build


def _positive_int(value: Any, what: str, minimum: int = 1) -> int:
    """``value`` as a Python int (NumPy integers welcome), or a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _normalise_hidden(name: str, hidden: Any) -> tuple[int, ...]:
    sizes = (hidden,) if isinstance(hidden, numbers.Integral) else hidden
    if not isinstance(sizes, Sequence) or isinstance(sizes, str) or len(sizes) == 0:
        raise ValueError(f"{name}: hidden must be a positive int or a non-empty sequence of them")
    return tuple(_positive_int(size, f"{name}: each hidden width") for size in sizes)


def _build_mlp(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    width: int | None,
    hidden: Any,
    conv_impl: str = "xla",
) -> _Built:
    if conv_impl != "xla":
        raise ValueError(f"{name} has no convolutions: conv_impl={conv_impl!r} does not apply")
    if width is not None and hidden is not None:
        raise ValueError(f"{name}: give either width (one hidden layer) or hidden, not both")
    if hidden is None:
        hidden = 256 if width is None else width
    sizes = _normalise_hidden(name, hidden)
    return _Built(
        module=MLP(num_classes=num_classes, hidden=sizes),
        paths={"head": ("head",), "first": ("fc1",)},
        hidden=sizes,
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Entry:
    description: str
    build: _Builder


_REGISTRY: dict[str, _Entry] = {
    "lenet-dlg": _Entry(
        description=(
            "DLG's LeNet: 3 sigmoid 5x5 convs (12 ch, strides 2,2,1), U(-0.5,0.5) init, "
            "head on 12 x H/4 x W/4"
        ),
        build=_build_lenet_dlg,
    ),
    "lenet-venom": _Entry(
        description="Venom's LeNet: conv 6 / conv 16 (5x5, ReLU, maxpool 2), head on 16 x H/4 x W/4",
        build=_build_lenet_venom,
    ),
    "convnet": _Entry(
        description=(
            "Inverting Gradients / SME ConvNet: 8 conv3x3+BN+ReLU (w,2w,2w,4w x5), two 3x3 "
            "max-pools, head on (H//9) x (W//9) x 4w; width w default 64"
        ),
        build=_build_convnet,
    ),
    "resnet18": _Entry(
        description=(
            "ResNet-18, CIFAR stem, BasicBlocks (2,2,2,2), widths w..8w (w=64), head after "
            "global average pooling"
        ),
        build=_resnet_builder((2, 2, 2, 2), 64, spatial=False),
    ),
    "resnet18-spatial": _Entry(
        description="ResNet-18 with the head on the flattened H/8 x W/8 x 8w map before pooling",
        build=_resnet_builder((2, 2, 2, 2), 64, spatial=True),
    ),
    "resnet8": _Entry(
        description=(
            "ResNet-8, CIFAR stem, BasicBlocks (1,1,1), widths w,2w,4w (w=16), head after "
            "global average pooling"
        ),
        build=_resnet_builder((1, 1, 1), 16, spatial=False),
    ),
    "resnet8-spatial": _Entry(
        description="ResNet-8 with the head on the flattened H/4 x W/4 x 4w map before pooling",
        build=_resnet_builder((1, 1, 1), 16, spatial=True),
    ),
    "mlp": _Entry(
        description=(
            "MLP: flatten -> fc1 (256) -> ReLU [-> more hidden] -> head; fc1 sees the raw image"
        ),
        build=_build_mlp,
    ),
}

VICTIMS: dict[str, str] = {name: entry.description for name, entry in _REGISTRY.items()}
"""Victim name -> one-line description."""


def _check_image_shape(image_shape: Any) -> tuple[int, int, int]:
    is_sequence = isinstance(image_shape, Sequence | np.ndarray) and not isinstance(
        image_shape, str
    )
    if not is_sequence or len(image_shape) != 3:
        raise ValueError(f"image_shape must be three positive ints (H, W, C), got {image_shape!r}")
    shape = tuple(_positive_int(s, "each image_shape entry") for s in image_shape)
    if shape[2] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (NHWC), got C={shape[2]}")
    return shape


def _layers_from_shapes(
    name: str, module: nn.Module, image_shape: tuple[int, int, int], paths: dict
) -> tuple[dict[str, DenseLayer], bool]:
    """Reads each layer's input shape off the sown maps, by abstract evaluation only."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)

    def probe(key: jax.Array, images: jax.Array) -> tuple[Variables, Variables]:
        variables = module.init(key, images, train=False)
        _, state = module.apply(variables, images, train=False, mutable=[INTERMEDIATES])
        return variables, state[INTERMEDIATES]

    variables, sown = jax.eval_shape(probe, jax.random.key(0), x)
    layers = {}
    for key, path in paths.items():
        feature_shape = tuple(int(s) for s in sown[input_name(key)][-1].shape[1:])
        dense = DenseLayer(path=path, feature_shape=feature_shape)
        rows = dense.select(variables["params"])["kernel"].shape[0]
        if rows != dense.in_features:  # a bug in a module, not a user error
            raise AssertionError(f"{name}/{key}: kernel has {rows} rows, map {feature_shape}")
        layers[key] = dense
    return layers, "batch_stats" in variables


def get_victim(
    name: str,
    *,
    image_shape: Sequence[int],
    num_classes: int,
    width: int | None = None,
    hidden: int | Sequence[int] | None = None,
    conv_impl: str = "xla",
) -> Victim:
    """Builds a victim model by name.

    Args:
      name: one of ``VICTIMS``.
      image_shape: ``(H, W, C)`` with C in {1, 3}; H and W must suit the model
        (multiples of 4 for the LeNets and ResNet-8, 8 for ResNet-18, at least 9
        for the ConvNet).
      num_classes: K >= 2.
      width: base width of ``convnet`` (default 64) and the ResNets (64 for
        ResNet-18, 16 for ResNet-8); for ``mlp``, the width of a single hidden
        layer. Not accepted by the LeNets.
      hidden: ``mlp`` only: hidden width(s), an int or a sequence (default 256).
      conv_impl: the convolution implementation (:class:`Conv`): ``"xla"`` or
        ``"patches"`` (im2col; much faster per-example gradients on GPUs, and
        double-backward attack steps inside loops on CPU). ``mlp`` accepts
        ``"xla"`` only. Capture and the attacks pick per workload, see
        :meth:`Victim.with_conv_impl`.

    Returns:
      The :class:`Victim`, whose ``layers[...].feature_shape`` is computed from
      the module by abstract evaluation.

    Raises:
      ValueError: unknown name, bad image shape or class count, or an option the
        model does not take.

    >>> victim = get_victim("lenet-venom", image_shape=(256, 256, 3), num_classes=10)
    >>> victim.layers["head"].feature_shape, victim.layers["head"].in_features
    ((64, 64, 16), 65536)
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown victim {name!r}; known victims: {', '.join(sorted(_REGISTRY))}")
    shape = _check_image_shape(image_shape)
    num_classes = _positive_int(num_classes, "num_classes", minimum=2)
    if width is not None:
        width = _positive_int(width, "width")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    built = _REGISTRY[name].build(name, shape, num_classes, width, hidden, conv_impl)
    layers, has_batch_stats = _layers_from_shapes(name, built.module, shape, built.paths)
    return Victim(
        name=name,
        module=built.module,
        image_shape=shape,
        num_classes=num_classes,
        layers=layers,
        has_batch_stats=has_batch_stats,
        width=built.width,
        hidden=built.hidden,
        conv_impl=built.conv_impl,
    )
