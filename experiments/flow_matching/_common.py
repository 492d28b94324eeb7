"""Helpers shared by the flow-matching experiment scripts (issue 13): data, captures, cells, results.

Every script of this folder builds FedAvg clients the same way (:func:`fedavg_setting`,
:func:`client_capture`), runs each attack and its ``shuffle`` null control on the same capture
(:func:`run_cell`), and writes one results JSON carrying the command, the date and the machine
(:func:`provenance`, :func:`write_results`). Nothing here is library code: the library never
imports it (STYLE.md 7).

The FedAvg client of the FM paper "performs local training (5 batches)": here a client holds
``M = 5 B`` images and runs one local epoch of 5 steps of ``B`` images (SME's public code: 50
images, batches of 10, 5 steps per epoch). ``--reading repeat`` is the other reading: ``M = B``
images and 5 local epochs of one full batch each (5 steps on the same batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxleak._provenance import cpu_model, machine  # noqa: F401 (cpu_model: speed.py prints it)

HERE = Path(__file__).resolve().parent
DEFAULT_PRIOR = "tinyimagenet32-small"
"""The shipped flow prior (``jaxleak.priors.load``); ``--prior DIR`` or ``--prior random`` replace it."""

METRICS = ("psnr", "ssim", "lpips_vgg", "lpips_alex", "fmse", "mse", "tv")
"""Image metrics of the tables, in the paper's column order (LPIPS VGG only where its weights exist)."""

PAPER_BUDGETS: dict[str, str] = {
    # the FM paper, section 4, "SOTA Attack Implementations": "Typical iteration counts"
    "gradinversion": "500 iterations x 5 seeds",
    "flow-latent": "500 (GGL)",
    "dlf": "10,000",
    "sme": "30,000",
    "fm": "20,000-30,000",
}
"""The paper's iteration counts per attack, printed beside ours."""

CPU_BUDGETS: dict[str, int] = {"gradinversion": 500, "flow-latent": 500, "dlf": 400, "sme": 2000, "fm": 2000}
"""Our default budgets on the 2-core CPU (``--budget ATTACK=N`` overrides, ``--paper-budgets`` uses the
paper's: 500, 500, 10,000, 30,000, 25,000). GradInversion and flow-latent run the paper's own counts;
DLF runs its public code's 400; SME / FM 2,000 instead of 20k-30k (each FM iteration costs a UNet
forward and backward per image)."""

PAPER_BUDGET_ITERATIONS = {"gradinversion": 500, "flow-latent": 500, "dlf": 10_000, "sme": 30_000, "fm": 25_000}

QUICK_BUDGETS: dict[str, int] = {"gradinversion": 3, "flow-latent": 3, "dlf": 3, "sme": 3, "fm": 3}
"""``--quick``: a few iterations, only to check the pipeline end to end."""

PRIOR_ATTACKS = ("fm", "flow-latent")

QUICK_ROOT = Path("/tmp/jaxleak-flow-matching-quick")
"""Where ``--quick`` runs write by default, so that a smoke run never overwrites results."""


# --------------------------------------------------------------------------- provenance and output


def provenance(script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """The command, the UTC date and the machine (CPU, core count, JAX backend and versions)."""
    import jax

    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "command": " ".join(["python", f"experiments/flow_matching/{script}", *args]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__},
    }


