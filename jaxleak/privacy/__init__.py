"""Differential privacy on the host: calibrations, accounting and tight epsilons.

The jitted mechanisms that clip and noise an update are defenses
(:mod:`jaxleak.defenses`: ``dp_paper``, ``dpsgd``); this package holds the maths
they are calibrated with. Two calibrations exist side by side (NOTES section 2):

* ``paper``: the Mjolnir/Venom protocol. The attacked dense layer's gradient
  (weight and bias jointly) is clipped to L2 norm ``C`` and noise of scale
  derived from the sensitivity ``s = 2 * lr * C / m`` is added.
* ``dpsgd``: Abadi et al. Per-example clipping of the whole gradient, Gaussian
  noise ``N(0, (z C)^2)`` on the clipped sum, division by the batch size.

The classical Gaussian formula of ``paper`` is unsound for ``eps > 1``;
:func:`paper_tight_epsilon` gives the epsilon its noise really buys (Balle & Wang 2018).
:func:`reconstruction_bound` and :func:`bound_for_meta` give what the noise promises about
reconstruction (NOTES section 6), against a baseline from :func:`baseline_kappa`.
"""

from jaxleak.privacy.accounting import ACCOUNTANTS, dpsgd_epsilon, dpsgd_noise_multiplier
from jaxleak.privacy.calibration import analytic_gaussian_epsilon, paper_tight_epsilon
from jaxleak.privacy.clipping import clip_by_global_norm, global_norm
from jaxleak.privacy.mechanisms import (
    CALIBRATIONS,
    MECHANISMS,
    DPConfig,
    ResolvedDP,
    paper_noise_scale,
    resolve,
)
from jaxleak.privacy.reconstruction import (
    baseline_kappa,
    bound_for_meta,
    mu_gaussian,
    mu_paper_calibration,
    reconstruction_bound,
)

__all__ = [
    "ACCOUNTANTS",
    "CALIBRATIONS",
    "MECHANISMS",
    "DPConfig",
    "ResolvedDP",
    "analytic_gaussian_epsilon",
    "baseline_kappa",
    "bound_for_meta",
    "clip_by_global_norm",
    "dpsgd_epsilon",
    "dpsgd_noise_multiplier",
    "global_norm",
    "mu_gaussian",
    "mu_paper_calibration",
    "paper_noise_scale",
    "paper_tight_epsilon",
    "reconstruction_bound",
    "resolve",
]
