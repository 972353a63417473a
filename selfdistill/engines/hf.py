"""The transformers engine: batched `generate` with left padding, adapters through peft, scores
from one forward pass. It serves where vLLM can't be installed, and it is the reference that the
vLLM engine's outputs are checked against (same prompt rendering, same greedy tokens).
"""

from __future__ import annotations

import gc
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
from selfdistill.models import check_model_dir, offline_env, serving_dtype


class TransformersEngine(ScoresGivenTokens):
    def __init__(self, model_dir: str | Path, cfg: EngineConfig, *, seed: int = 0):
        self.model_dir = check_model_dir(model_dir)
        self.cfg = cfg
        self.seed = seed
        self.max_model_len = context_length(self.model_dir, cfg.max_model_len)
        self._base_shapes = base_weight_shapes(self.model_dir)
        self._adapters: dict[str, str] = {}  # name -> path, kept to reload after release()
        offline_env()
        import torch
        from transformers import AutoTokenizer

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        cuda = torch.cuda.is_available()
        if cfg.device == "cuda" and not cuda:
            raise EngineError("engine.device = 'cuda' but torch sees no CUDA device: install the CUDA build of torch "
                              "(pip install -e '.[gpu]'), or set engine.device = 'auto'")
        self.device = torch.device("cuda" if cuda and cfg.device != "cpu" else "cpu")
        torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eos_id = self.tokenizer.eos_token_id
        self.model = None
        self._load()

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        dtype = serving_dtype(self.cfg.dtype, self.device.type == "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=dtype).to(self.device).eval()
        self.dtype = self.model.dtype
        for name, path in self._adapters.items():
            self._attach(name, path)

    def _attach(self, name: str, path: str) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False).eval()

    def _live(self):
        if self.model is None:
            raise EngineError("the transformers engine is released (training round in progress or closed): call resume() first")
        return self.model

    def _with_adapter(self, adapter: str | None):
        """A context in which the model computes with `adapter` (None: the bare base)."""
        import contextlib

        model = self._live()
        if adapter is None:
            return model.disable_adapter() if self._adapters else contextlib.nullcontext()
        loaded_adapter(self._adapters, adapter)
        model.set_adapter(adapter)
        return contextlib.nullcontext()

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, adapter: str | None = None
    ) -> list[list[Completion]]:
        import torch
        from transformers import GenerationConfig

        ids = render_all(self.tokenizer, prompts, self.max_model_len)
        greedy = params.temperature == 0.0
        gcfg = GenerationConfig(
            max_new_tokens=min(params.max_tokens, self.max_model_len - max(len(x) for x in ids)),
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None,  # vLLM applies no top-k unless asked; neither do we
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            stop_strings=list(params.stop) or None,
            return_dict_in_generate=True,
            output_logits=params.logprobs,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        # one row per sample; longest first so a batch holds rows of similar length (less padding)
        rows = sorted(((i, x) for i, x in enumerate(ids) for _ in range(params.n)), key=lambda r: -len(r[1]))
        results: list[list[Completion]] = [[] for _ in ids]
        bs = self.cfg.batch_size
        with self._with_adapter(adapter), torch.inference_mode():
            for s in range(0, len(rows), bs):
                chunk = rows[s : s + bs]
                width = max(len(x) for _, x in chunk)
                inp = torch.tensor([[self.pad_id] * (width - len(x)) + x for _, x in chunk], device=self.device)
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for _, x in chunk], device=self.device)
                kw = {"tokenizer": self.tokenizer} if params.stop else {}
                out = self.model.generate(input_ids=inp, attention_mask=mask, generation_config=gcfg, **kw)
                gen = out.sequences[:, width:].tolist()
                for b, (i, x) in enumerate(chunk):
                    steps = [out.logits[t][b] for t in range(len(gen[b]))] if params.logprobs else None
                    results[i].append(self._completion(len(x), gen[b], steps, params.stop))
        return results

    def _completion(self, prompt_tokens: int, gen: list[int], steps, stop: tuple[str, ...]) -> Completion:
        import torch

        finish = "length"
        if self.eos_id in gen:
            # vLLM counts the EOS token among the completion's tokens; so do we
            gen = gen[: gen.index(self.eos_id) + 1]
            finish = "stop"
        text = self.tokenizer.decode(gen, skip_special_tokens=True)
        if stop:
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        lps = None
        if steps is not None:
            lps = [torch.log_softmax(steps[t].float(), -1)[tok].item() for t, tok in enumerate(gen)]
        return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=len(gen), finish_reason=finish, logprobs=lps,
                          token_ids=list(gen) if steps is not None else None)

    def score(
        self, prompts: Sequence[Prompt], completions: Sequence[str], adapter: str | None = None
    ) -> list[tuple[float, int]]:
        return score_completions(self, prompts, completions, adapter)

    def _scored(self, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]], k: int, adapter: str | None) -> list[TokenTopK]:
        import torch

        heads = render_all(self.tokenizer, prompts, self.max_model_len)
        full = [h + list(t) for h, t in zip(heads, token_ids)]
        for i, f in enumerate(full):
            if len(f) > self.max_model_len:
                raise EngineError(f"prompt {i} with its completion has {len(f)} tokens, the engine's context is "
                                  f"{self.max_model_len}: shorten it or raise engine.max_model_len")
        res: list[TokenTopK] = []
        bs = self.cfg.batch_size
        with self._with_adapter(adapter), torch.inference_mode():
            for s in range(0, len(full), bs):
                chunk, hs = full[s : s + bs], heads[s : s + bs]
                width = max(len(f) for f in chunk)
                inp = torch.tensor([f + [self.pad_id] * (width - len(f)) for f in chunk], device=self.device)
                mask = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in chunk], device=self.device)
                logp = torch.log_softmax(self.model(input_ids=inp, attention_mask=mask).logits.float(), -1)
                for b, (f, h) in enumerate(zip(chunk, hs)):
                    if len(f) == len(h):
                        res.append(TokenTopK([], [], []))
                        continue
                    # the token at position j is predicted by the logits at j - 1
                    rows = logp[b, torch.arange(len(h), len(f), device=self.device) - 1]
                    given = rows.gather(-1, torch.tensor(f[len(h):], dtype=torch.long, device=self.device).unsqueeze(-1)).squeeze(-1).tolist()
                    if k:
                        top = rows.topk(min(k, rows.shape[-1]), dim=-1)
                        res.append(TokenTopK(given, top.indices.tolist(), top.values.tolist()))
                    else:
                        res.append(TokenTopK(given, [], []))
        return res

    def load_adapter(self, ref: AdapterRef) -> None:
        path = str(check_adapter_dir(ref.path, self.model_dir, self._base_shapes))
        self.drop_adapter(ref.name)
        if self.model is not None:
            self._attach(ref.name, path)
        self._adapters[ref.name] = path

    def drop_adapter(self, name: str) -> None:
        if self._adapters.pop(name, None) is None or self.model is None:
            return
        if self._adapters:
            self.model.delete_adapter(name)
        else:
            # peft keeps pointing at a deleted last adapter; unwrapping gives back the bare base
            self.model = self.model.unload()

    def release(self) -> None:
        if self.cfg.release_for_training == "keep" or self.model is None:
            return
        self.model = None
        gc.collect()
        free_device_memory("transformers")

    def resume(self) -> None:
        if self.model is None:
            self._load()

    def close(self) -> None:
        self.model = None
        gc.collect()
        free_device_memory("transformers")
