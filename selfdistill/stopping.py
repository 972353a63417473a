"""Stopping policies: a pure function from what has happened so far to "stop, and why".

The daemon builds a `Progress` after every phase and calls `should_stop`. Pure: standard library
only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selfdistill.config import StoppingConfig


@dataclass
class Progress:
    decided_rounds: int = 0  # rounds that reached a decision (promote/reject/fail/skip), across restarts
    wall_s: float = 0.0  # seconds since this run started
    generated_tokens: int = 0  # all tokens ever generated into the store
    teacher_tokens: int = 0  # all tokens the teacher was asked for (teacher_usage), across restarts
    incumbent_accuracy: float | None = None  # held-out accuracy of the current checkpoint
    decisions: list[str] = field(default_factory=list)  # decisions of trained rounds, oldest first
    regressions: int = 0  # rounds whose candidate scored below its incumbent
    tasks_exhausted: bool = False
    stop_file_present: bool = False
    signal_received: bool = False


def should_stop(p: Progress, cfg: StoppingConfig) -> str | None:
    """The reason to stop now, or None. Checked in a fixed order so the reason is predictable."""
    if p.signal_received:
        return "signal: warm stop requested"
    if p.stop_file_present:
        return f"stop file: {cfg.stop_file} present in the state directory"
    if cfg.target_accuracy is not None and p.incumbent_accuracy is not None and p.incumbent_accuracy >= cfg.target_accuracy:
        return f"target reached: held-out accuracy {p.incumbent_accuracy:.3f} >= {cfg.target_accuracy}"
    if cfg.max_rounds is not None and p.decided_rounds >= cfg.max_rounds:
        return f"max rounds: {p.decided_rounds} rounds decided (limit {cfg.max_rounds})"
    if cfg.max_wall_s is not None and p.wall_s >= cfg.max_wall_s:
        return f"wall clock: {p.wall_s:.0f}s elapsed (limit {cfg.max_wall_s:.0f}s)"
    if cfg.max_generated_tokens is not None and p.generated_tokens >= cfg.max_generated_tokens:
        return f"token budget: {p.generated_tokens} tokens generated (limit {cfg.max_generated_tokens})"
    if cfg.max_teacher_tokens is not None and p.teacher_tokens >= cfg.max_teacher_tokens:
        return f"teacher budget: {p.teacher_tokens} teacher tokens used (limit {cfg.max_teacher_tokens})"
    if cfg.plateau_rounds is not None:
        tail = [d for d in p.decisions if d in ("promote", "reject")][-cfg.plateau_rounds:]
        if len(tail) == cfg.plateau_rounds and all(d == "reject" for d in tail):
            return f"plateau: the last {cfg.plateau_rounds} rounds were rejected"
    if cfg.max_regressions is not None and p.regressions >= cfg.max_regressions:
        return f"regressions: {p.regressions} candidates did worse than their incumbent (limit {cfg.max_regressions})"
    if cfg.stop_when_tasks_exhausted and p.tasks_exhausted:
        return "tasks exhausted: no training task can be sampled any more"
    return None
