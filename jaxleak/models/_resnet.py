"""CIFAR-style ResNets (He et al. 2016) with BasicBlocks and BatchNorm.

Stem: 3x3 convolution, stride 1, no max-pool (the CIFAR stem). Stages of
BasicBlocks; the first block of each later stage halves the resolution with
stride 2 and a 1x1-conv + BN projection shortcut (used whenever stride or
width changes, as in the common ``kuangliu``-style CIFAR ResNet that the
breaching / SME code bases use). Convolutions have no bias.

- ResNet-18: stages of (2, 2, 2, 2) blocks, widths (w, 2w, 4w, 8w), w = 64.
- ResNet-8:  stages of (1, 1, 1) blocks, widths (w, 2w, 4w), w = 16, i.e. the
  n = 1 member of He et al.'s 6n + 2 CIFAR family (stem + 6 convs + head).

With ``spatial_head=False`` the head follows global average pooling (its input
is 1 x 1 x C_last); with ``spatial_head=True`` it sits on the flattened last
feature map before pooling, which keeps the spatial structure that SPE needs
(FGLA does the same with ResNet-50's 7 x 7 x 2048 map).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxleak.models._common import Conv, batch_norm, dense_head


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity or projection shortcut.

    Attributes:
      features: output channels.
      stride: stride of the first convolution (and of the projection).
      conv_impl: ``"xla"`` or ``"patches"`` (see :class:`Conv`; same parameters).
    """

    features: int
    stride: int = 1
    conv_impl: str = "xla"

    @nn.compact
    def __call__(
        self, x: Float[Array, "b h w c"], train: bool = False
    ) -> Float[Array, "b h2 w2 f"]:
        conv = lambda k, stride, name: Conv(
            self.features, k, strides=stride, use_bias=False, impl=self.conv_impl, name=name
        )
        y = conv(3, self.stride, "conv1")(x)
        y = nn.relu(batch_norm(train, name="bn1")(y))
        y = batch_norm(train, name="bn2")(conv(3, 1, "conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(1, self.stride, "shortcut_conv")(x)
            x = batch_norm(train, name="shortcut_bn")(x)
        return nn.relu(y + x)


class CifarResNet(nn.Module):
    """ResNet with the CIFAR stem.

    Attributes:
      num_classes: number of logits K.
      stage_sizes: BasicBlocks per stage.
      width: channels of the stem and first stage; stage i has ``width * 2**i``.
      spatial_head: head on the flattened last map instead of after global pooling.
      conv_impl: ``"xla"`` or ``"patches"`` (see :class:`Conv`; same parameters).
      precode: PRECODE bottleneck size before ``head`` (``None``: none).
    """

    num_classes: int
    stage_sizes: tuple[int, ...]
    width: int = 64
    spatial_head: bool = False
    conv_impl: str = "xla"
    precode: int | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        x = Conv(self.width, 3, use_bias=False, impl=self.conv_impl, name="conv0")(x)
        x = nn.relu(batch_norm(train, name="bn0")(x))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(
                    self.width * 2**stage,
                    stride=stride,
                    conv_impl=self.conv_impl,
                    name=f"layer{stage + 1}_{block}",
                )(x, train)
        if not self.spatial_head:
            x = jnp.mean(x, axis=(1, 2), keepdims=True)
        return dense_head(self, x, self.num_classes, precode=self.precode)
