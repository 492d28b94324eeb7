"""One evaluation path for every attack: match, score, summarise.

:func:`evaluate` turns an attack's :class:`~jaxleak.attacks.registry.AttackOutput`
and the capture's ground truth into per-image metrics (PSNR, SSIM, MSE, LPIPS,
FMSE, TV, label accuracy; feature cosines for feature attacks), computed once,
after the reconstructions of a client with ``M > 1`` images are assigned to its
images by the Hungarian algorithm.

FMSE follows breaching (``analysis.report``): the victim at the server weights
``w0`` maps reconstruction and truth to logits, and the squared difference is
averaged over the logit columns of the client's true labels (``[..., labels]``, a
label held twice counted twice). Per image ``i`` of a client with labels ``y``:
``fmse_i = mean_j (f(x_rec_i)[y_j] - f(x_i)[y_j])^2``, so the mean over a client's
images is breaching's figure. Here ``f`` is :meth:`jaxleak.models.Victim.apply`
with ``train=False`` (BatchNorm on its running statistics; PRECODE at its
bottleneck mean, no sample), on the scored images (after matching).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float, Int

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
        reason = str(error).splitlines()[0].removesuffix(" Looked for:")
        notes.append(f"lpips_{net} not computed: {reason}")
        return {}


FMSE_CHUNK = 256
"""Images per forward pass of the victim in :func:`fmse_metric` (inference mode: images are independent)."""


def fmse_metric(victim, variables, recon: Float[np.ndarray, "n m h w c"], truth: Float[np.ndarray, "n m h w c"],
                labels: Int[np.ndarray, "n m"] | None) -> Float[np.ndarray, " nm"]:
    """Per-image FMSE ``[N * M]``: breaching's logit MSE at the server weights (see the module docstring).

    Args:
      victim: the :class:`jaxleak.models.Victim`; variables: its server weights ``w0``.
      recon, truth: ``[N, M, H, W, C]`` matched reconstructions and true images in [0, 1].
      labels: ``[N, M]`` true labels, whose logit columns are compared; ``None``: every
        logit column (Inverting Gradients' ``(model(x) - model(x0)).pow(2).mean()``).

    Returns:
      ``[N * M]`` float32, client-major.

    >>> import jax
    >>> from jaxleak.models import get_victim
    >>> victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=4)
    >>> x = np.random.default_rng(0).random((1, 2, 4, 4, 1), dtype=np.float32)
    >>> fmse_metric(victim, victim.init(jax.random.key(0)), x, x, np.array([[0, 2]])).tolist()
    [0.0, 0.0]
    """
    n, m = recon.shape[:2]
    forward = jax.jit(lambda v, images: victim.apply(v, images, train=False))
    flat = lambda a: np.asarray(a, np.float32).reshape(n * m, *a.shape[2:])

    def logits(images):
        return np.concatenate([np.asarray(forward(variables, images[i:i + FMSE_CHUNK]))
                               for i in range(0, len(images), FMSE_CHUNK)])

    sq = np.square(logits(flat(recon)) - logits(flat(truth))).reshape(n, m, -1)
    if labels is None:
        return sq.mean(-1).reshape(-1).astype(np.float32)
    columns = np.asarray(labels).reshape(n, 1, m).repeat(m, axis=1)  # [n, m(images), m(labels)]
    return np.take_along_axis(sq, columns, axis=-1).mean(-1).reshape(-1).astype(np.float32)


def tv_metric(images: Float[np.ndarray, "n h w c"]) -> Float[np.ndarray, " n"]:
    """Per-image anisotropic TV of Inverting Gradients, ``mean |dx| + mean |dy|`` (pixels in [0, 1]).

    The attacks' regulariser :func:`jaxleak.attacks.optimization.total_variation`, one image at a time.

    >>> ramp = np.tile(np.arange(4, dtype=np.float32) / 4, (4, 1))[None, :, :, None]
    >>> tv_metric(ramp).tolist()  # |dx| = 0.25 everywhere, dy = 0
    [0.25]
    """
    from jaxleak.attacks.optimization import total_variation

    return np.asarray(jax.jit(jax.vmap(total_variation))(jnp.asarray(images, jnp.float32)))


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


LPIPS_ALSO = ("vgg",)
"""LPIPS backbones scored besides ``lpips_net`` where their weights exist (a note otherwise)."""


def evaluate(cap, output, *, victim=None, variables=None, lpips_net: str | None = "alex",
             lpips_also: Sequence[str] = LPIPS_ALSO, weights_dir: str | None = None,
             match_metric: str = "psnr") -> dict[str, Any]:
    """Scores an attack's output against the capture's ground truth.

    Per-image metrics (``[N * M]``, client-major, after matching): ``psnr``, ``ssim``
    (11 px and up), ``mse``, ``lpips_<net>``, ``fmse`` (see the module docstring; only with
    a victim), ``tv`` and ``tv_truth`` (:func:`tv_metric` of reconstruction and truth),
    ``label_correct``, the attack's per-target columns.

    Args:
      cap: the :class:`jaxleak.capture.Capture` (its ``truth_images``/``truth_labels``).
      output: the attack's :class:`~jaxleak.attacks.registry.AttackOutput`.
      victim, variables: the victim at the server weights ``w0``, for FMSE and, with
        feature attacks, the head input compared with the recovered features (``None``:
        neither, and a note says so).
      lpips_net: LPIPS backbone (``None``: no LPIPS at all); weights_dir: its weights root.
      lpips_also: further backbones scored where their weights exist (missing: a note).
      match_metric: what the Hungarian assignment maximises when ``M > 1``.

    Returns:
      ``{"images", "labels", "per_target", "metrics", "notes"}``: the reconstructions and
      labels in the order of the truth (after matching), the attack's per-target columns in
      the same order, the per-image metrics ``[N * M]`` and notes.

    >>> from jaxleak.attacks.registry import AttackOutput
    >>> from jaxleak.capture import capture_updates
    >>> from jaxleak.models import get_victim
    >>> victim = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=4)
    >>> w0 = victim.init(jax.random.key(0))
    >>> x = np.random.default_rng(0).random((2, 4, 4, 1), dtype=np.float32)
    >>> cap = capture_updates(victim, w0, x, np.array([0, 1]))
    >>> truth = cap.truth_images.astype(np.float32) / 255  # [N, M, H, W, C]
    >>> out = AttackOutput(images=truth, labels=None, per_target={}, arrays={}, info={})
    >>> result = evaluate(cap, out, victim=victim, variables=w0, lpips_net=None)
    >>> result["metrics"]["fmse"].tolist(), bool(np.allclose(result["metrics"]["tv"], result["metrics"]["tv_truth"]))
    ([0.0, 0.0], True)
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
            for net in dict.fromkeys((lpips_net, *lpips_also)):
                metrics.update(lpips_metric(flat_r, flat_t, net=net, weights_dir=weights_dir, notes=notes))
        if victim is None or variables is None:
            notes.append("no fmse: the run had no victim with the server weights w0")
        elif tuple(flat_r.shape[1:]) != tuple(victim.image_shape):
            notes.append(f"no fmse: reconstructions of shape {flat_r.shape[1:]} do not fit the victim")
        else:
            true_labels = None if cap.truth_labels is None else np.asarray(cap.truth_labels).reshape(n, m)
            metrics["fmse"] = fmse_metric(victim, variables, images, truth, true_labels)
            if true_labels is None:
                notes.append("fmse over every logit (the capture holds no labels to pick breaching's columns)")
        metrics["tv"] = tv_metric(flat_r)
        metrics["tv_truth"] = tv_metric(flat_t)
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
