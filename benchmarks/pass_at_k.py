"""pass@1 (greedy) and pass@k (k samples at T=1.0) of the bundled student on reasoning-gym tasks,
and how many pairs and SFT examples one batch of tasks yields with the default pair builders.

This picks the demo task: one where greedy is low but pass@k is clearly higher has both correct
answers to learn from and wrong ones to reject.

Run (vLLM CPU build, 2-core CPU: 1.5-7 minutes per configuration at 32-64 items, engine start
1.5 minutes, depending on load; use --only and --items to fit a time budget):
    .venv/bin/python benchmarks/pass_at_k.py [--items 64] [--k 8] [--engine vllm|transformers]
Prints one markdown table row per configuration, ready for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from selfdistill.config import EngineConfig, PairsConfig, ReasoningGymSource
from selfdistill.engines.base import SamplingParams
from selfdistill.models import prepare_bundled
from selfdistill.pairs import build_pairs, build_sft, candidate_from
from selfdistill.records import Task, chat_messages
from selfdistill.scoring.verifiers import resolve_verifier
from selfdistill.tasks.sources import iter_source

SUFFIX = " Give only the final answer as a number."

CONFIGS = [
    ("chain_sum 2-3 terms 1 digit", "chain_sum",
     dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1), SUFFIX),
    ("chain_sum 2-3 terms 1 digit, no suffix", "chain_sum",
     dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1), ""),
    ("chain_sum 2 terms 2 digits", "chain_sum",
     dict(min_terms=2, max_terms=2, min_digits=2, max_digits=2), SUFFIX),
    ("basic_arithmetic 2 terms 1 digit +-", "basic_arithmetic",
     dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=["+", "-"],
          allow_parentheses=False, allow_negation=False), SUFFIX),
    ("basic_arithmetic 2 terms 1 digit *", "basic_arithmetic",
     dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=["*"],
          allow_parentheses=False, allow_negation=False), SUFFIX),
]


def make_engine(kind: str):
    model_dir = prepare_bundled()
    if kind == "vllm":
        from selfdistill.engines.vllm_engine import VLLMEngine

        cfg = EngineConfig(kind="vllm", dtype="bfloat16", max_model_len=512, cpu_kv_cache_gib=1.0)
        return VLLMEngine(model_dir, cfg, lora_rank=16, seed=0, cache_dir=tempfile.mkdtemp(prefix="sd-bench-"))
    from selfdistill.engines.hf import TransformersEngine

    return TransformersEngine(model_dir, EngineConfig(kind="transformers", dtype="bfloat16", batch_size=32), seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    ap.add_argument("--only", type=int, nargs="*", help="indices of CONFIGS to run")
    args = ap.parse_args()

    t0 = time.monotonic()
    engine = make_engine(args.engine)
    print(f"engine {args.engine} ready in {time.monotonic() - t0:.1f}s")
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=args.max_tokens)
    sampled = SamplingParams(n=args.k, temperature=1.0, max_tokens=args.max_tokens)
    pcfg = PairsConfig()
    print(f"| task | suffix | greedy pass@1 | sample acc (T=1) | pass@{args.k} | pairs / {args.items} tasks | SFT / {args.items} tasks | tokens/s | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (label, dataset, config, suffix) in enumerate(CONFIGS):
        if args.only and i not in args.only:
            continue
        t = time.monotonic()
        src = ReasoningGymSource(type="reasoning_gym", dataset=dataset, config=config, seed=1234, size=args.items)
        tasks = [Task(**vars(ti), id=j + 1) for j, ti in enumerate(iter_source(src))]
        prompts = [chat_messages(task.prompt + suffix) for task in tasks]
        g = engine.generate(prompts, greedy)
        s = engine.generate(prompts, sampled)
        tokens = sum(c.completion_tokens for row in g + s for c in row)
        g_ok = s_ok = any_ok = 0
        cands = {}
        for task, grow, srow in zip(tasks, g, s):
            v = resolve_verifier(task, "auto")
            g_ok += v(grow[0].text, task).correct
            results = [v(c.text, task) for c in srow]
            s_ok += sum(r.correct for r in results)
            any_ok += any(r.correct for r in results)
            cands[task.id] = [candidate_from(task.id, c.text, verifier_score=r.score, verifier_correct=r.correct,
                                             tokens=c.completion_tokens) for c, r in zip(srow, results)]
        texts = {task.id: task.prompt + suffix for task in tasks}
        pairs = build_pairs(cands, texts, pcfg)
        sft = build_sft(cands, texts, pcfg)
        dt = time.monotonic() - t
        n = len(tasks)
        print(f"| {label} | {suffix.strip() or '(none)'} | {g_ok / n:.2f} | {s_ok / (n * args.k):.2f} | {any_ok / n:.2f} "
              f"| {len(pairs)} | {len(sft)} | {tokens / dt:.0f} | {dt:.0f} |", flush=True)
        if i == 0:
            print("    sample answers:", [c.text for c in s[0][:3]], flush=True)
    engine.close()
    print(f"total {time.monotonic() - t0:.0f}s")


if __name__ == "__main__":
    main()
