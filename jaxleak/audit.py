"""The audit workflow: data -> victim -> protected updates -> attack -> metrics.

Plain functions that the CLI (and users' scripts) call with plain values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak.capture import Capture, capture_updates, time_capture, unflatten_tree
from jaxleak.privacy import DPConfig


def load_data(name: str, *, split: str = "test", n: int | None = None, seed: int = 0,
              image_size=None, data_dir: str | None = None, download: bool = False):
    """Loads a dataset by name or path (see :func:`jaxleak.data.load_dataset`)."""
    from jaxleak.data import load_dataset

    return load_dataset(name, split=split, n=n, seed=seed, image_size=image_size,
                        data_dir=data_dir, download=download)


def _model_options(width: int | None, hidden: Sequence[int] | None, precode: int | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if precode is not None:
        opts["precode"] = int(precode)
    if width is not None:
        opts["width"] = int(width)
    if hidden is not None:
        opts["hidden"] = [int(h) for h in hidden]
    return opts


def make_victim(model: str, *, image_shape, num_classes: int, options: dict[str, Any] | None = None):
    """A :class:`jaxleak.models.Victim` from plain values (as stored in capture metadata)."""
    from jaxleak.models import get_victim

    opts = dict(options or {})
    if "hidden" in opts and opts["hidden"] is not None:
        opts["hidden"] = tuple(opts["hidden"])
    return get_victim(model, image_shape=tuple(int(v) for v in image_shape), num_classes=int(num_classes),
                      **opts)


def build_victim(model: str, *, dataset=None, image_shape=None, num_classes: int | None = None,
                 width: int | None = None, hidden: Sequence[int] | None = None, precode: int | None = None,
                 checkpoint: str | None = None, init_seed: int = 0):
    """Builds the victim and its variables; returns ``(victim, variables, meta)``.

    Variables come from ``checkpoint`` (``jaxleak train-victim``) when given,
    otherwise from the victim's initialisation with ``init_seed``.
    """
    if dataset is not None:
        image_shape = dataset.images.shape[1:]
        num_classes = dataset.num_classes
    if image_shape is None or num_classes is None:
        raise ValueError("build_victim needs a dataset or image_shape and num_classes")
    options = _model_options(width, hidden, precode)
    victim = make_victim(model, image_shape=image_shape, num_classes=num_classes, options=options)
    meta: dict[str, Any] = {"model_options": options}
    if checkpoint:
        from jaxleak.models import load_variables

        variables, _ = load_variables(checkpoint, victim)
        meta.update(checkpoint=os.path.abspath(checkpoint), init_seed=None)
    else:
        variables = victim.init(jax.random.PRNGKey(init_seed))
        meta.update(checkpoint=None, init_seed=int(init_seed))
    return victim, variables, meta


def capture(victim, variables, dataset, *, dp: DPConfig | None = None, defenses=None, protocol=None,
            samples: int = 1, seed: int = 0, layer: str = "head", chunk_size: int = 256,
            keep_update: bool = False, keep_params: bool = False, extra_meta: dict | None = None,
            progress: bool = False, conv_impl: str = "auto") -> Capture:
    """Captures the protected updates of clients holding ``dataset``'s images (``samples`` each)."""
    from jaxleak.protocols import FEDSGD

    meta = {
        "dataset": dataset.name,
        "dataset_split": dataset.split,
        "dataset_source": dataset.source,
        "dataset_indices": [int(i) for i in np.asarray(dataset.indices)[:100_000]],
        **(extra_meta or {}),
    }
    return capture_updates(victim, variables, dataset.images, dataset.labels, dp=dp, defenses=defenses,
                           protocol=protocol or FEDSGD, samples=samples, seed=seed, layer=layer,
                           chunk_size=chunk_size, keep_update=keep_update, keep_params=keep_params, meta=meta,
                           progress=progress, conv_impl=conv_impl)


