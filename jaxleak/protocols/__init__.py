"""Federated protocols: what ONE client does with its images before it releases an update.

:class:`Protocol` (FedSGD or FedAvg with its local epochs, batch, optimizer and
learning rate) and :func:`local_update`, written for one client and ``vmap``ped
over clients by :mod:`jaxleak.capture`; attacks that replay a client call it too.
:func:`client_update` adds a defense chain (:mod:`jaxleak.defenses`).
"""

from jaxleak.protocols._local import ClientResult, client_update, derived_keys, local_update, step_gradient
from jaxleak.protocols._protocol import FEDSGD, KINDS, OPTIMIZERS, Protocol, make_schedule

__all__ = [
    "FEDSGD",
    "KINDS",
    "OPTIMIZERS",
    "ClientResult",
    "Protocol",
    "client_update",
    "derived_keys",
    "local_update",
    "make_schedule",
    "step_gradient",
]
