"""The self-improvement cycle: a round as a persisted phase machine.

    sample -> generate -> score -> pair -> [train -> evaluate -> decide -> promote] -> done

Every phase commits its output to the store in the same transaction that moves the round to its
next phase, so a crash, `kill -9` or reboot loses at most the phase in flight, which is run again
on restart. This module orchestrates and owns those transactions; the work itself is done by the
parts it calls (serving, tasks, scoring, pairs, training, evaluation, gates, checkpoints).

Stops: between rounds every stop reason ends the run. Inside a round, a stop waits for a trained
candidate to be evaluated and decided (it cost a training round; throwing it away helps no one)
unless the stop is immediate (a cold stop, or a STOP file whose first word is "now"). A stop by
the wall clock does not start a phase that the last rounds' phase times say cannot finish.

A phase that raises a SelfdistillError (a teacher that answers 503, a locked database, a task
with no verifier) is retried at the next pass, up to MAX_PHASE_ATTEMPTS times per round, and the
round is then decided "fail"; the current checkpoint is never touched by such an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from selfdistill.config import Policy
from selfdistill.errors import CheckpointError, ModelError, PromotionSuperseded, SelfdistillError, StoreError, TeacherBudgetSpent
from selfdistill.logs import log
from selfdistill.records import Round, Task, TrainingData, chat_messages, with_suffix
from selfdistill.service import hold_for_test, hook_seconds, sd_notify
from selfdistill.stopping import Progress, should_stop
from selfdistill.store import Store

MAX_PHASE_ATTEMPTS = 3
FEEDBACK_NAMES = {"label": "labels", "revise": "revised answers"}  # a teacher feedback use, as events name it
GENERATE_CHUNK = 256  # prompts per engine call: the heartbeat ticks between chunks


class StopRequested(Exception):
    """Raised between phases when a warm stop or a stopping policy ends the run."""


class Waiting(Exception):
    """Nothing can be done now (no task to sample, outside the windows, a phase to retry): the
    scheduler's next pass tries again."""


@dataclasses.dataclass
class RunState:
    """What the process and the cycle share: stop flags, trigger flags and the heartbeat."""

    started: float = dataclasses.field(default_factory=time.time)
    stop_reason: str | None = None
    stop_is_policy: bool = False
    warm_stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    cold_stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    train_requested: bool = False
    housekeeping_requested: bool = False
    # the watchdog's view: the cycle is busy, and when it last made progress (monotonic)
    busy: bool = False
    last_beat: float = dataclasses.field(default_factory=time.monotonic)

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def wedged(self, max_quiet_s: float) -> bool:
        """Busy, and no progress for longer than `max_quiet_s`."""
        return self.busy and time.monotonic() - self.last_beat > max_quiet_s


