"""One store for everything jaxleak trains: victims, recovery networks, denoisers, priors.

An artifact is a folder::

    DIR/config.json     strict JSON: {"format", "kind", "config", "extra", "jaxleak_version"}
    DIR/arrays/         orbax checkpoint of the array tree (a finished artifact)
    DIR/steps/<step>/   orbax checkpoints of a resumable training run (the last few kept)

``kind`` names what the arrays are (``"victim"``, ``"recovery/venom"``,
``"recovery/venom-diff"``, ``"recovery/fgla"``, ``"denoiser/mjolnir"``,
``"prior/flow"``); ``config`` is what rebuilds the module that reads them (and is
compared with what a caller expects); ``extra`` is free-form description (training
data, steps, loss). Loading refuses, with one :class:`ArtifactError` line, a folder
that does not exist or is not an artifact, another kind, or a config that differs
from the caller's expectation (naming every differing key).

Atomicity: :func:`save_artifact` writes into a hidden temporary folder next to
``DIR`` and renames it into place, so a failed or killed save leaves no ``DIR``
(and, with ``force``, the previous artifact intact until the rename). A training
run's folder is created with its ``config.json`` the same way; each step is
written by orbax's ``CheckpointManager``, which saves into a temporary folder and
renames it once complete, so a killed step is never restored.

>>> import tempfile, numpy as np
>>> folder = tempfile.mkdtemp() + "/net"
>>> _ = save_artifact(folder, kind="prior/flow", config={"width": 4},
...                   tree={"w": np.ones(3, np.float32)}, extra={"steps": 10})
>>> tree, config, extra = load_artifact(folder, kind="prior/flow", expect={"width": 4})
>>> tree["w"].tolist(), config, extra["steps"]
([1.0, 1.0, 1.0], {'width': 4}, 10)
>>> load_artifact(folder, kind="prior/flow", expect={"width": 8})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
jaxleak.artifacts.ArtifactError: prior/flow checkpoint ... width: checkpoint has 4, expected 8
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree

from jaxleak._version import __version__

FORMAT = "jaxleak-artifact-v1"
CONFIG_FILE = "config.json"
ARRAYS_DIR = "arrays"
STEPS_DIR = "steps"


class ArtifactError(ValueError):
    """A missing, foreign or mismatched artifact folder (the message is one line)."""


class ArtifactInfo(NamedTuple):
    """The parsed ``config.json`` of an artifact folder.

    Attributes:
      kind: what the arrays are (``"victim"``, ``"recovery/venom"``, ...).
      config: what rebuilds the module.
      extra: free-form description.
      version: the jaxleak version that wrote it.
    """

    kind: str
    config: dict[str, Any]
    extra: dict[str, Any]
    version: str


class Artifact(NamedTuple):
    """What :func:`load_artifact` returns (unpacks as ``tree, config, extra``).

    ``extra`` holds the stored description; for a training run also the step's
    own description (e.g. the loss history) and ``"step"``, the step restored.
    """

    tree: PyTree
    config: dict[str, Any]
    extra: dict[str, Any]


# --------------------------------------------------------------------------- JSON


def _strict_json(value: Any, what: str) -> Any:
    """``value`` after a strict JSON round trip (tuples become lists; NaN and inf refused)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ArtifactError(f"{what} must be strict JSON (no NaN/inf): {error}") from None


