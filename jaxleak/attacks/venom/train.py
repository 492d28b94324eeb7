"""Training a recovery network on auxiliary data (Venom Algorithm 1, eq. 8).

Each step draws a minibatch of auxiliary images with the run's PRNG key, turns
it into triplets ``(x_hat, T, z)`` with :func:`make_triplet_fn` (victim forward
pass, clip, noise, SPE, ``T``) and takes one AdamW step on the reconstruction
loss, all inside one jitted function: no intermediate files.

A run's folder (``out_dir``) is an artifact of kind ``"recovery/<variant>"``
(:mod:`jaxleak.artifacts`)::

    out_dir/config.json      config: {"network", "train", "triplets", "spe", "triplet_source"};
                             extra: the caller's ``info`` (victim, auxiliary data)
    out_dir/steps/<step>/    state (params, opt_state, step, key) + {"history": ...}

``config.json`` is written (atomically) before the first step, so a folder never
mixes two runs: ``resume=True`` reads the settings from it and refuses any given
setting that differs. Resuming restores the optimizer state, the step and the
PRNG key, so a run stopped at step ``k`` and resumed follows the same loss curve
as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PyTree

from jaxleak import artifacts
from jaxleak.attacks.spe import SPEConfig
from jaxleak.attacks.venom.network import VARIANTS, RecoveryNetConfig, make_recovery_net
from jaxleak.attacks.venom.triplets import TripletConfig, Triplets, make_triplet_fn, make_triplets

LOSSES: tuple[str, ...] = ("mse", "mse+cos")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How a recovery network is trained.

    Attributes:
      variant: ``"venom"``, ``"venom-diff"`` or ``"fgla"``; must equal the
        network config's variant.
      loss: ``"mse"`` (eq. 8) or ``"mse+cos"`` (the reference code's
        ``0.5 * MSE + 0.5 * (1 - cosine)`` per image).
      learning_rate: initial learning rate of the one-cycle schedule.
      weight_decay: AdamW decoupled weight decay.
      max_lr: peak learning rate of the one-cycle schedule.
      warmup_fraction: share of the steps spent rising to ``max_lr``.
      steps: total optimisation steps (the schedule spans them).
      batch_size: auxiliary images per step.
      eval_every: evaluate on the held-out triplets every this many steps
        (and at the end); 0 only at the end.
      eval_size: held-out images (taken from the end of the auxiliary set when no
        separate evaluation images are given).
      seed: seeds the network's initialisation, the minibatches and the noise.
      mixed_precision: run the network in bfloat16 (parameters, optimizer
        state and loss stay float32).
      checkpoint_every: save a checkpoint every this many steps (and always at
        the end); 0 only at the end.
      max_to_keep: checkpoints kept in the directory.
    """

    variant: str = "venom"
    loss: str = "mse"
    learning_rate: float = 3e-4
    weight_decay: float = 5e-4
    max_lr: float = 1e-3
    warmup_fraction: float = 0.3
    steps: int = 1000
    batch_size: int = 32
    eval_every: int = 100
    eval_size: int = 64
    seed: int = 0
    mixed_precision: bool = False
    checkpoint_every: int = 0
    max_to_keep: int = 2

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("steps", "batch_size", "eval_size", "max_to_keep"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "seed"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.learning_rate <= self.max_lr:
            raise ValueError(
                f"need 0 < learning_rate <= max_lr, got {self.learning_rate} and {self.max_lr}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in (0, 1), got {self.warmup_fraction}")


class TrainState(NamedTuple):
    """Everything a run needs to continue (all arrays, so orbax saves it as one tree).

    Attributes:
      params: the network's variables (``{"params": ...}``), float32.
      opt_state: AdamW + schedule state.
      step: steps taken, int32 scalar.
      key: raw ``uint32[2]`` PRNG key for the next step.
    """

    params: PyTree
    opt_state: PyTree
    step: Int[Array, ""]
    key: Array


class TrainResult(NamedTuple):
    """What :func:`train_recovery_net` returns.

    Attributes:
      params: the trained variables, ``model.apply(params, features, T)``.
      history: ``{"step": [...], "loss": [...], "eval_step": [...],
        "eval_psnr": [...], "eval_ssim": [...]}`` over the whole run (resumed
        runs include the steps before the interruption).
      step: the step reached.
      model: the Flax module.
    """

    params: PyTree
    history: dict[str, list]
    step: int
    model: Any


# --------------------------------------------------------------------------- pure pieces


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW on a one-cycle cosine schedule from ``learning_rate`` up to ``max_lr`` and down."""
    schedule = optax.cosine_onecycle_schedule(
        transition_steps=config.steps,
        peak_value=config.max_lr,
        pct_start=config.warmup_fraction,
        div_factor=config.max_lr / config.learning_rate,
        final_div_factor=1e4,
    )
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def _per_image_loss(
    recon: Float[Array, "h w c"], target: Float[Array, "h w c"], kind: str
) -> Float[Array, ""]:
    mse = jnp.mean((recon - target) ** 2)
    if kind == "mse":
        return mse
    r, t = recon.reshape(-1), target.reshape(-1)
    # eps keeps the cosine finite for an all-zero image
    cos = jnp.dot(r, t) / (jnp.linalg.norm(r) * jnp.linalg.norm(t) + 1e-8)
    return 0.5 * mse + 0.5 * (1.0 - cos)


def reconstruction_loss(
    recon: Float[Array, "b h w c"], target: Float[Array, "b h w c"], kind: str = "mse"
) -> Float[Array, ""]:
    """Mean over the batch of the per-image loss (``"mse"`` or ``"mse+cos"``)."""
    per_image = jax.vmap(lambda r, t: _per_image_loss(r, t, kind))(recon, target)
    return jnp.mean(per_image)


def _apply(model, params: PyTree, features, noise_strength, mixed_precision: bool):
    if mixed_precision:
        # bf16 compute; the cast is differentiable, so gradients land on the f32 params
        cast = lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x
        params = jax.tree_util.tree_map(cast, params)
        features = features.astype(jnp.bfloat16)
        noise_strength = noise_strength.astype(jnp.bfloat16)
    return model.apply(params, features, noise_strength).astype(jnp.float32)


def make_train_step(
    model,
    optimizer: optax.GradientTransformation,
    *,
    loss: str = "mse",
    mixed_precision: bool = False,
):
    """A jitted pure ``(state, batch: Triplets) -> (state, {"loss": []})``.

    ``state.key`` is carried unchanged: the caller (see :func:`make_update_fn`)
    owns the key schedule.
    """

    def step(state: TrainState, batch: Triplets) -> tuple[TrainState, dict[str, Array]]:
        def objective(params):
            recon = _apply(model, params, batch.features, batch.noise_strength, mixed_precision)
            return reconstruction_loss(recon, batch.images.astype(jnp.float32), loss)

        value, grads = jax.value_and_grad(objective)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state._replace(params=params, opt_state=opt_state, step=state.step + 1)
        return new, {"loss": value}

    return jax.jit(step)


def make_update_fn(
    model,
    optimizer,
    victim,
    *,
    config: TrainConfig,
    triplet_config: TripletConfig,
    spe_config: SPEConfig | None = None,
):
    """A jitted ``(state, victim_variables, images [N,...], labels [N]) -> (state, metrics)``.

    Draws ``batch_size`` indices of the auxiliary set with ``state.key``, makes
    their triplets and takes one step; the key advances by one split.
    """
    triplet_fn = make_triplet_fn(victim, triplet_config, spe_config or SPEConfig())
    train_step = make_train_step(
        model, optimizer, loss=config.loss, mixed_precision=config.mixed_precision
    )

    def update(state: TrainState, victim_variables, images, labels):
        key, k_idx, k_trip = jax.random.split(state.key, 3)
        idx = jax.random.randint(k_idx, (config.batch_size,), 0, images.shape[0])
        batch = triplet_fn(victim_variables, images[idx], labels[idx], k_trip)
        state, metrics = train_step(state._replace(key=key), batch)
        return state, metrics

    return jax.jit(update)


def make_cached_update_fn(model, optimizer, *, config: TrainConfig):
    """A jitted ``(state, cache: Triplets [N]) -> (state, metrics)`` drawing batches from a triplet cache.

    Same key schedule as :func:`make_update_fn` (``batch_size`` indices per
    step); the triplets are the cached ones instead of fresh draws.
    """
    train_step = make_train_step(
        model, optimizer, loss=config.loss, mixed_precision=config.mixed_precision
    )

    def update(state: TrainState, cache: Triplets):
        key, k_idx, _ = jax.random.split(state.key, 3)
        n = cache.images.shape[0]
        idx = jax.random.randint(k_idx, (config.batch_size,), 0, n)
        batch = jax.tree_util.tree_map(lambda a: a[idx], cache)
        return train_step(state._replace(key=key), batch)

    return jax.jit(update)


def make_eval_fn(model, *, mixed_precision: bool = False):
    """A jitted ``(params, Triplets) -> {"psnr": [], "ssim": []}`` (batch means)."""
    from jaxleak import metrics

    def evaluate(params, batch: Triplets):
        recon = _apply(model, params, batch.features, batch.noise_strength, mixed_precision)
        recon = jnp.clip(recon, 0.0, 1.0)
        target = batch.images.astype(jnp.float32)
        return {
            "psnr": jnp.mean(metrics.psnr(recon, target)),
            "ssim": jnp.mean(metrics.ssim(recon, target)),
        }

    return jax.jit(evaluate)


@functools.lru_cache(maxsize=8)
def _jitted_init(model):
    # compiling a UNet's initialisers takes seconds: once per model per process
    return jax.jit(model.init)


def init_state(model, optimizer, net_config: RecoveryNetConfig, seed: int) -> TrainState:
    """Fresh parameters and optimizer state; the data key is independent of the init key."""
    root = jax.random.PRNGKey(seed)
    k_init, k_data = jax.random.split(root)
    features = jnp.zeros((1, *net_config.feature_shape), jnp.float32)
    params = _jitted_init(model)(k_init, features, jnp.ones((1,), jnp.float32))
    return TrainState(
        params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32), key=k_data
    )


def _abstract_state(model, optimizer, net_config: RecoveryNetConfig) -> TrainState:
    return jax.eval_shape(lambda: init_state(model, optimizer, net_config, 0))


def _step_relevant(config: TrainConfig) -> TrainConfig:
    """``config`` with the fields that do not enter the compiled step set to fixed values."""
    return dataclasses.replace(
        config, seed=0, eval_every=0, eval_size=1, checkpoint_every=0, max_to_keep=1
    )


@functools.lru_cache(maxsize=8)
def _compiled(
    net_config: RecoveryNetConfig,
    victim,
    config: TrainConfig,
    triplet_config: TripletConfig,
    spe_config: SPEConfig,
):
    """Model, optimizer and jitted update/eval, cached so repeated or resumed runs compile once."""
    model = make_recovery_net(net_config)
    optimizer = make_optimizer(config)
    update = make_update_fn(
        model,
        optimizer,
        victim,
        config=config,
        triplet_config=triplet_config,
        spe_config=spe_config,
    )
    evaluate = make_eval_fn(model, mixed_precision=config.mixed_precision)
    cached_update = make_cached_update_fn(model, optimizer, config=config)
    return model, optimizer, update, cached_update, evaluate


# --------------------------------------------------------------------------- checkpoints


def artifact_kind(variant: str) -> str:
    """The artifact kind of a recovery network (``"recovery/venom"``, ...)."""
    return f"recovery/{variant}"


KINDS: tuple[str, ...] = tuple(artifact_kind(v) for v in VARIANTS)


def _config_dict(config) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _settings(net_config, config, triplet_config, spe_config, triplet_source) -> dict[str, Any]:
    """The artifact config: everything that rebuilds the network and its training run."""
    return {
        "network": _config_dict(net_config),
        "train": _config_dict(config),
        "triplets": _config_dict(triplet_config),
        "spe": _config_dict(spe_config),
        "triplet_source": triplet_source,
    }


def _differences(stored: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(stored) | set(current)):
            out += _differences(stored.get(key), current.get(key), f"{prefix}{key}.")
        return out
    if stored != current:
        return [f"{prefix.rstrip('.')}: checkpoint has {stored!r}, now {current!r}"]
    return []


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """A recovery network's stored settings and description, as one flat dict.

    Returns:
      ``{"kind", "network", "train", "triplets", "spe", "triplet_source",
      **extra}`` where ``extra`` is the ``info`` given at training (victim,
      auxiliary data, ...).

    Raises:
      ArtifactError: ``path`` does not exist or holds no recovery network.
    """
    stored = artifacts.read_artifact(path, kind=KINDS)
    return {**stored.extra, **stored.config, "kind": stored.kind}


class RunSettings(NamedTuple):
    """The settings a recovery-network run was started with (see :func:`read_run_settings`)."""

    net_config: RecoveryNetConfig
    config: TrainConfig
    triplet_config: TripletConfig
    spe_config: SPEConfig
    triplet_source: str
    info: dict[str, Any]


def _tuples(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def read_run_settings(path: str | Path) -> RunSettings:
    """The configs stored in a recovery-network folder, rebuilt (what ``--resume`` continues with).

    Raises:
      ArtifactError: ``path`` does not exist or holds no recovery network.
    """
    return _run_settings(read_checkpoint_info(path))


def _run_settings(info: dict[str, Any]) -> RunSettings:
    return RunSettings(
        net_config=network_config_from_info(info),
        config=TrainConfig(**info["train"]),
        triplet_config=TripletConfig(**_tuples(info["triplets"])),
        spe_config=SPEConfig(**_tuples(info["spe"])),
        triplet_source=info.get("triplet_source", "on-the-fly"),
        info={k: v for k, v in info.items() if k not in _SETTING_KEYS},
    )


_SETTING_KEYS = ("kind", "network", "train", "triplets", "spe", "triplet_source")


def _restore(
    checkpoints: artifacts.StepCheckpoints, abstract: TrainState
) -> tuple[TrainState, dict]:
    state, extra, _ = checkpoints.restore(target=abstract)
    state = TrainState(*state) if not isinstance(state, TrainState) else state
    # Restored arrays come back committed to a device, fresh ones (init_state) do not; jit keys
    # its cache on that, so the cached update/eval of _compiled would compile a second time.
    state = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), state)
    return state, dict(extra.get("history") or _empty_history())


def _save(checkpoints: artifacts.StepCheckpoints, state: TrainState, history: dict) -> None:
    checkpoints.save_step(int(state.step), state, extra={"history": history})


# --------------------------------------------------------------------------- triplet cache

_CACHE_FORMAT = "jaxleak-triplet-cache-v2"


def _images_digest(images: np.ndarray, labels: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, np.int32).tobytes())
    return h.hexdigest()


def _tree_digest(tree: PyTree) -> str:
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


def build_triplet_cache(
    victim,
    victim_variables: PyTree,
    images: Float[np.ndarray, "n h w c"],
    labels: Int[np.ndarray, " n"],
    key: Array,
    *,
    triplet_config: TripletConfig,
    spe_config: SPEConfig,
    chunk_size: int = 256,
    progress: bool = False,
) -> Triplets:
    """One triplet per auxiliary image (Algorithm 1 done once, as the reference code does).

    Image ``i`` draws from ``fold_in(key, i)`` whatever the chunk size (one compiled
    shape for every chunk). Returns host (NumPy) arrays.
    """
    triplets = make_triplets(victim, victim_variables, images, labels, key, config=triplet_config,
                             spe_config=spe_config, chunk_size=chunk_size,
                             progress="triplet cache" if progress else None)
    return Triplets(*(np.asarray(f) for f in triplets))


def save_triplet_cache(path: str | Path, triplets: Triplets, description: dict[str, Any]) -> None:
    """Writes a triplet cache ``.npz`` (arrays + a JSON ``meta`` string; no pickles)."""
    meta = json.dumps({"format": _CACHE_FORMAT, **description}, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.asarray(meta), **{k: np.asarray(v) for k, v in triplets._asdict().items()})
    tmp.replace(path)


def load_triplet_cache(path: str | Path, description: dict[str, Any]) -> Triplets:
    """Reads a cache written by :func:`save_triplet_cache`, refusing one made for other settings.

    Raises:
      ValueError: unreadable file, other format, or a description (victim,
        triplet/SPE config, auxiliary images) that differs from ``description``.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in Triplets._fields}
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path} is not a readable triplet cache: {error}") from error
    if meta.pop("format", None) != _CACHE_FORMAT:
        raise ValueError(f"{path} is not a triplet cache of format {_CACHE_FORMAT}")
    diffs = _differences(meta, json.loads(json.dumps(description, sort_keys=True)))
    if diffs:
        raise ValueError(f"triplet cache {path} was made for other settings: " + "; ".join(diffs))
    return Triplets(**arrays)


