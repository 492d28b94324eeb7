"""Batched inference of a recovery network: SPE features + ``T`` -> images.

One jitted function maps a chunk of captures to images; the network is written
for one capture and ``vmap``-ed here (a batch of one per call of
``model.apply``, so every image's output depends on its own inputs only, as
GroupNorm and attention act within one image). :func:`jaxleak._batching.map_chunked`
walks the chunks: the last is padded so one compilation serves every chunk, and
with several devices each chunk is split along its leading axis over a 1-D mesh
(``NamedSharding``) with the parameters replicated.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jaxtyping import Array, Float, PyTree

from jaxleak._batching import map_chunked


def _one(model, params: PyTree, features: Float[Array, "h w c"], t: Float[Array, ""]):
    return model.apply(params, features[None], t[None])[0]


@functools.lru_cache(maxsize=8)
def make_infer_fn(model):
    """A jitted ``(params, features [B,h,w,c], T [B]) -> images [B,H,W,C]`` (vmap of one capture)."""
    return jax.jit(jax.vmap(functools.partial(_one, model), in_axes=(None, 0, 0)))


def recover_images(
    model: Any,
    params: PyTree,
    features: Float[np.ndarray, "n h w c"],
    noise_strength: Float[np.ndarray, " n"],
    *,
    batch_size: int = 256,
) -> Float[np.ndarray, "n H W C"]:
    """Runs the recovery network over ``N`` captures in padded chunks.

    Args:
      model: a module from :func:`jaxleak.attacks.venom.make_recovery_net`.
      params: its variables.
      features: SPE feature maps ``[N, h, w, c]``.
      noise_strength: ``T`` per capture ``[N]``. Non-finite values (SPE gives
        ``+inf`` when the prior vanishes) are replaced by the largest finite one,
        since the network was trained on finite ``T``.
      batch_size: captures per compiled call (rounded up to a multiple of the
        device count when sharding).

    Returns:
      ``[N, H, W, C]`` float32 NumPy images in (0, 1).

    Raises:
      ValueError: on badly shaped inputs or a non-positive ``batch_size``.

    >>> import jax, numpy as np
    >>> from jaxleak.attacks.venom import RecoveryNetConfig, make_recovery_net
    >>> config = RecoveryNetConfig(image_shape=(8, 8, 1), feature_shape=(2, 2, 4), base_width=8,
    ...                            multipliers=(1,), time_dim=8, attention_heads=1,
    ...                            attention_head_dim=8)
    >>> model = make_recovery_net(config)
    >>> params = model.init(jax.random.key(0), np.zeros((1, 2, 2, 4)), np.ones(1))
    >>> recover_images(model, params, np.zeros((3, 2, 2, 4)), np.ones(3), batch_size=2).shape
    (3, 8, 8, 1)
    """
    features = np.asarray(features, np.float32)
    t = np.asarray(noise_strength, np.float32)
    if features.ndim != 4:
        raise ValueError(f"features must be [N, h, w, c], got shape {features.shape}")
    if t.shape != features.shape[:1]:
        raise ValueError(f"noise_strength must be [N] = [{features.shape[0]}], got {t.shape}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    finite = np.isfinite(t)
    if not finite.all():
        t = np.where(finite, t, t[finite].max() if finite.any() else 0.0).astype(np.float32)
    images = map_chunked(make_infer_fn(model), features, t, shared=(params,),
                         chunk=int(batch_size), devices=None)
    return np.asarray(images, np.float32)


__all__ = ["make_infer_fn", "recover_images"]
