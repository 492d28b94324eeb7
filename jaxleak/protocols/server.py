"""The server side of federated training: FedAvg rounds over a population of simulated clients.

So that a capture can be taken at "global epoch E" of a real FL run (the FM paper's
Figure 4 and Table 1 put test accuracy next to attack quality), :func:`train_fedavg`
trains a victim the way the federation would: every round samples clients, each runs
the one-client function :func:`jaxleak.protocols.client_update` (local training plus an
optional defense chain) at the server weights, and the server applies the weighted mean
of their updates. The clients of one round are ``vmap``ped inside one jitted function
(:func:`fedavg_round`); the rounds are a host loop with evaluation, checkpoints and
resumption.

**Global epoch.** One global epoch is one pass of the client population in
expectation: ``num_clients / clients_per_round`` rounds (each round samples
``clients_per_round`` of the ``num_clients`` clients without replacement, independently
of the other rounds). After ``r`` rounds the run is at global epoch
``r * clients_per_round / num_clients``; the history records both.

**Randomness.** The partition into clients depends only on ``seed`` (and the labels);
round ``r`` (0-based) samples its clients with ``numpy.random.default_rng([seed, r])``
and client ``i`` of that round trains with the key ``fold_in(fold_in(PRNGKey(seed), r), i)``.
Nothing depends on how the run was split into sessions, so resuming from a checkpoint
reproduces an uninterrupted run bit for bit (same machine and library versions).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from jaxleak.protocols._local import client_update
from jaxleak.protocols._protocol import Protocol

HISTORY_FILE = "history.json"
_LOSS_TAG = 0x1055  # fold_in tag of the key a stochastic victim's reported training loss draws from


def round_at_epoch(run_dir: str | os.PathLike, epoch: float) -> int:
    """The saved round of a ``train_fedavg`` run folder at which global epoch ``epoch`` was reached.

    That is the first round whose ``global_epoch`` (``history.json``) is at least ``epoch``;
    it must be one of the checkpoints the run kept (``keep`` / ``checkpoint_every``).

    Raises:
      ValueError: not a run folder, the run never reached ``epoch``, or that round was not kept
        (the message lists the epochs that were).
    """
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} holds no {HISTORY_FILE}: not a `jaxleak train-fedavg` run")
    with open(path, encoding="utf-8") as f:
        history = json.load(f).get("history") or []
    reached = [h for h in history if h["global_epoch"] >= epoch - 1e-9]
    if not reached:
        last = history[-1]["global_epoch"] if history else 0
        raise ValueError(f"{run_dir} stops at global epoch {last:g}, before {epoch:g}")
    from jaxleak import artifacts

    steps = Path(run_dir) / artifacts.STEPS_DIR
    kept = sorted(int(p.name) for p in steps.iterdir() if p.name.isdigit()) if steps.is_dir() else []
    epoch_of = {h["round"]: h["global_epoch"] for h in history}
    target = reached[0]["round"]
    if target not in kept:
        have = ", ".join(f"{epoch_of.get(r, float('nan')):g} (round {r})" for r in kept) or "none"
        raise ValueError(f"{run_dir}: global epoch {epoch:g} is round {target}, which was not kept; kept: {have} "
                         f"(train with --checkpoint-every / --keep to keep it)")
    return target


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def rounds_for_epochs(epochs: float, *, num_clients: int, clients_per_round: int) -> int:
    """Rounds that reach global epoch ``epochs``: ``ceil(epochs * num_clients / clients_per_round)``.

    One global epoch is one pass of the client population in expectation (see the
    module docstring).

    >>> rounds_for_epochs(2, num_clients=100, clients_per_round=10)
    20
    >>> rounds_for_epochs(0.5, num_clients=100, clients_per_round=30)
    2
    """
    if not (isinstance(epochs, int | float) and math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"epochs must be a positive finite number, got {epochs!r}")
    if not (_positive_int(num_clients) and _positive_int(clients_per_round)):
        raise ValueError(
            f"num_clients and clients_per_round must be ints >= 1, got "
            f"{num_clients!r} and {clients_per_round!r}"
        )
    # The small slack keeps e.g. 0.3 * 10 / 1 = 3.0000000000000004 at 3 rounds.
    return max(1, math.ceil(epochs * num_clients / clients_per_round - 1e-9))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAvgTraining:
    """How the server trains: rounds, client sampling and the server step.

    Give the length as ``rounds`` or as global ``epochs`` (exactly one; one global
    epoch is ``num_clients / clients_per_round`` rounds, see the module docstring).

    Attributes:
      rounds: FedAvg rounds to run (total, counting rounds of a resumed run).
      epochs: or the global epoch to reach (:func:`rounds_for_epochs`).
      clients_per_round: clients sampled (without replacement) per round.
      samples: ``M``, images per client.
      protocol: what each client does (:class:`Protocol`; ``fedavg`` for FedAvg,
        ``fedsgd`` makes the server step plain SGD on the clients' mean gradient
        with ``server_lr`` as its learning rate).
      server_lr: ``w <- w - server_lr * mean(update)``; 1.0 is plain FedAvg.
      seed: seeds the partition, the client sampling and the clients' keys.
      eval_every: test accuracy every this many rounds (and after the last).
      num_clients: size of the client population (default: all ``n // samples``).
      dirichlet: ``None`` for an IID partition, or the concentration ``alpha`` of a
        Dirichlet label skew (Hsu et al. 2019; small alpha = few classes per client).

    >>> cfg = FedAvgTraining(epochs=2, clients_per_round=10, samples=50,
    ...                      protocol=Protocol(kind="fedavg", local_batch=10, optimizer="sgd", lr=0.01))
    >>> cfg.total_rounds(num_clients=100)
    20
    """

    rounds: int | None = None
    epochs: float | None = None
    clients_per_round: int
    samples: int
    protocol: Protocol
    server_lr: float = 1.0
    seed: int = 0
    eval_every: int = 10
    num_clients: int | None = None
    dirichlet: float | None = None

    def __post_init__(self):
        if (self.rounds is None) == (self.epochs is None):
            raise ValueError("give the training length as rounds or as epochs (exactly one)")
        if self.rounds is not None and not _positive_int(self.rounds):
            raise ValueError(f"rounds must be an int >= 1, got {self.rounds!r}")
        if self.epochs is not None and not (
            isinstance(self.epochs, int | float) and math.isfinite(self.epochs) and self.epochs > 0
        ):
            raise ValueError(f"epochs must be a positive finite number, got {self.epochs!r}")
        for name in ("clients_per_round", "samples", "eval_every"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.num_clients is not None and not _positive_int(self.num_clients):
            raise ValueError(f"num_clients must be an int >= 1 or None, got {self.num_clients!r}")
        if self.num_clients is not None and self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} exceeds the {self.num_clients} clients"
            )
        if not isinstance(self.protocol, Protocol):
            raise TypeError(f"protocol must be a Protocol, got {type(self.protocol).__name__}")
        if not (
            isinstance(self.server_lr, int | float)
            and math.isfinite(self.server_lr)
            and self.server_lr > 0
        ):
            raise ValueError(f"server_lr must be a positive finite number, got {self.server_lr!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.dirichlet is not None and not (
            isinstance(self.dirichlet, int | float)
            and math.isfinite(self.dirichlet)
            and self.dirichlet > 0
        ):
            raise ValueError(
                f"dirichlet must be a positive finite number or None, got {self.dirichlet!r}"
            )

    def total_rounds(self, num_clients: int) -> int:
        """``rounds``, or the rounds that reach ``epochs`` for a population of ``num_clients``."""
        if self.rounds is not None:
            return self.rounds
        return rounds_for_epochs(
            self.epochs, num_clients=num_clients, clients_per_round=self.clients_per_round
        )

    def global_epoch(self, rounds: int, num_clients: int) -> float:
        """The global epoch after ``rounds`` rounds: ``rounds * clients_per_round / num_clients``."""
        return rounds * self.clients_per_round / num_clients

    def as_meta(self, num_clients: int) -> dict[str, Any]:
        """The settings that fix the trajectory (JSON-ready; a resumed run must repeat them).

        The length (``rounds``/``epochs``) and ``eval_every`` are left out: a run may
        be resumed to train longer or be evaluated more often.
        """
        return {
            "clients_per_round": self.clients_per_round,
            "samples": self.samples,
            "num_clients": int(num_clients),
            "protocol": self.protocol.as_meta(self.samples),
            "server_lr": float(self.server_lr),
            "seed": self.seed,
            "dirichlet": None if self.dirichlet is None else float(self.dirichlet),
        }


# --------------------------------------------------------------------------- clients


def partition(
    labels: Int[np.ndarray, " n"],
    num_clients: int,
    samples: int,
    seed: int,
    *,
    alpha: float | None = None,
) -> Int[np.ndarray, "clients m"]:
    """Splits a training set into ``num_clients`` disjoint clients of ``samples`` images each.

    IID (``alpha=None``): a permutation of the ``n`` indices drawn from ``seed``, cut
    into consecutive blocks (the leftover ``n - num_clients * samples`` images are
    unused). Non-IID: each client draws class proportions ``q ~ Dir(alpha * p)``
    (``p`` the class frequencies of ``labels``) and then each of its images' class from
    ``q`` restricted to the classes with images left (Hsu et al. 2019).

    Args:
      labels: int ``[n]``, the training labels.
      num_clients: clients to form.
      samples: ``M``, images per client.
      seed: the only source of randomness.
      alpha: Dirichlet concentration, or ``None`` for IID.

    Returns:
      int ``[num_clients, M]`` indices into the training set, no index twice.

    Raises:
      ValueError: fewer than ``num_clients * samples`` labels, or bad arguments.

    >>> partition(np.arange(10) % 2, 2, 3, seed=0).shape
    (2, 3)
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be [n], got shape {labels.shape}")
    if not (_positive_int(num_clients) and _positive_int(samples)):
        raise ValueError(
            f"num_clients and samples must be ints >= 1, got {num_clients!r} and {samples!r}"
        )
    if num_clients * samples > labels.shape[0]:
        raise ValueError(
            f"{num_clients} clients of {samples} images need {num_clients * samples} "
            f"training images, got {labels.shape[0]}"
        )
    rng = np.random.default_rng(seed)
    if alpha is None:
        return rng.permutation(labels.shape[0])[: num_clients * samples].reshape(
            num_clients, samples
        )
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number or None, got {alpha!r}")
    classes, counts = np.unique(labels, return_counts=True)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    taken = np.zeros(len(classes), np.int64)
    prior = counts / counts.sum()
    out = np.empty((num_clients, samples), np.int64)
    for i in range(num_clients):
        q = rng.dirichlet(alpha * prior)
        for j in range(samples):
            left = taken < counts
            p = np.where(left, q, 0.0)
            # A client whose favoured classes ran out (or a degenerate draw) takes what is left.
            p = p / p.sum() if np.isfinite(p).all() and p.sum() > 0 else left / left.sum()
            c = rng.choice(len(classes), p=p)
            out[i, j] = pools[c][taken[c]]
            taken[c] += 1
    return out


def sample_clients(
    seed: int, round_index: int, num_clients: int, clients_per_round: int
) -> np.ndarray:
    """The client ids of round ``round_index`` (0-based): a sample without replacement, sorted.

    >>> sample_clients(0, 3, 10, 4).tolist() == sample_clients(0, 3, 10, 4).tolist()
    True
    """
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(num_clients, clients_per_round, replace=False))


