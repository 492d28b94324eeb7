"""Pieces shared by every victim architecture.

Every victim ends in a Dense layer named ``head``. Right before it, the module
sows the head's input *as an NHWC map* into the ``intermediates`` collection
(name ``"<layer key>_input"``), then flattens it with a plain
``x.reshape(n, -1)``. The sown map is how ``feature_shape`` is computed (by
``jax.eval_shape``, never by hand) and how callers read the true features that
an attack on the head tries to recover.

With PRECODE (``precode=K_b`` on a module), :func:`dense_head` first sends the
map through the variational bottleneck of :mod:`jaxleak.models._precode`, whose
encoder input is sown as ``"precode_input"`` and whose decoder output (reshaped
to the same map) is what ``head`` sees.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

INTERMEDIATES = "intermediates"

# torch's BatchNorm2d defaults: running stats updated with weight 0.1 for the new batch, eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def input_name(layer_key: str) -> str:
    """Name under which the input of layer ``layer_key`` is sown."""
    return f"{layer_key}_input"


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding ``k // 2`` on both sides, as ``torch.nn.Conv2d(padding=k // 2)``.

    Flax's ``"SAME"`` puts the odd pixel of a strided convolution's padding on
    the far side; the reference models pad both sides equally, and matching
    them keeps the receptive fields (and so the leaked features) identical.
    """
    pad = kernel_size // 2
    return ((pad, pad), (pad, pad))


def uniform_init(low: float, high: float) -> nn.initializers.Initializer:
    """Initializer drawing i.i.d. ``U(low, high)`` (DLG initialises every weight and bias so)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, low, high)

    return init


def torch_kernel_init() -> nn.initializers.Initializer:
    """PyTorch's default Conv2d / Linear weight init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    torch draws ``kaiming_uniform_(a=sqrt(5))``, whose bound ``sqrt(6 / (1 + 5)) *
    sqrt(3 / fan_in)`` is ``1 / sqrt(fan_in)``: a uniform variance scaling with
    scale 1/3. Flax kernels put the fan-in axes first (``[k, k, C_in, C_out]``,
    ``[d_in, d_out]``), which is what ``"fan_in"`` reads.
    """
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default Conv2d / Linear bias init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    The bound depends on the layer's fan-in, which a bias shape does not carry.
    """
    bound = 1.0 / math.sqrt(fan_in)
    return uniform_init(-bound, bound)


def sow_map(module: nn.Module, layer_key: str, fmap: Float[Array, "b h w c"]) -> None:
    """Records ``fmap`` (the NHWC input map of layer ``layer_key``) in ``intermediates``."""
    module.sow(INTERMEDIATES, input_name(layer_key), fmap)


def dense_head(
    module: nn.Module,
    fmap: Float[Array, "b h w c"],
    num_classes: int,
    *,
    precode: int | None = None,
    **dense_kwargs: Any,
) -> Float[Array, "b k"]:
    """Sows ``fmap``, flattens it in NHWC order and applies the Dense layer ``head``.

    Must be called from inside ``module``'s ``@nn.compact`` method.

    With ``precode`` (a bottleneck size ``K_b``) the map first passes through
    :class:`~jaxleak.models._precode.VariationalBottleneck` (submodule
    ``"precode"``): ``fmap`` is sown as ``"precode_input"`` and the decoder
    output, reshaped to ``fmap``'s shape, becomes the head's input.
    """
    if precode is not None:
        # Imported here: _precode builds on this module's initialisers.
        from jaxleak.models._precode import VariationalBottleneck

        sow_map(module, "precode", fmap)
        fmap = VariationalBottleneck(precode, name="precode")(fmap)
    sow_map(module, "head", fmap)
    flat = fmap.reshape(fmap.shape[0], -1)
    return nn.Dense(num_classes, name="head", **dense_kwargs)(flat)


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """BatchNorm with torch-like defaults; running statistics unless ``train``."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
    )


CONV_IMPLS = ("xla", "patches")


class Conv(nn.Module):
    """A 2-D convolution with torch-style padding ``k // 2`` and two interchangeable implementations.

    Parameters are exactly ``nn.Conv``'s (``kernel`` ``[k, k, C_in, C_out]`` in HWIO,
    then ``bias``, drawn in that order), so both implementations share variables
    and checkpoints and initialise identically.

    * ``"xla"``: ``lax.conv_general_dilated``, what ``nn.Conv`` runs.
    * ``"patches"``: the ``k * k`` shifted, strided views of the padded input are
      concatenated into patches (im2col) and multiplied with the flattened kernel.
      Under ``vmap(grad)`` the per-example kernel gradient then is a batched matrix
      product instead of a grouped convolution with one group per example, which
      XLA lowers slowly on GPUs (5x faster per-example gradients for ``lenet-dlg``
      on an H100, see BENCHMARKS.md). It costs ``k * k`` times the input's memory.

    Attributes:
      features: output channels.
      kernel_size: square kernel side ``k``.
      strides: stride in both spatial directions.
      use_bias: add a bias.
      kernel_init, bias_init: initialisers (``nn.Conv``'s defaults).
      impl: ``"xla"`` or ``"patches"``.
      padding: ``"torch"`` (``k // 2`` on each side, the victims') or ``"same"`` (``nn.Conv``'s
        ``"SAME"``: the output is ``ceil(n / s)`` and an odd total pad puts the extra row at the end,
        which differs from ``"torch"`` for even kernels or strides > 1).
      dtype: compute dtype (input and kernel cast to it, as ``nn.Conv(dtype=...)``); ``None``
        computes in the input's dtype.
    """

    features: int
    kernel_size: int
    strides: int = 1
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    impl: str = "xla"
    padding: str = "torch"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 f"]:
        k, s = self.kernel_size, self.strides
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        if self.dtype is not None:
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        pads = [_conv_pads(n, k, s, self.padding) for n in x.shape[1:3]]
        if self.impl == "xla":
            y = jax.lax.conv_general_dilated(
                x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        elif self.impl == "patches":
            xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
            out_h, out_w = ((n + lo + hi - k) // s + 1 for n, (lo, hi) in zip(x.shape[1:3], pads))
            views = [
                xp[:, i : i + s * (out_h - 1) + 1 : s, j : j + s * (out_w - 1) + 1 : s, :]
                for i in range(k)
                for j in range(k)
            ]
            # (kh, kw, C_in) order matches the row-major flattening of the HWIO kernel.
            y = jnp.concatenate(views, axis=-1) @ kernel.reshape(-1, self.features)
        else:
            raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {self.impl!r}")
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,))
            y = y + (bias if self.dtype is None else bias.astype(self.dtype))
        return y


def _conv_pads(n: int, k: int, s: int, padding: str) -> tuple[int, int]:
    """(low, high) padding of one spatial side of length ``n`` (see :class:`Conv`'s ``padding``)."""
    if padding == "torch":
        return k // 2, k // 2
    if padding == "same":
        total = max((-(-n // s) - 1) * s + k - n, 0)
        return total // 2, total - total // 2
    raise ValueError(f"conv padding must be 'torch' or 'same', got {padding!r}")