def _strict(value):
    """JSON-ready with NaN / inf as ``None`` (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _strict(value.tolist())
    return value


def write_results(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Writes ``payload`` as strict JSON (after every cell, so an interrupted run keeps what it did)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_strict(payload), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def fmt(value, digits: int = 3) -> str:
    """A table cell: ``-`` for a missing value, else ``digits`` decimals (or 3 significant for small / large)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int | np.integer):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-2):
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table of ``rows`` (cells formatted with :func:`fmt`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- arguments


def add_common_args(parser: argparse.ArgumentParser, *, seeds: Sequence[int] = (0, 1, 2)) -> None:
    """Options every table script takes (victim, client protocol, prior, budgets, driver, output)."""
    g = parser.add_argument_group("common")
    g.add_argument("--quick", action="store_true",
                   help="smoke run: 16x16 images, width-8 victim, 2 clients, 3 iterations, one seed")
    g.add_argument("--out", default=None, help="results JSON (default: results/<script>.json here)")
    g.add_argument("--runs", default=None, help="per-cell attack outputs (default: runs/<script>/ here)")
    g.add_argument("--seeds", type=int, nargs="+", default=list(seeds),
                   help="seed s draws the clients' images (data seed s), the capture and the attack's start")
    g.add_argument("--clients", type=int, default=4,
                   help="clients (targets) per cell and seed; the shuffle null control needs >= 2")
    g.add_argument("--image-size", type=int, default=None, help="resize the images (default: the dataset's)")
    g.add_argument("--model", default="convnet-sme")
    g.add_argument("--width", type=int, default=None, help="victim width (convnet-sme: 64)")
    g.add_argument("--victim-checkpoint", default=None,
                   help="server weights w0 from `jaxleak train-victim` (default: untrained, init seed 0, "
                        "i.e. global epoch 0)")
    g.add_argument("--local-batches", type=int, default=5, help="local steps per client (the paper: 5)")
    g.add_argument("--reading", choices=("distinct", "repeat"), default="distinct",
                   help="'distinct': M = 5B images, one epoch of 5 batches (SME's code); 'repeat': M = B "
                        "images, 5 local epochs of that batch")
    g.add_argument("--prior", default=DEFAULT_PRIOR,
                   help="flow prior of fm / flow-latent: a shipped name or a folder of `jaxleak train "
                        "flow-prior`; 'random' = an untrained tiny UNet (SMOKE RUNS ONLY)")
    g.add_argument("--budget", nargs="*", default=[], metavar="ATTACK=ITERATIONS",
                   help="iteration budgets replacing the defaults (CPU_BUDGETS)")
    g.add_argument("--paper-budgets", action="store_true", help="the paper's iteration counts (GPU)")
    g.add_argument("--labels", choices=("default", "known", "infer"), default="default",
                   help="labels of every attack (default: each attack's own; sme/fm/dlf/flow-latent: known, "
                        "gradinversion: infer)")
    g.add_argument("--fm-from-sweep", default=None, metavar="JSON",
                   help="FM's lambda_fm / tau / fm_scale / tv from sweep_fm.py's chosen setting (default: the "
                        "library's FMConfig defaults)")
    g.add_argument("--fm", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="FM config fields (lambda_fm, tau_start, tau_end, fm_scale, tv, space), after --fm-from-sweep")
    g.add_argument("--no-null", action="store_true", help="skip the shuffle null controls (not for tables)")
    g.add_argument("--chunk", type=int, default=None, help="driver: iterations per compiled call")
    g.add_argument("--target-batch", type=int, default=None, help="driver: targets per compiled call")
    g.add_argument("--batching", choices=("vmap", "map"), default=None, help="driver: vmap or map")
    g.add_argument("--force", action="store_true", help="re-run cells whose metrics.json exists")


def apply_quick(args: argparse.Namespace) -> None:
    """``--quick``: the tiniest settings that still run every step (16x16, width 8, 2 clients, 1 seed).

    Two clients, not one: the ``shuffle`` null control gives client ``i`` the update of client
    ``i + 1``, which is its own update when there is only one client.
    """
    if args.quick:
        args.image_size = args.image_size or 16
        args.width = args.width or 8
        args.clients = 2
        args.seeds = args.seeds[:1]
    if args.clients < 2 and not args.no_null:
        raise SystemExit("the shuffle null control needs --clients >= 2 (with one client it is the real update)")


def parse_common(parser: argparse.ArgumentParser, argv, *, server: bool = False) -> argparse.Namespace:
    """Adds the common options (``server``: and the server training's), parses ``argv``, applies ``--quick``.

    The options are added after the script's own, which keeps ``--help`` in the order it always had;
    a script's own ``--quick`` settings come after this.
    """
    add_common_args(parser)
    if server:
        add_server_args(parser)
    args = parser.parse_args(argv)
    apply_quick(args)
    if server:
        apply_quick_server(args)
    return args


def add_attacked_client_args(parser: argparse.ArgumentParser) -> None:
    """``--batch`` and ``--optimizer`` of the attacked clients (Tables 1, 3, Figure 4)."""
    parser.add_argument("--batch", type=int, default=1, help="client batch size B of the attacked clients")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                        help="local optimizer of the attacked clients (default: SME's code's SGD 0.004)")


