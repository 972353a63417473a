"""Policy files: the typed configuration of a selfdistill service, validated before anything heavy
is built.

A policy is a TOML file whose tables map one to one onto the models below (`extra="forbid"`
everywhere, help text on every field). `load_policy(path)` returns a `Policy` or raises a
`PolicyError` whose message lists every problem at once, each naming the file, the key path and
what is expected. `selfdistill check POLICY` is the command-line face of this module, and
`reload_plan(old, new)` decides what a SIGHUP may change in a running daemon (fields marked
`restart` wait for a restart).

Pure: imports only pydantic and the standard library.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from selfdistill.errors import PolicyError

BUNDLED_STUDENT = "bundled:smollm2-135m-instruct"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


# --------------------------------------------------------------------------------------------
# student and engines


class LoraConfig(_Model):
    r: int = Field(16, ge=1, le=512, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description='Modules that carry LoRA weights, or "all-linear".'
    )


class StudentConfig(_Model):
    base_model: str = Field(
        BUNDLED_STUDENT,
        description=f'Hugging Face model directory of the student, or "{BUNDLED_STUDENT}" for the '
        "bundled SmolLM2-135M-Instruct (prepared by `selfdistill models prepare`).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter settings.")
    system_prompt: str | None = Field(
        None, description="System message put before every task prompt (none: the template's default)."
    )


class OpenAIEndpoint(_Model):
    base_url: str = Field(..., description="Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., description="Model name sent in each request.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (never the key itself)."
    )
    api_key_file: Path | None = Field(
        None, description="A file holding the API key; it must be readable by its owner only (mode 0600)."
    )
    concurrency: int = Field(8, ge=1, le=1024, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one request, in seconds.")
    max_retries: int = Field(5, ge=0, le=50, description="Retries on 429, 5xx and connection errors.")
    backoff_s: float = Field(0.5, gt=0, description="First backoff delay; doubles each retry (with jitter).")
    circuit_breaker_failures: int = Field(
        5, ge=1, description="Consecutive failed requests after which the circuit opens."
    )
    circuit_breaker_cooldown_s: float = Field(
        60.0, gt=0, description="How long an open circuit refuses requests before trying again."
    )


class EngineConfig(_Model):
    kind: Literal["vllm", "transformers", "openai"] = Field(
        "vllm", description="Which engine serves the student: offline vLLM, transformers, or a server."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype served. auto: on a CPU, bfloat16 where it has AVX512-BF16 or AMX (4.5x float32 in "
        "vLLM) and float32 where it has not (there bfloat16 is emulated, 5.6x slower than float32); on a GPU the model's own."
    )
    max_model_len: int = Field(2048, ge=64, description="Context length the engine reserves.")
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1.0, description="vLLM on GPU: share of GPU memory.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="vLLM on CPU: KV cache size in GiB.")
    enforce_eager: bool = Field(True, description="vLLM: skip graph capture / torch.compile (faster start).")
    max_loras: int = Field(2, ge=1, description="vLLM: adapters resident at once.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (none: library default).")
    batch_size: int = Field(32, ge=1, description="transformers engine: sequences per generate batch.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="transformers engine: where the model runs ('auto': the GPU when torch sees one). "
        "vLLM picks its own device (its build's).")
    release_for_training: Literal["auto", "sleep", "restart", "keep"] = Field(
        "auto",
        description="How the engine frees memory before a training round: vLLM sleep mode, a clean "
        "shutdown and restart, or keep it loaded ('auto' picks sleep on GPU, restart on CPU).",
    )
    adapter_serving: Literal["auto", "lora", "merged"] = Field(
        "auto",
        description="vLLM: how a checkpoint is served: as a LoRA adapter on the base (switching is free), "
        "or merged into a copy of the base weights (each switch restarts the engine, ~5 s for a 135M "
        "model, but vLLM's CPU build generates about 7x faster than through its LoRA path; "
        "benchmarks/RESULTS.md, 'Engines'). 'auto': merged on CPU, lora on GPU.",
    )
    server: OpenAIEndpoint | None = Field(
        None, description="kind='openai': the server that serves the student (a `vllm serve` with LoRA)."
    )


class TeacherServe(_Model):
    """teacher.kind = 'served': the daemon runs vLLM's OpenAI-compatible server of `teacher.model` as its child."""

    port: int = Field(0, ge=0, le=65535, description="Loopback port of the teacher server (0: a free one at each start).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, lt=1.0, description="GPU: the teacher's share of the device (the student's engine takes "
        "engine.gpu_memory_utilization; the two must add up to at most 0.95). Unset: vLLM's default.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="CPU: the teacher server's KV cache in GiB (--kv-cache-memory-bytes).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="The teacher's weights dtype (auto: as engine.dtype's).")
    max_model_len: int = Field(2048, ge=64, description="Context length the teacher server reserves.")
    enforce_eager: bool = Field(True, description="Skip graph capture (faster start, slower generation).")
    extra_args: list[str] = Field(default_factory=list, description="More `vllm serve` arguments, passed as given.")
    start_timeout_s: float = Field(600.0, gt=0, description="How long a start may take before the server is killed and the call fails.")
    request_timeout_s: float = Field(300.0, gt=0, description="Timeout of one request to the teacher server.")
    release: Literal["stop", "keep"] = Field(
        "stop", description="Before a training round: stop the server (its memory is freed; it starts again at the next "
        "teacher call, benchmarks/RESULTS.md gives the cost) or keep it running.")
    max_restarts: int = Field(3, ge=0, description="Restarts of a server that died, per daemon run, before teacher calls fail for good.")


class TeacherConfig(_Model):
    kind: Literal["openai", "served", "transformers", "vllm"] = Field(
        "openai", description="How the teacher is reached: a server you run (openai), a vLLM server the daemon runs as its "
        "child (served), or a model loaded in the daemon (transformers, vllm).")
    model: str | None = Field(None, description="Local model directory (kind served, transformers or vllm; a path starting with . "
                               "is relative to the policy file).")
    endpoint: OpenAIEndpoint | None = Field(None, description="kind='openai': the server.")
    serve: TeacherServe = Field(default_factory=TeacherServe, description="kind='served': how the daemon runs the teacher server.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature for teacher calls.")
    max_tokens: int = Field(512, ge=1, description="Maximum tokens of a teacher answer.")

    @model_validator(mode="after")
    def _where(self) -> "TeacherConfig":
        if self.kind == "openai" and self.endpoint is None:
            raise ValueError("kind='openai' needs an [endpoint] table with base_url and model")
        if self.kind != "openai" and not self.model:
            raise ValueError(f"kind='{self.kind}' needs `model` (a local model directory)")
        return self

    @property
    def name(self) -> str:
        """The teacher as logs and the store name it: its model directory, or its server and served model."""
        return self.model if self.kind != "openai" else f"{self.endpoint.base_url} {self.endpoint.model}"


# --------------------------------------------------------------------------------------------
# tasks


class JsonlSource(_Model):
    type: Literal["jsonl"] = Field(..., description="A JSONL file of the user's own tasks.")
    path: Path = Field(..., description="JSONL file: one object per line with `prompt`, optional "
                       "`answer`, `verifier`, `category`, `metadata`, `group` (tasks of one group share a split).")
    weight: float = Field(1.0, gt=0, description="Relative share of this source in sampling.")


class ReasoningGymSource(_Model):
    type: Literal["reasoning_gym"] = Field(..., description="A procedural reasoning-gym dataset, scored by its own verifier.")
    dataset: str = Field(..., description="reasoning-gym dataset name, e.g. 'chain_sum'.")
    config: dict[str, Any] = Field(default_factory=dict, description="Keyword config for the dataset.")
    seed: int = Field(0, description="Seed of the procedural generator. reasoning-gym seeds item i with seed + i, so sources "
                      "whose seeds are closer than their sizes share items (harmless: tasks are keyed by question text).")
    size: int = Field(1000, ge=1, description="Items drawn from the generator.")
    weight: float = Field(1.0, gt=0, description="Relative share of this source in sampling.")


class DatasetDirSource(_Model):
    type: Literal["dataset_dir"] = Field(..., description="A local directory of dataset files.")
    path: Path = Field(..., description="Local directory of *.jsonl / *.json / *.parquet files.")
    prompt_field: str = Field("prompt", description="Column holding the prompt.")
    answer_field: str | None = Field("answer", description="Column holding the reference answer.")
    weight: float = Field(1.0, gt=0, description="Relative share of this source in sampling.")


class ExpansionSource(_Model):
    type: Literal["expansion"] = Field(..., description="New tasks written by a model from examples of known ones.")
    by: Literal["teacher", "student"] = Field("teacher", description="Who writes the new tasks.")
    seeds_from: str = Field("all", description="Source name (or 'all') whose tasks serve as examples.")
    per_round: int = Field(16, ge=1, description="New tasks asked for per expansion.")
    examples_per_prompt: int = Field(3, ge=1, le=16, description="Seed tasks shown in each request.")
    max_similarity: float = Field(0.7, gt=0, le=1, description="Reject a new task this similar (ROUGE-L-like) to a known one.")
    weight: float = Field(1.0, gt=0, description="Relative share of this source in sampling.")


# why some keys of [tasks] cannot change while the daemon runs (see reload_plan)
_SPLIT_FIXED = "tasks already in the store keep their split; changing it would move the held-out wall"
_EVALS_FIXED = "stored evaluations were made under the old prompt and verifier; gating would compare unlike figures"

SourceConfig = Annotated[
    Union[JsonlSource, ReasoningGymSource, DatasetDirSource, ExpansionSource], Field(discriminator="type")
]


class CurriculumConfig(_Model):
    target_pass_rate: float = Field(0.5, gt=0, lt=1, description="Pass rate a task is most useful at.")
    width: float = Field(0.25, gt=0, description="How fast the weight falls away from the target pass rate.")
    explore_weight: float = Field(1.0, ge=0, description="Weight of a task never attempted.")
    floor_weight: float = Field(0.05, ge=0, description="Weight of a task always or never solved.")
    max_uses: int = Field(8, ge=1, description="A task is not sampled again after this many rounds.")
    level_field: str | None = Field(
        None, min_length=1, description="Difficulty levels: the task field holding each task's level (a number: a field of a "
        "JSONL task's `metadata`, or of a reasoning-gym entry's metadata, e.g. chain_sum's 'num_terms'). Training tasks are "
        "drawn from the lowest level not yet passed; a level is passed when one student's (one checkpoint's) pass rate on the "
        "level's tasks it attempted reaches advance_at. None: no levels.",
        json_schema_extra={"restart": "checked against the stored tasks at start: restart to change"},
    )
    advance_at: float = Field(0.5, gt=0, le=1, description="One checkpoint's pass rate on a level's training tasks it attempted that opens the next level.")
    min_attempted: int = Field(16, ge=1, description="Training tasks of a level one checkpoint attempted before the level can be passed.")
    review_weight: float = Field(0.25, ge=0, description="Weight multiplier of the tasks of levels already passed (review); "
                                 "tasks of levels not yet open weigh 0.")


class TasksConfig(_Model):
    sources: list[SourceConfig] = Field(
        ..., min_length=1, description="Where tasks come from.",
        json_schema_extra={"restart": "sources are ingested at start: restart to ingest"},
    )
    heldout_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of tasks kept held-out (by key hash).",
        json_schema_extra={"restart": _SPLIT_FIXED},
    )
    audit_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of tasks kept as an audit set (by key hash): never trained on, never seen by the gates; for benchmarks.",
        json_schema_extra={"restart": _SPLIT_FIXED},
    )
    per_round: int = Field(64, ge=1, description="Training tasks sampled per round.")
    prompt_suffix: str = Field(
        "", description="Text appended to every task prompt (e.g. the answer format asked for).",
        json_schema_extra={"restart": _EVALS_FIXED},
    )
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig, description="Sampling weights.")
    default_verifier: str = Field(
        "auto", description="Verifier for tasks that name none: 'auto' = the source's own "
        "(reasoning-gym scoring), else exact / normalized / numeric / regex:<pattern> / code.",
        json_schema_extra={"restart": _EVALS_FIXED},
    )


