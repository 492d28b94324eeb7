"""Attacks that reconstruct private inputs from captured updates; every one is registered in
:mod:`jaxleak.attacks.registry` (``jaxleak attacks`` lists them)."""

from jaxleak.attacks._builtin import run_spe
from jaxleak.attacks.fgla import FGLAResult, fgla_batch
from jaxleak.attacks.registry import Attack, AttackInputError, attacks, get_attack
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
    "Attack",
    "AttackInputError",
    "FGLAResult",
    "SPEConfig",
    "SPEResult",
    "estimate_noise_variance",
    "fgla_batch",
    "attacks",
    "get_attack",
    "quantize_noise_strength",
    "run_spe",
    "spe",
    "spe_batch",
    "wavelet_refine",
]
