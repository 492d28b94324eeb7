"""Simulated FedSGD clients: per-example gradients, DP protection, the attacker's view.

The math is written for one client (``_client_update``); a single jitted
``vmap`` runs a chunk of clients at once, and :func:`capture_updates` walks the
chunks on the host. Client ``i`` draws its noise from
``fold_in(PRNGKey(seed), i)``, so results do not depend on the chunk size (up
to float rounding: XLA may vectorise the gradient math differently per chunk
shape) and the same seed and chunk size give the same capture bit for bit on
one machine.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from jaxleak._version import __version__
from jaxleak.capture.io import Capture, flatten_tree
from jaxleak.privacy.mechanisms import DPConfig, ResolvedDP, protect_update, resolve


def per_example_grads(
    victim, variables: PyTree, images: Float[Array, "b h w c"], labels: Int[Array, " b"]
) -> PyTree:
    """Gradients of the loss of each example w.r.t. the victim's parameters, ``[B, ...]`` leaves."""
    params = variables["params"]
    batch_stats = variables.get("batch_stats")
    grad_one = jax.grad(lambda p, x, y: victim.loss(p, batch_stats, x, y))
    return jax.vmap(grad_one, in_axes=(None, 0, 0))(params, images, labels)


def protected_layer(
    victim,
    variables: PyTree,
    images: Float[Array, "b h w c"],
    labels: Int[Array, " b"],
    key: PRNGKeyArray,
    *,
    calibration: str,
    mechanism: str,
    clip: float,
    noise_scale: float | Float[Array, ""],
    layer: str,
    scope: str = "all",
) -> tuple[Float[Array, "k d"], Float[Array, " k"], PyTree]:
    """ONE client's protected update and its dense ``layer`` as class-major ``([K, d], [K])``.

    ``noise_scale`` may be traced (training triplets draw it per image).
    ``scope="layer"`` protects only ``layer`` under the paper calibration.
    """
    grads = per_example_grads(victim, variables, images, labels)
    only = victim.layers[layer].path if scope == "layer" else None
    update = protect_update(
        grads, key, calibration=calibration, mechanism=mechanism, clip=clip, noise_scale=noise_scale,
        only=only,
    )
    dense = victim.layers[layer].select(update)
    # Flax kernels are [d, K]; captures are class-major [K, d].
    return dense["kernel"].T, dense["bias"], update


def _client_update(
    victim,
    variables: PyTree,
    images: Float[Array, "b h w c"],
    labels: Int[Array, " b"],
    key: PRNGKeyArray,
    *,
    dp: ResolvedDP,
    layer: str,
    keep_update: bool,
) -> tuple[Float[Array, "k d"], Float[Array, " k"], PyTree | None]:
    gw, gb, update = protected_layer(
        victim, variables, images, labels, key, calibration=dp.calibration,
        mechanism=dp.mechanism, clip=dp.clip, noise_scale=dp.noise_scale, layer=layer, scope=dp.scope,
    )
    return gw, gb, (update if keep_update else None)


@functools.lru_cache(maxsize=32)
def _compiled_chunk(victim, dp: ResolvedDP, layer: str, keep_update: bool):
    one = functools.partial(_client_update, victim, dp=dp, layer=layer, keep_update=keep_update)

    def chunk(variables, images, labels, seed, client_ids):
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(client_ids)
        return jax.vmap(one, in_axes=(None, 0, 0, 0))(variables, images, labels, keys)

    return jax.jit(chunk)


# Victims whose capture was measured faster with im2col convolutions on a GPU (BENCHMARKS.md).
_CAPTURE_PATCHES_MEASURED = ("lenet-dlg", "lenet-venom")


def capture_conv_impl(victim, calibration: str, *, keep_update: bool = False, conv_impl: str = "auto") -> str:
    """Convolution implementation for a capture step (``"auto"`` decides by workload).

    Per-example convolution *weight* gradients are only computed when they
    matter: under ``dpsgd`` (whole-gradient clipping) or when the whole update
    is kept. On GPUs those are 3-5x faster as im2col ``"patches"``, while the
    forward-only work of the other cases is faster with XLA's convolution
    (BENCHMARKS.md, H100). On CPU both measured alike, so ``"xla"``. Measured
    for the LeNets only, so the other conv victims keep ``"xla"``.
    """
    if conv_impl != "auto":
        return conv_impl
    if victim.name not in _CAPTURE_PATCHES_MEASURED or jax.default_backend() == "cpu":
        return "xla"
    return "patches" if (calibration == "dpsgd" or keep_update) else "xla"


