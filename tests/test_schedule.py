"""The schedule's rules (pure), and the daemon's trigger jobs built from them."""

from __future__ import annotations

import datetime
import time

import pytest

from selfdistill.config import ScheduleConfig, TimeWindow, parse_policy
from selfdistill.schedule import (
    idle_outside_windows,
    in_windows,
    predicted_seconds,
    round_seed,
    seconds_until_window,
    train_due,
)


def at(hh: int, mm: int = 0) -> time.struct_time:
    return time.struct_time((2026, 12, 2, hh, mm, 0, 2, 336, 0))


NIGHT = [TimeWindow(start="19:00", end="07:00")]
NOON = [TimeWindow(start="11:30", end="13:00")]


@pytest.mark.parametrize("windows,now,inside", [
    (NIGHT, at(23), True), (NIGHT, at(3), True), (NIGHT, at(7), False), (NIGHT, at(18, 59), False), (NIGHT, at(19), True),
    (NOON, at(11, 30), True), (NOON, at(12, 59), True), (NOON, at(13), False), ([], at(12), False),
    (NOON + NIGHT, at(20), True),
])
def test_in_windows(windows, now, inside):
    assert in_windows(windows, now) is inside


@pytest.mark.parametrize("windows,now,wait_s", [
    (NIGHT, at(18), 3600), (NIGHT, at(23), 0), (NOON, at(13), 22.5 * 3600), (NOON + NIGHT, at(10), 5400), ([], at(1), 0),
])
def test_seconds_until_window(windows, now, wait_s):
    assert seconds_until_window(windows, now) == wait_s


@pytest.mark.parametrize("cfg,new,requested,now,due,why", [
    ({}, 0, False, at(12), True, "0 new pairs+examples"),
    ({"train_min_new_pairs": 100}, 99, False, at(12), False, "99 new pairs+examples < 100"),
    ({"train_min_new_pairs": 100}, 100, False, at(12), True, "100 new pairs+examples"),
    ({"train_interval_s": 60}, 10**6, False, at(12), False, "waiting for the training schedule"),
    ({"train_interval_s": 60}, 0, True, at(12), True, "schedule"),
    ({"train_cron": "0 3 * * *", "train_min_new_pairs": 50}, 50, False, at(12), True, "50 new pairs+examples"),
    ({"train_windows": [{"start": "19:00", "end": "07:00"}]}, 10, True, at(12), False, "outside the training windows"),
    ({"train_windows": [{"start": "19:00", "end": "07:00"}]}, 10, False, at(22), True, "10 new pairs+examples"),
])
def test_train_due(cfg, new, requested, now, due, why):
    assert train_due(ScheduleConfig(**cfg), new_data=new, requested=requested, now=now) == (due, why)


def test_idle_outside_windows_only_when_asked():
    night = {"train_windows": [{"start": "19:00", "end": "07:00"}]}
    assert idle_outside_windows(ScheduleConfig(**night, outside_windows="idle"), at(12))
    assert not idle_outside_windows(ScheduleConfig(**night, outside_windows="idle"), at(23))
    assert not idle_outside_windows(ScheduleConfig(**night), at(12))  # "collect" is the default


def test_round_seed_differs_by_round_and_repeats_for_a_rerun():
    seeds = [round_seed(0, r) for r in range(1, 200)]
    assert len(set(seeds)) == len(seeds) and round_seed(0, 5) == round_seed(0, 5) != round_seed(1, 5)
    assert all(0 <= s < 2**31 for s in seeds)


def test_predicted_seconds_is_the_median_of_recent_phase_times():
    hist = [{"phase": "train", "duration_s": d} for d in (900, 100, 110, 120)] + [{"phase": "evaluate", "duration_s": 30}]
    assert predicted_seconds(hist, ["train", "evaluate", "promote"]) == 110 + 30  # promote never ran: counts 0
    assert predicted_seconds(hist, ["generate"]) is None


def test_the_daemon_builds_interval_and_cron_jobs_and_rebuilds_them_on_reload(tmp_path):
    from apscheduler.schedulers.background import BackgroundScheduler

    from selfdistill.daemon import Daemon

    def policy(schedule):
        return parse_policy({"state_dir": str(tmp_path), "tasks": {"sources": [{"type": "jsonl", "path": "x"}]},
                             "schedule": schedule})

    d = Daemon(tmp_path / "p.toml", policy({"train_cron": "30 2 * * *", "train_interval_s": 90}))
    d.scheduler = BackgroundScheduler(executors={"flags": {"type": "threadpool", "max_workers": 1}})
    d._schedule_jobs()
    jobs = {j.id: j for j in d.scheduler.get_jobs()}
    assert set(jobs) == {"train-cron", "train-interval", "housekeeping"}
    now = datetime.datetime.now().astimezone()
    cron_next = jobs["train-cron"].trigger.get_next_fire_time(None, now)
    assert (cron_next.hour, cron_next.minute) == (2, 30) and cron_next > now
    assert jobs["train-interval"].trigger.interval == datetime.timedelta(seconds=90)
    d._request_train()
    assert d.run_state.train_requested
    from apscheduler.triggers.interval import IntervalTrigger

    d.scheduler.add_job(d._cycle_job, IntervalTrigger(seconds=5.0), id="cycle")
    d.policy = policy({"train_interval_s": 30, "idle_sleep_s": 0.5})
    d._schedule_jobs()
    assert {j.id for j in d.scheduler.get_jobs()} == {"train-interval", "housekeeping", "cycle"}
    assert d.scheduler.get_job("cycle").trigger.interval == datetime.timedelta(seconds=0.5)  # idle_sleep_s applies on reload
