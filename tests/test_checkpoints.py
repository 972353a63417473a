"""Checkpoint directories and the `current` pointer, on a real filesystem (tmp_path)."""

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from selfdistill import checkpoints as ck
from selfdistill.errors import CheckpointError, PromotionSuperseded


def write_adapter(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    save_file({"a": np.ones((4, 8), np.float32), "b": np.zeros((8, 4), np.float32)}, str(path / "adapter_model.safetensors"))
    return path


def make_ckpt(state: Path, ckpt_id: str) -> Path:
    final = ck.new_checkpoint_dir(state, ckpt_id)
    return ck.commit_checkpoint_dir(write_adapter(ck.staging_dir(final)), final)


class FakeStore:
    """The PromotionStore protocol over a dict (the store is not what these tests are about)."""

    def __init__(self, current="base"):
        self.current = current
        self.promoted = {"base"}
        self.calls = []

    @contextlib.contextmanager
    def transaction(self):
        yield

    def commit_promotion(self, ckpt_id, reason, round_id=None, kind="promote", expected_current=None):
        if expected_current is not None and expected_current != self.current:
            raise PromotionSuperseded(f"{self.current} is current, not {expected_current}")
        self.calls.append((kind, ckpt_id, reason))
        prev, self.current = self.current, ckpt_id
        self.promoted.add(ckpt_id)
        return prev

    def checkpoint(self, ckpt_id):
        return {"id": ckpt_id, "status": "promoted" if ckpt_id in self.promoted else "candidate"}


def test_write_stage_commit(tmp_path):
    final = ck.new_checkpoint_dir(tmp_path, "ckpt-000001")
    assert final == tmp_path / "checkpoints" / "ckpt-000001" and not final.exists()
    staging = ck.staging_dir(final)
    assert staging.name == "ckpt-000001.tmp" and staging.is_dir()
    write_adapter(staging)
    assert ck.commit_checkpoint_dir(staging, final) == final
    assert not staging.exists()
    ck.verify_adapter_dir(final)
    with pytest.raises(CheckpointError, match="already exists and checkpoints are immutable"):
        ck.new_checkpoint_dir(tmp_path, "ckpt-000001")


def test_staging_dir_discards_a_failed_attempt(tmp_path):
    final = ck.new_checkpoint_dir(tmp_path, "c1")
    (ck.staging_dir(final) / "junk").write_text("half")
    assert list(ck.staging_dir(final).iterdir()) == []


def test_commit_refuses_an_incomplete_adapter(tmp_path):
    final = ck.new_checkpoint_dir(tmp_path, "c1")
    staging = ck.staging_dir(final)
    (staging / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: missing"):
        ck.commit_checkpoint_dir(staging, final)
    assert not final.exists()


@pytest.mark.parametrize("bad_id", ["", "current", "base", "x.tmp", ".hidden", "a/b"])
def test_unusable_ids(tmp_path, bad_id):
    with pytest.raises(CheckpointError, match="not a usable checkpoint id"):
        ck.new_checkpoint_dir(tmp_path, bad_id)


def _truncate(p: Path):
    w = p / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])


def _garbage_header(p: Path):
    (p / "adapter_model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")


def _no_tensors(p: Path):
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    (p / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: __import__("shutil").rmtree(p), "checkpoint directory is missing"),
        (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json: missing"),
        (lambda p: (p / "adapter_config.json").write_text("{nope"), "adapter_config.json: not valid JSON"),
        (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"abc"), "truncated .3 bytes"),
        (_truncate, "truncated or corrupt"),
        (_garbage_header, "header length 1000000000 exceeds the file"),
        (_no_tensors, "holds no tensors"),
    ],
)
def test_verify_adapter_dir(tmp_path, damage, message):
    p = write_adapter(tmp_path / "a")
    assert ck.verify_adapter_dir(p) == p
    damage(p)
    with pytest.raises(CheckpointError, match=message):
        ck.verify_adapter_dir(p)


