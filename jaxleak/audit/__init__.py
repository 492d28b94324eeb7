"""The audit: data -> victim -> protected updates -> attack -> evaluation, as plain functions.

:mod:`~jaxleak.audit.workflow` builds data, victims and captures;
:func:`run_attack` runs any registered attack on a capture, evaluates it once
(:mod:`~jaxleak.audit.evaluate`) and writes ``reconstructions.npz`` and
``metrics.json``.
"""

from jaxleak.audit.evaluate import evaluate, feature_metrics, image_metrics, lpips_metric, match_clients
from jaxleak.audit.run import check_output_dir, null_capture, run_attack
from jaxleak.audit.workflow import (
    bench_capture,
    build_victim,
    capture,
    layer_inputs,
    load_data,
    make_victim,
    resume_recovery,
    train_and_save_victim,
    train_recovery,
    victim_from_capture,
)

__all__ = [
    "bench_capture",
    "build_victim",
    "capture",
    "check_output_dir",
    "evaluate",
    "feature_metrics",
    "image_metrics",
    "layer_inputs",
    "load_data",
    "lpips_metric",
    "make_victim",
    "match_clients",
    "null_capture",
    "resume_recovery",
    "run_attack",
    "train_and_save_victim",
    "train_recovery",
    "victim_from_capture",
]
