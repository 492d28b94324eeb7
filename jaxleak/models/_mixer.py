"""A small MLP-Mixer (Tolstikhin et al. 2021) for CIFAR-sized images.

With hidden width C (``width``, default 128) and patch size 4:

* ``stem``: the image is cut into non-overlapping 4 x 4 patches (T = H/4 * W/4
  tokens, 64 at 32 x 32), each flattened in ``(row, column, channel)`` order
  and embedded by Dense(16 C_in -> C), i.e. a stride-4 4 x 4 convolution written
  as a reshape and a matrix product (there is no convolution, so
  ``conv_impl`` does not apply);
* ``block0`` ... ``block3``: ``x += token_mlp(token_norm(x)^T)^T`` (Dense T ->
  C/2 -> T over the token axis: the token MLP is 64 wide at the default width)
  then ``x += channel_mlp(channel_norm(x))`` (Dense C -> 4C -> C: 512 at the
  default); exact GELU (torch's default) between the two Dense layers of each
  MLP (``fc0``, ``fc1``);
* ``norm``: LayerNorm, then the mean over tokens, then ``head`` on the
  ``1 x 1 x C`` pooled vector.

LayerNorm epsilon is 1e-5 and initialisation Flax's default.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxleak.models._common import dense_head

PATCH = 4
DEPTH = 4
LN_EPSILON = 1e-5  # torch's LayerNorm default


class _FeedForward(nn.Module):
    """Dense -> GELU -> Dense over the last axis, back to the input width."""

    hidden: int

    @nn.compact
    def __call__(self, x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
        width = x.shape[-1]
        x = nn.gelu(nn.Dense(self.hidden, name="fc0")(x), approximate=False)
        return nn.Dense(width, name="fc1")(x)


def patchify(images: Float[Array, "b h w c"], patch: int) -> Float[Array, "b t p"]:
    """Non-overlapping ``patch x patch`` tiles, row-major, each flattened as (row, col, channel).

    Args:
      images: NHWC batch with H and W multiples of ``patch``.
      patch: tile side.

    Returns:
      ``[b, (H/patch) (W/patch), patch * patch * C]``.

    >>> patchify(jnp.zeros((2, 8, 12, 3)), 4).shape
    (2, 6, 48)
    """
    b, h, w, c = images.shape
    tiles = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return tiles.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), -1)


class _MixerBlock(nn.Module):
    """Token mixing then channel mixing, each pre-normalised and residual."""

    width: int

    @nn.compact
    def __call__(self, x: Float[Array, "b t c"]) -> Float[Array, "b t c"]:
        y = nn.LayerNorm(epsilon=LN_EPSILON, name="token_norm")(x)
        y = _FeedForward(self.width // 2, name="token_mlp")(y.swapaxes(1, 2))
        x = x + y.swapaxes(1, 2)
        y = nn.LayerNorm(epsilon=LN_EPSILON, name="channel_norm")(x)
        return x + _FeedForward(4 * self.width, name="channel_mlp")(y)


class MLPMixer(nn.Module):
    """Small MLP-Mixer (see the module docstring for the layers).

    Attributes:
      num_classes: number of logits K.
      width: hidden width C (token MLP C/2, channel MLP 4C).
      depth: number of mixer blocks.
      precode: PRECODE bottleneck size before ``head`` (``None``: none).
    """

    num_classes: int
    width: int = 128
    depth: int = DEPTH
    precode: int | None = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], train: bool = False) -> Float[Array, "b k"]:
        del train  # LayerNorm only: no batch statistics
        x = nn.Dense(self.width, name="stem")(patchify(x, PATCH))
        for i in range(self.depth):
            x = _MixerBlock(self.width, name=f"block{i}")(x)
        x = jnp.mean(nn.LayerNorm(epsilon=LN_EPSILON, name="norm")(x), axis=1)
        return dense_head(self, x[:, None, None, :], self.num_classes, precode=self.precode)
