"""A reward model learned from the store's preference pairs, inside the training child.

`run_reward_model(spec)` (a spec with `purpose = "reward_model"`) trains a LoRA reward head on the
student's base (transformers `AutoModelForSequenceClassification` with one label, TRL's
`RewardTrainer`: the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected))) on the pairs of the
round's data file, and measures it on pairs it never saw: the pairs are split by task (`prompt`),
so no task straddles the wall. The held-out accuracy (share of pairs with r(chosen) > r(rejected),
ties counting half) is the reward model's health figure: below `training.reward_model.min_accuracy`
the adapter is still written (to be inspected) but the result says `healthy = false` and the daemon
never scores with it.

`RewardScorer(base_dir, adapter_dir)` loads one for scoring (the daemon's score phase): the reward of
an answer is sigmoid(r), in (0, 1).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from selfdistill.records import chat_messages


def split_pairs(pairs: list[dict[str, Any]], heldout_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs, split by a hash of the task's prompt: a task's pairs stay together."""
    train, held = [], []
    for p in pairs:
        h = int(hashlib.sha256(p["prompt"].encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < heldout_fraction else train).append(p)
    return train, held


def _texts(tok, system_prompt: str | None, prompt: str, answer: str) -> str:
    return tok.apply_chat_template(chat_messages(prompt, system_prompt) + [{"role": "assistant", "content": answer}], tokenize=False)


def load(base_dir: Path, adapter_dir: Path | None = None, lora=None, trainable: bool = False):
    """(tokenizer, sequence-classification model with a LoRA reward head)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    else:
        model = get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=lora.target_modules, task_type="SEQ_CLS"))
    return tok, model


def rewards(tok, model, texts: list[str], batch_size: int = 16, max_length: int = 512) -> list[float]:
    """The reward head's raw output for each rendered conversation."""
    import torch

    model.eval()
    out: list[float] = []
    tok.padding_side = "right"
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                      add_special_tokens=False)
            out += model(**enc).logits.squeeze(-1).float().tolist()
    return out


def accuracy(tok, model, system_prompt: str | None, pairs: list[dict[str, Any]], max_length: int) -> float:
    """Share of pairs the model ranks right (ties count half)."""
    texts = [_texts(tok, system_prompt, p["prompt"], a) for p in pairs for a in (p["chosen"], p["rejected"])]
    r = rewards(tok, model, texts, max_length=max_length)
    wins = sum(1.0 if c > j else 0.5 if c == j else 0.0 for c, j in zip(r[0::2], r[1::2]))
    return wins / len(pairs)


def run_reward_model(spec, pairs: list[dict[str, Any]], scratch: str) -> tuple[str, str | None, dict[str, Any], Any]:
    """(status, reason, metrics, model or None) of training a reward model on `pairs`; the caller saves the adapter."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tc = spec.training_config()
    rm = tc.reward_model
    train, held = split_pairs(pairs, rm.heldout_fraction)
    m: dict[str, Any] = {"rm_train_pairs": len(train), "rm_heldout_pairs": len(held)}
    if len(train) < rm.min_pairs or len(held) < rm.min_heldout_pairs:
        return "skipped", (f"{len(train)} training and {len(held)} held-out pairs; a reward model needs "
                           f"{rm.min_pairs} and {rm.min_heldout_pairs} (training.reward_model)"), m, None
    tok, model = load(spec.base_model_dir, lora=spec.lora_config())
    ds = Dataset.from_list([{"prompt": chat_messages(p["prompt"], spec.system_prompt),
                             "chosen": [{"role": "assistant", "content": p["chosen"]}],
                             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in train])
    import torch

    cfg = RewardConfig(output_dir=scratch, num_train_epochs=rm.epochs, learning_rate=rm.learning_rate,
                       per_device_train_batch_size=tc.batch_size, max_length=tc.max_length, seed=spec.seed,
                       logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", report_to=[], disable_tqdm=True,
                       use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    t = time.monotonic()
    trainer = RewardTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    from selfdistill.training.run import check_left

    check_left(trainer, len(train), "reward-model pairs", tc.max_length)
    trainer.train()
    m["rm_train_s"] = round(time.monotonic() - t, 3)
    m["rm_steps"] = trainer.state.global_step
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if losses:
        m["rm_loss_first"], m["rm_loss_last"] = losses[0], losses[-1]
    m["rm_train_accuracy"] = round(accuracy(tok, model, spec.system_prompt, train, tc.max_length), 4)
    acc = accuracy(tok, model, spec.system_prompt, held, tc.max_length)
    m["rm_accuracy"] = round(acc, 4)
    m["rm_healthy"] = acc >= rm.min_accuracy
    reason = None if m["rm_healthy"] else (
        f"reward model accuracy {acc:.3f} on {len(held)} held-out pairs < training.reward_model.min_accuracy "
        f"{rm.min_accuracy:g}: not used")
    return "succeeded", reason, m, model


class RewardScorer:
    """A trained reward model, loaded once, scoring (prompt, answer) pairs as sigmoid(reward)."""

    def __init__(self, base_dir: Path, adapter_dir: Path, system_prompt: str | None, max_length: int = 512, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.tok, self.model = load(base_dir, adapter_dir)
        self.system_prompt = system_prompt
        self.max_length = max_length

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        import math

        texts = [_texts(self.tok, self.system_prompt, p, a) for p, a in zip(prompts, answers)]
        return [1.0 / (1.0 + math.exp(-r)) for r in rewards(self.tok, self.model, texts, max_length=self.max_length)]