class Cycle:
    """One service's rounds: owns the store's transactions, the serving lifecycle and the phases."""

    def __init__(self, policy: Policy, store: Store, run: RunState, progress: bool = False, max_rounds: int | None = None):
        from selfdistill.serving import Serving

        self.policy = policy
        self.store = store
        self.run = run
        self.progress = progress
        self.max_rounds = max_rounds
        self.state_dir = policy.state_dir
        self._model_dir: Path | None = None
        self.serving = Serving(policy, lambda: self.model_dir)
        self.training_child_pid: int | None = None
        self._training_run_id: int | None = None
        self._reward_scorer: tuple[Path | None, Any] = (None, None)  # the loaded reward model: (its directory, scorer)
        self._teacher_tokenizer: str | None = None  # the teacher's tokenizer fingerprint, once checked against the student's
        self._pending: Policy | None = None
        self._pending_lock = threading.Lock()
        self._decided_this_run = 0
        self._waiting_said: str | None = None

    # -- policy swaps (SIGHUP) -------------------------------------------------------------

    def offer_policy(self, new: Policy) -> None:
        """Called from the reload thread: the new policy is swapped in at the next round boundary,
        never under a phase that is reading the old one."""
        with self._pending_lock:
            self._pending = new

    def _adopt_pending_policy(self) -> None:
        with self._pending_lock:
            new, self._pending = self._pending, None
        if new is None:
            return
        old, self.policy = self.policy, new
        if new.logging != old.logging:
            from selfdistill.logs import setup_logging

            setup_logging(new.logging.format, new.logging.level)
        log("policy swapped in", round_boundary=True)

    # -- engines ---------------------------------------------------------------------------

    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            from selfdistill.models import resolve_base_model

            self._model_dir = resolve_base_model(self.policy.student.base_model)
        return self._model_dir

    @property
    def engine(self):
        from selfdistill.serving import BeatingEngine

        return BeatingEngine(self.serving.engine, self.run.beat, GENERATE_CHUNK)

    def teacher(self, purpose: str, rid: int | None):
        """The teacher's engine for one use (label, judge, distill, ...) in round `rid`: its calls are
        counted in teacher_usage and refused once the teacher's token budget is spent."""
        from selfdistill.serving import BeatingEngine, MeteredTeacher

        t = self.serving.teacher
        metered = MeteredTeacher(t, self.store, self.policy.teacher.name, purpose, rid, self.policy.stopping.max_teacher_tokens)
        return BeatingEngine(metered, self.run.beat, GENERATE_CHUNK)

    def close(self) -> None:
        self.serving.close()

    # -- helpers ---------------------------------------------------------------------------

    def prompt_text(self, task: Task) -> str:
        return with_suffix(task.prompt, self.policy.tasks.prompt_suffix)

    def messages(self, task: Task) -> list[dict[str, str]]:
        return chat_messages(self.prompt_text(task), self.policy.student.system_prompt)

    def current_id(self) -> str:
        return self.store.current_checkpoint().id

    def say(self, round_id: int | None, phase: str, **fields: Any) -> None:
        log(f"round {round_id} {phase}", round=round_id, phase=phase, **fields)
        if self.progress:
            extra = "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            print(f"[{time.strftime('%H:%M:%S')}] round {round_id} | {phase:8} | {extra}", flush=True)
        sd_notify(f"STATUS=round {round_id}: {phase}")

    def _immediate_stop(self) -> bool:
        if self.run.cold_stop.is_set():
            return True
        f = self.state_dir / self.policy.stopping.stop_file
        try:
            return f.read_text().split()[:1] == ["now"]
        except (OSError, UnicodeDecodeError):
            return False

    def check_stop(self, next_phase: str | None = None) -> None:
        """Raise StopRequested if a signal, the STOP file or a stopping policy says so. Inside a
        round with a trained candidate (`next_phase` evaluate, decide or promote) only an
        immediate stop counts."""
        if next_phase in ("evaluate", "decide", "promote") and not self._immediate_stop():
            return
        reason, is_policy = self.stop_reason()
        if reason is None and next_phase in (None, "train"):
            reason = self._no_time_for(next_phase)
            is_policy = reason is not None
        if reason:
            if self.run.stop_reason is None:
                self.run.stop_reason, self.run.stop_is_policy = reason, is_policy
            raise StopRequested(reason)

    def _no_time_for(self, next_phase: str | None) -> str | None:
        """A wall-clock stop, early: the reason not to start what the last rounds say cannot end
        before `stopping.max_wall_s` (None: go ahead)."""
        limit = self.policy.stopping.max_wall_s
        if limit is None:
            return None
        from selfdistill.schedule import predicted_seconds

        what = ("train", "evaluate", "decide", "promote") if next_phase == "train" else ("sample", "generate", "score", "pair")
        need = predicted_seconds(self.store.phases(), what)
        left = limit - (time.time() - self.run.started)
        if need is None or need <= left:
            return None
        name = "training round" if next_phase == "train" else "round"
        return (f"wall clock: the next {name} would take about {need:.0f}s (the last rounds' median) and "
                f"{max(left, 0):.0f}s are left of max_wall_s = {limit:.0f}s; it starts on the next run")

    def progress_snapshot(self, tasks_exhausted: bool = False) -> Progress:
        rounds = self.store.rounds()
        mine = [r for r in rounds if (r.finished_at or 0) >= self.run.started]  # finished in this run, resumed ones too
        trained = [r for r in rounds if r.decision in ("promote", "reject") and r.status != "running"]
        cur_eval = self.store.latest_evaluation(self.current_id(), "heldout")
        regress = sum(1 for r in trained if ((r.metrics or {}).get("gain") or 0) < 0)
        self._decided_this_run = sum(1 for r in mine if r.decided)
        return Progress(
            decided_rounds=sum(1 for r in rounds if r.decided),
            wall_s=time.time() - self.run.started,
            generated_tokens=self.store.total_generated_tokens(),
            teacher_tokens=self.store.total_teacher_tokens(),
            incumbent_accuracy=cur_eval.metrics.get("accuracy") if cur_eval else None,
            decisions=[r.decision for r in trained],
            regressions=regress,
            tasks_exhausted=tasks_exhausted,
            stop_file_present=(self.state_dir / self.policy.stopping.stop_file).exists(),
            signal_received=self.run.warm_stop.is_set(),
        )

    def stop_reason(self, tasks_exhausted: bool = False) -> tuple[str | None, bool]:
        p = self.progress_snapshot(tasks_exhausted)
        if self.max_rounds is not None and self._decided_this_run >= self.max_rounds and not p.signal_received:
            return f"--max-rounds: {self._decided_this_run} rounds decided in this run", False
        reason = should_stop(p, self.policy.stopping)
        return reason, bool(reason) and not reason.startswith("signal")

    def _wait(self, why: str) -> None:
        if self._waiting_said != why:  # said once, not at every pass of the scheduler
            log("waiting", reason=why)
            sd_notify(f"STATUS=waiting: {why}")
            self._waiting_said = why
        raise Waiting(why)

    # -- the round -------------------------------------------------------------------------

    def run_round(self) -> Round:
        """Run (or resume) one round to its end, phase by phase; returns the finished round.
        Raises StopRequested to end the run and Waiting when there is nothing to do now."""
        from selfdistill.schedule import idle_outside_windows

        self._adopt_pending_policy()
        self.check_stop()
        rnd = self.store.open_round()
        if rnd is None:
            if idle_outside_windows(self.policy.schedule, time.localtime()):
                self.serving.release("idling outside the training windows")
                self._wait("outside the training windows (schedule.outside_windows = 'idle')")
            rid = self.store.create_round(self.current_id())
            log("round started", round=rid, incumbent=self.current_id())
        else:
            rid = rnd.id
            log("round resumed", round=rid, phase=rnd.phase)
        self.run.busy = True
        try:
            while True:
                rnd = self.store.get_round(rid)
                if rnd.finished:
                    self._waiting_said = None
                    return rnd
                t0 = time.time()
                self.run.beat()
                _test_delay(rnd.phase, self.run)
                try:
                    getattr(self, f"phase_{rnd.phase}")(rnd, t0)
                except (StopRequested, Waiting):
                    raise
                except SelfdistillError as e:
                    if is_disk_full(e):
                        raise
                    self._phase_failed(rnd, t0, e)
                self.run.beat()
                self.check_stop(self.store.get_round(rid).phase)
        finally:
            self.run.busy = False

    def _phase_failed(self, rnd: Round, t0: float, e: SelfdistillError) -> None:
        attempts = rnd.attempts + 1
        self.store.update_round(rnd.id, attempts=attempts)
        self.store.event("phase_failed", f"round {rnd.id} {rnd.phase} (attempt {attempts} of {MAX_PHASE_ATTEMPTS}): {e}",
                         level="warning", round_id=rnd.id)
        log("phase failed", logging.WARNING, round=rnd.id, phase=rnd.phase, attempt=attempts, error=str(e))
        if attempts < MAX_PHASE_ATTEMPTS:
            raise Waiting(f"round {rnd.id} {rnd.phase} failed; retried at the next pass") from None
        cand = rnd.candidate_id
        self.finish(rnd.id, t0, rnd.phase, {"attempts": attempts}, decision="fail", status="failed",
                    reasons=[f"{rnd.phase} failed {attempts} times: {e}"], error=str(e),
                    also=(lambda: self.store.set_checkpoint_status(cand, "failed", str(e))) if cand else None)

    def finish(self, rid: int, started: float, phase: str, counts: dict[str, Any], *, decision: str | None = None,
               status: str = "done", reasons: list[str] | None = None, error: str | None = None,
               also: Callable[[], None] | None = None) -> None:
        with self.store.transaction():
            self.store.record_phase(rid, phase, started, counts, "done")
            self.store.update_round(rid, status=status, decision=decision, finished_at=time.time(),
                                    **({"reasons": reasons} if reasons is not None else {}), **({"error": error} if error else {}))
            if decision in ("fail", "skip", "superseded"):
                self.store.event("decision", f"round {rid}: {decision}: {'; '.join(reasons or [])}",
                                 level="warning" if decision == "fail" else "info", round_id=rid)
            if also is not None:
                also()
        self.say(rid, "done", decision=decision or "collect", reasons="; ".join(reasons or []))

    # sample ----------------------------------------------------------------------------------

    def phase_sample(self, rnd: Round, t0: float) -> None:
        from selfdistill.schedule import round_seed
        from selfdistill.tasks.curriculum import level_state, sample_tasks, sampling_weights
        from selfdistill.tasks.sources import source_name

        rid = rnd.id
        expanded = self.expand(rid)  # teacher calls happen before the transaction, written inside it
        tcfg = self.policy.tasks
        source_weights = {source_name(s): s.weight for s in tcfg.sources}
        with self.store.transaction():
            for tasks, event in expanded:
                added, _ = self.store.add_tasks(tasks, tcfg.heldout_fraction, tcfg.audit_fraction)
                self.store.event(event["kind"], event["message"].format(added=added), round_id=rid,
                                 data={**event.get("data", {}), "added": added}, level=event.get("level", "info"))
            pool = self.store.tasks(split="train")
            levels = level_state(pool, tcfg.curriculum, self.store.verified_counts() if tcfg.curriculum.level_field else None)
            weights = sampling_weights(pool, tcfg.curriculum, source_weights, levels)
            chosen = sample_tasks(pool, weights, tcfg.per_round, random.Random(round_seed(self.policy.generation.seed, rid)))
            at = {"curriculum_level": levels.current} if levels is not None else {}
            if levels is not None and levels.current != self._last_level(rid):
                self.store.event("curriculum", f"round {rid}: curriculum at {levels.describe()}",
                                 round_id=rid, data={"field": levels.field, "level": levels.current,
                                                     "stats": {str(k): v for k, v in levels.stats.items()}})
            if chosen:
                self.store.set_round_tasks(rid, [t.id for t in chosen])
                self.store.record_phase(rid, "sample", t0, {"tasks": len(chosen), "pool": len(pool), **at}, "generate")
        if chosen:
            self.say(rid, "sample", tasks=len(chosen), pool=len(pool), **at)
            return
        if not self.policy.stopping.stop_when_tasks_exhausted:
            self._wait("no training task can be sampled (stopping.stop_when_tasks_exhausted = false: waiting for tasks)")
        reason, _ = self.stop_reason(tasks_exhausted=True)
        self.finish(rid, t0, "sample", {"tasks": 0}, decision="skip", status="skipped", reasons=["no training task left to sample"])
        self.run.stop_reason = reason or "tasks exhausted: no training task can be sampled any more"
        self.run.stop_is_policy = True
        raise StopRequested(self.run.stop_reason)

    def _last_level(self, rid: int, *, this_round: bool = False) -> float | None:
        """The curriculum level the last sampled round before `rid` (or `rid` itself) drew from
        (None: none yet)."""
        row = self.store.query("SELECT json_extract(counts, '$.curriculum_level') AS level FROM phases WHERE phase = 'sample' "
                               f"AND round_id {'=' if this_round else '<'} ? ORDER BY round_id DESC LIMIT 1", (rid,))
        return row[0]["level"] if row else None

    def _cut_review(self, rid: int, data: TrainingData) -> tuple[TrainingData, dict[str, int]]:
        """`training.review_fraction`: the rows of levels below the round's own cut to that share."""
        from selfdistill.tasks.curriculum import cut_review, task_level

        share, field = self.policy.training.review_fraction, self.policy.tasks.curriculum.level_field
        current = self._last_level(rid, this_round=True)
        if share is None or field is None or current is None:
            return data, {}
        levels = {t.id: task_level(t, field) for t in self.store.tasks(split="train")}
        rng = random.Random(self.policy.training.seed + rid)
        sft, cut_sft = cut_review(data.sft, levels, current, share, rng)
        pairs, cut_pairs = cut_review(data.pairs, levels, current, share, rng)
        return TrainingData(sft=sft, pairs=pairs), {"review_cut": cut_sft + cut_pairs}

    def expand(self, rid: int) -> list[tuple[list, dict]]:
        """New tasks from the expansion sources (nothing is written here): (tasks, event) each."""
        exp = [s for s in self.policy.tasks.sources if s.type == "expansion"]
        if not exp:
            return []
        from selfdistill.errors import EngineError
        from selfdistill.tasks.expansion import expand_tasks

        out = []
        for src in exp:
            seeds = [t for t in self.store.tasks(split="train") if src.seeds_from in ("all", t.source)][:200]
            known = [t.prompt for t in self.store.tasks()]
            try:
                engine = self.teacher("expand", rid) if src.by == "teacher" else self.engine
                adapter = self.serving.adapter_for(self.current_id()) if src.by == "student" else None
                res = expand_tasks(engine, seeds, src, known, random.Random(rid), adapter=adapter,
                                   system_prompt=self.policy.student.system_prompt if src.by == "student" else None)
            except EngineError as e:
                log("expansion skipped", logging.WARNING, round=rid, error=str(e))
                out.append(([], {"kind": "teacher_unavailable", "message": f"expansion skipped: {e}".replace("{", "{{").replace("}", "}}"),
                                 "level": "warning"}))
                continue
            log("tasks expanded", round=rid, by=src.by, asked=res.asked, rejected=dict(res.rejected))
            out.append((res.tasks, {"kind": "expansion", "message": f"{{added}} new tasks by {src.by}",
                                    "data": {"asked": res.asked, "rejected": dict(res.rejected)}}))
        return out

    # generate --------------------------------------------------------------------------------

    def phase_generate(self, rnd: Round, t0: float) -> None:
        from selfdistill.engines.base import SamplingParams
        from selfdistill.schedule import round_seed

        rid = rnd.id
        tasks = self.store.round_tasks(rid)
        g = self.policy.generation
        params = SamplingParams(n=g.samples_per_task, temperature=g.temperature, top_p=g.top_p,
                                max_tokens=g.max_tokens, stop=tuple(g.stop), seed=round_seed(g.seed, rid),
                                logprobs=self.policy.training.uses_rl())  # the policy gradient's importance correction
        ckpt, adapter = self.incumbent_adapter(rnd)  # an incumbent that cannot be served is replaced by the base here
        # the base's answers first: under merged serving the engine then ends the phase on the incumbent
        anchors, anchor_counts = self.anchor_answers(rid, tasks, ckpt, params)
        outs = self.engine.generate([self.messages(t) for t in tasks], params, adapter=adapter)
        rows = []
        for t, comps in zip(tasks, outs):
            rows += self._generation_rows(rid, t, ckpt, "train", comps, params)
        tokens = sum(r["completion_tokens"] for r in rows)
        with self.store.transaction():
            self.store.delete_generations(rid, "train")
            self.store.delete_generations(rid, "anchor")
            self.store.add_generations(rows)
            self.store.add_generations(anchors)
            self.store.record_phase(rid, "generate", t0, {"generations": len(rows), "tokens": tokens, **anchor_counts}, "score")
        dt = time.time() - t0
        self.say(rid, "generate", generations=len(rows), tokens=tokens, tokens_per_s=round(tokens / max(dt, 1e-9), 1), **anchor_counts)

    def _generation_rows(self, rid: int, task: Task, ckpt: str, purpose: str, comps, params) -> list[dict[str, Any]]:
        return [{
            "round_id": rid, "task_id": task.id, "checkpoint_id": ckpt, "purpose": purpose, "sample_index": i,
            "prompt": self.prompt_text(task), "text": c.text, "params": params.as_dict(),
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
            "token_ids": c.token_ids, "logprobs": c.logprobs,
        } for i, c in enumerate(comps)]

    def anchor_answers(self, rid: int, tasks: list[Task], incumbent: str, params) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """pairs.rejected_from = "base": the base's answers to this round's tasks, as generations of
        purpose 'anchor' (nothing while the base is the incumbent: the round's own answers are the
        base's). A task the base answered before gets copies of its stored answers (`params.copied_from`
        names the original); the others are sampled from the base now, pairs.anchor_samples each,
        with the round's sampling settings."""
        pc = self.policy.pairs
        if pc.rejected_from != "base" or incumbent == "base":
            return [], {}
        stored = self.store.base_answers([t.id for t in tasks], pc.anchor_samples)
        rows: list[dict[str, Any]] = []
        for t in tasks:
            for i, g in enumerate(stored.get(t.id, [])):
                rows.append({**{k: g[k] for k in ("task_id", "prompt", "text", "prompt_tokens", "completion_tokens", "finish_reason")},
                             "round_id": rid, "checkpoint_id": "base", "purpose": "anchor", "sample_index": i,
                             "params": {**(g["params"] or {}), "copied_from": g.get("params", {}).get("copied_from", g["id"])}})
        fresh = [t for t in tasks if t.id not in stored]
        if fresh:
            base_params = dataclasses.replace(params, n=pc.anchor_samples, logprobs=False)
            outs = self.engine.generate([self.messages(t) for t in fresh], base_params, adapter=None)
            for t, comps in zip(fresh, outs):
                rows += [{**r, "token_ids": None, "logprobs": None} for r in self._generation_rows(rid, t, "base", "anchor", comps, base_params)]
        return rows, {"anchors": len(rows), "anchors_sampled": sum(1 for r in rows if "copied_from" not in r["params"])}

    # score -----------------------------------------------------------------------------------

    def phase_score(self, rnd: Round, t0: float) -> None:
        from selfdistill.scoring.verifiers import resolve_verifier

        rid = rnd.id
        tasks = {t.id: t for t in self.store.round_tasks(rid)}
        own = self.store.generations(rid, "train")
        # the base's answers (pairs.rejected_from = "base") are scored by the same scorers, in the same
        # round, so that the two sides of a pair share a scale; only the round's own count in the
        # tasks' pass rates
        gens = own + self.store.generations(rid, "anchor")
        own_ids = {g["id"] for g in own}
        sc = self.policy.scoring
        score_rows: list[dict[str, Any]] = []
        stats: dict[int, list[float]] = {}
        verdicts: dict[int, bool] = {}
        if sc.use_verifier:
            for g in gens:
                t = tasks[g["task_id"]]
                verify = resolve_verifier(t, self.policy.tasks.default_verifier, sc, (str(self.state_dir),))
                if verify is None:
                    continue
                res = verify(g["text"], t)
                verdicts[g["id"]] = bool(res.correct)
                score_rows.append({"generation_id": g["id"], "scorer": f"verifier:{verify.name}", "score": res.score,
                                   "correct": res.correct, "details": res.details})
                if g["id"] in own_ids:
                    a = stats.setdefault(t.id, [0, 0.0])
                    a[0] += 1
                    a[1] += 1.0 if res.correct else 0.0
        judged, health, events, taught = self.judge_scores(rid, tasks, gens, verdicts)
        score_rows += judged
        score_rows += self.reward_model_scores(tasks, [g for g in gens if g["id"] not in verdicts])
        # a task neither a verifier nor a healthy judge scored is skipped (nothing is trained on it), and counted
        scored = {r["generation_id"] for r in score_rows if r["score"] is not None}
        unscored = len({g["task_id"] for g in gens} - {g["task_id"] for g in gens if g["id"] in scored})
        with self.store.transaction():
            for h in health:
                self.store.add_judge_health(**h)
            for ev in events:
                self.store.event(**ev)
            self.store.add_scores(score_rows)
            self.store.add_teacher_anchors(taught)
            self.store.update_task_stats({k: (int(v[0]), v[1]) for k, v in stats.items()})
            self.store.record_phase(rid, "score", t0, {"scores": len(score_rows), "unscored_tasks": unscored}, "pair")
        n_correct = sum(1 for r in score_rows if r.get("correct") and r["generation_id"] in own_ids)
        n_ver = sum(1 for r in score_rows if r["scorer"].startswith("verifier") and r["generation_id"] in own_ids)
        self.say(rid, "score", scores=len(score_rows), correct=f"{n_correct}/{n_ver}",
                 pass_rate=round(n_correct / n_ver, 3) if n_ver else None, **({"unscored_tasks": unscored} if unscored else {}))

    def reward_model_scores(self, tasks: dict[int, Task], gens: list[dict]) -> list[dict[str, Any]]:
        """Scores of the latest reward model for answers no verifier judged, where it is healthy
        (its held-out pair accuracy reached training.reward_model.min_accuracy); none otherwise."""
        rm = self.policy.training.reward_model
        h = self.store.latest_judge_health("reward_model") if rm.enabled and gens else None
        if h is None or not h["healthy"]:
            return []
        path = Path(h["details"]["path"])
        if not (path / "adapter_model.safetensors").is_file():
            log("reward model missing", logging.WARNING, path=str(path))
            return []
        if self._reward_scorer[0] != path:
            from selfdistill.training.reward_model import RewardScorer

            self._reward_scorer = (path, RewardScorer(self.model_dir, path, self.policy.student.system_prompt,
                                                      self.policy.training.max_length, self.policy.training.threads))
        scorer = self._reward_scorer[1]
        values = scorer.score([self.prompt_text(tasks[g["task_id"]]) for g in gens], [g["text"] for g in gens])
        return [{"generation_id": g["id"], "scorer": f"reward_model:{path.name}", "score": v, "correct": None,
                 "details": {"agreement": h["agreement"]}} for g, v in zip(gens, values)]

    def train_reward_model(self, rid: int, attempt: int, work: Path) -> None:
        """Train a reward model on every train-split pair so far (training.reward_model) and record its
        health; a skipped or failed one leaves the last recorded model as it was."""
        from selfdistill.training.child import run_training_child
        from selfdistill.training.spec import RoundSpec, write_round_data

        tr = self.policy.training
        pairs = self.store.training_data(rid, "all").pairs
        out = self.state_dir / "reward_models" / f"rm-{rid:06d}-{attempt}"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)  # an attempt killed before it was recorded
        spec = RoundSpec(
            round_id=rid, attempt=attempt, purpose="reward_model", base_model_dir=str(self.model_dir), incumbent_adapter_dir=None,
            output_dir=str(out), data_path=str(write_round_data(work / "rm-data.jsonl", [], pairs)),
            system_prompt=self.policy.student.system_prompt, training=tr.model_dump(mode="json"),
            lora=self.policy.student.lora.model_dump(mode="json"), result_path=str(work / "rm-result.json"), threads=tr.threads,
            seed=tr.seed, hf_home=str(self.state_dir / "cache" / "hf"))
        res = run_training_child(spec, time_limit_s=tr.time_limit_s, stop_event=self.run.cold_stop, on_poll=self.run.beat)
        if self.run.cold_stop.is_set():
            raise StopRequested("cold stop during reward-model training")
        m = res.metrics
        if res.status == "succeeded":
            self.store.add_judge_health("reward_model", bool(m.get("rm_healthy")), m.get("rm_accuracy"), None, None,
                                        {"path": str(out), "heldout_pairs": m.get("rm_heldout_pairs"), "train_pairs": m.get("rm_train_pairs"),
                                         "threshold": tr.reward_model.min_accuracy, "reasons": [res.reason] if res.reason else []},
                                        round_id=rid)
            if not m.get("rm_healthy"):
                self.store.event("judge_unhealthy", f"reward model of round {rid} not used: {res.reason}", level="warning", round_id=rid)
        else:
            self.store.event("reward_model_" + res.status, f"round {rid}: reward model {res.status}: {res.reason}",
                             level="warning" if res.status == "failed" else "info", round_id=rid)
        self.say(rid, "train", reward_model=res.status, accuracy=m.get("rm_accuracy"), healthy=m.get("rm_healthy"),
                 heldout_pairs=m.get("rm_heldout_pairs"))

    def judge_scores(self, rid: int, tasks: dict[int, Task], gens: list[dict], verdicts: dict[int, bool]):
        """Self- and teacher-judge scores from judges whose anchor check passed, with the health
        rows, events and new teacher-labelled anchors to write beside them (in the score phase's
        transaction).

        The check runs on the anchor file's items, the teacher's stored labels and this round's
        verifier-scored answers when the judge was never checked, its last check is older than
        `recheck_every_rounds`, or the teacher labelled new anchors this round; an unhealthy judge
        scores nothing.
        """
        from selfdistill.errors import EngineError
        from selfdistill.scoring.anchors import AnchorFileError, load_anchors, stored_anchors
        from selfdistill.scoring.feedback import anchor_check, judge_scores

        sc = self.policy.scoring
        rows: list[dict[str, Any]] = []
        health: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        prompts = {tid: self.prompt_text(t) for tid, t in tasks.items()}
        known = [{**g, "correct": verdicts.get(g["id"])} for g in gens]
        labelled, taught = self.teacher_anchors(rid, gens, prompts, events) if sc.self_judge.enabled else ([], [])
        for who, cfg in (("self", sc.self_judge), ("teacher", sc.teacher_judge)):
            if not cfg.enabled:
                continue
            try:
                engine = self.engine if who == "self" else self.teacher("judge", rid)
                adapter = self.serving.adapter_for(self.current_id()) if who == "self" else None
                last = self.store.latest_judge_health(who)
                if last is None or rid - (last["round_id"] or 0) >= cfg.recheck_every_rounds or (who == "self" and taught):
                    anchors = load_anchors(cfg.anchors) if cfg.anchors is not None else None
                    labels = stored_anchors(labelled) if who == "self" else None
                    h = anchor_check(engine, who, cfg, known, prompts, adapter, random.Random(rid), anchors, labels)
                    health.append({"judge": who, "healthy": h.healthy, "agreement": h.agreement, "position_bias": h.position_bias,
                                   "distinct_scores": h.distinct_scores,
                                   "details": {"reasons": h.reasons, "n": h.n, "unparseable": h.unparseable, "anchors": h.anchors},
                                   "round_id": rid})
                    level = logging.INFO if h.healthy else logging.WARNING
                    log("judge checked", level, round=rid, judge=who, healthy=h.healthy, agreement=h.agreement,
                        position_bias=h.position_bias, reasons=h.reasons)
                    if not h.healthy:
                        events.append({"kind": "judge_unhealthy", "message": f"{who} judge stops contributing: {'; '.join(h.reasons)}",
                                       "level": "warning", "round_id": rid})
                    healthy = h.healthy
                else:
                    healthy = bool(last["healthy"])
                if healthy:
                    rows += judge_scores(engine, who, cfg, gens, prompts, adapter)
            except (EngineError, AnchorFileError) as e:  # a server down, or an anchor file broken since the start
                log("judge unavailable", logging.WARNING, round=rid, judge=who, error=str(e))
                events.append({"kind": "teacher_unavailable" if who == "teacher" else "judge_unavailable",
                               "message": f"{who} judge skipped this round: {e}", "level": "warning", "round_id": rid})
        return rows, health, events, taught

    def teacher_anchors(self, rid: int, gens: list[dict], prompts: dict[int, str],
                        events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(every teacher label the self judge is measured on, the new ones to store): new anchors are
        labelled by the teacher from this round's answers until the store holds
        scoring.self_judge.teacher_anchors of them; none once it does. A teacher that fails or whose
        budget is spent labels nothing this round (an event says so); the self judge is then measured
        on what it has."""
        from selfdistill.errors import EngineError
        from selfdistill.scoring.feedback import teacher_anchor_rows

        cfg = self.policy.scoring.self_judge
        if not cfg.teacher_anchors:
            return [], []
        stored = self.store.teacher_anchors()
        need = cfg.teacher_anchors - len(stored)
        if need <= 0:
            return stored, []
        labelled = {gid for r in stored for gid in r["generation_ids"]}
        try:
            rows = teacher_anchor_rows(self.teacher("anchor", rid), self.policy.scoring.teacher_judge, cfg.mode, gens, prompts, need,
                                       random.Random(rid), labelled, self.policy.teacher.name, rid)
        except EngineError as e:
            log("teacher unavailable", logging.WARNING, round=rid, error=str(e))
            events.append({"kind": "teacher_unavailable", "message": f"teacher anchor labels skipped this round: {e}",
                           "level": "warning", "round_id": rid})
            return stored, []
        log("teacher labelled anchors", round=rid, new=len(rows), stored=len(stored) + len(rows), wanted=cfg.teacher_anchors)
        return stored + rows, rows

    # pair ------------------------------------------------------------------------------------

    def phase_pair(self, rnd: Round, t0: float) -> None:
        from selfdistill.pairs import build_pairs, build_sft, candidates_from_scores
        from selfdistill.schedule import train_due

        rid = rnd.id
        tasks = {t.id: t for t in self.store.round_tasks(rid)}
        unhealthy = self.unhealthy_judges()
        by_task = candidates_from_scores(self.store.scores_for_round(rid, "train"), unhealthy)
        prompts = {tid: self.prompt_text(t) for tid, t in tasks.items()}
        if self.policy.pairs.rejected_from == "base":
            # anchored rejection: chosen among the round's own answers, rejected among the base's
            # (the round's own too while the base is the incumbent)
            base = candidates_from_scores(self.store.scores_for_round(rid, "anchor"), unhealthy)
            own_ids = {c.generation_id for cs in by_task.values() for c in cs}
            base_ids = {c.generation_id for cs in base.values() for c in cs}
            if rnd.incumbent_id == "base":
                base_ids |= own_ids
            both = {tid: by_task.get(tid, []) + base.get(tid, []) for tid in set(by_task) | set(base)}
            pairs = build_pairs(both, prompts, self.policy.pairs, chosen_ids=own_ids, rejected_ids=base_ids)
        else:
            pairs = build_pairs(by_task, prompts, self.policy.pairs)
        sft = build_sft(by_task, prompts, self.policy.pairs)
        events = []
        sc = self.policy.scoring
        if (sc.teacher_label or sc.teacher_revise) and self.policy.teacher is not None:
            from selfdistill.engines.base import SamplingParams
            from selfdistill.errors import EngineError
            from selfdistill.scoring.feedback import teacher_feedback

            t = self.policy.teacher
            for use in [u for u, on in (("label", sc.teacher_label), ("revise", sc.teacher_revise)) if on]:
                try:  # each use apart: labels already paid for are kept when the revisions fail
                    t_sft, t_pairs = teacher_feedback(
                        lambda purpose: self.teacher(purpose, rid), tasks, by_task, label=use == "label", revise=use == "revise",
                        params=SamplingParams(n=1, temperature=t.temperature, max_tokens=t.max_tokens),
                        prompt_suffix=self.policy.tasks.prompt_suffix, system_prompt=self.policy.student.system_prompt,
                        default_verifier=self.policy.tasks.default_verifier, weight=self.policy.pairs.weights.get("teacher", 1.0))
                    sft += t_sft
                    pairs += t_pairs
                except EngineError as e:  # the teacher is down or its budget spent: keep going on verifier data
                    log("teacher unavailable", logging.WARNING, round=rid, error=str(e))
                    events.append({"kind": "teacher_unavailable", "message": f"teacher {FEEDBACK_NAMES[use]} skipped this round: {e}",
                                   "level": "warning", "round_id": rid})
        with self.store.transaction():
            for ev in events:
                self.store.event(**ev)
            self.store.delete_training_data(rid)
            n_pairs, n_sft = self.store.add_training_data(rid, pairs, sft)
            self.store.prune_sample_logprobs(rid - self.policy.training.rl.keep_logprobs_rounds + 1)
            train_now, why = train_due(self.policy.schedule, new_data=self.store.count_new_training_data(),
                                       requested=self.run.train_requested, now=time.localtime())
            counts = {"pairs": n_pairs, "sft": n_sft, "train": train_now}
            if train_now:
                self.store.record_phase(rid, "pair", t0, counts, "train")
            else:
                self.store.record_phase(rid, "pair", t0, counts, "done")
                self.store.update_round(rid, status="done", decision="collect", reasons=[why], finished_at=time.time())
        self.say(rid, "pair", pairs=n_pairs, sft=n_sft, train="yes" if train_now else f"no ({why})")

    def unhealthy_judges(self) -> set[str]:
        out = set()
        for who in ("self", "teacher", "reward_model"):
            h = self.store.latest_judge_health(who)
            if h is not None and not h["healthy"]:
                out.add(who)
        return out

    # train -----------------------------------------------------------------------------------

    def phase_train(self, rnd: Round, t0: float) -> None:
        from selfdistill.checkpoints import checkpoint_path, discard_unrecorded, new_checkpoint_dir
        from selfdistill.training.child import kill_group, run_training_child
        from selfdistill.training.spec import RoundSpec, write_round_data

        rid = rnd.id
        tr = self.policy.training
        # a run left 'running' by a crash is over: its trainer must not outlive the daemon that
        # started it (it would race this one for the checkpoint id); it counts as an attempt
        for run in self.store.training_runs(rid):
            if run["status"] == "running":
                if run["pid"] and _is_trainer(run["pid"]):
                    kill_group(run["pid"])
                self.store.finish_training_run(run["id"], "failed", {}, "interrupted: the daemon stopped during training")
        attempt = len(self.store.training_runs(rid)) + 1
        data, cut = self._cut_review(rid, self.store.training_data(rid, tr.data_scope, tr.replay_fraction, tr.seed))
        groups, group_counts = self.round_groups(rid) if "grpo" in tr.stages() else ([], {})
        distill, distill_counts = self.distill_data(rid) if "distill" in tr.stages() else ([], {})
        ckpt_id = self.store.next_checkpoint_id()
        # an adapter renamed into place by a trainer whose result was never recorded: train afresh
        if discard_unrecorded(self.state_dir, ckpt_id, recorded=False):
            log("discarded an unrecorded adapter directory", logging.WARNING, round=rid, checkpoint=ckpt_id)
        out_dir = new_checkpoint_dir(self.state_dir, ckpt_id)
        work = self.state_dir / "tmp" / f"round-{rid}-attempt-{attempt}"
        work.mkdir(parents=True, exist_ok=True)
        data_path = write_round_data(work / "data.jsonl", data.sft, data.pairs, groups, distill)
        incumbent = rnd.incumbent_id
        starts = incumbent if tr.start_from == "incumbent" else "base"  # the weights the LoRA starts from
        spec = RoundSpec(
            round_id=rid, attempt=attempt, base_model_dir=str(self.model_dir),
            incumbent_adapter_dir=str(checkpoint_path(self.state_dir, starts)) if starts != "base" else None,
            output_dir=str(out_dir), data_path=str(data_path), system_prompt=self.policy.student.system_prompt,
            training=tr.model_dump(mode="json"), lora=self.policy.student.lora.model_dump(mode="json"),
            result_path=str(work / "result.json"), threads=tr.threads, seed=tr.seed + attempt - 1,
            hf_home=str(self.state_dir / "cache" / "hf"),
        )
        counts = {"sft": len(data.sft), "pairs": len(data.pairs), **cut, **group_counts, **distill_counts}
        self._training_run_id = self.store.start_training_run(rid, attempt, {**counts, "output": str(out_dir), "starts_from": starts})
        self.say(rid, "train", attempt=attempt, candidate=ckpt_id, **counts)
        self.serving.release("training")  # the engine comes back by itself at its next use
        if tr.reward_model.enabled:
            self.train_reward_model(rid, attempt, work)
        try:
            result = run_training_child(spec, launcher=tr.launcher, num_processes=tr.num_processes,
                                        time_limit_s=tr.time_limit_s, stop_event=self.run.cold_stop,
                                        accelerate_config=tr.accelerate_config,
                                        on_start=self._child_started, on_poll=self.run.beat)
        finally:
            self.training_child_pid = None
        self.store.finish_training_run(self._training_run_id, result.status, result.metrics, result.reason, result.pid)
        if self.run.cold_stop.is_set():
            raise StopRequested("cold stop during training")
        if result.status == "succeeded":
            with self.store.transaction():
                self.store.add_checkpoint(ckpt_id, incumbent, rid, str(out_dir),
                                          {**counts, "metrics": result.metrics,
                                           "sft_ids": [r.id for r in data.sft], "pair_ids": [r.id for r in data.pairs]})
                self.store.mark_data_used(rid, [r.id for r in data.sft], [r.id for r in data.pairs])
                self.store.update_round(rid, candidate_id=ckpt_id)
                rl = _rl_figures(counts, result.metrics)
                self.store.merge_round_metrics(rid, {"training": result.metrics, **rl})
                self.store.record_phase(rid, "train", t0, {**counts, **_numeric(result.metrics)}, "evaluate")
            self.run.train_requested = False
            shutil.rmtree(work, ignore_errors=True)
            self.say(rid, "train", result="candidate " + ckpt_id, seconds=round(time.time() - t0, 1),  # unmeasured figures left out
                     **{k: v for k, v in rl.get("rl", {}).items() if v is not None},
                     **{f"distill_{k}": v for k, v in rl.get("distill", {}).items() if v is not None})
        elif result.status == "skipped":
            self.run.train_requested = False
            self.finish(rid, t0, "train", counts, decision="skip", reasons=[result.reason or "skipped"])
        else:
            self.store.event("training_failed", f"round {rid} attempt {attempt}: {result.reason}", level="error", round_id=rid)
            if attempt <= tr.max_retries:
                self.say(rid, "train", result="failed, will retry", reason=result.reason)
                return  # the phase stays 'train': the next pass retries
            self.finish(rid, t0, "train", {"attempts": attempt}, decision="fail", status="failed",
                        reasons=[f"training failed: {result.reason}"], error=result.reason)

    def round_groups(self, rid: int) -> tuple[list, dict[str, Any]]:
        """The policy-gradient stage's groups: this round's answers (sampled by the incumbent) of
        train-split tasks with their rewards and stored sampling log-probabilities, and the counts
        (groups kept, flat groups and unusable samples dropped, mean reward and pass rate)."""
        from selfdistill.pairs import build_groups, candidates_from_scores

        tasks = {t.id: t for t in self.store.round_tasks(rid) if t.split == "train"}  # the held-out wall
        gens = {g["id"]: g for g in self.store.generations(rid, "train") if g["task_id"] in tasks}
        scores = [s_ for s_ in self.store.scores_for_round(rid, "train") if s_["generation_id"] in gens]
        by_task = candidates_from_scores(scores, self.unhealthy_judges())
        groups, counts = build_groups(by_task, {tid: self.prompt_text(t) for tid, t in tasks.items()}, self.policy.training.rl,
                                      finish_reasons={gid: g["finish_reason"] for gid, g in gens.items()},
                                      max_tokens=self.policy.generation.max_tokens, logprobs=self.store.sample_logprobs(rid))
        verified = [c.correct for cs in by_task.values() for c in cs if c.correct is not None]
        rewards = [s.reward for g in groups for s in g.samples]
        counts["reward_mean"] = round(sum(rewards) / len(rewards), 4) if rewards else None
        counts["pass_rate"] = round(sum(verified) / len(verified), 4) if verified else None
        return groups, counts

    def teacher_tokenizer(self) -> str:
        """The teacher's tokenizer fingerprint, once its tokenizer is shown to be the student's (the
        condition of scoring the student's token ids); PolicyError naming the difference otherwise."""
        if self._teacher_tokenizer is not None:
            return self._teacher_tokenizer
        from selfdistill.errors import PolicyError
        from selfdistill.models import TOKENIZER_PROBE, compare_tokenizers

        t = self.policy.teacher
        fix = "use a teacher of the student's family (same tokenizer and chat template), or another training.algorithm"
        if t.kind == "openai":
            import hashlib

            from transformers import AutoTokenizer

            from selfdistill.engines.local import render

            tok = AutoTokenizer.from_pretrained(str(self.model_dir))
            probes = [TOKENIZER_PROBE, chat_messages(TOKENIZER_PROBE, self.policy.student.system_prompt)]
            mine = [render(tok, p) for p in probes]
            theirs = [self.serving.teacher.tokenize(p) for p in probes]
            if mine != theirs:
                what = "text" if mine[0] != theirs[0] else "chat template"
                raise PolicyError(f"teacher {t.endpoint.base_url} ({t.endpoint.model}) tokenizes differently from the student "
                                  f"({what} of a probe: {len(theirs[0 if what == 'text' else 1])} tokens against "
                                  f"{len(mine[0 if what == 'text' else 1])}): distilling its token log-probabilities "
                                  f"needs one tokenizer; {fix}")
            self._teacher_tokenizer = "probe:" + hashlib.sha256(json.dumps(mine).encode()).hexdigest()[:16]
        else:
            diff, fingerprint = compare_tokenizers(self.model_dir, Path(t.model))
            if diff:
                raise PolicyError(f"teacher {t.model} and student {self.model_dir}: {diff}: distilling the teacher's token "
                                  f"log-probabilities needs one tokenizer; {fix}")
            self._teacher_tokenizer = fingerprint
        return self._teacher_tokenizer

    def distill_data(self, rid: int) -> tuple[list, dict[str, Any]]:
        """The on-policy distillation stage's rows: this round's answers to train-split tasks with
        their sampled tokens, each scored token by token by the teacher (stored in teacher_logprobs
        with the teacher and its tokenizer's fingerprint; answers already scored are not asked
        again). A teacher that fails leaves the answers it did not score out (an event says so); an
        answer whose figures are not one finite log-probability per token is never stored."""
        from selfdistill.errors import EngineError
        from selfdistill.records import DistillRecord, usable_logprobs, usable_topk

        dc, t = self.policy.training.distill, self.policy.teacher
        k = dc.top_k if dc.objective != "reverse_kl" else 0  # top-k objectives need the teacher's alternatives
        tasks = {x.id: x for x in self.store.round_tasks(rid) if x.split == "train"}  # the held-out wall
        sampled = self.store.sample_logprobs(rid)
        chosen, per_task = [], {}
        for g in self.store.generations(rid, "train"):
            if g["task_id"] in tasks and g["id"] in sampled and sampled[g["id"]][0]:
                per_task[g["task_id"]] = per_task.get(g["task_id"], 0) + 1
                if dc.samples_per_task is None or per_task[g["task_id"]] <= dc.samples_per_task:
                    chosen.append(g)
        have, tops = self._teacher_figures(rid, k)
        todo = [g for g in chosen if g["id"] not in have or (k and g["id"] not in tops)]
        counts: dict[str, Any] = {"distill_asked": len(todo), "distill_rejected": 0, "teacher_tokens": 0}
        if todo:
            fingerprint = self.teacher_tokenizer()
            name = t.name
            for i in range(0, len(todo), GENERATE_CHUNK):
                chunk = todo[i:i + GENERATE_CHUNK]
                ids = [sampled[g["id"]][0] for g in chunk]
                prompts = [self.messages(tasks[g["task_id"]]) for g in chunk]
                try:
                    teacher = self.teacher("distill", rid)
                    got = teacher.token_topk(prompts, ids, k) if k else [(x, None) for x in teacher.token_logprobs(prompts, ids)]
                except EngineError as e:
                    log("teacher unavailable", logging.WARNING, round=rid, error=str(e))
                    self.store.event("teacher_unavailable", f"round {rid}: distillation scored {i} of {len(todo)} answers: {e}",
                                     level="warning", round_id=rid)
                    break
                good, good_top = {}, {}
                for g, want, x in zip(chunk, ids, got):
                    lps, top = (x.logprobs, x) if k else x
                    if usable_logprobs(lps, len(want)) and (not k or usable_topk(top.ids, top.top, len(want), k)):
                        good[g["id"]] = [min(0.0, float(v)) for v in lps]
                        if k:
                            good_top[g["id"]] = ([list(r[:k]) for r in top.ids], [[min(0.0, float(v)) for v in r[:k]] for r in top.top])
                    else:
                        counts["distill_rejected"] += 1
                self.store.add_teacher_logprobs(name, fingerprint, good, good_top or None)
                counts["teacher_tokens"] += sum(len(v) for v in good.values())
                self.run.beat()
            if counts["distill_rejected"]:
                log("teacher answered unusable log-probabilities", logging.WARNING, round=rid, answers=counts["distill_rejected"])
            have, tops = self._teacher_figures(rid, k)
        rows = [DistillRecord(g["id"], g["prompt"], sampled[g["id"]][0], sampled[g["id"]][1], have[g["id"]],
                              topk_ids=tops[g["id"]][0] if k else None, topk_logprobs=tops[g["id"]][1] if k else None)
                for g in chosen if g["id"] in have and (not k or g["id"] in tops)]
        counts["distill_samples"] = len(rows)
        return rows, counts

    def _teacher_figures(self, rid: int, k: int) -> tuple[dict[int, list[float]], dict[int, tuple]]:
        return self.store.teacher_logprobs(rid), (self.store.teacher_topk(rid, k) if k else {})

    def _child_started(self, pid: int) -> None:
        self.training_child_pid = pid
        # recorded at once, so a restarted daemon can find and kill an orphaned trainer
        self.store.set_training_pid(self._training_run_id, pid)

    # evaluate --------------------------------------------------------------------------------

    def gate_tasks(self, rid: int) -> list[Task]:
        """The held-out items round `rid`'s gate tests on (evaluation.gate_items): the first
        heldout_items, or a window of them moved on by heldout_items each round, cyclically through
        the held-out pool in the order of the task keys. The round's item ids are kept (meta `gate_items:<round>`) the first time it
        asks, so a resumed round, or one whose policy was reloaded, tests on the same items."""
        key = f"gate_items:{rid}"
        raw = self.store.get_meta(key)
        if raw is not None:
            return self.store.tasks(ids=json.loads(raw))
        ev = self.policy.evaluation
        if ev.gate_items == "fixed":
            window = self.store.tasks(split="heldout", limit=ev.heldout_items)
        else:
            # in the order of the task keys (hashes): each window a fair draw of the pool, whatever order
            # the tasks were ingested in (on chain_sum the first distinct questions are mostly the few
            # 2-term ones, so windows by id differed threefold in difficulty)
            pool = sorted(self.store.tasks(split="heldout"), key=lambda t: t.key)
            n = min(ev.heldout_items, len(pool))
            start = ((rid - 1) * n) % len(pool) if pool else 0
            window = sorted((pool[start:] + pool[:start])[:n], key=lambda t: t.id)
        self.store.set_meta(key, json.dumps([t.id for t in window]))
        return window

    def gate_items_new(self, rid: int) -> int:
        """How many of round `rid`'s gate items no earlier round's gate tested on."""
        seen: set[int] = set()
        for r in self.store.query("SELECT key, value FROM meta WHERE key LIKE 'gate_items:%'"):
            if int(r["key"].split(":")[1]) < rid:
                seen.update(json.loads(r["value"]))
        return sum(t.id not in seen for t in self.gate_tasks(rid))

    def evaluate_checkpoint(self, ckpt_id: str, round_id: int) -> dict[str, Any]:
        """Held-out (the round's gate items) and anchor evaluation of a checkpoint: cached per
        checkpoint and item set, and each item answered once (an earlier answer is reused)."""
        from selfdistill.evaluation import EvalItem, anchor_nll

        tasks = self.gate_tasks(round_id)
        ids = [t.id for t in tasks]
        ev = self.store.latest_evaluation(ckpt_id, "heldout", ids)
        anc = self.store.latest_evaluation(ckpt_id, "anchors")
        if ev is not None and anc is not None:
            return {"heldout": ev, "anchors": anc}
        known = {} if ev is not None else {
            tid: EvalItem(tid, None if r["correct"] is None else bool(r["correct"]), r["score"], r["text"] or "", r["tokens"] or 0)
            for tid, r in self.store.answers_of(ckpt_id, "heldout", ids).items()}
        asks = anc is None or (ev is None and len(known) < len(ids))
        adapter = self.serving.adapter_for(ckpt_id) if asks else None
        if ev is None:
            self._measure(ckpt_id, adapter, "heldout", tasks, round_id, known)
        if anc is None:
            refs = self.anchor_refs()
            nll = anchor_nll(self.engine, adapter, [chat_messages(p, self.policy.student.system_prompt) for p in self.policy.evaluation.anchor_prompts], refs)
            self.store.add_evaluation(ckpt_id, "anchors", {"nll": nll}, [], round_id)
        return {"heldout": self.store.latest_evaluation(ckpt_id, "heldout", ids), "anchors": self.store.latest_evaluation(ckpt_id, "anchors")}

    def _measure(self, ckpt_id: str, adapter: str | None, suite: str, tasks: list[Task], round_id: int | None,
                 known: dict | None = None) -> None:
        """Greedy answers of one checkpoint to `tasks` (those in `known` reused, not asked again),
        verified and stored as evaluation `suite`; a task no verifier can check is stored unverified
        (its answer is what the pairwise judge compares; the gate then needs one: gates.decide)."""
        from selfdistill.evaluation import evaluate_heldout
        from selfdistill.scoring.verifiers import resolve_verifier

        def verify(text: str, task: Task):
            v = resolve_verifier(task, self.policy.tasks.default_verifier, self.policy.scoring, (str(self.state_dir),))
            if v is None:
                return None, None
            r = v(text, task)
            return r.score, r.correct

        res = evaluate_heldout(self.engine, adapter, tasks, verify, self.messages, self.policy.evaluation.max_tokens, known)
        self.store.add_evaluation(ckpt_id, suite, res.metrics, [dataclasses.asdict(i) for i in res.items], round_id)

    def audit(self, round_id: int | None) -> list[str]:
        """Measure the base and every promoted checkpoint not yet measured on the audit split
        (evaluation.audit_items; nothing reads these figures to decide); the checkpoints measured.
        A failure is logged and left for the next promotion: it never fails a round."""
        n = self.policy.evaluation.audit_items
        tasks = self.store.tasks(split="audit", limit=n) if n else []
        if not tasks:
            return []
        ids, done = [t.id for t in tasks], []
        for ckpt_id in self.store.promoted_chain():  # the base first
            if self.store.latest_evaluation(ckpt_id, "audit", ids) is not None:
                continue
            try:
                self._measure(ckpt_id, self.serving.adapter_for(ckpt_id), "audit", tasks, round_id)
            except SelfdistillError as e:
                log("audit not measured", logging.WARNING, checkpoint=ckpt_id, error=str(e))
                break
            done.append(ckpt_id)
            ev = self.store.latest_evaluation(ckpt_id, "audit", ids)
            log("audit measured", checkpoint=ckpt_id, accuracy=ev.metrics.get("accuracy"), n=ev.metrics.get("n"))
        return done

    def anchor_refs(self) -> list[str]:
        """The base model's greedy answers to the anchor prompts, computed once and kept."""
        key = "anchor_refs:" + json.dumps(self.policy.evaluation.anchor_prompts)
        raw = self.store.get_meta(key)
        if raw is not None:
            return json.loads(raw)
        from selfdistill.evaluation import anchor_references

        msgs = [chat_messages(p, self.policy.student.system_prompt) for p in self.policy.evaluation.anchor_prompts]
        refs = anchor_references(self.engine, msgs, self.policy.evaluation.anchor_max_tokens)
        self.store.set_meta(key, json.dumps(refs))
        return refs

    def incumbent_adapter(self, rnd: Round, load: bool = True) -> tuple[str, str | None]:
        """The round's incumbent and its adapter name in the engine (`load=False`: only check that
        it can be served). An incumbent whose adapter truly cannot be served (gone, damaged, for
        another base) is replaced by the base: the switch, the round's new incumbent and the
        reason are one transaction. Any other error propagates (the phase is retried) and leaves
        `current` alone."""
        from selfdistill import checkpoints

        inc = rnd.incumbent_id
        try:
            if not load:
                if inc != "base":
                    checkpoints.servable_adapter_dir(self.state_dir, inc)
                return inc, None
            return inc, self.serving.adapter_for(inc)
        except (CheckpointError, ModelError) as e:
            why = f"incumbent {inc} cannot be served ({e}); the base is served instead"
            log("incumbent cannot be served; serving the base", logging.ERROR, round=rnd.id, incumbent=inc, error=str(e))

            def record() -> None:
                self.store.update_round(rnd.id, incumbent_id="base")
                self.store.event("incumbent_unloadable", why, level="error", round_id=rnd.id)

            checkpoints.promote(self.store, self.state_dir, "base", why, kind="fallback", round_id=rnd.id,
                                expected_current=inc, also=record)
            return "base", None

    def phase_evaluate(self, rnd: Round, t0: float) -> None:
        rid = rnd.id
        cand = rnd.candidate_id
        inc, _ = self.incumbent_adapter(rnd, load=False)  # evaluate_checkpoint loads it if it is not measured yet
        inc_ev = self.evaluate_checkpoint(inc, rid)
        hold_for_test("evaluate:between")
        try:
            cand_ev = self.evaluate_checkpoint(cand, rid)
        except (CheckpointError, ModelError) as e:
            why = str(e)
            self.finish(rid, t0, "evaluate", {}, decision="fail", status="failed", reasons=[why], error=why,
                        also=lambda: self.store.set_checkpoint_status(cand, "failed", why))
            return
        i_m, c_m = inc_ev["heldout"].metrics, cand_ev["heldout"].metrics
        rotate, new = self.policy.evaluation.gate_items == "rotate", self.gate_items_new(rid)
        pairwise = self.pairwise(rid, inc_ev["heldout"], cand_ev["heldout"]) if self.policy.evaluation.pairwise_judge != "none" else None
        with self.store.transaction():
            self.store.merge_round_metrics(rid, {
                "incumbent_accuracy": i_m.get("accuracy"), "candidate_accuracy": c_m.get("accuracy"),
                "incumbent_ci": [i_m.get("ci_low"), i_m.get("ci_high")], "candidate_ci": [c_m.get("ci_low"), c_m.get("ci_high")],
                **({"pairwise": pairwise} if pairwise else {}),
            })
            self.store.record_phase(rid, "evaluate", t0, {"items": i_m.get("n"), "new_items": new}, "decide")
        self.say(rid, "evaluate", incumbent=_acc(i_m), candidate=_acc(c_m), **({"new_items": new} if rotate else {}))

    def pairwise(self, rid: int, inc_ev, cand_ev) -> dict[str, Any]:
        """The candidate's win rate against the incumbent by the pairwise judge
        (evaluation.pairwise_judge) on the first pairwise_items held-out items, each asked in both
        orders (judges.judge_pairwise): a win counts 1, a loss 0, a tie (the same answer, a
        position-following or unparseable verdict) one half. A judge whose verdicts followed the
        position more than its max_position_bias, or that failed its anchor check, is not trusted:
        the gate then fails (`trusted`, `problem`), as it does when the teacher's token budget is
        spent. Any other engine error propagates (the phase retries)."""
        from selfdistill.scoring.judges import judge_pairwise

        ev_cfg, sc = self.policy.evaluation, self.policy.scoring
        who = ev_cfg.pairwise_judge
        cfg = sc.teacher_judge if who == "teacher" else sc.self_judge
        tasks = {t.id: t for t in self.gate_tasks(rid)}
        inc_text = {i["task_id"]: i["text"] or "" for i in inc_ev.items}
        ids = [i["task_id"] for i in cand_ev.items if i["task_id"] in inc_text and i["task_id"] in tasks][: ev_cfg.pairwise_items]
        cand_text = {i["task_id"]: i["text"] or "" for i in cand_ev.items}
        differ = [tid for tid in ids if cand_text[tid].strip() != inc_text[tid].strip()]
        engine, adapter = (self.teacher("pairwise", rid), None) if who == "teacher" else (self.engine, self.serving.adapter_for(self.current_id()))
        unavailable = None
        try:
            verdicts = judge_pairwise(engine, [(self.prompt_text(tasks[t]), cand_text[t], inc_text[t]) for t in differ], cfg,
                                      adapter=adapter) if differ else []
        except TeacherBudgetSpent as e:  # for good: no win rate to trust, the gate fails (a passing error retries the phase)
            log("pairwise judge unavailable", logging.WARNING, round=rid, error=str(e))
            verdicts, unavailable = [], f"pairwise judge '{who}' unavailable: {e}"
        wins = sum(v.winner == "a" for v in verdicts)
        losses = sum(v.winner == "b" for v in verdicts)
        biased = sum(v.position_biased for v in verdicts)
        unparseable = sum(v.unparseable for v in verdicts)
        n = len(ids)
        win_rate = (wins + 0.5 * (n - wins - losses)) / n if n else 0.5
        problem = unavailable
        if problem is None and who in self.unhealthy_judges():
            problem = f"pairwise judge '{who}' failed its anchor check (judge_health)"
        elif verdicts and biased / len(verdicts) > cfg.max_position_bias:
            problem = (f"pairwise judge '{who}' followed the answers' position in {biased} of {len(verdicts)} comparisons "
                       f"(> max_position_bias {cfg.max_position_bias:g})")
        out = {"judge": who, "items": n, "judged": len(verdicts), "same_answer": n - len(differ), "wins": wins, "losses": losses,
               "position_biased": biased, "unparseable": unparseable, "win_rate": round(win_rate, 4), "trusted": problem is None,
               "problem": problem}
        log("pairwise judged", round=rid, **{k: v for k, v in out.items() if v is not None})
        return out

    # decide ----------------------------------------------------------------------------------

    def phase_decide(self, rnd: Round, t0: float) -> None:
        from selfdistill.gates import decide

        rid = rnd.id
        inc, cand = rnd.incumbent_id, rnd.candidate_id
        tasks = self.gate_tasks(rid)
        cats = {t.id: (t.category or "") for t in tasks}
        ids = [t.id for t in tasks]
        base_anchor = self.store.latest_evaluation("base", "anchors")
        c_metrics = self.gate_metrics(cand, ids, cats)
        pw = (self.store.get_round(rid).metrics or {}).get("pairwise") if self.policy.evaluation.pairwise_judge != "none" else None
        if pw is not None:
            c_metrics.win_rate, c_metrics.win_rate_problem = pw["win_rate"], pw.get("problem")
        d = decide(c_metrics, self.gate_metrics(inc, ids, cats), self.policy.gates,
                   base_anchor_nll=base_anchor.metrics["nll"] if base_anchor else None)
        decision = "promote" if d.promote else "reject"
        with self.store.transaction():
            self.store.merge_round_metrics(rid, _jsonable(d.numbers))
            self.store.update_round(rid, decision=decision, reasons=d.reasons)
            if not d.promote:
                self.store.set_checkpoint_status(cand, "rejected", "; ".join(d.reasons))
            self.store.event("decision", f"round {rid}: {decision} {cand}: {'; '.join(d.reasons)}",
                             round_id=rid, data=_jsonable(d.numbers))
            if d.promote:
                self.store.record_phase(rid, "decide", t0, {"decision": decision}, "promote")
            else:
                self.store.record_phase(rid, "decide", t0, {"decision": decision}, "done")
                self.store.update_round(rid, status="done", finished_at=time.time())
        self.say(rid, "decide", decision=decision, reasons="; ".join(d.reasons))
        if not d.promote:
            self.serving.drop_adapter(cand)

    def gate_metrics(self, ckpt_id: str, ids: list[int], cats: dict[int, str]):
        """The gate's view of a checkpoint's stored evaluations."""
        from selfdistill.evaluation import gate_input

        ev = self.store.latest_evaluation(ckpt_id, "heldout", ids)
        if ev is None:
            raise SelfdistillError(f"checkpoint {ckpt_id} has no held-out evaluation on the current items; the evaluate phase must run first")
        return gate_input(ev, self.store.latest_evaluation(ckpt_id, "anchors"), cats)

    # promote ---------------------------------------------------------------------------------

    def phase_promote(self, rnd: Round, t0: float) -> None:
        from selfdistill import checkpoints

        rid, cand, inc = rnd.id, rnd.candidate_id, rnd.incumbent_id

        def record() -> None:
            self.store.record_phase(rid, "promote", t0, {}, "done")
            self.store.update_round(rid, status="done", finished_at=time.time())

        try:
            checkpoints.promote(self.store, self.state_dir, cand, f"round {rid}: gates passed", round_id=rid,
                                expected_current=inc, also=record)
        except PromotionSuperseded as e:
            why = str(e)
            self.finish(rid, t0, "promote", {}, decision="superseded", reasons=[why],
                        also=lambda: self.store.set_checkpoint_status(cand, "rejected", why))
            self.serving.drop_adapter(cand)
            return
        except CheckpointError as e:  # the candidate vanished or was damaged after the decision
            why = str(e)
            self.finish(rid, t0, "promote", {}, decision="fail", status="failed", reasons=[why], error=why,
                        also=lambda: self.store.set_checkpoint_status(cand, "failed", why))
            return
        self.serving.drop_adapter(inc)
        self.say(rid, "promote", current=cand)
        self.audit(rid)  # after the decision and the commit: measured, never decided on

    # upkeep ----------------------------------------------------------------------------------

    def housekeeping(self) -> dict[str, Any]:
        from selfdistill.checkpoints import cleanup_temp_dirs, retention

        chain = self.store.promoted_chain()
        rejected = [c.id for c in reversed(self.store.checkpoints()) if c.status in ("rejected", "failed")]
        deleted = retention(self.state_dir, chain + [self.current_id()], rejected, self.policy.retention.keep_rejected)
        for cid in deleted:
            self.store.set_checkpoint_status(cid, "deleted")
        cleaned = cleanup_temp_dirs(self.state_dir) if self.training_child_pid is None else []
        self.store.wal_checkpoint()
        vacuumed = self.store.vacuum_if_worthwhile()
        out = {"deleted": deleted, "temp_cleaned": cleaned, "vacuumed": vacuumed}
        log("housekeeping", **out)
        return out

    def recover(self) -> None:
        """After a crash: make the `current` pointer agree with the store, drop half-written dirs."""
        from selfdistill.checkpoints import cleanup_temp_dirs, repair_pointer

        repaired = repair_pointer(self.state_dir, self.current_id())
        if repaired:
            self.store.event("repair", f"current pointer repaired: {repaired}", level="warning")
            log("current pointer repaired", logging.WARNING, detail=repaired)
        cleanup_temp_dirs(self.state_dir)


def is_disk_full(e: BaseException) -> bool:
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, StoreError) and "disk is full" in str(e)


def _is_trainer(pid: int) -> bool:
    """Is `pid` alive and a selfdistill training child (not a recycled PID)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"selfdistill.training" in f.read()
    except OSError:
        return False


def _test_delay(phase: str, run: RunState) -> None:
    """Test hooks, read from the environment at each phase's start:
    SELFDISTILL_TEST_DELAY="generate:30,train:5" sleeps at the start of those phases (a warm stop
    cuts it short; the heartbeat keeps beating), so a test can signal or kill the daemon while a
    given phase is in flight; SELFDISTILL_TEST_WEDGE="generate:20" sleeps without a heartbeat,
    as a cycle stuck in a call would, so a test can see the watchdog fire."""
    for var, beating in (("SELFDISTILL_TEST_DELAY", True), ("SELFDISTILL_TEST_WEDGE", False)):
        secs = hook_seconds(var, phase)
        if secs is None:
            continue
        log("test delay" if beating else "test wedge", phase=phase, seconds=secs)
        end = time.monotonic() + secs
        while time.monotonic() < end and not (beating and run.warm_stop.is_set()):
            if beating:
                run.beat()
            time.sleep(min(0.2, max(end - time.monotonic(), 0)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _acc(m: dict) -> str:
    if m.get("accuracy") is None:
        return "-"
    return f"{m['accuracy']:.3f} [{m.get('ci_low', 0):.3f},{m.get('ci_high', 0):.3f}]"


def _rl_figures(counts: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The round's policy-gradient figures for the report and status: mean reward and pass rate of
    the samples, clip fraction and KL of the steps; distilling, the samples and teacher tokens and
    the reverse KL to the teacher, and a top-k objective's divergence (nothing where no such stage
    trained)."""
    out: dict[str, Any] = {}
    if "grpo_steps" in metrics:
        out["rl"] = {"reward_mean": counts.get("reward_mean"), "pass_rate": counts.get("pass_rate"),
                     "clip_fraction": metrics.get("grpo_clip_fraction"), "kl": metrics.get("grpo_kl"),
                     "policy_kl": metrics.get("grpo_policy_kl"),
                     "entropy": metrics.get("grpo_entropy_last")}
    if "distill_steps" in metrics:
        out["distill"] = {"samples": counts.get("distill_samples"), "teacher_tokens": counts.get("teacher_tokens"),
                          "reverse_kl_before": metrics.get("distill_reverse_kl_before"),
                          "reverse_kl_last": metrics.get("distill_reverse_kl_last"),
                          "clip_fraction": metrics.get("distill_clip_fraction"), "entropy": metrics.get("distill_entropy_last")}
        if "distill_divergence_before" in metrics:  # a top-k objective's own loss
            out["distill"].update(divergence_before=metrics["distill_divergence_before"], divergence_last=metrics.get("distill_divergence_last"))
    return out


def _numeric(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float))}


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))
