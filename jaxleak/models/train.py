"""Training victims (so audits can attack trained weights) and saving / loading them.

Checkpoints are ``"victim"`` artifacts (:mod:`jaxleak.artifacts`): the Flax
variables under orbax and a ``config.json`` whose config is the model's identity
(``model``, ``image_shape``, ``num_classes``, ``options``) and whose extra is the
rest of the metadata (dataset, steps, ...). ``load_variables`` refuses a
checkpoint whose identity differs from the victim it is loaded into.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PyTree

from jaxleak import artifacts
from jaxleak.models._victim import Victim, get_victim

KIND = "victim"
_IDENTITY_KEYS = ("model", "image_shape", "num_classes", "options")
_OPTIMIZERS = {"adam": optax.adam, "sgd": optax.sgd}


class _TrainState(NamedTuple):
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState


def _check_data(
    victim: Victim, images: Float[Array, "n h w c"], labels: Int[Array, " n"]
) -> tuple[jax.Array, jax.Array]:
    images = jnp.asarray(images, jnp.float32)
    labels = np.asarray(labels)
    if images.ndim != 4 or tuple(images.shape[1:]) != victim.image_shape:
        raise ValueError(
            f"images must have shape (n, {', '.join(map(str, victim.image_shape))}), "
            f"got {tuple(images.shape)}"
        )
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be {images.shape[0]} integers (one per image), got shape "
            f"{labels.shape} dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= victim.num_classes):
        raise ValueError(
            f"labels must lie in [0, {victim.num_classes}), got {labels.min()}..{labels.max()}"
        )
    return images, jnp.asarray(labels, jnp.int32)


def _batch_loss(
    victim: Victim, params: PyTree, batch_stats: PyTree, images: jax.Array, labels: jax.Array, key: jax.Array
) -> tuple[jax.Array, PyTree]:
    variables = {"params": params}
    if victim.has_batch_stats:
        variables["batch_stats"] = batch_stats
    # PRECODE samples its bottleneck from the step's key and adds its KL term.
    return victim.batch_loss(variables, images, labels, train=True,
                             key=key if victim.stochastic else None)


def _batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Indices ``[steps, batch_size]``: reshuffled epochs, the ragged tail of each dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = num_examples // batch_size
    epochs = math.ceil(steps / per_epoch)
    order = [rng.permutation(num_examples)[: per_epoch * batch_size] for _ in range(epochs)]
    return np.concatenate(order).reshape(-1, batch_size)[:steps]


def train_victim(
    victim: Victim,
    images: Float[Array, "n h w c"],
    labels: Int[Array, " n"],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    optimizer: str = "adam",
    variables: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Trains a victim with mini-batch cross-entropy (BatchNorm in training mode).

    Batches are drawn without replacement within each epoch (the last partial
    batch of an epoch is dropped so every step has the same shape and one
    compiled step serves all).

    Args:
      victim: the model.
      images: NHWC training images ``(n, *victim.image_shape)``.
      labels: integer labels in ``[0, K)``.
      steps: optimiser steps (> 0).
      batch_size: examples per step, ``1 <= batch_size <= n``.
      learning_rate: step size (> 0).
      seed: seeds both the initialisation and the batch order.
      optimizer: ``"adam"`` or ``"sgd"`` (plain, no momentum).
      variables: start from these instead of a fresh ``victim.init``.
      progress: show a tqdm progress bar with the running loss.

    Returns:
      The trained variables ``{"params": ..., ["batch_stats": ...]}``.

    Raises:
      ValueError: bad shapes, labels or hyperparameters.

    >>> import numpy as np
    >>> from jaxleak.models import get_victim
    >>> victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=2, hidden=8)
    >>> x = np.random.default_rng(0).random((8, 4, 4, 1), dtype=np.float32)
    >>> variables = train_victim(victim, x, np.arange(8) % 2, steps=3, batch_size=4,
    ...                          learning_rate=1e-2, seed=0)
    >>> sorted(variables)
    ['params']
    """
    images, labels = _check_data(victim, images, labels)
    num_examples = images.shape[0]
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= num_examples:
        raise ValueError(f"batch_size must be an int in [1, {num_examples}], got {batch_size!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")

    init_key = jax.random.key(seed)
    variables = dict(victim.init(init_key) if variables is None else variables)
    tx = _OPTIMIZERS[optimizer](learning_rate)
    params = variables["params"]
    state = _TrainState(params, variables.get("batch_stats", {}), tx.init(params))

    # The data are arguments, not closure constants, so large sets are not baked into the program.
    @jax.jit
    def step(
        state: _TrainState, images: jax.Array, labels: jax.Array, indices: jax.Array, key: jax.Array
    ) -> tuple[_TrainState, jax.Array]:
        (loss, batch_stats), grads = jax.value_and_grad(
            lambda p: _batch_loss(victim, p, state.batch_stats, images[indices], labels[indices], key),
            has_aux=True,
        )(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return _TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), loss

    order = _batch_order(num_examples, batch_size, steps, seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"train {victim.name}", unit="step")
    for i, indices in enumerate(order):
        state, loss = step(state, images, labels, jnp.asarray(indices), jax.random.fold_in(init_key, i + 1))
        if bar is not None:
            bar.update(1)
            if (
                i % 10 == 0 or i == steps - 1
            ):  # reading the loss waits for the device: not every step
                bar.set_postfix(loss=f"{float(loss):.4f}")
    if bar is not None:
        bar.close()

    trained = {"params": state.params}
    if victim.has_batch_stats:
        trained["batch_stats"] = state.batch_stats
    return trained