# --------------------------------------------------------------------------- public API


def _empty_history() -> dict[str, list]:
    return {"step": [], "loss": [], "eval_step": [], "eval_psnr": [], "eval_ssim": []}


def _check_images(images, labels, victim, what: str):
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(victim.image_shape):
        raise ValueError(
            f"{what} images must be [N, *{tuple(victim.image_shape)}], got {images.shape}"
        )
    if labels.shape != images.shape[:1]:
        raise ValueError(f"{what} labels must be [{images.shape[0]}], got {labels.shape}")
    return images, labels


def _resolve_settings(
    out_dir, resume, net_config, config, triplet_config, spe_config, triplet_cache, info
) -> tuple[RecoveryNetConfig, TrainConfig, TripletConfig, SPEConfig, dict[str, Any]]:
    """The run's configs: the given ones (defaults filled in), or on resume the stored ones.

    On resume every config that is given again must equal the stored one (the
    error names the differing keys); ``None`` means "as stored".
    """
    source = "cache" if triplet_cache is not None else "on-the-fly"
    if not resume:
        if net_config is None or config is None:
            raise ValueError("net_config and config are needed unless resuming a run")
        return (net_config, config, triplet_config or TripletConfig(), spe_config or SPEConfig(),
                dict(info or {}))
    if out_dir is None:
        raise ValueError("resume needs out_dir, the folder of the run to continue")
    given = {
        name: _config_dict(value)
        for name, value in (("network", net_config), ("train", config),
                            ("triplets", triplet_config), ("spe", spe_config))
        if value is not None
    }
    given["triplet_source"] = source
    found = artifacts.resume_run(out_dir, kind=KINDS, expect=given)
    stored = _run_settings({**found.extra, **found.config, "kind": found.kind})
    if info is not None:
        diffs = artifacts.differences(stored.info, json.loads(json.dumps(info)))
        if diffs:
            raise artifacts.ArtifactError(
                f"cannot resume {out_dir}: it was trained with other settings: " + "; ".join(diffs)
            )
    return (stored.net_config, stored.config, stored.triplet_config, stored.spe_config,
            stored.info)


