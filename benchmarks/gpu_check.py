"""The GPU install, checked in one run: what `benchmarks/gpu_check.sh` calls.

On the device it is given (default: cuda), in bf16 where the device has it:
1. the transformers engine: start, sampled generation, scoring, release (the model dropped and the
   CUDA cache emptied: the device memory measured before and after) and resume;
2. a training round through the daemon's own child entry point, SFT then DPO on a LoRA, timed,
   with the device, dtype and peak device memory the child reports;
3. where vLLM is installed: the vLLM engine with LoRA, the adapter from 2 hot-loaded and used,
   then a release in sleep mode and one by restart, each with the device memory before, after
   and back, and the time to resume.

Prints one table (and the figures as JSON to --out); exits 1 if any step failed, naming it. The
model is the bundled student if it was prepared (`selfdistill models prepare`), else a directory
given with --model, else the tiny test model built here.

    .venv/bin/python benchmarks/gpu_check.py [--device cuda|cpu] [--model bundled|tiny|DIR] [--out FILE]

`--device cpu` runs the same steps on the CPU (the suite's smoke test does, with the tiny model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

PROMPTS = [[{"role": "user", "content": f"What is {a} + {b}? Give the answer as a number."}]
           for a, b in ((3, 4), (12, 9), (7, 8), (25, 17), (6, 6), (40, 2), (9, 11), (14, 5))]


def device_memory(device: str) -> dict:
    """Free and used memory of the device (CUDA: the whole device, all processes; CPU: this
    process's resident set), in MiB."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return {"used_mib": round((total - free) / 2**20), "allocated_mib": round(torch.cuda.memory_allocated() / 2**20)}
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"used_mib": round(rss / 1024)}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 3)


def check_env(args) -> dict:
    import torch

    row = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device: install the CUDA torch (pip install -e '.[gpu]')")
        row.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                   total_mib=round(torch.cuda.mem_get_info()[1] / 2**20))
    for lib in ("transformers", "peft", "trl", "accelerate", "vllm"):
        try:
            row[lib] = __import__(lib).__version__
        except Exception as e:  # noqa: BLE001 - a missing library is a row, not a crash
            row[lib] = f"missing ({type(e).__name__})"
    return row


def release_and_resume(eng, device: str) -> dict:
    """An engine's release and resume, timed, with the device memory before and after the release."""
    loaded = device_memory(device)
    _, release_s = timed(eng.release)
    released = device_memory(device)
    _, resume_s = timed(eng.resume)
    return {"used_mib_loaded": loaded["used_mib"], "used_mib_released": released["used_mib"],
            "release_s": release_s, "resume_s": resume_s}


def check_transformers(args, model_dir: Path) -> dict:
    from selfdistill.config import EngineConfig
    from selfdistill.engines.base import SamplingParams
    from selfdistill.engines.hf import TransformersEngine

    cfg = EngineConfig(kind="transformers", dtype=args.dtype, device=args.device, max_model_len=512, batch_size=32,
                       release_for_training="restart")
    before = device_memory(args.device)
    eng, start_s = timed(lambda: TransformersEngine(model_dir, cfg, seed=0))
    try:
        if str(eng.device).split(":")[0] != args.device:
            raise RuntimeError(f"the engine runs on {eng.device}, not {args.device}")
        out, gen_s = timed(lambda: eng.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_tokens=32, seed=0)))
        toks = sum(c.completion_tokens for cs in out for c in cs)
        scores, score_s = timed(lambda: eng.score(PROMPTS, [cs[0].text for cs in out]))
        cycle = release_and_resume(eng, args.device)
        again, _ = timed(lambda: eng.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=8)))
    finally:
        eng.close()
    return {"device": str(eng.device), "dtype": str(eng.dtype), "start_s": start_s, "tokens": toks, "generate_s": gen_s,
            "tokens_per_s": round(toks / gen_s, 1), "score_s": score_s, "scored": len(scores),
            "used_mib_before": before["used_mib"], **cycle, "answers_after_resume": len(again[0])}


