"""Training victims (so audits can attack trained weights) and saving / loading them.

Checkpoints are directories::

    <path>/variables/       orbax StandardCheckpointer checkpoint of the Flax variables
    <path>/metadata.json    {"format", "model", "image_shape", "num_classes", "options", ...}

``load_variables`` refuses a checkpoint whose model name, image shape, class
count or options differ from the victim it is loaded into.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jaxtyping import Array, Float, Int, PyTree

from jaxleak.models._victim import Victim, get_victim

_FORMAT = "jaxleak-variables-v1"
_METADATA_FILE = "metadata.json"
_VARIABLES_DIR = "variables"
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
    victim: Victim, params: PyTree, batch_stats: PyTree, images: jax.Array, labels: jax.Array
) -> tuple[jax.Array, PyTree]:
    variables = {"params": params}
    if victim.has_batch_stats:
        variables["batch_stats"] = batch_stats
    logits, new_batch_stats = victim.apply(variables, images, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, new_batch_stats


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
        state: _TrainState, images: jax.Array, labels: jax.Array, indices: jax.Array
    ) -> tuple[_TrainState, jax.Array]:
        (loss, batch_stats), grads = jax.value_and_grad(
            lambda p: _batch_loss(victim, p, state.batch_stats, images[indices], labels[indices]),
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
        state, loss = step(state, images, labels, jnp.asarray(indices))
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


def save_variables(
    path: str | Path,
    variables: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Saves Flax variables with orbax and ``metadata`` as JSON beside them.

    Args:
      path: checkpoint directory to create.
      variables: ``{"params": ..., ["batch_stats": ...]}``.
      metadata: JSON-serialisable; must contain ``victim.metadata()``'s keys
        (``model``, ``image_shape``, ``num_classes``, ``options``), e.g.
        ``{**victim.metadata(), "steps": 1000}``.
      overwrite: replace an existing jaxleak checkpoint at ``path``.

    Returns:
      The absolute checkpoint directory.

    Raises:
      ValueError: missing metadata keys, non-JSON metadata, no ``params``, or
        ``path`` exists (and is not a jaxleak checkpoint or ``overwrite`` is off).

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
    try:
        text = json.dumps({"format": _FORMAT, **metadata}, indent=2, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serialisable: {error}") from error
    if path.exists():
        if not (path / _METADATA_FILE).is_file():
            raise ValueError(f"{path} exists and is not a jaxleak checkpoint; refusing to touch it")
        if not overwrite:
            raise ValueError(
                f"{path} already holds a checkpoint; pass overwrite=True to replace it"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    tree = {name: collection for name, collection in variables.items()}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / _VARIABLES_DIR, tree)
        checkpointer.wait_until_finished()
    # Written last: its presence marks a complete checkpoint.
    (path / _METADATA_FILE).write_text(text + "\n")
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint written by :func:`save_variables`.

    Raises:
      ValueError: if ``path`` is not a (complete) jaxleak checkpoint.
    """
    file = Path(path).absolute() / _METADATA_FILE
    if not file.is_file():
        raise ValueError(f"{Path(path)} is not a jaxleak checkpoint (no {_METADATA_FILE})")
    metadata = json.loads(file.read_text())
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{file}: unknown format {metadata.get('format')!r}, expected {_FORMAT}")
    return metadata


def _resolved_identity(metadata: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The stored model's identity with defaults filled in, by rebuilding it.

    Options may be stored partially (``{}`` for a default-width ConvNet, or an
    MLP's ``width`` instead of ``hidden``); rebuilding resolves them to the
    canonical form of ``Victim.metadata()``.
    """
    options = dict(metadata.get("options") or {})
    unknown = sorted(set(options) - {"width", "hidden"})
    if unknown:
        raise ValueError(f"checkpoint {Path(path)}: unknown model options {unknown}")
    if isinstance(options.get("hidden"), list):
        options["hidden"] = tuple(options["hidden"])
    try:
        stored = get_victim(
            metadata["model"],
            image_shape=metadata["image_shape"],
            num_classes=metadata["num_classes"],
            **options,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"checkpoint {Path(path)} describes a model that cannot be built: {error}"
        ) from error
    return json.loads(json.dumps(stored.metadata()))


def load_variables(path: str | Path, victim: Victim) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads variables saved by :func:`save_variables` into ``victim``'s structure.

    Args:
      path: checkpoint directory.
      victim: the model they are for; its name, image shape, class count and
        options must equal the stored ones.

    Returns:
      ``(variables, metadata)``.

    Raises:
      ValueError: not a checkpoint, or saved for a different model.
    """
    metadata = read_metadata(path)
    stored = _resolved_identity(metadata, path)
    expected = json.loads(json.dumps(victim.metadata()))
    differences = [
        f"{key}: checkpoint has {stored[key]!r}, victim has {expected[key]!r}"
        for key in _IDENTITY_KEYS
        if stored[key] != expected[key]
    ]
    if differences:
        raise ValueError(
            f"checkpoint {Path(path)} was saved for a different model: " + "; ".join(differences)
        )
    target = victim.abstract_variables()
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(Path(path).absolute() / _VARIABLES_DIR, target)
    return dict(variables), metadata
