"""The registered attacks: SPE, the recovery networks (Venom, Venom-Diff, FGLA) and the
optimisation family (DLG, iDLG, IG, GradInversion, GRNN, Mjolnir).

Each runner turns a capture (plus its config and :class:`Context`) into an
:class:`AttackOutput`; it never reads the capture's ground truth except labels
where the attack's threat model gives them, and it never evaluates or writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import numpy as np

from jaxleak.attacks.registry import (
    DRIVER_OPTIONS,
    Attack,
    AttackInputError,
    AttackOutput,
    Context,
    Option,
    register,
)


def _json_ready(value):
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------- SPE


def resolve_sigma2(cap, sigma2: str | float) -> tuple[float | None, str]:
    """``(sigma2 or None for estimate, source label)`` for SPE on ``cap``."""
    if isinstance(sigma2, int | float) and not isinstance(sigma2, bool):
        if sigma2 < 0 or not math.isfinite(sigma2):
            raise AttackInputError(f"sigma2 must be a finite number >= 0, got {sigma2}")
        return float(sigma2), "given"
    if sigma2 == "estimate":
        return None, "estimated"
    if sigma2 == "mechanism":
        var = cap.meta.get("noise_variance")
        if isinstance(var, int | float) and math.isfinite(var):
            return float(var), "mechanism"
        return None, "estimated (capture has no noise_variance)"
    raise AttackInputError(f"sigma2 must be 'mechanism', 'estimate' or a number, got {sigma2!r}")


def recovers_image(meta: dict) -> bool:
    """Whether the attacked layer's input is the image itself (first dense layer of an mlp)."""
    return meta.get("layer") == "first" and list(meta["feature_shape"]) == list(meta["image_shape"])


def run_spe(cap, config=None, *, sigma2: str | float = "mechanism", chunk_size: int | None = 512):
    """SPE on every client of a capture; returns ``(SPEResult as numpy, sigma2 source)``.

    ``config`` defaults to :class:`SPEConfig` (its ``noise_rank`` is set to the capture's M).
    """
    from jaxleak.attacks.spe import SPEConfig, spe_batch

    config = SPEConfig() if config is None else config
    s2, source = resolve_sigma2(cap, sigma2)
    config = dataclasses.replace(config, noise_rank=cap.samples)
    result = spe_batch(cap.fc_weight_grad, cap.fc_bias_grad, feature_shape=cap.feature_shape, sigma2=s2,
                       config=config, chunk_size=chunk_size)
    return jax.tree_util.tree_map(np.asarray, result), source


def _sigma2_option(text: str) -> str | float:
    if text in ("mechanism", "estimate"):
        return text
    try:
        return float(text)
    except ValueError:
        raise AttackInputError(f"--sigma2 must be 'mechanism', 'estimate' or a number, got {text!r}") from None


_SIGMA2 = Option("--sigma2", "sigma2", _sigma2_option, target="context", default="mechanism",
                 help="noise variance for SPE's stabiliser: 'mechanism' (from the capture's meta, falls back "
                      "to estimate), 'estimate' (from the update alone) or a number")
_CHUNK = Option("--chunk-size", "chunk_size", int, target="context", default=512,
                help="captures per compiled SPE call")


def _spe(cap, config, ctx: Context) -> AttackOutput:
    res, source = run_spe(cap, config, sigma2=ctx.options.get("sigma2", "mechanism"),
                          chunk_size=ctx.options.get("chunk_size", 512))
    n = cap.n
    features = res.features.reshape(n, *cap.feature_shape)
    arrays = {"features_raw": res.features_raw, "features": features, "noise_strength": res.noise_strength,
              "selected": res.selected, "sigma2": res.sigma2, "sigma2_estimated": res.sigma2_estimated}
    images = None
    notes = []
    if recovers_image(cap.meta):
        images = np.clip(res.features.reshape(n, 1, *cap.image_shape), 0.0, 1.0).astype(np.float32)
    if cap.samples > 1:
        notes.append(f"client batches of M={cap.samples}: SPE recovers a mixture; per-image metrics are not "
                     f"computed")
        images = None
    per_target = {}
    if cap.samples == 1:
        per_target = {"noise_strength": res.noise_strength.astype(np.float32),
                      "selected_count": res.selected.sum(-1).astype(np.float32)}
    info = {"sigma2_source": source, "refine": config.refine, "wavelet": config.wavelet,
            "levels": config.levels, "notes": notes}
    return AttackOutput(images=images, labels=None, per_target=per_target, arrays=arrays, info=info)


