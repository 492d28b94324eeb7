"""Attacks that reconstruct private inputs from captured updates."""

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
    "SPEConfig",
    "SPEResult",
    "estimate_noise_variance",
    "quantize_noise_strength",
    "spe",
    "spe_batch",
    "wavelet_refine",
]