def budgets(args: argparse.Namespace) -> dict[str, int]:
    """Iterations per attack: ``--quick`` / ``--paper-budgets`` / CPU defaults, then ``--budget``."""
    base = dict(QUICK_BUDGETS if args.quick else PAPER_BUDGET_ITERATIONS if args.paper_budgets else CPU_BUDGETS)
    for item in args.budget:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--budget takes ATTACK=ITERATIONS, got {item!r}")
        base[name] = int(value)
    return base


def fm_fields(args: argparse.Namespace) -> dict[str, Any]:
    """FM's config fields from ``--fm-from-sweep`` (the sweep's ``chosen.config``) then ``--fm``."""
    fields: dict[str, Any] = {}
    if args.fm_from_sweep:
        fields.update(json.loads(Path(args.fm_from_sweep).read_text())["chosen"]["config"])
    for item in args.fm:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--fm takes FIELD=VALUE, got {item!r}")
        fields[name] = value if name in ("fm_scale", "space") else float(value)
    return fields


def driver_options(args: argparse.Namespace, iterations: int) -> dict[str, Any]:
    """The optimisation driver's options (``RunOptions`` fields) from the command line."""
    options = {"chunk": min(args.chunk or 100, iterations)}
    if args.target_batch:
        options["target_batch"] = args.target_batch
    if args.batching:
        options["batching"] = args.batching
    return options


def default_paths(args: argparse.Namespace, name: str, *, runs_name: str | None = None) -> tuple[Path, Path]:
    """``(out JSON, runs folder)``; ``--quick`` defaults go to /tmp so smoke runs never overwrite results.

    ``runs_name`` (default ``name``) lets scripts share one runs folder, hence cells and server runs.
    """
    runs_name = runs_name or name
    if args.quick:
        root = QUICK_ROOT
        return Path(args.out or root / f"{name}.json"), Path(args.runs or root / "runs" / runs_name)
    return Path(args.out or HERE / "results" / f"{name}.json"), Path(args.runs or HERE / "runs" / runs_name)


# --------------------------------------------------------------------------- prior


def tiny_unet_config(image_size: int, channels: int):
    """The tiny UNet of smoke runs (width 8, one level, one block, no attention) at ``image_size``."""
    from jaxleak.priors import UNetConfig

    return UNetConfig(image_size=image_size, channels=channels, base_width=8, channel_mult=(1,),
                      num_res_blocks=1, attention_resolutions=(), groups=4)


def random_prior(path: str | os.PathLike, image_shape: Sequence[int], *, preset: str | None = None,
                 seed: int = 0) -> str:
    """Writes an UNTRAINED flow prior folder (random weights) that ``jaxleak.priors.load`` reads.

    For smoke runs and timing only: its velocity field carries no image statistics. ``preset``
    (``"small"``, ``"paper"``) keeps that preset's architecture (32x32x3 only); ``None`` a tiny UNet
    at ``image_shape``. Weights: the initialiser's plus N(0, 0.05^2), so the zero-initialised output
    layer does not make ``v`` vanish.
    """
    import jax

    from jaxleak import artifacts
    from jaxleak.priors import KIND, TrainConfig, init_params
    from jaxleak.priors import preset as unet_preset

    h, w, c = (int(v) for v in image_shape)
    if preset is not None:
        cfg = unet_preset(preset)
        if tuple(cfg.image_shape) != (h, w, c):
            raise SystemExit(f"preset {preset} is for {cfg.image_shape} images, not {(h, w, c)}")
    else:
        cfg = tiny_unet_config(h, c)
    params = init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [np.asarray(a + 0.05 * jax.random.normal(k, a.shape)) for a, k in zip(leaves, keys, strict=True)])
    train = {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "steps"}
    config = {"unet": cfg.to_dict(), "train": train, "data": {"count": 0, "image_shape": [h, w, c]}}
    return str(artifacts.save_artifact(path, kind=KIND, config=config, tree={"params": params},
                                       extra={"steps": 1, "note": "RANDOM untrained prior (smoke runs)"},
                                       force=True))  # same seed, same weights: replacing is harmless


class Prior(NamedTuple):
    """A resolved flow prior."""

    name: str
    """The attacks' ``prior`` field: a shipped name or a folder."""
    info: dict[str, Any]
    """For the results: source, FD-AlexNet, whether it is a random (smoke) prior."""