def _spe_config(**overrides):
    from jaxleak.attacks.spe import SPEConfig

    return SPEConfig(**overrides)


register(Attack(
    name="spe",
    summary="Venom's Structural Prior Extraction: the head's input map from its noisy gradient (+ wavelet "
            "refinement); the image itself for an mlp's first layer",
    needs=(),
    make_config=_spe_config,
    run=_spe,
    options=(_SIGMA2, _CHUNK,
             Option("--no-refine", "refine", bool, help="skip the wavelet refinement", default=None),
             Option("--wavelet", "wavelet", str, help="wavelet of the refinement (default db4)"),
             Option("--levels", "levels", int, help="refinement levels (default 2)")),
    family="analytic",
))


# --------------------------------------------------------------------------- recovery networks


def check_capture_fits(cap, info: dict[str, Any], path: str) -> list[str]:
    """Refuses a capture the checkpoint cannot attack; returns notes for softer mismatches."""
    from jaxleak.models import get_victim

    victim = info.get("victim", {})
    meta = cap.meta
    pairs = [
        ("model", victim.get("model"), meta.get("model")),
        ("image_shape", list(victim.get("image_shape", [])), list(cap.image_shape)),
        ("num_classes", victim.get("num_classes"), int(cap.num_classes)),
        ("feature_shape", list(victim.get("feature_shape", [])), list(cap.feature_shape)),
        ("layer", victim.get("layer"), meta.get("layer", "head")),
    ]
    opts = dict(meta.get("model_options") or {})
    if opts.get("hidden") is not None:
        opts["hidden"] = tuple(opts["hidden"])
    try:  # the capture's options may be partial; rebuilding gives the canonical form stored in checkpoints
        cap_opts = get_victim(meta["model"], image_shape=cap.image_shape, num_classes=cap.num_classes,
                              **opts).metadata()["options"]
    except (ValueError, KeyError, TypeError):
        cap_opts = meta.get("model_options")
    pairs.append(("model options", victim.get("options"), _json_ready(cap_opts)))
    diffs = [f"{name}: checkpoint {a!r}, capture {b!r}" for name, a, b in pairs if a != b]
    if diffs:
        raise AttackInputError(f"checkpoint {path} was trained for another victim than the capture's: "
                               + "; ".join(diffs))
    notes = []
    if victim.get("checkpoint") != meta.get("checkpoint") or victim.get("init_seed") != meta.get("init_seed"):
        notes.append(f"the capture's victim weights (checkpoint={meta.get('checkpoint')}, "
                     f"init_seed={meta.get('init_seed')}) differ from those the network was trained on "
                     f"(checkpoint={victim.get('checkpoint')}, init_seed={victim.get('init_seed')})")
    return notes


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    """Inference settings of a trained recovery network (its training settings live in the checkpoint).

    Attributes:
      batch_size: captures per compiled network call.
    """

    batch_size: int = 256


