"""``jaxleak audit run | status | report``: the audit's command line (``docs/audit.md``)."""

from __future__ import annotations

import json
import os
import sys


def cmd_audit_run(args) -> int:
    from jaxleak.audit.grid import load_audit, parse_shard
    from jaxleak.audit.runner import run_audit

    shard_of = parse_shard(args.shard)
    spec = load_audit(args.audit)  # a bad file fails here, before anything is written
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"--out {args.out} is a file, not a folder")
    if args.distributed:
        import jax

        jax.distributed.initialize()  # reads the coordinator from the environment (SLURM, TPU pods, ...)
    say = (lambda *a, **k: None) if args.quiet else print
    summary = run_audit(spec, args.out, shard_of=shard_of, data_dir=args.data_dir, weights_dir=args.weights_dir,
                        progress=not args.quiet, say=say, argv=sys.argv[1:])
    if not args.no_report:
        written = _report(args.out, ("html", "md", "json"))
        say(f"report: {written.get('html') or next(iter(written.values()), '')}")
    failed = summary["failed"]
    say(f"{summary['ran']} cells ran, {summary['done_before']} were done before, {len(failed)} failed"
        + (f" (see `jaxleak audit status {args.out}`)" if failed else ""))
    return 1 if failed else 0


def _report(out_dir: str, formats) -> dict[str, str]:
    from jaxleak.report.audit import write_report

    return write_report(out_dir, formats=tuple(formats))


def cmd_audit_status(args) -> int:
    from jaxleak.audit.runner import audit_status

    status = audit_status(args.dir)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    width = max((len(key) for key, _, _ in status["cells"]), default=10)
    for key, state, detail in status["cells"]:
        print(f"{key:<{width}}  {state:<8} {detail}".rstrip())
    counts = status["counts"]
    print(f"audit {status['name']}: {len(status['cells'])} cells: "
          + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 0


def cmd_audit_report(args) -> int:
    if not os.path.exists(os.path.join(args.dir, "audit.json")):
        raise FileNotFoundError(f"{args.dir} holds no audit.json (not an audit folder)")
    written = _report(args.dir, args.format)
    for path in written.values():
        print(f"wrote {path}")
    return 0


def add_audit_parsers(sub) -> None:
    """Adds ``audit run|status|report`` to the top-level subparsers ``sub``."""
    p = sub.add_parser("audit", help="run a grid of (dataset, victim, protocol, defense, attack, seed) cells "
                                     "resumably and report it (docs/audit.md)",
                       description="An audit file (TOML) names the grid; `run` runs it resumably (a rerun "
                                   "skips done cells), `status` says where it stands, `report` writes the "
                                   "HTML / Markdown / JSON report.")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    q = asub.add_parser("run", help="run (or resume) an audit",
                        description="Runs every cell not done yet; a failed cell records its error and the "
                                    "run goes on (exit 1 at the end). Writes the report when done.")
    q.add_argument("audit", help="the audit file (TOML; see docs/audit.md)")
    q.add_argument("--out", required=True, help="audit folder (created; a rerun resumes it)")
    q.add_argument("--shard", default="0/1", help="run only shard i of n (i/n): whole capture groups, "
                                                   "for several machines (a SLURM array index, ...)")
    q.add_argument("--data-dir", default=None, help="offline dataset copies (default: $JAXLEAK_DATA_DIR)")
    q.add_argument("--weights-dir", default=None, help="LPIPS weights (default: $JAXLEAK_WEIGHTS_DIR)")
    q.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host; the environment names the "
                        "coordinator)")
    q.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    q.add_argument("--quiet", action="store_true", help="no progress bars or per-cell lines")
    q.set_defaults(func=cmd_audit_run)

    q = asub.add_parser("status", help="what is done, running, stale, failed or missing")
    q.add_argument("dir", help="audit folder")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_audit_status)

    q = asub.add_parser("report", help="write the audit's report (HTML, Markdown, JSON)")
    q.add_argument("dir", help="audit folder")
    q.add_argument("--format", nargs="+", choices=("html", "md", "json"), default=["html", "md", "json"])
    q.set_defaults(func=cmd_audit_report)
