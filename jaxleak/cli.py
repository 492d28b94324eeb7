"""The ``jaxleak`` command line: the one place that parses options.

Every subcommand turns its flags into plain values and calls library functions.
Errors in user input end with a one-line message and exit status 2 (``--debug``
shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence

EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, no traceback."""


# --------------------------------------------------------------------------- options


class _Alias(argparse.Action):
    """An old spelling of an option, kept so old scripts run; hidden from ``--help``.

    Stores like the option it stands for and records the spelling used (``_spelled_<dest>``), so
    an error about the option can name the flag the user typed.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"_spelled_{self.dest}", option_string)


def _add_alias(p, old: str, dest: str, **kwargs) -> None:
    """Adds ``old`` as a hidden alias that stores into ``dest`` (pass the new option's type/nargs)."""
    p.add_argument(old, dest=dest, action=_Alias, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def _spelled(args, dest: str, flag: str) -> str:
    """The spelling of option ``dest`` the user typed (``flag`` unless an old alias was used)."""
    return getattr(args, f"_spelled_{dest}", flag)


def _required_with_alias(p, new: str, old: str, dest: str, *, help: str, **kwargs) -> None:
    """A required option ``new`` that its hidden old spelling ``old`` also satisfies."""
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(new, dest=dest, help=help, **kwargs)
    _add_alias(group, old, dest, **kwargs)


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1), got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1), got {text}")
    return v


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def _epsilon(text: str) -> float:
    if text.lower() in ("inf", "none"):
        return math.inf
    return _positive_float(text)


def _image_size(text: str) -> int | tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes, got {text!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _add_dp_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("differential privacy (see README: 'Two calibrations')")
    g.add_argument("--calibration", choices=("paper", "dpsgd", "none"), default=None,
                   help="paper: Venom/Mjolnir protocol (joint FC clip, s = 2*lr*C/m); "
                        "dpsgd: per-example clip + z*C noise on the sum; none: no protection. A shorthand "
                        "for a DP item of --defense. Default: paper for a FedSGD capture without --defense "
                        "(the Venom setting), else none")
    g.add_argument("--mechanism", choices=("gaussian", "laplace"), default="gaussian")
    g.add_argument("--epsilon", type=_epsilon, default=10.0,
                   help="privacy budget, one value (inf: no protection)")
    g.add_argument("--delta", type=_positive_float, default=1e-5)
    g.add_argument("--clip", type=_positive_float, default=1.0, help="L2 clipping bound C")
    g.add_argument("--dp-lr", type=_positive_float, default=1e-3,
                   help="paper calibration: lr in the sensitivity 2*lr*C/m")
    g.add_argument("--noise-multiplier", type=float, default=None,
                   help="dpsgd: use this z directly (default: calibrated from --epsilon)")
    g.add_argument("--sampling-rate", type=_positive_float, default=1.0, help="dpsgd accountant: q")
    g.add_argument("--dp-steps", type=_positive_int, default=1,
                   help="dpsgd accountant: composed steps (a FedAvg capture counts its E x S local steps "
                        "when this and --sampling-rate are left at their defaults)")
    _add_alias(g, "--steps", "dp_steps", type=_positive_int)
    g.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    g.add_argument("--dp-scope", choices=("all", "layer"), default="all",
                   help="paper calibration: protect every layer (each clipped to C on its own) or "
                        "only the captured dense layer, as the paper words it (the rest is sent unprotected)")


def _dp_config(args):
    from jaxleak.privacy import DPConfig

    calibration = args.calibration
    if calibration is None:
        fedavg = getattr(args, "protocol", "fedsgd") == "fedavg"
        calibration = "none" if (getattr(args, "defense", None) or fedavg) else "paper"
    if calibration != "none" and math.isinf(args.epsilon) and args.noise_multiplier is None:
        calibration = "none"  # epsilon = inf means no protection
    return DPConfig(
        calibration=calibration, mechanism=args.mechanism,
        epsilon=None if math.isinf(args.epsilon) else args.epsilon, delta=args.delta,
        clip=args.clip, lr=args.dp_lr, noise_multiplier=args.noise_multiplier,
        sampling_rate=args.sampling_rate, steps=args.dp_steps, accountant=args.accountant,
        scope="all" if calibration == "none" else args.dp_scope,
    )


def _protocol(args):
    """The :class:`jaxleak.protocols.Protocol` and the client's M from the capture flags."""
    from jaxleak.protocols import Protocol

    if args.protocol == "fedsgd":
        for flag in ("local_epochs", "local_batch"):
            if getattr(args, flag) is not None:
                raise CLIError(f"--{flag.replace('_', '-')} applies to --protocol fedavg only")
        samples = args.samples if args.samples is not None else args.batch_size
        return Protocol(kind="fedsgd", global_epoch=args.global_epoch), samples
    if args.batch_size != 1:
        raise CLIError("--batch-size is FedSGD's client batch; with --protocol fedavg give --samples (images per "
                       "client) and --local-batch")
    samples = args.samples if args.samples is not None else 50
    return Protocol(kind="fedavg", local_epochs=args.local_epochs or 1,
                    local_batch=args.local_batch or min(10, samples), optimizer=args.local_optimizer,
                    lr=args.local_lr, global_epoch=args.global_epoch), samples


def _defenses(args, protocol, samples: int, layer_path):
    """The defense chain: ``--defense`` plus the ``--calibration`` shorthand."""
    from jaxleak.capture.simulate import resolve_defenses
    from jaxleak.defenses import chain, parse_chain

    batch = protocol.batch(samples)
    steps, q = protocol.total_steps(samples), batch / samples
    parsed = parse_chain(args.defense, batch_size=batch, steps=steps, sampling_rate=q,
                         layer_path=tuple(layer_path)) if args.defense else chain()
    dp = _dp_config(args)
    if (dp.calibration == "dpsgd" and protocol.kind == "fedavg" and args.dp_steps == 1
            and args.sampling_rate == 1.0):
        import dataclasses

        dp = dataclasses.replace(dp, steps=steps, sampling_rate=q)  # account for every local step
    return resolve_defenses(dp, parsed, samples=samples, protocol=protocol, layer_path=layer_path)


def _add_protocol_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("protocol (what each client does; docs/core.md)")
    g.add_argument("--protocol", choices=("fedsgd", "fedavg"), default="fedsgd",
                   help="fedsgd: one gradient on the client's images; fedavg: local training, the update is "
                        "w0 - w1 (default: %(default)s)")
    g.add_argument("--samples", type=_positive_int, default=None,
                   help="images per client M (default: --batch-size for fedsgd, 50 for fedavg)")
    g.add_argument("--batch-size", type=_positive_int, default=1,
                   help="fedsgd: examples per client (its batch B = M)")
    g.add_argument("--local-epochs", type=_positive_int, default=None, help="fedavg: E (default: 1)")
    g.add_argument("--local-batch", type=_positive_int, default=None,
                   help="fedavg: local batch B, ceil(M/B) steps per epoch (default min(10, M))")
    g.add_argument("--local-optimizer", choices=("sgd", "adam"), default="adam",
                   help="fedavg: local optimizer (default adam, the FM paper's; SME's code uses sgd 0.004)")
    g.add_argument("--local-lr", type=_positive_float, default=0.1, help="fedavg: local learning rate")
    g.add_argument("--global-epoch", type=_nonneg_int, default=None,
                   help="recorded: the FL epoch at which the victim's weights were taken (default: not "
                        "recorded, or the last epoch of a `train-fedavg` run given as --victim-checkpoint)")
    p.add_argument("--defense", default=None,
                   help="defense chain applied left to right, e.g. clip-norm:1.0,gaussian:0.001; items: none, "
                        "gaussian:STD, laplace:SCALE, clip-norm:C, clip-value:C, prune-smallest:FRACTION, "
                        "keep-largest:FRACTION, quantize:BITS, dp-paper:eps=E[,delta=D,lr=LR,clip=C], "
                        "dpsgd:eps=E|z=Z[,delta=D,clip=C,q=Q] (default: none; --calibration adds a DP item)")


def _add_data_options(p: argparse.ArgumentParser, *, default_dataset: str = "mnist-embedded") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=default_dataset,
                   help="a name (mnist, cifar10, tinyimagenet32, imagenette128, mnist-embedded, any tfds "
                        "name) or a path to an image folder / .tar.gz (default: %(default)s)")
    g.add_argument("--split", default="test")
    g.add_argument("--data-dir", default=None,
                   help="folder with offline dataset copies (default: $JAXLEAK_DATA_DIR)")
    g.add_argument("--image-size", type=_image_size, default=None,
                   help="resize to N or HxW (default: the dataset's size)")
    g.add_argument("--download", action="store_true", help="let tensorflow-datasets download")


