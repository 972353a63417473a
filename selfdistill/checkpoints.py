"""Adapter directories on disk: the only code that creates, renames, points at or deletes them.

Layout under the state directory:

    checkpoints/<id>/          one immutable LoRA adapter version (adapter_config.json +
                               adapter_model.safetensors + whatever the trainer saved beside them)
    checkpoints/<id>.tmp/      a version being written; renamed to <id>/ once complete
    checkpoints/base/          a marker directory: "serve the base model, no adapter"
    checkpoints/current        symlink -> "<id>" or "base" (relative, so the state dir can move)

A checkpoint is written to its `.tmp` sibling (`staging_dir`), checked and renamed into place
(`commit_checkpoint_dir`), and never written again. Promotion and rollback are one store
transaction followed by an atomic switch of `current` (a fresh symlink renamed over the old one,
then an fsync of the directory). The store commits first and is the truth: a crash between the
two leaves the pointer one step behind, and `repair_pointer` at start-up moves it to where the
store says. `cleanup_temp_dirs` (at start-up, under the daemon's lock, when no trainer can be
running) removes whatever a crash left half-written.

The store side of promotion is the `PromotionStore` protocol below; this module never touches
SQLite.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Protocol

from selfdistill.errors import CheckpointError
from selfdistill.service import hold_for_test

CHECKPOINTS = "checkpoints"
CURRENT = "current"
BASE = "base"
TMP_SUFFIX = ".tmp"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_RESERVED = {CURRENT, BASE}


class PromotionStore(Protocol):
    """What promotion and rollback need from the store (selfdistill.store.Store is one)."""

    def transaction(self) -> ContextManager[Any]:
        """One transaction; nested use joins the outer one."""
        ...

    def commit_promotion(self, ckpt_id: str, reason: str, round_id: int | None = None, kind: str = "promote",
                         expected_current: str | None = None) -> str:
        """Make `ckpt_id` current (compare-and-set against `expected_current` if given: raises
        PromotionSuperseded); return the id that was current."""
        ...

    def checkpoint(self, ckpt_id: str) -> Any:
        """The checkpoint's row (read by column name: `row["status"]`), or None."""
        ...


@dataclass(frozen=True)
class Switch:
    previous: str
    current: str


def checkpoints_dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / CHECKPOINTS


def checkpoint_path(state_dir: str | os.PathLike[str], ckpt_id: str) -> Path:
    _check_id(ckpt_id)
    return checkpoints_dir(state_dir) / ckpt_id


