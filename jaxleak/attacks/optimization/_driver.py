"""One iteration driver for every optimisation attack.

An attack is a :class:`Problem`: pure ``init`` / ``step`` / ``candidate``
functions written for ONE target update. The driver vmaps them over a block of
targets x restarts, runs ``chunk`` iterations per compiled call with
``lax.scan`` (no Python per iteration), keeps the best iterate by matching
loss, and loops over chunks on the host only for progress and early stopping.
Target ``t``, restart ``r`` draws from ``fold_in(fold_in(PRNGKey(seed), t), r)``,
so results do not depend on how targets are blocked.

FLOPs per iteration come from XLA's cost analysis of the compiled programs. XLA's
``HloCostAnalysis`` counts the body of a ``while`` loop once whatever its trip count
(measured with jax 0.10: ``lax.scan`` of a 64x64 matmul reports one step's FLOPs at
lengths 1, 2 and 5, and ``unroll`` steps' FLOPs at ``unroll`` > 1), so the chunk's
figure is NOT divided by the chunk length: with ``unroll=1`` and ``batching="vmap"``
on one device the chunk's loop body is one iteration of the block, and its FLOPs
divided by the block's runs is the figure; otherwise :func:`_iteration_flops` compiles
a one-iteration program for the count. ``tests/test_audit_metrics.py`` checks that
both agree, so a change in XLA's counting shows up there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from jaxleak._batching import device_count, placement, take_rows


class Candidate(NamedTuple):
    """What an attack reconstructs for one target: a batch of images and label distributions."""

    images: Float[Array, "b h w c"]
    label_probs: Float[Array, "b k"]


class Problem(NamedTuple):
    """An attack on ONE target, as pure functions (the driver vmaps them).

    Attributes:
      init: ``(key, target, shared) -> state``.
      step: ``(state, target, shared, iteration) -> (state, matching_loss)``; the
        loss is that of ``candidate(state)`` *before* the step.
      candidate: ``(state, shared) -> Candidate``, the current reconstruction.
    """

    init: Callable[[Array, PyTree, PyTree], PyTree]
    step: Callable[[PyTree, PyTree, PyTree, Array], tuple[PyTree, Array]]
    candidate: Callable[[PyTree, PyTree], Candidate]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How the driver runs an attack (none of it changes the attack's math except ``iterations``).

    Attributes:
      iterations: optimisation steps per target (the attack's budget).
      chunk: iterations per compiled call (``lax.scan`` length); only progress
        granularity and early-stop resolution depend on it.
      target_batch: targets per compiled call (each with ``restarts`` runs);
        the last block is padded so the compiled shape never changes.
      restarts: independent random initialisations per target; the one with the
        lowest matching loss is returned.
      patience: stop a block when no target's best matching loss improved by
        more than ``min_delta`` (relative) over the last ``patience``
        iterations; ``None`` (default) runs the whole budget as the references do.
      min_delta: relative improvement that counts for ``patience``.
      seed: PRNG seed of the initialisations.
      progress: tqdm bar over iterations.
      batching: ``"vmap"`` (default) runs the block's targets as one vectorised
        program; ``"map"`` runs them one after another inside the same compiled
        call (``lax.map``). Same results. On XLA:CPU ``"map"`` was the faster of
        the two (3.5x with XLA's convolutions, 1.3x with the attacks' default
        im2col convolutions, ConvNet at T = 16; BENCHMARKS.md); on accelerators
        vmap is meant to be the fast path, and only vmap is split across devices.
      unroll: iterations unrolled per loop trip of the ``lax.scan`` (``chunk``
        unrolls the whole chunk: no loop; compile time grows with ``unroll``).
      devices: with ``batching="vmap"``, how many of the local devices share each
        block (its targets x restarts are split across them; the block is padded
        to a multiple). ``None`` (default): all of them; ``1``: the default device
        only. Same results.
      flops: measure FLOPs per iteration of one run (``RunResult.flops_per_iteration``);
        free with the defaults (read from the chunk's compiled program), one extra
        compilation of a one-iteration program otherwise (:func:`_iteration_flops`, first
        block only, not in ``compile_seconds``).
    """

    iterations: int
    chunk: int = 100
    target_batch: int = 16
    restarts: int = 1
    patience: int | None = None
    min_delta: float = 1e-4
    seed: int = 0
    progress: bool = False
    batching: str = "vmap"
    unroll: int = 1
    devices: int | None = None
    flops: bool = True

    def __post_init__(self):
        if self.batching not in ("vmap", "map"):
            raise ValueError(f"batching must be 'vmap' or 'map', got {self.batching!r}")
        for name in ("iterations", "chunk", "target_batch", "restarts", "unroll"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        device_count(self.devices)  # raises on a bad count
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be None or >= 1, got {self.patience!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta!r}")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class RunResult:
    """Host arrays for ``T`` targets (best restart each) plus timing.

    Attributes:
      images: ``[T, B, H, W, C]`` best iterate per target (not clipped).
      label_probs: ``[T, B, K]``.
      loss: ``[T]`` matching loss of ``images``.
      best_iteration: ``[T]`` iteration at which the best iterate was reached
        (the iterations-to-convergence figure).
      restart_loss: ``[T, R]`` best matching loss of each restart.
      iterations_run: ``[T]`` iterations actually run (less than the budget after an early stop).
      compile_seconds: ahead-of-time compilation of the chunk function.
      seconds_total: wall time of all chunks (compilation excluded).
      seconds_per_iteration: ``seconds_total / iterations`` summed over blocks: the
        cost of one iteration of one compiled block of ``target_batch x restarts`` runs.
      seconds_per_target: ``seconds_total / T`` (amortised, compilation excluded).
      devices: devices that shared each block.
      flops_per_iteration: FLOPs of one iteration of one run (one target, one restart;
        a target with R restarts costs R times this): XLA's cost analysis of the first
        block's compiled program divided by its runs (see the module docstring);
        ``None`` where the backend gives no figure or ``RunOptions.flops`` is off.
      flops_lower_bound: the iteration holds a loop (``lax.scan`` / ``while``, e.g. DLF's
        replayed local steps) whose body XLA counted once, so ``flops_per_iteration``
        undercounts.
    """

    images: np.ndarray
    label_probs: np.ndarray
    loss: np.ndarray
    best_iteration: np.ndarray
    restart_loss: np.ndarray
    iterations_run: np.ndarray
    compile_seconds: float
    seconds_total: float
    seconds_per_iteration: float
    seconds_per_target: float
    devices: int = 1
    flops_per_iteration: float | None = None
    flops_lower_bound: bool = False

    def timing(self) -> dict[str, Any]:
        """JSON-ready timing and cost summary (``flops_per_iteration`` may be ``None``)."""
        return {
            "compile_seconds": self.compile_seconds,
            "seconds_total": self.seconds_total,
            "seconds_per_iteration": self.seconds_per_iteration,
            "seconds_per_target": self.seconds_per_target,
            "iterations_run_max": int(self.iterations_run.max()),
            "best_iteration_mean": float(self.best_iteration.mean()),
            "devices": self.devices,
            "flops_per_iteration": self.flops_per_iteration,
            "flops_lower_bound": self.flops_lower_bound,
        }


class _Carry(NamedTuple):
    state: PyTree
    best: Candidate
    best_loss: Array
    best_iteration: Array


def _iterate(problem: Problem, iterations: int, c: _Carry, target, shared, it) -> _Carry:
    """One iteration of one run: step, and keep the candidate if its loss is the best so far."""
    cand = problem.candidate(c.state, shared)
    new_state, loss = problem.step(c.state, target, shared, it)
    active = it < iterations
    better = active & (loss < c.best_loss)  # NaN never wins
    pick = lambda new, old: jnp.where(better, new, old)
    state = jax.tree_util.tree_map(lambda n, o: jnp.where(active, n, o), new_state, c.state)
    return _Carry(
        state=state,
        best=jax.tree_util.tree_map(pick, cand, c.best),
        best_loss=jnp.where(better, loss, c.best_loss),
        best_iteration=jnp.where(better, it, c.best_iteration),
    )


def _run_chunk(problem: Problem, iterations: int, chunk: int, unroll: int, carry: _Carry, target, shared,
               start):
    def body(c: _Carry, it):
        return _iterate(problem, iterations, c, target, shared, it), None

    carry, _ = jax.lax.scan(body, carry, start + jnp.arange(chunk), unroll=min(unroll, chunk))
    return carry


def flops_of(cost: Any) -> float | None:
    """Total FLOPs in what ``Compiled.cost_analysis()`` returned, or ``None``.

    Backends differ: some return ``None``, older JAX a list of one dict per program,
    some dicts lack ``"flops"`` or hold a negative "unknown" value. A list counts only
    when every entry has a figure.

    >>> flops_of({"flops": 10.0}), flops_of([{"flops": 2.0}, {"flops": 3.0}]), flops_of(None)
    (10.0, 5.0, None)
    >>> flops_of([{"flops": 2.0}, {}]), flops_of({"flops": -1.0})
    (None, None)
    """
    entries = list(cost) if isinstance(cost, (list, tuple)) else [cost]
    values = []
    for entry in entries:
        value = entry.get("flops") if isinstance(entry, Mapping) else None
        if value is None or not math.isfinite(float(value)) or float(value) < 0:
            return None
        values.append(float(value))
    return float(sum(values)) if values else None


_LOOPS = ("scan", "while")


def _sub_jaxprs(params: Mapping[str, Any]):
    for value in params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            inner = getattr(item, "jaxpr", item)  # a ClosedJaxpr holds its Jaxpr
            if hasattr(inner, "eqns"):
                yield inner


def _loops(jaxpr) -> int:
    """Number of ``scan`` / ``while`` in a jaxpr, nested ones (inside pjit, cond, loops) included."""
    return sum((eqn.primitive.name in _LOOPS) + sum(_loops(sub) for sub in _sub_jaxprs(eqn.params))
               for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns)


def _compiled_flops(compiled) -> float | None:
    try:
        return flops_of(compiled.cost_analysis())
    except NotImplementedError:  # a backend without cost analysis
        return None


def _iteration_flops(problem: Problem, iterations: int, carry: _Carry, target: PyTree,
                    shared: PyTree) -> tuple[float | None, bool]:
    """FLOPs of one iteration of one run, and whether that figure is a lower bound.

    Compiles the vmapped one-iteration program for the block's shapes (abstract,
    single device, so sharding does not split the count) and divides XLA's FLOPs by
    the block's runs (targets x restarts, padding included: padded runs compute too).

    Args:
      problem: the attack.
      iterations: the budget (a static argument of the step).
      carry, target: the block's carry and targets (leading axis = runs); only shapes are read.
      shared: the shared pytree; only shapes are read.

    Returns:
      ``(flops, lower_bound)``: ``flops`` is ``None`` when the backend gives no figure;
      ``lower_bound`` is True when the iteration holds a loop, whose body XLA counts once.
    """
    spec = lambda tree: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)
    runs = int(jax.tree_util.tree_leaves(carry)[0].shape[0])
    one = jax.vmap(functools.partial(_iterate, problem, iterations), in_axes=(0, 0, None, None))
    traced = jax.jit(one).trace(spec(carry), spec(target), spec(shared), jax.ShapeDtypeStruct((), jnp.int32))
    flops = _compiled_flops(traced.lower().compile())
    return (None if flops is None else flops / runs), _loops(traced.jaxpr) > 0


