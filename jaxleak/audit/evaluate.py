"""One evaluation path for every attack: match, score, summarise.

:func:`evaluate` turns an attack's :class:`~jaxleak.attacks.registry.AttackOutput`
and the capture's ground truth into per-image metrics (PSNR, SSIM, MSE, LPIPS,
label accuracy; feature cosines for feature attacks), computed once, after the
reconstructions of a client with ``M > 1`` images are assigned to its images by
the Hungarian algorithm.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

LPIPS_SMALL_RESIZE = 64
SSIM_MIN_SIDE = 11


def image_metrics(recon: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image PSNR, SSIM and MSE ([N] each)."""
    from jaxleak import metrics

    x, y = jnp.asarray(recon, jnp.float32), jnp.asarray(truth, jnp.float32)
    return {k: np.asarray(getattr(metrics, k)(x, y)) for k in ("psnr", "ssim", "mse")}


def lpips_metric(recon: np.ndarray, truth: np.ndarray, *, net: str = "alex", weights_dir: str | None = None,
                 notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """``{"lpips_<net>": [N]}``; images below the backbone's minimum side are first resized.

    Images smaller than the backbone accepts (AlexNet: 31 px, e.g. 28x28 MNIST)
    are upsampled bilinearly to ``LPIPS_SMALL_RESIZE`` (64) on both sides, and a
    note says so; missing weights give an empty dict and a note naming where
    they were looked for.
    """
    from jaxleak.metrics import lpips
    from jaxleak.metrics._lpips import min_side

    notes = notes if notes is not None else []
    resize = None
    if min(recon.shape[1:3]) < min_side(net):
        resize = LPIPS_SMALL_RESIZE
        notes.append(f"lpips_{net} on images upsampled bilinearly from {recon.shape[1]}x{recon.shape[2]} "
                     f"to {resize}x{resize} (below the {min_side(net)} px the backbone needs)")
    try:
        return {f"lpips_{net}": np.asarray(lpips(recon, truth, net=net, weights_dir=weights_dir,
                                                 resize=resize))}
    except FileNotFoundError as error:
        notes.append(f"lpips not computed: {str(error).splitlines()[0]}")
        return {}


def feature_metrics(features_raw: np.ndarray, features: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """Cosine similarity of recovered vs true head features, before and after refinement."""
    from jaxleak.metrics import cosine_similarity

    t = jnp.asarray(true.reshape(len(true), -1))
    return {
        "feature_cosine_raw": np.asarray(cosine_similarity(jnp.asarray(features_raw), t)),
        "feature_cosine": np.asarray(cosine_similarity(jnp.asarray(features.reshape(len(true), -1)), t)),
    }


def match_clients(recon: np.ndarray, truth: np.ndarray, *, metric: str = "psnr") -> np.ndarray:
    """``[N, M]`` permutations assigning each client's reconstructions to its images (Hungarian)."""
    from jaxleak.attacks.optimization import match_batch

    n, m = recon.shape[:2]
    if m == 1:
        return np.zeros((n, 1), np.int64)
    return np.stack([match_batch(recon[i], truth[i], metric=metric) for i in range(n)])


def evaluate(cap, output, *, victim=None, variables=None, lpips_net: str | None = "alex",
             weights_dir: str | None = None, match_metric: str = "psnr") -> dict[str, Any]:
    """Scores an attack's output against the capture's ground truth.

    Args:
      cap: the :class:`jaxleak.capture.Capture` (its ``truth_images``/``truth_labels``).
      output: the attack's :class:`~jaxleak.attacks.registry.AttackOutput`.
      victim, variables: for feature attacks, the victim whose head input is compared
        with the recovered features (``None``: no feature metrics).
      lpips_net: LPIPS backbone (``None``: no LPIPS); weights_dir: its weights root.
      match_metric: what the Hungarian assignment maximises when ``M > 1``.

    Returns:
      ``{"images", "labels", "per_target", "metrics", "notes"}``: the reconstructions and
      labels in the order of the truth (after matching), the attack's per-target columns in
      the same order, the per-image metrics ``[N * M]`` and notes.
    """
    notes: list[str] = list(output.info.get("notes", []))
    images, labels = output.images, output.labels
    per_target = {k: np.asarray(v) for k, v in output.per_target.items()}
    metrics: dict[str, np.ndarray] = {}
    truth = None if cap.truth_images is None else cap.truth_images.astype(np.float32) / 255.0
    n, m = cap.n, cap.samples
    if images is not None and truth is not None:
        perm = match_clients(images, truth, metric=match_metric)
        rows = np.arange(n)[:, None]
        images = images[rows, perm]
        if labels is not None:
            labels = np.asarray(labels)[rows, perm]
        per_target = {k: v.reshape(n, m)[rows, perm].reshape(-1) if v.size == n * m else v
                      for k, v in per_target.items()}
        if m > 1:
            notes.append(f"client batches of M={m}: reconstructions assigned to originals by the Hungarian "
                         f"algorithm on {match_metric}")
        flat_r = images.reshape(n * m, *images.shape[2:])
        flat_t = truth.reshape(n * m, *truth.shape[2:])
        if min(cap.image_shape[:2]) >= SSIM_MIN_SIDE:
            metrics.update(image_metrics(flat_r, flat_t))
        else:
            from jaxleak import metrics as fns

            for name in ("psnr", "mse"):
                metrics[name] = np.asarray(getattr(fns, name)(jnp.asarray(flat_r), jnp.asarray(flat_t)))
            notes.append(f"no SSIM: {cap.image_shape[0]}x{cap.image_shape[1]} images are below its "
                         f"{SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} window")
        if lpips_net is not None:
            metrics.update(lpips_metric(flat_r, flat_t, net=lpips_net, weights_dir=weights_dir, notes=notes))
    elif images is not None:
        notes.append("the capture holds no true images: no image metrics")
    if labels is not None and cap.truth_labels is not None:
        metrics["label_correct"] = (np.asarray(labels).reshape(-1) ==
                                    np.asarray(cap.truth_labels).reshape(-1)).astype(np.float32)
    if "features_raw" in output.arrays and truth is not None and m == 1 and victim is not None:
        from jaxleak.audit.workflow import layer_inputs

        true = layer_inputs(victim, variables, truth[:, 0], cap.meta.get("layer", "head"))
        metrics.update(feature_metrics(output.arrays["features_raw"], output.arrays["features"], true))
    for k, v in per_target.items():
        if v.size == n * m:
            metrics[k] = v.astype(np.float32)
    return {"images": images, "labels": labels, "per_target": per_target, "metrics": metrics, "notes": notes}