def resolve_prior(name: str, image_shape: Sequence[int], runs: Path) -> Prior:
    """``(name or folder for the attacks, info for the results)``; ``random`` writes one under ``runs``.

    The info holds the prior's source and its FD-AlexNet (the issue puts it beside every FM number;
    ``None`` when the prior carries no quality measurement).
    """
    from jaxleak import priors

    if name == "random":
        shape = "x".join(map(str, image_shape))
        name = random_prior(runs / f"random-prior-{shape}", image_shape)
        info = {"source": name, "fd_alexnet": None, "random": True,
                "warning": "RANDOM untrained prior: smoke run only, FM / flow-latent numbers mean nothing"}
        return Prior(name, info)
    try:
        prior = priors.load(name)
    except Exception as error:  # noqa: BLE001 - any load failure ends the run with the same hint
        raise SystemExit(f"flow prior {name!r} could not be loaded ({str(error).splitlines()[0]}); "
                         f"pass --prior DIR (a `jaxleak train flow-prior` folder) or --prior random for a "
                         f"smoke run") from None
    quality = prior.extra.get("quality") or {}
    return Prior(name, {"source": prior.extra.get("source", name), "fd_alexnet": quality.get("fd_alexnet"),
                        "image_shape": list(prior.config.image_shape), "random": False})


# --------------------------------------------------------------------------- clients and captures


def fedavg_setting(*, batch: int, local_batches: int, optimizer: str, lr: float, reading: str):
    """``(Protocol, M)``: the FM paper's FedAvg client (``local_batches`` steps of ``batch`` images).

    >>> p, m = fedavg_setting(batch=4, local_batches=5, optimizer="adam", lr=0.1, reading="distinct")
    >>> m, p.schedule_shape(m)
    (20, (1, 5, 4))
    """
    from jaxleak.protocols import Protocol

    if reading == "distinct":
        return Protocol(kind="fedavg", local_epochs=1, local_batch=batch, optimizer=optimizer, lr=lr), \
            batch * local_batches
    return Protocol(kind="fedavg", local_epochs=local_batches, local_batch=batch, optimizer=optimizer,
                    lr=lr), batch


OPTIMIZERS = {"adam": ("adam", 0.1), "sgd": ("sgd", 0.004)}
"""Local optimizers: the FM paper's Adam 0.1 and SME's / DLF's public code's SGD 0.004."""


def attacked_clients(args: argparse.Namespace):
    """``(protocol, M, local lr)`` of the attacked clients of ``--batch`` / ``--optimizer`` / ``--reading``."""
    optimizer, lr = OPTIMIZERS[args.optimizer]
    protocol, samples = fedavg_setting(batch=args.batch, local_batches=args.local_batches, optimizer=optimizer,
                                       lr=lr, reading=args.reading)
    return protocol, samples, lr


def load_clients(dataset: str, split: str, *, clients: int, samples: int, seed: int, image_size: int | None):
    """``clients * samples`` images of ``dataset``'s ``split`` (data seed ``seed``)."""
    from jaxleak import audit

    return audit.load_data(dataset, split=split, n=clients * samples, seed=seed, image_size=image_size)


def seed_clients(args: argparse.Namespace, runs: Path, prior: Prior | None, *, samples: int, seed: int):
    """``(data, prior)``: seed ``seed``'s clients and the flow prior of ``--prior``.

    ``data`` holds ``--clients`` x ``samples`` images of ``--dataset``'s ``--split``. The prior is
    resolved at the first call (``prior`` ``None``), at those images' shape; later calls pass it back
    and get it unchanged, so a random prior is written once and a shipped one loaded once.
    """
    data = load_clients(args.dataset, args.split, clients=args.clients, samples=samples, seed=seed,
                        image_size=args.image_size)
    return data, prior or resolve_prior(args.prior, data.images.shape[1:], runs)


def client_capture(data, *, model: str, width: int | None, protocol, samples: int, seed: int,
                   defense: str = "none", precode: int | None = None, checkpoint: str | None = None,
                   global_epoch: float | None = None):
    """The capture of ``data``'s clients (whole update and server weights kept) under ``defense``.

    ``defense`` is the ``--defense`` spelling (:func:`jaxleak.defenses.parse_chain`), parsed with
    the client's local batch and its E x S steps, as ``jaxleak capture`` does. With a ``jaxleak
    train-fedavg`` run as ``checkpoint``, ``global_epoch`` picks its kept round that reached it.
    """
    from jaxleak import audit
    from jaxleak.defenses import parse_chain

    victim, variables, meta = audit.build_victim(model, dataset=data, width=width, precode=precode,
                                                 checkpoint=checkpoint, global_epoch=global_epoch)
    e, s, b = protocol.schedule_shape(samples)
    chain = parse_chain(defense, batch_size=b, steps=e * s, sampling_rate=b / samples)
    return audit.capture(victim, variables, data, defenses=chain, protocol=protocol, samples=samples,
                         seed=seed, keep_update=True, keep_params=True, extra_meta=meta)


