"""Tight epsilon of a Gaussian release (host side).

The ``paper`` calibration draws its noise with the classical Gaussian mechanism,
``sigma = s * sqrt(2 ln(1.25 / delta)) / eps``, whose proof holds only for
``eps < 1``. At the epsilons the papers use (1 to 10) the noise buys a different
epsilon; the analytic Gaussian mechanism (Balle & Wang 2018, Theorem 8) gives
the exact one, which reports record beside the nominal value (NOTES section 6).
"""

from __future__ import annotations

import math

__all__ = ["analytic_gaussian_epsilon", "gaussian_delta", "paper_tight_epsilon"]


def gaussian_delta(epsilon: float, mu: float) -> float:
    """The smallest delta for which a Gaussian release is ``(epsilon, delta)``-DP.

    Balle & Wang 2018, Theorem 8, with ``mu = sensitivity / std``:
    ``delta(eps) = Phi(mu/2 - eps/mu) - exp(eps) * Phi(-mu/2 - eps/mu)``.

    Args:
      epsilon: ``eps >= 0``.
      mu: the ratio of the L2 sensitivity to the noise std, ``> 0``.

    Returns:
      ``delta(eps)``, decreasing in ``eps``.

    >>> round(gaussian_delta(0.0, 1.0), 4)  # Phi(1/2) - Phi(-1/2)
    0.3829
    """
    from scipy.special import log_ndtr

    # exp(eps) * Phi(.) in log space: the product stays finite where exp(eps) alone overflows.
    log_first = float(log_ndtr(mu / 2 - epsilon / mu))
    log_second = epsilon + float(log_ndtr(-mu / 2 - epsilon / mu))
    # The second term never exceeds the first; at absurd mu (nominal eps 1e9) the two
    # huge summands of log_second cancel imprecisely, so hold it to that.
    return math.exp(log_first) - math.exp(min(log_second, log_first))


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """The tight epsilon of one Gaussian release with sensitivity/std ratio ``mu``.

    The smallest ``eps >= 0`` with ``gaussian_delta(eps, mu) <= delta``, found by
    bisection (Brent) on the host.

    Args:
      mu: ``sensitivity / std`` (``>= 0``; ``0`` releases nothing, ``inf`` everything).
      delta: target delta in ``(0, 1)``.

    Returns:
      The epsilon (``0.0`` when ``mu`` is so small that ``delta`` holds at ``eps = 0``;
      ``math.inf`` for ``mu = inf``).

    Raises:
      ValueError: on ``mu < 0``, a NaN or ``delta`` outside ``(0, 1)``.

    >>> round(analytic_gaussian_epsilon(1.0, 1e-5), 2)  # = PLD's one-step DP-SGD at z = 1
    4.38
    """
    if not mu >= 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if mu == 0 or gaussian_delta(0.0, mu) <= delta:
        return 0.0
    if math.isinf(mu):
        return math.inf
    from scipy.optimize import brentq

    high = 1.0
    while gaussian_delta(high, mu) > delta:
        high *= 2.0
    return float(brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, high, xtol=1e-12, rtol=1e-12))


def paper_tight_epsilon(epsilon: float, delta: float) -> float:
    """The tight epsilon of the ``paper`` calibration's Gaussian noise at nominal ``epsilon``.

    The classical formula sets ``std = s * sqrt(2 ln(1.25/delta)) / epsilon`` for a
    sensitivity ``s``, so ``mu = s / std = epsilon / sqrt(2 ln(1.25/delta))`` whatever
    ``s`` (learning rate, clip and batch size cancel). This is the guarantee with
    respect to the paper's own sensitivity ``s = 2 lr C / m``; against the clip ``C``
    of the released gradient itself ``mu`` is ``1 / lr`` times larger (NOTES section 6).

    Args:
      epsilon: the nominal epsilon (``> 0``).
      delta: delta in ``(0, 1)``.

    Returns:
      The analytic-Gaussian epsilon at ``delta``: above the nominal one for
      ``epsilon >~ 1`` (the classical formula is unsound there), below it for small ones.

    >>> round(paper_tight_epsilon(10.0, 1e-5), 2)
    10.39
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return analytic_gaussian_epsilon(epsilon / math.sqrt(2.0 * math.log(1.25 / delta)), delta)