def client_keys(seed: int, round_index: int, client_ids) -> PRNGKeyArray:
    """Keys ``[C]`` of the sampled clients: ``fold_in(fold_in(PRNGKey(seed), round), id)``."""
    base = jax.random.fold_in(jax.random.PRNGKey(seed), round_index)
    ids = jnp.asarray(np.asarray(client_ids, np.uint32))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)


# --------------------------------------------------------------------------- one round


@functools.lru_cache(maxsize=16)
def _compiled_round(victim, protocol: Protocol, defenses):
    """One jitted round: gather the clients' images, vmap their updates, average, step.

    The image pool is an argument (not a closure constant), so the training set sits on
    the device once and is not baked into the program.
    """

    def one(variables, images, labels, key):
        result = client_update(
            victim, variables, images, labels, key, protocol=protocol, defenses=defenses
        )
        # The loss at the round's start weights: one forward pass, cheap next to local training.
        loss_key = jax.random.fold_in(key, _LOSS_TAG) if victim.stochastic else None
        loss, _ = victim.batch_loss(variables, images, labels, key=loss_key)
        return result.update, loss, result.finite

    def round_fn(variables, pool_images, pool_labels, index, keys, weights, server_lr):
        images, labels = pool_images[index], pool_labels[index]
        updates, losses, finite = jax.vmap(one, in_axes=(None, 0, 0, 0))(
            variables, images, labels, keys
        )
        w = weights / jnp.sum(weights)
        mean = jax.tree_util.tree_map(lambda u: jnp.tensordot(w, u, axes=1), updates)
        params = jax.tree_util.tree_map(lambda p, u: p - server_lr * u, variables["params"], mean)
        # batch_stats stay as they are: clients train with BatchNorm in inference mode.
        return {**variables, "params": params}, jnp.sum(w * losses), finite

    return jax.jit(round_fn)


