"""The "ConvNet" of Inverting Gradients (Geiping et al. 2020) and SME.

Layer list, from the public inversefed / breaching ``ConvNet`` (``ConvNetBN``):

====  =========================================  ===========
conv0 3x3, 1w channels, BN, ReLU
conv1 3x3, 2w channels, BN, ReLU
conv2 3x3, 2w channels, BN, ReLU
conv3 3x3, 4w channels, BN, ReLU
conv4 3x3, 4w channels, BN, ReLU
conv5 3x3, 4w channels, BN, ReLU
pool0 max-pool, window 3, stride 3 (floor)
conv6 3x3, 4w channels, BN, ReLU
conv7 3x3, 4w channels, BN, ReLU
pool1 max-pool, window 3, stride 3 (floor)
head  Dense on the flattened (H//3//3, W//3//3, 4w) map  (36 w inputs at 32x32)
====  =========================================  ===========

Convolutions have biases and padding 1, as in the reference. Two deliberate
differences: the map is flattened in NHWC order (the reference flattens NCHW,
which only permutes the head's input coordinates), and initialisation is
Flax's default rather than torch's.
"""

from __future__ import annotations

import flax.linen as nn
from jaxtyping import Array, Float

from jaxleak.models._common import Conv, batch_norm, dense_head

# Channel multiplier of each conv layer; "pool" marks a 3x3 / stride-3 max-pool.
_PLAN: tuple[int | str, ...] = (1, 2, 2, 4, 4, 4, "pool", 4, 4, "pool")


class ConvNet(nn.Module):
    """IG / SME ConvNet with BatchNorm (see the module docstring for the layer list).

    Attributes:
      num_classes: number of logits K.
      width: base width w (the reference default for CIFAR is 64).
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
                x = nn.max_pool(x, (3, 3), strides=(3, 3), padding="VALID")
                continue
            x = Conv(step * self.width, 3, impl=self.conv_impl, name=f"conv{conv_index}")(x)
            x = nn.relu(batch_norm(train, name=f"bn{conv_index}")(x))
            conv_index += 1
        return dense_head(self, x, self.num_classes, precode=self.precode)
