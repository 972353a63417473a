"""A teacher for the CPU distillation demo, chosen by measurement: who beats the bundled student?

The demo's task is chain_sum as in policies/cpu-demo.toml (2-3 one-digit terms, the same prompt
suffix). Its question space is small (the demo's 2,000 draws hold 1,085 distinct questions; 4,000
more draws add only 681 new ones), so the teacher trains on those 681 and every candidate is
measured greedily on `--audit` of the demo's own distinct questions: the ones it will teach on,
none of which it trained on. Candidates:

- `base`       the bundled SmolLM2-135M-Instruct itself (the student: the floor);
- `context`    the same model with `--shots` worked examples before the question (context
               distillation: the teacher sees examples, the student the bare prompt);
- `specialist` the same model with a LoRA trained once by SFT on reference answers of other
               chain_sum questions (`--steps` optimizer steps in the daemon's own training child),
               merged into a model directory: it shares the student's tokenizer, so it can score
               the student's tokens (on-policy distillation) as well as label (SFT on its answers).

The specialist's directory (OUT/specialist-merged) is what policies/cpu-distill.toml names as its
teacher; this script is its recipe. Run (9 minutes on 2 quiet CPU cores on 2026-12-05, 8.5 of them the 307 SFT steps; 57
minutes on 2026-12-02, before training got twice as fast and beside a test-suite run):

    .venv/bin/python benchmarks/teacher.py --out state/teacher

It prints a JSON summary and a Markdown table (also OUT/teacher.json and OUT/teacher.md).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bootstrap import as_tasks, continue_sft, rg_tasks, summary  # noqa: E402

CHAIN_SUM = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}
SUFFIX = " Give only the final answer as a number."  # policies/cpu-demo.toml's prompt_suffix
DAEMON_SEED, DAEMON_SIZE = 1, 2000  # the demo's task source
TEACH_SEED, AUDIT_SEED = 7, 11  # AUDIT_SEED: which of the demo's questions are measured


def distinct(tasks, avoid):
    """`tasks` whose question text no task of `avoid` has (chain_sum's space is small: repeats are common)."""
    seen = {t.prompt for t in avoid}
    out, mine = [], set()
    for t in tasks:
        if t.prompt not in seen and t.prompt not in mine:
            out.append(t)
            mine.add(t.prompt)
    return out


def shots_messages(examples, question: str) -> list[dict[str, str]]:
    """Worked examples as earlier turns of the conversation, then the question."""
    msgs: list[dict[str, str]] = []
    for t in examples:
        msgs += [{"role": "user", "content": t.prompt + SUFFIX}, {"role": "assistant", "content": t.answer}]
    return msgs + [{"role": "user", "content": question + SUFFIX}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300, help="SFT optimizer steps of the specialist")
    ap.add_argument("--time-limit", type=int, default=3 * 3600,
                    help="seconds the SFT may take (307 steps took 55 and 60+ minutes on 2 cores shared with test runs)")
    ap.add_argument("--shots", type=int, default=8, help="worked examples in the context teacher's prompt")
    ap.add_argument("--audit", type=int, default=300, help="audit items")
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from selfdistill.config import ScoringConfig
    from selfdistill.engines.base import SamplingParams
    from selfdistill.export import export_merged
    from selfdistill.models import resolve_base_model
    from selfdistill.scoring.verifiers import resolve_verifier

    t0 = time.time()
    base = resolve_base_model(a.model)
    daemon = rg_tasks("chain_sum", DAEMON_SEED, DAEMON_SIZE, CHAIN_SUM)
    teach = distinct(rg_tasks("chain_sum", TEACH_SEED, 4000, CHAIN_SUM), daemon)
    audit = as_tasks(random.Random(AUDIT_SEED).sample(distinct(daemon, []), a.audit))
    shots = teach[: a.shots]
    rows = [{"kind": "sft", "prompt": t.prompt + SUFFIX, "completion": t.answer, "weight": 1.0} for t in teach[a.shots:]]
    print(f"{len(rows)} teacher-training questions, {len(audit)} audit items", flush=True)

    training = {"algorithm": "sft", "learning_rate": 2e-4, "batch_size": 16, "max_length": 256, "threads": 2, "time_limit_s": a.time_limit,
                "min_sft_examples": 1}
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    t = time.time()
    sft = continue_sft(base, rows, [a.steps], a.out / "specialist", training=training, lora=lora)
    train_s = round(time.time() - t, 1)
    merged = a.out / "specialist-merged"
    if not merged.exists():
        export_merged(base, sft["adapter"], merged, metadata={"recipe": "benchmarks/teacher.py", "steps": sft["steps"]})

    from selfdistill.config import EngineConfig
    from selfdistill.engines import make_engine

    sc = ScoringConfig()
    greedy = SamplingParams(temperature=0.0, max_tokens=48)

    def score(engine, prompts) -> list[bool]:
        outs = engine.generate(prompts, greedy)
        return [bool(resolve_verifier(t, "auto", sc, ())(cs[0].text, t).correct) for t, cs in zip(audit, outs)]

    cfg = EngineConfig.model_validate({"kind": "vllm", "dtype": "bfloat16", "max_model_len": 2048, "cpu_kv_cache_gib": 1.0})
    results: dict[str, Any] = {}
    bare = [[{"role": "user", "content": t.prompt + SUFFIX}] for t in audit]
    eng = make_engine(cfg, base, lora_rank=None, cache_dir=a.out / "cache")
    try:
        results["base"] = summary(score(eng, bare))
        results["context"] = summary(score(eng, [shots_messages(shots, t.prompt) for t in audit]))
    finally:
        eng.close()
    eng = make_engine(cfg, merged, lora_rank=None, cache_dir=a.out / "cache")
    try:
        results["specialist"] = summary(score(eng, bare))
    finally:
        eng.close()
    out = {"audit_items": len(audit), "shots": a.shots, "specialist_steps": sft["steps"], "specialist_train_s": train_s,
           "teacher_dir": str(merged), "seconds": round(time.time() - t0, 1), "results": results}
    (a.out / "teacher.json").write_text(json.dumps(out, indent=2))
    md = ["| teacher candidate | greedy accuracy on audit | 95% interval |", "|---|---|---|"]
    for k, r in results.items():
        md.append(f"| {k} | {r['accuracy']:.3f} ({r['correct']}/{r['n']}) | [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] |")
    (a.out / "teacher.md").write_text("\n".join(md) + "\n")
    print(json.dumps(out, indent=2))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