# --------------------------------------------------------------------------- attacks


def attack_overrides(attack: str, iterations: int, *, labels: str, prior: str | None,
                     extra: Mapping[str, Any] | None = None, fm: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Config overrides of one attack: budget, labels mode, prior where it takes one, FM's fields."""
    overrides: dict[str, Any] = {"iterations": int(iterations)}
    if labels != "default":
        overrides["labels"] = labels
    if attack in PRIOR_ATTACKS and prior is not None:
        overrides["prior"] = prior
    if attack == "fm":
        overrides.update(fm or {})
    overrides.update(extra or {})
    return overrides


def _row(summary: Mapping[str, Any]) -> dict[str, Any]:
    means = summary.get("means") or {}
    cost = summary.get("cost") or {}
    timing = summary.get("timing") or {}
    return {
        **{k: means.get(k) for k in (*METRICS, "label_correct", "matching_loss")},
        "attack_seconds": cost.get("attack_seconds"),
        "compile_seconds": timing.get("compile_seconds"),
        "seconds_per_iteration": timing.get("seconds_per_iteration"),
        "flops_per_iteration": cost.get("flops_per_iteration"),
        "flops_lower_bound": cost.get("flops_lower_bound"),
        "peak_device_bytes": cost.get("peak_device_bytes"),
        "peak_rss_bytes": cost.get("peak_rss_bytes"),
        "out": summary.get("out"),
    }


def _summary_from_disk(out: Path) -> dict[str, Any]:
    meta = json.loads((out / "metrics.json").read_text())
    means = {k: v.get("mean") for k, v in meta["metrics"].items() if isinstance(v, dict)}
    return {"means": means, "cost": meta.get("cost"), "timing": meta.get("timing"), "out": str(out)}


def _finished_with(path: Path, attack: str, overrides: Mapping[str, Any]) -> bool:
    """Whether ``path`` (a ``metrics.json``) exists and its run used the whole config ``attack`` would use now.

    The whole config, not only ``overrides``: a changed library default (e.g. SME's image space)
    must not let an old cell pass for a new one. A field the old run's config lacks (added to the
    library since) matches when it is wanted at its default, the behaviour from before it existed.
    """
    import dataclasses

    from jaxleak.attacks.registry import get_attack

    if not path.exists():
        return False
    cfg = get_attack(attack).config(dict(overrides))
    want = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(cfg)
                                      if f.default is not dataclasses.MISSING}, default=str))
    config = json.loads(path.read_text()).get("config") or {}
    same = lambda a, b: a == b or (isinstance(a, int | float) and isinstance(b, int | float)
                                   and math.isclose(a, b, rel_tol=1e-9))
    return all(same(config[k], v) if k in config else (k in defaults and same(defaults[k], v))
               for k, v in want.items() if k != "prior")


def run_cell(attack: str, cap, out: Path, *, overrides: Mapping[str, Any], options: Mapping[str, Any],
             seed: int, null: bool = True, force: bool = False) -> dict[str, Any]:
    """Runs ``attack`` on ``cap`` and (``null``) on its ``shuffle`` null control; one row each.

    A cell whose ``metrics.json`` exists and was run with the same ``overrides`` is read back
    instead of re-run (resumable), unless ``force``.
    """
    from jaxleak import audit

    rows = {}
    for kind in (None, "shuffle") if null else (None,):
        path = out / (attack + ("-null" if kind else ""))
        if force or not _finished_with(path / "metrics.json", attack, overrides):
            summary = audit.run_attack(attack, cap, out_dir=str(path), overrides=dict(overrides),
                                       options=dict(options), null=kind, seed=seed, force=True)
        else:
            summary = _summary_from_disk(path)
        rows["null" if kind else "real"] = _row(summary)
    return rows


