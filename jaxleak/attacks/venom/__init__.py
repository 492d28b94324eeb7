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
from jaxleak.attacks.venom.infer import make_infer_fn, recover_images
from jaxleak.attacks.venom.network import (
    VARIANTS,
    DiffLRN,
    FGLAGenerator,
    RecoveryNetConfig,
    VenomDiff,
    make_recovery_net,
)
from jaxleak.attacks.venom.train import (
    TrainConfig,
    TrainResult,
    TrainState,
    load_recovery_net,
    make_train_step,
    reconstruction_loss,
    train_recovery_net,
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
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TripletConfig",
    "Triplets",
    "VenomDiff",
    "film",
    "liquid_alpha",
    "liquid_dynamics",
    "liquid_update",
    "load_recovery_net",
    "make_infer_fn",
    "make_recovery_net",
    "make_train_step",
    "make_triplet_fn",
    "make_triplets",
    "reconstruction_loss",
    "recover_images",
    "sinusoidal_embedding",
    "train_recovery_net",
]
