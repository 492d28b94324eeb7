"""ONE client's local training: the function the simulation vmaps and the attacks replay.

:func:`local_update` is pure and written for one client; :mod:`jaxleak.capture`
``vmap``s it over clients at one edge, and attacks that must replay a client
(DLF unrolls its steps; SME / FM differentiate at a surrogate point) call the
same functions, so "what a client does" exists once: FedAvg's local steps over a
given sequence of batches are :func:`run_local_steps`, which :func:`local_update`
calls on the client's shuffled schedule and DLF on its dummy batches (soft labels,
differentiated through every step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree

from jaxleak.protocols._protocol import Protocol, make_schedule

StepTransform = Callable[[PyTree, PRNGKeyArray], PyTree]
"""``(per-example gradients [B, ...], key) -> protected mean gradient`` (a step-stage defense)."""

_DERIVED = 0x5EED  # fold_in tag of the keys derived for shuffling, sampling and update defenses


class ClientResult(NamedTuple):
    """What :func:`local_update` returns for one client.

    Attributes:
      update: params-shaped tree in the descent direction (FedSGD: the gradient;
        FedAvg: ``w0 - w1``).
      schedule: ``[E, S, B]`` image indices per local step (``-1`` pads a short batch).
      finite: ``False`` when a per-example gradient, a step gradient or the update
        held a NaN or inf (the simulation turns it into an error naming the client).
    """

    update: PyTree
    schedule: Int[Array, "e s b"]
    finite: Bool[Array, ""]


def derived_keys(key: PRNGKeyArray) -> tuple[PRNGKeyArray, PRNGKeyArray, PRNGKeyArray]:
    """``(shuffle, sample, defense)`` keys of a client; its key itself draws FedSGD's DP noise."""
    k = jax.random.split(jax.random.fold_in(key, _DERIVED), 3)
    return k[0], k[1], k[2]


def _all_finite(tree: PyTree) -> Bool[Array, ""]:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _soft_loss(victim, params: PyTree, batch_stats: PyTree | None, image: Float[Array, "h w c"],
               probs: Float[Array, " k"]) -> Float[Array, ""]:
    """:meth:`Victim.soft_losses` of ONE example (a PRECODE victim: its mean path, with its KL)."""
    variables = {"params": params}
    if victim.has_batch_stats:
        variables["batch_stats"] = batch_stats
    return victim.soft_losses(variables, image[None], probs[None])[0]


def _example_loss(victim, soft: bool = False) -> Callable:
    """``(params, batch_stats, image, label, key) -> loss`` of one example.

    ``soft``: the label is a distribution ``[K]`` (an attacker's dummy labels) rather than a
    class index; a PRECODE victim then runs its mean path and ignores the key (:func:`_soft_loss`).
    """
    stochastic = getattr(victim, "stochastic", False)
    if soft:
        return lambda p, bs, x, y, k: _soft_loss(victim, p, bs, x, y)
    if stochastic:
        return lambda p, bs, x, y, k: victim.loss(p, bs, x, y, k)
    return lambda p, bs, x, y, k: victim.loss(p, bs, x, y)


def step_gradient(
    victim,
    params: PyTree,
    batch_stats: PyTree | None,
    images: Float[Array, "b h w c"],
    labels: Int[Array, " b"] | Float[Array, "b k"],
    valid: Bool[Array, " b"],
    sample_keys: PRNGKeyArray | None,
    noise_key: PRNGKeyArray | None,
    step: StepTransform | None = None,
) -> tuple[PyTree, Bool[Array, ""]]:
    """The gradient one local step uses, and whether it (and every per-example one) is finite.

    Without ``step``: the gradient of the mean loss over the ``valid`` examples. With a
    step-stage defense (DP): per-example gradients, then ``step(grads, noise_key)``;
    padding is not allowed there (the caller checks ``B | M``). Float ``labels`` ``[b, K]``
    are label distributions (soft cross-entropy, as an attacker's dummy labels; a PRECODE
    victim then runs its mean path, :func:`_soft_loss`); the keys may be ``None`` when the
    victim is deterministic or the labels are soft, and there is no ``step``.
    """
    one = _example_loss(victim, soft=jnp.issubdtype(labels.dtype, jnp.floating))
    if step is None:
        def mean_loss(p):
            losses = jax.vmap(one, in_axes=(None, None, 0, 0, 0))(p, batch_stats, images, labels, sample_keys)
            return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

        grad = jax.grad(mean_loss)(params)
        return grad, _all_finite(grad)
    grads = jax.vmap(jax.grad(one), in_axes=(None, None, 0, 0, 0))(params, batch_stats, images, labels, sample_keys)
    protected = step(grads, noise_key)
    return protected, _all_finite(grads) & _all_finite(protected)


