"""Fully connected victim: the image itself is the input of ``fc1``."""

from __future__ import annotations

import flax.linen as nn
from jaxtyping import Array, Float

from jaxleak.models._common import dense_head, sow_map


class MLP(nn.Module):
    """``flatten -> fc1 -> ReLU -> ... -> fc<n> -> ReLU -> head``.

    Both ``fc1`` (input: the flattened image) and ``head`` (input: the last
    hidden activation) have the outer-product gradient ``delta x^T``, so an
    SPE-style inversion of ``fc1`` recovers the image directly.

    Attributes:
      num_classes: number of logits K.
      hidden: widths of the hidden layers ``fc1, fc2, ...`` (at least one).
      precode: PRECODE bottleneck size before ``head`` (``None``: none).
    """

    num_classes: int
    hidden: tuple[int, ...] = (256,)
    precode: int | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        del train  # no batch statistics
        sow_map(self, "first", x)
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"fc{i + 1}")(x))
        # As a 1 x 1 x width map, so every head input has the same NHWC form.
        return dense_head(self, x[:, None, None, :], self.num_classes, precode=self.precode)
