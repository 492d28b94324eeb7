"""The space an optimisation attack moves its images in: [0, 1] pixels or per-channel normalised images.

The victim always sees [0, 1] pixels; the attack may optimise another parametrisation of them.
``"pixel"`` optimises the pixels themselves (the box is [0, 1]). ``"normalized"`` optimises
``z = (x - mean) / std`` per channel, the space IG's and SME's public code (and breaching) use: the
box is ``[-mean / std, (1 - mean) / std]``, an N(0, 1) start is roughly centred in it (about 4% of
the values outside it for CIFAR-10's statistics, against ~66% outside [0, 1] in pixel space), and a
step of size ``s`` moves a pixel by ``s * std`` (~0.25 s) instead of ``s``. Statistics default to
CIFAR-10's for 3-channel images (this project's default dataset) and MNIST's for 1-channel ones.

>>> space = image_space("normalized", 3)
>>> z = space.from_pixels(jnp.full((1, 2, 2, 3), 0.5))
>>> bool(jnp.allclose(space.to_pixels(z), 0.5)), bool(jnp.all(space.box(z) == z))
(True, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
from jaxtyping import Array, Float

SPACES = ("normalized", "pixel")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def as_floats(value: Sequence[float] | None) -> tuple[float, ...] | None:
    """``value`` as a tuple of floats (``None`` stays): config fields arrive as lists from JSON / the CLI.

    >>> as_floats([0.5, 1])
    (0.5, 1.0)
    """
    return None if value is None else tuple(float(v) for v in value)


def check_space(space: str, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """Validates a config's ``space``, ``mean`` and ``std`` fields (one-line ``ValueError`` s).

    >>> check_space("pixel", None, None)
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if std is not None and (len(mean) != len(std) or min(std) <= 0):
        raise ValueError(f"mean and std must have equal lengths and std > 0, got {mean}, {std}")


def space_stats(channels: int, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> tuple[Float[Array, " c"], Float[Array, " c"]]:
    """``(mean, std)`` of the normalised space, one value per channel (one given value broadcasts).

    ``None`` resolves to CIFAR-10's statistics for 3 channels and MNIST's otherwise.

    Raises:
      ValueError: statistics for another channel count than the images'.

    >>> mean, std = space_stats(1)
    >>> [round(float(v), 4) for v in mean], std.shape
    ([0.1307], (1,))
    """
    if mean is None or std is None:
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if channels == 3 else (MNIST_MEAN, MNIST_STD)
    if len(mean) not in (1, channels):
        raise ValueError(f"mean/std give {len(mean)} values but the images have {channels} channels")
    ones = jnp.ones((channels,), jnp.float32)
    return ones * jnp.asarray(mean, jnp.float32), ones * jnp.asarray(std, jnp.float32)


@dataclasses.dataclass(frozen=True)
class ImageSpace:
    """An affine image parametrisation ``pixels = z * std + mean`` and its box (the image of [0, 1]).

    Attributes:
      name: ``"pixel"`` (identity map, box [0, 1]) or ``"normalized"``.
      mean, std: ``[C]`` per-channel statistics (0 and 1 for ``"pixel"``).
    """

    name: str
    mean: Float[Array, " c"]
    std: Float[Array, " c"]

    @property
    def lo(self) -> Float[Array, " c"]:
        """Lower end of the box, per channel (pixel value 0)."""
        return self.from_pixels(jnp.zeros_like(self.mean))

    @property
    def hi(self) -> Float[Array, " c"]:
        """Upper end of the box, per channel (pixel value 1)."""
        return self.from_pixels(jnp.ones_like(self.mean))

    def to_pixels(self, z: Float[Array, "*b c"]) -> Float[Array, "*b c"]:
        """Optimised images -> [0, 1] pixels where ``z`` is inside the box (not clipped)."""
        return z if self.name == "pixel" else z * self.std + self.mean

    def from_pixels(self, x: Float[Array, "*b c"]) -> Float[Array, "*b c"]:
        """[0, 1] pixels -> the optimised space (the inverse of :meth:`to_pixels`)."""
        return x if self.name == "pixel" else (x - self.mean) / self.std

    def box(self, z: Float[Array, "*b c"]) -> Float[Array, "*b c"]:
        """``z`` clipped to the valid range (the pixels [0, 1]), per channel."""
        if self.name == "pixel":  # scalar bounds: bit-for-bit the attacks' historical jnp.clip(x, 0, 1)
            return jnp.clip(z, 0.0, 1.0)
        return jnp.clip(z, self.lo, self.hi)


def image_space(space: str, channels: int, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> ImageSpace:
    """The :class:`ImageSpace` ``space`` for ``channels``-channel images (statistics: :func:`space_stats`).

    Raises:
      ValueError: an unknown space or statistics that do not fit ``channels``.

    >>> space = image_space("pixel", 1)
    >>> [float(v) for v in space.lo], [float(v) for v in space.hi]
    ([0.0], [1.0])
    """
    check_space(space, mean, std)
    if space == "pixel":
        return ImageSpace("pixel", jnp.zeros((channels,), jnp.float32), jnp.ones((channels,), jnp.float32))
    m, s = space_stats(channels, mean, std)
    return ImageSpace("normalized", m, s)


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "SPACES",
    "ImageSpace",
    "as_floats",
    "check_space",
    "image_space",
    "space_stats",
]