def victim_from_capture(cap: Capture):
    """Recreates the victim and its capture-time variables, or ``None`` when impossible."""
    meta = cap.meta
    try:
        victim = make_victim(meta["model"], image_shape=meta["image_shape"],
                             num_classes=meta.get("num_classes", cap.fc_bias_grad.shape[1]),
                             options=meta.get("model_options"))
    except (ValueError, KeyError):
        return None
    if cap.params:
        return victim, jax.tree_util.tree_map(jnp.asarray, unflatten_tree(cap.params))
    if meta.get("checkpoint") and os.path.exists(meta["checkpoint"]):
        from jaxleak.models import load_variables

        return victim, load_variables(meta["checkpoint"], victim)[0]
    if meta.get("init_seed") is not None:
        return victim, victim.init(jax.random.PRNGKey(int(meta["init_seed"])))
    return None


@functools.lru_cache(maxsize=16)
def _layer_input_fn(victim, layer: str):
    return jax.jit(lambda v, x: victim.layer_input(v, x, layer=layer))


def layer_inputs(victim, variables, images: np.ndarray, layer: str = "head", batch: int = 512) -> np.ndarray:
    """The true input ``[N, d]`` of ``layer`` for ``images`` (what SPE tries to recover)."""
    fn = _layer_input_fn(victim, layer)
    out = [np.asarray(fn(variables, images[i:i + batch])) for i in range(0, len(images), batch)]
    return np.concatenate(out)


def recovers_image(meta: dict) -> bool:
    """Whether the attacked layer's input is the image itself (first dense layer of an mlp)."""
    return meta.get("layer") == "first" and list(meta["feature_shape"]) == list(meta["image_shape"])


def resolve_sigma2(cap: Capture, sigma2: str | float) -> tuple[float | None, str]:
    """``(sigma2 or None for estimate, source label)`` for SPE on ``cap``."""
    if isinstance(sigma2, int | float):
        if sigma2 < 0 or not math.isfinite(sigma2):
            raise ValueError(f"sigma2 must be a finite number >= 0, got {sigma2}")
        return float(sigma2), "given"
    if sigma2 == "estimate":
        return None, "estimated"
    if sigma2 == "mechanism":
        var = cap.meta.get("noise_variance")
        if isinstance(var, int | float) and math.isfinite(var):
            return float(var), "mechanism"
        return None, "estimated (capture has no noise_variance)"
    raise ValueError(f"sigma2 must be 'mechanism', 'estimate' or a number, got {sigma2!r}")


def run_spe(cap: Capture, *, sigma2: str | float = "mechanism", refine: bool = True, wavelet: str = "db4",
            levels: int = 2, chunk_size: int | None = 512):
    """SPE on every capture in ``cap``; returns ``(SPEResult as numpy, sigma2 source)``."""
    from jaxleak.attacks.spe import SPEConfig, spe_batch

    s2, source = resolve_sigma2(cap, sigma2)
    config = SPEConfig(wavelet=wavelet, levels=levels, refine=refine,
                       noise_rank=int(cap.meta.get("batch_size", 1)))
    result = spe_batch(cap.fc_weight_grad, cap.fc_bias_grad, feature_shape=cap.feature_shape, sigma2=s2,
                       config=config, chunk_size=chunk_size)
    return jax.tree_util.tree_map(np.asarray, result), source


