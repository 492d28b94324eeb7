"""Every attack, registered once: its config, what it needs from a capture, one run function.

An attack is an :class:`Attack`: a name, a one-line summary, a config factory
(frozen dataclass with the reference defaults), the capture contents it needs
(checked up front by :func:`check_needs`, one line naming what is missing and how
to get it) and ``run(capture, config, context) -> AttackOutput``. Running,
evaluating and writing results is one path for all of them
(:func:`jaxleak.audit.run_attack`); the CLI's ``jaxleak attack NAME`` and
``jaxleak attacks`` are generated from :func:`attacks`.

>>> sorted(attacks())[:4]
['dlf', 'dlg', 'fgla', 'flow-latent']
>>> get_attack("ig").needs
('whole_update', 'weights')
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

NEEDS: dict[str, str] = {
    "whole_update": "every layer's update (capture with --keep-update)",
    "weights": "the server weights w0 (capture with --keep-params, or a meta.init_seed / meta.checkpoint "
               "that still exists)",
    "single": "one image per client (M = 1; capture with --samples 1)",
    "fedsgd": "a FedSGD capture (--protocol fedsgd): the update is one gradient",
    "artifact": "a trained network (--artifact DIR from `jaxleak train`)",
}
"""What an attack may need beyond the attacked layer's update, which every capture holds."""


class AttackInputError(ValueError):
    """The capture (or the given artifacts) cannot be attacked this way; the message says why."""


class Option(NamedTuple):
    """A command-line option of one attack (the CLI generates ``--flag`` from it).

    ``target`` says where the parsed value goes: ``"config"`` (a field of the
    attack's config, named ``dest``) or ``"context"`` (a :class:`Context` field).
    """

    flag: str
    dest: str
    type: Callable[[str], Any]
    help: str
    target: str = "config"
    choices: tuple[str, ...] | None = None
    default: Any = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    """Run-time inputs of an attack that are not its config: the victim, artifacts, driver options.

    Attributes:
      victim, variables: the victim and its server weights (``None`` unless the attack
        needs ``weights``).
      artifact: path of a trained network (``None`` unless needed).
      seed: the attack's own randomness (initialisations).
      progress: show progress bars.
      options: attack-family options given on the command line (driver chunking, SPE's
        ``sigma2``, ...), as plain values.
    """

    victim: Any = None
    variables: Any = None
    artifact: str | None = None
    seed: int = 0
    progress: bool = False
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class AttackOutput(NamedTuple):
    """What an attack returns; evaluation and writing are the caller's (one path for all attacks).

    Attributes:
      images: reconstructions ``[N, M, H, W, C]`` in [0, 1], or ``None`` (feature attacks).
      labels: predicted labels ``[N, M]`` or ``None``.
      per_target: extra per-image columns ``[N * M]`` (matching loss, noise strength, ...).
      arrays: extra arrays saved beside the reconstructions (``features.npz`` for SPE).
      info: JSON-ready description (config, timing, notes list under ``"notes"``).
    """

    images: np.ndarray | None
    labels: np.ndarray | None
    per_target: dict[str, np.ndarray]
    arrays: dict[str, np.ndarray]
    info: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Attack:
    """One registered attack.

    Attributes:
      name: the CLI name.
      summary: one line for ``jaxleak attacks``.
      needs: keys of :data:`NEEDS`.
      make_config: ``(**overrides) -> config`` (a frozen dataclass with the reference defaults).
      run: ``(capture, config, context) -> AttackOutput``.
      options: extra command-line options (:class:`Option`).
      family: ``"analytic"``, ``"recovery"``, ``"optimization"`` or ``"fedavg"`` (groups shared CLI options).
    """

    name: str
    summary: str
    needs: tuple[str, ...]
    make_config: Callable[..., Any]
    run: Callable[[Any, Any, Context], AttackOutput]
    options: tuple[Option, ...] = ()
    family: str = "optimization"

    def config(self, overrides: Mapping[str, Any] | None = None):
        """The config with ``overrides`` (field -> value) applied and type-checked.

        Raises:
          AttackInputError: an unknown field or a value of the wrong type, naming both.
        """
        default = self.make_config()
        fields = {f.name: f for f in dataclasses.fields(default)}
        clean = {}
        for key, value in (overrides or {}).items():
            if key not in fields:
                raise AttackInputError(f"{self.name} has no setting {key!r}; its settings: "
                                       f"{', '.join(sorted(fields))}")
            clean[key] = _coerce(self.name, key, value, getattr(default, key))
        try:
            return self.make_config(**clean)
        except (TypeError, ValueError) as e:
            raise AttackInputError(f"{self.name}: {e}") from None


