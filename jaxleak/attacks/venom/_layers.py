"""Building blocks of Diff-LRN's UNet: FiLM, weight-standardised convs, ResNet blocks, attention.

All modules take NHWC batches ``[B, H, W, C]``; the conditioning vector is
``[B, D]`` (one per example).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# Weight-standardisation epsilon for float32 weights (as in the public Venom/DDPM UNet code).
WS_EPS = 1e-5


def film(
    x: Float[Array, "b h w c"], scale: Float[Array, "b c"], shift: Float[Array, "b c"]
) -> Float[Array, "b h w c"]:
    """FiLM ``x * (scale + 1) + shift`` (Venom Alg. 2 line 6); identity when both are 0.

    >>> x = jnp.arange(4.0).reshape(1, 2, 2, 1)
    >>> bool(jnp.array_equal(film(x, jnp.zeros((1, 1)), jnp.zeros((1, 1))), x))
    True
    """
    return x * (scale[:, None, None, :] + 1.0) + shift[:, None, None, :]


def standardize_weight(
    kernel: Float[Array, "kh kw cin cout"], eps: float = WS_EPS
) -> Float[Array, "kh kw cin cout"]:
    """Weight standardisation: zero mean, unit variance per output channel (over kh, kw, cin)."""
    mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
    return (kernel - mean) * jax.lax.rsqrt(var + eps)


def space_to_depth(x: Float[Array, "b h w c"], factor: int = 2) -> Float[Array, "b hf wf cff"]:
    """Fold ``factor x factor`` pixel blocks into channels (``h``, ``w`` divisible by ``factor``)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // factor, w // factor, factor * factor * c)


def depth_to_space(
    x: Float[Array, "b h w crr"], factor_h: int, factor_w: int
) -> Float[Array, "b hr wr c"]:
    """Pixel shuffle: channels ``(factor_h, factor_w, c)`` become a ``factor_h x factor_w`` block.

    Raises:
      ValueError: if the channels are not divisible by ``factor_h * factor_w``.
    """
    b, h, w, crr = x.shape
    if crr % (factor_h * factor_w):
        raise ValueError(f"{crr} channels do not split into {factor_h}x{factor_w} blocks")
    c = crr // (factor_h * factor_w)
    x = x.reshape(b, h, w, factor_h, factor_w, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * factor_h, w * factor_w, c)


class WSConv(nn.Module):
    """2-D convolution (SAME padding, stride 1) with a weight-standardised kernel.

    Attributes:
      features: output channels.
      kernel_size: square kernel side.
    """

    features: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w f"]:
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        y = jax.lax.conv_general_dilated(
            x,
            standardize_weight(kernel).astype(x.dtype),
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias


class ResnetBlock(nn.Module):
    """ResNet block: (WSConv, GroupNorm, FiLM, SiLU), (WSConv, GroupNorm, SiLU), + residual.

    FiLM's ``scale, shift`` come from one Dense on the conditioning vector (the
    paper's "linear projections" of ``phi(T)``). Without a conditioning vector
    (``cond=None``) the block has no FiLM layer at all (FGLA variant).

    Attributes:
      features: output channels.
      groups: GroupNorm groups (must divide ``features``).
    """

    features: int
    groups: int = 8

    @nn.compact
    def __call__(
        self, x: Float[Array, "b h w c"], cond: Float[Array, "b d"] | None = None
    ) -> Float[Array, "b h w f"]:
        y = WSConv(self.features, 3, name="conv1")(x)
        y = nn.GroupNorm(num_groups=self.groups, name="norm1")(y)
        if cond is not None:
            scale_shift = nn.Dense(2 * self.features, name="film")(cond)
            scale, shift = jnp.split(scale_shift, 2, axis=-1)
            y = film(y, scale, shift)
        y = nn.silu(y)
        y = WSConv(self.features, 3, name="conv2")(y)
        y = nn.silu(nn.GroupNorm(num_groups=self.groups, name="norm2")(y))
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), name="residual")(x)
        return x + y


def _qkv(x: Array, heads: int, head_dim: int) -> tuple[Array, Array, Array]:
    """1x1 projection to queries, keys, values, each ``[b, heads, n, head_dim]``.

    Called inside a compact ``__call__``, so the Conv is a child of the caller.
    """
    b, h, w, _ = x.shape
    qkv = nn.Conv(3 * heads * head_dim, (1, 1), use_bias=False, name="qkv")(x)
    qkv = qkv.reshape(b, h * w, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


class LinearAttention(nn.Module):
    """Pre-normed residual linear attention (softmax over features for q, over positions for k).

    Cost is linear in the number of positions; used in the down and up paths.

    Attributes:
      heads: attention heads.
      head_dim: size of each head.
    """

    heads: int = 4
    head_dim: int = 32

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        b, h, w, c = x.shape
        q, k, v = _qkv(nn.GroupNorm(num_groups=1, name="prenorm")(x), self.heads, self.head_dim)
        q = jax.nn.softmax(q, axis=-1) * self.head_dim**-0.5
        k = jax.nn.softmax(k, axis=-2)
        context = jnp.einsum("bhnd,bhne->bhde", k, v)
        out = jnp.einsum("bhnd,bhde->bhne", q, context)
        out = out.transpose(0, 2, 1, 3).reshape(b, h, w, self.heads * self.head_dim)
        out = nn.Conv(c, (1, 1), name="out")(out)
        return x + nn.GroupNorm(num_groups=1, name="out_norm")(out)


class Attention(nn.Module):
    """Pre-normed residual full (softmax) self-attention over all positions; used in the middle.

    Attributes:
      heads: attention heads.
      head_dim: size of each head.
    """

    heads: int = 4
    head_dim: int = 32

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        b, h, w, c = x.shape
        q, k, v = _qkv(nn.GroupNorm(num_groups=1, name="prenorm")(x), self.heads, self.head_dim)
        logits = jnp.einsum("bhnd,bhmd->bhnm", q, k) * self.head_dim**-0.5
        out = jnp.einsum("bhnm,bhmd->bhnd", jax.nn.softmax(logits, axis=-1), v)
        out = out.transpose(0, 2, 1, 3).reshape(b, h, w, self.heads * self.head_dim)
        return x + nn.Conv(c, (1, 1), name="out")(out)