def _add_victim_options(p: argparse.ArgumentParser, *, default_model: str = "lenet-venom",
                        checkpoint: bool = True) -> None:
    g = p.add_argument_group("victim model")
    g.add_argument("--model", default=default_model, help="victim name (see `jaxleak models`)")
    g.add_argument("--width", type=_positive_int, default=None,
                   help="convnet/resnet width (default: the model's own)")
    g.add_argument("--hidden", type=_positive_int, nargs="+", default=None,
                   help="mlp hidden widths (default: the model's own)")
    g.add_argument("--precode", type=_positive_int, default=None, metavar="K",
                   help="wrap the victim with PRECODE's variational bottleneck of K units before its head "
                        "(the paper's K = 256); its noise sample is drawn from the client's key, not released "
                        "(default: no PRECODE)")
    if checkpoint:
        g.add_argument("--victim-checkpoint", default=None,
                       help="victim weights: a `jaxleak train-victim` folder or a `jaxleak train-fedavg` run "
                            "(default: a random initialisation from --init-seed)")
        _add_alias(g, "--checkpoint", "victim_checkpoint")
    g.add_argument("--init-seed", type=_nonneg_int, default=0,
                   help="seed of the victim's random initialisation (when no checkpoint)")


def _add_conv_impl(g) -> None:
    g.add_argument("--conv-impl", choices=("auto", "xla", "patches"), default="auto",
                   help="convolutions during capture: xla, or patches (im2col; 3-5x faster per-example "
                        "weight gradients of the LeNets on GPUs); auto picks patches for the LeNets on GPU "
                        "when conv weight gradients are needed (dpsgd, --keep-update), else xla. Only the "
                        "speed changes.")


# --------------------------------------------------------------------------- commands


def _fedavg_run_epoch(checkpoint: str | None):
    """The global epoch reached by a ``jaxleak train-fedavg`` run folder (``None`` for other checkpoints)."""
    from jaxleak.protocols.server import HISTORY_FILE

    path = os.path.join(checkpoint, HISTORY_FILE) if checkpoint else None
    if not path or not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        history = json.load(f).get("history") or [{}]
    return history[-1].get("global_epoch")


def cmd_capture(args) -> int:
    from jaxleak import audit
    from jaxleak.capture import check_output_path, save_capture

    protocol, samples = _protocol(args)
    fl_epoch = _fedavg_run_epoch(args.victim_checkpoint)
    if fl_epoch is not None and args.global_epoch is None:
        import dataclasses

        protocol = dataclasses.replace(protocol, global_epoch=fl_epoch)  # weights of a `train-fedavg` run
    if args.defense:  # a malformed chain fails here, before any data is loaded
        from jaxleak.defenses import parse_chain

        parse_chain(args.defense, batch_size=protocol.batch(samples), steps=protocol.total_steps(samples),
                    sampling_rate=protocol.batch(samples) / samples)
    check_output_path(args.out, force=args.force)
    dataset = audit.load_data(args.dataset, split=args.split, n=args.n * samples, seed=args.data_seed,
                              image_size=args.image_size, data_dir=args.data_dir, download=args.download)
    victim, variables, vmeta = audit.build_victim(
        args.model, dataset=dataset, width=args.width, hidden=args.hidden, precode=args.precode,
        checkpoint=args.victim_checkpoint, init_seed=args.init_seed)
    if args.layer not in victim.layers:
        raise CLIError(f"--layer {args.layer}: {victim.name} has the dense layer(s) {sorted(victim.layers)}")
    defenses = _defenses(args, protocol, samples, victim.layers[args.layer].path)
    cap = audit.capture(
        victim, variables, dataset, defenses=defenses, protocol=protocol, samples=samples, seed=args.seed,
        layer=args.layer, chunk_size=args.chunk_size or (8 if protocol.kind == "fedavg" else 256),
        keep_update=args.keep_update,
        keep_params=args.keep_params, extra_meta=vmeta, progress=not args.quiet, conv_impl=args.conv_impl)
    save_capture(args.out, cap, compress=args.compress, force=args.force)
    m = cap.meta
    pr = m["protocol"]
    local = "" if pr["kind"] == "fedsgd" else (f", E={pr['local_epochs']} x S={pr['local_steps']} steps of "
                                               f"B={pr['local_batch']} ({pr['optimizer']} lr {pr['lr']:g})")
    chain_text = ",".join(d["name"] for d in m["defenses"]) or "none"
    eps = "" if m["dp"] is None else f" eps={'inf (no noise)' if m['epsilon'] is None else m['epsilon']}"
    print(f"wrote {args.out}: {cap.n} clients x M={pr['samples']} ({pr['kind']}{local}) from {m['dataset']}:"
          f"{m['dataset_split']} ({m['dataset_source']}), {m['model']} layer '{m['layer']}' "
          f"{cap.fc_weight_grad.shape[1:]}, defenses {chain_text}{eps}")
    return 0


def cmd_inspect(args) -> int:
    from jaxleak._console import describe_capture, format_capture, json_ready
    from jaxleak.capture import load_capture

    cap = load_capture(args.capture)
    description = describe_capture(cap, path=args.capture, kappa=args.kappa)
    print(json.dumps(json_ready(description), indent=2, allow_nan=False) if args.json
          else format_capture(description))
    return 0