def local_update(
    victim,
    variables: PyTree,
    images: Float[Array, "m h w c"],
    labels: Int[Array, " m"],
    key: PRNGKeyArray,
    *,
    protocol: Protocol,
    step: StepTransform | None = None,
) -> ClientResult:
    """ONE client's released update before any update-stage defense.

    Args:
      victim: a :class:`jaxleak.models.Victim` (static).
      variables: the server's variables ``w0`` (``params``, optionally ``batch_stats``).
      images: the client's ``M`` images, float ``[M, H, W, C]`` in [0, 1].
      labels: int ``[M]``.
      key: the client's PRNG key. FedSGD draws its DP noise from ``key`` itself; the
        shuffles, stochastic victims (PRECODE) and FedAvg's per-step noise use keys
        derived from it (:func:`derived_keys`).
      protocol: :class:`Protocol` (static).
      step: optional step-stage defense (DP) applied to every local step's
        per-example gradients.

    Returns:
      A :class:`ClientResult`.

    Raises:
      ValueError: (at trace time) a step defense with a local batch that does not divide ``M``.

    >>> import jax, jax.numpy as jnp
    >>> from jaxleak.models import get_victim
    >>> v = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=5)
    >>> w0 = v.init(jax.random.key(0))
    >>> x, y = jnp.zeros((6, 4, 4, 1)), jnp.array([0, 1, 2, 0, 1, 2])
    >>> p = Protocol(kind="fedavg", local_epochs=2, local_batch=4, optimizer="sgd", lr=0.01)
    >>> r = local_update(v, w0, x, y, jax.random.key(1), protocol=p)
    >>> r.schedule.shape, bool(r.finite)
    ((2, 2, 4), True)
    """
    samples = images.shape[0]
    e, s, b = protocol.schedule_shape(samples)
    if step is not None and s * b != samples:
        raise ValueError(f"DP inside local training needs the local batch to divide the client's images: "
                         f"B={b} does not divide M={samples}")
    k_shuffle, k_sample, _ = derived_keys(key)
    schedule = make_schedule(protocol, samples, k_shuffle)
    steps = schedule.reshape(e * s, b)
    # Example j of step t draws its stochastic-victim sample from fold_in(k_sample, t * B + j).
    sample_keys = jax.vmap(lambda t: jax.vmap(lambda j: jax.random.fold_in(k_sample, t * b + j))(
        jnp.arange(b)))(jnp.arange(e * s))
    safe = jnp.maximum(steps, 0)
    batches, batch_labels, valid = jnp.asarray(images)[safe], jnp.asarray(labels)[safe], steps >= 0

    if protocol.kind == "fedsgd":
        grad, finite = step_gradient(victim, variables["params"], variables.get("batch_stats"), batches[0],
                                     batch_labels[0], valid[0], sample_keys[0], key, step)
        return ClientResult(update=grad, schedule=schedule, finite=finite)

    k_noise = jax.random.fold_in(key, 1)
    noise_keys = jax.vmap(lambda t: jax.random.fold_in(k_noise, t))(jnp.arange(e * s))
    update, finite = run_local_steps(victim, variables, batches, batch_labels, valid, protocol=protocol,
                                     step=step, sample_keys=sample_keys, noise_keys=noise_keys)
    return ClientResult(update=update, schedule=schedule, finite=finite)


def local_optimizer(protocol: Protocol, *, eps_root: float = 0.0) -> optax.GradientTransformation:
    """The client's local optimizer: ``optax.sgd(lr)`` or ``optax.adam(lr)`` of ``protocol``.

    ``eps_root`` (Adam only) is added under Adam's square root. The client uses 0; an
    attacker that differentiates through the steps (DLF) passes a tiny value so that a
    parameter whose gradient is exactly 0 does not give ``d sqrt(v) / dv = inf``.

    >>> import jax.numpy as jnp
    >>> opt = local_optimizer(Protocol(kind="fedavg", optimizer="sgd", lr=0.5))
    >>> upd, _ = opt.update({"w": jnp.ones(2)}, opt.init({"w": jnp.zeros(2)}))
    >>> upd["w"].tolist()
    [-0.5, -0.5]
    """
    if protocol.optimizer == "sgd":
        return optax.sgd(protocol.lr)
    return optax.adam(protocol.lr, eps_root=eps_root)