def _check_id(ckpt_id: str) -> None:
    if (
        not ckpt_id
        or ckpt_id in _RESERVED
        or ckpt_id.startswith(".")
        or ckpt_id.endswith(TMP_SUFFIX)
        or "/" in ckpt_id
        or os.sep in ckpt_id
    ):
        raise CheckpointError(
            f"{ckpt_id!r} is not a usable checkpoint id: use a plain name such as 'ckpt-000001' "
            f"(not {sorted(_RESERVED)}, no '/', no leading '.', no '{TMP_SUFFIX}' ending)"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_checkpoint_dir(state_dir: str | os.PathLike[str], ckpt_id: str) -> Path:
    """The final directory of a new checkpoint (not created: see `staging_dir`)."""
    final = checkpoint_path(state_dir, ckpt_id)
    if final.exists() or final.is_symlink():
        raise CheckpointError(f"{final}: checkpoint already exists and checkpoints are immutable; use a new id")
    final.parent.mkdir(parents=True, exist_ok=True)
    return final


def staging_dir(final: Path) -> Path:
    """A fresh, empty `<id>.tmp` sibling of `final` for the trainer to write into.

    A leftover from a failed earlier attempt at the same id is removed first: nothing in a
    `.tmp` directory is ever worth keeping.
    """
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint_dir(staging: Path, final: Path) -> Path:
    """Check a written adapter, flush it to disk and rename it into its final place."""
    verify_adapter_dir(staging)
    if final.exists():
        raise CheckpointError(f"{final}: checkpoint already exists and checkpoints are immutable; use a new id")
    # Flush file contents before the rename, so a crash cannot leave a complete-looking
    # directory of empty files.
    for p in staging.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(staging)
    os.rename(staging, final)
    _fsync_dir(final.parent)
    return final


def verify_adapter_dir(path: str | os.PathLike[str]) -> Path:
    """Raise CheckpointError unless `path` holds a complete LoRA adapter; return it.

    The safetensors header is parsed and the tensor extents checked against the file size, so a
    truncated copy is caught without loading any weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: checkpoint directory is missing; restore it, or reject/roll back the checkpoint "
            f"in the store (`selfdistill rollback`)"
        )
    cfg = path / ADAPTER_CONFIG
    try:
        json.loads(cfg.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg}: missing: the adapter directory is incomplete; retrain this checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e}); retrain this checkpoint") from None
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing: the adapter directory is incomplete; retrain this checkpoint")
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{weights}: truncated ({size} bytes); retrain this checkpoint")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{weights}: header length {n} exceeds the file ({size} bytes): truncated; retrain this checkpoint")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{weights}: unreadable safetensors header; retrain this checkpoint") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise CheckpointError(f"{weights}: holds no tensors; retrain this checkpoint")
    end = max(v["data_offsets"][1] for v in tensors.values())
    if 8 + n + end != size:
        raise CheckpointError(
            f"{weights}: tensors need {8 + n + end} bytes but the file has {size}: truncated or corrupt; retrain this checkpoint"
        )
    return path


def _ensure_base_marker(state_dir: str | os.PathLike[str]) -> Path:
    marker = checkpoints_dir(state_dir) / BASE
    if not marker.is_dir():
        marker.mkdir(parents=True)
        (marker / "README").write_text("`current` pointing here means: serve the base model, no adapter.\n")
    return marker


def switch_current(state_dir: str | os.PathLike[str], target: str) -> None:
    """Point `current` at checkpoint `target` (or 'base'), atomically and durably."""
    d = checkpoints_dir(state_dir)
    if target == BASE:
        _ensure_base_marker(state_dir)
    else:
        verify_adapter_dir(checkpoint_path(state_dir, target))
    tmp = d / f".{CURRENT}.{os.getpid()}{TMP_SUFFIX}"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, d / CURRENT)
    _fsync_dir(d)


def read_current(state_dir: str | os.PathLike[str]) -> str | None:
    """The id `current` points at ('base' for the base), or None when there is no pointer yet."""
    link = checkpoints_dir(state_dir) / CURRENT
    if not link.is_symlink():
        if link.exists():
            raise CheckpointError(f"{link}: expected a symlink; remove it and run `selfdistill check` to repair the pointer")
        return None
    return os.readlink(link)


def repair_pointer(state_dir: str | os.PathLike[str], store_current_id: str) -> str | None:
    """Make `current` agree with the store's current checkpoint; say what was repaired (None: nothing).

    Called at start-up: promotion and rollback commit the store first, so a crash in between
    leaves the pointer behind, and the store is the truth in either direction.
    """
    on_disk = read_current(state_dir)
    if on_disk == store_current_id:
        return None
    try:
        switch_current(state_dir, store_current_id)
    except CheckpointError as e:
        raise CheckpointError(
            f"the store says checkpoint {store_current_id!r} is current but it cannot be served ({e}); "
            f"restore its directory or roll back with `selfdistill rollback`"
        ) from None
    if on_disk is None and store_current_id == BASE:
        return None  # a fresh state's first start: nothing was wrong, so nothing to warn about
    return f"current pointer {on_disk or '(none)'} -> {store_current_id} (made to agree with the store)"


def promote(store: PromotionStore, state_dir: str | os.PathLike[str], ckpt_id: str, reason: str, *,
            kind: str = "promote", round_id: int | None = None, expected_current: str | None = None,
            also: Callable[[], None] | None = None) -> Switch:
    """The one way `current` moves: a round's promotion, a forced one, a rollback, a fallback.

    The adapter is checked first (a vanished or damaged one fails before the store records
    anything); then one store transaction records the switch, with whatever `also` writes beside
    it (the round's phase, say), compare-and-set against `expected_current` when given; then the
    pointer follows the store (repaired at start-up if a crash comes between the two).
    """
    if ckpt_id != BASE:
        servable_adapter_dir(state_dir, ckpt_id)
    with store.transaction():
        previous = store.commit_promotion(ckpt_id, reason, round_id=round_id, kind=kind, expected_current=expected_current)
        if also is not None:
            also()
    hold_for_test("promote:committed")  # a kill here leaves the pointer behind: repaired at start-up
    switch_current(state_dir, ckpt_id)
    return Switch(previous=previous, current=ckpt_id)


def rollback(store: PromotionStore, state_dir: str | os.PathLike[str], to_id: str, reason: str) -> Switch:
    """Serve `to_id` ('base' or an earlier promoted checkpoint) again."""
    row = store.checkpoint(to_id)
    if row is None or row["status"] not in ("base", "promoted"):
        raise CheckpointError(f"cannot roll back to {to_id}: only the base or an earlier promoted checkpoint can be served again")
    return promote(store, state_dir, to_id, reason, kind="rollback")


def rollback_target(current: str, parent: str | None, parent_servable: bool, promoted_chain: list[str]) -> str:
    """Where a rollback without a target goes: the current checkpoint's parent if it was promoted
    (or is the base), else the newest other promoted checkpoint."""
    if parent and parent_servable:
        return parent
    chain = [c for c in promoted_chain if c != current]
    if not chain:
        raise CheckpointError(f"{current} has no previous promoted checkpoint to roll back to")
    return chain[-1]


def retention(
    state_dir: str | os.PathLike[str],
    promoted_chain_ids: Iterable[str],
    rejected_ids_newest_first: list[str],
    keep_rejected: int,
) -> list[str]:
    """Delete the directories of rejected/failed checkpoints beyond the newest `keep_rejected`.

    Returns the ids whose directories are now gone (mark them 'deleted' in the store). The
    promoted chain, the current checkpoint and the base are never deleted, whatever the lists say.
    A directory is renamed to a `.tmp` name before it is removed, so a crash mid-delete leaves
    something `cleanup_temp_dirs` removes, never a half-deleted checkpoint that looks whole.
    """
    protected = set(promoted_chain_ids) | {BASE, read_current(state_dir)}
    deleted = []
    for ckpt_id in rejected_ids_newest_first[keep_rejected:]:
        if ckpt_id in protected:
            continue
        path = checkpoint_path(state_dir, ckpt_id)
        if path.exists():
            doomed = path.with_name(f"{ckpt_id}.deleted{TMP_SUFFIX}")
            os.rename(path, doomed)
            _fsync_dir(path.parent)
            shutil.rmtree(doomed)
        deleted.append(ckpt_id)
    return deleted


def discard_unrecorded(state_dir: str | os.PathLike[str], ckpt_id: str, recorded: bool) -> bool:
    """Remove checkpoint `ckpt_id`'s directory if the store never recorded it (a trainer finished
    its rename, then the daemon died before recording the result); returns whether it did.
    A recorded checkpoint is immutable and never touched here."""
    path = checkpoint_path(state_dir, ckpt_id)
    if recorded or not path.exists():
        return False
    doomed = path.with_name(f"{ckpt_id}.discarded{TMP_SUFFIX}")
    os.rename(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed)
    return True


def cleanup_temp_dirs(state_dir: str | os.PathLike[str]) -> list[str]:
    """Remove half-written entries a crash left in checkpoints/: `.tmp` names, and the hidden
    (dot-named) scratch and staging directories of a killed trainer; return their names.

    Only safe while no trainer is writing: the daemon calls it at start-up, under its lock.
    """
    d = checkpoints_dir(state_dir)
    if not d.is_dir():
        return []
    removed = []
    for entry in sorted(d.iterdir()):
        if not (entry.name.endswith(TMP_SUFFIX) or entry.name.startswith(".")):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    return removed


def servable_adapter_dir(state_dir: str | os.PathLike[str], ckpt_id: str) -> Path:
    """The one check before an adapter is served or evaluated: its directory, complete (raises
    CheckpointError naming what is wrong otherwise)."""
    return verify_adapter_dir(checkpoint_path(state_dir, ckpt_id))
