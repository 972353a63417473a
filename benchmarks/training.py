"""Training throughput and round overhead, through the real child entry point.

Runs `python -m selfdistill.training` via `run_training_child` (launcher "python") on the tiny
test model and on the bundled student, and prints one JSON line per run plus a summary:
SFT examples/s and tokens/s, DPO pairs/s and tokens/s, peak RSS, and the fixed overhead of a
round (process start and imports, model load, data preparation, saving) as a share of its wall time.
It then extrapolates the overhead share to demo-like settings (~100 SFT examples x 2 epochs +
~50 pairs) from the measured rates and the measured fixed cost.

    .venv/bin/python benchmarks/training.py [--models tiny,bundled] [--threads 2] [--out DIR]
    .venv/bin/python benchmarks/training.py --compare --threads 2 --sft 64 --pairs 32   # before/now, one run

Prepare the bundled student first: `.venv/bin/python -c "from selfdistill.models import prepare_bundled; print(prepare_bundled())"`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def write_data(path: Path, n_sft: int, n_pairs: int) -> None:
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(max(n_sft, n_pairs)):
            a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
            prompt = f"What is {a} + {b} + {c}? Give the answer as a number."
            right = f"{a} + {b} + {c} = {a + b + c}. The answer is {a + b + c}."
            wrong = f"{a} + {b} + {c} = {a + b + c + rng.randint(1, 5)}. The answer is {a + b + c + 1}."
            if i < n_sft:
                f.write(json.dumps({"kind": "sft", "prompt": prompt, "completion": right, "weight": 1.0}) + "\n")
            if i < n_pairs:
                f.write(json.dumps({"kind": "pair", "prompt": prompt, "chosen": right, "rejected": wrong, "weight": 1.0}) + "\n")


def train_round(name: str, base: Path, work: Path, n_sft: int, n_pairs: int, threads: int | None, batch_size: int,
                epochs: float, time_limit_s: float = 1800, **training):
    """One SFT-then-DPO round on `write_data`'s rows through the daemon's child entry point (LoRA r=16):
    (its TrainingResult, the adapter's directory). `training` overrides the round's training keys."""
    from selfdistill.training.child import run_training_child
    from selfdistill.training.spec import RoundSpec

    data = work / f"{name}.jsonl"
    write_data(data, n_sft, n_pairs)
    spec = RoundSpec(
        round_id=1, base_model_dir=base, output_dir=work / "ckpt" / name, data_path=data,
        training=dict(algorithm="sft_then_dpo", batch_size=batch_size, max_length=128, epochs=epochs, dpo_epochs=1.0,
                      min_sft_examples=1, min_pairs=1, **training),
        lora=dict(r=16, alpha=32), result_path=work / "runs" / f"{name}.json", threads=threads, hf_home=work / "hf",
    )
    return run_training_child(spec, time_limit_s=time_limit_s), spec.output_dir


def bench(name: str, base: Path, work: Path, n_sft: int, n_pairs: int, threads: int, batch_size: int, epochs: float) -> dict:
    r, _ = train_round(name, base, work, n_sft, n_pairs, threads, batch_size, epochs)
    if r.status != "succeeded":
        raise SystemExit(f"{name}: {r.status}: {r.reason}")
    m = r.metrics
    fixed = m["wall_s"] - m["sft_train_s"] - m["dpo_train_s"]
    row = {
        "run": name, "examples": n_sft, "epochs": epochs, "pairs": n_pairs, "batch_size": batch_size, "threads": threads,
        "sft_examples_per_s": round(n_sft * epochs / m["sft_train_s"], 3),
        "sft_tokens_per_s": round(m["sft_tokens"] / m["sft_train_s"], 1),
        "dpo_pairs_per_s": round(n_pairs / m["dpo_train_s"], 3),
        "dpo_tokens_per_s": round(m["dpo_tokens"] / m["dpo_train_s"], 1),
        "peak_rss_mb": m["peak_rss_mb"],
        "wall_s": m["wall_s"], "sft_train_s": m["sft_train_s"], "dpo_train_s": m["dpo_train_s"],
        "start_and_imports_s": round(m["wall_s"] - m["duration_s"] + m["import_s"], 2),
        "load_s": m["load_s"], "save_s": m["save_s"],
        "fixed_s": round(fixed, 2), "overhead_share": round(fixed / m["wall_s"], 3),
    }
    # demo-like round: 100 examples x 2 epochs + 50 pairs at the measured rates, same fixed cost
    demo_train = 100 * 2 / row["sft_examples_per_s"] + 50 / row["dpo_pairs_per_s"]
    row["demo_overhead_share_est"] = round(fixed / (fixed + demo_train), 3)
    return row


def matmul_gflops(threads: int, dtype_name: str, seconds: float = 2.0) -> float:
    """This machine's rate for one of the model's own matrix products (560 tokens x 576 -> 1536, SmolLM2-135M's
    MLP), in GFLOP/s, on `threads` threads: the ceiling training is measured against."""
    import time

    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(560, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(5):
        a @ b
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        n += 1
    return round(2 * 560 * 576 * 1536 * n / (time.perf_counter() - t) / 1e9, 1)


def compare(base: Path, work: Path, threads: int, n_sft: int, n_pairs: int) -> list[dict]:
    """The same round twice in one run: as training ran before (float32, TRL's LM head over every position) and
    as it runs now (training.precision = "auto", the LM head over the labelled positions only)."""
    import os

    from selfdistill.training.run import FULL_LM_HEAD_ENV

    peaks = {d: matmul_gflops(threads, d) for d in ("float32", "bfloat16")}
    rows = []
    for name, precision, full_head in (("before", "float32", "1"), ("now", "auto", "0")):
        os.environ[FULL_LM_HEAD_ENV] = full_head
        r, _ = train_round(name, base, work, n_sft, n_pairs, threads, batch_size=8, epochs=1.0, precision=precision)
        if r.status != "succeeded":
            raise SystemExit(f"{name}: {r.status}: {r.reason}")
        m = r.metrics
        params = 134.5e6  # SmolLM2-135M; a LoRA step costs ~4 x params FLOPs a token (forward, input gradients)
        sft_tps, dpo_tps = m["sft_tokens"] / m["sft_train_s"], m["dpo_tokens"] / m["dpo_train_s"]
        rows.append({
            "run": name, "dtype": m["dtype"], "lm_head": m["lm_head"], "threads": threads,
            "sft_tokens_per_s": round(sft_tps, 1), "dpo_tokens_per_s": round(dpo_tps, 1),
            "sft_tokens_per_s_per_core": round(sft_tps / threads, 1),
            "sft_model_gflops": round(4 * params * sft_tps / 1e9, 1),
            "sft_share_of_matmul_peak": round(4 * params * sft_tps / 1e9 / peaks[m["dtype"]], 3),
            "matmul_gflops": peaks, "sft_train_s": m["sft_train_s"], "dpo_train_s": m["dpo_train_s"],
            "sft_loss_curve": m["sft_loss_curve"], "dpo_loss_curve": m["dpo_loss_curve"],
            "dpo_margin_last": m.get("dpo_margin_last"), "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"],
        })
        print(json.dumps(rows[-1]), flush=True)
    os.environ.pop(FULL_LM_HEAD_ENV, None)
    before, now = rows
    print(json.dumps({"sft_speedup": round(now["sft_tokens_per_s"] / before["sft_tokens_per_s"], 2),
                      "dpo_speedup": round(now["dpo_tokens_per_s"] / before["dpo_tokens_per_s"], 2),
                      "sft_loss_max_abs_diff": max(abs(a - b) for a, b in zip(before["sft_loss_curve"], now["sft_loss_curve"])),
                      "dpo_loss_max_abs_diff": max(abs(a - b) for a, b in zip(before["dpo_loss_curve"], now["dpo_loss_curve"]))}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,bundled")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--compare", action="store_true", help="the bundled student's round before and now, side by side")
    ap.add_argument("--sft", type=int, default=32, help="SFT examples of a round")
    ap.add_argument("--pairs", type=int, default=16, help="pairs of a round")
    args = ap.parse_args()
    from selfdistill.models import BUNDLED_DIRNAME, build_tiny_model, default_cache_dir

    work = args.out or Path(tempfile.mkdtemp(prefix="selfdistill-bench-training-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.compare:
        compare(default_cache_dir() / BUNDLED_DIRNAME, work, args.threads, args.sft, args.pairs)
        return
    rows = []
    for model in args.models.split(","):
        if model == "tiny":
            base = build_tiny_model(work / "tiny-base")
            rows.append(bench("tiny", base, work, args.sft, args.pairs, args.threads, batch_size=8, epochs=1.0))
        else:
            base = default_cache_dir() / BUNDLED_DIRNAME
            rows.append(bench("bundled", base, work, args.sft, args.pairs, args.threads, batch_size=8, epochs=1.0))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
