"""The daemon process: `selfdistill run`. It owns the single-instance lock, the environment of
the libraries, the signal handlers, the scheduler, policy reloads, the disk-full pause and
sd_notify; `selfdistill.cycle` does the work.

Scheduling is APScheduler 3.x: the cycle is one job that never overlaps itself; interval/cron
training triggers and housekeeping are jobs that only set flags the cycle reads. The main thread
only waits, handles signals and feeds systemd's watchdog, and only while the cycle is making
progress (a phase that stands still for longer than the watchdog period is a wedged cycle, and
systemd is left to restart it). SIGTERM/SIGINT = warm stop (a trained candidate is still
evaluated and decided, then the run ends, exit 0), a second one = cold stop (kill the training
child's process group, exit 128+signal), SIGHUP = reload the policy (applied at the next round
boundary; keys that need a restart are refused, each with its reason).

Exit codes: 0 warm stop or `--burst`/`--max-rounds` done; 10 stopped by a policy in the file;
other non-zero codes are errors (see selfdistill.errors).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from selfdistill.config import Policy, load_policy, reload_plan
from selfdistill.cycle import Cycle, RunState, StopRequested, Waiting, is_disk_full
from selfdistill.errors import PolicyError, SelfdistillError, StoppedByPolicy
from selfdistill.logs import log
from selfdistill.operations import check_code_sandbox, check_teacher_key, ingest_tasks, open_state
from selfdistill.service import StateLock, prepare_state_dir, sd_notify, watchdog_interval_s
from selfdistill.store import DB_NAME, Store

EXIT_POLICY = StoppedByPolicy.exit_code


class Daemon:
    """`selfdistill run`: lock, scheduler, signals, sd_notify; the Cycle does the work."""

    def __init__(self, policy_path: Path, policy: Policy, burst: bool = False, max_rounds: int | None = None, progress: bool = False):
        self.policy_path = policy_path
        self.policy = policy
        self.burst = burst
        self.max_rounds = max_rounds
        self.progress = progress
        self.run_state = RunState()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.cycle: Cycle | None = None
        self._signals = 0
        self.scheduler = None

    # signals -------------------------------------------------------------------------------

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        if self._signals == 1:
            log("warm stop requested: finishing the current step", signal=signal.Signals(signum).name)
            sd_notify("STOPPING=1")
            self.run_state.warm_stop.set()
        else:
            log("cold stop: killing the training child and exiting", logging.WARNING, signal=signal.Signals(signum).name)
            self.run_state.cold_stop.set()
            pid = self.cycle.training_child_pid if self.cycle else None
            if pid:
                from selfdistill.training.child import kill_group

                kill_group(pid)
            os._exit(128 + signum)

    def _on_hup(self, signum: int, frame: Any) -> None:
        threading.Thread(target=self.reload, name="reload", daemon=True).start()

    def reload(self) -> bool:
        """Re-read the policy; the new one is swapped in at the next round boundary, with every
        key that needs a restart kept at its running value and named with its reason."""
        try:
            new = load_policy(self.policy_path)
            from selfdistill.scoring.anchors import check_policy_anchors

            check_policy_anchors(new, str(self.policy_path))
            plan = reload_plan(self.policy, new)
        except PolicyError as e:
            log("reload refused: the policy file is invalid; the old policy keeps running", logging.ERROR, error=str(e))
            self._event("reload_refused", f"invalid policy: {e}", "error")
            return False
        if plan.refused:
            why = "; ".join(f"{k} ({r})" for k, r in plan.refused)
            log("reload: some changes need a restart and were not applied", logging.WARNING, refused=[k for k, _ in plan.refused])
            self._event("reload_partial", f"not applied (restart needed): {why}", "warning")
        self.policy = plan.policy
        if self.cycle is not None:
            self.cycle.offer_policy(plan.policy)
        log("policy reloaded", applied=plan.applied)
        self._event("reload", f"applied at the next round boundary: {', '.join(plan.applied) or 'nothing changed'}", "info")
        if self.scheduler is not None:
            self._schedule_jobs()
        return True

    def _event(self, kind: str, msg: str, level: str) -> None:
        try:
            store = Store.open(self.policy.state_dir / DB_NAME)
            try:
                store.event(kind, msg, level=level)
            finally:
                store.close()
        except SelfdistillError:
            pass

    # scheduling ----------------------------------------------------------------------------

    def _schedule_jobs(self) -> None:
        """(Re)create the trigger jobs from the policy's [schedule]: they only set flags."""
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        s = self.policy.schedule
        sch = self.scheduler
        for job_id in ("train-interval", "train-cron", "housekeeping"):
            if sch.get_job(job_id):
                sch.remove_job(job_id)
        if s.train_interval_s:
            sch.add_job(self._request_train, IntervalTrigger(seconds=s.train_interval_s), id="train-interval", executor="flags")
        if s.train_cron:
            sch.add_job(self._request_train, CronTrigger.from_crontab(s.train_cron), id="train-cron", executor="flags")
        sch.add_job(self._request_housekeeping, IntervalTrigger(seconds=s.housekeeping_interval_s), id="housekeeping", executor="flags")
        cycle = sch.get_job("cycle")
        if cycle is not None and cycle.trigger.interval.total_seconds() != max(s.idle_sleep_s, 0.01):
            sch.reschedule_job("cycle", trigger=IntervalTrigger(seconds=max(s.idle_sleep_s, 0.01)))

    def _request_train(self) -> None:
        log("training requested by the schedule")
        self.run_state.train_requested = True

    def _request_housekeeping(self) -> None:
        self.run_state.housekeeping_requested = True

    def _cycle_job(self) -> None:
        """One scheduled pass: rounds back to back (upkeep in between when asked) until a round
        only collected data without training, there is nothing to do, or the run stops. Never
        overlaps itself; the scheduler starts the next pass `schedule.idle_sleep_s` later."""
        if self.done.is_set():
            return
        cyc = self.cycle
        try:
            while True:
                if self.run_state.housekeeping_requested:
                    self.run_state.housekeeping_requested = False
                    cyc.housekeeping()
                rnd = cyc.run_round()
                cyc.check_stop()
                if rnd.decision == "collect" and not self.burst:
                    return  # idle until the scheduler's next pass (or a training trigger)
        except Waiting:
            return
        except StopRequested as e:
            log("stopping", reason=str(e))
            self.done.set()
        except BaseException as e:  # an unexpected failure ends the daemon with its message
            if is_disk_full(e):
                log("disk full: pausing until space returns", logging.ERROR, error=str(e))
                self._wait_for_space()
                return
            self.error = e
            self.done.set()

    def _wait_for_space(self, min_free_mb: int = 64) -> None:
        delay = 1.0
        while not self.run_state.warm_stop.is_set():
            free = shutil.disk_usage(self.policy.state_dir).free / 2**20
            if free >= min_free_mb and _probe_write(self.policy.state_dir):
                log("disk space is back: resuming", free_mb=round(free))
                return
            time.sleep(delay)
            delay = min(delay * 2, 60)

    def _check_teacher_tokenizer(self) -> None:
        """Distilling token log-probabilities needs the student's tokenizer in the teacher: refuse
        a mismatch at start (PolicyError, exit 2). A teacher server not up yet is checked at the
        first distillation instead."""
        from selfdistill.errors import EngineError

        try:
            log("teacher tokenizer checked", fingerprint=self.cycle.teacher_tokenizer())
        except EngineError as e:
            log("teacher not reachable at start: its tokenizer is checked at the first distillation", logging.WARNING, error=str(e))

    # main ----------------------------------------------------------------------------------

    def run(self) -> int:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        from selfdistill.service import check_state_dir_writable

        check_state_dir_writable(self.policy.state_dir)
        prepare_state_dir(self.policy.state_dir)
        lock = StateLock(self.policy.state_dir)
        lock.acquire()
        for var, sub in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("HF_HOME", "hf"), ("HF_DATASETS_CACHE", "hf/datasets")):
            os.environ.setdefault(var, str(self.policy.state_dir / "cache" / sub))
        os.environ.setdefault("TMPDIR", str(self.policy.state_dir / "tmp"))
        # stderr carries the service's JSON lines: keep the libraries' text logs and progress bars
        # out of it unless asked for (set these variables to override)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from selfdistill.models import offline_env

        offline_env()
        # APScheduler warns on every skipped overlapping run: that is the design here, not news.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        store = open_state(self.policy)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        self.cycle = Cycle(self.policy, store, self.run_state, progress=self.progress, max_rounds=self.max_rounds)
        metrics = None
        try:
            mon = self.policy.monitoring
            if mon.prometheus_port is not None:
                from selfdistill.prometheus import MetricsServer

                metrics = MetricsServer(self.policy.state_dir / DB_NAME, self.policy.name, mon.prometheus_addr, mon.prometheus_port)
                log("prometheus metrics", url=metrics.url)
            check_teacher_key(self.policy)
            self.cycle.recover()
            if "distill" in self.policy.training.stages():
                self._check_teacher_tokenizer()
            counts = ingest_tasks(self.policy, store)
            check_code_sandbox(self.policy, store)
            store.event("start", f"daemon started (PID {os.getpid()})", data={"burst": self.burst, "max_rounds": self.max_rounds, **counts})
            log("daemon started", pid=os.getpid(), state_dir=str(self.policy.state_dir), tasks=store.count_tasks(), **counts)
            self.scheduler = BackgroundScheduler(
                executors={"default": ThreadPoolExecutor(1), "flags": ThreadPoolExecutor(1)},
                job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            )
            self._schedule_jobs()
            interval = max(self.policy.schedule.idle_sleep_s, 0.01)
            from apscheduler.triggers.interval import IntervalTrigger

            self.scheduler.add_job(self._cycle_job, IntervalTrigger(seconds=interval), id="cycle", next_run_time=_now_dt())
            self.scheduler.start()
            sd_notify("READY=1")
            wd = watchdog_interval_s()
            said = False
            while not self.done.wait(wd or 0.5):
                if not wd:
                    continue
                # ping only while the cycle makes progress: a wedged one is systemd's to restart
                if self.run_state.wedged(2 * wd):
                    if not said:
                        log("the cycle made no progress for a watchdog period: withholding the ping", logging.ERROR,
                            quiet_s=round(time.monotonic() - self.run_state.last_beat, 1))
                        said = True
                    continue
                said = False
                sd_notify("WATCHDOG=1")
            self.scheduler.shutdown(wait=True)
        finally:
            sd_notify("STOPPING=1")
            reason = self.run_state.stop_reason
            if self.error is None and reason:
                store.event("stop", reason, data={"policy": self.run_state.stop_is_policy})
                log("stopped", reason=reason, by_policy=self.run_state.stop_is_policy)
            if self.progress:
                from selfdistill.report import print_summary

                print_summary(self.policy, store)
            if metrics is not None:
                metrics.close()
            self.cycle.close()
            store.close()
            lock.release()
        if self.error is not None:
            raise self.error
        if self.run_state.stop_is_policy:
            return EXIT_POLICY
        return 0


def _probe_write(state_dir: Path) -> bool:
    p = state_dir / ".space-probe"
    try:
        with open(p, "wb") as f:
            f.write(b"\0" * (1 << 20))
        return True
    except OSError:
        return False
    finally:
        p.unlink(missing_ok=True)


def _now_dt():
    import datetime

    return datetime.datetime.now().astimezone()
