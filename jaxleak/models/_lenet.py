"""The two LeNet victims: DLG's sigmoid LeNet and Venom's ReLU LeNet."""

from __future__ import annotations

import flax.linen as nn
from jaxtyping import Array, Float

from jaxleak.models._common import Conv, dense_head, uniform_init


class LeNetDLG(nn.Module):
    """DLG's LeNet (Zhu et al. 2019, ``models/vision.py`` of the public code).

    Three 5x5 convolutions with 12 channels, padding 2 on both sides, strides
    2, 2, 1, each followed by a sigmoid, then ``head`` on the 12 x H/4 x W/4
    map. Every weight and bias (convolutions and head) is drawn from
    ``U(-0.5, 0.5)`` as in DLG's ``weights_init``: the large smooth weights are
    what make DLG's L-BFGS inversion work on this model.

    Attributes:
      num_classes: number of logits K.
      conv_impl: ``"xla"`` or ``"patches"`` (see :class:`Conv`; same parameters).
      precode: PRECODE bottleneck size before ``head`` (``None``: none).
    """

    num_classes: int
    conv_impl: str = "xla"
    precode: int | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        del train  # no batch statistics
        init = uniform_init(-0.5, 0.5)
        for i, stride in enumerate((2, 2, 1)):
            x = Conv(
                12, 5, strides=stride, kernel_init=init, bias_init=init, impl=self.conv_impl,
                name=f"conv{i}",
            )(x)
            x = nn.sigmoid(x)
        return dense_head(
            self, x, self.num_classes, precode=self.precode, kernel_init=init, bias_init=init
        )


class LeNetVenom(nn.Module):
    """The LeNet of Venom's public code, the victim of the SPE attack.

    ``conv(C->6, 5x5, pad 2) -> ReLU -> maxpool 2 -> conv(6->16, 5x5, pad 2)
    -> ReLU -> maxpool 2 -> head`` on the 16 x H/4 x W/4 map (65,536 inputs at
    256x256). Flax's default initialisation.

    Attributes:
      num_classes: number of logits K.
      conv_impl: ``"xla"`` or ``"patches"`` (see :class:`Conv`; same parameters).
      precode: PRECODE bottleneck size before ``head`` (``None``: none).
    """

    num_classes: int
    conv_impl: str = "xla"
    precode: int | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        del train  # no batch statistics
        for i, channels in enumerate((6, 16)):
            x = Conv(channels, 5, impl=self.conv_impl, name=f"conv{i}")(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return dense_head(self, x, self.num_classes, precode=self.precode)
