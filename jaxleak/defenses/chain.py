"""``chain``: defenses composed in a recorded order."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
from jaxtyping import PRNGKeyArray, PyTree

from jaxleak.defenses.base import STAGES, Defense

__all__ = ["Chain", "chain"]


@dataclasses.dataclass(frozen=True, eq=False)
class Chain:
    """Defenses in the order they act on one client.

    The step-stage (DP) defense, if any, acts inside every local step, before local
    training ends; the update-stage ones then act on the released update, left to right.
    Build with :func:`chain`, which checks that order.

    Two chains are equal (and hash alike, so a chain can key a compile cache) when
    their ``meta`` is: the meta holds every parameter of every defense.

    Attributes:
      defenses: the defenses, step-stage first.
    """

    defenses: tuple[Defense, ...] = ()

    @property
    def step(self) -> Defense | None:
        """The one step-stage defense, or ``None`` (local steps use the plain mean gradient)."""
        return next((d for d in self.defenses if d.stage == "step"), None)

    @property
    def updates(self) -> tuple[Defense, ...]:
        """The update-stage defenses, in the order applied."""
        return tuple(d for d in self.defenses if d.stage == "update")

    @property
    def dp(self) -> dict[str, Any] | None:
        """The DP defense's meta (calibration, nominal and tight epsilon, ...), or ``None``."""
        step = self.step
        return None if step is None else dict(step.meta)

    @property
    def meta(self) -> list[dict[str, Any]]:
        """Every defense's meta with its ``"stage"``, in the order applied (JSON-ready)."""
        return [{**d.meta, "stage": d.stage} for d in self.defenses]

    def update(self, tree: PyTree, key: PRNGKeyArray) -> PyTree:
        """Applies the update-stage defenses to ONE client's update, in order.

        The ``i``-th update-stage defense draws from ``fold_in(key, i)``.

        Args:
          tree: the update, a params-shaped pytree (descent direction ``w0 - w1``).
          key: this client's PRNG key for the defenses.

        Returns:
          The protected update (``tree`` itself for a chain without update-stage defenses).
        """
        for i, defense in enumerate(self.updates):
            tree = defense.apply(tree, jax.random.fold_in(key, i))
        return tree

    def _key(self) -> str:
        return json.dumps(self.meta, sort_keys=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chain) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def chain(*defenses: Defense) -> Chain:
    """Composes defenses, applied left to right; ``chain()`` is the identity.

    Args:
      *defenses: ``Defense`` tuples. At most one step-stage (DP) defense, and it must come
        first: it acts inside local training, before any update-stage defense.

    Returns:
      The :class:`Chain`.

    Raises:
      TypeError: on something that is not a ``Defense``.
      ValueError: on an unknown stage, two DP defenses, or a DP defense after an
        update-stage one.

    >>> from jaxleak.defenses import clip_norm, gaussian
    >>> c = chain(clip_norm(1.0), gaussian(0.001))
    >>> [(m["name"], m["stage"]) for m in c.meta], c.step
    ([('clip-norm', 'update'), ('gaussian', 'update')], None)
    """
    seen_update = None
    step = None
    for d in defenses:
        if not isinstance(d, Defense):
            raise TypeError(f"chain takes Defense tuples, got {type(d).__name__}")
        if d.stage not in STAGES:
            raise ValueError(f"defense {d.name!r} has stage {d.stage!r}; stages are {STAGES}")
        if d.stage == "step":
            if step is not None:
                raise ValueError(f"a chain holds at most one DP (step-stage) defense, got "
                                 f"{step.name!r} and {d.name!r}")
            if seen_update is not None:
                raise ValueError(f"{d.name!r} acts inside local training, before every "
                                 f"update-stage defense: put it before {seen_update!r}")
            step = d
        elif seen_update is None:
            seen_update = d.name
    return Chain(defenses=tuple(defenses))
