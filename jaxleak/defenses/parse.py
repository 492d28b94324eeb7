"""The text spelling of a defense chain (CLI ``--defense``, audit files): parse and format.

Items are comma-separated and applied left to right, with exactly these names::

    none
    gaussian:STD  laplace:SCALE  clip-norm:C  clip-value:C
    prune-smallest:FRACTION  keep-largest:FRACTION  quantize:BITS   (1 = sign)
    dp-paper:eps=E[,delta=D,lr=LR,clip=C,mechanism=gaussian|laplace,scope=all|layer]
    dpsgd:eps=E|z=Z[,delta=D,clip=C,q=Q,accountant=rdp|pld]

A DP item's options are separated by the same comma as items: a piece of the form
``key=value`` belongs to the DP item before it, so ``dp-paper:eps=10,delta=1e-5,clip-norm:1``
is a ``dp-paper`` item with two options followed by a ``clip-norm`` item.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxleak.defenses.base import Defense
from jaxleak.defenses.chain import Chain, chain
from jaxleak.defenses.clip import clip_norm, clip_value
from jaxleak.defenses.dp import dp_paper, dpsgd
from jaxleak.defenses.noise import gaussian, laplace
from jaxleak.defenses.quantize import quantize
from jaxleak.defenses.sparsify import keep_largest, prune_smallest

__all__ = ["DefenseSpecError", "format_chain", "parse_chain"]


class DefenseSpecError(ValueError):
    """A defense chain's text is malformed (the message is one line naming the bad item)."""


# name -> (factory, parameter name in meta, parser of the value, placeholder in the help).
_SIMPLE: dict[str, tuple[Callable[..., Defense], str, type, str]] = {
    "gaussian": (gaussian, "std", float, "STD"),
    "laplace": (laplace, "scale", float, "SCALE"),
    "clip-norm": (clip_norm, "c", float, "C"),
    "clip-value": (clip_value, "c", float, "C"),
    "prune-smallest": (prune_smallest, "fraction", float, "FRACTION"),
    "keep-largest": (keep_largest, "fraction", float, "FRACTION"),
    "quantize": (quantize, "bits", int, "BITS"),
}
# DP item keys -> (parser, factory keyword).
_DP_KEYS: dict[str, dict[str, tuple[type, str]]] = {
    "dp-paper": {"eps": (float, "epsilon"), "delta": (float, "delta"), "lr": (float, "lr"),
                 "clip": (float, "clip"), "mechanism": (str, "mechanism"), "scope": (str, "scope")},
    "dpsgd": {"eps": (float, "epsilon"), "z": (float, "noise_multiplier"),
              "delta": (float, "delta"), "clip": (float, "clip"), "q": (float, "sampling_rate"),
              "accountant": (str, "accountant")},
}
ITEMS = ", ".join(
    ["none"]
    + [f"{name}:{spec[3]}" for name, spec in _SIMPLE.items()]
    + ["dp-paper:eps=E[,delta=D,lr=LR,clip=C,mechanism=M,scope=S]",
       "dpsgd:eps=E|z=Z[,delta=D,clip=C,q=Q,accountant=A]"]
)


def _error(item: str, why: str) -> DefenseSpecError:
    return DefenseSpecError(f"bad defense item {item!r}: {why} (items: {ITEMS})")


def _value(item: str, text: str, kind: type) -> Any:
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise _error(item, f"{text!r} is not {what}") from None


def _split(text: str) -> list[tuple[str, str | None]]:
    """``[(item text, name)]``: the comma pieces regrouped into items."""
    items: list[list[Any]] = []
    for raw in text.split(","):
        piece = raw.strip()
        if not piece:
            raise _error(text, "empty item (a stray comma?)")
        if ":" in piece:
            items.append([piece, piece.partition(":")[0].strip()])
        elif "=" in piece:
            if not items or items[-1][1] not in _DP_KEYS:
                after = f"follows {items[-1][0]!r}, which" if items else "starts the chain but"
                raise _error(piece, f"a key=value option {after} is no DP item")
            items[-1][0] += "," + piece
        else:
            items.append([piece, piece])
    return [(item, name) for item, name in items]


def _dp_options(item: str, name: str) -> dict[str, Any]:
    allowed = _DP_KEYS[name]
    if ":" not in item:
        raise _error(item, f"{name} needs options: {name}:key=value,... with keys "
                           f"{', '.join(allowed)}")
    options: dict[str, Any] = {}
    for piece in item.partition(":")[2].split(","):
        key, eq, text = (s.strip() for s in piece.partition("="))
        if not eq or not key or not text:
            raise _error(item, f"{piece.strip()!r} is not key=value; {name} keys are "
                               f"{', '.join(allowed)}")
        if key not in allowed:
            raise _error(item, f"unknown key {key!r}; {name} keys are {', '.join(allowed)}")
        kind, keyword = allowed[key]
        if keyword in options:
            raise _error(item, f"key {key!r} given twice")
        options[keyword] = _value(item, text, kind)
    return options


