"""Simulated clients: the protocol and its defenses, vmapped over clients, and the attacker's view.

The math of one client is :func:`jaxleak.protocols.client_update`; here a single
jitted ``vmap`` runs a chunk of clients at once and :func:`capture_updates` walks
the chunks on the host. Client ``i`` uses the key ``fold_in(PRNGKey(seed), i)``,
so ``chunk_size`` changes no random draw: results agree across chunk sizes to
float32 rounding (XLA compiles one program per chunk shape; docs/pitfalls.md), and
the same seed and chunk size give the same capture bit for bit on one machine.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree

from jaxleak._batching import map_chunked
from jaxleak._version import __version__
from jaxleak.capture.io import Capture, flatten_tree
from jaxleak.defenses import Chain, chain, dp_from_config
from jaxleak.privacy.mechanisms import DPConfig
from jaxleak.protocols import FEDSGD, Protocol, client_update


def per_example_grads(
    victim, variables: PyTree, images: Float[Array, "b h w c"], labels: Int[Array, " b"], key=None
) -> PyTree:
    """Gradients of the loss of each example w.r.t. the victim's parameters, ``[B, ...]`` leaves.

    A stochastic victim (PRECODE) needs ``key``; example ``i`` samples with ``fold_in(key, i)``.
    """
    params = variables["params"]
    batch_stats = variables.get("batch_stats")
    if getattr(victim, "stochastic", False):
        if key is None:
            raise ValueError(f"{victim.name} samples inside its loss (PRECODE): pass a key")
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
        grad_key = jax.grad(lambda p, x, y, k: victim.loss(p, batch_stats, x, y, k))
        return jax.vmap(grad_key, in_axes=(None, 0, 0, 0))(params, images, labels, keys)
    grad_one = jax.grad(lambda p, x, y: victim.loss(p, batch_stats, x, y))
    return jax.vmap(grad_one, in_axes=(None, 0, 0))(params, images, labels)


@functools.lru_cache(maxsize=32)
def _compiled_chunk(victim, protocol: Protocol, defenses: Chain, layer: str, keep_update: bool):
    dense = victim.layers[layer]

    def one(variables, images, labels, key):
        result = client_update(victim, variables, images, labels, key, protocol=protocol, defenses=defenses)
        update = result.update if keep_update else {"__head__": dense.select(result.update)}
        return update, result.schedule, result.finite

    def chunk(variables, seed, images, labels, client_ids):
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(client_ids)
        return jax.vmap(one, in_axes=(None, 0, 0, 0))(variables, images, labels, keys)

    return jax.jit(chunk)


# Victims whose capture was measured faster with im2col convolutions on a GPU (BENCHMARKS.md).
_CAPTURE_PATCHES_MEASURED = ("lenet-dlg", "lenet-venom")


def capture_conv_impl(victim, calibration: str, *, keep_update: bool = False, conv_impl: str = "auto",
                      protocol: Protocol | None = None) -> str:
    """Convolution implementation for a capture step (``"auto"`` decides by workload).

    FedAvg clients train in a ``lax.scan`` of local steps, where XLA:CPU's convolution is
    ~20x slower than im2col ``"patches"`` for convnet-sme (1.9-2.3 s vs 0.08 s per client,
    experiments/capture_bench/README.md), as the optimisation attacks found for their loops:
    ``"patches"`` there on CPU, for every victim that has it.

    FedSGD: per-example convolution *weight* gradients are only computed when they
    matter: under ``dpsgd`` (whole-gradient clipping) or when the whole update
    is kept. On GPUs those are 3-5x faster as im2col ``"patches"``, while the
    forward-only work of the other cases is faster with XLA's convolution
    (BENCHMARKS.md, H100). On CPU both measured alike, so ``"xla"``. Measured
    for the LeNets only, so the other conv victims keep ``"xla"``.
    """
    if conv_impl != "auto":
        return conv_impl
    cpu = jax.default_backend() == "cpu"
    if protocol is not None and protocol.kind == "fedavg" and cpu:
        return "xla" if victim.conv_impl is None else "patches"
    if victim.name not in _CAPTURE_PATCHES_MEASURED or cpu:
        return "xla"
    return "patches" if (calibration == "dpsgd" or keep_update) else "xla"


def quantize_images(images: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8, the pixels a capture file stores."""
    return np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)


