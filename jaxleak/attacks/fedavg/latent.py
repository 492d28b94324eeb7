"""``flow-latent``: a GGL-style latent search in the flow prior's noise space. A substitute, NOT GGL.

GGL (Li et al. 2022, "Auditing privacy defenses in federated learning via generative gradient
leakage") searches the latent space of a pretrained GAN so that the generated image's gradient matches
the observed one. No pretrained GAN exists here, so this attack searches the initial noise ``z`` of the
flow-matching prior's ODE instead: the image is ``G(z) = to_image(Phi_1(z))``, where ``Phi_1`` is a few
fixed steps of a differentiable solver of ``dx/dt = v(x, t)`` from ``t = 0`` (noise) to ``t = 1`` (data,
in [-1, 1]) and ``to_image`` maps to [0, 1] and clips. The matching loss is SME's surrogate cosine
(:func:`jaxleak.attacks.fedavg._surrogate.surrogate_matching`), so the attack reads FedAvg updates
``w0 - w1`` the way SME and FM do. Report it in the GGL row under its own name ("flow-latent,
GGL-style"), never as GGL: the generator (a few-step flow, not a GAN), its training data and the
optimiser (Adam, not GGL's CMA-ES / Bayesian optimisation) all differ.

Everything below is for ONE observed client; the optimisation driver vmaps it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PyTree

from jaxleak.attacks.fedavg._surrogate import surrogate_matching
from jaxleak.attacks.optimization._attacks import ig_schedule
from jaxleak.attacks.optimization._driver import Candidate, Problem
from jaxleak.attacks.optimization._matching import layer_weights, total_variation
from jaxleak.priors.flow import DEFAULT_PRIOR, METHODS, integrate, to_image_space
from jaxleak.priors.unet import UNetConfig, velocity_fn
from jaxleak.protocols import Protocol

Velocity = Callable[[PyTree, Float[Array, "b h w c"], Float[Array, " b"]], Float[Array, "b h w c"]]
"""``(prior params, x [B, H, W, C] in [-1, 1], t [B]) -> v(x, t)``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlowLatentConfig:
    """The GGL-style flow-latent attack (a substitute for GGL, not GGL).

    Attributes:
      iterations: Adam steps. 500 = GGL's budget: its public code searches with a budget of 500
        evaluations, and the FM paper ran its GGL row for 500 iterations (its Sec. 5, "Typical
        iteration counts").
      learning_rate: Adam step on the latent ``z``. 0.1: Adam moves every coordinate by about the
        step size, and ``z``'s coordinates are unit-scale N(0, 1), so 0.1 is a tenth of their
        spread per step, the relative step of Inverting Gradients / breaching on unit-scale
        (normalised) images; over the undecayed first 3/8 of 500 steps a coordinate can travel
        ~19 standard deviations, ample to leave its start. Ours, not GGL's (GGL's CMA-ES has no
        step size); not swept (no trained prior was available when this was written).
      alpha_learning_rate: SME's own Adam step for the surrogate's ``alpha`` (SME's code: 1e-3).
      alpha_init: SME's starting ``alpha`` (0.5: the midpoint of ``w0`` and ``w1``).
      lr_decay: both step sizes x0.1 at 3/8, 5/8 and 7/8 of ``iterations`` (IG's and SME's
        schedule; :func:`jaxleak.attacks.optimization.ig_schedule`).
      solver_steps: fixed steps of the ODE solver from noise to image (the generator's depth:
        each step is one UNet evaluation for ``"euler"``, two for ``"midpoint"`` / ``"heun"``;
        the attack differentiates through all of them every iteration).
      method: ``"euler"`` (default: the cheapest generator, 4 UNet calls at 4 steps),
        ``"midpoint"`` or ``"heun"``.
      kl: weight of GGL's latent regulariser, per image the KL divergence of a Gaussian with the
        latent's own mean ``mu`` and variance ``s2`` (over its H W C entries) from N(0, 1),
        ``0.5 (s2 + mu^2 - 1 - log s2)``, summed over the images. It keeps ``z`` on the shell
        ``||z||^2 ~ HWC`` where the prior's noise lives. 1e-4: the weight a public GGL-with-Adam
        re-implementation uses with the cosine distance (GGL's own code adds 0.1 x KL to an L2
        distance, whose scale is unrelated, and only for an unbounded latent). Its gradient per coordinate is
        O(kl / HWC), so at 1e-4 it only acts once the matching gradient is near zero; 0 turns it off.
      tv: total-variation weight on the generated images (0: off; GGL's images come from the
        generator, which is the image prior).
      labels: ``"known"`` (SME's threat model) or ``"infer"`` (read off the update's head by the
        runner); either way the problem reads ``target["label_probs"]``.
      prior: the flow prior, a shipped name or a ``jaxleak train flow-prior`` folder (resolved by
        the runner with :func:`jaxleak.priors.load`).
      restarts: latent initialisations per target, best by matching loss.

    >>> FlowLatentConfig().iterations, FlowLatentConfig().solver_steps
    (500, 4)
    """

    iterations: int = 500
    learning_rate: float = 0.1
    alpha_learning_rate: float = 1e-3
    alpha_init: float = 0.5
    lr_decay: bool = True
    solver_steps: int = 4
    method: str = "euler"
    kl: float = 1e-4
    tv: float = 0.0
    labels: str = "known"
    prior: str = DEFAULT_PRIOR
    restarts: int = 1
    label_modes = ("known", "infer")

    def __post_init__(self):
        for name in ("iterations", "restarts", "solver_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.labels not in self.label_modes:
            raise ValueError(f"labels must be one of {self.label_modes}, got {self.labels!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not (self.learning_rate > 0 and self.alpha_learning_rate > 0):
            raise ValueError(f"learning rates must be > 0, got {self.learning_rate}, {self.alpha_learning_rate}")
        if not 0.0 <= self.alpha_init <= 1.0:
            raise ValueError(f"alpha_init must be in [0, 1], got {self.alpha_init}")
        if not (self.kl >= 0 and self.tv >= 0):
            raise ValueError(f"kl and tv must be >= 0, got {self.kl}, {self.tv}")


# --------------------------------------------------------------------------- the math


def latent_kl(z: Float[Array, "m h w c"]) -> Float[Array, ""]:
    """GGL's latent regulariser: ``sum_i KL(N(mu_i, s2_i) || N(0, 1))`` over the images' latents.

    ``mu_i`` and ``s2_i`` are the mean and (biased) variance of latent ``i``'s entries; zero exactly
    when every latent has mean 0 and variance 1, i.e. lies on the Gaussian shell ``||z_i||^2 = D``.

    >>> float(latent_kl(jnp.array([[[[1.0]], [[-1.0]]]])))
    0.0
    """
    axes = tuple(range(1, z.ndim))
    mu = jnp.mean(z, axis=axes)
    s2 = jnp.var(z, axis=axes)
    return 0.5 * jnp.sum(s2 + mu**2 - 1.0 - jnp.log(s2 + 1e-10))


def generate(
    velocity: Velocity,
    prior_params: PyTree,
    z: Float[Array, "m h w c"],
    *,
    steps: int,
    method: str = "euler",
) -> Float[Array, "m h w c"]:
    """The flow's image of noise ``z``: ``steps`` solver steps from ``t = 0`` to ``1``, then [0, 1].

    Differentiable in ``z`` (and the params) end to end: :func:`jaxleak.priors.integrate` is a
    ``fori_loop`` of fixed length, which reverse-mode differentiates as a scan. Pixels the flow
    pushes outside [-1, 1] are clipped, so their gradient is zero.

    >>> x = generate(lambda p, x, t: jnp.ones_like(x), None, jnp.full((1, 2, 2, 1), -1.0), steps=4)
    >>> x.ravel().tolist()
    [0.5, 0.5, 0.5, 0.5]
    """
    x1 = integrate(lambda x, t: velocity(prior_params, x, t), z, steps, method)
    return to_image_space(x1)


# --------------------------------------------------------------------------- the problem


def flow_latent_problem(
    victim,
    config: FlowLatentConfig,
    velocity: Velocity,
    *,
    batch_size: int,
    learn_alpha: bool = True,
) -> Problem:
    """The attack for ONE client with any velocity field (:func:`make_flow_latent` passes the UNet's).

    The state is ``{"z": [M, H, W, C], "alpha": scalar, ...}``; each step takes Adam on ``z`` and
    SME's own Adam on ``alpha`` (clamped to [0, 1] afterwards) against
    ``surrogate_matching(G(z), alpha) + kl * latent_kl(z) + tv * TV(G(z))``, and returns the
    matching term alone (the driver's ``matching_loss``). With ``learn_alpha=False`` ``alpha``
    stays 0: the match is taken at ``w0`` (FedSGD, where the update is the gradient there).

    Args:
      victim: the victim (its convolutions as the attack should run them).
      config: the attack's settings.
      velocity: ``(prior params, x, t) -> v(x, t)``; the prior params come from ``shared["prior"]``.
      batch_size: the client's images ``M``.
      learn_alpha: optimise SME's ``alpha`` (FedAvg) or keep it at 0.

    Returns:
      A :class:`Problem` for the driver.
    """
    weights = layer_weights(victim.abstract_variables()["params"])
    z_opt = optax.adam(ig_schedule(config.learning_rate, config.iterations, config.lr_decay))
    alpha_opt = optax.adam(ig_schedule(config.alpha_learning_rate, config.iterations, config.lr_decay))
    shape = (batch_size, *victim.image_shape)
    alpha0 = config.alpha_init if learn_alpha else 0.0

    def images_of(z, shared):
        return generate(velocity, shared["prior"], z, steps=config.solver_steps, method=config.method)

    def objective(x, target, shared):
        images = images_of(x["z"], shared)
        match = surrogate_matching(victim, shared["variables"], target["update"], x["alpha"], images,
                                   target["label_probs"], weights)
        loss = match + config.kl * latent_kl(x["z"])
        if config.tv:
            loss = loss + config.tv * total_variation(images)
        return loss, match

    def init(key, target, shared):
        z = jax.random.normal(key, shape, jnp.float32)
        alpha = jnp.asarray(alpha0, jnp.float32)
        return {"z": z, "alpha": alpha, "z_opt": z_opt.init(z), "alpha_opt": alpha_opt.init(alpha),
                "probs": target["label_probs"]}

    def step(state, target, shared, it):
        x = {"z": state["z"], "alpha": state["alpha"]}
        (_, match), grad = jax.value_and_grad(objective, has_aux=True)(x, target, shared)
        dz, z_state = z_opt.update(grad["z"], state["z_opt"], state["z"])
        da, a_state = alpha_opt.update(grad["alpha"], state["alpha_opt"], state["alpha"])
        alpha = jnp.clip(state["alpha"] + da, 0.0, 1.0) if learn_alpha else state["alpha"]
        return {**state, "z": state["z"] + dz, "alpha": alpha, "z_opt": z_state, "alpha_opt": a_state}, match

    def candidate(state, shared):
        return Candidate(images=images_of(state["z"], shared), label_probs=state["probs"])

    return Problem(init=init, step=step, candidate=candidate)


@functools.lru_cache(maxsize=32)
def make_flow_latent(
    victim,
    config: FlowLatentConfig,
    *,
    batch_size: int,
    protocol: Protocol,
    prior: UNetConfig | None,
) -> Problem:
    """flow-latent (GGL-style, not GGL) for ONE client of ``batch_size`` images.

    Args:
      victim: the victim (``victim.with_conv_impl("patches")`` for convolutional victims, as the
        optimisation attacks run them).
      config: the attack's settings.
      batch_size: the client's number of images ``M``.
      protocol: the client's protocol. FedAvg learns SME's ``alpha``; FedSGD keeps it at 0 (the
        update is the gradient at ``w0`` itself).
      prior: the flow prior's UNet config; its params arrive in ``shared["prior"]``.

    Returns:
      A :class:`Problem`: a target is ``{"update": w0 - w1, "label_probs": [M, K]}``, ``shared`` is
      ``{"variables": w0, "prior": the UNet's params}``; candidates are images in [0, 1].

    Raises:
      ValueError: no prior, or a prior of another image shape than the victim's.

    >>> from jaxleak.models import get_victim
    >>> from jaxleak.priors.unet import init_params
    >>> cfg = UNetConfig(image_size=8, base_width=8, channel_mult=(1,), num_res_blocks=1,
    ...                  attention_resolutions=(), groups=4)
    >>> victim = get_victim("mlp", image_shape=(8, 8, 3), num_classes=3, hidden=4)
    >>> problem = make_flow_latent(victim, FlowLatentConfig(iterations=2), batch_size=2,
    ...                            protocol=Protocol(kind="fedavg"), prior=cfg)
    >>> shared = {"variables": victim.init(jax.random.key(0)), "prior": init_params(cfg, jax.random.key(1))}
    >>> target = {"update": shared["variables"]["params"], "label_probs": jnp.eye(3)[:2]}
    >>> state = problem.init(jax.random.key(2), target, shared)
    >>> problem.candidate(state, shared).images.shape
    (2, 8, 8, 3)
    """
    if prior is None:
        raise ValueError("flow-latent needs a flow prior (its UNet config); got prior=None")
    if tuple(prior.image_shape) != tuple(victim.image_shape):
        raise ValueError(f"the prior makes {prior.image_shape} images, the victim takes {victim.image_shape}")
    return flow_latent_problem(victim, config, velocity_fn(prior, conv_impl="patches"), batch_size=batch_size,
                               learn_alpha=protocol.kind == "fedavg")


__all__ = [
    "FlowLatentConfig",
    "flow_latent_problem",
    "generate",
    "latent_kl",
    "make_flow_latent",
]
