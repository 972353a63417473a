"""The state directory: only a new, empty or selfdistill-owned directory is taken (and chmodded)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from selfdistill.errors import StateDirError
from selfdistill.service import MARKER, SUBDIRS, _refusal, check_state_dir_writable, prepare_state_dir

FOREIGN = ("not a selfdistill state directory (it holds other files and no .selfdistill-state marker); "
           "point state_dir at a new or empty directory")


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


# name: (files in the directory before, None: the directory does not exist), refused
CASES = {
    "new directory": (None, False),
    "empty directory": ([], False),
    "holds the marker": ([MARKER, "notes.txt"], False),
    "state of an earlier version": (["selfdistill.db", "checkpoints/"], False),
    "foreign files": (["notes.txt", "src/"], True),
    "only a stray lock file": (["lock"], True),
}


@pytest.mark.parametrize("name", CASES)
def test_prepare_state_dir(tmp_path, name):
    files, refused = CASES[name]
    state = tmp_path / "state"
    if files is not None:
        state.mkdir(mode=0o755)
        os.chmod(state, 0o755)
        for f in files:
            (state / f.rstrip("/")).mkdir() if f.endswith("/") else (state / f).write_text("x")
    if refused:
        before = sorted(os.listdir(state))
        with pytest.raises(StateDirError) as e:
            prepare_state_dir(state)
        assert str(e.value) == f"{state}: {FOREIGN}"
        assert _mode(state) == 0o755 and sorted(os.listdir(state)) == before
        return
    assert prepare_state_dir(state) == state
    assert _mode(state) == 0o700
    assert (state / MARKER).read_text().strip()
    assert all((state / sub).is_dir() for sub in SUBDIRS)
    assert prepare_state_dir(state) == state  # taken again once it is ours


def test_relative_state_dir_in_a_working_directory_is_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir(mode=0o755)
    (work / "policy.toml").write_text("x")
    monkeypatch.chdir(work)
    with pytest.raises(StateDirError, match=r"^\.: not a selfdistill state directory"):
        prepare_state_dir(Path("."))
    assert _mode(work) == 0o755 and not (work / MARKER).exists()


@pytest.mark.parametrize("which,what", [("tmp", "the system temp directory"), ("home", "the home directory")])
def test_shared_directories_are_refused_even_empty(tmp_path, monkeypatch, which, what):
    shared = tmp_path / which
    shared.mkdir(mode=0o755)
    # point the temp and home directories at empty stand-ins: a bug here must not chmod the real ones
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(StateDirError) as e:
        prepare_state_dir(shared)
    assert str(e.value).startswith(f"{shared}: state_dir is {what} itself; point state_dir at a directory of its own")
    assert _mode(shared) == 0o755 and os.listdir(shared) == []


def test_a_service_home_that_systemd_gave_as_its_state_directory_is_taken(tmp_path, monkeypatch):
    # the README's install: useradd --home /var/lib/selfdistill, StateDirectory=selfdistill, state_dir = that
    home = tmp_path / "var-lib-selfdistill"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert "the home directory" in _refusal(home)
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'other'}:{home}")
    assert _refusal(home) is None
    prepare_state_dir(home)
    assert (home / MARKER).is_file() and _mode(home) == 0o700
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))  # another directory given: the home stays refused
    assert "the home directory" in _refusal(home)


def test_filesystem_root_is_refused():
    # only the check: prepare_state_dir(Path("/")) would chmod / if the check were missing
    assert _refusal(Path("/")).startswith("/: state_dir is the filesystem root itself")


def test_writability_check_is_unchanged(tmp_path):
    check_state_dir_writable(tmp_path / "a" / "b")  # nothing exists yet: the nearest parent is writable
    assert not (tmp_path / "a").exists()
