"""The small ConvNet of SME's and DLF's FedAvg experiments (``convnet-sme``).

Layer list (SME's public ``ConvNet``, identical to DLF's ``cnn3``), sizes at
32 x 32 with C input channels and width w = 64:

======  ==============================================  ===========================
conv0   Conv 3x3, C -> w, padding 1, bias; ReLU          params["conv0"]
pool0   average pool 2x2, stride 2                       (32 -> 16)
conv1   Conv 3x3, w -> 2w, padding 1, bias; ReLU         params["conv1"]
pool1   average pool 2x2, stride 2                       (16 -> 8)
fc      Dense(8 * 8 * 2w = 8192 -> 200), bias; ReLU     params["fc"]
head    Dense(200 -> K), bias                            params["head"]
======  ==============================================  ===========================

No normalisation, so no ``batch_stats``. Every weight and bias starts from
PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (fan-in ``9 C_in`` for
the convolutions, ``d_in`` for the Dense layers), so a PyTorch twin built from
the same weights is the same model. Copying weights across:

* conv ``kernel`` is HWIO ``[3, 3, C_in, C_out]``; torch's ``Conv2d.weight`` is
  OIHW, so ``kernel = weight.permute(2, 3, 1, 0)``; ``bias`` is the same vector.
* Dense ``kernel`` is ``[d_in, d_out]``; torch's ``Linear.weight`` is
  ``[d_out, d_in]``, so ``kernel = weight.T``.
* The ``8 x 8 x 2w`` map is flattened in NHWC order: input ``(h * W' + w') *
  2w + c`` of ``fc`` is channel ``c`` at ``(h, w')``. torch flattens NCHW
  (``c * H' * W' + h * W' + w'``), so ``fc``'s rows must be permuted (or the
  twin must flatten a ``permute(0, 2, 3, 1)``-ed map) when weights are copied.

Two Dense layers leak their inputs through rank-one per-example gradients:
``head`` (input: the 200 ReLU activations of ``fc``, a ``1 x 1 x 200`` map) and
``fc`` (input: the pooled ``H/4 x W/4 x 2w`` conv map), exposed as
``layers["head"]`` and ``layers["fc"]``.
"""

from __future__ import annotations

import flax.linen as nn
from jaxtyping import Array, Float

from jaxleak.models._common import (
    Conv,
    dense_head,
    sow_map,
    torch_bias_init,
    torch_kernel_init,
)

FC_WIDTH = 200


class ConvNetSME(nn.Module):
    """SME / DLF ConvNet (see the module docstring for layers and weight layouts).

    Attributes:
      num_classes: number of logits K.
      width: channels of ``conv0`` (``conv1`` has twice as many); 64 in SME.
      conv_impl: ``"xla"`` or ``"patches"`` (see :class:`Conv`; same parameters).
      precode: PRECODE bottleneck size before ``head`` (``None``: none).
    """

    num_classes: int
    width: int = 64
    conv_impl: str = "xla"
    precode: int | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        del train  # no batch statistics
        for i, channels in enumerate((self.width, 2 * self.width)):
            fan_in = 9 * x.shape[-1]
            x = Conv(
                channels, 3, kernel_init=torch_kernel_init(), bias_init=torch_bias_init(fan_in),
                impl=self.conv_impl, name=f"conv{i}",
            )(x)  # fmt: skip
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        sow_map(self, "fc", x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(
            FC_WIDTH,
            kernel_init=torch_kernel_init(),
            bias_init=torch_bias_init(x.shape[-1]),
            name="fc",
        )(x)
        x = nn.relu(x)
        return dense_head(
            self, x[:, None, None, :], self.num_classes, precode=self.precode,
            kernel_init=torch_kernel_init(), bias_init=torch_bias_init(FC_WIDTH),
        )  # fmt: skip