def aggregate(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of each numeric entry of the per-seed rows (``None`` entries skipped);
    a boolean flag (``flops_lower_bound``) is true when it is true for any seed.

    >>> agg = aggregate([{"psnr": 10.0, "flops_lower_bound": True}, {"psnr": 12.0, "flops_lower_bound": False}])
    >>> agg["psnr"], agg["psnr_std"], agg["flops_lower_bound"], agg["seeds"]
    (11.0, 1.0, True, 2)
    """
    keys = [k for k in per_seed[0] if k != "out"] if per_seed else []
    out: dict[str, Any] = {}
    for k in keys:
        flags = [r.get(k) for r in per_seed if isinstance(r.get(k), bool)]
        if flags:
            out[k] = any(flags)
            continue
        values = [r.get(k) for r in per_seed if isinstance(r.get(k), int | float)]
        values = [v for v in values if math.isfinite(v)]
        out[k] = float(np.mean(values)) if values else None
        out[k + "_std"] = float(np.std(values)) if len(values) > 1 else None
    out["seeds"] = len(per_seed)
    return out


def seed_summary(rows: Mapping[str, list]) -> dict[str, Any]:
    """A cell over seeds: means (and stds) of its real and null rows (``None``: no nulls), and the rows."""
    return {"real": aggregate(rows["real"]), "null": aggregate(rows["null"]) if rows["null"] else None,
            "per_seed": rows}


def gb(value) -> float | None:
    """Bytes to GiB (``None`` stays)."""
    return None if value is None else value / 2**30


# --------------------------------------------------------------------------- server training (Tables 1, 3, Fig. 4)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The FedAvg training that produces the server weights attacked at a global epoch.

    Defaults (the CPU setting; the paper trains on all of CIFAR-10 with an unstated population):
    200 clients x 50 CIFAR-10 train images (10,000 images), 20 clients per round, each running one
    local epoch of 5 batches of 10 with Adam lr 1e-3. The paper's stated local Adam lr 0.1 did not
    train in our check (README, "Server training").
    """
    g = parser.add_argument_group("server training (the weights attacked at a global epoch)")
    g.add_argument("--train-clients", type=int, default=200, help="client population of the training run")
    g.add_argument("--train-samples", type=int, default=50, help="images per training client")
    g.add_argument("--train-batch", type=int, default=10, help="local batch of the training clients")
    g.add_argument("--train-optimizer", choices=("sgd", "adam"), default="adam")
    g.add_argument("--train-lr", type=float, default=1e-3)
    g.add_argument("--clients-per-round", type=int, default=20)
    g.add_argument("--eval-size", type=int, default=2000, help="CIFAR-10 test images of the accuracy")
    g.add_argument("--servers", default=None,
                   help="folder of the training runs (default: <runs>/servers); runs are resumed and shared "
                        "between scripts when their settings agree")


def apply_quick_server(args: argparse.Namespace) -> None:
    """``--quick``: a population of 8 clients x 4 images, 4 per round, 64 test images."""
    if args.quick:
        args.train_clients, args.train_samples, args.train_batch = 8, 4, 2
        args.clients_per_round, args.eval_size = 4, 64


def server_run(args: argparse.Namespace, runs: Path, *, model: str, width: int | None, epochs: int,
               defense: str = "none") -> tuple[str, list[dict[str, Any]]]:
    """Trains (or resumes, or reads back) the FedAvg run of ``model`` to global epoch ``epochs``.

    Every epoch's last round is kept, so :func:`client_capture` can attack the weights at any
    whole global epoch up to ``epochs``. The folder name holds every setting, so runs of other
    settings never collide and scripts with the same settings share one run.

    Returns:
      ``(run folder, history)``: the history is one dict per round (``global_epoch``,
      ``train_loss`` and, at every epoch's end, ``test_accuracy``).
    """
    from jaxleak import audit
    from jaxleak.defenses import parse_chain
    from jaxleak.protocols import Protocol
    from jaxleak.protocols.server import HISTORY_FILE, FedAvgTraining, train_fedavg

    root = Path(args.servers) if args.servers else runs / "servers"
    name = (f"{args.dataset}-{model}-w{width or 'default'}-{defense.replace(':', '')}-c{args.train_clients}"
            f"x{args.train_samples}b{args.train_batch}-{args.train_optimizer}{args.train_lr:g}"
            f"-cpr{args.clients_per_round}-is{args.image_size or 'native'}")
    out = root / name
    history_path = out / HISTORY_FILE
    if history_path.is_file():
        history = json.loads(history_path.read_text()).get("history") or []
        if history and history[-1]["global_epoch"] >= epochs - 1e-9 and (out / EPOCH0_FILE).is_file():
            start = json.loads((out / EPOCH0_FILE).read_text())
            return str(out), [start] + [h for h in history if h["global_epoch"] <= epochs + 1e-9]
    train = audit.load_data(args.dataset, split="train", n=args.train_clients * args.train_samples, seed=0,
                            image_size=args.image_size)
    test = audit.load_data(args.dataset, split=args.split, n=args.eval_size, seed=1234,
                           image_size=args.image_size)
    victim, variables, _ = audit.build_victim(model, dataset=train, width=width)
    protocol = Protocol(kind="fedavg", local_epochs=1, local_batch=args.train_batch,
                        optimizer=args.train_optimizer, lr=args.train_lr)
    per_epoch = args.train_clients // args.clients_per_round
    if per_epoch * args.clients_per_round != args.train_clients:
        raise SystemExit("--train-clients must be a multiple of --clients-per-round (whole epochs)")
    steps = args.train_samples // args.train_batch
    chain = parse_chain(defense, batch_size=args.train_batch, steps=steps,
                        sampling_rate=args.train_batch / args.train_samples)
    config = FedAvgTraining(epochs=epochs, clients_per_round=args.clients_per_round, samples=args.train_samples,
                            protocol=protocol, eval_every=per_epoch, num_clients=args.train_clients, seed=0)
    print(f"training {name} to global epoch {epochs} ({per_epoch} rounds per epoch)", flush=True)
    _, history = train_fedavg(victim, variables, train.images, train.labels, config=config,
                              test_images=test.images, test_labels=test.labels, defenses=chain, out=out,
                              resume=True, checkpoint_every=per_epoch, keep=10_000, progress=sys.stderr.isatty())
    # The run records accuracy after rounds only; epoch 0 (the initial weights) is measured here.
    from jaxleak.models.train import evaluate_victim

    initial = evaluate_victim(victim, variables, test.images, test.labels)
    start = {"round": 0, "global_epoch": 0.0, "test_accuracy": float(initial["accuracy"]),
             "test_loss": float(initial["loss"])}
    (out / EPOCH0_FILE).write_text(json.dumps(start) + "\n")
    return str(out), [start] + list(history)


EPOCH0_FILE = "epoch0.json"
"""Beside a server run's history: the test accuracy of its initial weights (global epoch 0)."""


def accuracy_at(history: Sequence[Mapping[str, Any]], epoch: float) -> float | None:
    """Test accuracy recorded at the round that reached global epoch ``epoch`` (``None`` at epoch 0)."""
    for h in history:
        if h["global_epoch"] >= epoch - 1e-9 and h.get("test_accuracy") is not None:
            return float(h["test_accuracy"])
    return None


SERVER_RUNS = "fedavg-trained"
"""The runs folder Tables 1, 3 and Figure 4 share (server runs and attack cells at a global epoch)."""


def trained_cell_dir(runs: Path, args: argparse.Namespace, *, model: str, width: int | None, defense: str,
                     epoch: int, seed: int) -> Path:
    """Where an attack cell at a server run's global epoch lives (shared by Tables 1, 3 and Figure 4).

    The path names everything that fixes the capture (the attacked clients' B, optimizer, reading,
    count, image size; the server run's settings; the defense; the epoch), because a finished
    cell is re-used on its attack config alone.
    """
    clients = (f"B{args.batch}-{args.optimizer}-{args.reading}-lb{args.local_batches}-c{args.clients}"
               f"-is{args.image_size or 'native'}")
    server = (f"c{args.train_clients}x{args.train_samples}b{args.train_batch}-{args.train_optimizer}"
              f"{args.train_lr:g}-cpr{args.clients_per_round}")
    return (runs / "cells" / clients / server
            / f"{model}-w{width or 'default'}-{defense.replace(':', '')}-e{epoch}" / f"seed{seed}")


# --------------------------------------------------------------------------- a script's cells and results


def attack_cells(attacks: Sequence[str], cap, out: Path, *, seed: int, args: argparse.Namespace,
                 iterations: Mapping[str, int], prior: str | None, fm: Mapping[str, Any], per_attack: dict,
                 tag: str, extra: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Runs every attack of ``attacks`` (and its null control) on ``cap`` into ``out``; rows go to ``per_attack``.

    ``per_attack[attack]["real" | "null"]`` collects one row per call (one per seed); a line per
    attack is printed, prefixed with ``tag``.
    """
    for attack in attacks:
        overrides = attack_overrides(attack, iterations[attack], labels=args.labels, prior=prior,
                                     extra=(extra or {}).get(attack), fm=fm)
        cell = run_cell(attack, cap, out, overrides=overrides, options=driver_options(args, iterations[attack]),
                        seed=seed, null=not args.no_null, force=args.force)
        for kind, row in cell.items():
            per_attack[attack][kind].append(row)
        print(f"[{tag}] {attack}: PSNR {fmt(cell['real']['psnr'])} SSIM {fmt(cell['real']['ssim'])} "
              f"MSE {fmt(cell['real']['mse'])}"
              + (f" (null {fmt(cell['null']['psnr'])} / {fmt(cell['null']['ssim'])} / {fmt(cell['null']['mse'])})"
                 if "null" in cell else ""), flush=True)


def summarize(per_attack: Mapping[str, Mapping[str, list]], iterations: Mapping[str, int]) -> dict[str, Any]:
    """Per attack: its budget, the mean (and std) over seeds of the real and null rows, and the rows."""
    return {a: {"iterations": iterations[a], **seed_summary(v)} for a, v in per_attack.items()}


def result_header(script: str, argv, args: argparse.Namespace, *, what: str, attacks: Sequence[str],
                  iterations: Mapping[str, int], fm: Mapping[str, Any] | None = None, protocol=None,
                  samples: int | None = None) -> dict[str, Any]:
    """The opening fields of a results JSON: what, provenance, settings, FM's fields, protocol, budgets.

    ``fm`` / ``protocol`` ``None`` leave their key out: Table 2 and Figure 3 vary the protocol per
    cell, and the FM sweep varies FM's fields.
    """
    header = {
        "what": what,
        **provenance(script, argv),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "runs")},
    }
    if fm is not None:
        header["fm_fields"] = dict(fm)
    if protocol is not None:
        header["protocol"] = {**protocol.as_meta(samples), "reading": args.reading}
    header["budget"] = {"ours": {a: iterations[a] for a in attacks},
                        "paper": {a: PAPER_BUDGETS[a] for a in attacks}}
    return header


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, footer: str = "",
                prior_info: Mapping[str, Any], written: str, after: str = "") -> None:
    """The Markdown table, a footer naming the prior and its FD-AlexNet, the smoke warning, what was written.

    The footer line is ``footer``, the prior, then ``after`` (empty parts left out).
    """
    prior = f"prior {prior_info['source']} (FD-AlexNet {fmt(prior_info.get('fd_alexnet'))})"
    print()
    print(markdown_table(header, rows))
    print("\n" + "; ".join(part for part in (footer, prior, after) if part))
    if prior_info.get("random"):
        print("WARNING: " + prior_info["warning"])
    print(f"wrote {written}")


ATTACK_COLORS = {"sme": "tab:blue", "fm": "tab:red"}
"""One color per attack in every figure, so SME and FM read alike across Figures 3 and 4."""


def attack_errorbars(ax, points: Sequence[Mapping[str, Any]], *, x: str, metric: str,
                     attacks: Sequence[str]) -> None:
    """Per attack, ``metric`` vs ``x`` with the std over seeds as error bars; its null control dashed.

    ``points`` are ``{x, "attack", "real", "null"}`` dicts (Figures 3 and 4); a line with a missing
    value (e.g. no null controls) is left out.
    """
    for attack in attacks:
        pts = [p for p in points if p["attack"] == attack]
        for kind, style in (("real", "-o"), ("null", "--x")):
            ys = [(p[kind] or {}).get(metric) for p in pts]
            if any(y is None for y in ys):
                continue
            es = [(p[kind] or {}).get(metric + "_std") or 0.0 for p in pts]
            ax.errorbar([p[x] for p in pts], ys, yerr=es, fmt=style, color=ATTACK_COLORS.get(attack),
                        capsize=3, label=attack.upper() + (" (null: shuffle)" if kind == "null" else ""),
                        alpha=1.0 if kind == "real" else 0.6)
