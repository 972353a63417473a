"""The `selfdistill` command: thin subcommands over the library.

    selfdistill check POLICY            validate a policy file (nothing heavy is loaded)
    selfdistill init POLICY             state directory, database, bundled model, tasks
    selfdistill run POLICY              the daemon, in the foreground (what systemd runs)
    selfdistill status POLICY [--json]  current checkpoint, base metrics, rounds
    selfdistill rounds POLICY           one line per round
    selfdistill promote POLICY ID       force a candidate, with a reason
    selfdistill rollback POLICY [ID]    back to the previous promoted checkpoint (or ID)
    selfdistill export POLICY OUT       the current checkpoint as an adapter or a merged model
    selfdistill report POLICY           an HTML page with plots
    selfdistill data export POLICY OUT  pairs and SFT examples as JSONL in TRL's formats
    selfdistill models prepare          convert the bundled student once

Errors a user can meet print one line and exit non-zero; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from selfdistill.errors import SelfdistillError


def _policy(args: argparse.Namespace):
    from selfdistill.config import load_policy
    from selfdistill.scoring.anchors import check_policy_anchors

    policy = load_policy(args.policy)
    check_policy_anchors(policy, args.policy)
    return policy


def _open_store(policy, readonly: bool = False):
    from selfdistill.store import DB_NAME, Store

    return Store.open(policy.state_dir / DB_NAME, readonly=readonly)


# ---------------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from selfdistill.config import PolicyError, field_help, load_policy

    if args.schema:
        for key, typ, help_ in field_help():
            print(f"{key:48} {typ:18} {help_}")
        return 0
    bad = 0
    for path in args.policy:
        try:
            policy = load_policy(path)
            from selfdistill.gates import gate_can_pass
            from selfdistill.operations import check_teacher_key
            from selfdistill.scoring.anchors import check_policy_anchors

            check_policy_anchors(policy, path)
            check_teacher_key(policy)

            problems = gate_can_pass(policy)
            if problems:
                raise PolicyError("; ".join(f"{path}: {p}" for p in problems), problems)
        except PolicyError as e:
            bad += 1
            print(str(e), file=sys.stderr)
            continue
        print(f"{path}: ok")
    return 2 if bad else 0


def cmd_init(args: argparse.Namespace) -> int:
    from selfdistill.operations import initialise

    policy = _policy(args)
    summary = initialise(policy, prepare_model=not args.no_model)
    print(f"state directory {policy.state_dir} ready: {summary}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from selfdistill.daemon import Daemon
    from selfdistill.logs import setup_logging

    policy = _policy(args)
    setup_logging("human" if args.human else policy.logging.format, policy.logging.level)
    return Daemon(Path(args.policy), policy, burst=args.burst, max_rounds=args.max_rounds, progress=args.progress).run()


def status_dict(policy) -> dict[str, Any]:
    """The `status --json` document: a stable interface (see README, "Status JSON")."""
    store = _open_store(policy, readonly=True)
    try:
        cur = store.current_checkpoint()
        base_eval = store.latest_evaluation("base", "heldout")
        cur_eval = store.latest_evaluation(cur["id"], "heldout")
        audit = {k: store.latest_evaluation(c, "audit") for k, c in (("base", "base"), ("current", cur["id"]))}
        stop = store.events("stop", limit=1)
        rounds = [
            {
                "id": r["id"], "phase": r["phase"], "status": r["status"], "decision": r["decision"],
                "incumbent": r["incumbent_id"], "candidate": r["candidate_id"],
                "metrics": r["metrics"], "reasons": r["reasons"], "teacher_usage": store.teacher_usage(r["id"]),
                "started_at": r["started_at"], "finished_at": r["finished_at"],
            }
            for r in store.rounds()
        ]
        lock = policy.state_dir / "lock"
        return {
            "name": policy.name,
            "state_dir": str(policy.state_dir),
            "current_checkpoint": cur["id"],
            "audit_base_metrics": audit["base"]["metrics"] if audit["base"] else None,
            "audit_current_metrics": audit["current"]["metrics"] if audit["current"] else None,
            "base_metrics": base_eval["metrics"] if base_eval else None,
            "current_metrics": cur_eval["metrics"] if cur_eval else None,
            "tasks": store.count_tasks(),
            "teacher_usage": store.teacher_usage(),
            "rounds": rounds,
            "stopped_reason": stop[0]["message"] if stop else None,
            "daemon_pid": _lock_holder(lock),
        }
    finally:
        store.close()


def _lock_holder(lock: Path) -> int | None:
    import fcntl

    if not lock.exists():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it
    except OSError:
        txt = os.pread(fd, 32, 0).decode().strip()
        return int(txt) if txt.isdigit() else None
    finally:
        os.close(fd)


def _acc(m: dict | None) -> str:
    if not m or m.get("accuracy") is None:
        return "-"
    s = f"{m['accuracy']:.3f}"
    if m.get("ci_low") is not None:
        s += f" [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
    return s + f" n={m.get('n', '?')}"


def cmd_status(args: argparse.Namespace) -> int:
    st = status_dict(_policy(args))
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    print(f"service          {st['name']}  (state {st['state_dir']})")
    print(f"daemon           {'running, PID ' + str(st['daemon_pid']) if st['daemon_pid'] else 'not running'}")
    print(f"current          {st['current_checkpoint']}")
    if st["audit_base_metrics"]:  # the figure nothing was chosen on, first
        print(f"audit base       {_acc(st['audit_base_metrics'])}")
        print(f"audit current    {_acc(st['audit_current_metrics'])}")
    print(f"base accuracy    {_acc(st['base_metrics'])}")
    print(f"current accuracy {_acc(st['current_metrics'])}")
    print(f"tasks            {', '.join(f'{k} {v}' for k, v in sorted(st['tasks'].items())) or 'none'}")
    last = st["rounds"][-1] if st["rounds"] else None
    print(f"rounds           {len(st['rounds'])}" + (f"  (last: #{last['id']} {last['phase']} {last['decision'] or ''})" if last else ""))
    if st["teacher_usage"]:
        used = st["teacher_usage"]
        print(f"teacher          {sum(u['requests'] for u in used.values())} requests, {sum(u['tokens'] for u in used.values())} tokens  ("
              + ", ".join(f"{k} {u['tokens']}" for k, u in used.items()) + ")")
    if st["stopped_reason"]:
        print(f"stopped          {st['stopped_reason']}")
    return 0


def cmd_rounds(args: argparse.Namespace) -> int:
    st = status_dict(_policy(args))
    print(f"{'round':>5}  {'phase':9} {'status':8} {'decision':9} {'incumbent':12} {'candidate':12} {'inc acc':>8} {'cand acc':>8} {'p':>7}  reasons")
    for r in st["rounds"]:
        m = r["metrics"] or {}
        f = lambda k: f"{m[k]:.3f}" if isinstance(m.get(k), (int, float)) else "-"  # noqa: E731
        print(f"{r['id']:>5}  {r['phase']:9} {r['status']:8} {r['decision'] or '-':9} {r['incumbent'] or '-':12} {r['candidate'] or '-':12} "
              f"{f('incumbent_accuracy'):>8} {f('candidate_accuracy'):>8} {f('p_value'):>7}  {'; '.join(r['reasons'] or [])}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from selfdistill.operations import force_promote

    policy = _policy(args)
    force_promote(policy, args.checkpoint, args.reason)
    print(f"{args.checkpoint} is now current ({args.reason})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from selfdistill.operations import rollback

    policy = _policy(args)
    to = rollback(policy, args.to, args.reason)
    print(f"rolled back: {to} is now current")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from selfdistill.operations import export_current

    policy = _policy(args)
    out = export_current(policy, Path(args.out), merged=args.merged, checkpoint=args.checkpoint)
    print(f"exported to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from selfdistill.report import write_report

    policy = _policy(args)
    out = write_report(policy, Path(args.out) if args.out else None)
    print(f"report written to {out}")
    return 0


def cmd_data_export(args: argparse.Namespace) -> int:
    from selfdistill.operations import export_training_data

    policy = _policy(args)
    paths = export_training_data(policy, Path(args.out))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from selfdistill.models import prepare_bundled

    t = time.time()
    out = prepare_bundled(Path(args.cache_dir) if args.cache_dir else None, force=args.force)
    print(f"bundled student ready in {out} ({time.time() - t:.1f}s)")
    return 0


def cmd_queries(args: argparse.Namespace) -> int:
    from selfdistill.store import canned_queries, sql_dir

    if args.name is None:
        for name in canned_queries():
            print(f"{name:16} {sql_dir() / 'queries' / (name + '.sql')}")
        return 0
    qs = canned_queries()
    if args.name not in qs:
        raise SelfdistillError(f"no canned query named {args.name!r}; choose one of: {', '.join(qs)}")
    store = _open_store(_policy(args), readonly=True)
    rows = store.query(qs[args.name])
    if rows:
        print("\t".join(rows[0].keys()))
        for r in rows:
            print("\t".join("" if v is None else str(v) for v in r.values()))
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfdistill", description="Improve a small language model round after round, as a service.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="run `selfdistill COMMAND --help` for its options")

    def add(name: str, func, help_: str, policy: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if policy:
            sp.add_argument("policy", help="policy file (TOML), e.g. policies/cpu-demo.toml")
        sp.set_defaults(func=func)
        return sp

    sp = sub.add_parser("check", help="validate policy files without loading anything heavy",
                        description="Validate policy files; print every problem at once. Exit 0 if all are valid, 2 otherwise.")
    sp.add_argument("policy", nargs="*", help="policy files (TOML)")
    sp.add_argument("--schema", action="store_true", help="print every policy key with its type and help")
    sp.set_defaults(func=cmd_check)

    sp = add("init", cmd_init, "create the state directory and database, prepare the bundled model, ingest tasks")
    sp.add_argument("--no-model", action="store_true", help="skip preparing the bundled student")

    sp = add("run", cmd_run, "run the daemon in the foreground (SIGTERM: warm stop; twice: cold stop; SIGHUP: reload)")
    sp.add_argument("--burst", action="store_true", help="run until there is nothing left to do, then exit")
    sp.add_argument("--max-rounds", type=int, default=None, help="stop after this many decided rounds")
    sp.add_argument("--human", action="store_true", help="human-readable logs instead of JSON lines")
    sp.add_argument("--progress", action="store_true", help="print a progress line per phase on stdout")

    sp = add("status", cmd_status, "show the current checkpoint, base metrics and rounds (safe while the daemon runs)")
    sp.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")

    add("rounds", cmd_rounds, "list rounds with their phase, decision and numbers")

    sp = add("promote", cmd_promote, "force a candidate checkpoint to be current, with a recorded reason")
    sp.add_argument("checkpoint", help="checkpoint id, e.g. ckpt-000003")
    sp.add_argument("--reason", required=True, help="why the gates are overridden (recorded)")

    sp = add("rollback", cmd_rollback, "return to the previous promoted checkpoint (or a named one)")
    sp.add_argument("--to", default=None, help="checkpoint id to return to (default: the previous promoted one)")
    sp.add_argument("--reason", default="manual rollback", help="recorded reason")

    sp = add("export", cmd_export, "write the current checkpoint as a standalone adapter or merged into the base")
    sp.add_argument("out", help="output directory (must not exist)")
    sp.add_argument("--merged", action="store_true", help="merge the adapter into the base model")
    sp.add_argument("--checkpoint", default=None, help="export this checkpoint instead of the current one")

    sp = add("report", cmd_report, "write an HTML report with plots")
    sp.add_argument("--out", default=None, help="output file (default STATE/reports/report.html)")

    sp = add("queries", cmd_queries, "list the canned monitoring queries, or run one")
    sp.add_argument("name", nargs="?", default=None, help="query name (see the list)")

    data = sub.add_parser("data", help="training data commands", description="Training data commands.")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND", help="what to do with the training data")
    sp = dsub.add_parser("export", help="write pairs and SFT examples as JSONL in TRL's formats",
                         description="Write pairs (prompt/chosen/rejected) and SFT examples (messages) as JSONL, held-out tasks excluded.")
    sp.add_argument("policy", help="policy file (TOML)")
    sp.add_argument("out", help="output directory")
    sp.set_defaults(func=cmd_data_export)

    models = sub.add_parser("models", help="local model commands", description="Local model commands.")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND", help="what to do with local models")
    sp = msub.add_parser("prepare", help="convert the bundled SmolLM2-135M-Instruct GGUF into a Hugging Face directory (once)",
                         description="Convert the bundled SmolLM2-135M-Instruct GGUF into a Hugging Face directory, once; "
                         "a no-op when already prepared.")
    sp.add_argument("--cache-dir", default=None, help="where to put it (default $SELFDISTILL_CACHE or ~/.cache/selfdistill)")
    sp.add_argument("--force", action="store_true", help="convert again even if prepared")
    sp.set_defaults(func=cmd_models_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SelfdistillError as e:
        if args.debug:
            raise
        msg = str(e)
        print(f"error: {msg}" if "\n" not in msg else msg, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # an unexpected failure: still one line unless --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1