def _parse_overrides(items: Sequence[str] | None) -> dict:
    """``KEY=VALUE`` strings -> config overrides (JSON values; comma lists for layers/layer_weights)."""
    out: dict = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise CLIError(f"--set expects KEY=VALUE, got {item!r}")
        if key == "layers":
            out[key] = tuple(t for t in text.split(",") if t)
        elif key == "layer_weights":
            try:
                out[key] = tuple(float(t) for t in text.split(",") if t)
            except ValueError:
                raise CLIError(f"--set layer_weights expects comma-separated numbers, got {text!r}") from None
        else:
            try:
                out[key] = json.loads(text)
            except json.JSONDecodeError:
                out[key] = text
    return out


_DRIVER_FLAGS = {"scan_chunk": "chunk", "target_batch": "target_batch", "patience": "patience",
                 "min_delta": "min_delta", "batching": "batching", "unroll": "unroll", "devices": "devices",
                 "conv_impl": "conv_impl"}


def _interactive() -> bool:
    """Whether a person watches stderr (a terminal), as git decides whether to show progress."""
    return sys.stderr.isatty()


def _note(args, text: str) -> None:
    """A progress line on stderr for a person at a terminal (stdout keeps the result), unless ``--quiet``.

    Not written to a pipe or file: there a one-line error stays the only line on stderr.
    """
    if not getattr(args, "quiet", False) and _interactive():
        print(text, file=sys.stderr, flush=True)


def _check_artifact(args, attack) -> None:
    """Refuses a missing or an unused ``--artifact`` before any work, naming the flag as typed."""
    flag = _spelled(args, "artifact", "--artifact")
    if "artifact" in attack.needs and not args.artifact:
        raise CLIError(f"attack {attack.name} needs a trained network: --artifact DIR, a folder written by "
                       f"`jaxleak train {attack.name}`")
    if args.artifact and "artifact" not in attack.needs:
        raise CLIError(f"attack {attack.name} takes no {flag} (it has no trained network)")


def cmd_attack(args) -> int:
    from jaxleak.attacks.registry import get_attack
    from jaxleak.audit import run_attack
    from jaxleak.capture import load_capture

    attack = get_attack(args.attack)
    _check_artifact(args, attack)
    overrides = _parse_overrides(args.set)
    options: dict = {}
    for opt in attack.options:
        value = getattr(args, opt.dest + "_opt", None)
        if value is None:
            continue
        if opt.type is bool:
            value = not opt.flag.startswith("--no-")
        (overrides if opt.target == "config" else options)[opt.dest] = value
    if attack.family in ("optimization", "fedavg"):
        options.update({dest: getattr(args, flag) for flag, dest in _DRIVER_FLAGS.items()})
    cap = load_capture(args.capture)
    _note(args, f"jaxleak attack {attack.name}: {cap.n} client(s) x M={cap.samples} from {args.capture}; "
                f"compiling ... (the first compiled call can take a while; progress follows)")
    summary = run_attack(
        attack.name, cap, out_dir=args.out, overrides=overrides, artifact=args.artifact,
        seed=args.attack_seed, progress=not args.quiet, options=options, null=args.null,
        lpips_net=None if args.lpips_net == "none" else args.lpips_net, weights_dir=args.weights_dir,
        match_metric=args.match_metric, force=args.force)
    grid_note = _write_attack_grid(args.out, cap)
    if grid_note is None:
        summary["written"] = [*summary.get("written", []), "grid.png"]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    from jaxleak._console import format_attack_result

    with open(os.path.join(args.out, "metrics.json"), encoding="utf-8") as f:
        doc = json.load(f)
    written = [os.path.join(args.out, name) for name in summary.get("written", [])]
    print(format_attack_result(doc, capture=args.capture, written=written, grid_note=grid_note))
    return 0


def _write_attack_grid(out_dir: str, cap) -> str | None:
    """Writes ``out_dir/grid.png`` (originals above reconstructions, PSNR under each); else says why not."""
    import numpy as np

    from jaxleak._console import grid_rows
    from jaxleak.report import save_image_grid

    path = os.path.join(out_dir, "grid.png")
    if os.path.exists(path):
        os.remove(path)  # a grid from an earlier run would not match these results (--force)
    recon_path = os.path.join(out_dir, "reconstructions.npz")
    if not os.path.exists(recon_path):
        return "this attack recovered features, not images (features.npz)"
    if cap.truth_images is None:
        return "the capture holds no true images"
    with np.load(recon_path) as f:
        recon = f["images"]
    with open(os.path.join(out_dir, "metrics.json"), encoding="utf-8") as f:
        psnr = (json.load(f).get("metrics") or {}).get("psnr")
    rows, captions = grid_rows(cap.truth_images.astype(np.float32) / 255.0, recon, psnr)
    save_image_grid(path, rows, row_labels=["original", "reconstruction"], captions=captions)
    return None


def cmd_attacks(args) -> int:
    from jaxleak.attacks.registry import NEEDS, attacks

    for name, attack in sorted(attacks().items()):
        needs = ", ".join(attack.needs) or "the attacked layer's update only"
        print(f"{name:14s} {attack.summary}\n{'':14s} needs: {needs}")
    print("\nwhat each need means:")
    for key, text in NEEDS.items():
        print(f"  {key:13s} {text}")
    return 0


def _add_attack_parsers(sub) -> None:
    from jaxleak.attacks.registry import attacks

    p = sub.add_parser("attack", help="reconstruct from a capture file (one subcommand per attack)",
                       description="Run a registered attack (`jaxleak attacks` lists them and what each needs) "
                                   "on a capture file. Writes reconstructions.npz (SPE: features.npz) and "
                                   "metrics.json (PSNR, SSIM, MSE, LPIPS, ASR, computed once for every attack; "
                                   "reconstructions of a client with M > 1 images matched by the Hungarian "
                                   "algorithm first).")
    sub_attack = p.add_subparsers(dest="attack", metavar="ATTACK", required=True)
    for name, attack in sorted(attacks().items()):
        a = sub_attack.add_parser(name, help=attack.summary, description=attack.summary)
        _required_with_alias(a, "--capture", "--captures", "capture",
                             help="capture file (.npz) from `jaxleak capture`")
        a.add_argument("--out", required=True, help="output folder")
        a.add_argument("--force", action="store_true", help="replace results already in --out")
        a.add_argument("--artifact", default=None,
                       help="trained network folder from `jaxleak train` (required: no default)"
                       if "artifact" in attack.needs
                       else "not used: this attack has no trained network (given: an error; default: none)")
        _add_alias(a, "--checkpoint", "artifact")
        a.add_argument("--json", action="store_true",
                       help="print the machine-readable summary (JSON) instead of the table")
        reference = attack.make_config()  # the option defaults shown in --help
        g = a.add_argument_group(f"{name} settings (defaults: the reference setting)")
        for opt in attack.options:
            text = _option_help(opt, reference)
            if opt.type is bool:
                g.add_argument(opt.flag, dest=opt.dest + "_opt", action="store_const", const=True, default=None,
                               help=text)
            else:
                g.add_argument(opt.flag, dest=opt.dest + "_opt", type=_option_type(opt), default=None,
                               choices=opt.choices, help=text,
                               metavar=None if opt.choices else opt.dest.upper())
        g.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                       help="any config field, e.g. --set tv=1e-4 (repeatable; `--set help=1` lists them; "
                            "default: none)")
        g = a.add_argument_group("evaluation")
        g.add_argument("--null", choices=("shuffle", "noise"), default=None,
                       help="null control: attack the update of another client (shuffle) or pure noise of the "
                            "observed scale (noise) instead of the real one (default: the real updates)")
        g.add_argument("--match-metric", choices=("psnr", "ssim", "mse"), default="psnr",
                       help="Hungarian assignment of reconstructions to originals for clients with M > 1")
        g.add_argument("--lpips-net", choices=("alex", "squeeze", "vgg", "none"), default="alex",
                       help="LPIPS backbone (VGG is scored as well where its weights exist)")
        g.add_argument("--weights-dir", default=None, help="LPIPS weights root (default: $JAXLEAK_WEIGHTS_DIR)")
        g.add_argument("--attack-seed", type=_nonneg_int, default=0, help="seed of the initialisations")
        g.add_argument("--quiet", action="store_true",
                       help="no progress bar and no 'compiling ...' line (that line is shown on a terminal only)")
        if attack.family in ("optimization", "fedavg"):
            _add_driver_options(a)
        a.set_defaults(func=cmd_attack)