def resolve_defenses(
    dp: DPConfig | None, defenses: Chain | None, *, samples: int, protocol: Protocol, layer_path
) -> Chain:
    """One chain from the ``dp`` shorthand (today's ``--calibration/--epsilon``) and/or ``defenses``."""
    defenses = chain() if defenses is None else defenses
    if dp is None or dp.calibration == "none":
        return defenses
    if defenses.step is not None:
        raise ValueError("give DP either as a DPConfig (--calibration/--epsilon) or in the defense chain, "
                         "not both")
    step = dp_from_config(dp, batch_size=protocol.batch(samples), layer_path=tuple(layer_path))
    return chain(step, *defenses.defenses)


def _dp_flat(dp_meta: dict[str, Any] | None) -> dict[str, Any]:
    """The flat DP fields today's readers use (``calibration``, ``epsilon``, ``noise_variance``, ...)."""
    if dp_meta is None:
        return {"calibration": "none", "mechanism": "none", "epsilon": None, "delta": None, "clip": None,
                "noise_std": 0.0, "noise_variance": 0.0, "noise_multiplier": None, "accountant": None,
                "scope": "all"}
    keys = ("calibration", "mechanism", "epsilon", "epsilon_tight", "delta", "clip", "noise_std",
            "noise_variance", "noise_multiplier", "accountant", "scope")
    return {k: dp_meta.get(k) for k in keys}