def train_recovery_net(
    net_config: RecoveryNetConfig | None,
    victim,
    victim_variables: PyTree,
    aux_images: Float[np.ndarray, "n h w c"],
    aux_labels: Int[np.ndarray, " n"],
    *,
    config: TrainConfig | None = None,
    triplet_config: TripletConfig | None = None,
    spe_config: SPEConfig | None = None,
    eval_images: Float[np.ndarray, "m h w c"] | None = None,
    eval_labels: Int[np.ndarray, " m"] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    until: int | None = None,
    info: dict[str, Any] | None = None,
    triplet_cache: str | Path | None = None,
    progress: bool = False,
) -> TrainResult:
    """Trains a recovery network on triplets made on the fly from auxiliary images.

    Args:
      net_config: architecture; ``image_shape`` must be the victim's and
        ``feature_shape`` its ``triplet_config.layer`` input map. ``None`` only
        with ``resume`` (the stored one).
      victim: the victim model whose protected gradients are inverted.
      victim_variables: its variables (as the attacked clients use them).
      aux_images: the attacker's auxiliary images ``[N, H, W, C]`` in [0, 1].
      aux_labels: their labels ``[N]``.
      config: training settings (``None`` only with ``resume``).
      triplet_config: DP protection the triplets simulate (default:
        ``TripletConfig()``, or the stored one when resuming).
      spe_config: SPE settings of the triplets (default: ``SPEConfig()``, or
        the stored one when resuming).
      eval_images, eval_labels: held-out images; default: the last
        ``config.eval_size`` auxiliary images, then excluded from training.
      out_dir: the run's artifact folder (:mod:`jaxleak.artifacts`, kind
        ``"recovery/<variant>"``; ``None``: no checkpoints). Without ``resume``
        it must not exist yet.
      resume: continue the run in ``out_dir`` (which must exist) from its latest
        step, with its stored settings: the configs and ``info`` given again
        must equal the stored ones (an error names the differing keys), those
        left ``None`` are read from the folder.
      until: stop after this step (checkpointing it) though the schedule spans
        ``config.steps``; for splitting a run into pieces.
      info: JSON-ready description stored as the artifact's extra (victim
        name, options, init seed, auxiliary dataset name/split/source).
      triplet_cache: a ``.npz`` path. Instead of fresh triplets every step,
        train on one fixed triplet per auxiliary image (the reference code's
        offline dataset), built once and saved there, or loaded when the file
        exists and was made for the same victim, triplet/SPE settings, seed and
        auxiliary images. ``None`` (default): triplets on the fly.
      progress: show a tqdm bar with the loss and the last eval PSNR.

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: on inconsistent configs or shapes.
      ArtifactError: (a ``ValueError``) an occupied ``out_dir`` without
        ``resume``, a missing one with it, or a resumed run given other settings.
    """
    net_config, config, triplet_config, spe_config, info = _resolve_settings(
        out_dir, resume, net_config, config, triplet_config, spe_config, triplet_cache, info
    )
    if config.variant != net_config.variant:
        raise ValueError(
            f"TrainConfig.variant {config.variant!r} != RecoveryNetConfig.variant "
            f"{net_config.variant!r}"
        )
    if tuple(net_config.image_shape) != tuple(victim.image_shape):
        raise ValueError(
            f"network image_shape {net_config.image_shape} != victim image_shape "
            f"{tuple(victim.image_shape)}"
        )
    if triplet_config.layer not in victim.layers:
        raise ValueError(f"victim {victim.name} has no layer {triplet_config.layer!r}")
    fshape = tuple(victim.layers[triplet_config.layer].feature_shape)
    if tuple(net_config.feature_shape) != fshape:
        raise ValueError(
            f"network feature_shape {net_config.feature_shape} != the victim's "
            f"'{triplet_config.layer}' input map {fshape}"
        )
    images, labels = _check_images(aux_images, aux_labels, victim, "auxiliary")
    if eval_images is None:
        if images.shape[0] <= config.eval_size:
            raise ValueError(
                f"need more than eval_size={config.eval_size} auxiliary images to hold "
                f"some out, got {images.shape[0]}"
            )
        eval_images, eval_labels = images[-config.eval_size :], labels[-config.eval_size :]
        images, labels = images[: -config.eval_size], labels[: -config.eval_size]
    else:
        eval_images, eval_labels = _check_images(eval_images, eval_labels, victim, "evaluation")
    if until is not None and not 1 <= until <= config.steps:
        raise ValueError(f"until must be in [1, steps={config.steps}], got {until}")
    last = config.steps if until is None else int(until)

    model, optimizer, update, cached_update, evaluate = _compiled(
        net_config, victim, _step_relevant(config), triplet_config, spe_config
    )
    settings = _settings(
        net_config, config, triplet_config, spe_config,
        "cache" if triplet_cache is not None else "on-the-fly",
    )

    cache = None
    if triplet_cache is not None:
        cache_description = {
            "victim": victim.metadata(),
            "victim_variables": _tree_digest(victim_variables),
            "triplets": _config_dict(triplet_config),
            "spe": _config_dict(spe_config),
            "seed": config.seed,
            "aux_images": _images_digest(images, labels),
            "n": int(images.shape[0]),
        }
        if Path(triplet_cache).is_file():
            cache = load_triplet_cache(triplet_cache, cache_description)
        else:
            cache_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xCAC4E)
            cache = build_triplet_cache(
                victim, victim_variables, images, labels, cache_key,
                triplet_config=triplet_config, spe_config=spe_config, progress=progress,
            )
            save_triplet_cache(triplet_cache, cache, cache_description)
        cache = jax.tree_util.tree_map(jnp.asarray, cache)

    checkpoints = None
    state, history = None, _empty_history()
    if out_dir is not None:
        if not resume:
            artifacts.start_run(
                out_dir, kind=artifact_kind(net_config.variant), config=settings, extra=info
            )
        checkpoints = artifacts.StepCheckpoints(out_dir, max_to_keep=config.max_to_keep)
        if resume and checkpoints.latest_step() is not None:
            state, history = _restore(checkpoints, _abstract_state(model, optimizer, net_config))
    if state is None:
        state = init_state(model, optimizer, net_config, config.seed)

    triplet_fn = make_triplet_fn(victim, triplet_config, spe_config)
    # fixed, seed-determined held-out triplets: same on every resume
    eval_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5EED)
    eval_batch = triplet_fn(
        victim_variables, jnp.asarray(eval_images), jnp.asarray(eval_labels), eval_key
    )
    images_dev, labels_dev = jnp.asarray(images), jnp.asarray(labels)

    def run_eval():
        m = evaluate(state.params, eval_batch)
        history["eval_step"].append(int(state.step))
        history["eval_psnr"].append(float(m["psnr"]))
        history["eval_ssim"].append(float(m["ssim"]))

    start = int(state.step)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=last, initial=start, desc=f"train {net_config.variant}", unit="step")
    try:
        while int(state.step) < last:
            if cache is not None:
                state, metrics = cached_update(state, cache)
            else:
                state, metrics = update(state, victim_variables, images_dev, labels_dev)
            step = int(state.step)
            loss = float(metrics["loss"])
            history["step"].append(step)
            history["loss"].append(loss)
            if config.eval_every and step % config.eval_every == 0:
                run_eval()
            if (
                checkpoints is not None
                and config.checkpoint_every
                and step % config.checkpoint_every == 0
            ):
                _save(checkpoints, state, history)
            if bar is not None:
                psnr = history["eval_psnr"][-1] if history["eval_psnr"] else math.nan
                bar.set_postfix(loss=f"{loss:.4g}", eval_psnr=f"{psnr:.2f}")
                bar.update(1)
    except KeyboardInterrupt:
        if checkpoints is not None:  # keep what was done; --resume continues from here
            _save(checkpoints, state, history)
            checkpoints.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    if not history["eval_step"] or history["eval_step"][-1] != int(state.step):
        run_eval()
    if checkpoints is not None:
        _save(checkpoints, state, history)
        checkpoints.close()
    return TrainResult(params=state.params, history=history, step=int(state.step), model=model)


