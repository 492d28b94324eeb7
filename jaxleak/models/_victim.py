"""The ``Victim`` bundle (a Flax module plus what attacks need to know) and its registry."""

from __future__ import annotations

import dataclasses
import functools
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
from jaxleak.models._convnet_sme import ConvNetSME
from jaxleak.models._lenet import LeNetDLG, LeNetVenom
from jaxleak.models._mixer import PATCH, MLPMixer
from jaxleak.models._mlp import MLP
from jaxleak.models._precode import DEFAULT_BETA, PRECODE_RNG, precode_penalty
from jaxleak.models._resnet import CifarResNet
from jaxleak.models._vgg import POOLS, VGG11

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
      layers: at least ``"head"``; the MLP also has ``"first"`` (its ``fc1``),
        ``convnet-sme`` has ``"fc"`` (its Dense on the conv map) and PRECODE
        victims have ``"precode"`` (the bottleneck's encoder, whose input is
        the map the head sees without PRECODE).
      has_batch_stats: whether the variables hold a ``batch_stats`` collection.
      width: base width for the nets that have one (``None`` otherwise).
      hidden: hidden widths of the MLP (``None`` for the other models).
      conv_impl: how the convolutions run (``"xla"`` or ``"patches"``);
        parameters are the same either way. ``None`` for the models without
        convolutions (``mlp``, ``mlp-mixer``).
      precode: PRECODE bottleneck size ``K_b`` (``None``: no PRECODE). A
        variational bottleneck sits directly before ``head``; see
        :mod:`jaxleak.models._precode` and :attr:`stochastic`.
      precode_beta: weight of PRECODE's KL term (``None`` without PRECODE).
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
    precode: int | None = None
    precode_beta: float | None = None

    def __hash__(self) -> int:
        # Every other field is determined by these; hashable so a Victim can be a jit static arg.
        return hash(
            (
                self.name,
                self.image_shape,
                self.num_classes,
                self.width,
                self.hidden,
                self.conv_impl,
                self.precode,
                self.precode_beta,
            )
        )

    @property
    def stochastic(self) -> bool:
        """Whether the loss draws noise (PRECODE's ``eps``): then :meth:`loss` needs a key.

        Callers computing per-example losses must split the key per example
        (``jax.random.split(key, b)``) so that each example draws its own sample.
        """
        return self.precode is not None

    def _rngs(self, key: jax.Array | None) -> dict[str, jax.Array] | None:
        return {PRECODE_RNG: key} if key is not None and self.stochastic else None

    def _require_key(self, key: jax.Array | None, where: str) -> None:
        if key is None and self.stochastic:
            raise ValueError(
                f"{self.name} with PRECODE samples its bottleneck: {where} needs a PRNG key "
                "(key=...; split it per example)"
            )

    def _variables(self, params: PyTree, batch_stats: PyTree | None) -> Variables:
        variables = {"params": params}
        if self.has_batch_stats:
            if batch_stats is None:
                raise ValueError(f"{self.name} uses BatchNorm: pass its batch_stats")
            variables["batch_stats"] = batch_stats
        return variables

    def _objective(
        self,
        variables: Variables,
        images: Float[Array, "b h w c"],
        labels: Int[Array, " b"] | Float[Array, "b k"],
        *,
        train: bool,
        key: jax.Array | None,
    ) -> tuple[Float[Array, " b"], Variables]:
        """Per-example training objective and the (possibly updated) ``batch_stats``.

        Float ``labels`` ``[b, K]`` are label distributions (soft cross-entropy). A PRECODE
        victim without ``key`` runs its mean path ``z = mu``; its KL term is there either way.
        """
        mutable = (["batch_stats"] if train else []) + ([INTERMEDIATES] if self.stochastic else [])
        rngs = self._rngs(key)
        if mutable:
            logits, state = self.module.apply(
                variables, images, train=train, rngs=rngs, mutable=mutable
            )
        else:
            logits, state = self.module.apply(variables, images, train=train, rngs=rngs), {}
        if jnp.issubdtype(labels.dtype, jnp.floating):
            losses = optax.softmax_cross_entropy(logits, labels)
        else:
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        if self.stochastic:
            kl = state[INTERMEDIATES]["precode"]["kl"][-1]
            losses = losses + precode_penalty(kl, self.precode_beta)
        batch_stats = state.get("batch_stats", {}) if train else variables.get("batch_stats", {})
        return losses, dict(batch_stats)

    def init(self, key: jax.Array) -> Variables:
        """Fresh variables: ``{"params": ...}`` plus ``"batch_stats"`` for BatchNorm models.

        Args:
          key: a JAX PRNG key.

        Returns:
          The Flax variables dict.
        """
        return dict(_jitted_init(self)(key))

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
        key: jax.Array | None = None,
    ) -> Float[Array, "b k"] | tuple[Float[Array, "b k"], PyTree]:
        """Logits for a batch of images.

        Args:
          variables: as returned by :meth:`init` (or training).
          images: NHWC batch of shape ``(b, *image_shape)``.
          train: ``False`` (default) uses BatchNorm running statistics, so each
            example's output depends on that example alone: this is the mode for
            gradient capture. ``True`` normalises with the batch statistics and
            updates the running ones, for training the victim.
          key: PRNG key for PRECODE's sample ``eps`` (one draw per example, all
            from this key). Without it a PRECODE victim is deterministic and
            uses the bottleneck mean, ``z = mu``. Ignored by other victims.

        Returns:
          ``train=False``: logits ``[b, K]``. ``train=True``: ``(logits,
          new_batch_stats)``, where ``new_batch_stats`` is the updated
          ``batch_stats`` collection (an empty dict for models without BatchNorm).

        Raises:
          ValueError: if ``images`` does not have shape ``(b, *image_shape)``.
        """
        self._check_batch(images)
        rngs = self._rngs(key)
        if not train:
            return self.module.apply(variables, images, train=False, rngs=rngs)
        logits, updates = self.module.apply(
            variables, images, train=True, mutable=["batch_stats"], rngs=rngs
        )
        return logits, dict(updates.get("batch_stats", {}))

    def loss(
        self,
        params: PyTree,
        batch_stats: PyTree | None,
        image: Float[Array, "h w c"],
        label: Int[Array, ""] | int,
        key: jax.Array | None = None,
    ) -> Float[Array, ""]:
        """Training loss of ONE example, BatchNorm in inference mode; vmap over examples.

        Cross-entropy, plus ``precode_beta * KL(q || N(0, I)) / ln 2`` for PRECODE
        victims, whose bottleneck sample ``z = mu + sigma * eps`` draws ``eps``
        from ``key``. ``jax.grad(victim.loss)(params, batch_stats, image, label)``
        (with ``key`` when :attr:`stochastic`) is that example's gradient, the
        quantity a federated client reveals.

        Args:
          params: the ``params`` collection.
          batch_stats: the ``batch_stats`` collection (ignored, may be ``None``,
            for models without BatchNorm).
          image: one image of shape ``image_shape``.
          label: its integer class in ``[0, K)``.
          key: PRNG key for PRECODE's ``eps``; required when :attr:`stochastic`
            (give each example its own), ignored otherwise.

        Returns:
          The scalar loss.

        Raises:
          ValueError: if ``image`` has the wrong shape, batch statistics are
            missing, or a PRECODE victim gets no key.
        """
        if tuple(image.shape) != self.image_shape:
            raise ValueError(
                f"{self.name}.loss takes ONE image of shape {self.image_shape} (vmap over a "
                f"batch), got {tuple(image.shape)}"
            )
        self._require_key(key, "loss")
        variables = self._variables(params, batch_stats)
        losses, _ = self._objective(
            variables, image[None], jnp.asarray(label)[None], train=False, key=key
        )
        return losses[0]

    def soft_losses(
        self,
        variables: Variables,
        images: Float[Array, "b h w c"],
        label_probs: Float[Array, "b k"],
    ) -> Float[Array, " b"]:
        """Per-example loss against label distributions: the objective an attacker replays.

        Soft cross-entropy (an attacker's dummy labels), BatchNorm in inference mode. An
        attacker does not know a PRECODE client's draws, so a PRECODE victim runs its
        bottleneck's mean path (``eps = 0``, ``z = mu``) and keeps its KL term, which does not
        depend on the draw. With one-hot labels on a deterministic victim the gradient of the
        mean is the client's step gradient.

        Args:
          variables: model variables.
          images: NHWC batch.
          label_probs: ``[b, K]`` label distributions.

        Returns:
          ``[b]`` losses.

        >>> victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, precode=2)
        >>> victim.soft_losses(victim.init(jax.random.key(0)), jnp.zeros((2, 4, 4, 1)), jnp.full((2, 3), 1 / 3)).shape
        (2,)
        """
        self._check_batch(images)
        return self._objective(variables, images, label_probs, train=False, key=None)[0]

    def batch_loss(
        self,
        variables: Variables,
        images: Float[Array, "b h w c"],
        labels: Int[Array, " b"],
        *,
        train: bool = False,
        key: jax.Array | None = None,
    ) -> tuple[Float[Array, ""], Variables]:
        """Mean training loss of a batch, for training the victim (:meth:`loss` per example).

        Args:
          variables: model variables.
          images: NHWC batch.
          labels: integer classes ``[b]``.
          train: BatchNorm with batch statistics (``True``, updating the running
            ones) or running statistics (``False``).
          key: PRNG key for PRECODE's ``eps`` (one draw per example); required
            when :attr:`stochastic`, ignored otherwise.

        Returns:
          ``(mean loss, batch_stats)``: the updated running statistics when
          ``train``, else the given ones (an empty dict without BatchNorm).

        Raises:
          ValueError: a badly shaped batch, or a PRECODE victim without a key.

        >>> victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, precode=2)
        >>> variables = victim.init(jax.random.key(0))
        >>> loss, _ = victim.batch_loss(
        ...     variables, jnp.zeros((2, 4, 4, 1)), jnp.array([0, 1]), key=jax.random.key(1))
        >>> loss.shape
        ()
        """
        self._check_batch(images)
        self._require_key(key, "batch_loss")
        losses, batch_stats = self._objective(variables, images, labels, train=train, key=key)
        return jnp.mean(losses), batch_stats

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
        if self.precode is not None:
            options["precode"] = self.precode
            options["precode_beta"] = self.precode_beta
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


