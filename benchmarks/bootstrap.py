"""Bootstrapping a tiny student and measuring it: the helpers behind tests/learning/ and
benchmarks/learning.py.

A randomly initialised tiny Llama answers nothing, so no verified answer exists to learn from.
`bootstrap` gives it a start the loop can build on: plain supervised training (full weights,
completion-only loss, AdamW) on the reference answers of a few hundred tasks for a fixed number
of steps, saved as an ordinary Hugging Face model directory that a policy names as its
`student.base_model`. `continue_sft` is the matched-steps control: the same LoRA trainer the daemon
uses (the training child, `python -m selfdistill.training SPEC`), run on the bootstrap data for
exactly the steps the loop trained. `evaluate` scores any checkpoint (base or adapter) on a list of
tasks with the project's own engine, greedy evaluation and verifier, so every number compared
comes from the same code path.

Run by hand (prints accuracy after bootstrapping; about a minute on 2 cores):

    .venv/bin/python benchmarks/bootstrap.py /tmp/tiny --steps 300
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from selfdistill.records import Task, TaskIn, chat_messages  # noqa: E402

# The FIELD-NOTES toy: 0.87M parameters, head_dim 32 (the vLLM CPU build refuses smaller heads).
TINY_SIZE = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512)

# The spell_backward loop of tests/learning and benchmarks/rl.py: the daemon's tasks and the
# bootstrap's (reasoning-gym seeds item i with seed + i: keep the ranges apart).
SPELL_WORDS = {"min_word_len": 3, "max_word_len": 5}
SPELL_TASK_SEED = 1
SPELL_BOOT_SEED, SPELL_BOOT_SIZE, SPELL_BOOT_STEPS = 100_000, 250, 250


def spell_policy(model_dir: Path, training: str, *, name: str, alpha: float, task_size: int, per_round: int = 500,
                 audit_fraction: float = 0.0, lora: dict[str, Any] | None = None) -> str:
    """The TOML of a daemon policy on the bootstrapped tiny model and spell_backward; `training` is
    the body of its [training] table (sub-tables may follow)."""
    lora = lora or {"r": 32, "alpha": 64}
    audit = f"audit_fraction = {audit_fraction}\n" if audit_fraction else ""
    return f"""
name = "{name}"
state_dir = "state"
[student]
base_model = "{model_dir}"
lora = {{ r = {lora['r']}, alpha = {lora['alpha']}, dropout = 0.0, target_modules = "all-linear" }}
[engine]
kind = "transformers"
dtype = "float32"
max_model_len = 128
batch_size = 256
threads = 1
release_for_training = "keep"
[tasks]
heldout_fraction = 0.15
{audit}per_round = {per_round}
[[tasks.sources]]
type = "reasoning_gym"
dataset = "spell_backward"
config = {{ min_word_len = {SPELL_WORDS['min_word_len']}, max_word_len = {SPELL_WORDS['max_word_len']} }}
seed = {SPELL_TASK_SEED}
size = {task_size}
[generation]
samples_per_task = 8
temperature = 1.0
max_tokens = 8
[pairs]
strategy = "verified_chosen"
sft_from = "verified"
max_sft_per_task = 2
[training]
{training}
[evaluation]
heldout_items = 300
max_tokens = 8
anchor_prompts = ["abc", "hello"]
anchor_max_tokens = 8
[gates]
test = "mcnemar"
alpha = {alpha}
min_gain = 0.0
max_anchor_nll_increase = 1000.0
max_empty_fraction = 1.0
max_repetition = 1.0
max_length_ratio = 1000.0
max_category_regression = 1.0
[schedule]
idle_sleep_s = 0.1
[stopping]
stop_when_tasks_exhausted = true
[logging]
format = "json"
"""


def round_samples(db: Path, round_id: int) -> tuple[float | None, float | None]:
    """A round's own samples (purpose 'train'): distinct answers per task, and the verifier's pass rate."""
    div = rows(db, "SELECT avg(n) AS d FROM (SELECT count(DISTINCT text) AS n FROM generations WHERE round_id = ? AND purpose = 'train' "
                   "GROUP BY task_id)", (round_id,))[0]["d"]
    passed = rows(db, "SELECT avg(s.correct) AS p FROM scores s JOIN generations g ON g.id = s.generation_id "
                      "WHERE g.round_id = ? AND g.purpose = 'train' AND s.scorer LIKE 'verifier:%'", (round_id,))[0]["p"]
    return div, passed


def rows(db: Path, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows of a query on a daemon's store, as dicts (read-only use)."""
    import sqlite3

    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, params)]
    finally:
        con.close()