def test_switch_and_read_current(tmp_path):
    assert ck.read_current(tmp_path) is None
    ck.switch_current(tmp_path, "base")
    assert ck.read_current(tmp_path) == "base"
    assert (tmp_path / "checkpoints" / "base").is_dir()
    make_ckpt(tmp_path, "c1")
    ck.switch_current(tmp_path, "c1")
    assert ck.read_current(tmp_path) == "c1"
    link = tmp_path / "checkpoints" / "current"
    assert os.readlink(link) == "c1"  # relative: the state directory can be moved
    assert (link / "adapter_config.json").is_file()
    with pytest.raises(CheckpointError, match="c2: checkpoint directory is missing"):
        ck.switch_current(tmp_path, "c2")
    assert ck.read_current(tmp_path) == "c1"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_switch_is_atomic_for_a_concurrent_reader(tmp_path):
    make_ckpt(tmp_path, "c1")
    ck.switch_current(tmp_path, "base")
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(ck.read_current(tmp_path))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        ck.switch_current(tmp_path, "c1" if i % 2 else "base")
    stop.set()
    t.join()
    assert seen <= {"base", "c1"}  # never None: the pointer is never missing


def test_a_plain_file_as_pointer_is_an_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "current").write_text("c1")
    with pytest.raises(CheckpointError, match="expected a symlink"):
        ck.read_current(tmp_path)


@pytest.mark.parametrize(
    "on_disk,store_says",
    [
        ("c1", "c2"),  # pointer behind the store (crash after a promotion's commit)
        ("c2", "c1"),  # pointer ahead of the store (crash after a rollback's commit)
        ("base", "c1"),
        ("c1", "base"),
        (None, "c1"),  # no pointer at all
    ],
)
def test_repair_pointer_in_both_directions(tmp_path, on_disk, store_says):
    make_ckpt(tmp_path, "c1")
    make_ckpt(tmp_path, "c2")
    if on_disk:
        ck.switch_current(tmp_path, on_disk)
    assert ck.repair_pointer(tmp_path, store_says) == f"current pointer {on_disk or '(none)'} -> {store_says} (made to agree with the store)"
    assert ck.read_current(tmp_path) == store_says
    assert ck.repair_pointer(tmp_path, store_says) is None


def test_a_fresh_state_gets_its_pointer_without_a_repair_warning(tmp_path):
    """The first start of a new state has no pointer and the store says base: the pointer is made,
    and nothing is reported as repaired (every `make demo` began with a warning before)."""
    assert ck.read_current(tmp_path) is None
    assert ck.repair_pointer(tmp_path, ck.BASE) is None
    assert ck.read_current(tmp_path) == ck.BASE


def test_repair_pointer_to_a_vanished_checkpoint_is_a_clear_error(tmp_path):
    ck.switch_current(tmp_path, "base")
    with pytest.raises(CheckpointError, match="the store says checkpoint 'c9' is current but it cannot be served .*selfdistill rollback"):
        ck.repair_pointer(tmp_path, "c9")
    assert ck.read_current(tmp_path) == "base"


def test_promote_and_rollback(tmp_path):
    make_ckpt(tmp_path, "c1")
    make_ckpt(tmp_path, "c2")
    ck.switch_current(tmp_path, "base")
    store = FakeStore("base")
    assert ck.promote(store, tmp_path, "c1", "gain +0.1") == ck.Switch("base", "c1")
    assert ck.promote(store, tmp_path, "c2", "gain +0.05") == ck.Switch("c1", "c2")
    assert ck.read_current(tmp_path) == "c2"
    assert ck.rollback(store, tmp_path, "c1", "regressed in audit") == ck.Switch("c2", "c1")
    assert ck.read_current(tmp_path) == store.current == "c1"
    assert ck.rollback(store, tmp_path, "base", "operator") == ck.Switch("c1", "base")
    assert ck.read_current(tmp_path) == "base"
    with pytest.raises(CheckpointError, match="only the base or an earlier promoted checkpoint"):
        ck.rollback(store, tmp_path, "c9", "never promoted")


def test_promotion_is_a_compare_and_set(tmp_path):
    make_ckpt(tmp_path, "c1")
    make_ckpt(tmp_path, "c2")
    store = FakeStore("c1")  # a rollback moved current to c1 while c2 was measured against base
    with pytest.raises(PromotionSuperseded):
        ck.promote(store, tmp_path, "c2", "gain", expected_current="base")
    assert store.current == "c1" and store.calls == [] and ck.read_current(tmp_path) is None