def _coerce(attack: str, key: str, value: Any, default: Any) -> Any:
    """``value`` checked against the type of the field's default (ints widen to floats)."""
    def bad(kind: str):
        return AttackInputError(f"{attack}: setting {key} must be {kind}, got {value!r}")

    if default is None or isinstance(default, tuple):
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    return value


_REGISTRY: dict[str, Attack] = {}


DRIVER_OPTIONS = ("chunk", "target_batch", "patience", "min_delta", "batching", "unroll", "conv_impl", "devices")
"""Run options every optimisation and FedAvg attack takes (:class:`jaxleak.attacks.optimization.RunOptions`
fields and the convolution choice); none of them changes the attack's result."""


def context_options(attack: Attack) -> tuple[str, ...]:
    """The keys ``attack`` reads from :attr:`Context.options` (its own options, then the driver's).

    >>> context_options(get_attack("spe"))
    ('sigma2', 'chunk_size')
    >>> "chunk" in context_options(get_attack("sme"))
    True
    """
    own = tuple(o.dest for o in attack.options if o.target == "context")
    return own + (DRIVER_OPTIONS if attack.family in ("optimization", "fedavg") else ())


def register(attack: Attack) -> Attack:
    """Adds ``attack`` to the registry (a name can be registered once)."""
    unknown = [n for n in attack.needs if n not in NEEDS]
    if unknown:
        raise ValueError(f"attack {attack.name!r} needs unknown inputs {unknown}; known: {sorted(NEEDS)}")
    if attack.name in _REGISTRY:
        raise ValueError(f"attack {attack.name!r} is registered twice")
    _REGISTRY[attack.name] = attack
    return attack


def attacks() -> dict[str, Attack]:
    """Name -> :class:`Attack`, for every registered attack."""
    _load_builtins()
    return dict(_REGISTRY)


def get_attack(name: str) -> Attack:
    """The registered attack ``name``; a one-line ``AttackInputError`` listing the known ones."""
    registry = attacks()
    if name not in registry:
        raise AttackInputError(f"unknown attack {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def check_needs(attack: Attack, capture, *, artifact: str | None = None, weights_available: bool = True) -> None:
    """Raises :class:`AttackInputError` naming the first thing ``capture`` lacks for ``attack``."""
    missing = []
    for need in attack.needs:
        if need == "whole_update" and not capture.whole_update:
            missing.append(need)
        elif need == "weights" and not weights_available:
            missing.append(need)
        elif need == "single" and capture.samples != 1:
            missing.append(need)
        elif need == "fedsgd" and capture.protocol.get("kind") != "fedsgd":
            missing.append(need)
        elif need == "artifact" and not artifact:
            missing.append(need)
    if missing:
        raise AttackInputError(f"attack {attack.name} needs {NEEDS[missing[0]]}"
                               + (f" (also: {', '.join(missing[1:])})" if len(missing) > 1 else ""))
    if artifact and "artifact" not in attack.needs:
        raise AttackInputError(f"attack {attack.name} takes no --artifact (it has no trained network)")


def _load_builtins() -> None:
    if not _REGISTRY:
        from jaxleak.attacks import _builtin  # noqa: F401  (registers on import)


__all__ = [
    "NEEDS",
    "Attack",
    "AttackInputError",
    "AttackOutput",
    "Context",
    "Option",
    "attacks",
    "check_needs",
    "get_attack",
    "register",
]
