"""Attacks that reconstruct private inputs from captured updates."""

from jaxleak.attacks.fgla import FGLAResult, fgla_batch
from jaxleak.attacks.spe import (
    SPEConfig,
    SPEResult,
    estimate_noise_variance,
    quantize_noise_strength,
    spe,
    spe_batch,
    wavelet_refine,
)

__all__ = [
    "FGLAResult",
    "SPEConfig",
    "SPEResult",
    "estimate_noise_variance",
    "fgla_batch",
    "quantize_noise_strength",
    "spe",
    "spe_batch",
    "wavelet_refine",
]
