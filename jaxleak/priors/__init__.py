"""Flow-matching image priors: a UNet velocity field ``v(x, t)``, its training, sampling, loading.

The flow-matching attack regularises its inversion with ``||v(x, t)||^2`` of a
prior trained on images unrelated to the victim's (NOTES.md section 4). Train one
with :func:`train_flow_prior`, draw images with :func:`sample`, evaluate the
regulariser with :func:`velocity_norm`, and load a run or a shipped prior by name with
:func:`load` (``load("tinyimagenet32-small")`` is the one the package ships).
:func:`fd_alexnet` and :func:`velocity_table` measure a prior's quality (FD-AlexNet, not
comparable to Inception FID) and the size of ``||v||^2`` on real vs noisy images.
"""

from jaxleak.priors.flow import (
    DEFAULT_PRIOR,
    KIND,
    METHODS,
    SHIPPED_DIR,
    Prior,
    TrainConfig,
    TrainResult,
    TrainState,
    ema_update,
    export_prior,
    flow_loss,
    integrate,
    load,
    load_prior,
    make_train_step,
    read_run_config,
    resolve_prior,
    sample,
    save_sample_grid,
    shipped_priors,
    train_flow_prior,
    velocity_norm,
)
from jaxleak.priors.quality import (
    alexnet_features,
    fd_alexnet,
    format_velocity_table,
    frechet_distance,
    velocity_table,
)
from jaxleak.priors.unet import PRESETS, UNet, UNetConfig, count_params, init_params, preset

__all__ = [
    "DEFAULT_PRIOR",
    "KIND",
    "METHODS",
    "PRESETS",
    "SHIPPED_DIR",
    "Prior",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "UNet",
    "UNetConfig",
    "alexnet_features",
    "count_params",
    "ema_update",
    "export_prior",
    "fd_alexnet",
    "flow_loss",
    "format_velocity_table",
    "frechet_distance",
    "init_params",
    "integrate",
    "load",
    "load_prior",
    "make_train_step",
    "preset",
    "read_run_config",
    "resolve_prior",
    "sample",
    "save_sample_grid",
    "shipped_priors",
    "train_flow_prior",
    "velocity_norm",
    "velocity_table",
]