def _recovery(variant: str):
    def run(cap, config: RecoveryConfig, ctx: Context) -> AttackOutput:
        import os

        from jaxleak.attacks.spe import SPEConfig, spe_batch
        from jaxleak.attacks.venom.infer import recover_images
        from jaxleak.attacks.venom.train import load_recovery_net, read_checkpoint_info

        checkpoint = ctx.artifact
        info = read_checkpoint_info(checkpoint)
        trained = info["network"]["variant"]
        if trained != variant:
            raise AttackInputError(f"checkpoint {checkpoint} holds a {trained!r} network, not {variant!r}")
        notes = check_capture_fits(cap, info, checkpoint)
        model, params, info = load_recovery_net(checkpoint)
        chunk = ctx.options.get("chunk_size", 512)
        feature_kind = (info.get("triplets") or {}).get("features", "spe")
        per_target: dict[str, np.ndarray] = {}
        if feature_kind == "fgla":  # FGLA's label row; T is unused by its generator
            from jaxleak.attacks.fgla import fgla_batch

            res = fgla_batch(cap.fc_weight_grad, cap.fc_bias_grad, feature_shape=cap.feature_shape,
                             chunk_size=chunk)
            features, noise_strength = res.features, np.zeros((cap.n,), np.float32)
            source = "unused (FGLA features)"
            labels = np.asarray(res.labels).reshape(cap.n, 1)
            notes.append("FGLA label row inferred from the update (argmin of the bias gradient)")
        else:
            s2, source = resolve_sigma2(cap, ctx.options.get("sigma2", "mechanism"))
            spe_fields = {k: v for k, v in info.get("spe", {}).items() if k != "noise_rank"}
            res = spe_batch(cap.fc_weight_grad, cap.fc_bias_grad, feature_shape=cap.feature_shape,
                            sigma2=s2, config=SPEConfig(**spe_fields, noise_rank=1), chunk_size=chunk)
            features = np.asarray(res.features).reshape(cap.n, *cap.feature_shape)
            noise_strength = np.asarray(res.noise_strength)
            per_target["noise_strength"] = noise_strength.astype(np.float32)
            labels = None
        recon = recover_images(model, params, features, noise_strength, batch_size=config.batch_size)
        aux = info.get("aux_dataset") or {}
        if (aux.get("name"), aux.get("split")) == (cap.meta.get("dataset"), cap.meta.get("dataset_split")):
            notes.append("the network was trained on the same dataset split the captures come from: "
                         "auxiliary and attacked images may overlap")
        out_info = {
            "features": feature_kind,
            "checkpoint": os.path.abspath(checkpoint),
            "checkpoint_step": info["step"],
            "trained_on": info.get("aux_dataset"),
            "trained_for": {"triplets": info.get("triplets"), "victim": info.get("victim")},
            "sigma2_source": source,
            "notes": notes,
        }
        images = np.asarray(recon, np.float32)[:, None]
        return AttackOutput(images=images, labels=labels, per_target=per_target, arrays={}, info=out_info)

    return run


_RECOVERY_SUMMARY = {
    "venom": "Venom: SPE + Diff-LRN (liquid time embedding, FiLM UNet) trained by `jaxleak train venom`",
    "venom-diff": "Venom-Diff ablation: SPE + the same UNet with a plain sinusoidal embedding of T",
    "fgla": "FGLA: label-row features + a generator trained by `jaxleak train fgla`",
}
for _variant, _summary in _RECOVERY_SUMMARY.items():
    register(Attack(
        name=_variant,
        summary=_summary,
        needs=("single", "fedsgd", "artifact"),  # the networks were trained on FedSGD triplets
        make_config=RecoveryConfig,
        run=_recovery(_variant),
        options=(_SIGMA2, _CHUNK, Option("--batch-size", "batch_size", int, help="captures per network call")),
        family="recovery",
    ))


# --------------------------------------------------------------------------- optimisation attacks