def _option_help(opt, reference) -> str:
    """An attack option's help with its default: the reference config's field, or the option's own."""
    text = opt.help or ""
    if "default" in text.lower() or opt.type is bool:
        return text
    value = getattr(reference, opt.dest, None) if opt.target == "config" else opt.default
    if value is None:
        return text
    from jaxleak._console import fmt

    return f"{text} (default: {fmt(value)})".replace("%", "%%")


def _option_type(opt):
    def parse(text: str):
        try:
            return opt.type(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e) or f"bad value {text!r}") from None

    return parse


def _add_driver_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation driver (only the speed changes)")
    g.add_argument("--scan-chunk", type=_positive_int, default=100, help="iterations per compiled call")
    g.add_argument("--target-batch", type=_positive_int, default=16, help="targets attacked at once (vmap)")
    g.add_argument("--patience", type=_positive_int, default=None,
                   help="stop when the best matching loss has not improved for this many iterations (default: "
                        "run every iteration)")
    g.add_argument("--min-delta", type=float, default=1e-4, help="relative improvement that resets --patience")
    g.add_argument("--batching", choices=("vmap", "map"), default="vmap",
                   help="targets of a block as one vectorised program (vmap) or one after another in the "
                        "same compiled call (map; faster for conv victims on CPU). Same results.")
    g.add_argument("--unroll", type=_positive_int, default=1,
                   help="iterations unrolled per loop trip (compile time grows with it)")
    g.add_argument("--devices", type=_positive_int, default=None,
                   help="local devices that share each block of targets (vmap; default: all of them)")
    g.add_argument("--conv-impl", choices=("auto", "xla", "patches"), default="auto",
                   help="victim convolutions during the attack: patches (im2col; ~10x faster IG steps on "
                        "CPU for the ConvNet) or xla; auto = patches for every conv victim.")


def cmd_train_flow_prior(args) -> int:
    import dataclasses

    from jaxleak import audit
    from jaxleak.priors import TrainConfig, preset, read_run_config, train_flow_prior

    request = {"dataset": args.dataset, "split": args.split, "n": args.n, "seed": args.data_seed,
               "image_size": args.image_size}
    if args.resume:
        if not os.path.isdir(args.out):
            raise CLIError(f"cannot resume {args.out}: it does not exist")
        config, train_config, data_info = read_run_config(args.out)
        train_config = dataclasses.replace(train_config, steps=args.steps)
        defaults = {"dataset": "tinyimagenet32", "split": "train", "n": None, "seed": 0, "image_size": None}
        clash = [k for k, v in request.items() if v != defaults[k] and v != data_info.get(k)]
        if clash:
            raise CLIError(f"--resume trains on the data stored in {args.out}; drop the data flag(s) for "
                           f"{', '.join(clash)}")
        request = {k: data_info.get(k, request[k]) for k in request}
        size = request["image_size"]
        request["image_size"] = tuple(size) if isinstance(size, list) else size
    t0 = time.perf_counter()
    data = audit.load_data(request["dataset"], split=request["split"], n=request["n"], seed=request["seed"],
                           image_size=request["image_size"], data_dir=args.data_dir, download=args.download)
    if not args.resume:
        config = preset(args.preset, image_size=data.images.shape[1], channels=data.images.shape[-1])
        train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                                   warmup_steps=args.warmup, grad_clip=args.grad_clip, ema_decay=args.ema,
                                   bf16=args.bf16, flip=not args.no_flip, seed=args.seed, devices=args.devices,
                                   checkpoint_every=args.checkpoint_every)
    result = train_flow_prior(data.images, config=config, train_config=train_config, out=args.out,
                              resume=args.resume, info=request, progress=not args.quiet,
                              sample_every=args.sample_every)
    loss = result.history.get("loss") if isinstance(result.history, dict) else None
    summary = {"out": os.path.abspath(args.out), "step": int(result.state.step),
               "final_loss": float(loss[-1]) if loss else None, "dataset": request}
    _print_trained(args, summary, "train flow-prior", [
        ("steps", summary["step"]), ("final loss", summary["final_loss"]),
        ("data", (f"{request['dataset']}:{request['split']}, {data.images.shape[0]} images "
                  f"{'x'.join(map(str, data.images.shape[1:]))}")),
        ("seconds", time.perf_counter() - t0), ("written", summary["out"])])
    return 0


def _print_trained(args, summary: dict, what: str, fields: list) -> None:
    """The end of a ``train`` command: the JSON summary with ``--json``, else a short table."""
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    from jaxleak._console import format_fields

    print(format_fields(f"{what}: done", fields))


def cmd_sample(args) -> int:
    import jax

    from jaxleak.priors import load, sample, save_sample_grid

    prior = load(args.prior)
    images = sample(prior.params, prior.config, jax.random.key(args.seed), args.n, steps=args.steps,
                    method=args.method)
    path = save_sample_grid(args.out, images)
    print(f"wrote {path}: {args.n} samples, {args.steps} {args.method} steps from {args.prior}")
    return 0


def cmd_train_mjolnir(args) -> int:
    from jaxleak import audit
    from jaxleak.attacks.optimization.mjolnir import train_mjolnir_denoiser
    from jaxleak.capture import load_capture

    cap = load_capture(args.capture)
    rebuilt = audit.victim_from_capture(cap)
    if rebuilt is None:
        raise CLIError(f"{args.capture}: cannot rebuild the victim's weights (capture with --keep-params, or "
                       f"keep meta.init_seed / an existing meta.checkpoint)")
    victim, variables = rebuilt
    from jaxleak.attacks.optimization.mjolnir import MjolnirConfig

    overrides = _parse_overrides(args.set)
    steps = MjolnirConfig(**overrides).train_steps  # bad fields fail here, before any data is loaded
    _note(args, f"jaxleak train mjolnir: clean gradients of the auxiliary images, then {steps} denoiser steps "
                f"(compiling ... first)")
    t0 = time.perf_counter()
    summary = train_mjolnir_denoiser(victim, variables, out=args.out, overrides=overrides,
                                     seed=args.seed, force=args.force, data_dir=args.data_dir,
                                     download=args.download, progress=not args.quiet)
    _print_trained(args, summary, "train mjolnir", [
        ("steps", steps), ("final loss", summary.get("denoiser_loss")), ("aux data", summary.get("aux")),
        ("update dim", summary.get("dim")), ("seconds", time.perf_counter() - t0),
        ("written", summary.get("denoiser"))])
    return 0


