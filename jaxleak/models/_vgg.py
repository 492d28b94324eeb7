"""VGG-11 for CIFAR-sized images (Simonyan & Zisserman 2015, configuration "A").

Layer list with base width w (64 in the reference, channels scale with it):

====================  ===============================================
conv0                 3x3, w channels, bias, BN, ReLU; max-pool 2
conv1                 3x3, 2w channels, bias, BN, ReLU; max-pool 2
conv2, conv3          3x3, 4w channels, bias, BN, ReLU; max-pool 2
conv4, conv5          3x3, 8w channels, bias, BN, ReLU; max-pool 2
conv6, conv7          3x3, 8w channels, bias, BN, ReLU; max-pool 2
head                  Dense on the flattened (H/32, W/32, 8w) map
====================  ===============================================

This is the CIFAR variant common in FL code (``kuangliu``-style ``VGG('VGG11')``:
convolutions with biases and padding 1, BatchNorm, a single Dense classifier;
9,231,114 parameters at 32 x 32 with 10 classes). The map is flattened in NHWC
order; initialisation is Flax's default.
"""

from __future__ import annotations

import flax.linen as nn
from jaxtyping import Array, Float

from jaxleak.models._common import Conv, batch_norm, dense_head

# Channel multiplier of each conv layer; "pool" marks a 2x2 / stride-2 max-pool.
_PLAN: tuple[int | str, ...] = (1, "pool", 2, "pool", 4, 4, "pool", 8, 8, "pool", 8, 8, "pool")
POOLS = _PLAN.count("pool")


class VGG11(nn.Module):
    """VGG-11 with BatchNorm (see the module docstring for the layer list).

    Attributes:
      num_classes: number of logits K.
      width: base width w (64 in the reference).
      conv_impl: ``"xla"`` or ``"patches"`` (see :class:`Conv`; same parameters).
      precode: PRECODE bottleneck size before ``head`` (``None``: none).
    """

    num_classes: int
    width: int = 64
    conv_impl: str = "xla"
    precode: int | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        conv_index = 0
        for step in _PLAN:
            if step == "pool":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = Conv(step * self.width, 3, impl=self.conv_impl, name=f"conv{conv_index}")(x)
            x = nn.relu(batch_norm(train, name=f"bn{conv_index}")(x))
            conv_index += 1
        return dense_head(self, x, self.num_classes, precode=self.precode)
