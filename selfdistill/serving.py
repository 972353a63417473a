"""The engines' lifecycle: the student's engine and the teacher's, the names adapters are loaded
under, and releasing the engine's memory for training and idling.

The student's engine starts on first use. `release()` frees its memory (vLLM sleep, or shutdown
and restart, as the policy says); the engine comes back by itself on the next use, so no path out
of a training round (succeeded, skipped, failed, interrupted, or a restart after a kill) can meet
a released engine. Every checkpoint is loaded under a fresh adapter name: reloading a new version
under an old name serves stale weights in vLLM.

Heavy libraries are imported by the engines, lazily.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from selfdistill.config import Policy
from selfdistill.logs import log


class Serving:
    def __init__(self, policy: Policy, model_dir: Callable[[], Path]):
        # engine, student and teacher need a restart to change (config.reload_plan): keep them
        self.engine_cfg = policy.engine
        self.teacher_cfg = policy.teacher
        self.lora_rank = policy.student.lora.r
        self.seed = policy.generation.seed
        self.state_dir = policy.state_dir
        self._model_dir = model_dir
        self._engine = None
        self._teacher = None
        self._teacher_released = False
        self._released = False
        self._loaded: dict[str, str] = {}  # checkpoint id -> adapter name in the engine
        self._load_counter = 0

    @property
    def engine(self):
        """The student's engine, started or resumed as needed."""
        if self._engine is None:
            from selfdistill.engines import make_engine

            t = time.time()
            self._engine = make_engine(self.engine_cfg, self._model_dir(), lora_rank=self.lora_rank, seed=self.seed,
                                       cache_dir=self.state_dir / "cache")
            self._loaded.clear()
            self._released = False
            log("engine started", kind=self.engine_cfg.kind, seconds=round(time.time() - t, 2))
        elif self._released:
            self.resume()
        return self._engine

    @property
    def teacher(self):
        """The teacher's engine, started or resumed as needed (none without a [teacher] table)."""
        if self._teacher is None and self.teacher_cfg is not None:
            from selfdistill.engines import make_teacher_engine

            t = time.time()
            self._teacher = make_teacher_engine(self.teacher_cfg, self.state_dir / "cache")
            self._teacher_released = False
            if self.teacher_cfg.kind not in ("openai", "served"):  # a served teacher logs its server's start
                log("teacher started", kind=self.teacher_cfg.kind, model=self.teacher_cfg.model, seconds=round(time.time() - t, 2))
        elif self._teacher is not None and self._teacher_released:
            self._teacher.resume()
            self._teacher_released = False
        return self._teacher

    @property
    def released(self) -> bool:
        return self._released

    def adapter_for(self, ckpt_id: str) -> str | None:
        """The engine's name for a checkpoint's adapter, loading it under a fresh name if needed.

        Raises AdapterUnservable (a CheckpointError) when its directory is missing or damaged,
        before the engine is asked anything."""
        if ckpt_id == "base":
            return None
        if ckpt_id in self._loaded:
            return self._loaded[ckpt_id]
        from selfdistill.checkpoints import servable_adapter_dir
        from selfdistill.engines.base import AdapterRef

        path = servable_adapter_dir(self.state_dir, ckpt_id)
        self._load_counter += 1
        name = f"{ckpt_id}-v{self._load_counter}"
        self.engine.load_adapter(AdapterRef(name=name, path=str(path)))
        self._loaded[ckpt_id] = name
        return name

    def drop_adapter(self, ckpt_id: str) -> None:
        name = self._loaded.pop(ckpt_id, None)
        if name and self._engine is not None:
            self._engine.drop_adapter(name)

    def release(self, why: str = "training") -> None:
        """Free the student engine's memory (policy `engine.release_for_training`; 'keep' keeps it)
        and an in-process teacher's (it comes back at its next use)."""
        if self._teacher is not None and not self._teacher_released and self.teacher_cfg.kind != "openai":
            t = time.time()
            self._teacher.release()
            self._teacher_released = True
            log(f"teacher released for {why}", seconds=round(time.time() - t, 2))
        if self._engine is None or self._released or self.engine_cfg.release_for_training == "keep":
            return
        t = time.time()
        self._engine.release()
        self._released = True
        log(f"engine released for {why}", seconds=round(time.time() - t, 2))

    def resume(self) -> None:
        if not self._released or self._engine is None:
            return
        t = time.time()
        self._engine.resume()
        self._released = False  # the engine keeps its loaded adapters across release/resume
        log("engine resumed", seconds=round(time.time() - t, 2))

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        self._loaded.clear()
        self._released = False
        if self._teacher is not None:
            self._teacher.close()
            self._teacher = None


class MeteredTeacher:
    """The teacher's engine with every batch of requests counted in the store (teacher_usage: what
    for, how many requests and tokens) and refused once stopping.max_teacher_tokens is spent
    (TeacherBudgetSpent, an EngineError: the callers go on without the teacher, as when it is down)."""

    def __init__(self, engine, store, teacher: str, purpose: str, round_id: int | None, budget: int | None):
        self._engine, self._store, self._teacher = engine, store, teacher
        self._purpose, self._round, self._budget = purpose, round_id, budget

    def _metered(self, method: str, call, requests: int, tokens):
        if self._budget is not None:
            used = self._store.total_teacher_tokens()
            if used >= self._budget:
                from selfdistill.errors import TeacherBudgetSpent

                raise TeacherBudgetSpent(f"teacher {self._teacher}: token budget spent ({used} tokens used, stopping.max_teacher_tokens = "
                                         f"{self._budget}): raise the limit to go on with the teacher")
        t = time.time()
        out = call()
        prompt, answer = tokens(out)
        self._store.add_teacher_usage(self._round, self._teacher, self._purpose, method, requests, prompt, answer, round(time.time() - t, 3))
        return out

    def generate(self, prompts, params, adapter=None):
        return self._metered("generate", lambda: self._engine.generate(prompts, params, adapter=adapter), len(prompts), lambda out: (
            sum(c[0].prompt_tokens for c in out if c), sum(x.completion_tokens for c in out for x in c)))

    def score(self, prompts, completions, adapter=None):
        return self._metered("score", lambda: self._engine.score(prompts, completions, adapter=adapter), len(prompts),
                             lambda out: (0, sum(n for _, n in out)))

    def token_logprobs(self, prompts, token_ids, adapter=None):
        return self._metered("token_logprobs", lambda: self._engine.token_logprobs(prompts, token_ids, adapter=adapter), len(prompts),
                             lambda out: (0, sum(len(x) for x in out)))

    def token_topk(self, prompts, token_ids, k, adapter=None):
        return self._metered("token_topk", lambda: self._engine.token_topk(prompts, token_ids, k, adapter=adapter), len(prompts),
                             lambda out: (0, sum(len(x.logprobs) for x in out)))

    def __getattr__(self, name):
        return getattr(self._engine, name)


class BeatingEngine:
    """An engine whose generate runs in chunks with a heartbeat between them, so the watchdog
    sees a long generation making progress and a stuck one standing still."""

    def __init__(self, engine, beat: Callable[[], None], chunk: int):
        self._engine, self._beat, self._chunk = engine, beat, chunk

    def generate(self, prompts, params, adapter=None):
        out = []
        for i in range(0, len(prompts), self._chunk):
            out += self._engine.generate(prompts[i : i + self._chunk], params, adapter=adapter)
            self._beat()
        return out

    def __getattr__(self, name):
        return getattr(self._engine, name)