def _item(item: str, name: str, *, batch_size: int, steps: int, sampling_rate: float,
          layer_path: tuple[str, ...]) -> Defense:
    if name in _SIMPLE:
        factory, _, kind, placeholder = _SIMPLE[name]
        if ":" not in item:
            raise _error(item, f"{name} needs a value: {name}:{placeholder}")
        return factory(_value(item, item.partition(":")[2].strip(), kind))
    if name == "dp-paper":
        options = _dp_options(item, name)
        if "epsilon" not in options:
            raise _error(item, "dp-paper needs eps=E")
        return dp_paper(**options, batch_size=batch_size, layer_path=layer_path)
    if name == "dpsgd":
        options = _dp_options(item, name)
        if ("epsilon" in options) == ("noise_multiplier" in options):
            raise _error(item, "dpsgd needs exactly one of eps=E and z=Z")
        options.setdefault("sampling_rate", sampling_rate)
        return dpsgd(**options, steps=steps, batch_size=batch_size)
    raise _error(item, f"unknown item name {name!r}")


def parse_chain(
    text: str,
    *,
    batch_size: int = 1,
    steps: int = 1,
    sampling_rate: float = 1.0,
    layer_path: tuple[str, ...] = ("head",),
) -> Chain:
    """Reads a chain from its text spelling (module docstring: the grammar).

    Args:
      text: e.g. ``"clip-norm:1.0,gaussian:0.001"`` or ``"dp-paper:eps=10,delta=1e-5"``.
      batch_size: examples per local step (the DP items' ``batch_size``).
      steps: local steps the ``dpsgd`` accountant composes (FedAvg: E x ceil(M/B)).
      sampling_rate: the ``dpsgd`` accountant's ``q`` unless the item gives ``q=``.
      layer_path: the protected layer of ``dp-paper`` with ``scope=layer``.

    Returns:
      The :class:`~jaxleak.defenses.chain.Chain` (``none``: the empty chain).

    Raises:
      DefenseSpecError: one line naming the bad item and what is allowed.

    >>> c = parse_chain("dp-paper:eps=10,delta=1e-5,clip-norm:1")
    >>> [m["name"] for m in c.meta], round(c.dp["epsilon_tight"], 2)
    (['dp-paper', 'clip-norm'], 10.39)
    """
    if not isinstance(text, str) or not text.strip():
        raise _error(str(text), "empty defense chain; say 'none' for no defense")
    items = _split(text)
    if any(name == "none" for _, name in items):
        if len(items) > 1 or items[0][0] != "none":
            raise _error(text, "'none' takes no value and stands alone")
        return chain()
    defenses = []
    for item, name in items:
        try:
            defenses.append(_item(item, name, batch_size=batch_size, steps=steps,
                                  sampling_rate=sampling_rate, layer_path=layer_path))
        except DefenseSpecError:
            raise
        except (ValueError, TypeError) as e:
            raise _error(item, str(e)) from None
    try:
        return chain(*defenses)
    except ValueError as e:
        raise _error(text, str(e)) from None


def _num(x: float) -> str:
    # Shortest text that reads back to the same float; "1" rather than "1.0".
    return repr(float(x)).removesuffix(".0")


def _format(meta: dict[str, Any]) -> str:
    name = meta["name"]
    if name in _SIMPLE:
        value = meta[_SIMPLE[name][1]]
        return f"{name}:{value if name == 'quantize' else _num(value)}"
    eps = "inf" if meta["epsilon"] is None else _num(meta["epsilon"])
    if name == "dp-paper":
        text = f"dp-paper:eps={eps},delta={_num(meta['delta'])},lr={_num(meta['lr'])}," \
               f"clip={_num(meta['clip'])}"
        if meta["mechanism"] != "gaussian":
            text += f",mechanism={meta['mechanism']}"
        return text + (",scope=layer" if meta["scope"] == "layer" else "")
    if name == "dpsgd":
        given = f"eps={eps}" if meta["calibrated_from"] == "epsilon" else \
            f"z={_num(meta['noise_multiplier'])}"
        text = f"dpsgd:{given},delta={_num(meta['delta'])},clip={_num(meta['clip'])}," \
               f"q={_num(meta['sampling_rate'])}"
        return text + ("" if meta["accountant"] == "rdp" else f",accountant={meta['accountant']}")
    raise ValueError(f"defense {name!r} has no chain spelling")


def format_chain(c: Chain) -> str:
    """The canonical text spelling of a chain (``parse_chain`` reads it back).

    DP items are written with all their keys; ``steps``, ``batch_size`` and ``layer_path``
    are not part of the spelling (they come from the protocol and the victim).

    Args:
      c: a chain of the named defenses.

    Returns:
      e.g. ``"clip-norm:1,gaussian:0.001"``; ``"none"`` for the empty chain.

    Raises:
      ValueError: on a defense without a chain spelling (one built by hand).

    >>> format_chain(parse_chain("dpsgd:z=1.1, quantize:8"))
    'dpsgd:z=1.1,delta=1e-05,clip=1,q=1,quantize:8'
    """
    if not c.defenses:
        return "none"
    return ",".join(_format(d.meta) for d in c.defenses)

