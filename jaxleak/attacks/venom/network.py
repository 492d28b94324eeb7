"""Venom's recovery network Diff-LRN and its two comparison variants (Flax linen).

``R_theta(x_hat, T)`` maps an SPE feature map ``x_hat`` (``[h, w, c]``, the FC
head's input map, e.g. 64x64x16 for the LeNet victim at 256x256) and its noise
strength ``T`` to an image ``[H, W, C]`` in ``(0, 1)`` in one deterministic pass
(Venom Alg. 2):

* :class:`DiffLRN` (variant ``"venom"``): Liquid Time Embedding ``phi(T)``
  (Time2Vec, liquid unit, gate; eqs. 9-12) conditions every ResNet block of the
  UNet by FiLM ``x * (scale(phi) + 1) + shift(phi)``;
* :class:`VenomDiff` (``"venom-diff"``): the same UNet conditioned on a plain
  sinusoidal embedding of ``T`` (no liquid unit, no gate);
* :class:`FGLAGenerator` (``"fgla"``): the same backbone with no FiLM layers
  and no ``T``: a plain feature -> image generator, as FGLA's.

Every model is called as ``model.apply(variables, features, noise_strength)``
with ``features`` ``[B, h, w, c]`` and ``noise_strength`` ``[B]`` (or a scalar,
broadcast over the batch); :class:`FGLAGenerator` accepts and ignores
``noise_strength`` so that the three share one training loop. Layout of the
UNet and head, the handling of odd map sizes and of non-integer upsampling
factors: :mod:`jaxleak.attacks.venom._unet`; the embedding and its defaults
(``alpha`` init 0.1 as ``sigmoid(logit(0.1))``, 10 liquid steps):
:mod:`jaxleak.attacks.venom._embedding`.

>>> import jax, jax.numpy as jnp
>>> config = RecoveryNetConfig(image_shape=(16, 16, 1), feature_shape=(4, 4, 3),
...                            base_width=8, multipliers=(1, 2), time_dim=8,
...                            attention_heads=1, attention_head_dim=8)
>>> model = make_recovery_net(config)
>>> x, t = jnp.ones((2, 4, 4, 3)), jnp.array([1.0, 3.0])
>>> variables = jax.jit(model.init)(jax.random.key(0), x, t)
>>> model.apply(variables, x, t).shape
(2, 16, 16, 1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxleak.attacks.venom._embedding import (
    DEFAULT_ALPHA_INIT,
    DEFAULT_LIQUID_STEPS,
    LiquidTimeEmbedding,
    SinusoidalTimeEmbedding,
)
from jaxleak.attacks.venom._unet import ConditionedUNet, PixelShuffleHead

Variant = Literal["venom", "venom-diff", "fgla"]
VARIANTS: tuple[str, ...] = ("venom", "venom-diff", "fgla")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecoveryNetConfig:
    """Architecture of a recovery network (defaults: Venom's public code where known).

    Attributes:
      image_shape: ``(H, W, C)`` of the reconstructed image.
      feature_shape: ``(h, w, c)`` of the input feature map (SPE's ``features``).
      variant: ``"venom"`` (Diff-LRN), ``"venom-diff"`` (sinusoidal ``T``
        embedding) or ``"fgla"`` (no ``T``, no FiLM).
      base_width: width of the first UNet stage (reference: 64).
      multipliers: stage widths as multiples of ``base_width`` (reference: 1, 2, 4).
      resnet_blocks: ResNet blocks per down/up stage (reference DDPM UNet: 2).
      groups: GroupNorm groups; must divide ``base_width * m`` for every ``m``.
      linear_attention: linear attention in the down and up paths.
      mid_attention: full attention in the middle of the UNet.
      attention_heads: heads of both attentions.
      attention_head_dim: size of each attention head.
      time_dim: size of the ``T`` embedding ``phi`` (Time2Vec output, liquid
        state and gate all share it); even, >= 4. Unused by ``"fgla"``.
      liquid_steps: liquid updates (eq. 11) per forward pass (``"venom"`` only).
      alpha_init: initial liquid leak rate in ``(0, 1)`` (paper: 0.1).
    """

    image_shape: tuple[int, int, int]
    feature_shape: tuple[int, int, int]
    variant: Variant = "venom"
    base_width: int = 64
    multipliers: tuple[int, ...] = (1, 2, 4)
    resnet_blocks: int = 2
    groups: int = 8
    linear_attention: bool = True
    mid_attention: bool = True
    attention_heads: int = 4
    attention_head_dim: int = 32
    time_dim: int = 64
    liquid_steps: int = DEFAULT_LIQUID_STEPS
    alpha_init: float = DEFAULT_ALPHA_INIT

    def __post_init__(self):
        object.__setattr__(self, "image_shape", _shape3("image_shape", self.image_shape))
        object.__setattr__(self, "feature_shape", _shape3("feature_shape", self.feature_shape))
        object.__setattr__(self, "multipliers", tuple(int(m) for m in self.multipliers))
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        positive = (
            "base_width",
            "resnet_blocks",
            "groups",
            "attention_heads",
            "attention_head_dim",
            "liquid_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.multipliers or min(self.multipliers) < 1:
            raise ValueError(
                f"multipliers must be a non-empty tuple of ints >= 1, got {self.multipliers}"
            )
        for m in (1, *self.multipliers):
            if (self.base_width * m) % self.groups:
                raise ValueError(
                    f"groups={self.groups} must divide every stage width "
                    f"(base_width * {m} = {self.base_width * m})"
                )
        if self.time_dim % 2 or self.time_dim < 4:
            raise ValueError(f"time_dim must be even and >= 4, got {self.time_dim}")
        if not 0.0 < self.alpha_init < 1.0:
            raise ValueError(f"alpha_init must be in (0, 1), got {self.alpha_init}")


class _RecoveryNet(nn.Module):
    """Shared fields and backbone of the three variants (see :class:`RecoveryNetConfig`)."""

    image_shape: tuple[int, int, int]
    feature_shape: tuple[int, int, int]
    base_width: int = 64
    multipliers: Sequence[int] = (1, 2, 4)
    resnet_blocks: int = 2
    groups: int = 8
    linear_attention: bool = True
    mid_attention: bool = True
    attention_heads: int = 4
    attention_head_dim: int = 32

    def _check(self, features: Array, noise_strength: Array | float | None) -> Array | None:
        """Validates the batch contract; returns ``noise_strength`` as ``[B]`` (or None)."""
        if features.ndim != 4 or tuple(features.shape[1:]) != tuple(self.feature_shape):
            raise ValueError(
                f"features must be [batch, {', '.join(map(str, self.feature_shape))}], "
                f"got shape {tuple(features.shape)}"
            )
        if noise_strength is None:
            return None
        t = jnp.asarray(noise_strength, jnp.float32)
        if t.ndim == 0:
            return jnp.broadcast_to(t, features.shape[:1])
        if t.shape != features.shape[:1]:
            raise ValueError(
                f"noise_strength must be a scalar or [batch] = {features.shape[:1]}, got {t.shape}"
            )
        return t

    def _backbone(self, features: Array, cond: Array | None) -> Array:
        x = ConditionedUNet(
            base_width=self.base_width,
            multipliers=tuple(self.multipliers),
            resnet_blocks=self.resnet_blocks,
            groups=self.groups,
            linear_attention=self.linear_attention,
            mid_attention=self.mid_attention,
            attention_heads=self.attention_heads,
            attention_head_dim=self.attention_head_dim,
            name="unet",
        )(features, cond)
        return PixelShuffleHead(tuple(self.image_shape), self.base_width, name="head")(x)


class DiffLRN(_RecoveryNet):
    """Venom's Diff-LRN: Liquid Time Embedding + FiLM-conditioned UNet + pixel-shuffle head.

    Attributes (beyond the shared ones of :class:`RecoveryNetConfig`):
      time_dim: size of ``phi(T)``.
      liquid_steps: liquid updates per forward pass.
      alpha_init: initial leak rate ``alpha``.
    """

    time_dim: int = 64
    liquid_steps: int = DEFAULT_LIQUID_STEPS
    alpha_init: float = DEFAULT_ALPHA_INIT

    @nn.compact
    def __call__(
        self, features: Float[Array, "b h w c"], noise_strength: Float[Array, " b"] | float
    ) -> Float[Array, "b H W C"]:
        """Reconstructs images from SPE features and their noise strengths ``T``.

        Raises:
          ValueError: on a feature map not ``[B, *feature_shape]`` or a
            ``noise_strength`` neither scalar nor ``[B]``.
        """
        if noise_strength is None:
            raise ValueError("DiffLRN needs a noise_strength T")
        t = self._check(features, noise_strength)
        phi = LiquidTimeEmbedding(
            self.time_dim, self.liquid_steps, self.alpha_init, name="time_embedding"
        )(t)
        return self._backbone(features, phi)


class VenomDiff(_RecoveryNet):
    """Venom-Diff ablation: Diff-LRN with a plain sinusoidal embedding of ``T``.

    Attributes (beyond the shared ones of :class:`RecoveryNetConfig`):
      time_dim: size of the sinusoidal embedding.
    """

    time_dim: int = 64

    @nn.compact
    def __call__(
        self, features: Float[Array, "b h w c"], noise_strength: Float[Array, " b"] | float
    ) -> Float[Array, "b H W C"]:
        """Reconstructs images from SPE features and ``T``.

        Raises:
          ValueError: as :meth:`DiffLRN.__call__`.
        """
        if noise_strength is None:
            raise ValueError("VenomDiff needs a noise_strength T")
        t = self._check(features, noise_strength)
        return self._backbone(
            features, SinusoidalTimeEmbedding(self.time_dim, name="time_embedding")(t)
        )


class FGLAGenerator(_RecoveryNet):
    """FGLA-style generator: the same backbone with no FiLM layers and no ``T``."""

    @nn.compact
    def __call__(
        self,
        features: Float[Array, "b h w c"],
        noise_strength: Float[Array, " b"] | float | None = None,
    ) -> Float[Array, "b H W C"]:
        """Reconstructs images from features; ``noise_strength`` is accepted and ignored.

        Raises:
          ValueError: on a feature map not ``[B, *feature_shape]``.
        """
        del noise_strength  # one call signature for the three variants
        self._check(features, None)
        return self._backbone(features, None)


def _shared_kwargs(config: RecoveryNetConfig) -> dict:
    names = [f.name for f in dataclasses.fields(_RecoveryNet) if f.name not in ("parent", "name")]
    return {name: getattr(config, name) for name in names}


_BUILDERS: dict[str, Callable[[RecoveryNetConfig], nn.Module]] = {
    "venom": lambda c: DiffLRN(
        **_shared_kwargs(c),
        time_dim=c.time_dim,
        liquid_steps=c.liquid_steps,
        alpha_init=c.alpha_init,
    ),
    "venom-diff": lambda c: VenomDiff(**_shared_kwargs(c), time_dim=c.time_dim),
    "fgla": lambda c: FGLAGenerator(**_shared_kwargs(c)),
}


def make_recovery_net(config: RecoveryNetConfig) -> nn.Module:
    """Builds the (unbound) Flax module of ``config.variant``.

    Args:
      config: architecture; validated when it was constructed.

    Returns:
      A :class:`DiffLRN`, :class:`VenomDiff` or :class:`FGLAGenerator`, called as
      ``model.apply(variables, features [B, h, w, c], noise_strength [B])``.

    Raises:
      TypeError: if ``config`` is not a :class:`RecoveryNetConfig`.
    """
    if not isinstance(config, RecoveryNetConfig):
        raise TypeError(f"make_recovery_net needs a RecoveryNetConfig, got {type(config).__name__}")
    return _BUILDERS[config.variant](config)


def _shape3(name: str, shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{name} must be three positive ints (H, W, C), got {shape}")
    return shape