def cmd_train(args) -> int:
    from jaxleak import audit

    if args.resume:
        given = [f"--{dest.replace('_', '-')}" for dest in _TRAIN_SETTINGS
                 if getattr(args, dest) != args.parser_defaults.get(dest)]
        if given:
            raise CLIError(f"--resume continues with the settings stored in {args.out}; drop {', '.join(given)}")
        t0 = time.perf_counter()
        if os.path.isdir(args.out):  # a missing folder is resume_recovery's one-line error
            _note(args, f"jaxleak train {args.variant}: resuming {args.out}; compiling ...")
        summary = audit.resume_recovery(args.out, triplet_cache=args.triplet_cache, data_dir=args.data_dir,
                                        download=args.download, progress=not args.quiet)
        _print_recovery(args, summary, time.perf_counter() - t0)
        return 0
    t0 = time.perf_counter()
    aux = audit.load_data(args.aux_dataset, split=args.aux_split, n=args.aux_n, seed=args.data_seed,
                          image_size=args.image_size, data_dir=args.data_dir, download=args.download)
    eval_data = None
    if args.eval_dataset or args.eval_split:
        eval_data = audit.load_data(args.eval_dataset or args.aux_dataset,
                                    split=args.eval_split or args.aux_split, n=args.eval_size,
                                    seed=args.data_seed, image_size=args.image_size, data_dir=args.data_dir,
                                    download=args.download)
    epsilons = [e for e in args.epsilons if not math.isinf(e)]
    calibration = args.calibration if epsilons else "none"  # only inf given: no protection
    network = {"base_width": args.base_width, "multipliers": tuple(args.multipliers),
               "resnet_blocks": args.resnet_blocks, "groups": args.groups, "time_dim": args.time_dim,
               "attention_heads": args.attention_heads, "attention_head_dim": args.attention_head_dim}
    train = {"loss": args.loss or ("mse" if args.variant == "fgla" else "mse+cos"),
             "learning_rate": args.lr, "max_lr": args.max_lr,
             "weight_decay": args.weight_decay, "steps": args.steps, "batch_size": args.batch_size,
             "eval_every": args.eval_every, "eval_size": args.eval_size,
             "checkpoint_every": args.checkpoint_every, "seed": args.seed,
             "mixed_precision": args.mixed_precision}
    aux_request = {"name": args.aux_dataset, "split": args.aux_split, "n": args.aux_n, "seed": args.data_seed,
                   "image_size": args.image_size}
    eval_request = None if eval_data is None else {
        "name": args.eval_dataset or args.aux_dataset, "split": args.eval_split or args.aux_split,
        "n": args.eval_size, "seed": args.data_seed, "image_size": args.image_size}
    _note(args, f"jaxleak train {args.variant}: {aux.images.shape[0]} auxiliary images; compiling ...")
    summary = audit.train_recovery(
        args.variant, aux, model=args.model, out=args.out, width=args.width, hidden=args.hidden,
        victim_checkpoint=args.victim_checkpoint, init_seed=args.init_seed, calibration=calibration,
        mechanism=args.mechanism, epsilons=tuple(epsilons), delta=args.delta, clip=args.clip,
        dp_lr=args.dp_lr, accountant=args.accountant, sigma2=args.sigma2, layer=args.layer,
        network=network, train=train, eval_data=eval_data, resume=args.resume,
        triplet_cache=args.triplet_cache, aux_request=aux_request, eval_request=eval_request,
        progress=not args.quiet)
    _print_recovery(args, summary, time.perf_counter() - t0)
    return 0


def _print_recovery(args, summary: dict, seconds: float) -> None:
    aux = summary.get("aux_dataset") or {}
    psnr = summary.get("eval_psnr")
    _print_trained(args, summary, f"train {args.variant}", [
        ("steps", summary.get("step")), ("final loss", summary.get("final_loss")),
        ("eval PSNR", None if psnr is None else f"{psnr:.4g} dB"), ("eval SSIM", summary.get("eval_ssim")),
        ("aux data", f"{aux.get('name')}:{aux.get('split')}" if aux else None),
        ("seconds", seconds), ("written", summary.get("checkpoint"))])


# What a recovery-network run is made of; on --resume they come from the run's folder.
_TRAIN_SETTINGS = ("aux_dataset", "aux_split", "aux_n", "eval_dataset", "eval_split", "data_seed", "image_size",
                   "model", "width", "hidden", "victim_checkpoint", "init_seed", "calibration", "mechanism",
                   "epsilons", "delta", "clip", "dp_lr", "accountant", "sigma2", "layer", "base_width",
                   "multipliers", "resnet_blocks", "groups", "time_dim", "attention_heads", "attention_head_dim",
                   "loss", "lr", "max_lr", "weight_decay", "steps", "batch_size", "eval_every", "eval_size",
                   "checkpoint_every", "seed", "mixed_precision")


def cmd_train_fedavg(args) -> int:
    from jaxleak import audit
    from jaxleak.protocols import FedAvgTraining, train_fedavg

    if (args.rounds is None) == (args.epochs is None):
        raise CLIError("give exactly one of --rounds and --epochs (global epochs: passes of the client population)")
    if args.protocol != "fedavg":
        raise CLIError("train-fedavg trains with FedAvg clients: pass --protocol fedavg")
    t0 = time.perf_counter()
    load = {"seed": args.data_seed, "image_size": args.image_size, "data_dir": args.data_dir,
            "download": args.download}
    train = audit.load_data(args.dataset, split=args.split, n=args.n, **load)
    test = audit.load_data(args.dataset, split=args.eval_split, n=args.eval_size, **load)
    protocol, samples = _protocol(args)
    victim, variables, _ = audit.build_victim(args.model, dataset=train, width=args.width, hidden=args.hidden,
                                              precode=args.precode, checkpoint=args.victim_checkpoint,
                                              init_seed=args.init_seed)
    defenses = _defenses(args, protocol, samples, victim.layers["head"].path) if (args.defense or args.calibration) \
        else None
    config = FedAvgTraining(rounds=args.rounds, epochs=args.epochs, clients_per_round=args.clients_per_round,
                            samples=samples, protocol=protocol, server_lr=args.server_lr, seed=args.seed,
                            eval_every=args.eval_every, num_clients=args.clients, dirichlet=args.dirichlet)
    _, history = train_fedavg(victim, variables, train.images, train.labels, config=config,
                              test_images=test.images, test_labels=test.labels, defenses=defenses, out=args.out,
                              resume=args.resume, checkpoint_every=args.checkpoint_every, keep=args.keep,
                              progress=not args.quiet)
    last = history[-1]
    accuracy = next((h["test_accuracy"] for h in reversed(history) if "test_accuracy" in h), None)
    _print_trained(args, last, "train-fedavg", [
        ("rounds", last.get("round")), ("global epoch", last.get("global_epoch")),
        ("train loss", last.get("train_loss")), ("test accuracy", accuracy),
        ("seconds", time.perf_counter() - t0), ("written", os.path.abspath(args.out))])
    return 0


