"""The CLI as a user meets it: help everywhere, one-line errors, init and status on a real state dir."""

from __future__ import annotations

import json
import os
import stat

import pytest
from sd_testutil import ROOT, run_cli

from selfdistill.cli import build_parser


def _commands(parser, prefix=()):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _commands(sub, prefix + (name,))


def test_every_command_has_help():
    cmds = list(_commands(build_parser()))
    names = {" ".join(c) for c, _ in cmds}
    for required in ("check", "init", "status", "run", "rounds", "promote", "rollback", "export", "report", "models prepare", "data export"):
        assert required in names
    for cmd, sub in cmds:
        assert sub.description, f"`selfdistill {' '.join(cmd)}` has no help text"
        for a in sub._actions:
            if a.dest != "help":
                assert a.help, f"`selfdistill {' '.join(cmd)}` argument {a.dest} has no help"


@pytest.mark.parametrize("cmd", [[], ["check"], ["run"], ["status"], ["models", "prepare"]])
def test_help_runs(cmd):
    r = run_cli(*cmd, "--help")
    assert r.returncode == 0 and "usage:" in r.stdout


def _policy(tmp_path, extra=""):
    p = tmp_path / "p.toml"
    p.write_text(f'state_dir = "state"\n[tasks]\nheldout_fraction = 0.25\n'
                 f'[[tasks.sources]]\ntype = "jsonl"\npath = "{ROOT / "policies/examples/tasks.jsonl"}"\n'
                 f'[evaluation]\nheldout_items = 10\n[gates]\ntest = "none"\n{extra}')
    return p


def test_init_and_status(tmp_path):
    p = _policy(tmp_path)
    r = run_cli("init", str(p), "--no-model")
    assert r.returncode == 0, r.stderr
    state = tmp_path / "state"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "selfdistill.db").st_mode) == 0o600
    r = run_cli("status", str(p), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    for key in ("current_checkpoint", "base_metrics", "rounds", "stopped_reason"):
        assert key in st
    assert st["current_checkpoint"] == "base"
    assert sum(st["tasks"].values()) == 60
    assert st["teacher_usage"] == {}
    r = run_cli("status", str(p))
    assert r.returncode == 0 and "current          base" in r.stdout and "teacher " not in r.stdout
    from selfdistill.store import Store

    store = Store.open(state / "selfdistill.db")
    store.add_teacher_usage(None, "t", "judge", "score", 5, 0, 40, 0.1)
    store.close()
    assert json.loads(run_cli("status", str(p), "--json").stdout)["teacher_usage"] == {
        "judge": {"requests": 5, "prompt_tokens": 0, "completion_tokens": 40, "tokens": 40}}
    assert "teacher          5 requests, 40 tokens  (judge 40)" in run_cli("status", str(p)).stdout
    r = run_cli("init", str(p), "--no-model")  # idempotent
    assert r.returncode == 0 and "'ingest_added': 0" in r.stdout


@pytest.mark.parametrize("setup,args,expected", [
    ("notwritable", ["init"], "state directory is not writable"),
    ("notsqlite", ["status"], "not an SQLite database"),
    ("missing", ["status"], "run `selfdistill init"),
    ("none", ["promote", "ckpt-9", "--reason", "x"], "no checkpoint ckpt-9"),
    ("levels", ["init"], "tasks.curriculum.level_field = 'num_terms': no training task has a number under that name "
                         "(numeric task fields found: none); name one of them, or remove the key"),
])
def test_errors_are_one_line(tmp_path, setup, args, expected):
    p = _policy(tmp_path)
    state = tmp_path / "state"
    if setup == "notwritable":
        ro = tmp_path / "ro"
        ro.mkdir()
        p = _policy(tmp_path, "")
        p.write_text(p.read_text().replace('state_dir = "state"', f'state_dir = "{ro}/sub/state"'))
        os.chmod(ro, 0o500)
        if os.geteuid() == 0:  # root ignores permission bits: use a path under a file instead
            os.chmod(ro, 0o700)
            (ro / "sub").write_text("a file where a directory should be")
    elif setup == "notsqlite":
        state.mkdir()
        (state / "selfdistill.db").write_text("garbage" * 100)
    elif setup == "none":
        assert run_cli("init", str(p), "--no-model").returncode == 0
    elif setup == "levels":  # the example tasks carry no level
        p = _policy(tmp_path, '[tasks.curriculum]\nlevel_field = "num_terms"\n')
    r = run_cli(*args[:1], str(p), *args[1:])
    assert r.returncode != 0
    assert expected in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