def image_metrics(recon: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image PSNR, SSIM and MSE ([N] each)."""
    from jaxleak import metrics

    x, y = jnp.asarray(recon, jnp.float32), jnp.asarray(truth, jnp.float32)
    return {k: np.asarray(getattr(metrics, k)(x, y)) for k in ("psnr", "ssim", "mse")}


LPIPS_SMALL_RESIZE = 64


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


def attack_spe(cap: Capture, *, out_dir: str, sigma2: str | float = "mechanism", refine: bool = True,
               wavelet: str = "db4", levels: int = 2, chunk_size: int | None = 512) -> dict[str, Any]:
    """Runs SPE on a capture and writes ``features.npz`` (+ ``reconstructions.npz``, ``metrics.json``).

    Returns a JSON-ready summary (what was written, metric means).
    """
    from jaxleak.report.summary import write_metrics_json

    os.makedirs(out_dir, exist_ok=True)
    res, source = run_spe(cap, sigma2=sigma2, refine=refine, wavelet=wavelet, levels=levels,
                          chunk_size=chunk_size)
    n = cap.n
    np.savez(os.path.join(out_dir, "features.npz"), features_raw=res.features_raw,
             features=res.features.reshape(n, *cap.feature_shape), noise_strength=res.noise_strength,
             selected=res.selected, sigma2=res.sigma2, sigma2_estimated=res.sigma2_estimated)
    written = ["features.npz"]
    batch = int(cap.meta.get("batch_size", 1))
    extra = {
        "attack": "spe",
        "captures": cap.meta,
        "sigma2_source": source,
        "refine": refine,
        "wavelet": wavelet,
        "levels": levels,
        "calibration": cap.meta.get("calibration"),
        "epsilon": cap.meta.get("epsilon"),
    }
    metrics: dict[str, np.ndarray] = {}
    if recovers_image(cap.meta):
        recon = np.clip(res.features.reshape(n, *cap.image_shape), 0.0, 1.0).astype(np.float32)
        np.savez(os.path.join(out_dir, "reconstructions.npz"), images=recon)
        written.append("reconstructions.npz")
        if cap.images is not None and batch == 1:
            metrics.update(image_metrics(recon, cap.images_float()))
    elif cap.images is not None and batch == 1:
        rebuilt = victim_from_capture(cap)
        if rebuilt is not None:
            victim, variables = rebuilt
            true = layer_inputs(victim, variables, cap.images_float(), cap.meta.get("layer", "head"))
            metrics.update(feature_metrics(res.features_raw, res.features, true))
        else:
            extra["note"] = "victim could not be recreated from the capture: no feature metrics"
    if batch > 1:
        extra["note"] = f"client batches of B={batch}: SPE recovers a mixture; per-image metrics are not computed"
    metrics["noise_strength"] = res.noise_strength
    metrics["selected_count"] = res.selected.sum(-1).astype(np.float32)
    write_metrics_json(os.path.join(out_dir, "metrics.json"), metrics, extra=extra)
    written.append("metrics.json")
    means = {k: float(np.nanmean(np.where(np.isinf(v), np.nan, v))) for k, v in metrics.items()}
    return {"out": out_dir, "written": written, "n": n, "sigma2_source": source, "means": means}


def bench_capture(victim, variables, *, batch: int = 1024, repeats: int = 10, protocol=None, samples: int = 1,
                  defenses=None, dp: DPConfig | None = None, conv_impl: str = "auto") -> dict[str, Any]:
    """Throughput of capture for ``victim`` (compile time excluded, median of ``repeats``)."""
    from jaxleak.protocols import FEDSGD

    result = time_capture(victim, variables, dp=dp, defenses=defenses, protocol=protocol or FEDSGD,
                          samples=samples, batch=batch, repeats=repeats, conv_impl=conv_impl)
    return {"benchmark": "capture", "model": victim.name, "image_shape": list(victim.image_shape),
            "num_classes": victim.num_classes, **result}


def train_and_save_victim(model: str, dataset, *, out: str, width=None, hidden=None, steps: int = 500,
                          batch_size: int = 64, learning_rate: float = 1e-3, seed: int = 0,
                          progress: bool = True) -> str:
    """Trains a victim on ``dataset`` and writes an orbax checkpoint to ``out``."""
    from jaxleak.models import save_variables, train_victim

    victim, _, meta = build_victim(model, dataset=dataset, width=width, hidden=hidden, init_seed=seed)
    variables = train_victim(victim, dataset.images, dataset.labels, steps=steps, batch_size=batch_size,
                             learning_rate=learning_rate, seed=seed, progress=progress)
    save_variables(out, variables, metadata={
        "model": model, "image_shape": list(victim.image_shape), "num_classes": victim.num_classes,
        "options": meta["model_options"], "dataset": dataset.name, "split": dataset.split,
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed})
    return os.path.abspath(out)


def train_recovery(variant: str, aux, *, model: str, out: str, width: int | None = None,
                   hidden: Sequence[int] | None = None, victim_checkpoint: str | None = None,
                   init_seed: int = 0, calibration: str = "paper", mechanism: str = "gaussian",
                   epsilons: Sequence[float] = (1.0, 5.0, 10.0), delta: float = 1e-5, clip: float = 1.0,
                   dp_lr: float = 1e-3, accountant: str = "rdp", sigma2: str = "mechanism",
                   layer: str = "head", network: dict[str, Any] | None = None,
                   train: dict[str, Any] | None = None, eval_data=None, resume: bool = False,
                   triplet_cache: str | None = None, spe: dict[str, Any] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Trains a Venom recovery network on the auxiliary dataset ``aux`` into ``out``.

    Args:
      variant: ``"venom"``, ``"venom-diff"`` or ``"fgla"``.
      aux: the attacker's auxiliary :class:`jaxleak.data.Dataset` (must be
        disjoint from the images later attacked: another split or dataset).
      model, width, hidden, victim_checkpoint, init_seed: the victim (as for
        :func:`build_victim`); captures attacked later must come from the same one.
      calibration, mechanism, epsilons, delta, clip, dp_lr, accountant, sigma2,
        layer: the protection the training triplets simulate
        (:class:`jaxleak.attacks.venom.TripletConfig`).
      network: extra :class:`RecoveryNetConfig` fields (base_width, multipliers, ...).
      train: extra :class:`TrainConfig` fields (steps, batch_size, ...).
      eval_data: held-out dataset; default: the last ``eval_size`` aux images.
      resume: continue the run in ``out``.
      triplet_cache: ``.npz`` path: train on one fixed triplet per auxiliary
        image, built once there (or reused); ``None``: fresh triplets every step.
      spe: :class:`SPEConfig` fields for the triplets (stored in the checkpoint;
        attacks with the network use the same SPE settings).
      progress: tqdm bar.

    Returns:
      A JSON-ready summary (checkpoint path, steps, final loss, last eval PSNR/SSIM).
    """
    from jaxleak.attacks.spe import SPEConfig
    from jaxleak.attacks.venom import RecoveryNetConfig, TripletConfig
    from jaxleak.attacks.venom.train import TrainConfig, train_recovery_net

    victim, variables, vmeta = build_victim(model, dataset=aux, width=width, hidden=hidden,
                                            checkpoint=victim_checkpoint, init_seed=init_seed)
    if layer not in victim.layers:
        raise ValueError(f"victim {model} has no layer {layer!r}; available: {sorted(victim.layers)}")
    net_config = RecoveryNetConfig(image_shape=tuple(victim.image_shape),
                                   feature_shape=tuple(victim.layers[layer].feature_shape),
                                   variant=variant, **(network or {}))
    train_config = TrainConfig(variant=variant, **(train or {}))
    triplet_config = TripletConfig(calibration=calibration, mechanism=mechanism,
                                   epsilons=tuple(float(e) for e in epsilons), delta=delta, clip=clip,
                                   lr=dp_lr, accountant=accountant, sigma2=sigma2, layer=layer,
                                   features="fgla" if variant == "fgla" else "spe")
    info = {
        "victim": {**victim.metadata(), "init_seed": vmeta.get("init_seed"),
                   "checkpoint": vmeta.get("checkpoint"), "layer": layer,
                   "feature_shape": list(victim.layers[layer].feature_shape)},
        "aux_dataset": {"name": aux.name, "split": aux.split, "source": aux.source, "n": len(aux.images)},
    }
    eval_images = eval_labels = None
    if eval_data is not None:
        eval_images, eval_labels = eval_data.images, eval_data.labels
        info["eval_dataset"] = {"name": eval_data.name, "split": eval_data.split, "source": eval_data.source}
    result = train_recovery_net(net_config, victim, variables, aux.images, aux.labels, config=train_config,
                                triplet_config=triplet_config, spe_config=SPEConfig(**(spe or {})),
                                eval_images=eval_images,
                                eval_labels=eval_labels, out_dir=out, resume=resume, info=info,
                                triplet_cache=triplet_cache, progress=progress)
    h = result.history
    return {"checkpoint": os.path.abspath(out), "variant": variant, "step": result.step,
            "final_loss": h["loss"][-1] if h["loss"] else None,
            "eval_psnr": h["eval_psnr"][-1] if h["eval_psnr"] else None,
            "eval_ssim": h["eval_ssim"][-1] if h["eval_ssim"] else None,
            "aux_dataset": info["aux_dataset"]}


def _check_capture_fits(cap: Capture, info: dict[str, Any], path: str) -> list[str]:
    """Errors (refusals) for a capture the checkpoint cannot attack; returns notes for softer mismatches."""
    victim = info.get("victim", {})
    meta = cap.meta
    num_classes = meta.get("num_classes", cap.fc_bias_grad.shape[1])
    pairs = [
        ("model", victim.get("model"), meta.get("model")),
        ("image_shape", list(victim.get("image_shape", [])), list(cap.image_shape)),
        ("num_classes", victim.get("num_classes"), int(num_classes)),
        ("feature_shape", list(victim.get("feature_shape", [])), list(cap.feature_shape)),
        ("layer", victim.get("layer"), meta.get("layer", "head")),
    ]
    try:  # the capture's options may be partial; rebuilding gives the canonical form stored in checkpoints
        cap_opts = make_victim(meta["model"], image_shape=cap.image_shape, num_classes=num_classes,
                               options=meta.get("model_options")).metadata()["options"]
    except (ValueError, KeyError, TypeError):
        cap_opts = meta.get("model_options")
    pairs.append(("model options", victim.get("options"), _json_ready(cap_opts)))
    diffs = [f"{name}: checkpoint {a!r}, capture {b!r}" for name, a, b in pairs if a != b]
    if diffs:
        raise ValueError(f"checkpoint {path} was trained for another victim than the capture's: "
                         + "; ".join(diffs))
    notes = []
    if victim.get("checkpoint") != meta.get("checkpoint") or victim.get("init_seed") != meta.get("init_seed"):
        notes.append(f"the capture's victim weights (checkpoint={meta.get('checkpoint')}, "
                     f"init_seed={meta.get('init_seed')}) differ from those the network was trained on "
                     f"(checkpoint={victim.get('checkpoint')}, init_seed={victim.get('init_seed')})")
    return notes


def _json_ready(value):
    """``value`` after a JSON round trip (tuples become lists)."""
    import json

    return json.loads(json.dumps(value))


def attack_venom(cap: Capture, *, checkpoint: str, out_dir: str, variant: str | None = None,
                 sigma2: str | float = "mechanism", batch_size: int = 256, chunk_size: int | None = 512,
                 lpips_net: str = "alex", weights_dir: str | None = None) -> dict[str, Any]:
    """SPE + a trained recovery network on a capture; writes ``reconstructions.npz`` and ``metrics.json``.

    Args:
      cap: the captures (one image per client).
      checkpoint: directory written by :func:`train_recovery`.
      out_dir: output folder.
      variant: when given, the checkpoint's variant must be this one.
      sigma2: SPE's noise variance, as for :func:`run_spe`.
      batch_size: captures per compiled network call.
      chunk_size: captures per compiled SPE call.
      lpips_net, weights_dir: LPIPS backbone and weights root (see :func:`jaxleak.metrics.lpips`).

    Returns:
      A JSON-ready summary (what was written, metric means).

    Raises:
      ValueError: the checkpoint was trained for another victim, layer or image
        shape than the capture's, or for another variant than ``variant``.
    """
    from jaxleak.attacks.spe import SPEConfig, spe_batch
    from jaxleak.attacks.venom.infer import recover_images
    from jaxleak.attacks.venom.train import load_recovery_net, read_checkpoint_info
    from jaxleak.report.summary import write_metrics_json

    info = read_checkpoint_info(checkpoint)
    trained = info["network"]["variant"]
    if variant is not None and variant != trained:
        raise ValueError(f"checkpoint {checkpoint} holds a {trained!r} network, not {variant!r}")
    notes = _check_capture_fits(cap, info, checkpoint)
    batch = int(cap.meta.get("batch_size", 1))
    if batch > 1:
        notes.append(f"client batches of B={batch}: SPE recovers a mixture; the network was trained on B=1")
    model, params, info = load_recovery_net(checkpoint)
    feature_kind = (info.get("triplets") or {}).get("features", "spe")
    if feature_kind == "fgla":  # FGLA's label row; T is unused by its generator
        from jaxleak.attacks.fgla import fgla_batch

        if batch > 1:
            raise ValueError("FGLA features are defined here for one image per capture (B=1)")
        res = fgla_batch(cap.fc_weight_grad, cap.fc_bias_grad, feature_shape=cap.feature_shape,
                         chunk_size=chunk_size)
        features, noise_strength = res.features, np.zeros((cap.n,), np.float32)
        source = "unused (FGLA features)"
        label_acc = float(np.mean(res.labels == np.asarray(cap.labels).reshape(-1)))
        notes.append(f"FGLA label row inferred from the update (argmin of the bias gradient); "
                     f"correct for {label_acc:.1%} of captures")
    else:
        s2, source = resolve_sigma2(cap, sigma2)
        spe_fields = {k: v for k, v in info.get("spe", {}).items() if k != "noise_rank"}
        spe_config = SPEConfig(**spe_fields, noise_rank=batch)
        res = spe_batch(cap.fc_weight_grad, cap.fc_bias_grad, feature_shape=cap.feature_shape,
                        sigma2=s2, config=spe_config, chunk_size=chunk_size)
        features = np.asarray(res.features).reshape(cap.n, *cap.feature_shape)
        noise_strength = np.asarray(res.noise_strength)
    recon = recover_images(model, params, features, noise_strength, batch_size=batch_size)
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, "reconstructions.npz"), images=recon.astype(np.float32))
    written = ["reconstructions.npz"]
    metrics: dict[str, np.ndarray] = {}
    if cap.images is not None and batch == 1:
        truth = cap.images_float()
        metrics.update(image_metrics(recon, truth))
        metrics.update(lpips_metric(recon, truth, net=lpips_net, weights_dir=weights_dir, notes=notes))
    elif cap.images is None:
        notes.append("the capture holds no true images: no image metrics")
    if feature_kind == "spe":
        metrics["noise_strength"] = noise_strength
    extra = {
        "features": feature_kind,
        "attack": trained,
        "checkpoint": os.path.abspath(checkpoint),
        "checkpoint_step": info["step"],
        "trained_on": info.get("aux_dataset"),
        "trained_for": {"triplets": info.get("triplets"), "victim": info.get("victim")},
        "captures": cap.meta,
        "sigma2_source": source,
        "calibration": cap.meta.get("calibration"),
        "epsilon": cap.meta.get("epsilon"),
    }
    aux = info.get("aux_dataset") or {}
    if (aux.get("name"), aux.get("split")) == (cap.meta.get("dataset"), cap.meta.get("dataset_split")):
        notes.append("the network was trained on the same dataset split the captures come from: "
                     "auxiliary and attacked images may overlap")
    if notes:
        extra["note"] = "; ".join(notes)
    write_metrics_json(os.path.join(out_dir, "metrics.json"), metrics, extra=extra)
    written.append("metrics.json")
    means = {k: float(np.nanmean(np.where(np.isinf(v), np.nan, v))) for k, v in metrics.items()}
    return {"out": out_dir, "written": written, "n": cap.n, "attack": trained, "sigma2_source": source,
            "trained_on": info.get("aux_dataset"), "means": means}


