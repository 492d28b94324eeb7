"""The audit file: read, check, fill in defaults, expand into cells with stable keys.

An audit file (TOML, ``docs/audit.md``) names datasets, victims, protocols, defense chains,
attacks and seeds; the grid is their product minus explicit exclusions. Everything is
checked before any work, and every error is one line naming the key:

>>> spec = parse_audit({"victims": [{"model": "mlp", "layer": "first"}], "attacks": [{"name": "spe"}],
...                     "defenses": ["none", "dp-paper:eps=10"]}, source="a.toml")
>>> [c.slug for c in expand(spec)]
['mnist-embedded_mlp-first_fedsgd_none_spe_s0', 'mnist-embedded_mlp-first_fedsgd_dp-paper-eps-10_spe_s0']
>>> parse_audit({"victims": [{"model": "mlp"}], "attacks": [{"name": "ig2"}]}, source="a.toml")
Traceback (most recent call last):
...
jaxleak.audit.grid.AuditSpecError: a.toml: attacks[0].name: unknown attack 'ig2'; known: dlf, dlg, fgla, ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

NULL_KINDS = ("shuffle", "noise", "none")
PROTOCOL_KINDS = ("fedsgd", "fedavg")
OPTIMIZERS = ("sgd", "adam")
CRITERIA = ("ssim", "psnr")


class AuditSpecError(ValueError):
    """A malformed audit file (one line: the file, the key, what is wrong and what is allowed)."""


def _fail(source: str, where: str, text: str):
    raise AuditSpecError(f"{source}: {where}: {text}")


# Each table: key -> (type check, default, description of what is allowed). A default of
# _REQUIRED must be given.
_REQUIRED = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _is_str(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _int_at_least(low: int):
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def _one_of(values: Sequence[str]):
    return (lambda v: v in values), "one of " + ", ".join(values)


_STR = (_is_str, "a non-empty string")
_OPT_STR = (lambda v: v is None or _is_str(v), "a non-empty string")
_TABLE = (lambda v: isinstance(v, Mapping), "a table")
_OPT_POS_INT = (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1")

TOP = {
    "name": (_OPT_STR, None),
    "seeds": ((lambda v: isinstance(v, list) and v and all(_is_int(s) and s >= 0 for s in v)
               and len(set(v)) == len(v), "a non-empty list of distinct integers >= 0"), [0]),
    "clients": (_int_at_least(1), 8),
    "null": (_one_of(NULL_KINDS), "shuffle"),
    "defenses": ((lambda v: isinstance(v, list) and v and all(_is_str(d) for d in v)
                  and len(set(v)) == len(v), "a non-empty list of distinct defense chains"), ["none"]),
    "data": (_TABLE, {}),
    "success": (_TABLE, {}),
    "victims": ((lambda v: isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v),
                 "a non-empty array of tables ([[victims]])"), _REQUIRED),
    "protocols": ((lambda v: isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v),
                   "a non-empty array of tables ([[protocols]])"), [{"kind": "fedsgd"}]),
    "attacks": ((lambda v: isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v),
                 "a non-empty array of tables ([[attacks]])"), _REQUIRED),
    "exclude": ((lambda v: isinstance(v, list) and all(isinstance(x, Mapping) for x in v),
                 "an array of tables ([[exclude]])"), []),
}
DATA = {
    "datasets": ((lambda v: isinstance(v, list) and v and all(_is_str(d) for d in v) and len(set(v)) == len(v),
                  "a non-empty list of distinct dataset names or folders"), ["mnist-embedded"]),
    "split": (_STR, "test"),
    "images_per_client": (_int_at_least(1), 1),
    "image_size": (_OPT_POS_INT, None),
    "public_split": (_STR, "train"),
    "public_n": (_int_at_least(1), 256),
}
SUCCESS = {
    "ssim": ((lambda v: _is_number(v) and -1 <= v < 1, "a number in [-1, 1)"), 0.5),
    "psnr": ((lambda v: _is_number(v) and v > 0, "a number of dB > 0"), 20.0),
}
VICTIM = {
    "model": (_STR, _REQUIRED),
    "label": (_OPT_STR, None),
    "layer": (_STR, "head"),
    "init_seed": (_int_at_least(0), 0),
    "checkpoint": (_OPT_STR, None),
    "global_epoch": ((lambda v: v is None or (_is_number(v) and v > 0), "a number > 0"), None),
    "width": (_OPT_POS_INT, None),
    "hidden": ((lambda v: v is None or (isinstance(v, list) and v and all(_is_int(h) and h >= 1 for h in v)),
                "a non-empty list of integers >= 1"), None),
    "precode": (_OPT_POS_INT, None),
}
PROTOCOL = {
    "kind": (_one_of(PROTOCOL_KINDS), _REQUIRED),
    "label": (_OPT_STR, None),
    "local_epochs": (_int_at_least(1), 1),
    "local_batch": (_OPT_POS_INT, None),
    "optimizer": (_one_of(OPTIMIZERS), "adam"),
    "lr": ((lambda v: _is_number(v) and v > 0, "a number > 0"), 0.1),
    "global_epoch": ((lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0"), None),
}
ATTACK = {
    "name": (_STR, _REQUIRED),
    "label": (_OPT_STR, None),
    "config": (_TABLE, {}),
    "options": (_TABLE, {}),
    "artifact": (_OPT_STR, None),
}
EXCLUDE_KEYS = ("dataset", "victim", "protocol", "defense", "attack", "seed")


def _table(raw: Mapping[str, Any], schema: Mapping, source: str, where: str) -> dict[str, Any]:
    """``raw`` checked against ``schema`` with defaults filled in."""
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in schema:
            _fail(source, f"{prefix}{key}", f"unknown key; allowed: {', '.join(schema)}")
    out = {}
    for key, ((check, allowed), default) in schema.items():
        if key not in raw:
            if default is _REQUIRED:
                _fail(source, f"{prefix}{key}", f"required ({allowed})")
            out[key] = json.loads(json.dumps(default))  # a fresh copy
            continue
        if not check(raw[key]):
            _fail(source, f"{prefix}{key}", f"must be {allowed}, got {raw[key]!r}")
        out[key] = raw[key]
    return out


def _protocol_object(p: Mapping[str, Any]):
    from jaxleak.protocols import Protocol

    if p["kind"] == "fedsgd":
        return Protocol(kind="fedsgd", global_epoch=p["global_epoch"])
    return Protocol(kind="fedavg", local_epochs=p["local_epochs"], local_batch=p["local_batch"],
                    optimizer=p["optimizer"], lr=float(p["lr"]), global_epoch=p["global_epoch"])


def _label_protocol(p: Mapping[str, Any]) -> str:
    if p["kind"] == "fedsgd":
        return "fedsgd"
    b = "all" if p["local_batch"] is None else p["local_batch"]
    return f"fedavg-E{p['local_epochs']}-B{b}-{p['optimizer']}{p['lr']:g}"


def _unique_labels(items: list[dict[str, Any]], default, source: str, what: str) -> None:
    for item in items:
        if item["label"] is None:
            item["label"] = default(item)
    labels = [item["label"] for item in items]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            _fail(source, f"{what}[{i}].label", f"{label!r} names two {what}; give each a distinct label")


def parse_audit(raw: Mapping[str, Any], *, source: str = "audit") -> dict[str, Any]:
    """The normalised audit (every default filled in) from a parsed TOML table.

    Raises:
      AuditSpecError: one line naming ``source``, the key, what is wrong and what is allowed.
    """
    from jaxleak.attacks.registry import attacks as registered
    from jaxleak.attacks.registry import context_options
    from jaxleak.data import DATASETS
    from jaxleak.defenses import parse_chain
    from jaxleak.models import VICTIMS

    if not isinstance(raw, Mapping):
        _fail(source, "(top)", "an audit file is a TOML table")
    spec = _table(raw, TOP, source, "")
    spec["data"] = _table(spec["data"], DATA, source, "data")
    spec["success"] = _table(spec["success"], SUCCESS, source, "success")
    if spec["name"] is None:
        spec["name"] = os.path.splitext(os.path.basename(source))[0] or "audit"
    for i, name in enumerate(spec["data"]["datasets"]):
        if name not in DATASETS and not os.path.exists(name):
            _fail(source, f"data.datasets[{i}]", f"unknown dataset {name!r} (not a folder either); known: "
                                                 f"{', '.join(DATASETS)}")
    if spec["data"]["public_split"] == spec["data"]["split"]:
        _fail(source, "data.public_split", f"must differ from data.split ({spec['data']['split']!r}): the "
                                           f"attacker's public pool never holds the attacked images")

    spec["victims"] = [_table(v, VICTIM, source, f"victims[{i}]") for i, v in enumerate(spec["victims"])]
    for i, v in enumerate(spec["victims"]):
        if v["model"] not in VICTIMS:
            _fail(source, f"victims[{i}].model", f"unknown model {v['model']!r}; known: {', '.join(VICTIMS)}")
        if v["checkpoint"] is not None and not os.path.exists(v["checkpoint"]):
            _fail(source, f"victims[{i}].checkpoint", f"{v['checkpoint']} does not exist")
        if v["global_epoch"] is not None:
            if v["checkpoint"] is None:
                _fail(source, f"victims[{i}].global_epoch", "needs checkpoint = a `jaxleak train-fedavg` run folder")
            from jaxleak.protocols.server import round_at_epoch

            try:
                round_at_epoch(v["checkpoint"], v["global_epoch"])
            except (ValueError, OSError) as e:
                _fail(source, f"victims[{i}].global_epoch", str(e).splitlines()[0])
    _unique_labels(spec["victims"], lambda v: v["model"] + ("" if v["layer"] == "head" else f"@{v['layer']}")
                   + ("" if v["global_epoch"] is None else f"-epoch{v['global_epoch']:g}"), source, "victims")

    spec["protocols"] = [_table(p, PROTOCOL, source, f"protocols[{i}]") for i, p in enumerate(spec["protocols"])]
    for i, p in enumerate(spec["protocols"]):
        if p["kind"] == "fedsgd":
            for key in ("local_epochs", "local_batch", "optimizer", "lr"):
                if key in spec_raw_keys(raw, "protocols", i):
                    _fail(source, f"protocols[{i}].{key}", "applies to kind = 'fedavg' only")
    _unique_labels(spec["protocols"], _label_protocol, source, "protocols")

    m = spec["data"]["images_per_client"]
    for i, text in enumerate(spec["defenses"]):
        for p in spec["protocols"]:
            proto = _protocol_object(p)
            batch = proto.batch(m)
            try:
                parse_chain(text, batch_size=batch, steps=proto.total_steps(m), sampling_rate=batch / m)
            except ValueError as e:
                _fail(source, f"defenses[{i}]", str(e).splitlines()[0])

    known = registered()
    spec["attacks"] = [_table(a, ATTACK, source, f"attacks[{i}]") for i, a in enumerate(spec["attacks"])]
    for i, a in enumerate(spec["attacks"]):
        if a["name"] not in known:
            _fail(source, f"attacks[{i}].name", f"unknown attack {a['name']!r}; known: {', '.join(sorted(known))}")
        attack = known[a["name"]]
        try:
            attack.config(a["config"])
        except ValueError as e:
            _fail(source, f"attacks[{i}].config", str(e).splitlines()[0])
        allowed = context_options(attack)
        for key in a["options"]:
            if key not in allowed:
                _fail(source, f"attacks[{i}].options.{key}",
                      f"unknown option of {a['name']}; allowed: {', '.join(allowed) or 'none'}")
        if "artifact" in attack.needs and a["artifact"] is None:
            _fail(source, f"attacks[{i}].artifact", f"attack {a['name']} needs a trained network folder "
                                                    f"(`jaxleak train ...`)")
        if a["artifact"] is not None and not os.path.exists(a["artifact"]):
            _fail(source, f"attacks[{i}].artifact", f"{a['artifact']} does not exist")
    _unique_labels(spec["attacks"], lambda a: a["name"], source, "attacks")

    axes = {"dataset": spec["data"]["datasets"], "victim": [v["label"] for v in spec["victims"]],
            "protocol": [p["label"] for p in spec["protocols"]], "defense": spec["defenses"],
            "attack": [a["label"] for a in spec["attacks"]], "seed": spec["seeds"]}
    for i, rule in enumerate(spec["exclude"]):
        if not rule:
            _fail(source, f"exclude[{i}]", f"empty rule (it would exclude every cell); keys: {', '.join(EXCLUDE_KEYS)}")
        for key, value in rule.items():
            if key not in EXCLUDE_KEYS:
                _fail(source, f"exclude[{i}].{key}", f"unknown key; allowed: {', '.join(EXCLUDE_KEYS)}")
            if value not in axes[key]:
                _fail(source, f"exclude[{i}].{key}", f"{value!r} is not in the grid; the grid has: "
                                                     f"{', '.join(map(str, axes[key]))}")
    if spec["clients"] < 2 and spec["null"] == "shuffle":
        _fail(source, "null", "'shuffle' gives client i the update of client i+1: it needs clients >= 2")
    return spec


def spec_raw_keys(raw: Mapping[str, Any], table: str, i: int) -> set[str]:
    """The keys the file itself gave in ``raw[table][i]`` (not the filled-in defaults)."""
    items = raw.get(table) or []
    return set(items[i]) if i < len(items) else set()


def load_audit(path: str) -> dict[str, Any]:
    """Reads and checks an audit file (TOML); adds ``text`` (the file) to the normalised spec.

    Raises:
      AuditSpecError: unreadable TOML or a bad key (one line).
      FileNotFoundError: no such file.
    """
    import tomllib

    with open(path, "rb") as f:
        data = f.read()
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AuditSpecError(f"{path}: not valid TOML: {str(e).splitlines()[0]}") from None
    spec = parse_audit(raw, source=path)
    spec["text"] = data.decode("utf-8")
    return spec


# --------------------------------------------------------------------------- cells


@dataclasses.dataclass(frozen=True, eq=False)
class Cell:
    """One (dataset, victim, protocol, defense, attack, seed) cell of an audit.

    Attributes:
      index: position in the deterministic run order.
      description: JSON-ready (what ``cell.json`` holds besides the keys).
      key: ``slug`` + ``_`` + 10 hex digits of the description's sha256.
      capture_key: the same for the description without its ``attack``: the shared capture.
      capture_index: position of the capture group in run order (``--shard`` splits by it).
    """

    index: int
    description: dict
    key: str
    capture_key: str
    capture_index: int

    @property
    def slug(self) -> str:
        return self.key.rsplit("_", 1)[0]


def _slugify(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-")[:40] or "x"


def digest(description: Mapping[str, Any]) -> str:
    """First 10 hex digits of the sha256 of ``description`` as canonical JSON."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def capture_description(cell: Mapping[str, Any]) -> dict[str, Any]:
    """What a cell's capture depends on: everything but the attack, plus what the attacks need stored."""
    return {k: v for k, v in cell.items() if k != "attack"}