@pytest.mark.parametrize("current,parent,servable,chain,want", [
    ("c3", "c2", True, ["base", "c1", "c2", "c3"], "c2"),
    ("c3", "c2", False, ["base", "c1", "c3"], "c1"),
    ("c1", "base", True, ["base", "c1"], "base"),
])
def test_rollback_target(current, parent, servable, chain, want):
    assert ck.rollback_target(current, parent, servable, chain) == want


def test_rollback_target_without_history_is_a_clear_error():
    with pytest.raises(CheckpointError, match="no previous promoted checkpoint"):
        ck.rollback_target("base", None, False, ["base"])


def test_promoting_a_vanished_candidate_fails_before_the_store_commits(tmp_path):
    ck.switch_current(tmp_path, "base")
    store = FakeStore("base")
    with pytest.raises(CheckpointError, match=r"checkpoints/c7: checkpoint directory is missing; restore it"):
        ck.promote(store, tmp_path, "c7", "gain")
    assert store.calls == [] and ck.read_current(tmp_path) == "base"


def test_kill_between_store_commit_and_pointer_switch_is_repaired(tmp_path):
    make_ckpt(tmp_path, "c1")
    ck.switch_current(tmp_path, "base")
    store_file = tmp_path / "store.json"
    store_file.write_text(json.dumps({"current": "base"}))
    child = textwrap.dedent(
        f"""
        import json, os, signal
        from selfdistill import checkpoints as ck

        import contextlib

        class KilledStore:
            transaction = contextlib.nullcontext

            def commit_promotion(self, ckpt_id, reason, **kw):
                tmp = {str(store_file)!r} + ".new"
                with open(tmp, "w") as f:
                    json.dump({{"current": ckpt_id}}, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, {str(store_file)!r})
                os.kill(os.getpid(), signal.SIGKILL)  # the transaction is committed; nothing after runs

        ck.promote(KilledStore(), {str(tmp_path)!r}, "c1", "gain")
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    store_current = json.loads(store_file.read_text())["current"]
    assert store_current == "c1" and ck.read_current(tmp_path) == "base"
    assert "-> c1" in ck.repair_pointer(tmp_path, store_current)
    assert ck.read_current(tmp_path) == "c1"


@pytest.mark.parametrize(
    "on_disk,chain,rejected,keep,current,deleted",
    [
        (["r1", "r2", "r3", "r4"], [], ["r4", "r3", "r2", "r1"], 2, "base", ["r2", "r1"]),
        (["r1", "r2"], [], ["r2", "r1"], 3, "base", []),
        (["r1", "r2"], [], ["r2", "r1"], 0, "base", ["r2", "r1"]),
        # the promoted chain and current survive even if a list wrongly names them
        (["p1", "p2", "r1"], ["p1", "p2"], ["r1", "p2", "p1"], 0, "p2", ["r1"]),
        (["p1", "r1", "r2"], [], ["r2", "r1", "p1"], 1, "p1", ["r1"]),
        # already gone from disk (a crash after the delete, before the store learnt it): still reported
        (["r2"], [], ["r2", "r1"], 1, "base", ["r1"]),
    ],
)
def test_retention(tmp_path, on_disk, chain, rejected, keep, current, deleted):
    for c in on_disk:
        make_ckpt(tmp_path, c)
    ck.switch_current(tmp_path, current)
    assert ck.retention(tmp_path, chain, rejected, keep) == deleted
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name not in ("base", "current"))
    assert left == sorted(set(on_disk) - set(deleted))
    for c in left:
        ck.verify_adapter_dir(tmp_path / "checkpoints" / c)


def test_cleanup_temp_dirs(tmp_path):
    assert ck.cleanup_temp_dirs(tmp_path) == []
    make_ckpt(tmp_path, "c1")
    ck.switch_current(tmp_path, "c1")
    d = tmp_path / "checkpoints"
    write_adapter(ck.staging_dir(d / "c2"))  # trainer killed before the rename
    (d / "c0.deleted.tmp").mkdir()  # retention killed mid-delete
    os.symlink("c1", d / ".current.4242.tmp")  # switch killed before the replace
    assert ck.cleanup_temp_dirs(tmp_path) == [".current.4242.tmp", "c0.deleted.tmp", "c2.tmp"]
    assert sorted(p.name for p in d.iterdir()) == ["c1", "current"]
    assert ck.read_current(tmp_path) == "c1"
