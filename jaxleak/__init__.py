"""jaxleak: audit privacy in federated learning by attacking it.

The public API is the names below; submodules (``jaxleak.metrics``,
``jaxleak.privacy``, ``jaxleak.capture``, ``jaxleak.attacks``, ``jaxleak.models``,
``jaxleak.data``, ``jaxleak.audit``) hold the rest.
"""

from jaxleak import metrics
from jaxleak._version import __version__
from jaxleak.attacks import SPEConfig, SPEResult, estimate_noise_variance, spe, spe_batch
from jaxleak.capture import Capture, CaptureFormatError, capture_updates, load_capture, save_capture
from jaxleak.data import Dataset, DatasetNotFoundError, load_dataset
from jaxleak.models import Victim, get_victim
from jaxleak.privacy import DPConfig, resolve

__all__ = [
    "Capture",
    "CaptureFormatError",
    "DPConfig",
    "Dataset",
    "DatasetNotFoundError",
    "SPEConfig",
    "SPEResult",
    "Victim",
    "__version__",
    "capture_updates",
    "estimate_noise_variance",
    "get_victim",
    "load_capture",
    "load_dataset",
    "metrics",
    "resolve",
    "save_capture",
    "spe",
    "spe_batch",
]