def _optimization(attack: str):
    def run(cap, config, ctx: Context) -> AttackOutput:
        from jaxleak.attacks import optimization as opt
        from jaxleak.capture import unflatten_tree

        victim, variables = ctx.victim, ctx.variables
        updates = jax.tree_util.tree_map(np.asarray, unflatten_tree(cap.whole_update))
        opt.check_updates(victim, variables, updates)
        batch = cap.samples
        true_labels = None if cap.truth_labels is None else np.asarray(cap.truth_labels).reshape(cap.n, batch)
        driver = {k: ctx.options[k] for k in DRIVER_OPTIONS if ctx.options.get(k) is not None}
        extra: dict[str, Any] = {}
        if attack == "mjolnir":
            from jaxleak.attacks.optimization import mjolnir

            config, res, extra = mjolnir.reconstruct_capture(
                cap, victim, variables, updates, overrides=_fields(config), seed=ctx.seed,
                progress=ctx.progress, **{"chunk": 100, "target_batch": 16, "patience": None,
                                          "min_delta": 1e-4, **driver})
        else:
            if getattr(config, "labels", None) == "known" and true_labels is None:
                raise AttackInputError(f"{attack} with labels=known needs the capture's labels "
                                       f"(truth/labels); use --labels infer")
            res = opt.reconstruct(attack, victim, variables, updates, config=config, batch_size=batch,
                                  true_labels=true_labels, seed=ctx.seed, progress=ctx.progress, **driver)
        images = np.clip(np.asarray(res.images), 0.0, 1.0).astype(np.float32)
        labels = np.asarray(res.label_probs).argmax(-1)
        per_target = {"matching_loss": np.repeat(np.asarray(res.loss, np.float32), batch)}
        info = {"config": _json_ready(_fields(config)), "timing": res.timing(),
                "conv_impl": opt.attack_conv_impl(victim, ctx.options.get("conv_impl") or "auto"),
                "best_iteration": np.asarray(res.best_iteration).tolist(), **extra, "notes": []}
        return AttackOutput(images=images, labels=labels, per_target=per_target,
                            arrays={"matching_loss": np.asarray(res.loss),
                                    "best_iteration": np.asarray(res.best_iteration)}, info=info)

    return run


def _fields(config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _optimization_config(attack: str):
    def make(**overrides):
        if attack == "mjolnir":
            from jaxleak.attacks.optimization.mjolnir import MjolnirConfig

            return MjolnirConfig(**overrides)
        from jaxleak.attacks.optimization import default_config

        return default_config(attack, **overrides)

    return make


_OPT_OPTIONS = (
    Option("--iterations", "iterations", int, help="optimisation steps per target"),
    Option("--restarts", "restarts", int, help="random initialisations per target"),
)
_LABELS = Option("--labels", "labels", str, choices=("known", "infer", "joint"),
                 help="labels given (known), read off the head gradient (infer) or optimised (joint)")
_OPT_SUMMARY = {
    "dlg": ("DLG: L-BFGS on dummy images and soft labels, L2 gradient distance (Zhu et al. 2019)", True),
    "idlg": ("iDLG: DLG with the label read off the head gradient (Zhao et al. 2020)", True),
    "ig": ("Inverting Gradients: cosine distance, signed Adam, TV, boxed images (Geiping et al. 2020)", True),
    "gradinversion": ("GradInversion: L2 matching + BN statistics + TV + group consistency (Yin et al. 2021)",
                      True),
    "grnn": ("GRNN: a generator of image and label, L2 + Wasserstein + TV (Ren et al. 2022)", True),
    "mjolnir": ("Mjolnir: a DDPM denoiser on the update laid out as an image, then DLG (Liu et al. 2024)",
                False),
}
for _name, (_summary, _has_labels) in _OPT_SUMMARY.items():
    register(Attack(
        name=_name,
        summary=_summary,
        needs=("whole_update", "weights"),
        make_config=_optimization_config(_name),
        run=_optimization(_name),
        options=_OPT_OPTIONS + ((_LABELS,) if _has_labels else ()),
        family="optimization",
    ))
from jaxleak.attacks.fedavg import _runner  # noqa: E402,F401  (registers sme, fm, dlf, flow-latent)
