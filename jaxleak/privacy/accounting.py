"""Privacy accounting on the host (dp-accounting), used to calibrate DP-SGD.

The accountant is named in every result: ``"rdp"`` (Renyi DP, Mironov 2017,
``dp_accounting.rdp.RdpAccountant``) is the default; ``"pld"`` (privacy loss
distributions, ``dp_accounting.pld.PLDAccountant``) is tighter.
"""

from __future__ import annotations

import functools
import math

ACCOUNTANTS = ("rdp", "pld")


def _event(noise_multiplier: float, sampling_rate: float, steps: int):
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        gaussian = dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(gaussian, steps)


def _accountant(name: str):
    import dp_accounting

    if name == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    if name == "pld":
        # A coarser loss grid than the default keeps tiny noise multipliers (huge epsilons,
        # visited while bracketing) from allocating gigabytes.
        return dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    raise ValueError(f"unknown accountant {name!r}; choose one of {ACCOUNTANTS}")


def _check(epsilon: float, delta: float, sampling_rate: float, steps: int) -> None:
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def dpsgd_epsilon(
    noise_multiplier: float,
    delta: float,
    *,
    sampling_rate: float = 1.0,
    steps: int = 1,
    accountant: str = "rdp",
) -> float:
    """Epsilon spent by ``steps`` DP-SGD steps with the given noise multiplier.

    Args:
      noise_multiplier: ``z > 0``, the noise std on the clipped sum in units of ``C``.
      delta: delta in (0, 1).
      sampling_rate: Poisson sampling rate ``q`` of each step (1.0 = full batch).
      steps: number of composed steps.
      accountant: ``"rdp"`` or ``"pld"`` (tighter).

    Returns:
      The epsilon at ``delta`` reported by the accountant.

    One full-batch step at ``z = 1``: RDP says 4.7, PLD 4.4 (the exact value for one
    Gaussian release, :func:`~jaxleak.privacy.analytic_gaussian_epsilon` ``(1, delta)``).

    >>> round(dpsgd_epsilon(1.0, 1e-5), 1)
    4.7
    >>> round(dpsgd_epsilon(1.0, 1e-5, accountant="pld"), 1)
    4.4
    """
    acc = _accountant(accountant)
    acc.compose(_event(noise_multiplier, sampling_rate, steps))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def dpsgd_noise_multiplier(
    epsilon: float,
    delta: float,
    *,
    sampling_rate: float = 1.0,
    steps: int = 1,
    accountant: str = "rdp",
) -> float:
    """Smallest noise multiplier ``z`` that keeps DP-SGD within ``(epsilon, delta)``.

    Args:
      epsilon: target epsilon (> 0).
      delta: target delta in (0, 1).
      sampling_rate: Poisson sampling rate ``q`` of each step (1.0 = full batch).
      steps: number of composed steps (1 = a single captured update).
      accountant: ``"rdp"`` or ``"pld"``.

    Returns:
      ``z`` such that Gaussian noise of std ``z * C`` on the clipped sum meets the target.

    Raises:
      ValueError: on out-of-range arguments or an unknown accountant.

    >>> z = dpsgd_noise_multiplier(8.0, 1e-5)
    >>> 0.6 < z < 0.7
    True
    """
    _check(epsilon, delta, sampling_rate, steps)
    import dp_accounting

    lower = 0.02 if accountant == "rdp" else 0.1
    try:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: _accountant(accountant),
                lambda z: _event(z, sampling_rate, steps),
                epsilon,
                delta,
                bracket_interval=dp_accounting.LowerEndpointAndGuess(lower, 1.0),
                tol=1e-4,
            )
        )
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError as e:
        raise ValueError(
            f"no noise multiplier >= {lower} reaches epsilon={epsilon} at delta={delta} "
            f"(q={sampling_rate}, steps={steps}, accountant={accountant}); epsilon is too large "
            "to calibrate: pass --noise-multiplier directly"
        ) from e
