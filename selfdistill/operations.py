"""Maintenance operations on a state directory: set-up (`init`), task ingest, forced promotion,
rollback and export. They only use store transactions, so they are safe while the daemon runs
(a promotion in flight is a compare-and-set and yields to them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from selfdistill.config import BUNDLED_STUDENT, Policy
from selfdistill.errors import CheckpointError, PolicyError
from selfdistill.logs import log
from selfdistill.service import prepare_state_dir
from selfdistill.store import DB_NAME, Store


def open_state(policy: Policy) -> Store:
    prepare_state_dir(policy.state_dir)
    store = Store.create(policy.state_dir / DB_NAME)
    store.ensure_base_checkpoint()
    return store


def base_model_dir(policy: Policy, prepare: bool = False) -> Path:
    from selfdistill.models import prepare_bundled, resolve_base_model

    if prepare and policy.student.base_model == BUNDLED_STUDENT:
        return prepare_bundled()
    return resolve_base_model(policy.student.base_model)


def check_code_sandbox(policy: Policy, store: Store) -> None:
    """Refuse to run code tasks where their answers could not be isolated (scoring.code_sandbox = "isolated")."""
    if policy.scoring.code_sandbox != "isolated":
        return
    from selfdistill.scoring.sandbox import isolation_unavailable

    why = isolation_unavailable()
    if why is None:
        return
    n = store.count_code_tasks(policy.tasks.default_verifier == "code")
    if n:
        from selfdistill.scoring.verifiers import CODE_SANDBOX_FIX

        raise PolicyError(f"{n} task(s) use the code verifier, and {why}; {CODE_SANDBOX_FIX}")


def check_teacher_key(policy: Policy) -> None:
    """A teacher's API key file that is missing or open to other users: PolicyError (exit 2, one
    line), at `check` and at the daemon's start rather than at the first teacher call."""
    t = policy.teacher
    if t is None or t.kind != "openai" or t.endpoint is None or t.endpoint.api_key_file is None:
        return
    from selfdistill.engines.openai_compat import read_api_key
    from selfdistill.errors import EngineError

    try:
        read_api_key(t.endpoint)
    except (EngineError, OSError) as e:
        raise PolicyError(f"teacher.endpoint.api_key_file: {e}") from None


def ingest_tasks(policy: Policy, store: Store) -> dict[str, Any]:
    """Read every non-expansion source into the store (idempotent by task key)."""
    from selfdistill.tasks.sources import load_source

    tasks, problems = [], []
    for src in policy.tasks.sources:
        if src.type == "expansion":
            continue
        got, probs = load_source(src)
        tasks += got
        problems += probs
    for p in problems:
        log(f"task source problem: {p}", logging.WARNING, problem=p)
        store.event("task_problem", p, level="warning")
    added, existing = store.add_tasks(tasks, policy.tasks.heldout_fraction, policy.tasks.audit_fraction)
    check_levels(policy, store)
    return {"added": added, "existing": existing, "problems": len(problems)}


def check_levels(policy: Policy, store: Store) -> None:
    """A curriculum's `level_field` that no training task carries would gate nothing: refuse it, naming the fields there are."""
    from selfdistill.tasks.curriculum import level_field_names, level_state

    cur = policy.tasks.curriculum
    if cur.level_field is None:
        return
    pool = store.tasks(split="train")
    if not pool or level_state(pool, cur) is not None:
        return
    seen = level_field_names(pool[:200])
    raise PolicyError(f"tasks.curriculum.level_field = {cur.level_field!r}: no training task has a number under that name "
                      f"(numeric task fields found: {', '.join(seen) or 'none'}); name one of them, or remove the key")


def initialise(policy: Policy, prepare_model: bool = True) -> dict[str, Any]:
    from selfdistill.service import check_state_dir_writable

    check_state_dir_writable(policy.state_dir)
    model = str(base_model_dir(policy, prepare=True)) if prepare_model else None
    store = open_state(policy)
    try:
        counts = ingest_tasks(policy, store)
        return {"model": model, "tasks": store.count_tasks(), **{f"ingest_{k}": v for k, v in counts.items()}}
    finally:
        store.close()


def force_promote(policy: Policy, ckpt_id: str, reason: str) -> None:
    from selfdistill import checkpoints

    store = Store.open(policy.state_dir / DB_NAME)
    try:
        if store.checkpoint(ckpt_id) is None:
            raise CheckpointError(f"no checkpoint {ckpt_id}; `selfdistill status` lists them")
        checkpoints.promote(store, policy.state_dir, ckpt_id, f"forced: {reason}", kind="forced_promote")
    finally:
        store.close()


def rollback(policy: Policy, to: str | None, reason: str) -> str:
    from selfdistill import checkpoints

    store = Store.open(policy.state_dir / DB_NAME)
    try:
        cur = store.current_checkpoint().id
        if to is None:
            row = store.checkpoint(cur)
            parent = row.parent_id if row else None
            prow = store.checkpoint(parent) if parent else None
            to = checkpoints.rollback_target(cur, parent, bool(prow) and prow.status in ("promoted", "base"), store.promoted_chain())
        if store.checkpoint(to) is None:
            raise CheckpointError(f"no checkpoint {to}; `selfdistill status` lists them")
        checkpoints.rollback(store, policy.state_dir, to, reason)
        return to
    finally:
        store.close()


def export_current(policy: Policy, out: Path, merged: bool, checkpoint: str | None = None) -> Path:
    from selfdistill.export import export_adapter, export_merged

    store = Store.open(policy.state_dir / DB_NAME, readonly=True)
    try:
        ckpt = store.checkpoint(checkpoint) if checkpoint else store.current_checkpoint()
        if ckpt is None:
            raise CheckpointError(f"no checkpoint {checkpoint}; `selfdistill status` lists them")
        if ckpt.id == "base":
            raise CheckpointError("the base model is current: there is no adapter to export yet")
        if merged:
            return export_merged(base_model_dir(policy), Path(ckpt.path), out)
        return export_adapter(Path(ckpt.path), out)
    finally:
        store.close()


def export_training_data(policy: Policy, out: Path) -> list[Path]:
    from selfdistill.pairs import export_jsonl, export_sft_jsonl

    store = Store.open(policy.state_dir / DB_NAME, readonly=True)
    try:
        last = store.execute("SELECT coalesce(max(id), 0) FROM rounds").fetchone()[0]
        data = store.training_data(last, "all")
    finally:
        store.close()
    out.mkdir(parents=True, exist_ok=True)
    p1, p2 = out / "pairs.jsonl", out / "sft.jsonl"
    export_jsonl(data.pairs, p1, policy.student.system_prompt)
    export_sft_jsonl(data.sft, p2, policy.student.system_prompt)
    return [p1, p2]