def _init_carry(problem: Problem, key, target, shared) -> _Carry:
    state = problem.init(key, target, shared)
    cand = problem.candidate(state, shared)
    return _Carry(state=state, best=cand, best_loss=jnp.asarray(jnp.inf, jnp.float32),
                  best_iteration=jnp.asarray(-1, jnp.int32))


@functools.lru_cache(maxsize=32)
def _compiled(problem: Problem, iterations: int, chunk: int, batching: str, unroll: int):
    init = jax.jit(jax.vmap(functools.partial(_init_carry, problem), in_axes=(0, 0, None)))
    one = functools.partial(_run_chunk, problem, iterations, chunk, unroll)
    if batching == "vmap":
        run = jax.vmap(one, in_axes=(0, 0, None, None))
    else:
        def run(carry, target, shared, start):
            return jax.lax.map(lambda ct: one(ct[0], ct[1], shared, start), (carry, target))
    return init, jax.jit(run)


def _keys(seed: int, targets: np.ndarray, restarts: int) -> Array:
    base = jax.random.PRNGKey(seed)
    per_target = jax.vmap(lambda t: jax.random.fold_in(base, t))(jnp.asarray(targets, jnp.uint32))
    return jax.vmap(lambda k: jax.vmap(lambda r: jax.random.fold_in(k, r))(jnp.arange(restarts)))(per_target)


