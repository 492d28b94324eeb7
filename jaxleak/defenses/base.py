"""The :class:`Defense` tuple every factory returns, and host-side checks of their parameters."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

STAGES = ("step", "update")


class Defense(NamedTuple):
    """A protection of one client's update, optax-style: parameters closed over, ``apply`` pure.

    Attributes:
      name: the chain item name (``"gaussian"``, ``"clip-norm"``, ``"dpsgd"``, ...).
      stage: ``"update"``: ``apply(update_tree, key) -> update_tree`` on the released
        update of ONE client (a params-shaped tree, descent direction ``w0 - w1``);
        ``"step"``: ``apply(per_example_grads, key) -> mean_gradient`` inside every local
        step, from ``[B, ...]`` per-example gradients to the protected mean gradient
        (the shape of one example's gradient). Both are jit/vmap friendly; callers vmap
        over clients.
      apply: the pure function.
      meta: JSON-ready dict holding ``"name"`` and every parameter.
    """

    name: str
    stage: str
    apply: Callable
    meta: dict[str, Any]


def check_number(name: str, value: Any, *, low: float = 0.0, low_open: bool = False,
                 high: float = math.inf, high_open: bool = False) -> float:
    """``value`` as a float in the given interval, or a one-line ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        # ValueError (not TypeError) for every bad parameter: callers catch one type.
        raise ValueError(f"{name} must be a real number, got {value!r}")  # noqa: TRY004
    x = float(value)
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if math.isnan(x) or too_low or too_high or math.isinf(x):
        lo, hi = "(" if low_open else "[", ")" if high_open or math.isinf(high) else "]"
        raise ValueError(
            f"{name} must be a finite number in {lo}{low:g}, {high:g}{hi}, got {value!r}"
        )
    return x


def check_int(name: str, value: Any, *, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``, or a one-line ValueError naming ``name``."""
    integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integer or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)
