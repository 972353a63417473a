"""Engine benchmark: the same prompts, model and sampling on the transformers and vLLM engines in
one run. Reports generated tokens/s of each and their ratio, engine start time, the time to load
and switch to a new adapter version, vLLM's release/resume (sleep or restart) and the engine
layer's overhead against raw `vllm.LLM.generate` on the same token ids.

    .venv/bin/python benchmarks/engines.py --model bundled --dtype bfloat16 --prompts 16 --samples 8 --tokens 48
    .venv/bin/python benchmarks/engines.py --model bundled --engines serving   # LoRA path vs merged
    .venv/bin/python benchmarks/engines.py --model bundled --engines merge     # merged copy: base dtype vs served dtype

Prints one JSON object; the figures go into benchmarks/RESULTS.md ("## Engines").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def chain_sum_prompts(n: int) -> list:
    """chain_sum-like questions (2-3 one-digit terms), deterministic."""
    out = []
    for i in range(n):
        terms = [(i * 7 + k * 3) % 10 for k in range(2 + i % 2)]
        q = " + ".join(map(str, terms))
        out.append([{"role": "user", "content": f"What is {q}? Give the answer as a number."}])
    return out


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def metered(fn):
    """(result, wall seconds, CPU seconds of this process): with other work on a 2-core machine,
    wall time measures the neighbours as much as the engine; CPU time does not."""
    c = time.process_time()
    out, dt = timed(fn)
    return out, dt, time.process_time() - c


def tokens(out) -> int:
    return sum(c.completion_tokens for cs in out for c in cs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (built here), 'bundled' (SmolLM2-135M) or a model directory")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (n)")
    ap.add_argument("--tokens", type=int, default=48, help="max tokens per sample")
    ap.add_argument("--dtype", default="bfloat16", choices=["auto", "bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the transformers engine")
    ap.add_argument("--batch-size", type=int, default=32, help="transformers engine batch")
    ap.add_argument("--engines", default="transformers,vllm",
                    help="comma list of: transformers, vllm, serving (vLLM's LoRA path against merged weights), "
                         "merge (a merged copy saved in the base's dtype against the served --dtype)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved engine-layer / raw vLLM runs (best is kept)")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from selfdistill.config import EngineConfig
    from selfdistill.engines.base import AdapterRef, SamplingParams
    from selfdistill.engines.local import random_lora
    from selfdistill.models import build_tiny_model, prepare_bundled

    work = Path(tempfile.mkdtemp(prefix="sd-bench-engines-"))
    if args.model == "tiny":
        model_dir = build_tiny_model(work / "tiny")
    elif args.model == "bundled":
        model_dir = prepare_bundled()
    else:
        model_dir = Path(args.model)
    ad1 = random_lora(model_dir, work / "v1", seed=1, scale=0.02)
    ad2 = random_lora(model_dir, work / "v2", seed=2, scale=0.02)
    prompts = chain_sum_prompts(args.prompts)
    sp = SamplingParams(n=args.samples, temperature=1.0, max_tokens=args.tokens)
    cfg = dict(dtype=args.dtype, max_model_len=512, cpu_kv_cache_gib=1.0, batch_size=args.batch_size, threads=args.threads)
    res: dict = {"model": str(model_dir), "args": vars(args), "cpus": os.cpu_count()}

    def adapter_switch(eng) -> dict:
        # load a version, use it, then the next version: what a promotion costs the engine
        _, t1 = timed(lambda: eng.load_adapter(AdapterRef("v1", str(ad1))))
        _, g1 = timed(lambda: eng.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), adapter="v1"))
        _, t2 = timed(lambda: eng.load_adapter(AdapterRef("v2", str(ad2))))
        _, g2 = timed(lambda: eng.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), adapter="v2"))
        eng.drop_adapter("v1")
        return {"load_v1_s": t1, "first_generate_v1_s": g1, "load_v2_s": t2, "first_generate_v2_s": g2}

    # transformers first: the in-process vLLM engine binds this process's threads to its core
    if "transformers" in args.engines:
        from selfdistill.engines.hf import TransformersEngine

        eng, start = timed(lambda: TransformersEngine(model_dir, EngineConfig(kind="transformers", **cfg), seed=0))
        eng.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
        out, dt, cpu = metered(lambda: eng.generate(prompts, sp))
        res["transformers"] = {"start_s": start, "tokens": tokens(out), "seconds": dt, "tokens_per_s": tokens(out) / dt,
                               "cpu_s": cpu, "tokens_per_cpu_s": tokens(out) / cpu, "adapter": adapter_switch(eng)}
        eng.close()

    if "vllm" in args.engines:
        _, imp = timed(lambda: __import__("vllm"))
        from vllm import SamplingParams as VSP

        from selfdistill.engines.local import render
        from selfdistill.engines.vllm_engine import VLLMEngine

        eng, start = timed(lambda: VLLMEngine(model_dir, EngineConfig(**cfg), lora_rank=8, seed=0, cache_dir=work / "cache"))
        eng.generate(prompts[:2], SamplingParams(max_tokens=4))  # warm-up
        ids = [{"prompt_token_ids": render(eng.tokenizer, p)} for p in prompts]
        vsp = VSP(n=args.samples, temperature=1.0, max_tokens=args.tokens)

        def raw():
            outs = eng.llm.generate(ids, vsp, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        layer, rawr, layer_cpu, raw_cpu = [], [], [], []
        for _ in range(args.reps):  # interleaved, so load from other work on the machine hits both alike
            out, dt, cpu = metered(lambda: eng.generate(prompts, sp))
            layer.append(tokens(out) / dt)
            layer_cpu.append(tokens(out) / cpu)
            n, dt, cpu = metered(raw)
            rawr.append(n / dt)
            raw_cpu.append(n / cpu)
        best_layer, best_raw = max(layer), max(rawr)
        rss0 = rss_mib()
        _, rel = timed(eng.release)
        rss1 = rss_mib()
        _, resm = timed(eng.resume)
        res["vllm"] = {
            "import_s": imp, "start_s": start, "tokens_per_s": best_layer, "runs_tokens_per_s": layer,
            "raw_tokens_per_s": best_raw, "raw_runs_tokens_per_s": rawr,
            "overhead_pct": 100 * (best_raw - best_layer) / best_raw,
            "tokens_per_cpu_s": max(layer_cpu), "raw_tokens_per_cpu_s": max(raw_cpu),
            "overhead_cpu_pct": 100 * (max(raw_cpu) - max(layer_cpu)) / max(raw_cpu),
            "adapter": adapter_switch(eng),
            "release": {"mode": eng.release_mode, "release_s": rel, "resume_s": resm, "rss_mib_before": rss0, "rss_mib_released": rss1},
        }
        eng.close()

    if "serving" in args.engines:
        # vLLM serving one adapter version through its LoRA path against the same adapter merged into
        # a copy of the base (engine.adapter_serving). One engine per process, so the two take
        # turns, A-B-A, and each mode's best run is kept.
        from selfdistill.engines.vllm_engine import VLLMEngine

        def serve(mode: str) -> dict:
            eng, start = timed(lambda: VLLMEngine(model_dir, EngineConfig(**cfg, adapter_serving=mode), lora_rank=8,
                                                  seed=0, cache_dir=work / "cache"))
            _, load = timed(lambda: eng.load_adapter(AdapterRef("v1", str(ad1))))
            _, first = timed(lambda: eng.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), adapter="v1"))
            out, dt, cpu = metered(lambda: eng.generate(prompts, sp, adapter="v1"))
            base, bdt, _ = metered(lambda: eng.generate(prompts, sp))
            eng.close()
            return {"start_s": start, "load_s": load, "first_generate_s": first, "adapter_tokens_per_s": tokens(out) / dt,
                    "adapter_tokens_per_cpu_s": tokens(out) / cpu, "base_tokens_per_s": tokens(base) / bdt}

        runs = [("lora", serve("lora")), ("merged", serve("merged")), ("lora", serve("lora"))]
        best = {m: max((r for k, r in runs if k == m), key=lambda r: r["adapter_tokens_per_s"]) for m in ("lora", "merged")}
        res["serving"] = {"runs": [{"mode": k, **r} for k, r in runs], **best,
                          "merged_over_lora_adapter_tokens_per_s": best["merged"]["adapter_tokens_per_s"] / best["lora"]["adapter_tokens_per_s"]}

    if "merge" in args.engines:
        # The merged copy the vLLM engine writes per adapter version: in the base's own dtype against
        # the dtype it serves (--dtype), A-B-A in one run; time and size on disk of each.
        from selfdistill.export import export_merged

        def merge(dtype: str | None, i: int) -> dict:
            out, dt = timed(lambda: export_merged(model_dir, ad1, work / f"merged-{i}", dtype=dtype))
            mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
            return {"dtype": dtype or "base", "merge_s": dt, "mb": mb}

        runs = [merge(None, 0), merge(args.dtype, 1), merge(None, 2)]
        res["merge"] = {"runs": runs, "served_over_base_s": runs[1]["merge_s"] / min(runs[0]["merge_s"], runs[2]["merge_s"])}

    if "vllm" in res and "transformers" in res:
        res["vllm_over_transformers"] = res["vllm"]["tokens_per_s"] / res["transformers"]["tokens_per_s"]
        res["vllm_over_transformers_per_cpu_s"] = res["vllm"]["tokens_per_cpu_s"] / res["transformers"]["tokens_per_cpu_s"]
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