def cmd_bench(args) -> int:
    from jaxleak import audit

    if args.what != "capture":
        raise CLIError(f"unknown benchmark {args.what!r}; available: capture")
    protocol, samples = _protocol(args)
    victim, variables, _ = audit.build_victim(
        args.model, image_shape=(args.image_size, args.image_size, args.channels), num_classes=args.num_classes,
        width=args.width, hidden=args.hidden, precode=args.precode)
    defenses = _defenses(args, protocol, samples, victim.layers["head"].path)
    batch = args.batch or (8 if protocol.kind == "fedavg" else 1024)
    result = audit.bench_capture(victim, variables, batch=batch, repeats=args.repeats, protocol=protocol,
                                 samples=samples, defenses=defenses, conv_impl=args.conv_impl)
    print(json.dumps(result))
    return 0


def cmd_demo(args) -> int:
    from jaxleak.demo import run_demo

    run_demo(out_dir=args.out, n=args.n, epsilons=tuple(args.epsilons), seed=args.seed, verbose=not args.quiet)
    return 0


def cmd_train_victim(args) -> int:
    from jaxleak import audit

    t0 = time.perf_counter()
    dataset = audit.load_data(args.dataset, split=args.split, n=args.n, seed=args.data_seed,
                              image_size=args.image_size, data_dir=args.data_dir, download=args.download)
    path = audit.train_and_save_victim(
        args.model, dataset, out=args.out, width=args.width, hidden=args.hidden, steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.lr, seed=args.init_seed, progress=not args.quiet)
    summary = {"checkpoint": path, "model": args.model, "steps": args.steps, "dataset": dataset.name,
               "split": dataset.split, "images": int(dataset.images.shape[0])}
    _print_trained(args, summary, "train-victim", [
        ("model", args.model), ("steps", args.steps),
        ("data", f"{dataset.name}:{dataset.split}, {dataset.images.shape[0]} images"),
        ("seconds", time.perf_counter() - t0), ("written", path)])
    return 0


def cmd_list(args) -> int:
    from jaxleak.data import DATASETS
    from jaxleak.models import VICTIMS

    table = VICTIMS if args.what == "models" else DATASETS
    width = max(map(len, table))
    for name, text in table.items():
        print(f"{name:<{width}}  {text}")
    return 0


# --------------------------------------------------------------------------- parser


def _add_recovery_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("auxiliary data")
    g.add_argument("--aux-dataset", default="mnist-embedded", help="dataset name or path (default: %(default)s)")
    g.add_argument("--aux-split", default="train")
    g.add_argument("--aux-n", type=_positive_int, default=None, help="auxiliary images (default: all)")
    g.add_argument("--eval-dataset", default=None, help="held-out dataset (default: hold out aux images)")
    g.add_argument("--eval-split", default=None,
                   help="held-out split (default: --aux-split; without --eval-dataset either, auxiliary images "
                        "are held out)")
    g.add_argument("--data-seed", type=_nonneg_int, default=0)
    g.add_argument("--data-dir", default=None, help="offline dataset copies (default: $JAXLEAK_DATA_DIR)")
    g.add_argument("--image-size", type=_image_size, default=None,
                   help="resize to N or HxW (default: the dataset's size)")
    g.add_argument("--download", action="store_true", help="let tensorflow-datasets download")
    g = p.add_argument_group("victim model (must match the captures attacked later)")
    g.add_argument("--model", default="lenet-venom")
    g.add_argument("--width", type=_positive_int, default=None,
                   help="convnet/resnet width (default: the model's own)")
    g.add_argument("--hidden", type=_positive_int, nargs="+", default=None,
                   help="mlp hidden widths (default: the model's own)")
    g.add_argument("--victim-checkpoint", default=None,
                   help="victim weights from `jaxleak train-victim` (default: a random initialisation from "
                        "--init-seed)")
    _add_alias(g, "--checkpoint", "victim_checkpoint")
    g.add_argument("--init-seed", type=_nonneg_int, default=0)
    g.add_argument("--layer", default="head", help="dense layer whose gradient SPE inverts")
    g = p.add_argument_group("protection the training triplets simulate")
    g.add_argument("--calibration", choices=("paper", "dpsgd", "none"), default="paper")
    g.add_argument("--mechanism", choices=("gaussian", "laplace"), default="gaussian")
    g.add_argument("--epsilons", type=_epsilon, nargs="+", default=[1.0, 5.0, 10.0],
                   help="epsilons to train for; each image draws one")
    _add_alias(g, "--epsilon", "epsilons", type=_epsilon, nargs="+")
    g.add_argument("--delta", type=_positive_float, default=1e-5)
    g.add_argument("--clip", type=_positive_float, default=1.0)
    g.add_argument("--dp-lr", type=_positive_float, default=1e-3)
    g.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    g.add_argument("--sigma2", choices=("mechanism", "estimate"), default="mechanism")
    g = p.add_argument_group("network (defaults: the reference's)")
    g.add_argument("--base-width", type=_positive_int, default=64)
    g.add_argument("--multipliers", type=_positive_int, nargs="+", default=[1, 2, 4])
    g.add_argument("--resnet-blocks", type=_positive_int, default=2)
    g.add_argument("--groups", type=_positive_int, default=8)
    g.add_argument("--time-dim", type=_positive_int, default=64)
    g.add_argument("--attention-heads", type=_positive_int, default=4)
    g.add_argument("--attention-head-dim", type=_positive_int, default=32)
    g = p.add_argument_group("training")
    g.add_argument("--loss", choices=("mse", "mse+cos"), default=None,
                   help="default: mse+cos (reference code) for venom/venom-diff, mse for fgla")
    g.add_argument("--steps", type=_positive_int, default=2000)
    g.add_argument("--batch-size", type=_positive_int, default=32)
    g.add_argument("--lr", type=_positive_float, default=3e-4, help="initial one-cycle learning rate")
    g.add_argument("--max-lr", type=_positive_float, default=1e-3, help="peak one-cycle learning rate")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--eval-every", type=_nonneg_int, default=100)
    g.add_argument("--eval-size", type=_positive_int, default=64, help="held-out images")
    g.add_argument("--checkpoint-every", type=_nonneg_int, default=500)
    g.add_argument("--seed", type=_nonneg_int, default=0)
    g.add_argument("--mixed-precision", action="store_true", help="bfloat16 compute for the network")
    p.add_argument("--out", required=True, help="checkpoint folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--triplet-cache", metavar="FILE.npz", default=None,
                   help="train on one fixed triplet per auxiliary image, built once into FILE.npz (reused when "
                        "it exists and matches); default: fresh triplets every step")