def _run_round(
    victim,
    variables,
    pool_images,
    pool_labels,
    index,
    keys,
    weights,
    *,
    protocol,
    defenses,
    server_lr,
):
    from jaxleak.capture.simulate import capture_conv_impl

    # Local training loops over steps: on CPU the victim's im2col convolutions (same parameters
    # and results) are ~20x faster there than XLA's (capture_conv_impl).
    victim = victim.with_conv_impl(capture_conv_impl(victim, "none", protocol=protocol))
    fn = _compiled_round(victim, protocol, defenses)
    weights = (
        jnp.ones(index.shape[0], jnp.float32)
        if weights is None
        else jnp.asarray(weights, jnp.float32)
    )
    return fn(
        dict(variables),
        pool_images,
        pool_labels,
        jnp.asarray(index, jnp.int32),
        keys,
        weights,
        jnp.float32(server_lr),
    )


def fedavg_round(
    victim,
    variables: PyTree,
    client_images: Float[Array, "c m h w ch"],
    client_labels: Int[Array, "c m"],
    keys: PRNGKeyArray,
    *,
    protocol: Protocol,
    server_lr: float = 1.0,
    weights: Float[Array, " c"] | None = None,
    defenses=None,
) -> dict[str, Any]:
    """One FedAvg round: ``C`` clients' updates (vmapped, one jitted call), averaged, applied.

    ``w <- w - server_lr * sum_i (n_i / sum n) update_i`` with ``update_i`` the descent-direction
    update of :func:`jaxleak.protocols.client_update` (``w0 - w1`` for FedAvg); ``batch_stats``
    are left untouched (clients train with BatchNorm in inference mode).

    Args:
      victim: a :class:`jaxleak.models.Victim`.
      variables: the server weights ``w0``.
      client_images: float ``[C, M, H, W, C]`` in [0, 1], the sampled clients' images.
      client_labels: int ``[C, M]``.
      keys: ``[C]`` PRNG keys, one per client.
      protocol: what each client does.
      server_lr: the server step; 1.0 is plain FedAvg.
      weights: ``[C]`` weights of the mean (the clients' sample counts); default equal.
      defenses: optional :class:`jaxleak.defenses.Chain` every client applies.

    Returns:
      The new server variables.

    Raises:
      ValueError: bad shapes, or a client whose update is not finite.

    >>> import jax, jax.numpy as jnp
    >>> from jaxleak.models import get_victim
    >>> v = get_victim("mlp", image_shape=(4, 4, 1), num_classes=2, hidden=3)
    >>> w0 = v.init(jax.random.key(0))
    >>> x, y = jnp.zeros((2, 3, 4, 4, 1)), jnp.zeros((2, 3), jnp.int32)
    >>> keys = jax.random.split(jax.random.PRNGKey(0), 2)
    >>> p = Protocol(kind="fedavg", local_batch=3, optimizer="sgd", lr=0.1)
    >>> w1 = fedavg_round(v, w0, x, y, keys, protocol=p)
    >>> jax.tree_util.tree_structure(w1) == jax.tree_util.tree_structure(w0)
    True
    """
    client_images = jnp.asarray(client_images, jnp.float32)
    client_labels = jnp.asarray(client_labels, jnp.int32)
    if client_images.ndim != 5 or tuple(client_images.shape[2:]) != tuple(victim.image_shape):
        raise ValueError(
            f"client_images must be [C, M, {', '.join(map(str, victim.image_shape))}], "
            f"got {tuple(client_images.shape)}"
        )
    c, m = client_images.shape[:2]
    if client_labels.shape != (c, m):
        raise ValueError(
            f"client_labels must be [C, M] = [{c}, {m}], got {tuple(client_labels.shape)}"
        )
    if weights is not None and np.shape(weights) != (c,):
        raise ValueError(f"weights must be [C] = [{c}], got shape {np.shape(weights)}")
    index = np.arange(c * m).reshape(c, m)
    new, _, finite = _run_round(
        victim,
        variables,
        client_images.reshape(c * m, *victim.image_shape),
        client_labels.reshape(c * m),
        index,
        keys,
        weights,
        protocol=protocol,
        defenses=defenses,
        server_lr=server_lr,
    )
    bad = np.flatnonzero(~np.asarray(finite))
    if bad.size:
        raise ValueError(
            f"client {int(bad[0])} of the round produced a NaN or inf update "
            f"({bad.size} such client(s))"
        )
    return new