def _runs(a: np.ndarray, start: int, block: int, restarts: int) -> np.ndarray:
    """Rows ``start : start + block`` of ``a`` (padded), each repeated ``restarts`` times.

    A view (no copy) for a full block and one restart: observed updates of large
    victims are big (ResNet-18: 45 MB per target), so a block is not copied
    twice on the host before it reaches the device.
    """
    picked = take_rows(a, start, block)
    return picked if restarts == 1 else np.repeat(picked, restarts, axis=0)


def run_problem(problem: Problem, targets: PyTree, shared: PyTree, options: RunOptions) -> RunResult:
    """Runs ``problem`` on every target (leading axis ``T`` of each leaf of ``targets``).

    Args:
      problem: the attack (see :class:`Problem`).
      targets: pytree of host or device arrays ``[T, ...]`` (the observed updates and
        whatever else is per target).
      shared: pytree common to all targets (the victim's variables).
      options: budget, blocking, restarts, early stopping.

    Returns:
      A :class:`RunResult` (best restart per target).
    """
    leaves = jax.tree_util.tree_leaves(targets)
    n = int(leaves[0].shape[0])
    # Several devices split each vmapped block (its targets x restarts runs) along its leading
    # axis, the block padded to a multiple of the device count; lax.map blocks stay on one device.
    devices = options.devices if options.batching == "vmap" else 1
    layout = placement(min(options.target_batch, n), devices)
    block, devices, place = layout.size, layout.devices, layout.split
    shared = layout.replicate(shared)
    restarts = options.restarts
    chunk = min(options.chunk, options.iterations)
    n_chunks = math.ceil(options.iterations / chunk)
    init, run = _compiled(problem, options.iterations, chunk, options.batching, options.unroll)
    patience_chunks = None if options.patience is None else max(1, math.ceil(options.patience / chunk))
    out: list[dict[str, Any]] = []
    compile_s = total_s = per_iter_s = 0.0
    flops, flops_lower_bound = None, False
    bar = _progress(options.iterations * math.ceil(n / block), options.progress)
    host = jax.tree_util.tree_map(np.asarray, targets)
    for start in range(0, n, block):
        stop = min(start + block, n)
        idx = np.minimum(np.arange(start, start + block), n - 1)  # pads with the last target
        sub = jax.tree_util.tree_map(lambda a, s=start: _runs(a, s, block, restarts), host)
        keys = _keys(options.seed, idx, restarts).reshape(block * restarts, -1)
        sub, keys = place(sub), place(keys)
        # Placing the carry again is a no-op unless XLA chose another sharding for an output.
        carry = place(init(keys, sub, shared))
        t0 = time.perf_counter()
        traced = run.trace(carry, sub, shared, jnp.int32(0))
        compiled = traced.lower().compile()
        compile_s += time.perf_counter() - t0
        if options.flops and start == 0:
            if options.unroll == 1 and options.batching == "vmap" and devices == 1:
                # The chunk's loop body is one iteration of the block, counted once by XLA.
                chunk_flops = _compiled_flops(compiled)
                flops = None if chunk_flops is None else chunk_flops / (block * restarts)
                flops_lower_bound = _loops(traced.jaxpr) > 1  # more loops than the chunk's own scan
            else:
                flops, flops_lower_bound = _iteration_flops(problem, options.iterations, carry, sub, shared)
        history: list[np.ndarray] = []
        ran = 0
        t0 = time.perf_counter()
        for c in range(n_chunks):
            carry = place(compiled(carry, sub, shared, jnp.int32(c * chunk)))
            best = np.asarray(carry.best_loss)
            ran = min((c + 1) * chunk, options.iterations)
            bar.update(ran - min(c * chunk, options.iterations))
            bar.set_postfix(best=f"{np.nanmin(best):.4g}")
            history.append(best)
            if patience_chunks is not None and len(history) > patience_chunks:
                old = history[-1 - patience_chunks]
                improved = best < old - options.min_delta * np.abs(old)
                if not np.any(improved):
                    break
        jax.block_until_ready(carry)
        elapsed = time.perf_counter() - t0
        total_s += elapsed
        per_iter_s += elapsed / max(ran, 1)
        keep = stop - start
        grab = lambda a, k=keep: np.asarray(a).reshape(block, restarts, *np.shape(a)[1:])[:k]
        out.append({"images": grab(carry.best.images), "label_probs": grab(carry.best.label_probs),
                    "loss": grab(carry.best_loss), "best_iteration": grab(carry.best_iteration),
                    "ran": np.full(keep, ran)})
    bar.close()
    cat = {k: np.concatenate([o[k] for o in out]) for k in out[0]}
    loss = np.where(np.isnan(cat["loss"]), np.inf, cat["loss"])
    pick = np.argmin(loss, axis=1)
    take = lambda a: a[np.arange(n), pick]
    return RunResult(
        images=take(cat["images"]), label_probs=take(cat["label_probs"]), loss=take(cat["loss"]),
        best_iteration=take(cat["best_iteration"]), restart_loss=cat["loss"], iterations_run=cat["ran"],
        compile_seconds=compile_s, seconds_total=total_s, seconds_per_iteration=per_iter_s,
        seconds_per_target=total_s / n, devices=devices, flops_per_iteration=flops,
        flops_lower_bound=flops_lower_bound,
    )


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="attack", unit="it", disable=not enabled, leave=False)


__all__ = ["Candidate", "Problem", "RunOptions", "RunResult", "flops_of", "run_problem"]