def capture_updates(
    victim,
    variables: PyTree,
    images: Float[np.ndarray, "n h w c"],
    labels: Int[np.ndarray, " n"],
    *,
    dp: DPConfig | None = None,
    defenses: Chain | None = None,
    protocol: Protocol = FEDSGD,
    samples: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    layer: str = "head",
    chunk_size: int = 256,
    keep_update: bool = False,
    keep_params: bool = False,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
    conv_impl: str = "auto",
) -> Capture:
    """Simulates clients under ``protocol`` and ``defenses`` and returns what the attacker observes.

    Examples are grouped into ``N = n // M`` clients of ``M`` consecutive examples.
    Images are quantised to uint8 first and the clients train on exactly those
    pixels, so the stored images are the true targets.

    Args:
      victim: a :class:`jaxleak.models.Victim`.
      variables: the server weights ``w0`` (Flax variables).
      images: float ``[n, H, W, C]`` in [0, 1], ``n`` a multiple of ``M``.
      labels: int ``[n]``.
      dp: today's DP shorthand (``--calibration/--epsilon``), prepended to ``defenses``
        as its step-stage defense; ``None`` or calibration ``"none"`` adds nothing.
      defenses: a :class:`jaxleak.defenses.Chain` (default: none).
      protocol: :class:`jaxleak.protocols.Protocol` (default FedSGD).
      samples: ``M``, images per client (default 1).
      batch_size: FedSGD's name for ``samples`` (the client batch ``B = M``); give one of the two.
      seed: client ``i`` uses ``fold_in(PRNGKey(seed), i)``.
      layer: the dense layer whose view the capture exposes (``"head"``, or ``"first"`` for an mlp).
      chunk_size: clients per compiled call (memory bound).
      keep_update: store the whole update (every layer), not only ``layer``.
      keep_params: store the server weights ``w0``.
      meta: extra metadata (dataset, ...), merged into the capture's ``meta``.
      progress: show a progress bar.
      conv_impl: ``"auto"`` (see :func:`capture_conv_impl`), ``"xla"`` or ``"patches"``;
        only the speed changes.

    Returns:
      A version-2 :class:`Capture`.

    Raises:
      ValueError: on inconsistent shapes or arguments, or a client whose gradient or
        update is not finite (the message names the client).
    """
    if samples is not None and batch_size is not None and samples != batch_size:
        raise ValueError(f"give samples or batch_size (the same M), not both: {samples} vs {batch_size}")
    m = samples if samples is not None else (batch_size if batch_size is not None else 1)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images must be [n, H, W, C], got shape {images.shape}")
    if tuple(images.shape[1:]) != tuple(victim.image_shape):
        raise ValueError(f"images are {images.shape[1:]} but the victim expects {victim.image_shape}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be [n] = [{images.shape[0]}], got {labels.shape}")
    finite = np.isfinite(images.reshape(len(images), -1)).all(1)
    if not finite.all():
        raise ValueError(f"image {int(np.flatnonzero(~finite)[0])} holds a NaN or inf pixel "
                         f"({int((~finite).sum())} such image(s))")
    if labels.size and (labels.min() < 0 or labels.max() >= victim.num_classes):
        raise ValueError(f"labels must be in [0, {victim.num_classes}), got [{labels.min()}, {labels.max()}]")
    if m < 1 or images.shape[0] % m or images.shape[0] == 0:
        raise ValueError(f"need a positive multiple of M={m} images per client, got {images.shape[0]}")
    if layer not in victim.layers:
        raise ValueError(f"victim {victim.name!r} has no dense layer {layer!r}; it has {sorted(victim.layers)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dense = victim.layers[layer]
    defenses = resolve_defenses(dp, defenses, samples=m, protocol=protocol, layer_path=dense.path)
    dp_meta = defenses.dp
    calibration = "none" if dp_meta is None else dp_meta.get("calibration", "none")
    victim = victim.with_conv_impl(
        capture_conv_impl(victim, calibration, keep_update=keep_update, conv_impl=conv_impl, protocol=protocol))
    n_clients = images.shape[0] // m
    images_u8 = quantize_images(images)
    x = (images_u8.astype(np.float32) / 255.0).reshape(n_clients, m, *images.shape[1:])
    y = labels.astype(np.int32).reshape(n_clients, m)

    fn = _compiled_chunk(victim, protocol, defenses, layer, keep_update)
    update, schedule, finite = map_chunked(fn, x, y, np.arange(n_clients, dtype=np.uint32),
                                           shared=(variables, seed), chunk=min(chunk_size, n_clients),
                                           progress="capture" if progress else None)
    bad = np.flatnonzero(~np.asarray(finite))
    if bad.size:
        first = int(bad[0])
        raise ValueError(f"client {first} (images {first * m}..{(first + 1) * m - 1}) produced a NaN or inf "
                         f"gradient or update ({bad.size} such client(s)); check its images and the weights")
    if not keep_update:
        update = {"/".join(dense.path): update["__head__"]}
    flat_update = flatten_tree(update)
    params = flatten_tree(jax.device_get(dict(variables))) if keep_params else None
    proto_meta = protocol.as_meta(m)
    info = {
        "format_version": 2,
        "model": victim.name,
        "model_options": victim.metadata()["options"],
        "image_shape": list(victim.image_shape),
        "num_classes": int(victim.num_classes),
        "feature_shape": list(dense.feature_shape),
        "feature_layout": "HWC",
        "layer": layer,
        "layer_path": list(dense.path),
        "update_scope": "all" if keep_update else "head",
        "protocol": proto_meta,
        "batch_size": proto_meta["local_batch"],
        "defenses": defenses.meta,
        "dp": dp_meta,
        **_dp_flat(dp_meta),
        "dp_lr": dp_meta.get("lr") if dp_meta and dp_meta.get("calibration") == "paper" else None,
        "seed": int(seed),
        "jaxleak_version": __version__,
        "dataset": "unknown",
        **(meta or {}),
    }
    return Capture(
        update=flat_update,
        meta=info,
        params=params,
        truth_images=images_u8.reshape(n_clients, m, *images.shape[1:]),
        truth_labels=y,
        schedule=np.asarray(schedule, np.int32),
    )



def time_capture(
    victim,
    variables: PyTree,
    *,
    dp: DPConfig | None = None,
    defenses: Chain | None = None,
    protocol: Protocol = FEDSGD,
    samples: int = 1,
    batch: int = 1024,
    repeats: int = 10,
    seed: int = 0,
    conv_impl: str = "auto",
) -> dict[str, Any]:
    """Throughput of the compiled capture step on ``batch`` clients of ``samples`` images each.

    Compilation is timed separately; the result holds the median over ``repeats``
    of the steady-state wall time, with inputs already on the device.
    """
    layer_path = victim.layers["head"].path
    defenses = resolve_defenses(dp, defenses, samples=samples, protocol=protocol, layer_path=layer_path)
    calibration = "none" if defenses.dp is None else defenses.dp.get("calibration", "none")
    victim = victim.with_conv_impl(capture_conv_impl(victim, calibration, conv_impl=conv_impl, protocol=protocol))
    fn = _compiled_chunk(victim, protocol, defenses, "head", False)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.random((batch, samples, *victim.image_shape), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, victim.num_classes, (batch, samples)), dtype=jnp.int32)
    ids = jnp.arange(batch, dtype=jnp.uint32)
    variables = jax.device_put(variables)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, seed, x, y, ids))
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(variables, seed + r + 1, x, y, ids))
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {
        "clients_per_second": batch / med,
        "examples_per_second": batch * samples / med,
        "median_seconds": med,
        "compile_seconds": compile_s,
        "repeats": repeats,
        "clients": batch,
        "samples": samples,
        "protocol": protocol.as_meta(samples),
        "defenses": defenses.meta,
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "calibration": calibration,
        "conv_impl": victim.conv_impl,
    }
