"""The contract between the daemon and a training child: a `RoundSpec` in, a `TrainingResult` out.

The daemon writes the round's data as one JSONL file (see `DATA_FORMAT`) and the spec as JSON next
to it; the child (`python -m selfdistill.training SPEC.json`) writes the result JSON at
`spec.result_path`. Both sides read and write these models only, so neither needs the store.

Pure: pydantic and the standard library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from selfdistill.config import LoraConfig, TrainingConfig
from selfdistill.records import DistillRecord, GroupRecord, PairRecord, SftRecord

DATA_FORMAT = """\
One JSON object per line, three kinds, in any order:
  {"kind": "sft",   "prompt": "...", "completion": "...", "weight": 1.0}
  {"kind": "pair",  "prompt": "...", "chosen": "...", "rejected": "...", "weight": 1.0}
  {"kind": "group", "prompt": "...", "weight": 1.0, "samples": [
      {"completion": "...", "reward": 1.0, "token_ids": [...] | null, "logprobs": [...] | null}, ...]}
  {"kind": "distill", "prompt": "...", "weight": 1.0, "token_ids": [...], "logprobs": [...] | null,
   "teacher_logprobs": [...], "topk_ids": [[...], ...], "topk_logprobs": [[...], ...]}
`prompt` is the task prompt as stored (no chat markup): the child renders it with
records.chat_messages(prompt, system_prompt) and the tokenizer's chat template, exactly as
generation does. `weight` is the sampling weight of the row (rows with weight 0 are dropped). A
group is one task's answers sampled by the incumbent for the policy-gradient stage; `token_ids`
and `logprobs` are the sampled tokens and the sampler's log-probability of each (temperature 1).
A distill row is one such answer with the teacher's log-probability of each of its tokens (the
on-policy distillation stage) and, for the top-k objectives only, the teacher's k most likely
tokens at each position with their log-probabilities ([tokens][k] each)."""

KINDS = ("sft", "pair", "group", "distill")


def write_round_data(path: Path, sft: list[SftRecord], pairs: list[PairRecord], groups: list[GroupRecord] = (),
                     distill: list[DistillRecord] = ()) -> Path:
    """Write a round's SFT examples, pairs, groups and distillation samples in DATA_FORMAT; returns `path`."""
    with open(path, "w") as f:
        for r in sft:
            f.write(json.dumps({"kind": "sft", "prompt": r.prompt, "completion": r.completion, "weight": r.weight}) + "\n")
        for r in pairs:
            f.write(json.dumps({"kind": "pair", "prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected, "weight": r.weight}) + "\n")
        for g in groups:
            samples = [{"completion": s.completion, "reward": s.reward, "token_ids": s.token_ids, "logprobs": s.logprobs}
                       for s in g.samples]
            f.write(json.dumps({"kind": "group", "prompt": g.prompt, "weight": g.weight, "samples": samples}) + "\n")
        for d in distill:
            f.write(json.dumps({"kind": "distill", "prompt": d.prompt, "weight": d.weight, "token_ids": d.token_ids,
                                "logprobs": d.logprobs, "teacher_logprobs": d.teacher_logprobs,
                                **({"topk_ids": d.topk_ids, "topk_logprobs": d.topk_logprobs} if d.topk_ids is not None else {})}) + "\n")
    return path


def read_round_data(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The rows of a round's data file by kind ("sft", "pair", "group", "distill"; rows with weight 0 are
    dropped); ValueError names the line of a row of unknown kind."""
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            row.setdefault("weight", 1.0)
            if row["weight"] <= 0:
                continue
            if row.get("kind") not in out:
                raise ValueError(f"{path}:{n}: unknown row kind {row.get('kind')!r} (expected one of {', '.join(KINDS)})")
            out[row["kind"]].append(row)
    return out


class RoundSpec(BaseModel):
    """Everything one training child needs; written as JSON by the daemon."""

    model_config = ConfigDict(extra="forbid")

    round_id: int = Field(..., description="Round this training belongs to.")
    purpose: Literal["policy", "reward_model"] = Field(
        "policy", description="Train the student's adapter, or a reward model on the pairs (training.reward_model)."
    )
    attempt: int = Field(1, ge=1, description="Attempt number of this round's training.")
    base_model_dir: Path = Field(..., description="Hugging Face model directory of the base student.")
    incumbent_adapter_dir: Path | None = Field(
        None, description="Adapter to continue from (trainable) and use as DPO reference; none: a fresh LoRA."
    )
    output_dir: Path = Field(
        ..., description="Final adapter directory; written to a hidden temporary sibling and renamed into place."
    )
    data_path: Path = Field(..., description="JSONL file of SFT rows and pairs (see DATA_FORMAT).")
    system_prompt: str | None = Field(None, description="System message used at generation (none: template default).")
    training: dict[str, Any] = Field(default_factory=dict, description="TrainingConfig as a dict.")
    lora: dict[str, Any] = Field(default_factory=dict, description="LoraConfig as a dict (fresh adapters only).")
    result_path: Path = Field(..., description="JSON file the child writes: status, reason, metrics.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads per process (none: library default).")
    seed: int = Field(0, description="Training seed.")
    hf_home: Path = Field(..., description="Service-owned HF_HOME (caches of datasets and hub).")

    def training_config(self) -> TrainingConfig:
        return TrainingConfig.model_validate(self.training)

    def lora_config(self) -> LoraConfig:
        return LoraConfig.model_validate(self.lora)

    def write(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        write_json_atomic(p, self.model_dump(mode="json"))
        return p

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "RoundSpec":
        return cls.model_validate_json(Path(path).read_text())


Status = Literal["succeeded", "failed", "skipped"]


class TrainingResult(BaseModel):
    """What a training child reports (and what `run_training_child` returns to the daemon)."""

    model_config = ConfigDict(extra="forbid")

    status: Status
    reason: str | None = Field(None, description="One line: why the round failed or was skipped.")
    metrics: dict[str, Any] = Field(default_factory=dict)
    stages: dict[str, str] = Field(
        default_factory=dict, description="Per stage (sft, dpo): 'trained' or 'skipped: <reason>'."
    )
    adapter_dir: Path | None = Field(None, description="The adapter written (succeeded only).")
    pid: int | None = Field(None, description="Process (group) id of the child, filled in by the daemon side.")
    returncode: int | None = Field(None, description="Exit status of the child; negative: killed by that signal.")

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "TrainingResult":
        return cls.model_validate_json(Path(path).read_text())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary sibling, fsync, rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