def _keeps(spec: Mapping[str, Any]) -> dict[str, bool]:
    """Whether captures store every layer / the server weights: yes when any attack needs them."""
    from jaxleak.attacks.registry import get_attack

    needs = {n for a in spec["attacks"] for n in get_attack(a["name"]).needs}
    return {"keep_update": "whole_update" in needs, "keep_params": "weights" in needs}


def _excluded(rules: Sequence[Mapping[str, Any]], labels: Mapping[str, Any]) -> bool:
    return any(all(labels[k] == v for k, v in rule.items()) for rule in rules)


def expand(spec: Mapping[str, Any]) -> list[Cell]:
    """Every cell of the grid in run order: datasets, victims, protocols, defenses, seeds, attacks."""
    keeps = _keeps(spec)
    cells, capture_index = [], {}
    data = {k: v for k, v in spec["data"].items() if k != "datasets"}
    for dataset, victim, protocol, defense, seed, attack in itertools.product(
            spec["data"]["datasets"], spec["victims"], spec["protocols"], spec["defenses"], spec["seeds"],
            spec["attacks"]):
        labels = {"dataset": dataset, "victim": victim["label"], "protocol": protocol["label"],
                  "defense": defense, "attack": attack["label"], "seed": seed}
        if _excluded(spec["exclude"], labels):
            continue
        description = {
            "dataset": {"name": dataset, **data},
            "victim": dict(victim),
            "protocol": dict(protocol),
            "defense": defense,
            "attack": dict(attack),
            "seed": seed,
            "clients": spec["clients"],
            "null": spec["null"],
            "success": dict(spec["success"]),
            "store": keeps,
        }
        cap = capture_description(description)
        cap_key = "_".join(_slugify(x) for x in (dataset, victim["label"], protocol["label"], defense,
                                                  f"s{seed}")) + "_" + digest(cap)
        capture_index.setdefault(cap_key, len(capture_index))
        slug = "_".join(_slugify(x) for x in (dataset, victim["label"], protocol["label"], defense,
                                               attack["label"], f"s{seed}"))
        cells.append(Cell(index=len(cells), description=description, key=f"{slug}_{digest(description)}",
                          capture_key=cap_key, capture_index=capture_index[cap_key]))
    return cells


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``.

    >>> parse_shard("1/4")
    (1, 4)
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"--shard takes i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def shard(cells: Sequence[Cell], i: int, n: int) -> list[Cell]:
    """The cells of shard ``i`` of ``n``: whole capture groups, ``capture_index % n == i``."""
    return [c for c in cells if c.capture_index % n == i]