def load_recovery_net(
    path: str | Path, *, expected: RecoveryNetConfig | None = None
) -> tuple[Any, PyTree, dict[str, Any]]:
    """Loads the latest checkpoint of a folder written by :func:`train_recovery_net`.

    Args:
      path: the run's artifact folder.
      expected: when given, the network the caller wants; any field that
        differs from the stored one is an error.

    Returns:
      ``(model, params, info)``: the Flax module, its variables and
      :func:`read_checkpoint_info` plus ``"step"`` (the restored step) and
      ``"history"``.

    Raises:
      ArtifactError: (a ``ValueError``) not a recovery network, no saved step,
        a stored network that differs from ``expected``, or parameters that do
        not fit the network.
    """
    path = Path(path)
    info = read_checkpoint_info(path)
    expect = None if expected is None else {"network": _config_dict(expected)}
    settings = read_run_settings(path)
    model = make_recovery_net(settings.net_config)
    optimizer = make_optimizer(settings.config)
    abstract = _abstract_state(model, optimizer, settings.net_config)
    loaded = artifacts.load_artifact(path, kind=info["kind"], expect=expect, target=abstract)
    state = loaded.tree
    state = TrainState(*state) if not isinstance(state, TrainState) else state
    history = loaded.extra.get("history") or _empty_history()
    info = {**info, "step": int(state.step), "history": history}
    return model, state.params, info


def network_config_from_info(info: dict[str, Any]) -> RecoveryNetConfig:
    """The :class:`RecoveryNetConfig` stored in a checkpoint's ``config.json``."""
    return RecoveryNetConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in info["network"].items()}
    )


__all__ = [
    "KINDS",
    "LOSSES",
    "RunSettings",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "artifact_kind",
    "build_triplet_cache",
    "init_state",
    "load_recovery_net",
    "load_triplet_cache",
    "make_eval_fn",
    "make_optimizer",
    "make_train_step",
    "make_update_fn",
    "network_config_from_info",
    "read_checkpoint_info",
    "read_run_settings",
    "reconstruction_loss",
    "save_triplet_cache",
    "train_recovery_net",
]