# --------------------------------------------------------------------------------------------
# generation, scoring, pairs


class GenerationConfig(_Model):
    samples_per_task: int = Field(8, ge=1, le=256, description="k: answers sampled per task.")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_tokens: int = Field(128, ge=1, description="Maximum new tokens per answer.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    seed: int = Field(0, description="Seed of the engine (per-request seeds crash vLLM's CPU build).")


class JudgeConfig(_Model):
    enabled: bool = Field(False, description="Use this judge.")
    mode: Literal["pointwise", "pairwise"] = Field("pointwise", description="Score each answer, or compare two (both orders).")
    max_tokens: int = Field(16, ge=1, description="Tokens the judge may write for a verdict.")
    reason_first: bool = Field(False, description="The judge writes its reasons before the verdict line (then give it "
                               "max_tokens for them, 128 or more); otherwise it answers with the verdict line alone.")
    matches: Literal["neighbours", "all"] = Field(
        "neighbours", description="Pairwise scoring: each answer meets one neighbour (k/2 matches a task), or every other answer "
        "(k(k-1)/2); each match is asked in both orders and counts only when they agree; pairs are only matches won.")
    min_agreement: float = Field(0.6, ge=0, le=1, description="Judge health: least agreement with the reference on the anchor set.")
    max_position_bias: float = Field(0.3, ge=0, le=1, description="Judge health: most share of pairwise verdicts that flip with order.")
    min_distinct_scores: int = Field(2, ge=1, description="Judge health: fewer distinct scores than this is a collapse.")
    anchor_size: int = Field(32, ge=4, description="Anchor items used to check the judge.")
    recheck_every_rounds: int = Field(5, ge=1, description="Re-measure the judge's health every N rounds.")
    anchors: Path | None = Field(None, description="JSONL of labelled answers the judge is measured on (README, 'Anchor files'); "
                                 "the round's verifier-scored answers fill up to anchor_size. Needed where tasks have no verifier.")
    teacher_anchors: int = Field(
        0, ge=0, description="Self judge only: the teacher labels this many of the student's answers once (pointwise: its verdict; "
        "pairwise: its preference in both orders, kept where they agree); the store keeps them with their provenance and the "
        "self judge is measured on them, after the anchor file's items and before the round's verifier-scored answers. "
        "Anchors for tasks without a verifier when you have a teacher but no anchor file.")


class ScoringConfig(_Model):
    use_verifier: bool = Field(True, description="Score answers with the task's verifier where it has one.")
    self_judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The student judges its own answers.")
    teacher_judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The teacher judges the student's answers.")
    teacher_label: bool = Field(False, description="The teacher writes a reference answer used as an SFT example / chosen side.")
    teacher_revise: bool = Field(False, description="The teacher revises a wrong student answer into the chosen side.")
    code_timeout_s: float = Field(5.0, gt=0, description="Sandbox: wall-clock limit for code answers.")
    code_memory_mb: int = Field(256, ge=16, description="Sandbox: address-space limit.")
    code_sandbox: Literal["isolated", "rlimits"] = Field(
        "isolated", description="isolated: code answers run only where the sandbox can isolate them (network and mount "
        "namespaces, the state directory hidden, a uid of their own: today, a daemon running as root), and a daemon that "
        "cannot refuses to start with code tasks; rlimits: accept CPU, memory and file-size limits alone (the code runs "
        "as the daemon's user and can reach its files and the network: a trusted machine only).")


class PairsConfig(_Model):
    strategy: Literal["best_vs_worst", "all_above_margin", "verified_chosen"] = Field(
        "verified_chosen", description="How pairs are formed from the k scored answers of a task."
    )
    min_margin: float = Field(0.5, ge=0, description="Least score difference between chosen and rejected.")
    max_pairs_per_task: int = Field(4, ge=1, description="Cap of pairs taken from one task per round.")
    length_match: bool = Field(False, description="Prefer rejected answers of similar length (against length bias).")
    length_ratio_max: float = Field(1.5, ge=1, description="length_match: longest/shortest ratio allowed.")
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1, description="Answers this similar count as duplicates.")
    sft_from: Literal["verified", "top", "none"] = Field("verified", description="SFT examples: verified-correct answers, the top-scored, or none.")
    max_sft_per_task: int = Field(2, ge=0, description="Cap of SFT examples taken from one task per round.")
    rejected_from: Literal["round", "base"] = Field(
        "round", description="The rejected side of a pair: the round's own answers, or the base model's answers to the same "
        "task (anchored rejection: the margin does not shrink as the student improves). The base's answers are generated once "
        "per task (anchor_samples of them, when a round first meets the task after the base stopped being the incumbent), "
        "kept as generations of purpose 'anchor' and scored each round beside the round's own; the chosen side stays the round's."
    )
    anchor_samples: int = Field(2, ge=1, le=64, description="rejected_from = 'base': the base's answers kept per task.")
    weights: dict[str, float] = Field(
        default_factory=lambda: {"verifier": 1.0, "teacher": 0.7, "reward_model": 0.5, "self": 0.4},
        description="Weight of a pair by the source of its signal.",
    )


# --------------------------------------------------------------------------------------------
# training, evaluation, gates


class RLConfig(_Model):
    """The policy-gradient stage (algorithm grpo / sft_then_grpo) on the round's own samples."""

    variant: Literal["grpo", "dr_grpo", "rloo"] = Field(
        "grpo", description="Advantage and loss normalisation: grpo (reward minus group mean, over group std; "
        "per-answer token mean), dr_grpo (minus group mean, no std; token sum over a constant), "
        "rloo (leave-one-out baseline; token mean over the batch)."
    )
    reward: Literal["score", "correct"] = Field(
        "score", description="The verifier's score (partial credit where the task gives it) or 1/0 correct; "
        "a healthy judge's score where a task has no verifier."
    )
    length_penalty: float = Field(0.0, ge=0, description="Reward shaping: minus this times the answer's share of generation.max_tokens.")
    truncation_penalty: float = Field(0.0, ge=0, description="Reward shaping: minus this for an answer cut at generation.max_tokens.")
    learning_rate: float | None = Field(None, gt=0, lt=1, description="Learning rate of the stage (none: training.learning_rate / 4).")
    passes: int = Field(2, ge=1, le=16, description="Optimisation passes over the round's samples (the ratio's clip keeps later passes honest).")
    clip_epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip of the importance ratio (1 - epsilon).")
    clip_epsilon_high: float = Field(0.28, gt=0, lt=10, description="Upper clip of the importance ratio (1 + epsilon_high; DAPO's clip-higher).")
    kl_beta: float = Field(0.0, ge=0, description="Weight of the per-token KL penalty (k3 estimator) to training.reference.")
    sampler_ratio_cap: float = Field(
        2.0, ge=1, description="Truncated importance weight of trainer over sampler probability (engine/trainer "
        "numeric mismatch), from the log-probabilities stored at generation."
    )
    missing_logprobs: Literal["recompute", "skip"] = Field(
        "recompute", description="Samples without stored log-probabilities: train with the trainer's own (no "
        "sampler correction), or skip the stage with the reason."
    )
    min_groups: int = Field(4, ge=1, description="Fewer tasks with differing rewards than this: the stage is skipped with a reason.")
    min_entropy: float = Field(1e-3, ge=0, description="Guard: a mean token entropy (nats) below this fails the round (collapse).")
    max_ratio: float = Field(10.0, gt=1, description="Guard: a mean importance ratio above this fails the round.")
    keep_logprobs_rounds: int = Field(2, ge=1, description="Retention: stored sampling log-probabilities older than this many rounds are dropped.")


class RewardModelConfig(_Model):
    """A LoRA reward head trained on the store's pairs; where healthy, it scores answers of tasks without a verifier."""

    enabled: bool = Field(False, description="Train a reward model in each training round and score verifier-less tasks with it.")
    min_pairs: int = Field(16, ge=2, description="Fewer training pairs than this: no reward model this round.")
    min_heldout_pairs: int = Field(8, ge=1, description="Fewer held-out pairs than this: no reward model (its accuracy would mean nothing).")
    heldout_fraction: float = Field(0.25, gt=0, lt=1, description="Share of the tasks whose pairs measure the reward model (split by task).")
    min_accuracy: float = Field(0.65, ge=0.5, le=1, description="Health: least held-out pair accuracy; below it the model scores nothing.")
    epochs: float = Field(2.0, gt=0, le=100, description="Epochs over the training pairs.")
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="Learning rate of the reward head's LoRA.")