def rg_tasks(dataset: str, seed: int, size: int, config: dict[str, Any] | None = None) -> list[TaskIn]:
    """The tasks a `reasoning_gym` policy source with these settings yields (same metadata)."""
    from selfdistill.config import ReasoningGymSource
    from selfdistill.tasks.sources import load_source

    src = ReasoningGymSource(type="reasoning_gym", dataset=dataset, seed=seed, size=size, config=config or {})
    tasks, problems = load_source(src)
    assert not problems, problems
    return tasks


def disjoint(tasks: Sequence[TaskIn], avoid: Sequence[TaskIn]) -> list[TaskIn]:
    """`tasks` minus any whose reference answer some task of `avoid` has: bootstrap data must not
    hold the evaluation items, or the control (which trains on it) would be tested on its own data."""
    seen = {t.answer for t in avoid}
    return [t for t in tasks if t.answer not in seen]


def sft_rows(tasks: Sequence[TaskIn | Task], prompt_suffix: str = "") -> list[dict[str, Any]]:
    """Tasks as the training child's SFT rows (teacher labels: the reference answer)."""
    return [{"kind": "sft", "prompt": t.prompt + prompt_suffix, "completion": t.answer, "weight": 1.0} for t in tasks]


def build_model(out_dir: Path, seed: int = 0, **size: int) -> Path:
    from selfdistill.models import build_tiny_model

    return build_tiny_model(out_dir, seed=seed, **{**TINY_SIZE, **size})


def bootstrap(model_dir: Path, rows: Sequence[dict[str, Any]], steps: int, *, batch_size: int = 32, lr: float = 3e-3,
              seed: int = 0, threads: int | None = None, system_prompt: str | None = None, log_every: int = 0) -> dict[str, Any]:
    """Full-weight supervised training of `model_dir` on `rows` for `steps` steps, saved in place.

    Cosine learning-rate decay after a 5% warm-up; loss on the completion and its end token only,
    rendered with the tokenizer's chat template exactly as the engines render a prompt.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    seqs = []
    for r in rows:
        p = tok.apply_chat_template(chat_messages(r["prompt"], system_prompt), add_generation_prompt=True, tokenize=False)
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ci = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((pi, ci))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    t0 = time.time()
    for step in range(steps):
        if len(order) < batch_size:
            more = list(range(len(seqs)))
            rng.shuffle(more)
            order += more
        idx, order = order[:batch_size], order[batch_size:]
        width = max(len(seqs[i][0]) + len(seqs[i][1]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for b, i in enumerate(idx):
            pi, ci = seqs[i]
            n = len(pi) + len(ci)
            ids[b, :n] = torch.tensor(pi + ci)
            labels[b, len(pi):n] = torch.tensor(ci)
            mask[b, :n] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"bootstrap step {step + 1}: loss {sum(losses[-log_every:]) / log_every:.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return {"steps": steps, "examples": len(rows), "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": round(time.time() - t0, 1)}


def continue_sft(model_dir: Path, rows: Sequence[dict[str, Any]], steps_per_round: Sequence[int], work: Path, *,
                 training: dict[str, Any], lora: dict[str, Any], system_prompt: str | None = None) -> dict[str, Any]:
    """The matched-steps control: the daemon's training child, round after round, on `rows`.

    Round i continues from round i-1's adapter (as the loop's candidate continues from its
    incumbent) and trains `steps_per_round[i]` optimizer steps: epochs are set to
    steps * batch_size / len(rows), and the trainer rounds up to whole steps. Returns the last
    adapter directory and the steps actually taken per round.
    """
    from selfdistill.config import TrainingConfig
    from selfdistill.training.child import run_training_child
    from selfdistill.training.spec import RoundSpec

    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tc = TrainingConfig.model_validate(training)
    per_step = tc.batch_size * tc.grad_accum
    prev, taken, seconds = None, [], []
    for i, steps in enumerate(steps_per_round, 1):
        if steps <= 0:
            taken.append(0)
            continue
        cfg = {**tc.model_dump(mode="json"), "algorithm": "sft", "epochs": steps * per_step / len(rows)}
        out = work / f"control-{i}"
        spec = RoundSpec(round_id=i, base_model_dir=str(model_dir), incumbent_adapter_dir=str(prev) if prev else None,
                         output_dir=str(out), data_path=str(data), system_prompt=system_prompt, training=cfg, lora=lora,
                         result_path=str(work / f"result-{i}.json"), threads=tc.threads, seed=tc.seed,
                         hf_home=str(work / "hf"))
        t = time.time()
        res = run_training_child(spec, time_limit_s=tc.time_limit_s)
        if res.status != "succeeded":
            raise RuntimeError(f"control round {i} {res.status}: {res.reason}")
        seconds.append(round(time.time() - t, 1))
        taken.append(res.metrics.get("sft_steps", 0))
        prev = out
    return {"adapter": prev, "steps": taken, "seconds": seconds}


class Evaluator:
    """One engine for every checkpoint compared, so their answers differ only by their weights."""

    def __init__(self, model_dir: Path, engine: dict[str, Any] | None = None, lora_rank: int = 8, max_tokens: int = 24,
                 prompt_suffix: str = "", system_prompt: str | None = None, cache_dir: Path | None = None):
        from selfdistill.config import EngineConfig
        from selfdistill.engines import make_engine

        cfg = EngineConfig.model_validate({"kind": "transformers", "dtype": "float32", "batch_size": 128, **(engine or {})})
        self.engine = make_engine(cfg, model_dir, lora_rank=lora_rank, cache_dir=cache_dir or model_dir / "cache")
        self.max_tokens = max_tokens
        self.prompt_suffix = prompt_suffix
        self.system_prompt = system_prompt
        self._n = 0

    def correct(self, tasks: Sequence[Task], adapter_dir: Path | None = None) -> list[bool]:
        """Per-task greedy correctness of the base (adapter_dir None) or an adapter."""
        from selfdistill.config import ScoringConfig
        from selfdistill.evaluation import evaluate_heldout
        from selfdistill.scoring.verifiers import resolve_verifier

        sc = ScoringConfig()

        def verify(text: str, task: Task):
            r = resolve_verifier(task, "auto", sc, ())(text, task)
            return r.score, r.correct

        with self._adapter(adapter_dir) as name:
            res = evaluate_heldout(self.engine, name, tasks, verify,
                                   lambda t: chat_messages(t.prompt + self.prompt_suffix, self.system_prompt), self.max_tokens)
        return [it.correct for it in res.items]

    @contextlib.contextmanager
    def _adapter(self, adapter_dir: Path | None):
        """The engine's name for `adapter_dir` (None: the base) while it is loaded."""
        from selfdistill.engines.base import AdapterRef

        if adapter_dir is None:
            yield None
            return
        self._n += 1
        name = f"eval-{self._n}"
        self.engine.load_adapter(AdapterRef(name=name, path=str(adapter_dir)))
        try:
            yield name
        finally:
            self.engine.drop_adapter(name)

    def pass_rates(self, tasks: Sequence[Task], adapter_dir: Path | None = None, k: int = 8, temperature: float = 1.0,
                   seed: int = 0) -> list[float]:
        """Per task, the share of `k` answers sampled at `temperature` that are correct (pass@1 at T):
        what a policy gradient on T = 1 samples optimises. The same seed for every model compared."""
        from selfdistill.config import ScoringConfig
        from selfdistill.engines.base import SamplingParams
        from selfdistill.scoring.verifiers import resolve_verifier

        sc = ScoringConfig()
        prompts = [chat_messages(t.prompt + self.prompt_suffix, self.system_prompt) for t in tasks]
        with self._adapter(adapter_dir) as name:
            outs = self.engine.generate(prompts, SamplingParams(n=k, temperature=temperature, max_tokens=self.max_tokens, seed=seed),
                                        adapter=name)
        return [sum(bool(resolve_verifier(t, "auto", sc, ())(c.text, t).correct) for c in cs) / k for t, cs in zip(tasks, outs)]

    def close(self) -> None:
        self.engine.close()


