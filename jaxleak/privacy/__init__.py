"""Differential-privacy mechanisms that protect simulated client updates.

Two calibrations exist side by side (see ``docs`` in README and NOTES section 2):

* ``paper``: the Mjolnir/Venom protocol. The attacked dense layer's gradient
  (weight and bias jointly) is clipped to L2 norm ``C`` and noise of scale
  derived from the sensitivity ``s = 2 * lr * C / m`` is added.
* ``dpsgd``: Abadi et al. Per-example clipping of the whole gradient, Gaussian
  noise ``N(0, (z C)^2)`` on the clipped sum, division by the batch size.
"""

from jaxleak.privacy.accounting import dpsgd_epsilon, dpsgd_noise_multiplier
from jaxleak.privacy.clipping import clip_by_global_norm, global_norm
from jaxleak.privacy.mechanisms import (
    CALIBRATIONS,
    MECHANISMS,
    DPConfig,
    ResolvedDP,
    paper_noise_scale,
    resolve,
)

__all__ = [
    "CALIBRATIONS",
    "MECHANISMS",
    "DPConfig",
    "ResolvedDP",
    "clip_by_global_norm",
    "dpsgd_epsilon",
    "dpsgd_noise_multiplier",
    "global_norm",
    "paper_noise_scale",
    "resolve",
]
