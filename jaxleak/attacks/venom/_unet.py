"""Diff-LRN's backbone: a time-conditioned UNet on the feature map and a pixel-shuffle head.

UNet layout (widths ``dims = [w] + [w * m for m in multipliers]``, one stage per
multiplier, as the DDPM-style UNet of Venom's public code):

* stem: 7x7 conv, feature-map channels -> ``w``;
* down stage ``i`` (``dims[i] -> dims[i+1]``): ``resnet_blocks`` ResNet blocks at
  ``dims[i]`` (each output kept as a skip), linear attention, then a 2x
  downsampling (space-to-depth + 1x1 conv) except in the last stage, where a
  3x3 conv only changes the width;
* middle: ResNet block, full attention, ResNet block;
* up stages mirror the down stages: each ResNet block takes the concatenation
  with one skip, then linear attention, then 2x upsampling (nearest + 3x3 conv)
  except in the last stage;
* out: ResNet block on ``concat(x, stem output)``, then a 1x1 conv.

Every ResNet block applies FiLM from the conditioning vector when one is given.

Small or odd maps. The UNet downsamples ``len(multipliers) - 1`` times, so the
map's sides must be multiples of ``2^(len(multipliers) - 1)``. Maps that are not
(7x7, 4x4 with three stages, 1x1, ...) are edge-padded (replicating the border
features, split as evenly as possible between the two sides) up to the next
multiple, and the UNet's output is cropped back to the original size before the
head. The number of downsamplings is never reduced, so every map size uses the
same parameters.

Head. The UNet's ``[h, w, width]`` output goes to the image size ``[H, W, C]``
by pixel shuffle (depth-to-space): per axis the factor is ``r = ceil(H / h)``,
applied as one stage per prime factor (4 -> 2, 2; 8 -> 2, 2, 2; 1 -> no stage),
each a 3x3 conv to ``width * r_h * r_w`` channels, depth-to-space, SiLU. When
``H`` (or ``W``) is not an integer multiple of ``h`` the shuffle overshoots to
``h * r`` and the map is resized (bilinear, antialiased) to ``H x W``, so the
whole feature map still covers the whole image (a crop would drop border
features). A 3x3 conv to ``C`` and a sigmoid give an image in ``(0, 1)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxleak.attacks.venom._layers import (
    Attention,
    LinearAttention,
    ResnetBlock,
    depth_to_space,
    space_to_depth,
)


def padding_for_downsampling(size: int, downsamplings: int) -> tuple[int, int]:
    """``(before, after)`` padding that makes ``size`` a multiple of ``2^downsamplings``.

    >>> padding_for_downsampling(7, 2)
    (0, 1)
    >>> padding_for_downsampling(5, 3)
    (1, 2)
    """
    multiple = 2**downsamplings
    total = -size % multiple
    return total // 2, total - total // 2


def prime_factors(n: int) -> list[int]:
    """Prime factors of a positive integer, largest first (``[]`` for 1).

    >>> prime_factors(12)
    [3, 2, 2]
    """
    if n < 1:
        raise ValueError(f"prime_factors needs a positive integer, got {n}")
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return sorted(factors, reverse=True)


def shuffle_stages(
    feature_hw: tuple[int, int], image_hw: tuple[int, int]
) -> tuple[tuple[int, int], ...]:
    """Pixel-shuffle factors ``(r_h, r_w)`` of each head stage, for a map of ``feature_hw``.

    The total factor per axis is ``ceil(image / feature)``; stages pair up the
    prime factors of the two axes (a missing factor is 1).

    >>> shuffle_stages((7, 7), (28, 28))
    ((2, 2), (2, 2))
    >>> shuffle_stages((8, 8), (28, 28))
    ((2, 2), (2, 2))
    >>> shuffle_stages((4, 4), (4, 4))
    ()
    """
    fh = prime_factors(math.ceil(image_hw[0] / feature_hw[0]))
    fw = prime_factors(math.ceil(image_hw[1] / feature_hw[1]))
    n = max(len(fh), len(fw))
    fh += [1] * (n - len(fh))
    fw += [1] * (n - len(fw))
    return tuple(zip(fh, fw, strict=True))


class ConditionedUNet(nn.Module):
    """DDPM-style UNet whose ResNet blocks are FiLM-conditioned (module docstring has the layout).

    Attributes:
      base_width: width ``w`` of the first stage.
      multipliers: stage widths as multiples of ``w``.
      resnet_blocks: ResNet blocks per down/up stage.
      groups: GroupNorm groups (must divide every stage width).
      linear_attention: linear attention in the down and up paths.
      mid_attention: full attention in the middle.
      attention_heads: heads of both attentions.
      attention_head_dim: size of each head.
    """

    base_width: int = 64
    multipliers: Sequence[int] = (1, 2, 4)
    resnet_blocks: int = 2
    groups: int = 8
    linear_attention: bool = True
    mid_attention: bool = True
    attention_heads: int = 4
    attention_head_dim: int = 32

    @nn.compact
    def __call__(
        self, x: Float[Array, "b h w c"], cond: Float[Array, "b d"] | None = None
    ) -> Float[Array, "b h w base"]:
        _, height, width, _ = x.shape
        downsamplings = len(self.multipliers) - 1
        pad_h = padding_for_downsampling(height, downsamplings)
        pad_w = padding_for_downsampling(width, downsamplings)
        x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), mode="edge")

        dims = [self.base_width] + [self.base_width * m for m in self.multipliers]
        stages = list(itertools.pairwise(dims))
        last = len(stages) - 1

        def block(features: int, name: str) -> ResnetBlock:
            return ResnetBlock(features, self.groups, name=name)

        def attention(cls: type[nn.Module], name: str) -> nn.Module:
            return cls(self.attention_heads, self.attention_head_dim, name=name)

        x = nn.Conv(self.base_width, (7, 7), padding="SAME", name="stem")(x)
        stem_out = x
        skips = []
        for i, (dim_in, dim_out) in enumerate(stages):
            for j in range(self.resnet_blocks):
                x = block(dim_in, f"down{i}_block{j}")(x, cond)
                skips.append(x)
            if self.linear_attention:
                x = attention(LinearAttention, f"down{i}_attn")(x)
            if i < last:
                x = nn.Conv(dim_out, (1, 1), name=f"down{i}_resample")(space_to_depth(x, 2))
            else:
                x = nn.Conv(dim_out, (3, 3), padding="SAME", name=f"down{i}_resample")(x)

        x = block(dims[-1], "mid_block1")(x, cond)
        if self.mid_attention:
            x = attention(Attention, "mid_attn")(x)
        x = block(dims[-1], "mid_block2")(x, cond)

        for i, (dim_in, dim_out) in reversed(list(enumerate(stages))):
            for j in range(self.resnet_blocks):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = block(dim_out, f"up{i}_block{j}")(x, cond)
            if self.linear_attention:
                x = attention(LinearAttention, f"up{i}_attn")(x)
            if i > 0:
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = nn.Conv(dim_in, (3, 3), padding="SAME", name=f"up{i}_resample")(x)

        x = block(self.base_width, "out_block")(jnp.concatenate([x, stem_out], axis=-1), cond)
        x = nn.Conv(self.base_width, (1, 1), name="out_conv")(x)
        return x[:, pad_h[0] : pad_h[0] + height, pad_w[0] : pad_w[0] + width, :]


class PixelShuffleHead(nn.Module):
    """Feature map ``[b, h, w, width]`` -> image ``[b, H, W, C]`` in ``(0, 1)`` (see module docstring).

    Attributes:
      image_shape: ``(H, W, C)`` of the output image.
      width: channels of every head stage.
    """

    image_shape: tuple[int, int, int]
    width: int = 64

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b H W C"]:
        out_h, out_w, channels = self.image_shape
        for k, (r_h, r_w) in enumerate(shuffle_stages(x.shape[1:3], (out_h, out_w))):
            x = nn.Conv(self.width * r_h * r_w, (3, 3), padding="SAME", name=f"shuffle{k}")(x)
            x = nn.silu(depth_to_space(x, r_h, r_w))
        if x.shape[1:3] != (out_h, out_w):
            x = jax.image.resize(x, (x.shape[0], out_h, out_w, x.shape[-1]), method="linear")
        x = nn.Conv(channels, (3, 3), padding="SAME", name="to_image")(x)
        return jax.nn.sigmoid(x)
