"""Optimisation-based gradient inversion: DLG, iDLG, Inverting Gradients, GradInversion, GRNN.

Each attack is written for ONE observed update and run by one driver
(:func:`run_problem`) that vmaps it over targets x restarts and scans over
iterations in compiled chunks. :func:`reconstruct` is the entry point.

>>> import jax
>>> from jaxleak.models import get_victim
>>> from jaxleak.attacks.optimization import IGConfig, dummy_gradient, reconstruct
>>> victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=8)
>>> variables = victim.init(jax.random.key(0))
>>> x = jax.random.uniform(jax.random.key(1), (1, 4, 4, 1))
>>> g = dummy_gradient(victim, variables, x, jax.nn.one_hot(jax.numpy.array([2]), 3))
>>> updates = jax.tree_util.tree_map(lambda a: a[None], g)
>>> res = reconstruct("ig", victim, variables, updates, config=IGConfig(iterations=20, labels="infer"))
>>> res.images.shape
(1, 1, 4, 4, 1)
"""

from jaxleak.attacks.optimization._attacks import (
    DLGConfig,
    GradInversionConfig,
    GRNNConfig,
    GRNNGenerator,
    IGConfig,
    idlg_config,
    ig_schedule,
    make_dlg,
    make_gradinversion,
    make_grnn,
    make_ig,
)
from jaxleak.attacks.optimization._driver import (
    Candidate,
    Problem,
    RunOptions,
    RunResult,
    run_problem,
)
from jaxleak.attacks.optimization._labels import (
    infer_label,
    infer_label_counts,
    infer_labels,
    labels_from_counts,
)
from jaxleak.attacks.optimization._matching import (
    DISTANCES,
    batch_loss,
    batchnorm_prior,
    cosine_distance,
    dummy_gradient,
    l2_distance,
    l2_prior,
    layer_weights,
    total_variation,
    wasserstein_distance,
)
from jaxleak.attacks.optimization._run import (
    ATTACKS,
    AttackSpec,
    attack_conv_impl,
    check_updates,
    default_config,
    head_gradients,
    match_batch,
    null_updates,
    prepare_targets,
    reconstruct,
)

__all__ = [
    "ATTACKS",
    "DISTANCES",
    "AttackSpec",
    "Candidate",
    "DLGConfig",
    "GRNNConfig",
    "GRNNGenerator",
    "GradInversionConfig",
    "IGConfig",
    "Problem",
    "RunOptions",
    "RunResult",
    "attack_conv_impl",
    "batch_loss",
    "batchnorm_prior",
    "check_updates",
    "cosine_distance",
    "default_config",
    "dummy_gradient",
    "head_gradients",
    "idlg_config",
    "ig_schedule",
    "infer_label",
    "infer_label_counts",
    "infer_labels",
    "l2_distance",
    "l2_prior",
    "labels_from_counts",
    "layer_weights",
    "make_dlg",
    "make_gradinversion",
    "make_grnn",
    "make_ig",
    "match_batch",
    "null_updates",
    "prepare_targets",
    "reconstruct",
    "run_problem",
    "total_variation",
    "wasserstein_distance",
]