OPTIMIZATION_ATTACKS = ("dlg", "idlg", "ig", "gradinversion", "grnn", "mjolnir")


def _capture_variables(cap: Capture, attack: str):
    """The victim and its variables for an optimisation attack, or a one-line ``ValueError``."""
    if not cap.update:
        raise ValueError(f"attack {attack} matches the whole update, but the capture holds only the head's "
                         f"gradient: capture with --keep-update")
    rebuilt = victim_from_capture(cap)
    if rebuilt is None:
        raise ValueError(f"attack {attack} needs the victim's weights: capture with --keep-params, or keep "
                         f"meta.init_seed / an existing meta.checkpoint (model {cap.meta.get('model')!r})")
    return rebuilt


def attack_optimization(cap: Capture, attack: str, *, out_dir: str, overrides: dict[str, Any] | None = None,
                        null: str | None = None, match_metric: str = "psnr", chunk: int = 100,
                        target_batch: int = 16, patience: int | None = None, min_delta: float = 1e-4,
                        seed: int = 0, progress: bool = False, batching: str = "vmap",
                        unroll: int = 1, conv_impl: str = "auto", devices: int | None = None,
                        lpips_net: str | None = "alex",
                        weights_dir: str | None = None) -> dict[str, Any]:
    """An optimisation attack (DLG, iDLG, IG, GradInversion, GRNN, Mjolnir) on every capture.

    Writes ``reconstructions.npz`` (``images`` ``[N, H, W, C]`` or ``[N, B, H, W, C]``
    in [0, 1], ``labels``, ``matching_loss``, ``best_iteration``) and ``metrics.json``
    (per image PSNR / SSIM / MSE / label correctness when the capture holds the
    images; timing and the config in the header).

    Args:
      cap: captures holding the whole update (``--keep-update``) and a way to
        rebuild the victim's variables (``--keep-params``, ``meta.init_seed`` or
        ``meta.checkpoint``).
      attack: one of :data:`OPTIMIZATION_ATTACKS`.
      out_dir: output folder.
      overrides: config fields to change from the reference setting.
      null: ``None``, or ``"shuffle"`` / ``"noise"`` to run the null control
        (:func:`jaxleak.attacks.optimization.null_updates`) instead of the real updates.
      match_metric: metric the Hungarian assignment maximises for client batches B > 1.
      chunk, target_batch, patience, min_delta, seed, progress, batching, unroll, devices: the
        driver's options (:class:`jaxleak.attacks.optimization.RunOptions`).
      conv_impl: the victim's convolutions during the attack
        (:func:`jaxleak.attacks.optimization.attack_conv_impl`; only the speed changes).
      lpips_net, weights_dir: LPIPS backbone (``None``: no LPIPS) and weights root
        (see :func:`lpips_metric`; missing weights leave a note instead of the column).

    Returns:
      A JSON-ready summary (what was written, metric means, timing).
    """
    from jaxleak.attacks import optimization as opt
    from jaxleak.report.summary import write_metrics_json

    if attack not in OPTIMIZATION_ATTACKS:
        raise ValueError(f"unknown optimisation attack {attack!r}; known: {', '.join(OPTIMIZATION_ATTACKS)}")
    victim, variables = _capture_variables(cap, attack)
    updates = jax.tree_util.tree_map(np.asarray, unflatten_tree(cap.update))
    opt.check_updates(victim, variables, updates)
    batch = int(cap.meta.get("batch_size", 1))
    true_labels = np.asarray(cap.labels).reshape(cap.n, batch)
    if null is not None:
        updates = opt.null_updates(updates, kind=null, seed=seed)
    if attack == "mjolnir":
        from jaxleak.attacks.optimization import mjolnir

        config, res, extra_info = mjolnir.reconstruct_capture(
            cap, victim, variables, updates, overrides=overrides or {}, chunk=chunk,
            target_batch=target_batch, patience=patience, min_delta=min_delta, seed=seed, progress=progress,
            batching=batching, unroll=unroll, conv_impl=conv_impl, devices=devices)
    else:
        config = opt.default_config(attack, **(overrides or {}))
        res = opt.reconstruct(attack, victim, variables, updates, config=config, batch_size=batch,
                              true_labels=true_labels, chunk=chunk, target_batch=target_batch,
                              patience=patience, min_delta=min_delta, seed=seed, progress=progress,
                              batching=batching, unroll=unroll, conv_impl=conv_impl, devices=devices)
        extra_info = {}
    recon = np.clip(res.images, 0.0, 1.0).astype(np.float32)
    labels = np.asarray(res.label_probs).argmax(-1)
    truth = None if cap.images is None else cap.images_float().reshape(cap.n, batch, *cap.image_shape)
    if truth is not None and batch > 1:
        for i in range(cap.n):
            perm = opt.match_batch(recon[i], truth[i], metric=match_metric)
            recon[i], labels[i] = recon[i][perm], labels[i][perm]
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, "reconstructions.npz"),
             images=recon[:, 0] if batch == 1 else recon, labels=labels[:, 0] if batch == 1 else labels,
             matching_loss=res.loss, best_iteration=res.best_iteration)
    metrics: dict[str, np.ndarray] = {}
    notes = []
    if truth is not None:
        flat = lambda a: a.reshape(cap.n * batch, *a.shape[2:])
        if min(cap.image_shape[:2]) >= 11:
            metrics.update(image_metrics(flat(recon), flat(truth)))
            if lpips_net is not None:
                metrics.update(lpips_metric(flat(recon), flat(truth), net=lpips_net, weights_dir=weights_dir,
                                            notes=notes))
        else:
            from jaxleak import metrics as image_metric_fns

            for name in ("psnr", "mse"):
                metrics[name] = np.asarray(getattr(image_metric_fns, name)(flat(recon), flat(truth)))
            notes.append(f"no SSIM: {cap.image_shape[0]}x{cap.image_shape[1]} images are below its 11x11 window")
    else:
        notes.append("the capture holds no true images: no image metrics")
    metrics["label_correct"] = (labels == true_labels).reshape(-1).astype(np.float32)
    metrics["matching_loss"] = np.repeat(np.asarray(res.loss, np.float32), batch)
    if batch > 1:
        notes.append(f"client batches of B={batch}: reconstructions assigned to originals by the Hungarian "
                     f"algorithm on {match_metric}")
    if null is not None:
        notes.append(f"NULL CONTROL ({null}): the attacked updates carry no information about the images; "
                     f"these scores are the floor leakage must be measured against")
    extra = {
        "attack": attack,
        "config": _json_ready(dataclasses.asdict(config)),
        "null_control": null,
        "timing": res.timing(),
        "conv_impl": opt.attack_conv_impl(victim, conv_impl),
        "captures": cap.meta,
        "calibration": cap.meta.get("calibration"),
        "epsilon": cap.meta.get("epsilon"),
        **extra_info,
    }
    if notes:
        extra["note"] = "; ".join(notes)
    write_metrics_json(os.path.join(out_dir, "metrics.json"), metrics, extra=extra)
    means = {k: float(np.nanmean(np.where(np.isinf(v), np.nan, v))) for k, v in metrics.items()}
    return {"out": out_dir, "written": ["reconstructions.npz", "metrics.json"], "n": cap.n, "attack": attack,
            "null_control": null, "timing": res.timing(), "means": means}


__all__ = [
    "OPTIMIZATION_ATTACKS",
    "attack_optimization",
    "attack_spe",
    "attack_venom",
    "bench_capture",
    "build_victim",
    "capture",
    "feature_metrics",
    "image_metrics",
    "layer_inputs",
    "load_data",
    "lpips_metric",
    "make_victim",
    "recovers_image",
    "resolve_sigma2",
    "run_spe",
    "train_and_save_victim",
    "train_recovery",
    "victim_from_capture",
]
