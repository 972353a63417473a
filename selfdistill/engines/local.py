"""What the in-process engines (vLLM offline, transformers) share: checking a model directory and
an adapter directory before a library sees them, the context length, and turning a prompt into
token ids the same way in both engines (so their outputs can be compared token for token).

Imports only the standard library and safetensors' header reader; the tokenizer is passed in.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from selfdistill.engines.base import Prompt, TokenTopK
from selfdistill.errors import EngineError, ModelError

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def context_length(model_dir: Path, wanted: int) -> int:
    """The context the engine reserves: the policy's max_model_len, capped by what the model knows.

    vLLM refuses to start with a max_model_len above the model's position embeddings.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    return min(wanted, cfg.get("max_position_embeddings") or wanted)


def base_weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of every base weight, read from the safetensors headers only (no tensor is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def check_adapter_dir(path: str | Path, model_dir: Path, base_shapes: dict[str, tuple[int, ...]]) -> Path:
    """Refuse an adapter directory that is missing, half-written, or made for another base model."""
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"{p}: adapter directory does not exist")
    cfg_file = p / "adapter_config.json"
    weights = [p / w for w in ADAPTER_WEIGHTS if (p / w).is_file()]
    if not cfg_file.is_file() or not weights:
        raise ModelError(
            f"{p}: half-written adapter (adapter_config.json and adapter_model.safetensors expected): "
            "write it to a temporary name and rename it into place"
        )
    try:
        acfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError:
        raise ModelError(f"{p}/adapter_config.json: not valid JSON (half-written adapter?)") from None
    named = acfg.get("base_model_name_or_path")
    # The recorded base is a path on the trainer's machine; only a directory holding a different
    # model is proof of a mismatch. Weight shapes below catch the rest.
    if named and Path(named).is_dir() and Path(named).resolve() != model_dir.resolve():
        other = Path(named) / "config.json"
        if other.is_file() and json.loads(other.read_text()) != json.loads((model_dir / "config.json").read_text()):
            raise ModelError(f"{p}: adapter was made for base model {named}, not {model_dir}: load it into an engine of that model")
    if weights[0].suffix == ".safetensors":
        _check_shapes(p, weights[0], model_dir, base_shapes)
    return p


def _check_shapes(p: Path, weights: Path, model_dir: Path, base_shapes: dict[str, tuple[int, ...]]) -> None:
    from safetensors import safe_open

    with safe_open(str(weights), framework="np") as st:
        for k in st.keys():
            if ".lora_A." not in k and ".lora_B." not in k:
                continue
            # peft names "base_model.model.<module>.lora_A.weight" for base "<module>.weight"
            module = k.split(".lora_")[0].removeprefix("base_model.model.")
            base = base_shapes.get(module + ".weight")
            shape = tuple(st.get_slice(k).get_shape())
            if base is None:
                raise ModelError(f"{p}: adapter targets {module}, which base model {model_dir} does not have: it was made for another base")
            if len(base) != 2 or (".lora_A." in k and shape[1] != base[1]) or (".lora_B." in k and shape[0] != base[0]):
                raise ModelError(f"{p}: adapter weight {k} has shape {list(shape)}, base {module} has {list(base)}: it was made for another base")


def render(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template, a string as raw text."""
    return render_all(tokenizer, [prompt], limit=None)[0]


def render_all(tokenizer, prompts: Sequence[Prompt], limit: int | None, room: int = 1) -> list[list[int]]:
    """Render every prompt; one that leaves fewer than `room` positions of the context is an error.

    One batched call each to the template and the tokenizer: per-prompt calls cost ~10% of
    vLLM's throughput on a small model.
    """
    chats = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    texts = list(prompts)
    if chats:
        rendered = tokenizer.apply_chat_template([prompts[i] for i in chats], add_generation_prompt=True, tokenize=False)
        for i, t in zip(chats, rendered):
            texts[i] = t
    # the template already carries any special tokens the model wants
    out = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    for i, ids in enumerate(out):
        if limit is not None and len(ids) + room > limit:
            raise EngineError(
                f"prompt {i} has {len(ids)} tokens, the engine's context is {limit}: shorten it or raise engine.max_model_len"
            )
    return out


def score_completions(engine, prompts: Sequence[Prompt], completions: Sequence[str], adapter: str | None) -> list[tuple[float, int]]:
    """Engine.score of an in-process engine: each completion tokenized by its tokenizer, scored
    token by token (its `token_logprobs`) and summed."""
    tails = [engine.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    return [(float(sum(lps)), len(lps)) for lps in engine.token_logprobs(prompts, tails, adapter)]


def random_lora(model_dir: str | Path, out: str | Path, seed: int, r: int = 8, scale: float = 0.3, targets="all-linear") -> Path:
    """A peft LoRA adapter with random non-zero B (no training) saved to `out`: for tests and
    benchmarks, which need adapters that change the output without a training round."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(str(out))
    return Path(out)


# What a released engine may still hold on the device before the release counts as a leak: the
# CUDA context and library workspaces stay while the process lives; weights and caches must not.
DEVICE_LEAK_MIB = 256


def free_device_memory(engine: str) -> dict | None:
    """After an engine dropped its model and collected the garbage (both engines' release and close
    do, before calling this): hand the CUDA caching allocator's free blocks back to the device and
    check that they went, logging the figures (and a warning when more than DEVICE_LEAK_MIB is
    still allocated: something kept a reference to the weights). None where this process never
    used CUDA (torch not imported, or CUDA never initialised: it is not started here)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    reserved = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    figures = {"engine": engine, "reserved_before_mib": round(reserved / 2**20),
               "reserved_after_mib": round(torch.cuda.memory_reserved() / 2**20),
               "allocated_mib": round(torch.cuda.memory_allocated() / 2**20), "device_free_mib": round(free / 2**20),
               "device_total_mib": round(total / 2**20)}
    from selfdistill.logs import log

    if figures["allocated_mib"] > DEVICE_LEAK_MIB:
        log("device memory not returned after the engine's release", logging.WARNING, **figures)
    else:
        log("device memory returned", **figures)
    return figures


class ScoresGivenTokens:
    """token_logprobs and token_topk of a local engine, both from its `_scored(prompts, token_ids,
    k, adapter) -> list[TokenTopK]` (k = 0: the given tokens' figures only)."""

    def token_logprobs(self, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]], adapter: str | None = None) -> list[list[float]]:
        return [x.logprobs for x in self._scored(prompts, token_ids, 0, adapter)]

    def token_topk(self, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]], k: int, adapter: str | None = None) -> list[TokenTopK]:
        return self._scored(prompts, token_ids, k, adapter)
