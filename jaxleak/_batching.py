"""The one batching edge: a jitted ``vmap`` walked over a long leading axis in padded chunks.

Math is written for one item (one client, one capture, one image); callers
``jax.vmap`` it once and hand the batched function to :func:`map_chunked`,
which

1. walks the leading axis ``N`` in chunks of ``chunk`` items on the host,
2. pads the last chunk (copies of the last item, or zeros) so there is exactly
   one compiled shape,
3. optionally splits every chunk across local devices along that axis
   (``NamedSharding`` over a 1-D mesh; the chunk is rounded up to a multiple of
   the device count) and replicates the ``shared`` arguments once,
4. drops the padding and concatenates the results (a pytree) on the host.

Per-item randomness must come from per-item indices passed as a batched
argument (``fold_in(key, index)`` inside the function), never from the chunk
number, so that the chunk size does not change the draws. It may still change
float results by a few ulps: XLA compiles a different program per chunk shape
(docs/pitfalls.md, "The batching edge").

The optimisation driver keeps its own loop (it carries state across calls and
stops early) and uses the pieces: :func:`placement` and :func:`take_rows`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

PADS: tuple[str, ...] = ("edge", "zeros")
OUTS: tuple[str, ...] = ("numpy", "device")


class Placement(NamedTuple):
    """Where one chunk's inputs go.

    Attributes:
      size: items per chunk, a multiple of ``devices``.
      devices: local devices that share each chunk.
      split: puts a pytree of ``[size, ...]`` arrays on the devices, split along axis 0.
      replicate: puts a pytree on the devices whole (every device holds all of it).
    """

    size: int
    devices: int
    split: Callable[[PyTree], PyTree]
    replicate: Callable[[PyTree], PyTree]


def device_count(devices: int | None) -> int:
    """How many local devices ``devices`` means: ``None`` is all of them.

    Raises:
      ValueError: unless ``devices`` is ``None`` or an int in ``[1, jax.local_device_count()]``.

    >>> device_count(1)
    1
    """
    available = jax.local_device_count()
    if devices is None:
        return available
    if (isinstance(devices, bool) or not isinstance(devices, int | np.integer)
            or not 1 <= devices <= available):
        raise ValueError(
            f"devices must be None or an int in [1, {available}] (the local devices), "
            f"got {devices!r}"
        )
    return int(devices)


def placement(size: int, devices: int | None = 1) -> Placement:
    """The chunk size rounded up to the device count, and how to put inputs on those devices.

    With several devices, a chunk is split along its leading axis with a
    ``NamedSharding`` over a 1-D mesh of the first ``devices`` local devices and
    the shared inputs are replicated; XLA then runs each device's share of the
    one vectorised program. On one device both functions are ``jax.device_put``
    (the default device), so putting an input once avoids a copy per call.

    Args:
      size: items per chunk wanted (``>= 1``).
      devices: local devices to share each chunk; ``None`` is all of them.

    Returns:
      A :class:`Placement`.

    >>> p = placement(5, devices=1)
    >>> p.size, p.devices
    (5, 1)
    """
    count = device_count(devices)
    if count == 1:
        return Placement(int(size), 1, jax.device_put, jax.device_put)
    size = -(-int(size) // count) * count  # every device gets the same number of items
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:count]), ("batch",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return Placement(size, count, lambda tree: jax.device_put(tree, split),
                     lambda tree: jax.device_put(tree, whole))


def take_rows(a, start: int, size: int, pad: str = "edge"):
    """Rows ``start : start + size`` of ``a``; rows past its end are padding.

    ``pad="edge"`` repeats the last row (always a valid input, so the padded
    items cannot produce NaNs or raise); ``"zeros"`` fills with zeros. Without
    padding a NumPy input gives a view, so large host arrays are not copied
    before they reach the device.

    >>> take_rows(np.arange(5), 3, 4).tolist()
    [3, 4, 4, 4]
    >>> take_rows(np.arange(5), 3, 4, pad="zeros").tolist()
    [3, 4, 0, 0]
    """
    stop = min(start + size, a.shape[0])
    part = a[start:stop]
    missing = size - (stop - start)
    if missing == 0:
        return part
    xp = jnp if isinstance(a, jax.Array) else np
    if pad == "edge":
        fill = xp.repeat(part[-1:], missing, axis=0)
    else:
        fill = xp.zeros((missing, *a.shape[1:]), a.dtype)
    return xp.concatenate([part, fill])


def map_chunked(
    fn: Callable[..., PyTree],
    *batched: PyTree,
    chunk: int,
    shared: tuple[PyTree, ...] = (),
    devices: int | None = 1,
    pad: str = "edge",
    out: str = "numpy",
    progress: str | None = None,
) -> PyTree:
    """``fn(*shared, *batched)`` over a long leading axis, in chunks of one compiled shape.

    Args:
      fn: a function over a leading batch axis, typically
        ``jax.jit(jax.vmap(one_item, in_axes=(None, 0, 0)))``, cached by the
        caller so repeated calls do not retrace. It is called as given: a
        Python wrapper around a jitted function is fine, an un-jitted ``vmap``
        runs op by op (slow). Do not jit a closure over large arrays: they
        become compile-time constants; pass them in ``shared``.
      *batched: pytrees of host (NumPy) or device arrays sharing the leading
        axis ``N``. Per-item indices (client ids for ``fold_in``) go here too, so
        each item's randomness does not depend on the chunk size.
      chunk: items per call (``>= 1``); the last chunk is padded to the same size.
        Rounded up to a multiple of the device count when sharding.
      shared: arguments passed whole to every call, before the batched ones
        (the victim's variables, a base key); put on the devices once.
      devices: local devices that share each chunk along its leading axis;
        ``1`` (default) the default device only, ``None`` all local devices.
      pad: ``"edge"`` (copies of the last item) or ``"zeros"``.
      out: ``"numpy"`` moves each chunk's result to the host as it is done (device
        memory holds one chunk); ``"device"`` keeps and concatenates on the device.
      progress: a tqdm bar with this description, counting items; ``None`` for none.

    Returns:
      ``fn``'s output pytree with leading axis ``N`` on every leaf (no padding).
      When one call covers all ``N`` items without padding its output is returned as is.

    Raises:
      ValueError: on a bad ``chunk``, ``pad``, ``out`` or ``devices``, no batched
        arrays, or leading axes that differ.

    >>> import jax, numpy as np
    >>> square = jax.jit(jax.vmap(lambda x, i: (x * x, i)))
    >>> y, i = map_chunked(square, np.arange(5.0), np.arange(5), chunk=2)
    >>> y.tolist(), i.tolist()
    ([0.0, 1.0, 4.0, 9.0, 16.0], [0, 1, 2, 3, 4])
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if pad not in PADS:
        raise ValueError(f"pad must be one of {PADS}, got {pad!r}")
    if out not in OUTS:
        raise ValueError(f"out must be one of {OUTS}, got {out!r}")
    batched = jax.tree_util.tree_map(
        lambda a: a if isinstance(a, jax.Array) else np.asarray(a), batched
    )
    leaves = jax.tree_util.tree_leaves(batched)
    if not leaves:
        raise ValueError("map_chunked needs at least one batched array")
    lengths = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in leaves}
    if len(lengths) != 1 or -1 in lengths:
        raise ValueError(
            f"batched arrays must share a leading axis, got leading sizes {sorted(lengths)}"
        )
    n = lengths.pop()
    if n == 0:
        return _empty(fn, shared, batched)
    layout = placement(min(int(chunk), n), devices)
    shared = layout.replicate(shared)
    size = layout.size
    parts = []
    bar = _progress(n, progress)
    for start in range(0, n, size):
        keep = min(size, n - start)
        rows = jax.tree_util.tree_map(lambda a, s=start: take_rows(a, s, size, pad), batched)
        args = layout.split(rows)
        result = fn(*shared, *args)
        if out == "numpy":
            result = jax.device_get(result)  # frees the chunk's device memory before the next one
        if keep < size:
            result = jax.tree_util.tree_map(lambda r, k=keep: r[:k], result)
        parts.append(result)
        bar.update(keep)
    bar.close()
    if len(parts) == 1:
        return parts[0]
    concatenate = np.concatenate if out == "numpy" else jnp.concatenate
    return jax.tree_util.tree_map(lambda *p: concatenate(p), *parts)


def _empty(fn, shared, batched) -> PyTree:
    """``fn``'s output for zero items: zeros with leading axis 0, from shapes only (no compile)."""
    one = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype), batched
    )
    shapes = jax.eval_shape(fn, *shared, *one)
    return jax.tree_util.tree_map(lambda s: np.zeros((0, *s.shape[1:]), s.dtype), shapes)


def _progress(total: int, desc: str | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=desc is None, leave=False)


__all__ = ["Placement", "device_count", "map_chunked", "placement", "take_rows"]
