"""The UNet velocity field ``v(x, t)`` of a flow-matching image prior (Flax linen).

The architecture is the DDPM-style UNet that the common public CIFAR-10
flow-matching recipe uses (NOTES.md section 4): a 3x3 input convolution, one
stage per channel multiplier of ``num_res_blocks`` residual blocks (GroupNorm,
SiLU, 3x3 convolutions, the time embedding added between them) followed by a
strided 3x3 downsampling convolution, a middle of residual block / self-attention
/ residual block, a mirrored up path of ``num_res_blocks + 1`` blocks per stage
that each take one skip connection from the down path, nearest-neighbour 2x
upsampling followed by a 3x3 convolution, and GroupNorm / SiLU / a 3x3 output
convolution initialised to zero. Self-attention follows every residual block at
the feature-map sizes named in ``attention_resolutions``. The time ``t`` in
[0, 1] enters through a sinusoidal embedding followed by a two-layer MLP of width
``4 * base_width``.

The model maps images in [-1, 1] (``[B, H, W, C]``) and times ``[B]`` to
velocities of the images' shape; ``t = 1`` is clean data.

>>> import jax, jax.numpy as jnp
>>> config = UNetConfig(image_size=8, channels=3, base_width=8, channel_mult=(1,),
...                     num_res_blocks=1, attention_resolutions=(), groups=4)
>>> params = init_params(config, jax.random.key(0))
>>> v = jax.eval_shape(lambda x, t: make_unet(config).apply({"params": params}, x, t),
...                    jnp.zeros((2, 8, 8, 3)), jnp.ones(2))
>>> v.shape
(2, 8, 8, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxleak.models._common import Conv

# The embedding sees 1000 t: DDPM-style frequencies (periods 2 pi .. 2 pi 1e4) then
# span the integer-step scale, so t in [0, 1] is resolved finely; with t itself most
# channels would be constant over the whole interval.
_TIME_SCALE = 1000.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """The architecture of a UNet velocity field (all that rebuilds it from its weights).

    Attributes:
      image_size: height = width of the images (a multiple of
        ``2 ** (len(channel_mult) - 1)``).
      channels: image channels (3 for RGB, 1 for grayscale).
      base_width: channels of the first stage; stage ``i`` has
        ``base_width * channel_mult[i]``. The time embedding has ``4 * base_width``.
      channel_mult: one multiplier per resolution stage (each stage after the
        first halves the resolution).
      num_res_blocks: residual blocks per stage on the way down (``+ 1`` up).
      attention_resolutions: feature-map sizes (e.g. ``(16,)``: 16x16) after
        whose residual blocks self-attention runs; the middle always has one.
      attention_heads: heads of every self-attention layer (must divide the
        stage's channels).
      groups: GroupNorm groups (must divide every stage's channels).
      dropout: dropout rate inside residual blocks during training.
    """

    image_size: int = 32
    channels: int = 3
    base_width: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    attention_heads: int = 4
    groups: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        # JSON round trips give lists; the config must stay hashable (jit static argument).
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(
            self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions)
        )
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be positive ints, got {self.channel_mult}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size < factor or self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of {factor} "
                f"(2 ** (stages - 1) for channel_mult {self.channel_mult})"
            )
        if self.channels < 1 or self.base_width < 1 or self.num_res_blocks < 1:
            raise ValueError("channels, base_width and num_res_blocks must be >= 1")
        for width in self.widths:
            if width % self.groups:
                raise ValueError(f"groups={self.groups} must divide every stage width {width}")
        for res in self.attention_resolutions:
            width = self.width_at(res)
            if width is None:
                raise ValueError(
                    f"attention resolution {res} is not a stage size {self.resolutions}"
                )
            if width % self.attention_heads:
                raise ValueError(
                    f"attention_heads={self.attention_heads} must divide the {width} channels "
                    f"at {res}x{res}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each stage."""
        return tuple(self.base_width * m for m in self.channel_mult)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size of each stage."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    @property
    def time_dim(self) -> int:
        """Width of the time embedding MLP."""
        return 4 * self.base_width

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of the images."""
        return (self.image_size, self.image_size, self.channels)

    def width_at(self, resolution: int) -> int | None:
        """Channels of the stage of this feature-map size, or ``None``."""
        sizes = self.resolutions
        return self.widths[sizes.index(resolution)] if resolution in sizes else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> UNetConfig:
        """The config stored by :meth:`to_dict`."""
        return cls(**fields)


def preset(name: str, *, image_size: int = 32, channels: int = 3) -> UNetConfig:
    """A named architecture at the given image size.

    ``"paper"``: base width 64, 2 residual blocks, multipliers (1, 2, 2, 2),
    attention at 16x16, GroupNorm(32): the flow-matching attack paper's prior
    (the torchcfm CIFAR-10 UNet at width 64), 8,952,067 parameters at 32x32 RGB.

    ``"small"``: base width 32, 1 residual block, multipliers (1, 2, 2),
    attention at the 8x8 stage (the lowest stage at other sizes too),
    GroupNorm(8): 1,113,955 parameters at 32x32 RGB. Measured on the 2-core
    development machine while other jobs kept its load average at 2.7-3.3: 1.9 s
    per float32 training step at batch 64 and 4.5 s at batch 128 (so an hour is
    ~1,900 steps at batch 64; an idle machine should be about twice as fast).

    Args:
      name: ``"paper"`` or ``"small"``.
      image_size: height = width (32 first; 64 and 128 work).
      channels: image channels.

    Raises:
      ValueError: an unknown name.

    >>> preset("small").num_res_blocks, preset("paper").channel_mult
    (1, (1, 2, 2, 2))
    """
    if name == "paper":
        sizes = [image_size // 2**i for i in range(4)]
        attention = (16,) if 16 in sizes else ()  # 16x16 is a stage at 16..128 px
        return UNetConfig(image_size=image_size, channels=channels, base_width=64,
                          channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                          attention_resolutions=attention, groups=32)
    if name == "small":
        lowest = image_size // 4
        return UNetConfig(image_size=image_size, channels=channels, base_width=32,
                          channel_mult=(1, 2, 2), num_res_blocks=1,
                          attention_resolutions=(lowest,), groups=8)
    raise ValueError(f"unknown UNet preset {name!r}; choose from {PRESETS}")


PRESETS: tuple[str, ...] = ("paper", "small")


# --------------------------------------------------------------------------- layers


def timestep_embedding(t: Float[Array, " b"], dim: int) -> Float[Array, "b dim"]:
    """Sinusoidal features of ``1000 t`` (``dim // 2`` cosines then sines; zero-padded if odd).

    >>> timestep_embedding(jnp.zeros(2), 4).tolist()
    [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = _TIME_SCALE * t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv (zero init), + skip."""

    width: int
    groups: int
    dropout: float
    dtype: Any = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x, emb, train: bool):
        conv = functools.partial(Conv, padding="same", dtype=self.dtype, impl=self.conv_impl)
        h = nn.silu(nn.GroupNorm(self.groups, dtype=self.dtype)(x))
        h = conv(self.width, 3)(h)
        h = h + nn.Dense(self.width, dtype=self.dtype)(nn.silu(emb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(self.groups, dtype=self.dtype)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        # zero-initialised: every block starts as the identity, which keeps deep UNets stable
        h = conv(self.width, 3, kernel_init=nn.initializers.zeros)(h)
        if x.shape[-1] != self.width:
            x = conv(self.width, 1)(x)
        return x + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual (zero-init output)."""

    heads: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = nn.Dense(3 * c, dtype=self.dtype)(nn.GroupNorm(self.groups, dtype=self.dtype)(x))
        q, k, v = jnp.split(qkv.reshape(b, h * w, 3, self.heads, c // self.heads), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c // self.heads)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, h, w, c)
        return x + nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros)(out)


class UNet(nn.Module):
    """The velocity field ``v(x, t)``: images ``[B, H, W, C]`` in [-1, 1], times ``[B]``.

    ``dtype`` is the compute dtype (``jnp.bfloat16`` for mixed precision); the
    parameters stay float32 and the output is float32.
    """

    config: UNetConfig
    dtype: Any = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(
        self, x: Float[Array, "b h w c"], t: Float[Array, " b"], train: bool = False
    ) -> Float[Array, "b h w c"]:
        cfg = self.config
        conv = functools.partial(Conv, kernel_size=3, padding="same", dtype=self.dtype, impl=self.conv_impl)
        block = functools.partial(ResBlock, groups=cfg.groups, dropout=cfg.dropout,
                                  dtype=self.dtype, conv_impl=self.conv_impl)
        attention = functools.partial(SelfAttention, heads=cfg.attention_heads,
                                      groups=cfg.groups, dtype=self.dtype)

        emb = timestep_embedding(t, cfg.base_width)
        emb = nn.Dense(cfg.time_dim, dtype=self.dtype)(emb)
        emb = nn.Dense(cfg.time_dim, dtype=self.dtype)(nn.silu(emb))

        h = conv(cfg.base_width)(x.astype(self.dtype))
        skips = [h]
        last = len(cfg.channel_mult) - 1
        for level, width in enumerate(cfg.widths):
            for _ in range(cfg.num_res_blocks):
                h = block(width)(h, emb, train)
                if h.shape[1] in cfg.attention_resolutions:
                    h = attention()(h)
                skips.append(h)
            if level != last:
                h = conv(width, strides=2)(h)
                skips.append(h)

        h = block(cfg.widths[-1])(h, emb, train)
        h = attention()(h)
        h = block(cfg.widths[-1])(h, emb, train)

        for level in reversed(range(len(cfg.widths))):
            for _ in range(cfg.num_res_blocks + 1):
                h = block(cfg.widths[level])(jnp.concatenate([h, skips.pop()], axis=-1), emb, train)
                if h.shape[1] in cfg.attention_resolutions:
                    h = attention()(h)
            if level != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = conv(cfg.widths[level])(h)

        h = nn.silu(nn.GroupNorm(cfg.groups, dtype=self.dtype)(h))
        h = conv(cfg.channels, kernel_init=nn.initializers.zeros)(h)
        return h.astype(jnp.float32)


@functools.lru_cache(maxsize=32)
def make_unet(config: UNetConfig, dtype: Any = jnp.float32, conv_impl: str = "xla") -> UNet:
    """The (cached) Flax module of a config, compute dtype and convolution implementation.

    ``conv_impl`` changes only the speed (same parameters, same math up to float
    rounding; :class:`jaxleak.models._common.Conv`). ``"xla"`` suits one jitted
    call (training steps, a batch of regulariser values) and forward-only loops
    (the sampler); ``"patches"`` (im2col) suits a compiled loop that also
    differentiates through the UNet (an attack's iterations): there XLA:CPU ran
    ``lax.conv`` and its gradient ~4x slower than as one call, while the im2col
    version is not slowed (docs/pitfalls.md, BENCHMARKS.md).
    """
    return UNet(config=config, dtype=dtype, conv_impl=conv_impl)


def velocity_fn(config: UNetConfig, *, conv_impl: str = "xla") -> Callable[[Any, Array, Array], Array]:
    """``v(params, x, t)`` of the UNet in float32: ``x [B, H, W, C]`` in [-1, 1], ``t [B]``.

    ``conv_impl="patches"`` for the UNet inside a compiled loop (see :func:`make_unet`).
    """
    model = make_unet(config, conv_impl=conv_impl)
    return lambda params, x, t: model.apply({"params": params}, x, t)


def abstract_params(config: UNetConfig) -> Any:
    """Shapes and dtypes of the ``params`` collection (``jax.eval_shape``: no compute)."""
    x = jax.ShapeDtypeStruct((1, *config.image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    shapes = jax.eval_shape(make_unet(config).init, jax.random.key(0), x, t)
    return shapes["params"]


@functools.partial(jax.jit, static_argnames=("config",))
def _init(key, *, config):
    x = jnp.zeros((1, *config.image_shape), jnp.float32)
    return make_unet(config).init(key, x, jnp.zeros((1,), jnp.float32))["params"]


def init_params(config: UNetConfig, key: Array) -> Any:
    """Freshly initialised ``params`` of the UNet (one compiled program, not op by op)."""
    return _init(key, config=config)


def count_params(config: UNetConfig) -> int:
    """Number of parameters (from shapes only, nothing initialised).

    >>> count_params(preset("paper")), count_params(preset("small"))
    (8952067, 1113955)
    """
    leaves = jax.tree_util.tree_leaves(abstract_params(config))
    return int(sum(np.prod(leaf.shape) for leaf in leaves))


__all__ = [
    "PRESETS",
    "UNet",
    "UNetConfig",
    "abstract_params",
    "count_params",
    "init_params",
    "make_unet",
    "preset",
    "timestep_embedding",
    "velocity_fn",
]
