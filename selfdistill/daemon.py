"""The daemon: the self-improvement cycle as a persisted phase machine, run as a service.

A round moves through

    sample -> generate -> score -> pair -> [train -> evaluate -> decide -> promote] -> done

and every phase commits its output to the store in the same transaction that moves the round to
its next phase, so a crash, `kill -9` or reboot loses at most the phase in flight, which is
simply run again on restart. Training happens in a child process (selfdistill.training); the
engine releases its memory before it and comes back after it.

Scheduling is APScheduler 3.x: the cycle is one job that never overlaps itself; interval/cron
triggers for training, periodic incumbent evaluation and housekeeping are jobs too, all on one
worker thread so that they never run concurrently with the cycle. The main thread only waits and
handles signals: SIGTERM/SIGINT = warm stop (finish the current phase, commit, exit 0), a second
one = cold stop (kill the training child's process group, exit 143), SIGHUP = reload the policy.

Exit codes: 0 warm stop or `--burst`/`--max-rounds` done; 10 stopped by a policy in the file;
other non-zero codes are errors (see selfdistill.errors).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from selfdistill.config import BUNDLED_STUDENT, Policy, load_policy
from selfdistill.errors import (
    CheckpointError,
    EngineError,
    PolicyError,
    SelfdistillError,
    StoppedByPolicy,
    StoreError,
)
from selfdistill.logs import log
from selfdistill.records import Candidate, Task, chat_messages
from selfdistill.service import StateLock, prepare_state_dir, sd_notify, watchdog_interval_s
from selfdistill.stopping import Progress, should_stop
from selfdistill.store import DB_NAME, Store

PHASES = ["sample", "generate", "score", "pair", "train", "evaluate", "decide", "promote", "done"]
DECIDED = ("promote", "reject", "fail", "skip")
EXIT_POLICY = StoppedByPolicy.exit_code

# Parts of a policy a SIGHUP may change while running; everything else needs a restart.
RELOADABLE = {"generation", "scoring", "pairs", "training", "evaluation", "gates", "schedule", "stopping", "retention", "logging", "name"}
FROZEN_PATHS = [("state_dir",), ("student",), ("engine",), ("teacher",), ("tasks", "heldout_fraction"), ("tasks", "sources"),
                ("monitoring",)]


# ---------------------------------------------------------------------------------------------
# state set-up shared by `init`, `run` and the maintenance commands


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


def ingest_tasks(policy: Policy, store: Store, teacher=None) -> dict[str, Any]:
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
    return {"added": added, "existing": existing, "problems": len(problems)}


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


# ---------------------------------------------------------------------------------------------
# the cycle


class StopRequested(Exception):
    """Raised between phases when a warm stop or a stopping policy ends the run."""


@dataclasses.dataclass
class RunState:
    started: float = dataclasses.field(default_factory=time.time)
    decided: int = 0
    stop_reason: str | None = None
    stop_is_policy: bool = False
    warm_stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    cold_stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    train_requested: bool = False
    eval_requested: bool = False
    housekeeping_requested: bool = False


class Cycle:
    """One service's rounds: owns the store, the engine and the phase functions."""

    def __init__(self, policy: Policy, store: Store, run: RunState, progress: bool = False, max_rounds: int | None = None):
        self.policy = policy
        self.store = store
        self.run = run
        self.progress = progress
        self.max_rounds = max_rounds
        self.state_dir = policy.state_dir
        self._engine = None
        self._teacher = None
        self._loaded: dict[str, str] = {}  # checkpoint id -> adapter name loaded in the engine
        self._load_counter = 0
        self._model_dir: Path | None = None
        self.training_child_pid: int | None = None
        self._rng = random.Random(policy.generation.seed)

    # -- engines ---------------------------------------------------------------------------

    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            self._model_dir = base_model_dir(self.policy)
        return self._model_dir

    @property
    def engine(self):
        if self._engine is None:
            from selfdistill.engines import make_engine

            t = time.time()
            self._engine = make_engine(
                self.policy.engine, self.model_dir, lora_rank=self.policy.student.lora.r,
                seed=self.policy.generation.seed, cache_dir=self.state_dir / "cache",
            )
            self._loaded.clear()
            log("engine started", kind=self.policy.engine.kind, seconds=round(time.time() - t, 2))
        return self._engine

    @property
    def teacher(self):
        if self._teacher is None and self.policy.teacher is not None:
            from selfdistill.engines import make_teacher_engine

            self._teacher = make_teacher_engine(self.policy.teacher, self.state_dir / "cache")
        return self._teacher

    def adapter_for(self, ckpt_id: str) -> str | None:
        """The engine's name for a checkpoint's adapter, loading it under a fresh name if needed."""
        if ckpt_id == "base":
            return None
        if ckpt_id in self._loaded:
            return self._loaded[ckpt_id]
        from selfdistill.engines.base import AdapterRef

        row = self.store.checkpoint(ckpt_id)
        if row is None or not row["path"]:
            raise CheckpointError(f"checkpoint {ckpt_id} has no adapter directory recorded")
        path = Path(row["path"])
        if not path.is_dir():
            raise CheckpointError(f"{path}: the adapter directory of {ckpt_id} vanished; it cannot be served or evaluated")
        self._load_counter += 1
        name = f"{ckpt_id}-v{self._load_counter}"
        self.engine.load_adapter(AdapterRef(name=name, path=str(path)))
        self._loaded[ckpt_id] = name
        return name

    def drop_adapter(self, ckpt_id: str) -> None:
        name = self._loaded.pop(ckpt_id, None)
        if name and self._engine is not None:
            self._engine.drop_adapter(name)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._teacher is not None:
            self._teacher.close()
            self._teacher = None

    # -- helpers ---------------------------------------------------------------------------

    def prompt_text(self, task: Task) -> str:
        return task.prompt + self.policy.tasks.prompt_suffix

    def messages(self, task: Task) -> list[dict[str, str]]:
        return chat_messages(self.prompt_text(task), self.policy.student.system_prompt)

    def current_id(self) -> str:
        return self.store.current_checkpoint()["id"]

    def say(self, round_id: int | None, phase: str, **fields: Any) -> None:
        log(f"round {round_id} {phase}", round=round_id, phase=phase, **fields)
        if self.progress:
            extra = "  ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            print(f"[{time.strftime('%H:%M:%S')}] round {round_id} | {phase:8} | {extra}", flush=True)
        sd_notify(f"STATUS=round {round_id}: {phase}")

    def check_stop(self) -> None:
        """Raise StopRequested if a signal, the STOP file or a stopping policy says so."""
        reason, is_policy = self.stop_reason()
        if reason:
            if self.run.stop_reason is None:
                self.run.stop_reason, self.run.stop_is_policy = reason, is_policy
            raise StopRequested(reason)

    def progress_snapshot(self, tasks_exhausted: bool = False) -> Progress:
        rounds = self.store.rounds()
        mine = [r for r in rounds if (r["finished_at"] or 0) >= self.run.started]  # finished during this run, resumed ones too
        trained = [r for r in rounds if r["decision"] in ("promote", "reject") and r["status"] != "running"]
        cur_eval = self.store.latest_evaluation(self.current_id(), "heldout")
        regress = sum(1 for r in trained if (r["metrics"] or {}).get("gain", 0) < 0)
        self._decided_this_run = sum(1 for r in mine if r["decision"] in DECIDED and r["status"] != "running")
        return Progress(
            decided_rounds=sum(1 for r in rounds if r["decision"] in DECIDED and r["status"] != "running"),
            wall_s=time.time() - self.run.started,
            generated_tokens=self.store.total_generated_tokens(),
            incumbent_accuracy=cur_eval["metrics"].get("accuracy") if cur_eval else None,
            decisions=[r["decision"] for r in trained],
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

    # -- the round -------------------------------------------------------------------------

    def run_round(self) -> dict[str, Any]:
        """Run (or resume) one round to its end, phase by phase; returns the finished round."""
        self.check_stop()
        rnd = self.store.open_round()
        if rnd is None:
            rid = self.store.create_round(self.current_id())
            log("round started", round=rid, incumbent=self.current_id())
        else:
            rid = rnd["id"]
            log("round resumed", round=rid, phase=rnd["phase"])
        while True:
            rnd = self.store.get_round(rid)
            phase = rnd["phase"]
            if phase == "done" or rnd["status"] != "running":
                return rnd
            t0 = time.time()
            _test_delay(phase, self.run.warm_stop)
            getattr(self, f"phase_{phase}")(rnd, t0)
            self.check_stop()

    def finish(self, rid: int, started: float, phase: str, counts: dict[str, Any], *, decision: str | None = None,
               status: str = "done", reasons: list[str] | None = None, error: str | None = None) -> None:
        with self.store.transaction():
            self.store.record_phase(rid, phase, started, counts, "done")
            self.store.update_round(rid, status=status, decision=decision, finished_at=time.time(),
                                    **({"reasons": reasons} if reasons is not None else {}), **({"error": error} if error else {}))
            if decision in ("fail", "skip"):
                self.store.event("decision", f"round {rid}: {decision}: {'; '.join(reasons or [])}",
                                 level="warning" if decision == "fail" else "info", round_id=rid)
        self.say(rid, "done", decision=decision or "collect", reasons="; ".join(reasons or []))

    # sample ----------------------------------------------------------------------------------

    def phase_sample(self, rnd: dict, t0: float) -> None:
        from selfdistill.tasks.curriculum import sample_tasks, sampling_weights

        rid = rnd["id"]
        self.maybe_expand(rid)
        pool = self.store.tasks(split="train")
        weights = sampling_weights(pool, self.policy.tasks.curriculum)
        chosen = sample_tasks(pool, weights, self.policy.tasks.per_round, random.Random(self.policy.generation.seed * 1000 + rid))
        if not chosen:
            reason, _ = self.stop_reason(tasks_exhausted=True)
            with self.store.transaction():
                self.store.record_phase(rid, "sample", t0, {"tasks": 0}, "done")
                self.store.update_round(rid, status="skipped", decision="skip", reasons=["no training task left to sample"], finished_at=time.time())
            self.say(rid, "sample", tasks=0, note="no training task left")
            if reason:
                self.run.stop_reason, self.run.stop_is_policy = reason, True
                raise StopRequested(reason)
            self.run.stop_reason, self.run.stop_is_policy = "tasks exhausted: no training task can be sampled any more", False
            raise StopRequested(self.run.stop_reason)
        with self.store.transaction():
            self.store.set_round_tasks(rid, [t.id for t in chosen])
            self.store.record_phase(rid, "sample", t0, {"tasks": len(chosen), "pool": len(pool)}, "generate")
        self.say(rid, "sample", tasks=len(chosen), pool=len(pool))

    def maybe_expand(self, rid: int) -> None:
        exp = [s for s in self.policy.tasks.sources if s.type == "expansion"]
        if not exp:
            return
        from selfdistill.tasks.expansion import expand_tasks

        for src in exp:
            engine = self.teacher if src.by == "teacher" else self.engine
            seeds = [t for t in self.store.tasks(split="train") if src.seeds_from in ("all", t.source)][:200]
            known = [t.prompt for t in self.store.tasks()]
            try:
                adapter = self.adapter_for(self.current_id()) if src.by == "student" else None
                res = expand_tasks(engine, seeds, src, known, random.Random(rid), adapter=adapter,
                                   system_prompt=self.policy.student.system_prompt if src.by == "student" else None)
            except EngineError as e:
                log("expansion skipped", logging.WARNING, round=rid, error=str(e))
                self.store.event("teacher_unavailable", f"expansion skipped: {e}", level="warning", round_id=rid)
                continue
            added, _ = self.store.add_tasks(res.tasks, self.policy.tasks.heldout_fraction, self.policy.tasks.audit_fraction)
            log("tasks expanded", round=rid, by=src.by, asked=res.asked, added=added, rejected=dict(res.rejected))
            self.store.event("expansion", f"{added} new tasks by {src.by}", round_id=rid,
                             data={"added": added, "asked": res.asked, "rejected": dict(res.rejected)})

    # generate --------------------------------------------------------------------------------

    def phase_generate(self, rnd: dict, t0: float) -> None:
        from selfdistill.engines.base import SamplingParams

        rid = rnd["id"]
        tasks = self.store.round_tasks(rid)
        g = self.policy.generation
        params = SamplingParams(n=g.samples_per_task, temperature=g.temperature, top_p=g.top_p,
                                max_tokens=g.max_tokens, stop=tuple(g.stop), seed=g.seed)
        ckpt = rnd["incumbent_id"]
        adapter = self.adapter_for(ckpt)
        outs = self.engine.generate([self.messages(t) for t in tasks], params, adapter=adapter)
        rows = []
        for t, comps in zip(tasks, outs):
            for i, c in enumerate(comps):
                rows.append({
                    "round_id": rid, "task_id": t.id, "checkpoint_id": ckpt, "purpose": "train", "sample_index": i,
                    "prompt": self.prompt_text(t), "text": c.text, "params": params.as_dict(),
                    "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
                })
        tokens = sum(r["completion_tokens"] for r in rows)
        with self.store.transaction():
            self.store.delete_generations(rid, "train")
            self.store.add_generations(rows)
            self.store.record_phase(rid, "generate", t0, {"generations": len(rows), "tokens": tokens}, "score")
        dt = time.time() - t0
        self.say(rid, "generate", generations=len(rows), tokens=tokens, tokens_per_s=round(tokens / max(dt, 1e-9), 1))

    # score -----------------------------------------------------------------------------------

    def phase_score(self, rnd: dict, t0: float) -> None:
        from selfdistill.scoring.verifiers import resolve_verifier

        rid = rnd["id"]
        tasks = {t.id: t for t in self.store.round_tasks(rid)}
        gens = self.store.generations(rid, "train")
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
                a = stats.setdefault(t.id, [0, 0.0])
                a[0] += 1
                a[1] += 1.0 if res.correct else 0.0
        score_rows += self.judge_scores(rid, tasks, gens, verdicts)
        with self.store.transaction():
            self.store.add_scores(score_rows)
            self.store.update_task_stats({k: (int(v[0]), v[1]) for k, v in stats.items()})
            self.store.record_phase(rid, "score", t0, {"scores": len(score_rows)}, "pair")
        n_correct = sum(1 for r in score_rows if r.get("correct"))
        n_ver = sum(1 for r in score_rows if r["scorer"].startswith("verifier"))
        self.say(rid, "score", scores=len(score_rows), correct=f"{n_correct}/{n_ver}",
                 pass_rate=round(n_correct / n_ver, 3) if n_ver else None)

    def judge_scores(self, rid: int, tasks: dict[int, Task], gens: list[dict], verdicts: dict[int, bool]) -> list[dict[str, Any]]:
        """Self- and teacher-judge scores, from judges whose anchor check passed.

        The check runs on this round's verifier-scored answers when the judge was never checked or
        its last check is older than `recheck_every_rounds`; an unhealthy judge scores nothing.
        """
        from selfdistill.feedback import anchor_check, judge_scores

        sc = self.policy.scoring
        rows: list[dict[str, Any]] = []
        prompts = {tid: self.prompt_text(t) for tid, t in tasks.items()}
        known = [{**g, "correct": verdicts.get(g["id"])} for g in gens]
        for who, cfg in (("self", sc.self_judge), ("teacher", sc.teacher_judge)):
            if not cfg.enabled:
                continue
            try:
                engine = self.engine if who == "self" else self.teacher
                adapter = self.adapter_for(self.current_id()) if who == "self" else None
                last = self.store.latest_judge_health(who)
                if last is None or rid - (last["round_id"] or 0) >= cfg.recheck_every_rounds:
                    h = anchor_check(engine, who, cfg, known, prompts, adapter, random.Random(rid))
                    self.store.add_judge_health(who, h.healthy, h.agreement, h.position_bias, h.distinct_scores,
                                                {"reasons": h.reasons, "n": h.n, "unparseable": h.unparseable}, rid)
                    level = logging.INFO if h.healthy else logging.WARNING
                    log("judge checked", level, round=rid, judge=who, healthy=h.healthy, agreement=h.agreement,
                        position_bias=h.position_bias, reasons=h.reasons)
                    if not h.healthy:
                        self.store.event("judge_unhealthy", f"{who} judge stops contributing: {'; '.join(h.reasons)}", level="warning", round_id=rid)
                    healthy = h.healthy
                else:
                    healthy = bool(last["healthy"])
                if healthy:
                    rows += judge_scores(engine, who, cfg, gens, prompts, adapter)
            except EngineError as e:
                log("judge unavailable", logging.WARNING, round=rid, judge=who, error=str(e))
                self.store.event("teacher_unavailable" if who == "teacher" else "judge_unavailable",
                                 f"{who} judge skipped this round: {e}", level="warning", round_id=rid)
        return rows

    # pair ------------------------------------------------------------------------------------

    def phase_pair(self, rnd: dict, t0: float) -> None:
        from selfdistill.pairs import build_pairs, build_sft, candidate_from

        rid = rnd["id"]
        tasks = {t.id: t for t in self.store.round_tasks(rid)}
        scores = self.store.scores_for_round(rid, "train")
        unhealthy = self.unhealthy_judges()
        # one candidate per generation from all its signals; candidate_from ranks them
        # (a verifier's verdict always outranks a judge's; a teacher's outranks the student's own)
        signals: dict[int, dict[str, Any]] = {}
        for s_ in scores:
            source = s_["scorer"].split(":")[0]
            if source in unhealthy:
                continue
            sig = signals.setdefault(s_["generation_id"], {"row": s_})
            if source == "verifier":
                sig["verifier"] = (s_["score"], None if s_["correct"] is None else bool(s_["correct"]))
            elif s_["score"] is not None and (source == "teacher" or "judge" not in sig):
                sig["judge"] = (s_["score"], source)
        by_task: dict[int, list[Candidate]] = {}
        for gid, sig in signals.items():
            row = sig["row"]
            v_score, v_correct = sig.get("verifier", (None, None))
            j_score, j_source = sig.get("judge", (None, "self"))
            c = candidate_from(row["task_id"], row["text"], verifier_score=v_score, verifier_correct=v_correct,
                               judge_score=j_score, judge_source=j_source, generation_id=gid, tokens=row["completion_tokens"])
            by_task.setdefault(c.task_id, []).append(c)
        prompts = {tid: self.prompt_text(t) for tid, t in tasks.items()}
        pairs = build_pairs(by_task, prompts, self.policy.pairs)
        sft = build_sft(by_task, prompts, self.policy.pairs)
        sc = self.policy.scoring
        if (sc.teacher_label or sc.teacher_revise) and self.policy.teacher is not None:
            from selfdistill.engines.base import SamplingParams
            from selfdistill.feedback import teacher_feedback

            t = self.policy.teacher
            try:
                t_sft, t_pairs = teacher_feedback(
                    self.teacher, tasks, by_task, label=sc.teacher_label, revise=sc.teacher_revise,
                    params=SamplingParams(n=1, temperature=t.temperature, max_tokens=t.max_tokens),
                    prompt_suffix=self.policy.tasks.prompt_suffix, system_prompt=self.policy.student.system_prompt,
                    default_verifier=self.policy.tasks.default_verifier, weight=self.policy.pairs.weights.get("teacher", 1.0))
                sft += t_sft
                pairs += t_pairs
            except EngineError as e:  # the teacher is down: keep going on verifier data
                log("teacher unavailable", logging.WARNING, round=rid, error=str(e))
                self.store.event("teacher_unavailable", f"teacher labels skipped this round: {e}", level="warning", round_id=rid)
        with self.store.transaction():
            self.store.delete_training_data(rid)
            n_pairs, n_sft = self.store.add_training_data(rid, pairs, sft)
            train_now, why = self.train_due()
            counts = {"pairs": n_pairs, "sft": n_sft, "train": train_now}
            if train_now:
                self.store.record_phase(rid, "pair", t0, counts, "train")
            else:
                self.store.record_phase(rid, "pair", t0, counts, "done")
                self.store.update_round(rid, status="done", decision="collect", reasons=[why], finished_at=time.time())
        self.say(rid, "pair", pairs=n_pairs, sft=n_sft, train="yes" if train_now else f"no ({why})")

    def train_due(self) -> tuple[bool, str]:
        s = self.policy.schedule
        if s.train_windows and not in_windows(s.train_windows, time.localtime()):
            return False, "outside the training windows"
        new = self.store.count_new_training_data()
        if s.train_cron or s.train_interval_s:
            if self.run.train_requested:
                return True, "schedule"
            if s.train_min_new_pairs and new >= s.train_min_new_pairs:
                return True, f"{new} new pairs+examples"
            return False, "waiting for the training schedule"
        if new >= s.train_min_new_pairs:
            return True, f"{new} new pairs+examples"
        return False, f"{new} new pairs+examples < {s.train_min_new_pairs}"

    def unhealthy_judges(self) -> set[str]:
        out = set()
        for who in ("self", "teacher"):
            h = self.store.latest_judge_health(who)
            if h is not None and not h["healthy"]:
                out.add(who)
        return out

    # train -----------------------------------------------------------------------------------

    def phase_train(self, rnd: dict, t0: float) -> None:
        from selfdistill.checkpoints import discard_unrecorded, new_checkpoint_dir
        from selfdistill.training.child import kill_group, run_training_child
        from selfdistill.training.spec import RoundSpec

        rid = rnd["id"]
        tr = self.policy.training
        # a run left 'running' by a crash is over: its trainer must not outlive the daemon that
        # started it (it would race this one for the checkpoint id); it counts as an attempt
        for run in self.store.training_runs(rid):
            if run["status"] == "running":
                if run["pid"] and _is_trainer(run["pid"]):
                    kill_group(run["pid"])
                self.store.finish_training_run(run["id"], "failed", {}, "interrupted: the daemon stopped during training")
        attempt = len(self.store.training_runs(rid)) + 1
        data = self.store.training_data(rid, tr.data_scope, tr.replay_fraction, tr.seed)
        ckpt_id = self.store.next_checkpoint_id()
        # an adapter renamed into place by a trainer whose result was never recorded: train afresh
        if discard_unrecorded(self.state_dir, ckpt_id, recorded=False):
            log("discarded an unrecorded adapter directory", logging.WARNING, round=rid, checkpoint=ckpt_id)
        out_dir = new_checkpoint_dir(self.state_dir, ckpt_id)
        work = self.state_dir / "tmp" / f"round-{rid}-attempt-{attempt}"
        work.mkdir(parents=True, exist_ok=True)
        data_path = work / "data.jsonl"
        with open(data_path, "w") as f:
            for r in data["sft"]:
                f.write(json.dumps({"kind": "sft", "prompt": r["prompt"], "completion": r["completion"], "weight": r["weight"]}) + "\n")
            for r in data["pairs"]:
                f.write(json.dumps({"kind": "pair", "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "weight": r["weight"]}) + "\n")
        incumbent = rnd["incumbent_id"]
        inc_row = self.store.checkpoint(incumbent)
        spec = RoundSpec(
            round_id=rid, attempt=attempt, base_model_dir=str(self.model_dir),
            incumbent_adapter_dir=inc_row["path"] if incumbent != "base" else None,
            output_dir=str(out_dir), data_path=str(data_path), system_prompt=self.policy.student.system_prompt,
            training=tr.model_dump(mode="json"), lora=self.policy.student.lora.model_dump(mode="json"),
            result_path=str(work / "result.json"), threads=tr.threads, seed=tr.seed + attempt - 1,
            hf_home=str(self.state_dir / "cache" / "hf"),
        )
        run_id = self.store.start_training_run(rid, attempt, {"sft": len(data["sft"]), "pairs": len(data["pairs"]), "output": str(out_dir)})
        self._training_run_id = run_id
        self.say(rid, "train", attempt=attempt, sft=len(data["sft"]), pairs=len(data["pairs"]), candidate=ckpt_id)
        self.release_engine()
        try:
            result = run_training_child(spec, launcher=tr.launcher, num_processes=tr.num_processes,
                                        time_limit_s=tr.time_limit_s, stop_event=self.run.cold_stop,
                                        accelerate_config=tr.accelerate_config,
                                        on_start=self._child_started)
        finally:
            self.training_child_pid = None
        self.store.finish_training_run(run_id, result.status, result.metrics, result.reason, result.pid)
        if self.run.cold_stop.is_set():
            raise StopRequested("cold stop during training")
        if result.status == "succeeded":
            with self.store.transaction():
                self.store.add_checkpoint(ckpt_id, incumbent, rid, str(out_dir),
                                          {"sft": len(data["sft"]), "pairs": len(data["pairs"]), "metrics": result.metrics,
                                           "sft_ids": [r["id"] for r in data["sft"]], "pair_ids": [r["id"] for r in data["pairs"]]})
                self.store.mark_data_used(rid, [r["id"] for r in data["sft"]], [r["id"] for r in data["pairs"]])
                self.store.update_round(rid, candidate_id=ckpt_id)
                self.store.merge_round_metrics(rid, {"training": result.metrics})
                self.store.record_phase(rid, "train", t0, {"sft": len(data["sft"]), "pairs": len(data["pairs"]), **_numeric(result.metrics)}, "evaluate")
            self.run.train_requested = False
            shutil.rmtree(work, ignore_errors=True)
            self.say(rid, "train", result="candidate " + ckpt_id, seconds=round(time.time() - t0, 1))
        elif result.status == "skipped":
            self.run.train_requested = False
            self.finish(rid, t0, "train", {"sft": len(data["sft"]), "pairs": len(data["pairs"])}, decision="skip", reasons=[result.reason or "skipped"])
        else:
            self.store.event("training_failed", f"round {rid} attempt {attempt}: {result.reason}", level="error", round_id=rid)
            if attempt <= tr.max_retries:
                self.say(rid, "train", result="failed, will retry", reason=result.reason)
                return  # the phase stays 'train': the next pass retries
            self.finish(rid, t0, "train", {"attempts": attempt}, decision="fail", status="failed",
                        reasons=[f"training failed: {result.reason}"], error=result.reason)

    def _child_started(self, pid: int) -> None:
        self.training_child_pid = pid
        # recorded at once, so a restarted daemon can find and kill an orphaned trainer
        self.store.execute("UPDATE training_runs SET pid = ? WHERE id = ?", (pid, self._training_run_id))

    def release_engine(self) -> None:
        if self._engine is not None and self.policy.engine.release_for_training != "keep":
            t = time.time()
            self._engine.release()
            self._released = True
            log("engine released for training", seconds=round(time.time() - t, 2))

    def resume_engine(self) -> None:
        if getattr(self, "_released", False) and self._engine is not None:
            t = time.time()
            self._engine.resume()
            self._released = False  # the engine keeps its loaded adapters across release/resume
            log("engine resumed", seconds=round(time.time() - t, 2))

    # evaluate --------------------------------------------------------------------------------

    def heldout_tasks(self) -> list[Task]:
        return self.store.tasks(split="heldout", limit=self.policy.evaluation.heldout_items)

    def evaluate_checkpoint(self, ckpt_id: str, round_id: int | None) -> dict[str, Any]:
        """Held-out and anchor evaluation of a checkpoint (cached per checkpoint and item set)."""
        from selfdistill.evaluation import anchor_nll, evaluate_heldout
        from selfdistill.scoring.verifiers import resolve_verifier

        tasks = self.heldout_tasks()
        ids = [t.id for t in tasks]
        ev = self.store.latest_evaluation(ckpt_id, "heldout", ids)
        anc = self.store.latest_evaluation(ckpt_id, "anchors")
        if ev is not None and anc is not None:
            return {"heldout": ev, "anchors": anc}
        self.resume_engine()
        adapter = self.adapter_for(ckpt_id)
        if ev is None:
            def verify(text: str, task: Task):
                v = resolve_verifier(task, self.policy.tasks.default_verifier, self.policy.scoring, (str(self.state_dir),))
                if v is None:
                    raise SelfdistillError(f"held-out task {task.id} has no verifier: give it an answer or a verifier, or set tasks.default_verifier")
                r = v(text, task)
                return r.score, r.correct

            res = evaluate_heldout(self.engine, adapter, tasks, verify, self.messages, self.policy.evaluation.max_tokens)
            self.store.add_evaluation(ckpt_id, "heldout", res.metrics, [dataclasses.asdict(i) for i in res.items], round_id)
        if anc is None:
            refs = self.anchor_refs()
            nll = anchor_nll(self.engine, adapter, [chat_messages(p, self.policy.student.system_prompt) for p in self.policy.evaluation.anchor_prompts], refs)
            self.store.add_evaluation(ckpt_id, "anchors", {"nll": nll}, [], round_id)
        return {"heldout": self.store.latest_evaluation(ckpt_id, "heldout", ids), "anchors": self.store.latest_evaluation(ckpt_id, "anchors")}

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

    def phase_evaluate(self, rnd: dict, t0: float) -> None:
        rid = rnd["id"]
        inc, cand = rnd["incumbent_id"], rnd["candidate_id"]
        self.resume_engine()
        try:
            inc_ev = self.evaluate_checkpoint(inc, rid)
        except (CheckpointError, SelfdistillError) as e:
            # the incumbent cannot be served: say so loudly and measure against the base instead
            self.store.event("incumbent_unloadable", f"incumbent {inc} failed to load ({e}); the base is served", level="error", round_id=rid)
            log("incumbent failed to load; serving the base", logging.ERROR, round=rid, incumbent=inc, error=str(e))
            self.store.commit_promotion("base", f"incumbent {inc} failed to load: {e}", rid, kind="fallback")
            self.switch_pointer("base")
            inc = "base"
            self.store.update_round(rid, incumbent_id="base")
            inc_ev = self.evaluate_checkpoint("base", rid)
        try:
            cand_ev = self.evaluate_checkpoint(cand, rid)
        except CheckpointError as e:
            self.finish(rid, t0, "evaluate", {}, decision="fail", status="failed", reasons=[str(e)], error=str(e))
            self.store.set_checkpoint_status(cand, "failed", str(e))
            return
        with self.store.transaction():
            self.store.merge_round_metrics(rid, {
                "incumbent_accuracy": inc_ev["heldout"]["metrics"].get("accuracy"),
                "candidate_accuracy": cand_ev["heldout"]["metrics"].get("accuracy"),
                "incumbent_ci": [inc_ev["heldout"]["metrics"].get("ci_low"), inc_ev["heldout"]["metrics"].get("ci_high")],
                "candidate_ci": [cand_ev["heldout"]["metrics"].get("ci_low"), cand_ev["heldout"]["metrics"].get("ci_high")],
            })
            self.store.record_phase(rid, "evaluate", t0, {"items": inc_ev["heldout"]["metrics"].get("n")}, "decide")
        self.say(rid, "evaluate", incumbent=_acc(inc_ev["heldout"]["metrics"]), candidate=_acc(cand_ev["heldout"]["metrics"]))

    # decide ----------------------------------------------------------------------------------

    def phase_decide(self, rnd: dict, t0: float) -> None:
        from selfdistill.gates import decide

        rid = rnd["id"]
        inc, cand = rnd["incumbent_id"], rnd["candidate_id"]
        tasks = self.heldout_tasks()
        cats = {t.id: (t.category or "") for t in tasks}
        ids = [t.id for t in tasks]
        base_anchor = self.store.latest_evaluation("base", "anchors")
        d = decide(self.gate_metrics(cand, ids, cats), self.gate_metrics(inc, ids, cats), self.policy.gates,
                   base_anchor_nll=base_anchor["metrics"]["nll"] if base_anchor else None)
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
            self.drop_adapter(cand)

    def gate_metrics(self, ckpt_id: str, ids: list[int], cats: dict[int, str]):
        """The gate's view of a checkpoint's stored evaluations."""
        from selfdistill.gates import EvalMetrics, SanityStats

        ev = self.store.latest_evaluation(ckpt_id, "heldout", ids)
        if ev is None:
            raise SelfdistillError(f"checkpoint {ckpt_id} has no held-out evaluation on the current items; the evaluate phase must run first")
        anc = self.store.latest_evaluation(ckpt_id, "anchors")
        m = ev["metrics"]
        return EvalMetrics(
            correct={it["task_id"]: bool(it["correct"]) for it in ev["items"]},
            sanity=SanityStats(empty_fraction=m["empty_fraction"], repetition=m["repetition"], mean_length=m["mean_length"]),
            categories=cats,
            anchor_nll=anc["metrics"]["nll"] if anc else None,
        )

    # promote ---------------------------------------------------------------------------------

    def phase_promote(self, rnd: dict, t0: float) -> None:
        from selfdistill.checkpoints import checkpoint_path, verify_adapter_dir

        rid = rnd["id"]
        cand = rnd["candidate_id"]
        # a vanished or damaged candidate must fail before the store records anything
        verify_adapter_dir(checkpoint_path(self.state_dir, cand))
        with self.store.transaction():
            self.store.commit_promotion(cand, f"round {rid}: gates passed", rid)
            self.store.record_phase(rid, "promote", t0, {}, "done")
            self.store.update_round(rid, status="done", finished_at=time.time())
        # the store is the truth; the pointer follows it (repaired on restart if we die here)
        self.switch_pointer(cand)
        self.drop_adapter(rnd["incumbent_id"])
        self.say(rid, "promote", current=cand)

    def switch_pointer(self, ckpt_id: str) -> None:
        from selfdistill.checkpoints import switch_current

        switch_current(self.state_dir, ckpt_id)

    # upkeep ----------------------------------------------------------------------------------

    def housekeeping(self) -> dict[str, Any]:
        from selfdistill.checkpoints import cleanup_temp_dirs, retention

        chain = self.store.promoted_chain()
        rejected = [c["id"] for c in reversed(self.store.checkpoints()) if c["status"] in ("rejected", "failed")]
        deleted = retention(self.state_dir, chain + [self.current_id()], rejected, self.policy.retention.keep_rejected)
        for cid in deleted:
            self.store.set_checkpoint_status(cid, "deleted")
        cleaned = cleanup_temp_dirs(self.state_dir)
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


def _is_trainer(pid: int) -> bool:
    """Is `pid` alive and a selfdistill training child (not a recycled PID)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"selfdistill.training" in f.read()
    except OSError:
        return False


def _test_delay(phase: str, interrupt: threading.Event) -> None:
    """Test hook: SELFDISTILL_TEST_DELAY="generate:30,train:5" sleeps at the start of those phases,
    so a test can signal or kill the daemon while a given phase is in flight."""
    spec = os.environ.get("SELFDISTILL_TEST_DELAY")
    if not spec:
        return
    for part in spec.split(","):
        name, _, secs = part.partition(":")
        if name == phase:
            log("test delay", phase=phase, seconds=float(secs))
            interrupt.wait(float(secs))  # a warm stop cuts the artificial delay short, not the phase


def in_windows(windows, now: time.struct_time) -> bool:
    m = now.tm_hour * 60 + now.tm_min
    for w in windows:
        a = int(w.start[:2]) * 60 + int(w.start[3:])
        b = int(w.end[:2]) * 60 + int(w.end[3:])
        if (a <= m < b) if a <= b else (m >= a or m < b):
            return True
    return False


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _acc(m: dict) -> str:
    if m.get("accuracy") is None:
        return "-"
    return f"{m['accuracy']:.3f} [{m.get('ci_low', 0):.3f},{m.get('ci_high', 0):.3f}]"


def _numeric(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (d or {}).items() if isinstance(v, (int, float))}


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))


# ---------------------------------------------------------------------------------------------
# the daemon process


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
        """Re-read the policy; apply the parts that can change safely, refuse the rest."""
        try:
            new = load_policy(self.policy_path)
        except PolicyError as e:
            log("reload refused: the policy file is invalid; the old policy keeps running", logging.ERROR, error=str(e))
            self._event("reload_refused", f"invalid policy: {e}", "error")
            return False
        old = self.policy
        refused = [".".join(p) for p in FROZEN_PATHS if _get(old, p) != _get(new, p)]
        applied = [k for k in RELOADABLE if getattr(old, k) != getattr(new, k)]
        for k in applied:
            setattr(old, k, getattr(new, k))
        if refused:
            log("reload: some changes need a restart and were not applied", logging.WARNING, refused=refused)
            self._event("reload_partial", f"not applied (restart needed): {', '.join(refused)}", "warning")
        log("policy reloaded", applied=applied)
        self._event("reload", f"applied: {', '.join(applied) or 'nothing changed'}", "info")
        if self.scheduler is not None:
            self._schedule_jobs(reschedule=True)
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

    def _schedule_jobs(self, reschedule: bool = False) -> None:
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        s = self.policy.schedule
        sch = self.scheduler
        for job_id in ("train-interval", "train-cron", "incumbent-eval", "housekeeping"):
            if sch.get_job(job_id):
                sch.remove_job(job_id)
        if s.train_interval_s:
            sch.add_job(self._request_train, IntervalTrigger(seconds=s.train_interval_s), id="train-interval", executor="flags")
        if s.train_cron:
            sch.add_job(self._request_train, CronTrigger.from_crontab(s.train_cron), id="train-cron", executor="flags")
        if s.eval_interval_s:
            sch.add_job(self._request_eval, IntervalTrigger(seconds=s.eval_interval_s), id="incumbent-eval", executor="flags")
        sch.add_job(self._request_housekeeping, IntervalTrigger(seconds=s.housekeeping_interval_s), id="housekeeping", executor="flags")

    def _request_train(self) -> None:
        self.run_state.train_requested = True

    def _request_eval(self) -> None:
        self.run_state.eval_requested = True

    def _request_housekeeping(self) -> None:
        self.run_state.housekeeping_requested = True

    def _cycle_job(self) -> None:
        """One scheduled pass: rounds back to back (upkeep in between when asked) until a round
        only collected data without training, or the run stops. Never overlaps itself; the
        scheduler starts the next pass `schedule.idle_sleep_s` later."""
        if self.done.is_set():
            return
        cyc = self.cycle
        try:
            while True:
                if self.run_state.housekeeping_requested:
                    self.run_state.housekeeping_requested = False
                    cyc.housekeeping()
                if self.run_state.eval_requested:
                    self.run_state.eval_requested = False
                    cur = cyc.current_id()
                    ev = cyc.evaluate_checkpoint(cur, None)
                    log("incumbent evaluated", checkpoint=cur, accuracy=ev["heldout"]["metrics"].get("accuracy"))
                rnd = cyc.run_round()
                cyc.check_stop()
                if rnd["decision"] == "collect" and not self.burst:
                    return  # idle until the scheduler's next pass (or a training trigger)
        except StopRequested as e:
            log("stopping", reason=str(e))
            self.done.set()
        except BaseException as e:  # an unexpected failure ends the daemon with its message
            if _is_disk_full(e):
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
            self.cycle.recover()
            counts = ingest_tasks(self.policy, store)
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
            while not self.done.wait(wd or 0.5):
                if wd:
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


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(e, StoreError) and "disk is full" in str(e)


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


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        obj = getattr(obj, p)
    return obj


# ---------------------------------------------------------------------------------------------
# maintenance commands (the daemon may be running: they only use store transactions)


def force_promote(policy: Policy, ckpt_id: str, reason: str) -> None:
    from selfdistill import checkpoints

    store = Store.open(policy.state_dir / DB_NAME)
    try:
        if store.checkpoint(ckpt_id) is None:
            raise CheckpointError(f"no checkpoint {ckpt_id}; `selfdistill status` lists them")
        checkpoints.promote(_Forced(store), policy.state_dir, ckpt_id, reason)
    finally:
        store.close()


class _Forced:
    """The store as checkpoints.PromotionStore for a forced promotion (recorded as such)."""

    def __init__(self, store: Store):
        self.store = store

    def commit_promotion(self, ckpt_id: str, reason: str) -> str:
        return self.store.commit_promotion(ckpt_id, f"forced: {reason}", kind="forced_promote")


def rollback(policy: Policy, to: str | None, reason: str) -> str:
    from selfdistill import checkpoints

    store = Store.open(policy.state_dir / DB_NAME)
    try:
        cur = store.current_checkpoint()["id"]
        if to is None:
            chain = [c for c in store.promoted_chain() if c != cur]
            row = store.checkpoint(cur)
            parent = row["parent_id"] if row else None
            to = parent if parent and store.checkpoint(parent) and store.checkpoint(parent)["status"] in ("promoted", "base") else (chain[-1] if chain else None)
            if to is None:
                raise CheckpointError(f"{cur} has no previous promoted checkpoint to roll back to")
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
        if ckpt["id"] == "base":
            raise CheckpointError("the base model is current: there is no adapter to export yet")
        if merged:
            return export_merged(base_model_dir(policy), Path(ckpt["path"]), out)
        return export_adapter(Path(ckpt["path"]), out)
    finally:
        store.close()


def export_training_data(policy: Policy, out: Path) -> list[Path]:
    from selfdistill.pairs import export_jsonl, export_sft_jsonl
    from selfdistill.records import PairRecord, SftRecord

    store = Store.open(policy.state_dir / DB_NAME, readonly=True)
    try:
        last = store.execute("SELECT coalesce(max(id), 0) FROM rounds").fetchone()[0]
        data = store.training_data(last, "all")
    finally:
        store.close()
    out.mkdir(parents=True, exist_ok=True)
    pairs = [PairRecord(task_id=r["task_id"], prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"],
                        margin=r["margin"], weight=r["weight"], source=r["source"]) for r in data["pairs"]]
    sft = [SftRecord(task_id=r["task_id"], prompt=r["prompt"], completion=r["completion"], weight=r["weight"], source=r["source"]) for r in data["sft"]]
    p1, p2 = out / "pairs.jsonl", out / "sft.jsonl"
    export_jsonl(pairs, p1, policy.student.system_prompt)
    export_sft_jsonl(sft, p2, policy.student.system_prompt)
    return [p1, p2]