# --------------------------------------------------------------------------- evaluation


_EVAL_CHUNK = 256


@functools.lru_cache(maxsize=16)
def _compiled_eval(victim):
    """``(variables, images [n_chunks, chunk, ...], labels, valid) -> (loss sum, correct)``, jitted.

    Compiled once per victim and test-set shape, so evaluating every few rounds costs
    forward passes only (``jaxleak.models.evaluate_victim`` traces anew on every call).
    """

    def chunk(variables, batch):
        x, y, valid = batch
        logits = victim.apply(variables, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y) & valid
        return jnp.sum(jnp.where(valid, loss, 0.0)), jnp.sum(correct)

    def sums(variables, images, labels, valid):
        losses, correct = jax.lax.map(lambda b: chunk(variables, b), (images, labels, valid))
        return jnp.sum(losses), jnp.sum(correct)

    return jax.jit(sums)


def _test_set(images: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The test set on the device once, cut into padded chunks of the evaluation batch."""
    n = images.shape[0]
    size = min(_EVAL_CHUNK, n)
    chunks = -(-n // size)
    pad = chunks * size - n
    x = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    y = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    valid = np.arange(chunks * size) < n
    return (
        jax.device_put(x.reshape(chunks, size, *images.shape[1:])),
        jax.device_put(y.reshape(chunks, size)),
        jax.device_put(valid.reshape(chunks, size)),
    )


def _evaluate(victim, variables, test: tuple[jax.Array, jax.Array, jax.Array]) -> dict[str, float]:
    loss, correct = _compiled_eval(victim)(variables, *test)
    n = float(jnp.sum(test[2]))
    return {"loss": float(loss) / n, "accuracy": int(correct) / n}


# --------------------------------------------------------------------------- training


def _check_data(victim, images, labels, what: str) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(victim.image_shape):
        raise ValueError(
            f"{what} images must be [n, {', '.join(map(str, victim.image_shape))}], "
            f"got {images.shape}"
        )
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{what} labels must be {images.shape[0]} integers, got shape {labels.shape} "
            f"dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= victim.num_classes):
        raise ValueError(
            f"{what} labels must lie in [0, {victim.num_classes}), got "
            f"{labels.min()}..{labels.max()}"
        )
    return images, labels.astype(np.int32)


def _write_history(out: Path, document: dict[str, Any]) -> None:
    """``out/history.json``, replaced atomically so a reader never sees half a file."""
    tmp = out / f".{HISTORY_FILE}.tmp"
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, out / HISTORY_FILE)


def train_fedavg(
    victim,
    variables: PyTree,
    train_images: Float[np.ndarray, "n h w c"],
    train_labels: Int[np.ndarray, " n"],
    *,
    config: FedAvgTraining,
    test_images: Float[np.ndarray, "t h w c"] | None = None,
    test_labels: Int[np.ndarray, " t"] | None = None,
    defenses=None,
    out: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    keep: int = 2,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Trains ``variables`` by FedAvg over a partition of the training set into clients.

    Round ``r`` samples ``clients_per_round`` clients of the partition (see the module
    docstring for the keys), runs :func:`fedavg_round` and records the clients' mean
    training loss at the round's start weights; test accuracy is evaluated every
    ``eval_every`` rounds and after the last. One global epoch is
    ``num_clients / clients_per_round`` rounds (one pass of the population in expectation).

    With ``out``, the folder is a ``"victim"`` training run (:mod:`jaxleak.artifacts`):
    ``config.json`` holds the model's identity and the FedAvg settings, ``steps/<round>/``
    the variables after that round (every ``checkpoint_every`` rounds and after the last;
    the newest ``keep`` kept) with the history so far, and ``history.json`` the history.
    :func:`jaxleak.models.load_variables` reads the newest round's weights from it, so
    ``jaxleak capture --victim-checkpoint OUT`` attacks the trained model.

    Args:
      victim: a :class:`jaxleak.models.Victim`.
      variables: the initial server weights (also when resuming: their digest is checked).
      train_images: float ``[n, H, W, C]`` in [0, 1], the population's images.
      train_labels: int ``[n]``.
      config: :class:`FedAvgTraining`.
      test_images: optional float ``[t, H, W, C]`` for the test accuracy.
      test_labels: int ``[t]``.
      defenses: optional :class:`jaxleak.defenses.Chain` every client applies (e.g. the
        FM paper's Gaussian noise on the update, whose accuracy cost its Table 1 reports).
      out: run folder (``None``: no checkpoints).
      resume: continue the run in ``out`` from its newest checkpoint (a missing ``out``
        starts a new run); the result equals an uninterrupted run's. Without it an
        existing run in ``out`` is an error.
      checkpoint_every: rounds between checkpoints (default ``eval_every``).
      keep: checkpoints kept (the newest).
      progress: a progress bar over rounds with the last accuracy.

    Returns:
      ``(variables, history)``: the final weights and one dict per round with
      ``round``, ``global_epoch``, ``train_loss``, ``wall_s`` (cumulative over sessions)
      and, on evaluated rounds, ``test_accuracy`` and ``test_loss``.

    Raises:
      ValueError: bad data or settings, a non-finite client update (naming the round and
        client), or a run in ``out`` that was started with other settings or initial
        weights, or is already past the requested rounds.
      jaxleak.artifacts.ArtifactError: ``out`` is occupied by something else.

    >>> import numpy as np, jax
    >>> from jaxleak.models import get_victim
    >>> v = get_victim("mlp", image_shape=(2, 2, 1), num_classes=2, hidden=4)
    >>> x = np.random.default_rng(0).random((16, 2, 2, 1), dtype=np.float32)
    >>> y = (x.mean((1, 2, 3)) > 0.5).astype(np.int32)
    >>> cfg = FedAvgTraining(epochs=1, clients_per_round=2, samples=4, eval_every=1,
    ...                      protocol=Protocol(kind="fedavg", local_batch=2, optimizer="sgd", lr=0.1))
    >>> w, history = train_fedavg(v, v.init(jax.random.key(0)), x, y, config=cfg,
    ...                           test_images=x, test_labels=y, progress=False)
    >>> [h["round"] for h in history], history[-1]["global_epoch"]
    ([1, 2], 1.0)
    """
    from jaxleak import artifacts

    images, labels = _check_data(victim, train_images, train_labels, "training")
    if (test_images is None) != (test_labels is None):
        raise ValueError("give test_images and test_labels together")
    if test_images is not None:
        test_images, test_labels = _check_data(victim, test_images, test_labels, "test")
        if test_images.shape[0] == 0:
            raise ValueError("the test set is empty")
    checkpoint_every = config.eval_every if checkpoint_every is None else checkpoint_every
    if not _positive_int(checkpoint_every) or not _positive_int(keep):
        raise ValueError(
            f"checkpoint_every and keep must be ints >= 1, got {checkpoint_every!r} and {keep!r}"
        )
    num_clients = config.num_clients or images.shape[0] // config.samples
    if num_clients < 1:
        raise ValueError(
            f"{images.shape[0]} training images cannot form one client of {config.samples}"
        )
    if config.clients_per_round > num_clients:
        raise ValueError(
            f"clients_per_round={config.clients_per_round} exceeds the {num_clients} clients"
        )
    total = config.total_rounds(num_clients)
    clients = partition(labels, num_clients, config.samples, config.seed, alpha=config.dirichlet)
    variables = dict(variables)

    run_config = {
        **victim.metadata(),
        "fedavg": config.as_meta(num_clients),
        "defenses": [] if defenses is None else defenses.meta,
        "train_size": int(images.shape[0]),
        "init_digest": artifacts.tree_digest(jax.device_get(variables)),
    }
    start, history, steps = 0, [], None
    if out is not None:
        out = Path(out).absolute()
        if resume and (out / artifacts.CONFIG_FILE).is_file():
            artifacts.resume_run(out, kind="victim", expect=run_config)
            steps = artifacts.StepCheckpoints(out, max_to_keep=keep)
            if steps.latest_step() is not None:
                tree, extra, start = steps.restore(target=victim.abstract_variables())
                if start > total:
                    steps.close()
                    raise ValueError(
                        f"{out} is already at round {start}, past the {total} requested"
                    )
                # Host copies, put back uncommitted like ``victim.init``'s: orbax's committed
                # arrays would miss the compiled round's cache (a recompile per session).
                variables = jax.device_put(dict(jax.device_get(tree)))
                history = [h for h in extra.get("history", []) if h["round"] <= start]
        else:
            artifacts.start_run(out, kind="victim", config=run_config, extra={"trainer": "fedavg"})
            steps = artifacts.StepCheckpoints(out, max_to_keep=keep)

    pool_images, pool_labels = jax.device_put(images), jax.device_put(labels)
    test = None if test_images is None else _test_set(test_images, test_labels)
    wall_before = history[-1]["wall_s"] if history else 0.0
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total, initial=start, desc=f"fedavg {victim.name}", unit="round", disable=not progress
    )
    last_accuracy = next(
        (h["test_accuracy"] for h in reversed(history) if "test_accuracy" in h), None
    )
    try:
        for r in range(start, total):
            ids = sample_clients(config.seed, r, num_clients, config.clients_per_round)
            variables, loss, finite = _run_round(
                victim,
                variables,
                pool_images,
                pool_labels,
                clients[ids],
                client_keys(config.seed, r, ids),
                None,
                protocol=config.protocol,
                defenses=defenses,
                server_lr=config.server_lr,
            )
            bad = np.flatnonzero(~np.asarray(finite))
            if bad.size:
                raise ValueError(
                    f"round {r + 1}: client {int(ids[bad[0]])} produced a NaN or inf update "
                    f"({bad.size} such client(s)); lower the learning rates"
                )
            done = r + 1
            entry = {
                "round": done,
                "global_epoch": config.global_epoch(done, num_clients),
                "train_loss": float(loss),
            }
            if test_images is not None and (done % config.eval_every == 0 or done == total):
                metrics = _evaluate(victim, variables, test)
                entry.update(test_accuracy=metrics["accuracy"], test_loss=metrics["loss"])
                last_accuracy = metrics["accuracy"]
            entry["wall_s"] = wall_before + time.perf_counter() - t0
            history.append(entry)
            bar.update(1)
            postfix = {"loss": f"{entry['train_loss']:.4f}"}
            if last_accuracy is not None:
                postfix["acc"] = f"{last_accuracy:.4f}"
            bar.set_postfix(postfix)
            if steps is not None and (done % checkpoint_every == 0 or done == total):
                extra = {
                    "round": done,
                    "global_epoch": entry["global_epoch"],
                    "rounds": total,
                    "num_clients": num_clients,
                    "history": history,
                }
                steps.save_step(done, variables, extra=extra)
                _write_history(out, {"config": run_config, "rounds": total, "history": history})
    finally:
        bar.close()
        if steps is not None:
            steps.close()
    return variables, history
