"""DLF (Dimitrov et al. 2022, "Data Leakage in Federated Averaging") for ONE observed FedAvg update.

The attacker knows the client's protocol (E local epochs of S = ceil(M / B) steps, the
optimizer and its lr) but not the order in which the images were shuffled. It keeps one
copy of the M dummy images per epoch (``[E, M, H, W, C]``), replays the client's E x S local
steps on them in a fixed order (epoch ``e``'s step ``s`` takes that epoch's images
``s B, ..., s B + B - 1``) through the client's own code
(:func:`jaxleak.protocols._local.run_local_steps`), differentiating through every step, and
matches the simulated update with the observed one. Because every epoch holds the same
M images in some order, an epoch-order-invariant prior pulls the copies together; at the end
each copy is matched to epoch 0 and the copies are averaged.

Loss at iteration ``k`` (DLF's public code, NOTES section 4; its settings in brackets):

* ``c_k * sum_i e^{-i} ||(u_sim,i - u_obs,i) / lr||^2 / S``: squared L2 between simulated and
  observed ``w0 - w1``, both divided by the local lr [``--att_metric l2``], per-layer weight
  ``e^{-i}`` with ``i`` the layer's index from the input, kernel and bias alike
  [``--att_exp_layers``], divided by the steps per epoch S; ``c_k`` decays geometrically from
  4 to 2 over the first half of the iterations, then stays at 2 [``--att_fac_start=4
  --att_total_var=2``].
* ``2e-4 * TV(z)`` [``--reg_tv=0.0002 --attack_total_variation=1``].
* ``10 * sum_{hwc} mean_images (x - clip(x, 0, 1))^2``, the pixel-range penalty in [0, 1] pixel
  space [``--reg_clip=10``].
* ``6.075 * mean_{e, e'} mean((max_m conv(z_e) - max_m conv(z_e'))^2)``: every epoch's images
  through one fixed random 3x3 convolution with 96 filters, max over that epoch's images, mean
  squared difference over all ordered pairs of epochs [``-reorder_prior l2_max_conv
  --reg_reorder 6.075``].

Adam 0.1 decayed as ``0.1 * 0.997^(k / 20)`` (``optax.exponential_decay``, not staircase, as
DLF's call), 400 iterations [``--att_epochs=200`` runs ``2 x 200`` steps], no clipping of the
iterate. DLF optimises images in the dataset's normalised space from N(0, 1); here the variable
is ``z`` with ``x = pixel_mean + pixel_std z`` (``0.5 + 0.25 z`` by default, about CIFAR's
per-channel statistics), so DLF's learning rate, TV and order-prior weights keep their scale:
TV and the order prior act on ``z``, the victim and the range penalty on ``x``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PyTree

from jaxleak.attacks.optimization._driver import Candidate, Problem
from jaxleak.attacks.optimization._matching import total_variation
from jaxleak.capture.io import flatten_tree, unflatten_tree
from jaxleak.protocols._local import run_local_steps
from jaxleak.protocols._protocol import Protocol

EXACT_MATCH_MAX = 7
"""Up to this many images per client the epoch copies are matched exactly (all M! orders); greedily above."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DLFConfig:
    """DLF's settings; defaults from its public code's CIFAR scripts (``full_many`` with the prior).

    Attributes:
      iterations: Adam steps (DLF: 400, i.e. ``2 x --att_epochs=200``).
      learning_rate: Adam step size on ``z`` (``--att_lr=0.1``).
      lr_decay, lr_decay_steps: step size ``learning_rate * lr_decay^(k / lr_decay_steps)``
        (``--exp_decay_factor=0.997 --exp_decay_steps=20``).
      match_start, match_end: weight of the matching term, geometric from ``match_start`` to
        ``match_end`` over the first half of the iterations (``--att_fac_start=4
        --att_total_var=2``).
      layer_decay: weight layer ``i`` (from the input) by ``e^{-i}`` (``--att_exp_layers``);
        ``False``: every layer 1.
      tv: total-variation weight, on ``z`` (``--reg_tv=2e-4`` x ``--attack_total_variation=1``).
        The form of DLF's TV was not in its public code; ours is mean |dx| + mean |dy|.
      pixel_range: weight of the pixel-range penalty (``--reg_clip=10``).
      order_prior: weight of the epoch-order-invariant prior (``--reg_reorder=6.075``; 0 = off).
      order_filters: filters of its fixed random 3x3 convolution (DLF: 96).
      order_seed: seed of that convolution (LeCun-normal, no bias; fixed so every target and
        restart sees the same one).
      pixel_mean, pixel_std: ``x = pixel_mean + pixel_std z`` (ours; see the module docstring).
      init_std: ``z`` starts at N(0, init_std^2) (DLF: ``--att_init normal``).
      eps_root: added under Adam's square root in the replay of an Adam client only (the client
        uses 0): keeps the derivative through ``sqrt(v)`` finite where a gradient entry is 0.
      labels: ``"known"`` (the capture's labels) or ``"infer"`` (label counts restored from the
        update by the runner); either way they arrive as ``target["label_probs"]`` and epoch
        copy slot ``m`` carries label ``m`` in every epoch, as in DLF.
      restarts: initialisations per target, best by matching loss (DLF: 1).
    """

    iterations: int = 400
    learning_rate: float = 0.1
    lr_decay: float = 0.997
    lr_decay_steps: int = 20
    match_start: float = 4.0
    match_end: float = 2.0
    layer_decay: bool = True
    tv: float = 2e-4
    pixel_range: float = 10.0
    order_prior: float = 6.075
    order_filters: int = 96
    order_seed: int = 0
    pixel_mean: float = 0.5
    pixel_std: float = 0.25
    init_std: float = 1.0
    eps_root: float = 1e-16
    labels: str = "known"
    restarts: int = 1
    label_modes = ("known", "infer")

    def __post_init__(self):
        for name in ("iterations", "restarts", "lr_decay_steps", "order_filters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.labels not in self.label_modes:
            raise ValueError(f"labels must be one of {self.label_modes}, got {self.labels!r}")
        for name in ("learning_rate", "match_start", "match_end", "pixel_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("tv", "pixel_range", "order_prior", "init_std", "eps_root"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay!r}")


# --------------------------------------------------------------------------- layer weights


def layer_order(victim) -> tuple[str, ...]:
    """Paths of the modules that own parameters, in the order the forward pass calls them.

    Traced abstractly (no compute); a module never seen in the trace goes last, by path.

    >>> from jaxleak.models import get_victim
    >>> layer_order(get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=(5, 4)))
    ('fc1', 'fc2', 'head')
    """
    variables = victim.abstract_variables()
    owners = sorted({path.rsplit("/", 1)[0] if "/" in path else "" for path in flatten_tree(variables["params"])})
    seen: list[str] = []

    def record(next_fun, args, kwargs, context):
        path = "/".join(context.module.path)
        if path not in seen:
            seen.append(path)
        return next_fun(*args, **kwargs)

    dummy = jnp.zeros((1, *victim.image_shape), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v: victim.module.apply(v, dummy, train=False), variables)
    rank = {p: i for i, p in enumerate(seen)}
    return tuple(sorted(owners, key=lambda p: (rank.get(p, len(rank)), p)))


def dlf_layer_weights(victim, *, decay: bool = True) -> PyTree:
    """A params-shaped tree: ``e^{-i}`` on every leaf of the ``i``-th layer from the input.

    DLF weights layer ``i`` of ``L`` by ``e^{L - i}`` normalised by the first layer's, i.e.
    ``e^{-i}``, its kernel and bias alike. ``decay=False``: all ones.

    >>> from jaxleak.models import get_victim
    >>> w = dlf_layer_weights(get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=5))
    >>> round(w["fc1"]["kernel"], 4), round(w["head"]["bias"], 4)
    (1.0, 0.3679)
    """
    index = {p: i for i, p in enumerate(layer_order(victim))}
    paths = flatten_tree(victim.abstract_variables()["params"])
    owner = lambda p: p.rsplit("/", 1)[0] if "/" in p else ""
    return unflatten_tree({p: math.exp(-index[owner(p)]) if decay else 1.0 for p in paths})


def update_distance(simulated: PyTree, observed: PyTree, weights: PyTree, lr: float) -> Float[Array, ""]:
    """``sum_l w_l ||(simulated_l - observed_l) / lr||^2``: DLF's matching term before ``/ S``.

    >>> import jax.numpy as jnp
    >>> float(update_distance({"a": jnp.ones(2)}, {"a": jnp.zeros(2)}, {"a": 0.5}, 0.5))
    4.0
    """
    terms = jax.tree_util.tree_map(lambda s, o, w: w * jnp.sum(jnp.square((s - o) / lr)), simulated, observed,
                                   weights)
    return sum(jax.tree_util.tree_leaves(terms))


# --------------------------------------------------------------------------- the replay


def replay_protocol(protocol: Protocol) -> Protocol:
    """The FedAvg protocol DLF replays: ``protocol`` itself, or for FedSGD one full-batch SGD step of lr 1.

    A FedSGD update is the mean gradient at ``w0``, which is ``w0 - w1`` of exactly that step,
    so DLF runs on FedSGD captures unchanged (its ``/ lr`` is then ``/ 1``).

    >>> replay_protocol(Protocol()).schedule_shape(4), replay_protocol(Protocol()).lr
    ((1, 1, 4), 1.0)
    """
    if protocol.kind == "fedsgd":
        return Protocol(kind="fedavg", local_epochs=1, local_batch=None, optimizer="sgd", lr=1.0,
                        global_epoch=protocol.global_epoch)
    return protocol


def replay_schedule(protocol: Protocol, samples: int) -> Int[Array, "e s b"]:
    """DLF's fixed order: step ``s`` of every epoch takes slots ``s B ... s B + B - 1`` (``-1`` pads).

    >>> replay_schedule(Protocol(kind="fedavg", local_epochs=2, local_batch=2), 3).tolist()
    [[[0, 1], [2, -1]], [[0, 1], [2, -1]]]
    """
    e, s, b = protocol.schedule_shape(samples)
    order = jnp.concatenate([jnp.arange(samples, dtype=jnp.int32), jnp.full((s * b - samples,), -1, jnp.int32)])
    return jnp.broadcast_to(order.reshape(s, b), (e, s, b))


def simulated_update(
    victim,
    variables: PyTree,
    images: Float[Array, "e m h w c"],
    label_probs: Float[Array, "e m k"],
    *,
    protocol: Protocol,
    eps_root: float = 0.0,
) -> PyTree:
    """The ``w0 - w1`` a client would release if epoch ``e`` saw ``images[e]`` in slot order.

    Runs the client's own local steps (:func:`jaxleak.protocols._local.run_local_steps`) with
    soft labels; differentiable in ``images``. With ``images[e]`` = the true images in the
    order of the capture's ``schedule[e]`` it reproduces the capture's (noise-free) update
    of a deterministic victim.

    Args:
      victim: the victim (static); a PRECODE one runs its bottleneck's mean path ``z = mu``
        with its KL penalty (soft labels, :func:`jaxleak.protocols._local.run_local_steps`), so
        its simulated update differs from the client's sampled one by the draws' effect.
      variables: server variables ``w0``.
      images: ``[E, M, H, W, C]`` one copy of the client's images per epoch, in [0, 1].
      label_probs: ``[E, M, K]`` their label distributions.
      protocol: the client's ``fedavg`` protocol (static).
      eps_root: see :func:`jaxleak.protocols._local.local_optimizer`.

    Returns:
      The params-shaped simulated update.

    >>> import jax, jax.numpy as jnp
    >>> from jaxleak.models import get_victim
    >>> v = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=5)
    >>> p = Protocol(kind="fedavg", local_epochs=2, local_batch=1, optimizer="sgd", lr=0.01)
    >>> u = simulated_update(v, v.init(jax.random.key(0)), jnp.zeros((2, 3, 4, 4, 1)),
    ...                      jnp.full((2, 3, 3), 1 / 3), protocol=p)
    >>> u["fc1"]["kernel"].shape
    (16, 5)
    """
    e, m = images.shape[:2]
    order = replay_schedule(protocol, m)
    _, s, b = order.shape
    safe, valid = jnp.maximum(order, 0), order >= 0
    epochs = jnp.arange(e)[:, None, None]
    batches = images[epochs, safe].reshape(e * s, b, *images.shape[2:])
    probs = label_probs[epochs, safe].reshape(e * s, b, label_probs.shape[-1])
    update, _ = run_local_steps(victim, variables, batches, probs, valid.reshape(e * s, b), protocol=protocol,
                                eps_root=eps_root)
    return update


# --------------------------------------------------------------------------- priors


def order_kernel(channels: int, filters: int = 96, seed: int = 0) -> Float[Array, "p f"]:
    """The order prior's fixed random 3x3 convolution as a ``[C * 9, filters]`` patch matrix.

    LeCun-normal (DLF: a freshly initialised Flax ``Conv(96, (3, 3))``, whose bias is 0).
    """
    fan_in = 9 * channels
    init = jax.nn.initializers.lecun_normal()
    return init(jax.random.key(seed), (fan_in, filters), jnp.float32)


def order_prior(images: Float[Array, "e m h w c"], kernel: Float[Array, "p f"]) -> Float[Array, ""]:
    """DLF's epoch-order-invariant prior: ``mean_{e, e'} mean((max_m f(x_e) - max_m f(x_e'))^2)``.

    ``f`` is the fixed random 3x3 convolution ``kernel`` (``SAME`` padding); the max over
    an epoch's images does not depend on their order, so the prior is 0 exactly when every
    epoch's copies give the same feature maxima (e.g. the same images in any order). The
    mean runs over all ``E^2`` ordered pairs, the ``E`` zero diagonal ones included, as DLF's.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.uniform(jax.random.key(0), (1, 3, 4, 4, 1))
    >>> float(order_prior(jnp.concatenate([x, x[:, ::-1]]), order_kernel(1, 8)))
    0.0
    """
    e, m = images.shape[:2]
    flat = images.reshape(e * m, *images.shape[2:])
    patches = jax.lax.conv_general_dilated_patches(flat, (3, 3), (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    feats = (patches @ kernel).reshape(e, m, *patches.shape[1:3], kernel.shape[-1])
    peak = jnp.max(feats, axis=1)
    return jnp.mean(jnp.square(peak[:, None] - peak[None, :]))


def pixel_range_penalty(images: Float[Array, "n h w c"]) -> Float[Array, ""]:
    """DLF's range term: ``sum_{h, w, c} mean_n (x - clip(x, 0, 1))^2`` in [0, 1] pixel space.

    >>> import jax.numpy as jnp
    >>> float(pixel_range_penalty(jnp.array([[[[1.5]], [[0.5]]], [[[-1.0]], [[0.2]]]])))
    0.625
    """
    return jnp.sum(jnp.mean(jnp.square(images - jnp.clip(images, 0.0, 1.0)), axis=0))


def match_weight(start: float, end: float, iterations: int, it: Array) -> Float[Array, ""]:
    """DLF's matching weight: geometric from ``start`` to ``end`` over the first half, then ``end``.

    DLF multiplies by ``(end / start)^(1 / (iterations / 2))`` before every iteration, so
    iteration 0 already uses one factor.

    >>> [round(float(match_weight(4.0, 2.0, 400, jnp.asarray(k))), 4) for k in (0, 199, 399)]
    [3.9862, 2.0, 2.0]
    """
    frac = jnp.minimum((jnp.asarray(it, jnp.float32) + 1.0) / (iterations / 2), 1.0)
    return start * (end / start) ** frac


# --------------------------------------------------------------------------- matching the epochs


def _assignment(cost: Float[Array, "m m"]) -> Int[Array, " m"]:
    """``order[i]`` = the column assigned to row ``i``: exact for ``m <= EXACT_MATCH_MAX``, else greedy."""
    m = cost.shape[0]
    if m <= EXACT_MATCH_MAX:
        perms = jnp.asarray(np.array(list(itertools.permutations(range(m))), np.int32))
        total = jnp.sum(cost[jnp.arange(m), perms], axis=1)
        return perms[jnp.argmin(total)]

    # Greedy: repeatedly the cheapest remaining pair (no jittable Hungarian here).
    def pick(_, carry):
        c, order = carry
        flat = jnp.argmin(c)
        i, j = flat // m, flat % m
        return c.at[i, :].set(jnp.inf).at[:, j].set(jnp.inf), order.at[i].set(j)

    _, order = jax.lax.fori_loop(0, m, pick, (cost, jnp.zeros((m,), jnp.int32)))
    return order


def match_epochs(copies: Float[Array, "e m h w c"]) -> Float[Array, "e m h w c"]:
    """Every epoch's copy reordered to epoch 0's slots (epoch 0 unchanged).

    Cost of pairing slot ``i`` of epoch 0 with image ``j`` of epoch ``e``: ``log MSE``, i.e.
    DLF's ``-PSNR`` up to a constant. The total cost is minimised exactly over all ``M!``
    orders for ``M <= EXACT_MATCH_MAX`` (what DLF's host-side Hungarian matching returns);
    above that, greedily (cheapest remaining pair first), which may differ.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.uniform(jax.random.key(0), (3, 2, 2, 1))
    >>> out = match_epochs(jnp.stack([x, x[::-1]]))
    >>> bool(jnp.all(out[1] == x))
    True
    """
    first = copies[0]

    def align(other):
        mse = jnp.mean(jnp.square(first[:, None] - other[None]), axis=(2, 3, 4))
        return other[_assignment(jnp.log(mse + 1e-12))]

    return jnp.concatenate([first[None], jax.vmap(align)(copies[1:])])


# --------------------------------------------------------------------------- the attack


@functools.lru_cache(maxsize=32)
def make_dlf(victim, config: DLFConfig, *, batch_size: int, protocol: Protocol, prior=None) -> Problem:
    """DLF for ONE observed FedAvg update of a client of ``batch_size`` images.

    Args:
      victim: the victim (hashable). A PRECODE victim is replayed along its bottleneck's mean
        path (``eps = 0``): the attacker cannot know the client's draws (:func:`simulated_update`).
      config: :class:`DLFConfig`.
      batch_size: the client's number of images ``M``.
      protocol: the client's :class:`Protocol` (E, B, optimizer, lr), public in the capture's
        meta; a FedSGD one is replayed as one full-batch SGD step of lr 1 (:func:`replay_protocol`).
      prior: unused (DLF has no learned prior); must be ``None``.

    Returns:
      A :class:`Problem` over targets ``{"update": w0 - w1 tree, "label_probs": [M, K]}``
      with ``shared = {"variables": w0, "prior": None}``. Its candidate is the epoch copies
      matched to epoch 0 (:func:`match_epochs`), averaged and clipped to [0, 1]; the loss it
      reports is the matching term alone (``sum_i e^{-i} ||.||^2 / S``, no schedule weight).

    Raises:
      ValueError: ``batch_size < 1`` or a prior.

    >>> import jax, jax.numpy as jnp
    >>> from jaxleak.models import get_victim
    >>> v = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=5)
    >>> p = Protocol(kind="fedavg", local_epochs=2, local_batch=1, optimizer="sgd", lr=0.01)
    >>> problem = make_dlf(v, DLFConfig(iterations=5), batch_size=2, protocol=p, prior=None)
    >>> w0 = v.init(jax.random.key(0))
    >>> target = {"update": jax.tree_util.tree_map(jnp.zeros_like, w0["params"]),
    ...           "label_probs": jax.nn.one_hot(jnp.array([0, 1]), 3)}
    >>> state = problem.init(jax.random.key(1), target, {"variables": w0, "prior": None})
    >>> state["z"].shape, problem.candidate(state, None).images.shape
    ((2, 2, 4, 4, 1), (2, 4, 4, 1))
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if prior is not None:
        raise ValueError("DLF uses no learned prior: pass prior=None")
    protocol = replay_protocol(protocol)
    epochs, steps, _ = protocol.schedule_shape(batch_size)
    weights = dlf_layer_weights(victim, decay=config.layer_decay)
    kernel = order_kernel(victim.image_shape[-1], config.order_filters, config.order_seed)
    schedule = optax.exponential_decay(config.learning_rate, config.lr_decay_steps, config.lr_decay)
    opt = optax.adam(schedule)
    mean, std = config.pixel_mean, config.pixel_std
    shape = (epochs, batch_size, *victim.image_shape)

    def objective(z, probs, update, shared, scale):
        x = mean + std * z
        copies = jnp.broadcast_to(probs, (epochs, *probs.shape))
        sim = simulated_update(victim, shared["variables"], x, copies, protocol=protocol, eps_root=config.eps_root)
        match = update_distance(sim, update, weights, protocol.lr) / steps
        reg = (config.tv * total_variation(z)
               + config.pixel_range * pixel_range_penalty(x.reshape(-1, *victim.image_shape))
               + config.order_prior * order_prior(z, kernel))
        return scale * match + reg, match

    def init(key, target, shared):
        z = config.init_std * jax.random.normal(key, shape, jnp.float32)
        return {"z": z, "opt": opt.init(z), "probs": target["label_probs"]}

    def step(state, target, shared, it):
        scale = match_weight(config.match_start, config.match_end, config.iterations, it)
        (_, match), grad = jax.value_and_grad(objective, has_aux=True)(
            state["z"], state["probs"], target["update"], shared, scale)
        updates, opt_state = opt.update(grad, state["opt"], state["z"])
        return {**state, "z": optax.apply_updates(state["z"], updates), "opt": opt_state}, match

    def candidate(state, shared):
        copies = match_epochs(mean + std * state["z"])
        return Candidate(images=jnp.clip(jnp.mean(copies, axis=0), 0.0, 1.0), label_probs=state["probs"])

    return Problem(init=init, step=step, candidate=candidate)


__all__ = [
    "EXACT_MATCH_MAX",
    "DLFConfig",
    "dlf_layer_weights",
    "layer_order",
    "make_dlf",
    "match_epochs",
    "match_weight",
    "order_kernel",
    "order_prior",
    "pixel_range_penalty",
    "replay_protocol",
    "replay_schedule",
    "simulated_update",
    "update_distance",
]
