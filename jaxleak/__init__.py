"""jaxleak: audit privacy in federated learning by attacking it.

Data flows one way: data -> protocol (+ defenses) -> capture -> attack -> evaluate
-> report. The public API is the names below; each folder holds one concept:
``jaxleak.data``, ``jaxleak.models`` (victims), ``jaxleak.protocols`` (what one
client does: FedSGD, FedAvg), ``jaxleak.defenses`` (composable transforms of an
update, DP among them), ``jaxleak.privacy`` (host-side DP maths), ``jaxleak.capture``
(the attacker's observations and their file), ``jaxleak.attacks`` (every attack,
registered once), ``jaxleak.audit`` (run an attack, evaluate it once),
``jaxleak.metrics``, ``jaxleak.report``. See docs/core.md.
"""

from jaxleak import metrics
from jaxleak._version import __version__
from jaxleak.attacks import SPEConfig, SPEResult, estimate_noise_variance, spe, spe_batch
from jaxleak.capture import Capture, CaptureFormatError, capture_updates, load_capture, save_capture
from jaxleak.data import Dataset, DatasetNotFoundError, load_dataset
from jaxleak.defenses import chain, parse_chain
from jaxleak.models import Victim, get_victim
from jaxleak.privacy import DPConfig, resolve
from jaxleak.protocols import Protocol, local_update

__all__ = [
    "Capture",
    "CaptureFormatError",
    "DPConfig",
    "Protocol",
    "Dataset",
    "DatasetNotFoundError",
    "SPEConfig",
    "SPEResult",
    "Victim",
    "__version__",
    "capture_updates",
    "chain",
    "estimate_noise_variance",
    "get_victim",
    "load_capture",
    "load_dataset",
    "local_update",
    "metrics",
    "parse_chain",
    "resolve",
    "save_capture",
    "spe",
    "spe_batch",
]