def run_local_steps(
    victim,
    variables: PyTree,
    batches: Float[Array, "t b h w c"],
    labels: Int[Array, "t b"] | Float[Array, "t b k"],
    valid: Bool[Array, "t b"],
    *,
    protocol: Protocol,
    step: StepTransform | None = None,
    sample_keys: PRNGKeyArray | None = None,
    noise_keys: PRNGKeyArray | None = None,
    eps_root: float = 0.0,
) -> tuple[PyTree, Bool[Array, ""]]:
    """FedAvg's local training over a given sequence of ``T`` batches: ``(w0 - w1, finite)``.

    :func:`local_update` calls it on the batches of the client's shuffled schedule; an
    attacker replays a client by calling it on dummy batches in an order it chooses
    (DLF), with soft labels and differentiating through all ``T`` steps.

    Args:
      victim: a :class:`jaxleak.models.Victim` (static).
      variables: the server's variables ``w0`` (``params``, optionally ``batch_stats``).
      batches: ``[T, B, H, W, C]`` images of each local step, in step order.
      labels: ``[T, B]`` class indices, or ``[T, B, K]`` label distributions (soft
        cross-entropy, an attacker's replay: a PRECODE victim runs its bottleneck's mean
        path ``z = mu`` with its KL penalty, since the client's draws are unknown).
      valid: ``[T, B]``; ``False`` marks padding (left out of the step's mean loss).
      protocol: a ``fedavg`` :class:`Protocol` (its optimizer and lr; static).
      step: optional step-stage defense (DP) on every step's per-example gradients.
      sample_keys: ``[T, B]`` keys of a stochastic victim's samples (``None`` otherwise,
        and with soft labels).
      noise_keys: ``[T]`` keys of ``step`` (``None`` without it).
      eps_root: see :func:`local_optimizer` (0 for the client itself).

    Returns:
      ``(update, finite)``: the params-shaped ``w0 - w1`` and whether every step gradient
      and the update are finite.

    >>> import jax, jax.numpy as jnp
    >>> from jaxleak.models import get_victim
    >>> v = get_victim("mlp", image_shape=(4, 4, 1), num_classes=3, hidden=5)
    >>> w0 = v.init(jax.random.key(0))
    >>> p = Protocol(kind="fedavg", local_epochs=1, local_batch=2, optimizer="sgd", lr=0.01)
    >>> probs = jnp.full((3, 2, 3), 1 / 3)
    >>> u, ok = run_local_steps(v, w0, jnp.zeros((3, 2, 4, 4, 1)), probs, jnp.ones((3, 2), bool), protocol=p)
    >>> u["head"]["bias"].shape, bool(ok)
    ((3,), True)
    """
    if step is not None and noise_keys is None:
        raise ValueError("a step-stage defense needs noise_keys [T]")
    soft = jnp.issubdtype(labels.dtype, jnp.floating)
    if getattr(victim, "stochastic", False) and sample_keys is None and not soft:
        raise ValueError(f"{victim.name} samples its bottleneck: pass sample_keys [T, B]")
    params = variables["params"]
    batch_stats = variables.get("batch_stats")
    optimizer = local_optimizer(protocol, eps_root=eps_root)
    # The update is accumulated as the sum of the optimizer's steps (delta = w1 - w0) rather
    # than subtracted at the end, so it carries no extra cancellation error; the weights each
    # step sees are w0 + delta, as the client's own would be.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

    def body(carry, inp):
        delta, opt_state, ok = carry
        x, y, mask, sample_key, noise_key = inp
        current = jax.tree_util.tree_map(jnp.add, params, delta)
        grad, finite = step_gradient(victim, current, batch_stats, x, y, mask, sample_key, noise_key, step)
        upd, opt_state = optimizer.update(grad, opt_state, current)
        return (jax.tree_util.tree_map(jnp.add, delta, upd), opt_state, ok & finite), None

    init = (zeros, optimizer.init(params), jnp.asarray(True))
    (delta, _, finite), _ = jax.lax.scan(body, init, (batches, labels, valid, sample_keys, noise_keys))
    update = jax.tree_util.tree_map(jnp.negative, delta)
    return update, finite & _all_finite(update)


def client_update(
    victim,
    variables: PyTree,
    images: Float[Array, "m h w c"],
    labels: Int[Array, " m"],
    key: PRNGKeyArray,
    *,
    protocol: Protocol,
    defenses=None,
) -> ClientResult:
    """:func:`local_update` under a defense chain: what the client actually releases.

    ``defenses`` is a :class:`jaxleak.defenses.Chain` (or ``None``): its step-stage
    defense runs inside every local step, its update-stage defenses on the update,
    in the chain's order, with a key derived from the client's.
    """
    step = None if defenses is None else defenses.step
    result = local_update(victim, variables, images, labels, key, protocol=protocol,
                          step=None if step is None else step.apply)
    if defenses is None:
        return result
    _, _, k_defense = derived_keys(key)
    update = defenses.update(result.update, k_defense)
    return ClientResult(update=update, schedule=result.schedule, finite=result.finite & _all_finite(update))
