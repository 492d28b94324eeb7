"""The federated protocol a client follows: a frozen config of plain values."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray

KINDS = ("fedsgd", "fedavg")
OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Protocol:
    """What one client does with its ``M`` private images before it releases an update.

    * ``fedsgd``: one gradient of the mean cross-entropy on all ``M`` images at the
      server weights; the update is that (protected) gradient.
    * ``fedavg``: ``local_epochs`` epochs of ``ceil(M / local_batch)`` optimizer steps,
      the batches reshuffled every epoch with the client's key; the update is
      ``w0 - w1`` (the descent direction, so FedSGD and FedAvg updates point the same
      way). The FM paper trains locally with Adam at lr 0.1 (the default); SME's and
      DLF's public code use plain SGD at lr 0.004. Every capture records which.

    BatchNorm runs in inference mode throughout (NOTES section 4 pitfall).

    Attributes:
      kind: ``"fedsgd"`` or ``"fedavg"``.
      local_epochs: ``E`` (FedSGD: 1).
      local_batch: ``B``; ``None`` means one batch of all ``M`` images (FedSGD's only choice).
      optimizer: local optimizer of ``fedavg``: ``"sgd"`` or ``"adam"``.
      lr: its learning rate.
      global_epoch: recorded only: the FL training epoch at which the server weights were taken.

    >>> p = Protocol(kind="fedavg", local_epochs=2, local_batch=10)
    >>> p.steps_per_epoch(50), p.schedule_shape(50)
    (5, (2, 5, 10))
    """

    kind: str = "fedsgd"
    local_epochs: int = 1
    local_batch: int | None = None
    optimizer: str = "adam"
    lr: float = 0.1
    global_epoch: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"protocol kind must be one of {KINDS}, got {self.kind!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"local optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if isinstance(self.local_epochs, bool) or not isinstance(self.local_epochs, int) or self.local_epochs < 1:
            raise ValueError(f"local_epochs must be an int >= 1, got {self.local_epochs!r}")
        if self.local_batch is not None and (
            isinstance(self.local_batch, bool) or not isinstance(self.local_batch, int) or self.local_batch < 1
        ):
            raise ValueError(f"local_batch must be an int >= 1 or None, got {self.local_batch!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"local lr must be a positive finite number, got {self.lr!r}")
        if self.kind == "fedsgd" and self.local_epochs != 1:
            raise ValueError("fedsgd computes one gradient: local_epochs must be 1 (use --protocol fedavg)")

    def batch(self, samples: int) -> int:
        """The local batch ``B`` for a client of ``samples`` images."""
        if self.kind == "fedsgd" or self.local_batch is None:
            return samples
        return min(self.local_batch, samples)

    def steps_per_epoch(self, samples: int) -> int:
        """``S = ceil(M / B)``."""
        return -(-samples // self.batch(samples))

    def schedule_shape(self, samples: int) -> tuple[int, int, int]:
        """``(E, S, B)`` of the schedule of a client of ``samples`` images."""
        return (self.local_epochs, self.steps_per_epoch(samples), self.batch(samples))

    def total_steps(self, samples: int) -> int:
        """Local optimizer steps ``E * S`` (the steps DP accounting composes)."""
        return self.local_epochs * self.steps_per_epoch(samples)

    def as_meta(self, samples: int) -> dict[str, Any]:
        """JSON-ready description for a capture's ``meta["protocol"]``."""
        e, s, b = self.schedule_shape(samples)
        return {
            "kind": self.kind,
            "local_epochs": e,
            "local_batch": b,
            "local_steps": s,
            "samples": int(samples),
            "optimizer": self.optimizer if self.kind == "fedavg" else None,
            "lr": float(self.lr) if self.kind == "fedavg" else None,
            "global_epoch": self.global_epoch,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Protocol:
        """Inverse of :meth:`as_meta` (the ``samples`` entry is the client's ``M``)."""
        kind = meta.get("kind", "fedsgd")
        if kind == "fedsgd":
            return cls(kind="fedsgd", global_epoch=meta.get("global_epoch"))
        return cls(kind=kind, local_epochs=int(meta["local_epochs"]), local_batch=int(meta["local_batch"]),
                   optimizer=meta.get("optimizer") or "adam", lr=float(meta.get("lr") or 0.1),
                   global_epoch=meta.get("global_epoch"))


FEDSGD = Protocol()
"""FedSGD: one mean gradient on the client's whole batch."""


def make_schedule(protocol: Protocol, samples: int, key: PRNGKeyArray) -> Int[Array, "e s b"]:
    """Which image went into which local step: ``[E, S, B]`` indices into the client's M images.

    FedSGD and one-batch FedAvg keep the images in order; otherwise epoch ``e`` is a
    permutation drawn from ``fold_in(key, e)``, cut into ``S`` batches of ``B``,
    the last one padded with ``-1`` when ``B`` does not divide ``M``.
    """
    e, s, b = protocol.schedule_shape(samples)
    if s == 1:
        return jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32), (e, 1, b))
    pad = s * b - samples

    def epoch(i):
        perm = jax.random.permutation(jax.random.fold_in(key, i), samples).astype(jnp.int32)
        return jnp.concatenate([perm, jnp.full((pad,), -1, jnp.int32)]).reshape(s, b)

    return jax.vmap(epoch)(jnp.arange(e))