def differences(stored: Any, expected: Any, prefix: str = "") -> list[str]:
    """``"key: checkpoint has X, expected Y"`` for every key of ``expected`` that differs.

    Nested dicts are compared key by key (dotted names); keys of ``stored`` absent
    from ``expected`` are not compared, so ``expected`` may name only what matters.

    >>> differences({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": 5}})
    ['b.c: checkpoint has 2, expected 5']
    """
    if isinstance(expected, dict):
        if not isinstance(stored, dict):
            name = prefix.rstrip(".") or "config"
            return [f"{name}: checkpoint has {stored!r}, expected {expected!r}"]
        out = []
        for key in sorted(expected):
            out += differences(stored.get(key, _MISSING), expected[key], f"{prefix}{key}.")
        return out
    if stored is _MISSING:
        return [f"{prefix.rstrip('.')}: checkpoint lacks it, expected {expected!r}"]
    if stored != expected:
        return [f"{prefix.rstrip('.')}: checkpoint has {stored!r}, expected {expected!r}"]
    return []


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _header(kind: str, config: Mapping[str, Any], extra: Mapping[str, Any] | None) -> str:
    if not isinstance(kind, str) or not kind:
        raise ArtifactError(f"kind must be a non-empty string, got {kind!r}")
    header = {
        "format": FORMAT,
        "kind": kind,
        "config": _strict_json(dict(config), "config"),
        "extra": _strict_json(dict(extra or {}), "extra"),
        "jaxleak_version": __version__,
    }
    return json.dumps(header, indent=2, sort_keys=True, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- reading


def _kinds(kind: str | Sequence[str] | None) -> tuple[str, ...] | None:
    return None if kind is None else (kind,) if isinstance(kind, str) else tuple(kind)


def read_artifact(
    directory: str | Path, *, kind: str | Sequence[str] | None = None
) -> ArtifactInfo:
    """The ``config.json`` of an artifact folder, checked (no arrays read).

    Args:
      directory: the artifact folder.
      kind: when given, the kind (or one of the kinds) it must hold.

    Returns:
      An :class:`ArtifactInfo`.

    Raises:
      ArtifactError: no such folder, not an artifact, unreadable, or another kind.

    >>> read_artifact("/no/such/folder")
    Traceback (most recent call last):
    ...
    jaxleak.artifacts.ArtifactError: /no/such/folder does not exist
    """
    directory = Path(directory)
    if not directory.exists():
        raise ArtifactError(f"{directory} does not exist")
    file = directory / CONFIG_FILE
    if not directory.is_dir() or not file.is_file():
        raise ArtifactError(f"{directory} is not a jaxleak checkpoint (no {CONFIG_FILE})")
    try:
        header = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{file} is not readable JSON: {error}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ArtifactError(f"{file}: unknown format {found!r}, expected {FORMAT}")
    info = ArtifactInfo(
        kind=str(header.get("kind")),
        config=dict(header.get("config") or {}),
        extra=dict(header.get("extra") or {}),
        version=str(header.get("jaxleak_version")),
    )
    kinds = _kinds(kind)
    if kinds is not None and info.kind not in kinds:
        wanted = " or ".join(repr(k) for k in kinds)
        raise ArtifactError(f"{directory} holds a {info.kind!r} checkpoint, not {wanted}")
    return info


def check_config(
    directory: str | Path, info: ArtifactInfo, expect: Mapping[str, Any] | None
) -> None:
    """A one-line :class:`ArtifactError` naming each key where config and ``expect`` differ."""
    if expect is None:
        return
    diffs = differences(info.config, _strict_json(dict(expect), "expect"))
    if diffs:
        raise ArtifactError(
            f"{info.kind} checkpoint {directory} was saved for another configuration: "
            + "; ".join(diffs)
        )


def load_artifact(
    directory: str | Path,
    *,
    kind: str | Sequence[str],
    expect: Mapping[str, Any] | None = None,
    target: PyTree | None = None,
    step: int | None = None,
) -> Artifact:
    """Loads an artifact saved by :func:`save_artifact` (or a training run's latest step).

    Args:
      directory: the artifact folder.
      kind: the kind it must hold (or a sequence of acceptable kinds).
      expect: config values the caller requires (nested dicts compared key by
        key; keys not named are not compared).
      target: the tree's structure, shapes and dtypes (e.g. ``jax.eval_shape``
        of an initialiser); ``None`` restores the stored structure as is.
      step: a training run's step to restore (default: the finished arrays, or
        else the latest step).

    Returns:
      ``Artifact(tree, config, extra)``.

    Raises:
      ArtifactError: a missing or foreign folder, another kind, a config that
        differs from ``expect``, no arrays saved yet, or arrays that do not fit
        ``target``.
    """
    directory = Path(directory).absolute()
    info = read_artifact(directory, kind=kind)
    check_config(directory, info, expect)
    arrays = directory / ARRAYS_DIR
    if step is None and arrays.is_dir():
        try:
            with ocp.StandardCheckpointer() as checkpointer:
                tree = checkpointer.restore(arrays, target)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
            message = f"{directory}: the stored arrays do not fit: {error}"
            raise ArtifactError(_one_line(message)) from None
        return Artifact(tree, info.config, info.extra)
    if not (directory / STEPS_DIR).is_dir():
        raise ArtifactError(f"{directory} holds no arrays yet (a training run with no step saved)")
    with StepCheckpoints(directory) as steps:
        tree, step_extra, restored = steps.restore(target=target, step=step)
    return Artifact(tree, info.config, {**info.extra, **step_extra, "step": restored})


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- writing


def _temporary_sibling(directory: Path, tag: str) -> Path:
    return directory.parent / f".{directory.name}.{tag}-{uuid.uuid4().hex[:12]}"


def _check_replaceable(directory: Path, force: bool) -> None:
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ArtifactError(f"{directory} exists and is not a folder; refusing to touch it")
    if not (directory / CONFIG_FILE).is_file():
        raise ArtifactError(
            f"{directory} exists and is not a jaxleak checkpoint; refusing to touch it"
        )
    if not force:
        raise ArtifactError(
            f"{directory} already holds a checkpoint; pass force=True (--force) to replace it"
        )


def check_target(directory: str | Path, *, force: bool = False) -> Path:
    """Checks, before long work, that an artifact can be saved at ``directory``.

    Returns:
      The absolute folder.

    Raises:
      ArtifactError: ``directory`` holds an artifact (and ``force`` is off) or
        anything else, or its parent cannot be written.
    """
    directory = Path(directory).absolute()
    _check_replaceable(directory, force)
    parent = next((p for p in directory.parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write {directory}: {parent} is not writable")
    return directory


def tree_digest(tree: PyTree) -> str:
    """SHA-256 of a tree's leaves (values, dtypes and shapes, in leaf order).

    Stored in ``extra`` to tell later whether an artifact was trained on the same
    weights (e.g. a denoiser and the victim weights of a capture).

    >>> import numpy as np
    >>> tree_digest({"a": np.zeros(2)}) == tree_digest({"a": np.zeros(2)})
    True
    """
    import hashlib

    import jax

    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_artifact(
    directory: str | Path,
    *,
    kind: str,
    config: Mapping[str, Any],
    tree: PyTree,
    extra: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Saves ``tree`` (orbax) with ``config.json``, atomically (a temporary folder renamed).

    Args:
      directory: the artifact folder to create; an existing artifact is
        replaced only with ``force``, any other existing path is refused.
      kind: what the arrays are (see the module docstring).
      config: strict-JSON values that rebuild the module reading the arrays.
      tree: a pytree of arrays (dicts, lists, tuples, NamedTuples of arrays).
      extra: strict-JSON free-form description (training data, steps, loss).
      force: replace an existing artifact.

    Returns:
      The absolute artifact folder.

    Raises:
      ArtifactError: non-JSON config/extra, ``directory`` occupied by something
        else, or an existing artifact without ``force``.
    """
    directory = Path(directory).absolute()
    text = _header(kind, config, extra)
    _check_replaceable(directory, force)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(directory, "tmp")
    try:
        tmp.mkdir()
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / ARRAYS_DIR, tree)
            checkpointer.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(text)
        _move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _move_into_place(tmp: Path, directory: Path) -> None:
    """Renames ``tmp`` to ``directory``, replacing what is there only once ``tmp`` is complete."""
    if directory.exists():
        old = _temporary_sibling(directory, "old")
        os.rename(directory, old)
        try:
            os.rename(tmp, directory)
        except BaseException:
            os.rename(old, directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, directory)


# --------------------------------------------------------------------------- training runs


class StepCheckpoints:
    """The step-numbered checkpoints of a training run (``DIR/steps/<step>/``), the last few kept.

    Each step holds an array tree (e.g. parameters, optimizer state, PRNG key)
    and a JSON description (e.g. the loss history so far). Use as a context
    manager, or call :meth:`close`.
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=int(max_to_keep), create=True)
        self._manager = ocp.CheckpointManager(self.directory / STEPS_DIR, options=options)

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step kept."""
        return list(self._manager.all_steps())

    def save_step(self, step: int, tree: PyTree, *, extra: Mapping[str, Any] | None = None) -> None:
        """Saves ``tree`` and JSON ``extra`` as ``step`` (no-op if it exists), waiting for it."""
        step = int(step)
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                tree=ocp.args.StandardSave(tree), extra=ocp.args.JsonSave(dict(extra or {}))
            ),
        )
        self._manager.wait_until_finished()

    def restore(
        self, *, target: PyTree | None = None, step: int | None = None
    ) -> tuple[PyTree, dict, int]:
        """``(tree, extra, step)`` of ``step`` (default: the latest).

        Raises:
          ArtifactError: no step saved, an unknown step, or arrays that do not fit ``target``.
        """
        steps = self.all_steps()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ArtifactError(f"{self.directory} has no saved step to restore")
        elif step not in steps:
            raise ArtifactError(f"{self.directory} has no step {step}; saved: {sorted(steps)}")
        tree_args = ocp.args.StandardRestore(target)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(tree=tree_args, extra=ocp.args.JsonRestore())
            )
        except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
            raise ArtifactError(
                _one_line(f"checkpoint {self.directory} step {step} does not fit: {error}")
            ) from None
        return restored["tree"], dict(restored["extra"] or {}), int(step)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> StepCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_run(
    directory: str | Path,
    *,
    kind: str,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Creates a training run's folder holding only its ``config.json`` (atomically).

    Steps are then saved with :class:`StepCheckpoints`; :func:`resume_run`
    continues the run.

    Raises:
      ArtifactError: ``directory`` already holds a checkpoint (continue it with
        :func:`resume_run`) or something else, or non-JSON config/extra.
    """
    directory = Path(directory).absolute()
    text = _header(kind, config, extra)
    if (directory / CONFIG_FILE).is_file():
        raise ArtifactError(
            f"{directory} already holds a checkpoint; resume it (--resume) or choose another folder"
        )
    _check_replaceable(directory, force=False)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(directory, "tmp")
    try:
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(text)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def resume_run(
    directory: str | Path, *, kind: str | Sequence[str], expect: Mapping[str, Any] | None = None
) -> ArtifactInfo:
    """The stored settings of a training run to continue, checked against ``expect``.

    Args:
      directory: the run's folder (written by :func:`start_run`).
      kind: the kind (or kinds) it must hold.
      expect: settings given again by the caller; any that differ from the
        stored ones is an error naming the keys (the stored ones win otherwise).

    Returns:
      The run's :class:`ArtifactInfo`; its ``config`` holds every setting.

    Raises:
      ArtifactError: no such folder, not a checkpoint, another kind, or a mismatch.
    """
    directory = Path(directory)
    if not directory.exists():
        raise ArtifactError(f"cannot resume {directory}: it does not exist")
    info = read_artifact(directory, kind=kind)
    if expect is not None:
        diffs = differences(info.config, _strict_json(dict(expect), "expect"))
        if diffs:
            raise ArtifactError(
                f"cannot resume {directory}: it was trained with other settings: "
                + "; ".join(diffs)
            )
    return info


def latest_step(directory: str | Path) -> int | None:
    """The newest complete training step saved in an artifact folder, or ``None``."""
    if not (Path(directory) / STEPS_DIR).is_dir():
        return None
    with StepCheckpoints(directory) as steps:
        return steps.latest_step()


__all__ = [
    "ARRAYS_DIR",
    "CONFIG_FILE",
    "FORMAT",
    "STEPS_DIR",
    "Artifact",
    "ArtifactError",
    "ArtifactInfo",
    "StepCheckpoints",
    "check_config",
    "check_target",
    "differences",
    "latest_step",
    "load_artifact",
    "read_artifact",
    "resume_run",
    "save_artifact",
    "start_run",
    "tree_digest",
]
