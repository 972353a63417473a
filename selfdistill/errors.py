"""The error hierarchy: every error a user can meet is a SelfdistillError whose message is one
line naming the thing and the fix. The CLI prints it and exits with its `exit_code`."""

from __future__ import annotations


class SelfdistillError(Exception):
    """Base of every error a user can meet. The message is the one line the CLI prints."""

    exit_code = 1


class PolicyError(SelfdistillError):
    """A policy file is unreadable, not TOML, or fails validation (every problem in one message)."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class StoreError(SelfdistillError):
    """The database is missing, foreign, corrupt, newer than this code, or not writable."""

    exit_code = 3


class StateDirError(SelfdistillError):
    """The state directory cannot be created, written, or is locked by another daemon."""

    exit_code = 3


class ModelError(SelfdistillError):
    """A model or adapter directory is missing, not a model, half-written or for another base."""

    exit_code = 4


class EngineError(SelfdistillError):
    """Generation failed: a prompt too long, a server that hangs or answers garbage."""

    exit_code = 5


class TeacherBudgetSpent(EngineError):
    """The teacher's token budget (stopping.max_teacher_tokens) is spent: no more teacher calls."""


class TaskSourceError(SelfdistillError):
    """A task source cannot be read (missing file, unknown reasoning-gym dataset)."""

    exit_code = 2


class TrainingError(SelfdistillError):
    """A training round failed (NaN loss, collapsed margin, killed child, full disk)."""

    exit_code = 6


class CheckpointError(SelfdistillError):
    """A checkpoint directory is missing, half-written, or a promotion/rollback is impossible."""

    exit_code = 7


class PromotionSuperseded(CheckpointError):
    """A promotion expected one checkpoint to be current and found another (a rollback or a
    forced promotion happened meanwhile); nothing was changed."""


class StoppedByPolicy(SelfdistillError):
    """Raised nowhere as an error; carries the exit code the daemon uses when a policy stops it."""

    exit_code = 10