def evaluate_victim(
    victim: Victim,
    variables: Mapping[str, Any],
    images: Float[Array, "n h w c"],
    labels: Int[Array, " n"],
    *,
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy in inference mode (BatchNorm running statistics).

    Args:
      victim: the model.
      variables: its variables.
      images: NHWC images.
      labels: integer labels.
      batch_size: chunk size for the forward passes.

    Returns:
      ``{"loss": mean cross-entropy, "accuracy": share of correct argmax}``.

    Raises:
      ValueError: bad shapes or labels, or no images.
    """
    images, labels = _check_data(victim, images, labels)
    if images.shape[0] == 0:
        raise ValueError("evaluate_victim needs at least one image")

    @jax.jit
    def sums(variables: PyTree, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = victim.apply(variables, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
        return loss, (jnp.argmax(logits, -1) == y).sum()

    total_loss, total_correct = 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        loss, correct = sums(
            variables, images[start : start + batch_size], labels[start : start + batch_size]
        )
        total_loss += float(loss)
        total_correct += int(correct)
    return {"loss": total_loss / images.shape[0], "accuracy": total_correct / images.shape[0]}


def _canonical_identity(identity: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A model's identity with defaults filled in, by rebuilding it.

    Options may be given partially (``{}`` for a default-width ConvNet, or an
    MLP's ``width`` instead of ``hidden``); rebuilding resolves them to the
    canonical form of ``Victim.metadata()``.
    """
    options = dict(identity.get("options") or {})
    if isinstance(options.get("hidden"), list):
        options["hidden"] = tuple(options["hidden"])
    try:
        stored = get_victim(
            identity["model"],
            image_shape=identity["image_shape"],
            num_classes=identity["num_classes"],
            **options,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where} describes a model that cannot be built: {error}") from error
    return json.loads(json.dumps(stored.metadata()))


def save_variables(
    path: str | Path,
    variables: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Saves Flax variables as a ``"victim"`` artifact (:mod:`jaxleak.artifacts`).

    The model's identity (``model``, ``image_shape``, ``num_classes``,
    ``options``, resolved to its canonical form) is the artifact's config; the
    rest of ``metadata`` (dataset, steps, ...) its extra description.

    Args:
      path: checkpoint directory to create (atomically).
      variables: ``{"params": ..., ["batch_stats": ...]}``.
      metadata: JSON-serialisable; must contain ``victim.metadata()``'s keys
        (``model``, ``image_shape``, ``num_classes``, ``options``), e.g.
        ``{**victim.metadata(), "steps": 1000}``.
      overwrite: replace an existing jaxleak checkpoint at ``path``.

    Returns:
      The absolute checkpoint directory.

    Raises:
      ValueError: missing metadata keys, non-JSON metadata, no ``params``, a
        model that cannot be built, or ``path`` exists (and is not a jaxleak
        checkpoint or ``overwrite`` is off).

    >>> import tempfile, jax
    >>> from jaxleak.models import get_victim
    >>> victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=2, hidden=4)
    >>> variables = victim.init(jax.random.key(0))
    >>> path = save_variables(tempfile.mkdtemp() + "/ckpt", variables,
    ...                       metadata={**victim.metadata(), "note": "untrained"})
    >>> loaded, metadata = load_variables(path, victim)
    >>> metadata["model"], metadata["options"], metadata["note"]
    ('mlp', {'hidden': [4]}, 'untrained')
    """
    path = Path(path).absolute()
    missing = [key for key in _IDENTITY_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {missing}; start from victim.metadata()")
    if "params" not in variables:
        raise ValueError(f"variables must hold a 'params' collection, got {sorted(variables)}")
    if path.exists() and (path / artifacts.CONFIG_FILE).is_file() and not overwrite:
        raise ValueError(f"{path} already holds a checkpoint; pass overwrite=True to replace it")
    identity = _canonical_identity(metadata, "metadata")
    extra = {key: value for key, value in metadata.items() if key not in _IDENTITY_KEYS}
    tree = {name: collection for name, collection in variables.items()}
    return artifacts.save_artifact(
        path, kind=KIND, config=identity, tree=tree, extra=extra, force=overwrite
    )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint written by :func:`save_variables` (identity and description).

    Raises:
      ValueError: if ``path`` is not a (complete) jaxleak victim checkpoint.
    """
    info = artifacts.read_artifact(path, kind=KIND)
    return {**info.extra, **info.config}


def load_variables(path: str | Path, victim: Victim, *, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads variables saved by :func:`save_variables` into ``victim``'s structure.

    Args:
      path: checkpoint directory.
      victim: the model they are for; its name, image shape, class count and
        options must equal the stored ones.
      step: a training run's saved step (e.g. a ``train_fedavg`` round; default: the final
        arrays, else the latest step).

    Returns:
      ``(variables, metadata)``.

    Raises:
      ValueError: not a checkpoint, or saved for a different model.
    """
    metadata = read_metadata(path)
    stored = _canonical_identity(metadata, f"checkpoint {Path(path)}")
    expected = json.loads(json.dumps(victim.metadata()))
    differences = [
        f"{key}: checkpoint has {stored[key]!r}, victim has {expected[key]!r}"
        for key in _IDENTITY_KEYS
        if stored[key] != expected[key]
    ]
    if differences:
        raise artifacts.ArtifactError(
            f"checkpoint {Path(path)} was saved for a different model: " + "; ".join(differences)
        )
    variables = artifacts.load_artifact(path, kind=KIND, target=victim.abstract_variables(), step=step).tree
    return dict(variables), metadata
