"""The audit workflow's plain steps: data -> victim -> protected updates (and training helpers).

Plain functions that the CLI (and users' scripts) call with plain values. Attacks,
evaluation and writing results are :mod:`jaxleak.audit.run`.
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
                 checkpoint: str | None = None, init_seed: int = 0, global_epoch: float | None = None):
    """Builds the victim and its variables; returns ``(victim, variables, meta)``.

    Variables come from ``checkpoint`` (``jaxleak train-victim``, or a ``jaxleak train-fedavg``
    run: its last round, or with ``global_epoch`` the kept round that reached that epoch) when
    given, otherwise from the victim's initialisation with ``init_seed``.
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

        step = None
        if global_epoch is not None:
            from jaxleak.protocols.server import round_at_epoch

            step = round_at_epoch(checkpoint, global_epoch)
            meta.update(checkpoint_round=step, global_epoch=global_epoch)
        variables, _ = load_variables(checkpoint, victim, step=step)
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

        return victim, load_variables(meta["checkpoint"], victim, step=meta.get("checkpoint_round"))[0]
    if meta.get("init_seed") is not None:
        return victim, victim.init(jax.random.PRNGKey(int(meta["init_seed"])))
    return None


@functools.lru_cache(maxsize=16)
def _layer_input_fn(victim, layer: str):
    return jax.jit(lambda v, x: victim.layer_input(v, x, layer=layer))


def layer_inputs(victim, variables, images: np.ndarray, layer: str = "head", batch: int = 512) -> np.ndarray:
    """The true input ``[N, d]`` of ``layer`` for ``images`` (what SPE tries to recover)."""
    from jaxleak._batching import map_chunked

    return map_chunked(_layer_input_fn(victim, layer), images, shared=(variables,), chunk=batch)


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
                   aux_request: dict[str, Any] | None = None, eval_request: dict[str, Any] | None = None,
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
      aux_request, eval_request: how ``aux`` / ``eval_data`` were loaded (the arguments of
        :func:`load_data`: name, split, n, seed, image_size), stored so that
        :func:`resume_recovery` can continue the run from its folder alone.
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
        "aux_dataset": {"name": aux.name, "split": aux.split, "source": aux.source, "n": len(aux.images),
                        "request": aux_request},
    }
    eval_images = eval_labels = None
    if eval_data is not None:
        eval_images, eval_labels = eval_data.images, eval_data.labels
        info["eval_dataset"] = {"name": eval_data.name, "split": eval_data.split, "source": eval_data.source,
                                "request": eval_request}
    result = train_recovery_net(net_config, victim, variables, aux.images, aux.labels, config=train_config,
                                triplet_config=triplet_config, spe_config=SPEConfig(**(spe or {})),
                                eval_images=eval_images,
                                eval_labels=eval_labels, out_dir=out, resume=resume, info=info,
                                triplet_cache=triplet_cache, progress=progress)
    return _recovery_summary(out, variant, result, info["aux_dataset"])


def _recovery_summary(out: str, variant: str, result, aux_dataset: dict[str, Any]) -> dict[str, Any]:
    h = result.history
    return {"checkpoint": os.path.abspath(out), "variant": variant, "step": result.step,
            "final_loss": h["loss"][-1] if h["loss"] else None,
            "eval_psnr": h["eval_psnr"][-1] if h["eval_psnr"] else None,
            "eval_ssim": h["eval_ssim"][-1] if h["eval_ssim"] else None,
            "aux_dataset": aux_dataset}


def _load_requested(request: dict[str, Any], *, data_dir: str | None, download: bool):
    size = request.get("image_size")
    return load_data(request["name"], split=request["split"], n=request.get("n"), seed=request.get("seed", 0),
                     image_size=tuple(size) if isinstance(size, list) else size, data_dir=data_dir,
                     download=download)


def resume_recovery(out: str, *, triplet_cache: str | None = None, data_dir: str | None = None,
                    download: bool = False, progress: bool = True) -> dict[str, Any]:
    """Continues a recovery-network run from its folder alone (``jaxleak train VARIANT --resume``).

    The network, training, triplet and SPE settings, the victim and the auxiliary (and held-out)
    data are read from ``out``'s stored config; nothing needs repeating.

    Raises:
      ArtifactError: ``out`` does not exist or holds no recovery network.
      ValueError: the run does not record how its data was loaded (started by an older version).
    """
    from jaxleak.attacks.venom.train import read_run_settings, train_recovery_net

    settings = read_run_settings(out)
    info = settings.info
    request = (info.get("aux_dataset") or {}).get("request")
    if not request:
        raise ValueError(f"{out} does not record how its auxiliary data was loaded; resume it with the flags "
                         f"it was started with")
    aux = _load_requested(request, data_dir=data_dir, download=download)
    eval_images = eval_labels = None
    eval_request = (info.get("eval_dataset") or {}).get("request")
    if eval_request:
        held_out = _load_requested(eval_request, data_dir=data_dir, download=download)
        eval_images, eval_labels = held_out.images, held_out.labels
    v = info["victim"]
    opts = dict(v.get("options") or {})
    victim, variables, _ = build_victim(v["model"], image_shape=v["image_shape"], num_classes=v["num_classes"],
                                        width=opts.get("width"), hidden=opts.get("hidden"),
                                        precode=opts.get("precode"), checkpoint=v.get("checkpoint"),
                                        init_seed=v.get("init_seed") or 0)
    result = train_recovery_net(None, victim, variables, aux.images, aux.labels, eval_images=eval_images,
                                eval_labels=eval_labels, out_dir=out, resume=True, triplet_cache=triplet_cache,
                                progress=progress)
    return _recovery_summary(out, settings.net_config.variant, result, info["aux_dataset"])


__all__ = [
    "bench_capture",
    "build_victim",
    "capture",
    "layer_inputs",
    "load_data",
    "make_victim",
    "train_and_save_victim",
    "resume_recovery",
    "train_recovery",
    "victim_from_capture",
]
