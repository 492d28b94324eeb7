"""Federated protocols: what ONE client does with its images before it releases an update.

:class:`Protocol` (FedSGD or FedAvg with its local epochs, batch, optimizer and
learning rate) and :func:`local_update`, written for one client and ``vmap``ped
over clients by :mod:`jaxleak.capture`; attacks that replay a client call it too.
:func:`client_update` adds a defense chain (:mod:`jaxleak.defenses`).
:func:`train_fedavg` runs server-side FedAvg rounds over many simulated clients, so a
capture can be taken at a given global epoch of a real FL run.
"""

from jaxleak.protocols._local import (
    ClientResult,
    client_update,
    derived_keys,
    local_optimizer,
    local_update,
    run_local_steps,
    step_gradient,
)
from jaxleak.protocols._protocol import FEDSGD, KINDS, OPTIMIZERS, Protocol, make_schedule
from jaxleak.protocols.server import (
    FedAvgTraining,
    client_keys,
    fedavg_round,
    partition,
    rounds_for_epochs,
    sample_clients,
    train_fedavg,
)

__all__ = [
    "FEDSGD",
    "KINDS",
    "OPTIMIZERS",
    "ClientResult",
    "FedAvgTraining",
    "Protocol",
    "client_keys",
    "client_update",
    "derived_keys",
    "fedavg_round",
    "local_optimizer",
    "local_update",
    "make_schedule",
    "partition",
    "rounds_for_epochs",
    "run_local_steps",
    "sample_clients",
    "step_gradient",
    "train_fedavg",
]
