"""DP calibrations on the host: a :class:`DPConfig` and its concrete noise.

``resolve`` turns a :class:`DPConfig` into concrete noise scales; the jitted side
(clipping and noising one client's per-example gradients) is
:func:`jaxleak.defenses.dp.protect_update`, reached through the ``dp_paper`` /
``dpsgd`` defenses.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from jaxleak.privacy.accounting import ACCOUNTANTS, dpsgd_epsilon, dpsgd_noise_multiplier

CALIBRATIONS = ("paper", "dpsgd", "none")
MECHANISMS = ("gaussian", "laplace")
SCOPES = ("all", "layer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPConfig:
    """How a client protects its update.

    Attributes:
      calibration: ``"paper"`` (Mjolnir/Venom protocol), ``"dpsgd"`` (Abadi et al.)
        or ``"none"`` (no clipping, no noise).
      mechanism: ``"gaussian"`` or ``"laplace"`` (Laplace only under ``paper``).
      epsilon: privacy budget; ``None`` with ``dpsgd`` requires ``noise_multiplier``.
      delta: privacy parameter delta.
      clip: L2 clipping bound ``C``.
      lr: learning rate in the paper's sensitivity ``s = 2 * lr * C / m``.
      noise_multiplier: DP-SGD ``z``; when set it is used as given and no accountant runs.
      sampling_rate: DP-SGD Poisson sampling rate ``q`` for the accountant.
      steps: DP-SGD steps composed by the accountant.
      accountant: ``"rdp"`` or ``"pld"``.
      scope: which layers the ``paper`` calibration protects: ``"all"`` (every
        layer clipped to ``C`` on its own, then noised) or ``"layer"`` (only the
        captured dense layer, the FC layer of the paper's wording; the other
        layers are released as the plain mean gradient). The two agree on
        everything that reads only that layer (SPE, Venom, FGLA); they differ for
        attacks that match the whole update (docs/baselines.md).
    """

    calibration: str = "paper"
    mechanism: str = "gaussian"
    epsilon: float | None = 10.0
    delta: float = 1e-5
    clip: float = 1.0
    lr: float = 1e-3
    noise_multiplier: float | None = None
    sampling_rate: float = 1.0
    steps: int = 1
    accountant: str = "rdp"
    scope: str = "all"

    def __post_init__(self):
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if self.calibration == "dpsgd" and self.mechanism != "gaussian":
            raise ValueError("DP-SGD is defined with the Gaussian mechanism; use --mechanism gaussian")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope != "all" and self.calibration != "paper":
            raise ValueError(f"scope {self.scope!r} exists only under the paper calibration "
                             f"(dpsgd clips the whole gradient; none protects nothing)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.calibration != "none":
            if not (self.clip > 0 and math.isfinite(self.clip)):
                raise ValueError(f"clip must be a positive finite number, got {self.clip}")
            if not 0 < self.delta < 1:
                raise ValueError(f"delta must be in (0, 1), got {self.delta}")
            needs_eps = self.calibration == "paper" or self.noise_multiplier is None
            if needs_eps and (self.epsilon is None or not self.epsilon > 0):
                raise ValueError(f"epsilon must be > 0 for calibration {self.calibration!r}, got {self.epsilon}")
        if self.noise_multiplier is not None and not (
            self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)
        ):
            raise ValueError(
                f"noise_multiplier must be >= 0 and finite, got {self.noise_multiplier}"
            )
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate}")
        if not (isinstance(self.steps, numbers.Integral) and self.steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.calibration == "paper" and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResolvedDP:
    """Concrete noise of one calibration, for a client batch of ``batch_size``.

    Attributes:
      noise_scale: the scale drawn inside ``jaxleak.defenses.dp.protect_update``: Gaussian std or
        Laplace scale ``b`` (paper: added to the clipped mean; dpsgd: to the clipped sum).
      noise_std: per-coordinate std of the noise in the *released* update.
      noise_variance: ``noise_std ** 2`` (the ``sigma^2`` SPE may be given).
      noise_multiplier: DP-SGD ``z`` (``None`` otherwise).
      epsilon: the epsilon the noise was calibrated for (``inf`` for ``none``).
      scope: ``"all"`` or ``"layer"`` (see :class:`DPConfig`).
    """

    calibration: str
    mechanism: str
    batch_size: int
    clip: float
    noise_scale: float
    noise_std: float
    noise_variance: float
    noise_multiplier: float | None
    epsilon: float
    delta: float
    accountant: str | None
    scope: str = "all"

    def as_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def paper_noise_scale(
    epsilon: float,
    delta: float,
    *,
    mechanism: str = "gaussian",
    lr: float = 1e-3,
    clip: float = 1.0,
    batch_size: int = 1,
) -> float:
    """The paper protocol's noise scale.

    Gaussian std ``s * sqrt(2 ln(1.25/delta)) / eps`` or Laplace scale ``s / eps``,
    with sensitivity ``s = 2 * lr * C / m``.

    >>> round(paper_noise_scale(10.0, 1e-5), 7)
    0.000969
    """
    s = 2.0 * lr * clip / batch_size
    if mechanism == "gaussian":
        return s * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    if mechanism == "laplace":
        return s / epsilon
    raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")


def resolve(config: DPConfig, *, batch_size: int = 1) -> ResolvedDP:
    """Computes the noise of ``config`` for clients holding ``batch_size`` examples.

    Runs the accountant on the host for ``dpsgd`` when no noise multiplier is given.

    >>> r = resolve(DPConfig(calibration="dpsgd", epsilon=8.0), batch_size=4)
    >>> r.noise_std == r.noise_multiplier * r.clip / 4
    True
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    c = config
    if c.calibration == "none":
        return ResolvedDP(
            calibration="none", mechanism="none", batch_size=batch_size, clip=math.inf,
            noise_scale=0.0, noise_std=0.0, noise_variance=0.0, noise_multiplier=None,
            epsilon=math.inf, delta=c.delta, accountant=None,
        )
    if c.calibration == "paper":
        scale = paper_noise_scale(
            c.epsilon, c.delta, mechanism=c.mechanism, lr=c.lr, clip=c.clip, batch_size=batch_size
        )
        var = scale**2 if c.mechanism == "gaussian" else 2.0 * scale**2
        return ResolvedDP(
            calibration="paper", mechanism=c.mechanism, batch_size=batch_size, clip=c.clip,
            noise_scale=scale, noise_std=math.sqrt(var), noise_variance=var, noise_multiplier=None,
            epsilon=float(c.epsilon), delta=c.delta, accountant=None, scope=c.scope,
        )
    if c.noise_multiplier is not None:
        # The noise is given: report the epsilon it actually buys, not the one asked for.
        z, acc = c.noise_multiplier, c.accountant
        eps = (
            dpsgd_epsilon(z, c.delta, sampling_rate=c.sampling_rate, steps=c.steps, accountant=acc)
            if z > 0 else math.inf
        )
    else:
        z = dpsgd_noise_multiplier(
            float(c.epsilon), c.delta, sampling_rate=c.sampling_rate, steps=c.steps, accountant=c.accountant
        )
        eps, acc = float(c.epsilon), c.accountant
    std = z * c.clip / batch_size
    return ResolvedDP(
        calibration="dpsgd", mechanism="gaussian", batch_size=batch_size, clip=c.clip,
        noise_scale=z * c.clip, noise_std=std, noise_variance=std**2, noise_multiplier=z,
        epsilon=eps, delta=c.delta, accountant=acc,
    )