def _conv_stack_builder(cls: type[nn.Module], pools: int, paths: dict[str, tuple[str, ...]]) -> _Builder:
    """Builder of a conv net whose only option is its base ``width`` (default 64)."""

    def build(
        name: str,
        image_shape: tuple[int, int, int],
        num_classes: int,
        width: int | None,
        hidden: Any,
        conv_impl: str = "xla",
    ) -> _Built:
        _reject_option(name, "hidden", hidden)
        _require_multiple(name, image_shape, 2**pools)
        width = 64 if width is None else width
        return _Built(
            module=cls(num_classes=num_classes, width=width, conv_impl=conv_impl),
            paths=paths,
            width=width,
            conv_impl=conv_impl,
        )

    return build


_build_convnet_sme = _conv_stack_builder(ConvNetSME, 2, {"head": ("head",), "fc": ("fc",)})
_build_vgg11 = _conv_stack_builder(VGG11, POOLS, _HEAD_ONLY)


def _build_mixer(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    width: int | None,
    hidden: Any,
    conv_impl: str = "xla",
) -> _Built:
    if conv_impl != "xla":
        raise ValueError(f"{name} has no convolutions: conv_impl={conv_impl!r} does not apply")
    _reject_option(name, "hidden", hidden)
    height, image_width, _ = image_shape
    if height % PATCH or image_width % PATCH:
        raise ValueError(
            f"{name} cuts {PATCH}x{PATCH} patches: image height and width must be multiples of "
            f"{PATCH}, got {height}x{image_width}"
        )
    width = 128 if width is None else width
    if width < 2:
        raise ValueError(f"{name}: width must be >= 2 (the token MLP is width // 2 wide)")
    return _Built(
        module=MLPMixer(num_classes=num_classes, width=width), paths=_HEAD_ONLY, width=width
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
    "convnet-sme": _Entry(
        description=(
            "SME / DLF ConvNet (FedAvg): conv3x3 w, ReLU, avgpool2, conv3x3 2w, ReLU, avgpool2, "
            "fc 200, ReLU, head on 200 (w=64); torch-default init"
        ),
        build=_build_convnet_sme,
    ),
    "vgg11": _Entry(
        description=(
            "VGG-11 (CIFAR): 8 conv3x3+BN+ReLU (w,2w,4w,4w,8w x4), 5 max-pools, head on "
            "H/32 x W/32 x 8w (w=64)"
        ),
        build=_build_vgg11,
    ),
    "mlp-mixer": _Entry(
        description=(
            "MLP-Mixer: 4x4 patches (64 tokens at 32x32), hidden C=128 (width), token MLP C/2=64, "
            "channel MLP 4C=512, depth 4, LayerNorm, token mean, head on C"
        ),
        build=_build_mixer,
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


def _check_precode(precode: Any, precode_beta: Any) -> tuple[int | None, float | None]:
    if precode is None:
        if precode_beta is not None:
            raise ValueError("precode_beta weights PRECODE's KL term: it needs precode=K_b")
        return None, None
    precode = _positive_int(precode, "precode (the bottleneck size)")
    if precode_beta is None:
        return precode, DEFAULT_BETA
    if (
        isinstance(precode_beta, bool)
        or not isinstance(precode_beta, numbers.Real)
        or not math.isfinite(precode_beta)
        or precode_beta < 0
    ):
        raise ValueError(f"precode_beta must be a finite number >= 0, got {precode_beta!r}")
    return precode, float(precode_beta)


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
    precode: int | None = None,
    precode_beta: float | None = None,
) -> Victim:
    """Builds a victim model by name.

    Args:
      name: one of ``VICTIMS``.
      image_shape: ``(H, W, C)`` with C in {1, 3}; H and W must suit the model
        (multiples of 4 for the LeNets, ResNet-8, ``convnet-sme`` and
        ``mlp-mixer``, 8 for ResNet-18, 32 for VGG-11, at least 9 for the
        ConvNet).
      num_classes: K >= 2.
      width: base width of ``convnet``, ``convnet-sme`` and ``vgg11`` (default
        64), the ResNets (64 for ResNet-18, 16 for ResNet-8) and ``mlp-mixer``
        (its hidden width C, default 128); for ``mlp``, the width of a single
        hidden layer. Not accepted by the LeNets.
      hidden: ``mlp`` only: hidden width(s), an int or a sequence (default 256).
      conv_impl: the convolution implementation (:class:`Conv`): ``"xla"`` or
        ``"patches"`` (im2col; much faster per-example gradients on GPUs, and
        double-backward attack steps inside loops on CPU). ``mlp`` and
        ``mlp-mixer`` accept ``"xla"`` only. Capture and the attacks pick per
        workload, see :meth:`Victim.with_conv_impl`.
      precode: PRECODE (Scheliga et al. 2022) bottleneck size ``K_b`` (the
        paper: 256), or ``None`` for no PRECODE. Any model takes it: a
        variational bottleneck is inserted directly before ``head``, the loss
        gains ``precode_beta * KL / ln 2`` and needs a PRNG key (see
        :attr:`Victim.stochastic`).
      precode_beta: weight of the KL term (default 1e-3 when ``precode`` is set;
        only with ``precode``).

    Returns:
      The :class:`Victim`, whose ``layers[...].feature_shape`` is computed from
      the module by abstract evaluation.

    Raises:
      ValueError: unknown name, bad image shape or class count, or an option the
        model does not take.

    >>> victim = get_victim("lenet-venom", image_shape=(256, 256, 3), num_classes=10)
    >>> victim.layers["head"].feature_shape, victim.layers["head"].in_features
    ((64, 64, 16), 65536)
    >>> precoded = get_victim("convnet-sme", image_shape=(32, 32, 3), num_classes=10, precode=256)
    >>> precoded.stochastic, precoded.metadata()["options"]
    (True, {'width': 64, 'precode': 256, 'precode_beta': 0.001})
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown victim {name!r}; known victims: {', '.join(sorted(_REGISTRY))}")
    shape = _check_image_shape(image_shape)
    num_classes = _positive_int(num_classes, "num_classes", minimum=2)
    if width is not None:
        width = _positive_int(width, "width")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    precode, precode_beta = _check_precode(precode, precode_beta)
    built = _REGISTRY[name].build(name, shape, num_classes, width, hidden, conv_impl)
    module, paths = built.module, built.paths
    if precode is not None:
        module = module.clone(precode=precode)
        paths = {**paths, "precode": ("precode", "encoder")}
    layers, has_batch_stats = _layers_from_shapes(name, module, shape, paths)
    return Victim(
        name=name,
        module=module,
        image_shape=shape,
        num_classes=num_classes,
        layers=layers,
        has_batch_stats=has_batch_stats,
        width=built.width,
        hidden=built.hidden,
        conv_impl=built.conv_impl,
        precode=precode,
        precode_beta=precode_beta,
    )


@functools.lru_cache(maxsize=64)
def _jitted_init(victim: Victim):
    """``victim``'s initialisation, compiled once per victim and process (audits init many times)."""
    # The dummy batch is made inside the jitted function: made here, under an outer trace (e.g.
    # ``abstract_variables``' eval_shape), it would be a tracer captured by the cached closure.
    shape = (1, *victim.image_shape)
    return jax.jit(lambda k: victim.module.init(k, jnp.zeros(shape, jnp.float32), train=False))
