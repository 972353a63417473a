"""One training round, inside the child process: `python -m selfdistill.training SPEC.json`.

Loads the base student and either the incumbent adapter (trainable: the round continues from it)
or a fresh LoRA, then runs the stages the policy asks for:

- **sft**: TRL `SFTTrainer` on conversational prompt/completion rows, loss on completion tokens
  only. The prompt is `records.chat_messages(prompt, system_prompt)` rendered by the tokenizer's
  chat template with the generation prompt, so the model trains on exactly what it is asked.
- **dpo**: TRL `DPOTrainer` with `loss_type` a list (sigmoid, ipo, hinge, ...) plus an `"sft"`
  (NLL on the chosen answer) term weighted `rpo_alpha`. The reference is the incumbent: TRL adds a
  frozen copy of the loaded adapter named "ref"; after an SFT stage in the same round that copy is
  reset to the incumbent's weights, so the reference is never the round's own SFT result. With
  `reference = "base"`, or no incumbent, the "ref" copy is dropped and the reference is the base
  (adapters disabled). `simpo` and `orpo` are reference-free and are not DPOTrainer losses in
  trl 1.16: they run through `trl.experimental.cpo.CPOTrainer(loss_type="simpo")` and
  `trl.experimental.orpo.ORPOTrainer`, and must then be the only entry of `loss_type`.

A stage with fewer rows than `min_sft_examples` / `min_pairs` is skipped with a reason; a round
whose stages are all skipped is `skipped` and writes no adapter. `guards.Guard` fails a stage on a
NaN, an exploding gradient, a flat loss or a collapsed margin. The adapter is saved to a hidden
temporary sibling of `output_dir`, fsynced and renamed into place only when complete; under
torchrun / accelerate only rank 0 saves and writes the result.

Test-only: `SELFDISTILL_INJECT_NAN=N` fills a LoRA weight with NaN before optimizer step N of the
first stage, so the NaN guard can be tested on a real NaN.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from selfdistill.config import RL_STAGES
from selfdistill.errors import TrainingError
from selfdistill.models import cpu_has_bfloat16
from selfdistill.records import chat_messages
from selfdistill.training.guards import Guard
from selfdistill.training.spec import RoundSpec, TrainingResult, read_round_data, write_json_atomic

INJECT_NAN_ENV = "SELFDISTILL_INJECT_NAN"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class RoundFailed(TrainingError):
    """A stage failed; the message is the round's one-line reason."""