def build_parser() -> argparse.ArgumentParser:
    from jaxleak._version import __version__

    parser = argparse.ArgumentParser(
        prog="jaxleak",
        description="Audit privacy in federated learning by attacking it: simulate DP-protected client "
                    "updates, reconstruct the private images, measure what leaked.")
    parser.add_argument("--version", action="version", version=f"jaxleak {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="a small offline audit on embedded MNIST digits, with its HTML report "
                                    "(about a minute on 2 CPU cores)",
                       description="An audit of FedSGD clients holding one digit each, unprotected, under the "
                                   "paper calibration and under DP-SGD at the same epsilons, attacked with SPE at "
                                   "an mlp's first layer, beside the reconstruction bound each defense promises. "
                                   "Writes OUT/demo.toml (rerun it with `jaxleak audit run`), the cells and "
                                   "OUT/report/report.html.")
    p.add_argument("--out", default="jaxleak-demo", help="output folder (default: %(default)s)")
    p.add_argument("--n", type=_positive_int, default=64, help="clients, one digit each (default: %(default)s)")
    p.add_argument("--epsilons", type=_positive_float, nargs="+", default=[1.0, 5.0, 10.0])
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("capture", help="simulate DP-protected client updates and save what an attacker sees",
                       description="Simulate federated clients (FedSGD or FedAvg) on real images, protect "
                                   "their updates with a defense chain (DP among them) and write a capture file "
                                   "(.npz); `jaxleak inspect FILE` says what it holds.")
    _add_data_options(p)
    _add_victim_options(p)
    p.add_argument("--n", type=_positive_int, default=256, help="number of clients (default: %(default)s)")
    _add_protocol_options(p)
    p.add_argument("--layer", default="head", help="dense layer to record: head, or first (mlp)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="noise seed")
    p.add_argument("--data-seed", type=_nonneg_int, default=0, help="seed of the image subset")
    p.add_argument("--chunk-size", type=_positive_int, default=None,
                   help="clients per compiled call (default: 256 for fedsgd; 8 for fedavg, fastest on a CPU in "
                        "BENCHMARKS.md: larger chunks only add memory traffic there)")
    p.add_argument("--keep-update", action="store_true", help="also store the whole protected update")
    p.add_argument("--keep-params", action="store_true", help="also store the victim's parameters")
    p.add_argument("--compress", action="store_true", help="write a compressed .npz")
    _add_conv_impl(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--out", required=True, help="capture file to write (.npz)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    _add_dp_options(p)
    p.set_defaults(func=cmd_capture)

    from jaxleak._console import DEFAULT_KAPPA

    p = sub.add_parser("inspect",
                       help="say what a capture file holds (protocol, defenses, DP, the bound, arrays)",
                       description="Print what a capture holds: clients and images, dataset, victim, protocol, "
                                   "the defense chain with its parameters, nominal and tight epsilon, the DP "
                                   "reconstruction bound (jaxleak.privacy.bound_for_meta) and the stored arrays.")
    p.add_argument("capture", help="capture file (.npz) from `jaxleak capture`")
    p.add_argument("--kappa", type=_probability, default=DEFAULT_KAPPA,
                   help="baseline success probability of the bound: how often an attacker succeeds without "
                        "the update (the audit estimates it from public images)")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train a recovery network, Mjolnir's denoiser or a flow-matching prior",
                       description="Train something an attack or an audit loads later (one artifact folder).")
    tsub = p.add_subparsers(dest="variant", metavar="WHAT", required=True)
    recovery = {"venom": "Diff-LRN (liquid time embedding, FiLM UNet)",
                "venom-diff": "the sinusoidal-embedding ablation of Diff-LRN",
                "fgla": "the FGLA generator (label-row features)"}
    for variant, what in recovery.items():
        q = tsub.add_parser(variant, help=f"{what} on auxiliary images",
                            description=f"Train {what} on triplets made from auxiliary images (victim gradient, "
                                        f"DP noise, SPE). Writes a folder for `jaxleak attack {variant} "
                                        f"--artifact`. The auxiliary images must be disjoint from the attacked "
                                        f"ones (another split or dataset).")
        _add_recovery_train_options(q)
        q.add_argument("--quiet", action="store_true", help="no progress output")
        q.set_defaults(func=cmd_train)
        # what --resume must not change (hidden aliases store into the same dests and have no default)
        q.set_defaults(parser_defaults={a.dest: a.default for a in q._actions
                                        if a.default is not argparse.SUPPRESS})

    q = tsub.add_parser("mjolnir", help="Mjolnir's DDPM denoiser, once, for a capture's victim",
                        description="Train Mjolnir's denoiser for the victim and weights of --capture and save "
                                    "it; `jaxleak attack mjolnir --set denoiser_path=DIR` loads it.")
    _required_with_alias(q, "--capture", "--captures", "capture",
                         help="a capture (--keep-update) whose victim the denoiser is for")
    q.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="MjolnirConfig fields (architecture, DDPM, training, auxiliary data; repeatable; "
                        "default: the reference's)")
    q.add_argument("--seed", type=_nonneg_int, default=0)
    q.add_argument("--data-dir", default=None, help="offline dataset copies (default: $JAXLEAK_DATA_DIR)")
    q.add_argument("--download", action="store_true", help="let tensorflow-datasets download")
    q.add_argument("--force", action="store_true", help="replace an existing denoiser at --out")
    q.add_argument("--out", required=True, help="denoiser folder")
    q.add_argument("--quiet", action="store_true", help="no progress output")
    q.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    q.set_defaults(func=cmd_train_mjolnir)

    q = tsub.add_parser("flow-prior", help="a flow-matching image prior (UNet velocity field)",
                        description="Train a flow-matching prior v(x, t) on any dataset jaxleak loads (linear "
                                    "path, t = 1 clean). Checkpoints are resumable; --resume continues the run "
                                    "in --out to --steps.")
    _add_data_options(q, default_dataset="tinyimagenet32")
    q.set_defaults(split="train")
    q.add_argument("--n", type=_positive_int, default=None, help="training images (default: all)")
    q.add_argument("--data-seed", type=_nonneg_int, default=0)
    q.add_argument("--preset", choices=("small", "paper"), default="small",
                   help="small: ~1.1M parameters, trainable on a CPU; paper: width 64, 2 blocks, ~9M")
    q.add_argument("--steps", type=_positive_int, required=True)
    q.add_argument("--batch-size", type=_positive_int, default=128)
    q.add_argument("--lr", type=_positive_float, default=2e-4)
    q.add_argument("--warmup", type=_nonneg_int, default=5000, help="linear warm-up steps")
    q.add_argument("--grad-clip", type=_positive_float, default=1.0)
    q.add_argument("--ema", type=_positive_float, default=0.9999, help="EMA decay")
    q.add_argument("--bf16", action="store_true", help="bfloat16 compute")
    q.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    q.add_argument("--devices", type=_positive_int, default=1, help="local devices sharing each batch")
    q.add_argument("--seed", type=_nonneg_int, default=0)
    q.add_argument("--checkpoint-every", type=_positive_int, default=500)
    q.add_argument("--sample-every", type=_positive_int, default=None,
                   help="write a sample grid every N steps (default: none)")
    q.add_argument("--resume", action="store_true", help="continue the run in --out (its stored settings)")
    q.add_argument("--out", required=True, help="run folder")
    q.add_argument("--quiet", action="store_true", help="no progress output")
    q.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    q.set_defaults(func=cmd_train_flow_prior)

    p = sub.add_parser("sample", help="draw images from a flow-matching prior",
                       description="Integrate dx/dt = v(x, t) from noise (t = 0) to images (t = 1) and save a grid.")
    p.add_argument("--prior", default="tinyimagenet32-small",
                   help="a prior folder from `jaxleak train flow-prior` or a shipped prior's name "
                        "(default: %(default)s, shipped with the package)")
    p.add_argument("--n", type=_positive_int, default=64)
    p.add_argument("--steps", type=_positive_int, default=50, help="solver steps")
    p.add_argument("--method", choices=("euler", "heun", "midpoint"), default="euler")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--out", required=True, help="PNG grid to write")
    p.set_defaults(func=cmd_sample)

    _add_attack_parsers(sub)
    p = sub.add_parser("attacks", help="list the registered attacks and what each needs from a capture")
    p.set_defaults(func=cmd_attacks)

    p = sub.add_parser("bench", help="measure throughput (prints one JSON line)")
    p.add_argument("what", choices=("capture",))
    p.add_argument("--model", default="lenet-dlg")
    p.add_argument("--image-size", type=_positive_int, default=32)
    p.add_argument("--channels", type=_positive_int, default=3)
    p.add_argument("--num-classes", type=_positive_int, default=10)
    p.add_argument("--batch", type=_positive_int, default=None,
                   help="clients in the timed call (default: 1024 for fedsgd, 8 for fedavg: see BENCHMARKS.md)")
    p.add_argument("--repeats", type=_positive_int, default=10)
    p.add_argument("--width", type=_positive_int, default=None, help="convnet/resnet width (default: the model's)")
    p.add_argument("--hidden", type=_positive_int, nargs="+", default=None,
                   help="mlp hidden widths (default: the model's)")
    p.add_argument("--precode", type=_positive_int, default=None, metavar="K",
                   help="PRECODE bottleneck of K units (default: none)")
    _add_protocol_options(p)
    _add_conv_impl(p)
    _add_dp_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train-victim", help="train a victim model briefly and save an orbax checkpoint")
    _add_data_options(p, default_dataset="mnist-embedded")
    _add_victim_options(p, checkpoint=False)
    p.set_defaults(split="train")
    p.add_argument("--n", type=_positive_int, default=None, help="training images (default: all)")
    p.add_argument("--data-seed", type=_nonneg_int, default=0)
    p.add_argument("--steps", type=_positive_int, default=500, help="training steps")
    _add_alias(p, "--train-steps", "steps", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.set_defaults(func=cmd_train_victim)

    p = sub.add_parser("train-fedavg", help="FedAvg training over many simulated clients (weights per round)",
                       description="Server-side FedAvg: each round samples --clients-per-round clients, runs "
                                   "their local training (--protocol fedavg options), averages the updates and "
                                   "evaluates test accuracy; checkpoints go to --out (a victim checkpoint: "
                                   "`jaxleak capture --victim-checkpoint OUT` captures at the last round). "
                                   "A global "
                                   "epoch is one pass of the client population in expectation: "
                                   "clients / clients-per-round rounds.")
    _add_data_options(p, default_dataset="mnist-embedded")
    p.set_defaults(split="train")
    _add_victim_options(p)
    _add_protocol_options(p)
    p.set_defaults(protocol="fedavg")
    g = p.add_argument_group("FedAvg training")
    g.add_argument("--n", type=_positive_int, default=None, help="training images (default: all)")
    g.add_argument("--data-seed", type=_nonneg_int, default=0)
    g.add_argument("--rounds", type=_positive_int, default=None,
                   help="server rounds (default: none; give exactly one of --rounds and --epochs)")
    g.add_argument("--epochs", type=_positive_float, default=None,
                   help="global epochs, instead of --rounds (default: none)")
    g.add_argument("--clients-per-round", type=_positive_int, default=10)
    g.add_argument("--clients", type=_positive_int, default=None, help="client population (default: n / M)")
    g.add_argument("--server-lr", type=_positive_float, default=1.0, help="1.0 = plain FedAvg")
    g.add_argument("--dirichlet", type=_positive_float, default=None,
                   help="non-IID label skew with this Dirichlet alpha (default: IID)")
    g.add_argument("--eval-split", default="test")
    g.add_argument("--eval-size", type=_positive_int, default=1000, help="test images")
    g.add_argument("--eval-every", type=_positive_int, default=10, help="rounds between test evaluations")
    g.add_argument("--checkpoint-every", type=_positive_int, default=None, help="default: --eval-every")
    g.add_argument("--keep", type=_positive_int, default=2, help="checkpoints kept")
    g.add_argument("--seed", type=_nonneg_int, default=0)
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print the last round as JSON instead of a table")
    _add_dp_options(p)
    p.set_defaults(func=cmd_train_fedavg)

    p = sub.add_parser("models", help="list victim models")
    p.set_defaults(func=cmd_list, what="models")
    p = sub.add_parser("datasets", help="list known dataset names")
    p.set_defaults(func=cmd_list, what="datasets")
    from jaxleak.audit.commands import add_audit_parsers

    add_audit_parsers(sub)
    _show_defaults(parser)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Appends ``(default: ...)`` to the help of every option of ``parser`` and its subcommands.

    Options whose help already speaks of their default are left alone, and so are flags,
    required options and ``None`` defaults (their help says what happens without them).
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                _show_defaults(sub)
        elif action.option_strings and action.help is not argparse.SUPPRESS and action.nargs != 0:
            text = action.help or ""
            if "default" in text.lower() or action.required or action.default in (None, argparse.SUPPRESS):
                continue
            value = action.default
            shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else "%(default)s"
            action.help = f"{text} (default: {shown})" if text else f"default: {shown}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("jaxleak: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `jaxleak inspect X | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CLIError, ValueError, OSError, KeyError) as e:
        if args.debug or os.environ.get("JAXLEAK_DEBUG"):
            raise
        msg = _one_line(e)
        print(f"jaxleak {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


# The library's hints name Python arguments; on the command line they are flags.
_CLI_WORDS = (("pass data_dir=... or set $JAXLEAK_DATA_DIR", "pass --data-dir DIR or set $JAXLEAK_DATA_DIR"),
              ("no data_dir argument", "no --data-dir"), ("pass download=True", "pass --download"),
              ("download=True", "--download"), ("data_dir=", "--data-dir "))


def _one_line(error: BaseException) -> str:
    """The error as one line; a missing dataset keeps its whole "how to fix" hint, in CLI words."""
    from jaxleak.data import DatasetNotFoundError

    text = str(error).strip()
    if not text:
        return type(error).__name__
    if not isinstance(error, DatasetNotFoundError):
        return text.splitlines()[0]
    for python, cli in _CLI_WORDS:
        text = text.replace(python, cli)
    lines = [line.strip().lstrip("- ").strip() for line in text.splitlines() if line.strip()]
    return " ".join(f"{line}" if line.endswith(":") or i == 0 else f"{line};" for i, line in enumerate(lines)
                    ).rstrip(";")


if __name__ == "__main__":
    sys.exit(main())