class DistillConfig(_Model):
    """On-policy distillation (algorithm distill / sft_then_distill) on the student's own samples
    (training/policy_gradient.py): per-token reverse KL to the teacher as a policy-gradient step, or
    forward KL / generalised JSD against the teacher's top-k distribution at each position. Its
    trust region and guards are training.rl's clip_epsilon(_high), sampler_ratio_cap, max_ratio and
    min_entropy; its stored log-probabilities follow training.rl.keep_logprobs_rounds."""

    objective: Literal["reverse_kl", "forward_kl", "jsd"] = Field(
        "reverse_kl", description="reverse_kl: the policy-gradient step on the sampled token's teacher-minus-student gap (4 bytes a "
        "token stored); forward_kl: KL(teacher || student) over the teacher's top_k tokens and the rest as one bucket, at each "
        "position of the student's answer (mode covering); jsd: the generalised Jensen-Shannon divergence of the two on the "
        "same buckets, weighted by jsd_beta (4 + 8 * top_k bytes a token stored for both)."
    )
    top_k: int = Field(8, ge=1, le=20, description="Alternatives per position the teacher lists (forward_kl, jsd); vLLM serves at most "
                       "20 unless started with a larger --max-logprobs.")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="jsd: the mixture M = beta * teacher + (1 - beta) * student and the loss "
                            "beta * KL(teacher || M) + (1 - beta) * KL(student || M); towards 0 it behaves like forward KL, "
                            "towards 1 like reverse KL.")

    coef: float = Field(1.0, gt=0, description="Weight of the per-token advantage: coef * (teacher minus student log-probability).")
    learning_rate: float | None = Field(None, gt=0, lt=1, description="Learning rate of the stage (none: training.learning_rate / 4).")
    passes: int = Field(1, ge=1, le=16, description="Optimisation passes over the round's samples.")
    baseline: Literal["none", "mean", "whiten"] = Field(
        "whiten", description="Variance reduction of the per-token advantage: none (the raw teacher-minus-student gap), mean "
        "(minus its mean over the round's tokens: unbiased, the sampled token's own gap still decides the sign) or whiten "
        "(also over its standard deviation, so the step size does not depend on how far apart the two models are)."
    )
    min_samples: int = Field(16, ge=1, description="Fewer samples scored by the teacher than this: the stage is skipped with a reason.")
    samples_per_task: int | None = Field(
        None, ge=1, description="How many of each train task's answers the teacher scores (none: all; a paid teacher costs per token)."
    )


