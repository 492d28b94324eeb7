"""Attacks on FedAvg updates: SME, FM (flow-matching-regularised SME), and the shared surrogate.

A FedAvg client trains locally for ``E`` epochs of ``S`` steps and releases ``u = w0 - w1``, which
is not the gradient of any one batch. The attacks here each treat that differently:

* **SME** (:func:`make_sme`, :class:`SMEConfig`; Zhu et al. 2023): the images' gradient at a point
  ``w_alpha = w0 - alpha u`` on the segment ``[w0, w1]`` is nearly parallel to ``u``; match it by
  cosine, learning ``alpha`` with the images (:func:`surrogate_variables`, :func:`surrogate_matching`).
* **FM** (:class:`FMConfig`, :func:`make_fm`; the FM paper): SME's loss plus a flow-matching image
  prior ``lambda_fm ||v(x, tau)||^2`` (:mod:`jaxleak.priors`), tau ramping over the iterations.
* **DLF** (:class:`DLFConfig`, :func:`make_dlf`; Dimitrov et al. 2022) replays the client's local
  steps on dummy data through :func:`jaxleak.protocols.run_local_steps`, the code the client runs.
* **flow-latent** (:class:`FlowLatentConfig`, :func:`make_flow_latent`) searches the initial noise
  of the flow prior's ODE: a GGL-style generative-latent attack, not GGL (no pretrained GAN here).

Every attack is a :class:`jaxleak.attacks.optimization.Problem` for ONE client, built by
``make_x(victim, config, *, batch_size, protocol, prior)``; the optimisation driver vmaps it over
clients x restarts. A target is ``{"update": w0 - w1, "label_probs": [M, K]}`` and ``shared`` is
``{"variables": w0, "prior": the prior UNet's params or None}``. ``jaxleak attack sme|fm|dlf|
flow-latent`` runs them on a capture file (registered in :mod:`._runner`).
"""

from jaxleak.attacks.fedavg._surrogate import soft_sign, surrogate_matching, surrogate_variables
from jaxleak.attacks.fedavg.dlf import DLFConfig, make_dlf, simulated_update
from jaxleak.attacks.fedavg.latent import FlowLatentConfig, generate, make_flow_latent
from jaxleak.attacks.fedavg.sme import (
    FMConfig,
    SMEConfig,
    fm_config,
    fm_regularizer,
    fm_tau,
    image_stats,
    make_fm,
    make_sme,
    sme_total_variation,
)

__all__ = [
    "DLFConfig",
    "FMConfig",
    "FlowLatentConfig",
    "SMEConfig",
    "fm_config",
    "fm_regularizer",
    "fm_tau",
    "generate",
    "image_stats",
    "make_dlf",
    "make_flow_latent",
    "make_fm",
    "make_sme",
    "simulated_update",
    "sme_total_variation",
    "soft_sign",
    "surrogate_matching",
    "surrogate_variables",
]
