"""Generation engines behind one interface (`base.Engine`), and the factories that pick one from a
policy: `make_engine` for the student, `make_teacher_engine` for the teacher.

Importing this package imports no torch, vllm, transformers or httpx: each engine's module is
imported when an engine of that kind is made.
"""

from __future__ import annotations

from pathlib import Path

from selfdistill.config import EngineConfig, TeacherConfig
from selfdistill.engines.base import AdapterRef, Completion, Engine, Prompt, SamplingParams

__all__ = ["AdapterRef", "Completion", "Engine", "Prompt", "SamplingParams", "make_engine", "make_teacher_engine"]


def make_engine(
    cfg: EngineConfig, model_dir: str | Path | None, *, lora_rank: int | None, seed: int = 0, cache_dir: str | Path
) -> Engine:
    """The student's engine of kind `cfg.kind`; `model_dir` is unused by a server (kind "openai")."""
    if cfg.kind == "vllm":
        from selfdistill.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, cfg, lora_rank=lora_rank, seed=seed, cache_dir=cache_dir)
    if cfg.kind == "transformers":
        from selfdistill.engines.hf import TransformersEngine

        return TransformersEngine(model_dir, cfg, seed=seed)
    from selfdistill.engines.openai_compat import OpenAIEngine

    return OpenAIEngine(cfg.server)


def make_teacher_engine(teacher: TeacherConfig, cache_dir: str | Path, *, seed: int = 0) -> Engine:
    """The teacher's engine: a server, a server this process runs (its files under `cache_dir`), or
    a local model without LoRA (sampling is the caller's)."""
    if teacher.kind == "openai":
        from selfdistill.engines.openai_compat import OpenAIEngine

        return OpenAIEngine(teacher.endpoint)
    if teacher.kind == "served":
        from selfdistill.engines.served import ServedTeacher

        return ServedTeacher(teacher, Path(cache_dir) / "teacher-server", Path(cache_dir) / "teacher-server" / "server.log")
    cfg = EngineConfig(kind=teacher.kind)
    return make_engine(cfg, teacher.model, lora_rank=None, seed=seed, cache_dir=cache_dir)