RL_STAGES = ("grpo", "distill")  # stages on the round's own samples: sampling log-probabilities asked, one process


class TrainingConfig(_Model):
    algorithm: Literal["sft", "dpo", "sft_then_dpo", "grpo", "sft_then_grpo", "distill", "sft_then_distill"] = Field(
        "sft_then_dpo", description="What a round trains: SFT, DPO-family, group-relative policy gradient, on-policy "
        "distillation from the teacher's token log-probabilities, or SFT then one of them."
    )
    loss_type: list[Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down", "sppo_hard", "nca_pair", "simpo", "orpo"]] = Field(
        default_factory=lambda: ["sigmoid"], description="DPO-family loss(es); simpo and orpo are reference-free."
    )
    loss_weights: list[float] | None = Field(None, description="Weights of the losses in loss_type (same length).")
    beta: float = Field(0.1, gt=0, description="DPO beta.")
    rpo_alpha: float | None = Field(0.5, ge=0, description="Weight of an NLL term on the chosen answers (RPO); none to disable.")
    reference: Literal["incumbent", "base"] = Field("incumbent", description="DPO reference model.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    dpo_learning_rate: float | None = Field(None, gt=0, lt=1, description="Learning rate of the DPO stage (none: learning_rate / 4).")
    epochs: float = Field(2.0, gt=0, le=100, description="Epochs of SFT over the round's examples.")
    dpo_epochs: float = Field(1.0, gt=0, le=100, description="Epochs of DPO over the round's pairs.")
    batch_size: int = Field(8, ge=1, description="Per-device batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(384, ge=16, description="Longest training sequence, in tokens.")
    data_scope: Literal["since_last", "all"] = Field(
        "all", description="since_last: train on the data the incumbent was not trained on (gathered since the round "
        "that made it, so a rejected round's data is kept), plus replay_fraction of the older; all: on all training data "
        "so far (STaR-style)."
    )
    replay_fraction: float = Field(0.0, ge=0, le=1, description="since_last: share of older data mixed in against forgetting.")
    review_fraction: float | None = Field(
        None, ge=0, lt=1, description="With difficulty levels (tasks.curriculum.level_field): the rows of levels already "
        "passed are cut, by a seeded random draw, to this share of a round's SFT examples and of its pairs, so a mastered "
        "level's rows do not fill the training of the next (none: all kept). The round's level is the one it sampled at.")
    start_from: Literal["incumbent", "base"] = Field(
        "incumbent", description="Where a round's LoRA starts: the incumbent's adapter (training continues), or a fresh "
        "LoRA on the base trained on all the data so far (STaR's restart: no epochs piled on old data; needs "
        "data_scope = 'all' and reference = 'base'). The candidate is gated against the incumbent either way.")
    min_sft_examples: int = Field(8, ge=1, description="Fewer SFT examples than this: the SFT stage is skipped with a reason.")
    min_pairs: int = Field(8, ge=1, description="Fewer pairs than this: the DPO stage is skipped with a reason.")
    time_limit_s: float = Field(3600.0, gt=0, description="The child is killed (whole process group) after this.")
    launcher: Literal["python", "accelerate", "torchrun"] = Field("python", description="How the child is started.")
    num_processes: int = Field(1, ge=1, description="Processes under accelerate/torchrun.")
    accelerate_config: Path | None = Field(None, description="launcher='accelerate': an accelerate config file (DeepSpeed ZeRO-3, FSDP; see README).")
    threads: int | None = Field(None, ge=1, description="CPU threads of the child (none: library default).")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="The frozen base's weights while training; the LoRA is float32 always. bfloat16 on CPU runs "
        "only the base's matrix products in bfloat16 (the residual stream, attention and LoRA stay float32); on a GPU it "
        "is a bfloat16 model under autocast. auto: bfloat16 on a GPU that has it, and on a CPU with native bfloat16 "
        "(AVX512-BF16 or AMX) for SFT and DPO-family rounds; float32 elsewhere, and for grpo and distill rounds on CPU "
        "(their importance ratios compare against the sampler's log-probabilities).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    explode_grad_norm: float = Field(1e4, gt=0, description="Guard: a gradient norm above this fails the round.")
    min_loss_change: float = Field(1e-4, ge=0, description="Guard: a loss that moves less than this fails the round.")
    min_dpo_margin: float = Field(-5.0, description="Guard: a final mean DPO reward margin below this fails the round.")
    seed: int = Field(0, description="Training seed.")
    max_retries: int = Field(1, ge=0, description="A failed round is retried this many times before being given up.")
    rl: RLConfig = Field(default_factory=RLConfig, description="The policy-gradient stage (grpo, sft_then_grpo).")
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig, description="A reward model learned from the pairs.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="On-policy distillation (distill, sft_then_distill).")

    def stages(self) -> list[str]:
        """The stages a round runs, in order."""
        return {"sft": ["sft"], "dpo": ["dpo"], "sft_then_dpo": ["sft", "dpo"], "grpo": ["grpo"],
                "sft_then_grpo": ["sft", "grpo"], "distill": ["distill"], "sft_then_distill": ["sft", "distill"]}[self.algorithm]

    def uses_rl(self) -> bool:
        return any(s in RL_STAGES for s in self.stages())

    @model_validator(mode="after")
    def _weights_match(self) -> "TrainingConfig":
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"got {len(self.loss_weights)} loss_weights for {len(self.loss_type)} loss_type entries"
            )
        if self.start_from == "base":
            if self.data_scope != "all":
                raise ValueError("start_from = 'base' trains a fresh LoRA each round: set data_scope = 'all', "
                                 "or it forgets every round's data but the last")
            if self.reference != "base":
                raise ValueError("start_from = 'base' does not load the incumbent: set reference = 'base' (the DPO reference "
                                 "is the model training starts from)")
            if self.uses_rl():
                raise ValueError(f"algorithm {self.algorithm!r}: the policy-gradient and distillation stages correct for the "
                                 "sampler, the incumbent, and must start from it: set start_from = 'incumbent'")
        if self.uses_rl() and self.num_processes > 1:
            raise ValueError(f"algorithm {self.algorithm!r}: the policy-gradient stage runs in one process; set num_processes = 1")
        free = [x for x in self.loss_type if x in ("simpo", "orpo")]
        if free and len(self.loss_type) > 1:
            # TRL runs these through their own trainers (CPO, ORPO), which cannot mix with DPO losses
            raise ValueError(f"loss_type {free[0]!r} is reference-free and must be the only entry (got {self.loss_type})")
        return self


class EvaluationConfig(_Model):
    heldout_items: int = Field(200, ge=1, description="Held-out tasks a round's gate tests the candidate and the incumbent on.")
    gate_items: Literal["fixed", "rotate"] = Field(
        "fixed", description="Which held-out items each round's gate uses. 'fixed': the same first heldout_items every round "
        "(re-testing them is adaptive reuse: the incumbent was chosen on those very items). 'rotate': a window of heldout_items "
        "that moves on by heldout_items each round, cyclically through the whole held-out pool (in the order of the task keys, "
        "so each window is a fair draw of it), so each round tests mostly on "
        "items the last gate did not choose on (fresh ones when the pool holds heldout_items x rounds). Either way a "
        "checkpoint answers an item once: its stored answer is reused in every later evaluation.",
    )
    audit_items: int = Field(300, ge=0, description="Audit tasks (tasks.audit_fraction) the base and each promoted checkpoint answer "
                             "(greedy, once each): a figure no gate or decision ever reads, so it is not chosen on. 0: off.")
    max_tokens: int = Field(128, ge=1, description="Tokens per evaluation answer (greedy).")
    pairwise_judge: Literal["none", "teacher", "self"] = Field(
        "none", description="A judge compares the candidate's and the incumbent's held-out answers in both orders; "
        "the candidate's win rate is gated by gates.min_win_rate (its settings: scoring.teacher_judge / self_judge)."
    )
    pairwise_items: int = Field(100, ge=1, description="Held-out items judged pairwise (the first ones; two judge calls per item "
                                "whose answers differ, none where they are the same).")
    anchor_prompts: list[str] = Field(
        default_factory=lambda: [
            "Write one sentence about the sea.",
            "What is the capital of France?",
            "Give a short tip for staying healthy.",
            "Explain in one sentence what a computer does.",
        ],
        description="Forgetting guard: general prompts whose answers under the base must stay likely.",
    )
    anchor_max_tokens: int = Field(48, ge=1, description="Length of the base's reference answers to anchor prompts.")


class GateConfig(_Model):
    min_gain: float = Field(0.0, ge=-1, le=1, description="Least accuracy gain (candidate - incumbent) to promote.")
    test: Literal["mcnemar", "bootstrap", "none"] = Field("mcnemar", description="Paired significance test on per-item correctness.")
    alpha: float = Field(0.05, gt=0, le=1, description="Significance level of the paired test (one-sided).")
    max_category_regression: float = Field(0.05, ge=0, le=1, description="Most accuracy a category may lose.")
    min_category_items: int = Field(20, ge=1, description="Categories with fewer held-out items are not checked for regression.")
    max_anchor_nll_increase: float = Field(0.5, ge=0, description="Forgetting guard: most increase of mean per-token NLL of the base's anchor answers.")
    max_empty_fraction: float = Field(0.1, ge=0, le=1, description="Sanity: most share of empty answers.")
    max_repetition: float = Field(0.5, ge=0, le=1, description="Sanity: most share of repeated 4-grams in an answer, on average.")
    max_length_ratio: float = Field(3.0, ge=1, description="Sanity: mean answer length may not change by more than this factor.")
    min_win_rate: float = Field(
        0.5, ge=0, le=1, description="Least pairwise win rate of the candidate against the incumbent (evaluation.pairwise_judge; "
        "a tie or an inconsistent verdict counts one half)."
    )
    bootstrap_samples: int = Field(2000, ge=100, description="Resamples of the bootstrap test.")


# --------------------------------------------------------------------------------------------
# schedule, stopping, service


class TimeWindow(_Model):
    start: str = Field(..., pattern=r"^\d{2}:\d{2}$", description="HH:MM local time the window opens.")
    end: str = Field(..., pattern=r"^\d{2}:\d{2}$", description="HH:MM local time it closes (may wrap past midnight).")


class ScheduleConfig(_Model):
    train_min_new_pairs: int = Field(0, ge=0, description="Train when this many new pairs+examples exist (0: every round).")
    train_interval_s: float | None = Field(None, gt=0, description="Also train at most every this many seconds.")
    train_cron: str | None = Field(None, description="Or train on this cron expression (5 fields).")
    train_windows: list[TimeWindow] = Field(default_factory=list, description="Training only inside these windows (none: always).")
    outside_windows: Literal["collect", "idle"] = Field(
        "collect",
        description="What the daemon does outside train_windows: 'collect' keeps generating and scoring (the engine "
        "stays resident), 'idle' generates nothing and releases the engine until a window opens (for a GPU shared "
        "with daytime work).",
    )
    housekeeping_interval_s: float = Field(3600.0, gt=0, description="Retention, WAL checkpoint and VACUUM every this many seconds.")
    idle_sleep_s: float = Field(5.0, ge=0, description="Pause between cycles when there is nothing to do.")


class StoppingConfig(_Model):
    max_rounds: int | None = Field(None, ge=1, description="Stop once this many rounds have been decided in this state "
                                    "directory (across restarts; `run --max-rounds` counts one run).")
    max_wall_s: float | None = Field(None, gt=0, description="Stop after this much wall-clock time in this run.")
    max_generated_tokens: int | None = Field(None, ge=1, description="Stop when generations have used this many tokens in total.")
    max_teacher_tokens: int | None = Field(
        None, ge=1, description="The teacher's token budget, across restarts: its prompt and answered or scored tokens (table "
        "teacher_usage). Once spent, teacher calls are refused (the round goes on without the teacher, an event says so) and the "
        "daemon stops at the next phase boundary. Checked before each batch of requests, so a batch may pass it by its own size.")
    target_accuracy: float | None = Field(None, gt=0, le=1, description="Stop when the incumbent's held-out accuracy reaches this.")
    plateau_rounds: int | None = Field(None, ge=1, description="Stop after this many rejected rounds in a row.")
    max_regressions: int | None = Field(None, ge=1, description="Stop after this many rounds whose candidate did worse than the incumbent.")
    stop_when_tasks_exhausted: bool = Field(True, description="Stop when no training task can be sampled any more.")
    stop_file: str = Field("STOP", description="A file of this name in the state directory stops the daemon (a trained candidate is still "
                           "evaluated first, unless the file's first word is `now`).")


class RetentionConfig(_Model):
    keep_rejected: int = Field(3, ge=0, description="Rejected or failed candidates kept on disk (the newest).")


class LoggingConfig(_Model):
    format: Literal["json", "human"] = Field("json", description="Logs on stderr: one JSON object per line, or text.")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")


class MonitoringConfig(_Model):
    prometheus_port: int | None = Field(
        None, ge=0, le=65535,
        description="Serve Prometheus metrics at http://ADDR:PORT/metrics while the daemon runs (unset: off; 0: any free port, logged).",
    )
    prometheus_addr: str = Field("127.0.0.1", min_length=1, description="Address the metrics endpoint listens on (0.0.0.0 for every interface).")


class Policy(_Model):
    """A whole policy file."""

    # A field (or section) whose json_schema_extra has a "restart" reason cannot change while the
    # daemon runs (nor anything below it); reload_plan reads these marks, here and in the sections,
    # so a new key is applied by a reload unless it is marked.
    name: str = Field("selfdistill", description="Name of this service (shown in logs, the report and the metrics).",
                      json_schema_extra={"restart": "the metrics endpoint labels its figures with it from start"})
    state_dir: Path = Field(
        Path("state"), description="Directory of the database, checkpoints, caches and lock (relative to the policy file).",
        json_schema_extra={"restart": "the lock, the database and the adapters live there"},
    )
    student: StudentConfig = Field(
        default_factory=StudentConfig, description="The model being improved.",
        json_schema_extra={"restart": "the served base model and the LoRA shape of every checkpoint are fixed at start"},
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="How the student is served.",
        json_schema_extra={"restart": "the engine is built once at start"},
    )
    teacher: TeacherConfig | None = Field(
        None, description="The teacher model, if any.",
        json_schema_extra={"restart": "the teacher engine is built once at start"},
    )
    tasks: TasksConfig = Field(..., description="Task sources, held-out split and curriculum.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Sampling of the student's answers.")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="How answers are scored.")
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="How training data is formed.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="LoRA training rounds.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Held-out evaluation.")
    gates: GateConfig = Field(default_factory=GateConfig, description="When a candidate is promoted.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="When training and upkeep happen.")
    stopping: StoppingConfig = Field(default_factory=StoppingConfig, description="When the daemon stops.")
    retention: RetentionConfig = Field(default_factory=RetentionConfig, description="What is kept on disk.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Log format.")
    monitoring: MonitoringConfig = Field(
        default_factory=MonitoringConfig, description="The optional Prometheus endpoint.",
        json_schema_extra={"restart": "the metrics server binds at start"},
    )

    @model_validator(mode="after")
    def _coherent(self) -> "Policy":
        problems = []
        if self.tasks.heldout_fraction + self.tasks.audit_fraction >= 1:
            problems.append(
                f"tasks.heldout_fraction + tasks.audit_fraction = {self.tasks.heldout_fraction + self.tasks.audit_fraction:g} "
                "leaves no training tasks: keep their sum below 1"
            )
        if self.tasks.heldout_fraction == 0 and self.gates.test != "none":
            problems.append(
                "tasks.heldout_fraction is 0 but gates.test needs held-out items: "
                "set tasks.heldout_fraction > 0 or gates.test = 'none'"
            )
        if self.gates.min_gain > 0 and self.gates.test == "none" and self.tasks.heldout_fraction == 0:
            problems.append("gates.min_gain > 0 can never pass without held-out items")
        needs_teacher = (
            self.scoring.teacher_judge.enabled
            or self.scoring.teacher_label
            or self.scoring.teacher_revise
            or any(getattr(s, "by", None) == "teacher" for s in self.tasks.sources)
            or "distill" in self.training.stages()
        )
        if needs_teacher and self.teacher is None:
            problems.append("a teacher is used (teacher_judge / teacher_label / teacher_revise / expansion by teacher / "
                            f"training.algorithm = {self.training.algorithm!r}) but no [teacher] table is given")
        if self.stopping.max_teacher_tokens is not None and self.teacher is None:
            problems.append("stopping.max_teacher_tokens is set but no [teacher] table is given: remove the key or add the teacher")
        if self.evaluation.pairwise_judge == "teacher" and self.teacher is None:
            problems.append("evaluation.pairwise_judge = 'teacher' but no [teacher] table is given")
        if "min_win_rate" in self.gates.model_fields_set and self.evaluation.pairwise_judge == "none":
            problems.append(f"gates.min_win_rate = {self.gates.min_win_rate:g} gates nothing while evaluation.pairwise_judge = 'none': "
                            "set evaluation.pairwise_judge = 'teacher' or 'self', or remove the key")
        if self.pairs.rejected_from == "base" and "dpo" not in self.training.stages():
            problems.append(f"pairs.rejected_from = 'base' shapes preference pairs, which training.algorithm = "
                            f"{self.training.algorithm!r} never trains on: use a DPO-family algorithm (dpo, sft_then_dpo) or remove the key")
        cur = self.tasks.curriculum
        level_keys = sorted(cur.model_fields_set & {"advance_at", "min_attempted", "review_weight"})
        if level_keys and cur.level_field is None:
            problems.append(f"tasks.curriculum.{', '.join(level_keys)} shape difficulty levels, which are off without "
                            "tasks.curriculum.level_field: remove the key(s) or name the level field")
        if self.training.review_fraction is not None and cur.level_field is None:
            problems.append(f"training.review_fraction = {self.training.review_fraction:g} cuts the rows of passed difficulty "
                            "levels, which are off without tasks.curriculum.level_field: remove the key or name the level field")
        if "anchor_samples" in self.pairs.model_fields_set and self.pairs.rejected_from != "base":
            problems.append("pairs.anchor_samples is used only by pairs.rejected_from = 'base': remove the key or set rejected_from = 'base'")
        dc = self.training.distill
        if "jsd_beta" in dc.model_fields_set and dc.objective != "jsd":
            problems.append(f"training.distill.jsd_beta is used only by objective = 'jsd' (the objective is {dc.objective!r}): "
                            "remove the key or set objective = 'jsd'")
        if "top_k" in dc.model_fields_set and dc.objective == "reverse_kl":
            problems.append("training.distill.top_k is used only by the top-k objectives (forward_kl, jsd; the objective is "
                            "'reverse_kl'): remove the key or set the objective")
        if self.schedule.outside_windows == "idle" and not self.schedule.train_windows:
            problems.append(
                "schedule.outside_windows = 'idle' needs schedule.train_windows "
                "(add the windows, or set outside_windows = 'collect')"
            )
        if self.teacher is not None and self.teacher.kind == "vllm" and self.engine.kind == "vllm":
            problems.append("teacher.kind = 'vllm' beside engine.kind = 'vllm': two in-process vLLM engines cannot share one process; "
                            "set teacher.kind = 'served' (the daemon runs the teacher's vLLM server as its child), or 'openai' with "
                            f"the [teacher.endpoint] of a server you run (`vllm serve {self.teacher.model}`), or 'transformers'")
        share = self.teacher.serve.gpu_memory_utilization if self.teacher is not None and self.teacher.kind == "served" else None
        if share is not None and self.engine.kind == "vllm" and share + self.engine.gpu_memory_utilization > 0.95:
            problems.append(f"teacher.serve.gpu_memory_utilization {share:g} + engine.gpu_memory_utilization "
                            f"{self.engine.gpu_memory_utilization:g} > 0.95: the teacher and the student cannot both fit one GPU; lower one")
        if self.scoring.teacher_judge.teacher_anchors:
            problems.append("scoring.teacher_judge.teacher_anchors: the teacher cannot be measured on its own labels; "
                            "set it on scoring.self_judge, or give the teacher judge an anchor file (scoring.teacher_judge.anchors)")
        if self.scoring.self_judge.teacher_anchors and self.teacher is None:
            problems.append(f"scoring.self_judge.teacher_anchors = {self.scoring.self_judge.teacher_anchors} needs a teacher to label "
                            "them, but no [teacher] table is given: add the teacher, or use an anchor file (scoring.self_judge.anchors)")
        for who, judge in (("self_judge", self.scoring.self_judge), ("teacher_judge", self.scoring.teacher_judge)):
            if judge.enabled and judge.reason_first and judge.max_tokens < 64:
                problems.append(f"scoring.{who}.reason_first needs room for the reasons before the verdict line: "
                                f"max_tokens = {judge.max_tokens} would cut the verdict off; set max_tokens = 128 or more")
        if self.engine.kind == "openai" and self.engine.server is None:
            problems.append("engine.kind = 'openai' needs an [engine.server] table")
        if not (self.scoring.use_verifier or self.scoring.self_judge.enabled or self.scoring.teacher_judge.enabled
                or self.training.reward_model.enabled):
            problems.append("no scorer is enabled: set scoring.use_verifier, scoring.self_judge.enabled, scoring.teacher_judge.enabled "
                            "or training.reward_model.enabled")
        if self.gates.min_gain >= 1.0:
            problems.append("gates.min_gain = 1.0 can never pass: a candidate cannot gain more than 100 points")
        if self.gates.test != "none" and self.gates.alpha < 1.0:
            # an exact one-sided McNemar test cannot reach p < alpha with fewer than log2(1/alpha) items
            need = math.ceil(math.log2(1 / self.gates.alpha))
            if self.evaluation.heldout_items < need:
                problems.append(
                    f"evaluation.heldout_items = {self.evaluation.heldout_items} can never reach "
                    f"p < {self.gates.alpha}: at least {need} items are needed"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # paths relative to the policy file are resolved by load_policy
    def resolve_paths(self, base: Path) -> "Policy":
        if not self.state_dir.is_absolute():
            self.state_dir = (base / self.state_dir).resolve()
        for s in self.tasks.sources:
            p = getattr(s, "path", None)
            if p is not None and not p.is_absolute():
                s.path = (base / p).resolve()
        if self.training.accelerate_config is not None and not self.training.accelerate_config.is_absolute():
            self.training.accelerate_config = (base / self.training.accelerate_config).resolve()
        if self.student.base_model != BUNDLED_STUDENT and self.student.base_model.startswith((".", "/")):
            self.student.base_model = str((base / self.student.base_model).resolve())
        for judge in (self.scoring.self_judge, self.scoring.teacher_judge):
            if judge.anchors is not None and not judge.anchors.is_absolute():
                judge.anchors = (base / judge.anchors).resolve()
        if self.teacher is not None and self.teacher.model and self.teacher.model.startswith("."):
            self.teacher.model = str((base / self.teacher.model).resolve())
        return self


# --------------------------------------------------------------------------------------------
# loading


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for x in loc:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        elif x in ("jsonl", "reasoning_gym", "dataset_dir", "expansion") and parts and parts[-1].endswith("]"):
            continue  # pydantic names the union member; the index already says which entry
        else:
            parts.append(("." if parts else "") + str(x))
    return "".join(parts) or "(top level)"


# keys that older versions accepted: a policy that still sets one is told why it went
REMOVED_KEYS: dict[tuple[str, ...], str] = {
    ("schedule", "eval_interval_s"): "it re-read a cached evaluation and measured nothing",
}


def _problem(source: str, err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden" and loc in REMOVED_KEYS:
        return f"{source}: {'.'.join(loc)} was removed: {REMOVED_KEYS[loc]}; delete the key"
    return f"{source}: {_loc(loc)}: {_expected(err)}"


def _expected(err: dict[str, Any]) -> str:
    t = err["type"]
    if t == "extra_forbidden":
        return "unknown key (check the spelling; `selfdistill check --schema` lists the keys)"
    if t == "missing":
        return "required key is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    inp = err.get("input")
    if t not in ("model_type",) and not isinstance(inp, dict) and inp is not None:
        return f"{msg} (got {inp!r})"
    return msg


def parse_policy(data: dict[str, Any], source: str = "<policy>") -> Policy:
    """Validate a policy given as a dict; every problem goes into one PolicyError."""
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        problems = [_problem(source, err) for err in e.errors()]
        raise PolicyError(
            problems[0] if len(problems) == 1 else f"{len(problems)} problems in {source}:\n  " + "\n  ".join(problems),
            problems,
        ) from None


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file; relative paths in it are taken relative to the file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise PolicyError(f"{p}: no such policy file (give the path of a .toml policy, e.g. policies/cpu-demo.toml)") from None
    except OSError as e:
        raise PolicyError(f"{p}: cannot read the policy file ({e.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError(f"{p}: not a text file (a policy is a UTF-8 TOML file)") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{p}: not valid TOML: {e}") from None
    return parse_policy(data, str(p)).resolve_paths(p.parent.resolve())


def _type_name(ann: Any) -> str:
    """A compact name of a field's type, without spaces (the schema listing splits on them)."""
    origin, args = get_origin(ann), get_args(ann)
    if ann is type(None):
        return "none"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "table"
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "|".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin in (Union, UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) > 1:
            return "table"  # a choice of tables, told apart by their `type` key
        return "|".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{','.join(_type_name(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann)).lower()


def _tables(ann: Any, discriminator: str | None = None) -> list[tuple[str, type[BaseModel]]]:
    """The models a field's type holds, each with the suffix its keys take after the field's key:
    "" for a table, "[]" for an array of tables, "[type=jsonl]" for one member of a tagged union."""
    origin, args = get_origin(ann), get_args(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [("", ann)]
    if origin is Annotated:
        disc = next((m.discriminator for m in args[1:] if isinstance(getattr(m, "discriminator", None), str)), None)
        return _tables(args[0], disc or discriminator)
    if origin in (Union, UnionType):
        out = [t for a in args for t in _tables(a)]
        if discriminator is None:
            return out
        return [(f"[{discriminator}={get_args(m.model_fields[discriminator].annotation)[0]}]", m) for _, m in out]
    if origin is list:
        return [(sfx if sfx.startswith("[") else "[]" + sfx, m) for sfx, m in _tables(args[0], discriminator)]
    return []


def restart_reason(field: FieldInfo) -> str | None:
    """Why a change of this field needs a restart (its `restart` mark), or None if a reload applies it."""
    extra = field.json_schema_extra
    return extra.get("restart") if isinstance(extra, dict) else None


def field_help(model: type[BaseModel] = Policy, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, type, help) for every field: the policy reference `selfdistill check --schema` prints.

    Keys inside arrays of tables read `schedule.train_windows[].start`; keys of a tagged union
    read `tasks.sources[type=jsonl].path`, one block per member.
    """
    rows: list[tuple[str, str, str]] = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        help_ = f.description or ""
        if restart_reason(f):
            help_ += " (A change needs a restart.)"
        rows.append((key, _type_name(f.annotation), help_))
        for suffix, sub in _tables(f.annotation):
            rows.extend(field_help(sub, f"{key}{suffix}."))
    return rows


# --------------------------------------------------------------------------------------------
# reloading


@dataclasses.dataclass
class ReloadPlan:
    """What a SIGHUP does with a re-read policy: the policy to swap in at a round boundary, the
    keys whose change takes effect, and the keys whose change waits for a restart (with why)."""

    policy: Policy
    applied: list[str] = dataclasses.field(default_factory=list)
    refused: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def _diff(old: BaseModel, new: BaseModel, prefix: str, reason: str | None, plan: ReloadPlan) -> None:
    for name, f in type(old).model_fields.items():
        a, b = getattr(old, name), getattr(new, name)
        if a == b:
            continue
        key, why = prefix + name, reason or restart_reason(f)
        if isinstance(a, BaseModel) and type(a) is type(b):
            _diff(a, b, key + ".", why, plan)
        elif why:
            plan.refused.append((key, why))
        else:
            plan.applied.append(key)


def reload_plan(old: Policy, new: Policy) -> ReloadPlan:
    """Compare the running policy with a re-read one, leaf by leaf (lists and dicts whole).

    A key whose field, or a section above it, carries a `restart` mark keeps its running value in
    the returned policy and is listed in `refused`; every other changed key is in `applied` and
    takes its new value. Neither argument is changed. Raises PolicyError if the mix of new and
    kept values is itself incoherent (then nothing should be applied).
    """
    plan = ReloadPlan(policy=new)
    _diff(old, new, "", None, plan)
    # start from what the file set, so that checks of explicitly set keys see the same keys
    data = new.model_dump(exclude_unset=True)
    running = old.model_dump()
    for key, _ in plan.refused:
        *parents, leaf = key.split(".")
        src, dst = running, data
        for p in parents:
            src, dst = src[p], dst.setdefault(p, {})
        dst[leaf] = src[leaf]
    plan.policy = parse_policy(data, "reloaded policy (restart-only keys kept at their running values)")
    return plan
