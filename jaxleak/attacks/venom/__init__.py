"""Venom (AAAI 2026): the Diff-LRN recovery network and its comparison variants.

SPE lives in :mod:`jaxleak.attacks.spe`; its ``features`` map and noise strength
``T`` are the inputs of the networks here. See :mod:`jaxleak.attacks.venom.network`.
"""

from jaxleak.attacks.venom._embedding import (
    ALPHA_EPS,
    DEFAULT_ALPHA_INIT,
    DEFAULT_LIQUID_STEPS,
    LiquidTimeEmbedding,
    SinusoidalTimeEmbedding,
    Time2Vec,
    liquid_alpha,
    liquid_dynamics,
    liquid_update,
    sinusoidal_embedding,
)
from jaxleak.attacks.venom._layers import film
from jaxleak.attacks.venom._unet import ConditionedUNet, PixelShuffleHead
from jaxleak.attacks.venom.network import (
    VARIANTS,
    DiffLRN,
    FGLAGenerator,
    RecoveryNetConfig,
    VenomDiff,
    make_recovery_net,
)
from jaxleak.attacks.venom.triplets import TripletConfig, Triplets, make_triplet_fn, make_triplets

__all__ = [
    "ALPHA_EPS",
    "DEFAULT_ALPHA_INIT",
    "DEFAULT_LIQUID_STEPS",
    "VARIANTS",
    "ConditionedUNet",
    "DiffLRN",
    "FGLAGenerator",
    "LiquidTimeEmbedding",
    "PixelShuffleHead",
    "RecoveryNetConfig",
    "SinusoidalTimeEmbedding",
    "Time2Vec",
    "TripletConfig",
    "Triplets",
    "VenomDiff",
    "film",
    "liquid_alpha",
    "liquid_dynamics",
    "liquid_update",
    "make_recovery_net",
    "make_triplet_fn",
    "make_triplets",
    "sinusoidal_embedding",
]
