"""``jaxleak attack sme|fm|dlf|flow-latent``: every FedAvg attack registered with one runner.

The runner turns a capture into the attacks' inputs: the protocol from ``meta.protocol``, the
server weights ``w0`` and the whole update ``w0 - w1`` of every client as targets, labels known
(the capture's, the threat model of SME) or inferred from the update, and the flow prior where the
config asks for one (FM with ``lambda_fm > 0``, flow-latent). It runs the attack's
:class:`~jaxleak.attacks.optimization.Problem` with the optimisation driver and returns an
:class:`~jaxleak.attacks.registry.AttackOutput`. The attack modules are imported only when an
attack is configured or run; ``dlf`` and ``flow-latent`` are registered when their modules exist.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxleak.attacks.registry import (
    Attack,
    AttackInputError,
    AttackOutput,
    Context,
    Option,
    register,
)


class _Spec(NamedTuple):
    module: str
    config: str
    make: str
    summary: str
    options: tuple[Option, ...]


def _spec_attr(spec: _Spec, attr: str):
    return getattr(importlib.import_module(spec.module), attr)


_ITERATIONS = Option("--iterations", "iterations", int, help="optimisation steps per client")
_RESTARTS = Option("--restarts", "restarts", int, help="random initialisations per client")
_LABELS = Option("--labels", "labels", str, choices=("known", "infer"),
                 help="labels given (known: the capture's, SME's threat model) or read off the update "
                      "(infer)")
_SPACE = Option("--space", "space", str, choices=("normalized", "pixel"),
                help="optimise normalised images (SME's code) or [0, 1] pixels")
_PRIOR = Option("--prior", "prior", str,
                help="flow prior: a shipped name or a folder of `jaxleak train flow-prior` (default: the "
                     "shipped one)")
_COMMON = (_ITERATIONS, _RESTARTS, _LABELS)

SPECS: dict[str, _Spec] = {
    "sme": _Spec(
        "jaxleak.attacks.fedavg.sme", "SMEConfig", "make_sme",
        "SME: cosine matching at a learned surrogate point w0 - alpha (w0 - w1) of a FedAvg update "
        "(Zhu et al. 2023)",
        (*_COMMON, _SPACE, Option("--tv", "tv", float, help="TV weight (SME: 0.01)"))),
    "fm": _Spec(
        "jaxleak.attacks.fedavg.sme", "FMConfig", "make_fm",
        "FM: SME + a flow-matching image prior lambda_fm ||v(x, tau)||^2, tau ramped over the iterations",
        (*_COMMON, _SPACE, _PRIOR,
         Option("--lambda-fm", "lambda_fm", float, help="weight of the flow prior term (0: SME)"),
         Option("--lambda-tv", "tv", float, help="TV weight"),
         Option("--tau-start", "tau_start", float, help="prior time at the first iteration"),
         Option("--tau-end", "tau_end", float, help="prior time at the last iteration"),
         Option("--fm-scale", "fm_scale", str, choices=("none", "one_minus_tau_sq"),
                help="scale the prior term by (1 - tau)^2 (one_minus_tau_sq) or not"))),
    "dlf": _Spec(
        "jaxleak.attacks.fedavg.dlf", "DLFConfig", "make_dlf",
        "DLF: replays the client's local steps on dummy images and matches the simulated update "
        "(Dimitrov et al. 2022)",
        _COMMON),
    "flow-latent": _Spec(
        "jaxleak.attacks.fedavg.latent", "FlowLatentConfig", "make_flow_latent",
        "flow-latent (GGL-style): searches the flow prior's initial noise so the generated images' "
        "surrogate gradient matches",
        (*_COMMON, _PRIOR)),
}
"""Attack name -> where its config and problem factory live, its summary and CLI options."""


def needs_prior(config) -> bool:
    """Whether ``config`` uses a flow prior: it names one and any ``lambda_fm`` it has is > 0."""
    return hasattr(config, "prior") and getattr(config, "lambda_fm", 1.0) > 0


def prior_note(name: str, prior) -> str:
    """One line saying which flow prior ran (and that it is the shipped default, when it is)."""
    from jaxleak.priors import DEFAULT_PRIOR

    note = f"flow prior: {prior.extra.get('source', name)}"
    if name == DEFAULT_PRIOR:
        note += " (the default for 32x32 RGB images; --prior chooses another)"
    quality = prior.extra.get("quality") or {}
    if quality.get("fd_alexnet") is not None:
        note += f", FD-AlexNet {quality['fd_alexnet']:.1f} (not comparable to Inception FID)"
    return note


def load_prior_for(config, victim):
    """The prior ``config.prior`` (:func:`jaxleak.priors.load`), checked against the victim's images.

    Raises:
      AttackInputError: no such prior, or one trained for other image sizes or channels (one line
        naming both shapes).
    """
    from jaxleak import priors
    from jaxleak.artifacts import ArtifactError

    try:
        prior = priors.load(config.prior)
    except ArtifactError as e:
        raise AttackInputError(str(e).splitlines()[0]) from None
    have, want = tuple(prior.config.image_shape), tuple(victim.image_shape)
    if have != want:
        shape = lambda s: "x".join(map(str, s))
        raise AttackInputError(f"prior {config.prior} is for {shape(have)} images but the victim's images "
                               f"are {shape(want)}; give --prior a prior trained at that size")
    return prior


def _make_config(spec: _Spec):
    def make(**overrides):
        return _spec_attr(spec, spec.config)(**overrides)

    return make


def _run(name: str, spec: _Spec):
    def run(cap, config, ctx: Context) -> AttackOutput:
        from jaxleak.attacks import optimization as opt
        from jaxleak.attacks._builtin import _fields, _json_ready
        from jaxleak.attacks.fedavg.sme import SMEConfig, image_stats
        from jaxleak.attacks.registry import DRIVER_OPTIONS
        from jaxleak.capture import unflatten_tree
        from jaxleak.protocols import Protocol

        victim, variables = ctx.victim, ctx.variables
        updates = jax.tree_util.tree_map(np.asarray, unflatten_tree(cap.whole_update))
        opt.check_updates(victim, variables, updates)
        samples = cap.samples
        protocol = Protocol.from_meta(cap.protocol)
        true_labels = None
        if config.labels == "known":
            if cap.truth_labels is None:
                raise AttackInputError(f"{name} with labels=known needs the capture's labels (truth/labels); "
                                       f"use --labels infer")
            true_labels = np.asarray(cap.truth_labels).reshape(cap.n, samples)
        targets = opt.prepare_targets(victim, updates, labels=config.labels, batch_size=samples,
                                      true_labels=true_labels)
        prior = load_prior_for(config, victim) if needs_prior(config) else None
        conv_impl = opt.attack_conv_impl(victim, ctx.options.get("conv_impl") or "auto")
        problem = _spec_attr(spec, spec.make)(
            victim.with_conv_impl(conv_impl), config, batch_size=samples, protocol=protocol,
            prior=None if prior is None else prior.config)
        shared = {"variables": dict(variables),
                  "prior": None if prior is None else jax.tree_util.tree_map(jax.numpy.asarray, prior.params)}
        driver = {k: ctx.options[k] for k in DRIVER_OPTIONS
                  if k != "conv_impl" and ctx.options.get(k) is not None}
        options = opt.RunOptions(iterations=config.iterations, restarts=config.restarts, seed=ctx.seed,
                                 progress=ctx.progress, **driver)
        res = opt.run_problem(problem, targets, shared, options)

        notes = []
        if protocol.kind == "fedsgd":
            notes.append(f"FedSGD capture: the update is one gradient at w0; {name} ran on it as on a "
                         f"one-step FedAvg update")
        if prior is not None:
            notes.append(prior_note(config.prior, prior))
        info: dict[str, Any] = {
            "config": _json_ready(_fields(config)), "timing": res.timing(), "conv_impl": conv_impl,
            "best_iteration": np.asarray(res.best_iteration).tolist(),
            "attack_protocol": protocol.as_meta(samples), "labels": config.labels,
            "prior": None if prior is None else {"source": prior.extra.get("source"),
                                                 "image_shape": list(prior.config.image_shape)},
            "notes": notes,
        }
        if isinstance(config, SMEConfig) and config.space == "normalized":
            mean, std = image_stats(config, victim.image_shape[-1])
            info["normalization"] = {"mean": np.asarray(mean).tolist(), "std": np.asarray(std).tolist()}
        images = np.clip(np.asarray(res.images), 0.0, 1.0).astype(np.float32)
        return AttackOutput(
            images=images, labels=np.asarray(res.label_probs).argmax(-1),
            per_target={"matching_loss": np.repeat(np.asarray(res.loss, np.float32), samples)},
            arrays={"matching_loss": np.asarray(res.loss), "best_iteration": np.asarray(res.best_iteration)},
            info=info)

    return run


for _name, _spec in SPECS.items():
    register(Attack(name=_name, summary=_spec.summary, needs=("whole_update", "weights"),
                    make_config=_make_config(_spec), run=_run(_name, _spec), options=_spec.options,
                    family="fedavg"))