def check_training(args, model_dir: Path, work: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from training import train_round

    (r, adapter), wall_s = timed(lambda: train_round("gpu-check", model_dir, work, 64, 32, None if args.device == "cuda" else 2,
                                                     batch_size=8, epochs=1.0, time_limit_s=900,
                                                     min_loss_change=0.0, min_dpo_margin=-1000.0))
    if r.status != "succeeded":
        raise RuntimeError(f"training {r.status}: {r.reason}")
    m = r.metrics
    if m.get("device", "").split(":")[0] != args.device:
        raise RuntimeError(f"the training child ran on {m.get('device')}, not {args.device}")
    return {"device": m.get("device"), "dtype": m.get("dtype"), "wall_s": wall_s, "sft_train_s": m["sft_train_s"],
            "dpo_train_s": m["dpo_train_s"], "sft_tokens_per_s": round(m["sft_tokens"] / m["sft_train_s"], 1),
            "dpo_tokens_per_s": round(m["dpo_tokens"] / m["dpo_train_s"], 1),
            "peak_device_mib": m.get("peak_device_mib"), "adapter": str(adapter)}


def check_vllm(args, model_dir: Path, work: Path, adapter: str | None) -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"skipped": "vllm is not installed"}
    from selfdistill.config import EngineConfig
    from selfdistill.engines.base import AdapterRef, SamplingParams
    from selfdistill.engines.vllm_engine import VLLMEngine

    row: dict = {}
    for mode in ("sleep", "restart"):
        cfg = EngineConfig(kind="vllm", dtype=args.dtype, max_model_len=512, gpu_memory_utilization=0.3,
                           cpu_kv_cache_gib=0.5, release_for_training=mode, adapter_serving="auto")
        before = device_memory(args.device)
        eng, start_s = timed(lambda: VLLMEngine(model_dir, cfg, lora_rank=16, seed=0, cache_dir=work / "vllm-cache"))
        try:
            out, gen_s = timed(lambda: eng.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_tokens=32, seed=0)))
            toks = sum(c.completion_tokens for cs in out for c in cs)
            r = {"mode": eng.release_mode, "start_s": start_s, "tokens_per_s": round(toks / gen_s, 1)}
            if adapter and mode == "sleep":
                _, r["adapter_load_s"] = timed(lambda: eng.load_adapter(AdapterRef("v1", adapter)))
                _, r["adapter_generate_s"] = timed(lambda: eng.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16), adapter="v1"))
            r.update(release_and_resume(eng, args.device))
            eng.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=8), adapter="v1" if adapter and mode == "sleep" else None)
            r.update(used_mib_before=before["used_mib"], used_mib_resumed=device_memory(args.device)["used_mib"])
        finally:
            eng.close()
        row[mode] = r
    return row


def table(results: dict) -> str:
    lines = ["| step | result | figures |", "|---|---|---|"]
    for step, r in results.items():
        if "error" in r:
            lines.append(f"| {step} | FAILED | {r['error']} |")
        elif "skipped" in r:
            lines.append(f"| {step} | skipped | {r['skipped']} |")
        else:
            lines.append(f"| {step} | ok | {json.dumps(r, sort_keys=True)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="auto", help="'bundled', 'tiny', a model directory, or 'auto' (bundled if prepared)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--steps", default="env,transformers,training,vllm")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from selfdistill.models import BUNDLED_DIRNAME, build_tiny_model, default_cache_dir, is_model_dir

    work = Path(tempfile.mkdtemp(prefix="sd-gpu-check-"))
    bundled = default_cache_dir() / BUNDLED_DIRNAME
    if args.model in ("auto", "bundled") and is_model_dir(bundled):
        model_dir = bundled
    elif args.model == "bundled":
        print("the bundled student is not prepared: run `selfdistill models prepare` first", file=sys.stderr)
        return 2
    elif args.model in ("auto", "tiny"):
        model_dir = build_tiny_model(work / "tiny")
    else:
        model_dir = Path(args.model)
    steps = args.steps.split(",")
    results: dict = {"model": {"path": str(model_dir), "device": args.device, "dtype": args.dtype}}
    adapter = None
    for step in steps:
        t = time.perf_counter()
        try:
            if step == "env":
                results[step] = check_env(args)
            elif step == "transformers":
                results[step] = check_transformers(args, model_dir)
            elif step == "training":
                results[step] = check_training(args, model_dir, work)
                adapter = results[step]["adapter"]
            elif step == "vllm":
                results[step] = check_vllm(args, model_dir, work, adapter)
            else:
                raise ValueError(f"unknown step {step!r}; steps: env,transformers,training,vllm")
        except Exception as e:  # noqa: BLE001 - a failed step is a row of the table, and the exit code
            traceback.print_exc()
            results[step] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        results[step]["step_s"] = round(time.perf_counter() - t, 1)
    print(table(results), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    failed = [s for s, r in results.items() if "error" in r]
    if failed:
        print(f"gpu check: {', '.join(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
