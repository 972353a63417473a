"""What the tiny-model learning tests share: the task, the bootstrap and the daemon's policy.

A tiny char-level Llama is bootstrapped (full weights) on a few hundred reference answers of
reasoning-gym `spell_backward` disjoint from every task the daemon will see; the daemon then runs
a policy of the given `[training]` on it. See test_tiny_learns.py for why the bootstrap overfits.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bootstrap import Evaluator, bootstrap, build_model, continue_sft, disjoint, rg_tasks, sft_rows, summary  # noqa: E402, F401

WORDS = {"min_word_len": 3, "max_word_len": 5}
TASK_SEED, TASK_SIZE, HELDOUT_FRACTION = 1, 2000, 0.15
BOOT_SEED, BOOT_SIZE, BOOT_STEPS = 100_000, 250, 250  # reasoning-gym seeds item i with seed + i: keep the ranges apart
ROUNDS = 3

TRAINING = """
algorithm = "sft"
learning_rate = 3e-3
epochs = 8
batch_size = 8
max_length = 128
data_scope = "all"
min_sft_examples = 8
threads = 1
time_limit_s = 300
"""
LORA = {"r": 32, "alpha": 64, "dropout": 0.0, "target_modules": "all-linear"}


def write_policy(tmp: Path, model_dir: Path, training: str = TRAINING, name: str = "tiny-learns", alpha: float = 0.1) -> Path:
    p = tmp / f"{name}.toml"
    p.write_text(f"""
name = "{name}"
state_dir = "state"
[student]
base_model = "{model_dir}"
lora = {{ r = {LORA['r']}, alpha = {LORA['alpha']}, dropout = 0.0, target_modules = "all-linear" }}
[engine]
kind = "transformers"
dtype = "float32"
max_model_len = 128
batch_size = 256
threads = 1
release_for_training = "keep"
[tasks]
heldout_fraction = {HELDOUT_FRACTION}
per_round = 500
[[tasks.sources]]
type = "reasoning_gym"
dataset = "spell_backward"
config = {{ min_word_len = {WORDS['min_word_len']}, max_word_len = {WORDS['max_word_len']} }}
seed = {TASK_SEED}
size = {TASK_SIZE}
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
""")
    return p



def bootstrapped(out: Path) -> tuple[Path, dict, list]:
    """(model directory, bootstrap figures, the bootstrap's tasks) of a freshly bootstrapped tiny model."""
    daemon_tasks = rg_tasks("spell_backward", TASK_SEED, TASK_SIZE, WORDS)
    boot = disjoint(rg_tasks("spell_backward", BOOT_SEED, BOOT_SIZE, WORDS), daemon_tasks)
    model = build_model(out)
    info = bootstrap(model, sft_rows(boot), BOOT_STEPS, batch_size=32, lr=3e-3, threads=1, log_every=100)
    return model, info, boot


def rows(db: Path, sql: str) -> list[dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


