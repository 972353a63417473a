"""What a served teacher (teacher.kind = "served") costs: start, memory, scoring, and the price of
stopping it for every training round (release = "stop") against keeping it (release = "keep").

On the bundled SmolLM2-135M-Instruct (the student's own model as the teacher: the same
tokenizer), one run measures: the first start (from nothing to answering), the server's resident
memory (keeper, API server and engine core), the throughput of scoring student tokens (the
on-policy distillation request: echo + logprobs of `--answers` answers of `--tokens` tokens), the
memory a stop frees, and a second start (what each training round costs with release = "stop").

    .venv/bin/python benchmarks/teacher_server.py [--dtype bfloat16] [--answers 64] [--tokens 48]

Prints one JSON object (the figures RESULTS.md quotes).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--answers", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--kv-gib", type=float, default=1.0)
    args = ap.parse_args()

    from selfdistill.config import TeacherConfig
    from selfdistill.engines import make_teacher_engine
    from selfdistill.engines.served import group_rss_mib
    from selfdistill.models import prepare_bundled

    model = prepare_bundled()
    rng = random.Random(0)
    prompts = [[{"role": "user", "content": f"What is {rng.randint(1, 9)} + {rng.randint(1, 9)}?"}] for _ in range(args.answers)]
    ids = [[rng.randint(100, 40000) for _ in range(args.tokens)] for _ in range(args.answers)]
    out: dict = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()})", "date": time.strftime("%Y-%m-%d"),
                 "model": str(model), "dtype": args.dtype, "answers": args.answers, "tokens_per_answer": args.tokens}
    with tempfile.TemporaryDirectory() as work:
        teacher = make_teacher_engine(TeacherConfig(kind="served", model=str(model),
                                                    serve={"dtype": args.dtype, "max_model_len": 1024, "cpu_kv_cache_gib": args.kv_gib}),
                                      work)
        try:
            t = time.time()
            teacher.tokenize("hello")
            out["first_start_s"] = round(time.time() - t, 1)
            out["rss_mib"] = group_rss_mib(teacher.pid)
            teacher.token_logprobs(prompts[:4], ids[:4])  # warm
            t = time.time()
            lps = teacher.token_logprobs(prompts, ids)
            dt = time.time() - t
            assert all(len(x) == args.tokens for x in lps)
            out["score_s"] = round(dt, 2)
            out["scored_tokens_per_s"] = round(args.answers * args.tokens / dt, 1)
            t = time.time()
            teacher.release()
            out["stop_s"] = round(time.time() - t, 2)
            out["freed_mib"] = teacher.last_freed_mib
            t = time.time()
            teacher.tokenize("hello")
            out["restart_s"] = round(time.time() - t, 1)
        finally:
            teacher.close()
    # the same answers scored by an in-process transformers teacher (teacher.kind = "transformers"), in this run
    from selfdistill.config import EngineConfig
    from selfdistill.engines.hf import TransformersEngine

    t = time.time()
    local = TransformersEngine(model, EngineConfig(kind="transformers", dtype=args.dtype, batch_size=16), seed=0)
    out["inprocess_load_s"] = round(time.time() - t, 1)
    local.token_logprobs(prompts[:4], ids[:4])
    t = time.time()
    ref = local.token_logprobs(prompts, ids)
    dt = time.time() - t
    local.close()
    out["inprocess_score_s"] = round(dt, 2)
    out["inprocess_scored_tokens_per_s"] = round(args.answers * args.tokens / dt, 1)
    out["served_over_inprocess_speed"] = round(out["scored_tokens_per_s"] / out["inprocess_scored_tokens_per_s"], 2)
    diffs = sorted(abs(a - b) for x, y in zip(lps, ref) for a, b in zip(x, y))
    out["logprob_abs_diff_median"] = round(diffs[len(diffs) // 2], 4)
    out["logprob_abs_diff_p99"] = round(diffs[int(len(diffs) * 0.99)], 4)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
