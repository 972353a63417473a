"""When the cycle trains, idles or starts a phase: the training trigger, the time windows, the
per-round sampling seed, and the prediction of how long the next phases will take.

Pure: standard library and the policy's models only. The daemon owns the clock and the
scheduler's jobs; these functions only decide.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from typing import Iterable, Sequence

from selfdistill.config import ScheduleConfig, TimeWindow


def _minutes(hhmm: str) -> int:
    return int(hhmm[:2]) * 60 + int(hhmm[3:])


def in_windows(windows: Sequence[TimeWindow], now: time.struct_time) -> bool:
    """Is local time `now` inside one of the windows (a window may wrap past midnight)?"""
    m = now.tm_hour * 60 + now.tm_min
    for w in windows:
        a, b = _minutes(w.start), _minutes(w.end)
        if (a <= m < b) if a <= b else (m >= a or m < b):
            return True
    return False


def seconds_until_window(windows: Sequence[TimeWindow], now: time.struct_time) -> float:
    """Seconds from `now` until the next window opens (0 inside one)."""
    if not windows or in_windows(windows, now):
        return 0.0
    m = now.tm_hour * 60 + now.tm_min + now.tm_sec / 60
    waits = [((_minutes(w.start) - m) % (24 * 60)) * 60 for w in windows]
    return min(waits)


def idle_outside_windows(s: ScheduleConfig, now: time.struct_time) -> bool:
    """Should the cycle do nothing at all now (policy `outside_windows = "idle"`, no window open)?"""
    return bool(s.train_windows) and s.outside_windows == "idle" and not in_windows(s.train_windows, now)


def train_due(s: ScheduleConfig, *, new_data: int, requested: bool, now: time.struct_time) -> tuple[bool, str]:
    """Does this round train? (yes/no, and why). `requested`: an interval or cron trigger fired
    since the last training; `new_data`: pairs + SFT examples not yet used by any training."""
    if s.train_windows and not in_windows(s.train_windows, now):
        return False, "outside the training windows"
    if s.train_cron or s.train_interval_s:
        if requested:
            return True, "schedule"
        if s.train_min_new_pairs and new_data >= s.train_min_new_pairs:
            return True, f"{new_data} new pairs+examples"
        return False, "waiting for the training schedule"
    if new_data >= s.train_min_new_pairs:
        return True, f"{new_data} new pairs+examples"
    return False, f"{new_data} new pairs+examples < {s.train_min_new_pairs}"


def round_seed(seed: int, round_id: int) -> int:
    """The sampling seed of one round: the policy's seed and the round, mixed, so that a task
    sampled again under an unchanged incumbent gets fresh answers, and a rerun of the same round
    (after a crash) gets the same ones."""
    digest = hashlib.sha256(f"{seed}:{round_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def predicted_seconds(history: Iterable[dict], phases: Iterable[str], recent: int = 3) -> float | None:
    """How long `phases` will take, from the median of each one's last `recent` durations in the
    phases table (rows with `phase` and `duration_s`); a phase that never ran counts nothing
    (promote runs only on promotions), and None means none of them ever ran: no prediction."""
    rows = list(history)
    total, known = 0.0, False
    for name in phases:
        ds = [r["duration_s"] for r in rows if r["phase"] == name and r.get("duration_s") is not None][-recent:]
        if ds:
            total += statistics.median(ds)
            known = True
    return total if known else None