def as_tasks(tasks: Sequence[TaskIn]) -> list[Task]:
    """TaskIn records as store-like Tasks (ids in order) for evaluation outside a store."""
    return [Task(source=t.source, prompt=t.prompt, answer=t.answer, verifier=t.verifier, category=t.category,
                 metadata=t.metadata, id=i, split="heldout") for i, t in enumerate(tasks, 1)]


def summary(correct: Sequence[bool]) -> dict[str, Any]:
    from selfdistill.stats import wilson_interval

    k, n = sum(correct), len(correct)
    lo, hi = wilson_interval(k, n)
    return {"correct": k, "n": n, "accuracy": round(k / n, 4), "ci": [round(lo, 4), round(hi, 4)]}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-len", type=int, default=10)
    ap.add_argument("--eval", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    cfg = {"min_word_len": 3, "max_word_len": a.max_len}
    evals = rg_tasks("spell_backward", 1, a.eval, cfg)
    boot = disjoint(rg_tasks("spell_backward", 100_000, a.examples, cfg), evals)  # item i is seeded seed + i
    model = build_model(a.out)
    print(json.dumps(bootstrap(model, sft_rows(boot), a.steps, batch_size=a.batch, lr=a.lr, threads=a.threads)))
    t = time.time()
    ev = Evaluator(model)
    print(json.dumps({**summary(ev.correct(as_tasks(evals))), "eval_s": round(time.time() - t, 1)}))