def quantize_images(images: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8, the pixels a capture file stores."""
    return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def capture_updates(
    victim,
    variables: PyTree,
    images: Float[np.ndarray, "n h w c"],
    labels: Int[np.ndarray, " n"],
    *,
    dp: DPConfig,
    batch_size: int = 1,
    seed: int = 0,
    layer: str = "head",
    chunk_size: int = 256,
    keep_update: bool = False,
    keep_params: bool = False,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
    conv_impl: str = "auto",
) -> Capture:
    """Simulates FedSGD clients under ``dp`` and returns what the attacker observes.

    Examples are grouped into ``N = n // batch_size`` clients of ``batch_size``
    consecutive examples. Images are quantised to uint8 first, and gradients are
    taken on exactly those pixels, so the stored images are the true targets.

    Args:
      victim: a :class:`jaxleak.models.Victim`.
      variables: the victim's Flax variables at capture time.
      images: float ``[n, H, W, C]`` in [0, 1], ``n`` a multiple of ``batch_size``.
      labels: int ``[n]``.
      dp: the protection each client applies.
      batch_size: examples per client (FedSGD batch ``B``).
      seed: noise seed; client ``i`` uses ``fold_in(PRNGKey(seed), i)``.
      layer: which dense layer the capture records (``"head"``, or ``"first"`` for an mlp).
      chunk_size: clients per compiled call (memory bound; results do not depend on it).
      keep_update: also return the whole protected update (``update/<path>``).
      keep_params: also return the victim's variables (``params/<path>``).
      meta: extra metadata (dataset, ...), merged into the capture's ``meta``.
      progress: show a progress bar.
      conv_impl: ``"auto"`` (see :func:`capture_conv_impl`), ``"xla"`` or ``"patches"``;
        only the speed changes.

    Returns:
      A :class:`Capture` with ``[N, K, d]`` weight and ``[N, K]`` bias gradients.

    Raises:
      ValueError: on inconsistent shapes or arguments.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images must be [n, H, W, C], got shape {images.shape}")
    if tuple(images.shape[1:]) != tuple(victim.image_shape):
        raise ValueError(f"images are {images.shape[1:]} but the victim expects {victim.image_shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be [n] = [{images.shape[0]}], got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= victim.num_classes):
        raise ValueError(f"labels must be in [0, {victim.num_classes}), got [{labels.min()}, {labels.max()}]")
    if batch_size < 1 or images.shape[0] % batch_size or images.shape[0] == 0:
        raise ValueError(f"need a positive multiple of batch_size={batch_size} images, got {images.shape[0]}")
    if layer not in victim.layers:
        raise ValueError(f"victim {victim.name!r} has no dense layer {layer!r}; it has {sorted(victim.layers)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    resolved = resolve(dp, batch_size=batch_size)
    victim = victim.with_conv_impl(
        capture_conv_impl(victim, resolved.calibration, keep_update=keep_update, conv_impl=conv_impl))
    dense = victim.layers[layer]
    n_clients = images.shape[0] // batch_size
    images_u8 = quantize_images(images)
    x = (images_u8.astype(np.float32) / 255.0).reshape(n_clients, batch_size, *images.shape[1:])
    y = labels.astype(np.int32).reshape(n_clients, batch_size)

    chunk = min(chunk_size, n_clients)
    fn = _compiled_chunk(victim, resolved, layer, keep_update)
    gws, gbs, updates = [], [], []
    bar = _progress(n_clients, progress, "capture")
    for start in range(0, n_clients, chunk):
        stop = min(start + chunk, n_clients)
        pad = chunk - (stop - start)
        ids = np.arange(start, start + chunk, dtype=np.uint32)
        xs, ys = x[start:stop], y[start:stop]
        if pad:  # pad the last chunk so the compiled shape never changes
            xs = np.concatenate([xs, np.repeat(xs[-1:], pad, 0)])
            ys = np.concatenate([ys, np.repeat(ys[-1:], pad, 0)])
        gw, gb, upd = fn(variables, xs, ys, seed, ids)
        keep = stop - start
        gws.append(np.asarray(gw[:keep]))
        gbs.append(np.asarray(gb[:keep]))
        if keep_update:
            updates.append(jax.tree_util.tree_map(lambda a, k=keep: np.asarray(a[:k]), upd))
        bar.update(keep)
    bar.close()

    update = None
    if keep_update:
        update = flatten_tree(jax.tree_util.tree_map(lambda *a: np.concatenate(a), *updates))
    params = flatten_tree(jax.device_get(dict(variables))) if keep_params else None
    info = {
        "model": victim.name,
        "image_shape": list(victim.image_shape),
        "num_classes": int(victim.num_classes),
        "feature_shape": list(dense.feature_shape),
        "feature_layout": "HWC",
        "layer": layer,
        "layer_path": list(dense.path),
        "protocol": "fedsgd",
        "batch_size": batch_size,
        "seed": int(seed),
        "jaxleak_version": __version__,
        "dataset": "unknown",
        **{k: v for k, v in resolved.as_meta().items() if k != "batch_size"},
        "dp_lr": dp.lr if resolved.calibration == "paper" else None,
        **(meta or {}),
    }
    return Capture(
        fc_weight_grad=np.concatenate(gws),
        fc_bias_grad=np.concatenate(gbs),
        labels=y[:, 0] if batch_size == 1 else y,
        images=images_u8 if batch_size == 1 else images_u8.reshape(n_clients, batch_size, *images.shape[1:]),
        meta=info,
        update=update,
        params=params,
    )


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="client", disable=not enabled, leave=False)


def time_capture(
    victim,
    variables: PyTree,
    *,
    dp: DPConfig,
    batch: int = 1024,
    repeats: int = 10,
    seed: int = 0,
    conv_impl: str = "auto",
) -> dict[str, Any]:
    """Throughput of the compiled capture step on ``batch`` single-example clients.

    Compilation is timed separately; the result holds the median over ``repeats``
    of the steady-state wall time, with inputs already on the device.
    """
    resolved = resolve(dp, batch_size=1)
    victim = victim.with_conv_impl(capture_conv_impl(victim, resolved.calibration, conv_impl=conv_impl))
    fn = _compiled_chunk(victim, resolved, "head", False)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.random((batch, 1, *victim.image_shape), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, victim.num_classes, (batch, 1)), dtype=jnp.int32)
    ids = jnp.arange(batch, dtype=jnp.uint32)
    variables = jax.device_put(variables)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, x, y, seed, ids))
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(variables, x, y, seed + r + 1, ids))
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {
        "examples_per_second": batch / med,
        "median_seconds": med,
        "compile_seconds": compile_s,
        "repeats": repeats,
        "batch": batch,
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "calibration": resolved.calibration,
        "conv_impl": victim.conv_impl,
    }