def read_data(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """SFT rows and pairs of a round's data file (spec.read_round_data), a bad row failing the round."""
    try:
        return read_round_data(path)
    except ValueError as e:
        raise RoundFailed(str(e)) from None


def check_adapter_dir(path: Path) -> None:
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise RoundFailed(f"incumbent adapter {path} is missing or incomplete (no {', '.join(missing)})")


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


FULL_LM_HEAD_ENV = "SELFDISTILL_FULL_LM_HEAD"  # "1": TRL's LM head scores every position on CPU (the benchmark's baseline)


def choose_dtype(precision: str, stages: list[str], cuda_bf16: bool | None, cpu_bf16: bool) -> str:
    """The frozen base's dtype for a round, "bfloat16" or "float32" (TrainingConfig.precision says why).

    cuda_bf16: None where there is no GPU, else whether it has bfloat16; cpu_bf16: whether the CPU
    has native bfloat16 arithmetic (emulated bfloat16 is slower than float32)."""
    if precision != "auto":
        return precision
    if cuda_bf16 is not None:
        return "bfloat16" if cuda_bf16 else "float32"
    return "bfloat16" if cpu_bf16 and not any(s in RL_STAGES for s in stages) else "float32"


def round_dtype(spec: RoundSpec, stages: list[str]) -> str:
    """choose_dtype for this machine."""
    import torch

    cuda_bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None
    return choose_dtype(spec.training_config().precision, stages, cuda_bf16, cpu_has_bfloat16())


def score_label_positions_only() -> bool:
    """Make TRL's fused LM head project only the positions that have a label on CPU, as it does on CUDA.

    Off Triton devices TRL 1.x projects every position through the 49k-word LM head, prompt and
    padding included (fixed tile shapes for compilers such as Neuron's), and recomputes it all in the
    backward pass: with completion-only losses most of that work is thrown away (SFT 1.44x faster at
    the same losses, benchmarks/RESULTS.md). False where this TRL has no such switch or
    SELFDISTILL_FULL_LM_HEAD=1: training is then the same, only slower."""
    if os.environ.get(FULL_LM_HEAD_ENV) == "1":
        return False
    import trl.trainer.utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None:
        return False
    if getattr(decide, "selfdistill", False):
        return True

    def compact(device) -> bool:
        return device.type == "cpu" or decide(device)

    compact.selfdistill, compact.trl_original = True, decide
    trl_utils._use_triton = compact
    return True


def bfloat16_frozen_matmuls(model) -> None:
    """Store the frozen base's linear layers in bfloat16 and run their matrix products in it, everything else
    (the residual stream, norms, attention, the LoRA and its sum with the base's output) staying float32.
    Call it before the LoRA wraps the layers.

    On CPU this is where bfloat16 pays (a 576x1536 product at 2.5x float32's rate on AVX512-BF16), without
    the cost of a bfloat16 model: there the LoRA's small early updates are rounded into a bfloat16 residual
    stream and the loss falls more slowly (benchmarks/RESULTS.md)."""
    import types

    import torch
    import torch.nn.functional as F

    head = model.get_output_embeddings()  # tied to the embeddings, and already cut to the labelled positions

    def forward(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(torch.bfloat16)
            module.forward = types.MethodType(forward, module)


def load_model(spec: RoundSpec, dtype_name: str = "float32"):
    """(tokenizer, PeftModel with a trainable "default" adapter) for the round; the frozen base's weights in
    `dtype_name` (bfloat16 on CPU: bfloat16_frozen_matmuls), the LoRA in float32."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(spec.base_model_dir))
    if tok.chat_template is None:
        raise RoundFailed(f"{spec.base_model_dir}: the tokenizer has no chat template (prompts are rendered with it)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cpu_bf16 = dtype_name == "bfloat16" and not torch.cuda.is_available()
    dtype = torch.float32 if cpu_bf16 else getattr(torch, dtype_name)
    base = AutoModelForCausalLM.from_pretrained(str(spec.base_model_dir), dtype=dtype)
    if cpu_bf16:
        bfloat16_frozen_matmuls(base)
    if spec.incumbent_adapter_dir is not None:
        check_adapter_dir(spec.incumbent_adapter_dir)
        try:
            model = PeftModel.from_pretrained(base, str(spec.incumbent_adapter_dir), is_trainable=True)
        except Exception as e:  # peft, safetensors and torch raise many types for a bad file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RoundFailed(f"incumbent adapter {spec.incumbent_adapter_dir} cannot be loaded: {first}") from None
    else:
        # a fresh LoRA's initial weights are the spec's (seed), not whatever a process drew before
        torch.manual_seed(spec.seed)
        lc = spec.lora_config()
        model = get_peft_model(
            base,
            PeftLoraConfig(
                r=lc.r,
                lora_alpha=lc.alpha,
                lora_dropout=lc.dropout,
                target_modules=lc.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return tok, model


def _callbacks(guard: Guard, log: list[dict[str, float]], inject_nan_at: int | None):
    from transformers import TrainerCallback

    class GuardCallback(TrainerCallback):
        """Feeds every log line to the guard and stops training at its first reason."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "loss" in logs or "rewards/margins" in logs:
                log.append(logs)
            if guard.observe(logs, state.global_step):
                control.should_training_stop = True

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if inject_nan_at is not None and state.global_step == inject_nan_at:
                next(p for p in model.parameters() if p.requires_grad).data.fill_(math.nan)

    return [GuardCallback()]


def _weighted(trainer_cls):
    """trainer_cls whose sampler draws rows in proportion to their weight (when weights differ)."""
    import torch

    class Weighted(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):
            # read from the processed dataset: the trainer may have dropped rows (fully truncated)
            weights = self.train_dataset["weight"]
            if len(set(weights)) <= 1:
                return super()._get_train_sampler(*args, **kwargs)
            # the same seed on every rank: accelerate shards one sequence of batches across ranks
            gen = torch.Generator().manual_seed(self.args.seed)
            return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=gen)

    Weighted.__name__ = trainer_cls.__name__
    return Weighted


def _common_args(spec: RoundSpec, scratch: str, model) -> dict[str, Any]:
    import torch

    tc = spec.training_config()
    cuda = torch.cuda.is_available()
    args: dict[str, Any] = dict(
        output_dir=scratch,
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        max_grad_norm=tc.max_grad_norm,
        max_length=tc.max_length,
        seed=spec.seed,
        data_seed=spec.seed,
        logging_steps=1,
        # the default hides a NaN step behind the window's mean: the guard must see it
        logging_nan_inf_filter=False,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not cuda,
        # autocast on the GPU where the base is bfloat16 (on CPU its linear layers cast for themselves)
        bf16=cuda and model.get_input_embeddings().weight.dtype == torch.bfloat16,
        dataloader_num_workers=0,
    )
    if not cuda and _world_size() > 1:
        args["ddp_backend"] = "gloo"
    return args


def _stage_metrics(stage: str, log: list[dict[str, float]], rows: int, secs: float, steps: int) -> dict[str, Any]:
    losses = [r["loss"] for r in log if "loss" in r]
    m: dict[str, Any] = {f"{stage}_rows": rows, f"{stage}_steps": steps, f"{stage}_train_s": round(secs, 3)}
    if losses:
        m[f"{stage}_loss_first"], m[f"{stage}_loss_last"] = losses[0], losses[-1]
        # the curve, at most ~100 points, so that two settings can be compared step by step
        m[f"{stage}_loss_curve"] = [round(x, 4) for x in losses[:: -(-len(losses) // 100)]]
    tokens = [r["num_tokens"] for r in log if "num_tokens" in r]
    if tokens:
        m[f"{stage}_tokens"] = int(max(tokens))
    for key, name in (("rewards/margins", "margin"), ("rewards/accuracies", "accuracy")):
        vals = [r[key] for r in log if key in r]
        if vals:
            m[f"{stage}_{name}_first"], m[f"{stage}_{name}_last"] = vals[0], vals[-1]
    return m


def _train_sft(spec, tok, model, rows, scratch, callbacks):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tc = spec.training_config()
    ds = Dataset.from_list(
        [
            {
                "prompt": chat_messages(r["prompt"], spec.system_prompt),
                "completion": [{"role": "assistant", "content": r["completion"]}],
                "weight": float(r["weight"]),
            }
            for r in rows
        ]
    )
    cfg = SFTConfig(
        num_train_epochs=tc.epochs,
        learning_rate=tc.learning_rate,
        completion_only_loss=True,
        **_common_args(spec, scratch, model),
    )
    trainer = _weighted(SFTTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=callbacks)
    check_left(trainer, len(rows), "SFT examples", tc.max_length)
    trainer.train()
    return trainer


def check_left(trainer, given: int, what: str, max_length: int) -> None:
    """TRL drops rows that tokenise to nothing trainable within max_length; a stage left with
    none fails with the reason instead of a sampler's 'num_samples=0'."""
    if len(trainer.train_dataset) == 0:
        raise RoundFailed(f"none of the {given} {what} is trainable within training.max_length = {max_length} "
                          "tokens (prompt and answer are cut to it): raise training.max_length")


def _train_preference(spec, tok, model, rows, scratch, callbacks, incumbent_snapshot):
    from datasets import Dataset

    tc = spec.training_config()
    ds = Dataset.from_list(
        [
            {
                "prompt": chat_messages(r["prompt"], spec.system_prompt),
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
                "weight": float(r["weight"]),
            }
            for r in rows
        ]
    )
    common = _common_args(spec, scratch, model)
    common.update(learning_rate=tc.dpo_learning_rate or tc.learning_rate / 4, num_train_epochs=tc.dpo_epochs)
    free = [t for t in tc.loss_type if t in ("simpo", "orpo")]
    if free:
        if len(tc.loss_type) > 1:
            raise RoundFailed(
                f"training.loss_type {tc.loss_type}: {free[0]} is reference-free and runs in its own trainer; "
                f"it cannot be combined with other losses (use loss_type = ['{free[0]}'])"
            )
        if free[0] == "simpo":
            from trl.experimental.cpo import CPOConfig, CPOTrainer

            cfg = CPOConfig(loss_type="simpo", beta=tc.beta, cpo_alpha=tc.rpo_alpha or 0.0, **common)
            trainer_cls = CPOTrainer
        else:
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            cfg = ORPOConfig(beta=tc.beta, **common)
            trainer_cls = ORPOTrainer
        trainer = _weighted(trainer_cls)(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=callbacks)
    else:
        from trl import DPOConfig, DPOTrainer

        loss_type = list(tc.loss_type)
        loss_weights = list(tc.loss_weights or [1.0] * len(loss_type))
        if tc.rpo_alpha:
            loss_type.append("sft")
            loss_weights.append(tc.rpo_alpha)
        cfg = DPOConfig(loss_type=loss_type, loss_weights=loss_weights, beta=tc.beta, **common)
        trainer = _weighted(DPOTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=callbacks)
        # TRL has just copied the current "default" adapter into a frozen "ref" adapter.
        if incumbent_snapshot is None:
            model.delete_adapter("ref")  # reference = the base, adapters disabled
        else:
            params = dict(model.named_parameters())
            for name, value in incumbent_snapshot.items():
                params[name.replace(".default.", ".ref.")].data.copy_(value)
    check_left(trainer, len(rows), "pairs", tc.max_length)
    trainer.train()
    return trainer


def gathered_state_dict(trainer) -> dict | None:
    """The whole model's state dict, collected from every rank, or None in a single process.

    Every rank must call this (it is a collective under DeepSpeed ZeRO-3 and FSDP, where each rank
    holds only a shard of the adapter); it is what transformers' Trainer.save_model does before
    its main process writes. Under DDP it is the unwrapped model's own state dict."""
    if _world_size() <= 1:
        return None
    acc = trainer.accelerator
    if getattr(trainer, "is_deepspeed_enabled", False):
        return acc.get_state_dict(trainer.model_wrapped)  # the DeepSpeed engine
    return acc.get_state_dict(trainer.model)


def save_adapter(model, out: Path, state_dict: dict | None = None) -> None:
    """Write the "default" adapter to a hidden sibling, fsync it, rename it to `out`.

    `state_dict`: the gathered weights of a sharded run (see gathered_state_dict); peft picks the
    "default" adapter's tensors out of it."""
    from safetensors import SafetensorError

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), selected_adapters=["default"], state_dict=state_dict)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        os.replace(tmp, out)
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error type
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise RoundFailed(f"cannot save the adapter to {out}: {why} (free disk space and retry)") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _test_outcome(round_id: int) -> str | None:
    """Test hook: SELFDISTILL_TEST_TRAINING="1:skip,2:fail" makes those rounds' training skip or
    fail (every attempt), so the tests of the shipped policies meet both paths for real."""
    for part in os.environ.get("SELFDISTILL_TEST_TRAINING", "").split(","):
        rid, _, outcome = part.partition(":")
        if rid.strip() == str(round_id) and outcome in ("skip", "fail"):
            return outcome
    return None


def run_round(spec: RoundSpec, started: float | None = None) -> TrainingResult:
    """Train one round as `spec` says; the result, never an exception for a round that fails."""
    started = time.monotonic() if started is None else started
    metrics: dict[str, Any] = {"world_size": _world_size()}
    stages: dict[str, str] = {}
    try:
        tc = spec.training_config()
        if spec.output_dir.exists():
            raise RoundFailed(f"{spec.output_dir} already exists (adapters are never overwritten: give a new output_dir)")
        if spec.incumbent_adapter_dir is not None:
            check_adapter_dir(spec.incumbent_adapter_dir)
        data = read_data(spec.data_path)
        sft_rows, pair_rows, groups, distill_rows = data["sft"], data["pair"], data["group"], data["distill"]
        metrics.update(examples=len(sft_rows), pairs=len(pair_rows))
        if groups:
            metrics["groups"] = len(groups)
        if distill_rows:
            metrics["distill_answers"] = len(distill_rows)
        if spec.purpose == "reward_model":
            return _reward_model_round(spec, pair_rows, metrics, started)
        forced = _test_outcome(spec.round_id)
        if forced == "skip":
            return TrainingResult(status="skipped", reason="test hook: round skipped", metrics=metrics, stages=stages)
        if forced == "fail":
            raise RoundFailed("test hook: round failed")
        todo = []
        for stage in tc.stages():
            have, need, what = {"sft": (len(sft_rows), tc.min_sft_examples, "SFT examples"),
                                "dpo": (len(pair_rows), tc.min_pairs, "pairs"),
                                "grpo": (len(groups), tc.rl.min_groups, "groups with differing rewards"),
                                "distill": (len(distill_rows), tc.distill.min_samples, "samples scored by the teacher")}[stage]
            if have < need:
                stages[stage] = f"skipped: {have} {what} < {need} needed"
            else:
                todo.append(stage)
        if not todo:
            return _all_skipped(stages, metrics, started)

        t = time.monotonic()
        import torch

        if spec.threads:
            torch.set_num_threads(spec.threads)
        metrics["import_s"] = round(time.monotonic() - t, 3)
        t = time.monotonic()
        dtype_name = round_dtype(spec, todo)
        tok, model = load_model(spec, dtype_name)
        metrics["load_s"] = round(time.monotonic() - t, 3)
        if any(s not in RL_STAGES for s in todo):  # the RL stages score tokens themselves: no TRL to import
            metrics["lm_head"] = "label_positions" if score_label_positions_only() else "all_positions"
        # where the trainers will put it (they move the model to the GPU when torch sees one)
        metrics["device"] = "cuda:0" if torch.cuda.is_available() else "cpu"
        metrics["dtype"] = dtype_name  # the frozen base's weights
        incumbent_snapshot = None
        if spec.incumbent_adapter_dir is not None and tc.reference == "incumbent" and "dpo" in todo:
            incumbent_snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
        examples: dict[str, list] = {}
        for stage in [s for s in todo if s in RL_STAGES]:
            from selfdistill.training import policy_gradient as pg

            t = time.monotonic()
            try:  # before any stage trains: the model is the incumbent that sampled the answers
                if stage == "grpo":
                    examples[stage], info = pg.prepare(spec, tok, model, groups)
                else:
                    examples[stage], info = pg.prepare_distill(spec, tok, model, distill_rows)
                metrics.update(info, **{f"{stage}_prepare_s": round(time.monotonic() - t, 3)})
            except pg.StageSkipped as e:
                stages[stage] = f"skipped: {e}"
                todo.remove(stage)
            if not todo:
                return _all_skipped(stages, metrics, started)

        inject = os.environ.get(INJECT_NAN_ENV)
        scratch = tempfile.mkdtemp(prefix=f".{spec.output_dir.name}.scratch-", dir=spec.output_dir.parent)
        try:
            for i, stage in enumerate(todo):
                guard = Guard(
                    stage,
                    explode_grad_norm=tc.explode_grad_norm,
                    min_loss_change=tc.min_loss_change,
                    min_dpo_margin=tc.min_dpo_margin if stage == "dpo" else None,
                )
                log: list[dict[str, float]] = []
                callbacks = _callbacks(guard, log, int(inject) if inject and i == 0 else None)
                t = time.monotonic()
                if stage in RL_STAGES:
                    exs = examples[stage]
                    try:
                        steps = pg.train(spec, model, exs, log, int(inject) if inject and i == 0 else None, stage=stage)
                    except TrainingError as e:
                        raise RoundFailed(str(e)) from None
                    rows = len(groups) if stage == "grpo" else len(exs)
                    metrics.update(_stage_metrics(stage, log, rows, time.monotonic() - t, steps), **pg.stage_metrics(log, stage))
                    passes = tc.rl.passes if stage == "grpo" else tc.distill.passes
                    metrics[f"{stage}_tokens"] = sum(len(ex.ids) - ex.prompt_len for ex in exs) * passes
                    stages[stage] = "trained"
                    continue
                if stage == "sft":
                    trainer = _train_sft(spec, tok, model, sft_rows, scratch, callbacks)
                else:
                    trainer = _train_preference(spec, tok, model, pair_rows, scratch, callbacks, incumbent_snapshot)
                steps = trainer.state.global_step
                rows = len(sft_rows) if stage == "sft" else len(pair_rows)
                metrics.update(_stage_metrics(stage, log, rows, time.monotonic() - t, steps))
                stages[stage] = "trained"
                if guard.finish():
                    raise RoundFailed(guard.reason)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        metrics["steps"] = sum(metrics.get(f"{s}_steps", 0) for s in todo)
        metrics["tokens"] = sum(metrics.get(f"{s}_tokens", 0) for s in todo)
        metrics["train_s"] = round(sum(metrics.get(f"{s}_train_s", 0) for s in todo), 3)
        t = time.monotonic()
        # on every rank: a collective when the adapter is sharded (RL stages run in one process only)
        state_dict = gathered_state_dict(trainer) if _world_size() > 1 else None
        if _rank() == 0:
            save_adapter(model, spec.output_dir, state_dict)
            metrics["save_s"] = round(time.monotonic() - t, 3)
        status, reason, adapter = "succeeded", None, spec.output_dir
    except RoundFailed as e:
        status, reason, adapter = "failed", str(e), None
    metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        metrics["peak_device_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    metrics["duration_s"] = round(time.monotonic() - started, 3)
    return TrainingResult(status=status, reason=reason, metrics=metrics, stages=stages, adapter_dir=adapter)


def _all_skipped(stages: dict[str, str], metrics: dict[str, Any], started: float) -> TrainingResult:
    """The result of a round whose every stage was skipped: no adapter, the stages' reasons."""
    metrics["duration_s"] = round(time.monotonic() - started, 3)
    return TrainingResult(status="skipped", reason="; ".join(f"{s} {r}" for s, r in stages.items()), metrics=metrics, stages=stages)


def _reward_model_round(spec: RoundSpec, pairs: list[dict[str, Any]], metrics: dict[str, Any], started: float) -> TrainingResult:
    """Train and measure a reward model on the pairs (training/reward_model.py); save it atomically."""
    import torch

    from selfdistill.training.reward_model import run_reward_model

    if spec.threads:
        torch.set_num_threads(spec.threads)
    scratch = tempfile.mkdtemp(prefix=f".{spec.output_dir.name}.scratch-", dir=spec.output_dir.parent)
    try:
        status, reason, m, model = run_reward_model(spec, pairs, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    metrics.update(m)
    adapter = None
    if model is not None:
        save_adapter(model, spec.output_dir)
        adapter = spec.output_dir
    metrics["duration_s"] = round(time.monotonic() - started, 3)
    return TrainingResult(status=status, reason=reason, metrics=metrics, stages={"reward_model": status}, adapter_dir=adapter)


def _environment(spec: RoundSpec) -> None:
    """Caches in service-owned directories, no hub, thread count: before torch is imported."""
    from selfdistill.models import offline_env

    offline_env()
    os.environ["HF_HOME"] = str(spec.hf_home)
    os.environ["HF_DATASETS_CACHE"] = str(spec.hf_home / "datasets")
    if spec.threads:
        os.environ["OMP_NUM_THREADS"] = str(spec.threads)
        os.environ["MKL_NUM_THREADS"] = str(spec.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(prog="python -m selfdistill.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="RoundSpec JSON written by the daemon")
    args = parser.parse_args(argv)
    spec = RoundSpec.read(args.spec)
    _environment(spec)
    result = run_round(spec, started)
    if _rank() == 0:
        write_json_atomic(spec.result_path, result.model_dump(mode="json"))
    if result.status == "failed":
        print(f"selfdistill.training: round {spec.round_id} failed: {result.reason}", file=sys.stderr)
        return TrainingError.exit_code
    return 0
