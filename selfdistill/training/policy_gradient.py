"""The policy-gradient stage, inside the training child: GRPO-family training of the LoRA on the
incumbent's own samples (the round's groups, see spec.DATA_FORMAT).

Offline and on-policy for one round: every answer was sampled by the incumbent this round; the
stage takes `passes` optimisation passes over them. Per answer token t of sample i:

    ratio_t   = exp(logp_theta(t) - logp_old(t))           logp_old: the incumbent, in this trainer
    loss_t    = -min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps_high) * A_i) * w_t
                + kl_beta * (exp(ref_t - logp_theta(t)) - (ref_t - logp_theta(t)) - 1)
    w_t       = min(exp(logp_old(t) - logp_sampler(t)), sampler_ratio_cap)

A_i is the group-relative advantage (rl.group_advantages). `logp_old` is computed here once, before
any stage trains (the model is then the incumbent), so an SFT stage earlier in the round does not
move it: the ratio's clip keeps the whole round within a trust region of the policy that sampled.
`logp_sampler` is what the engine reported at generation (stored in the store's sample_logprobs):
w_t is the truncated importance weight for the engine/trainer mismatch (bf16 vLLM against a float32
trainer). Samples without it get w_t = 1 (`missing_logprobs = "recompute"`) or the stage is skipped
(`"skip"`). All log-probabilities are of the model at temperature 1 at both ends.

The reference of the KL term is `training.reference`: the incumbent (its log-probabilities are the
`logp_old` ones) or the base (adapters disabled, computed once).

Logged per step: loss, grad_norm, ratio_mean, clip_fraction (tokens whose ratio was clipped in the
direction of their advantage), kl (k3 estimate to the reference), entropy (mean token entropy);
`PolicyGuard` fails the stage on a NaN, an exploding gradient or ratio, or an entropy collapse.

On-policy distillation (stage "distill", `prepare_distill`) is the same step with a per-token
advantage instead of a per-answer one (the divergence family; Agarwal et al.'s on-policy KD,
Thinking Machines' on-policy distillation):

    A_t = coef * (logp_teacher(t) - logp_old(t))

whose expectation over the student's own samples is minus the reverse KL from the student to the
teacher, so the step lowers KL(student || teacher) where the student actually goes. The teacher's
log-probabilities were computed in the daemon (stored in teacher_logprobs, same tokenizer, same
rendered prompt) and arrive with each row; the loss is normalised per token. Logged besides:
reverse_kl, the mean over the step's tokens of logp_theta - logp_teacher.

With `training.distill.objective` forward_kl or jsd the stage is instead a supervised divergence
on the student's own samples (Agarwal et al.'s generalised KD; TRL's GKD): at each position t of
an answer the teacher listed its top_k tokens; both distributions are reduced to those k tokens
and the rest as one bucket (a coarsening, so the divergence is a lower bound of the full one and
exact as k grows), and the loss per token is

    forward_kl:  KL(T_t || S_t) = sum_j T_t(j) * (log T_t(j) - log S_t(j))
    jsd:         beta * KL(T_t || M_t) + (1 - beta) * KL(S_t || M_t),  M_t = beta * T_t + (1 - beta) * S_t

normalised per token (plus the KL term to the reference when kl_beta > 0). It needs no importance
ratio (the positions are the sampler's, the loss is a function of the student's distribution
there); the ratio is still logged and guarded, as a measure of how far the passes moved the
policy. Top-k reverse KL is not offered: it was reported unstable (the student's mass outside the
teacher's top k has no signal). Logged besides: divergence, the step's mean per-token loss.

One process only: the configuration refuses an RL stage with num_processes > 1.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from selfdistill.errors import TrainingError
from selfdistill.records import chat_messages
from selfdistill.training.rl import LOSS_NORMALISATION, PolicyGuard, group_advantages


class StageSkipped(TrainingError):
    """The stage has nothing to learn from; the message is the reason."""


@dataclass
class Example:
    ids: list[int]  # prompt + answer tokens
    prompt_len: int
    advantage: Any  # a float (one per answer, GRPO) or a tensor [answer tokens] (distillation)
    sampler: list[float] | None  # the engine's log-probability of each answer token
    old: Any = None  # tensor [answer tokens]: the incumbent's log-probabilities, in this trainer
    ref: Any = None  # tensor [answer tokens]: the reference's (kl_beta > 0)
    teacher: Any = None  # tensor [answer tokens]: the teacher's log-probabilities (distillation)
    top_ids: Any = None  # tensor [answer tokens, k]: the teacher's k most likely tokens (top-k objectives)
    top_lp: Any = None  # tensor [answer tokens, k]: their log-probabilities under the teacher


def prepare(spec, tok, model, groups: list[dict[str, Any]]) -> tuple[list[Example], dict[str, Any]]:
    """Examples of the round's groups with the incumbent's log-probabilities; call before any stage trains.

    StageSkipped when too few groups are left, or samples lack stored log-probabilities and the
    policy says skip."""
    from selfdistill.engines.local import render

    tc = spec.training_config()
    rl = tc.rl
    if len(groups) < rl.min_groups:
        raise StageSkipped(f"{len(groups)} groups with differing rewards < training.rl.min_groups {rl.min_groups}")
    examples: list[Example] = []
    missing = too_long = 0
    prompts: dict[str, list[int]] = {}
    for g in groups:
        samples = g["samples"]
        advs = group_advantages([float(s["reward"]) for s in samples], rl.variant)
        if g["prompt"] not in prompts:
            prompts[g["prompt"]] = render(tok, chat_messages(g["prompt"], spec.system_prompt))
        p_ids = prompts[g["prompt"]]
        for s, a in zip(samples, advs):
            ids, lps = s.get("token_ids"), s.get("logprobs")
            if ids is None or lps is None or len(ids) != len(lps):
                missing += 1
                ids, lps = tok(s["completion"], add_special_tokens=False)["input_ids"], None
            room = tc.max_length - len(p_ids)
            if room < 1 or not ids:
                too_long += 1
                continue
            ids, lps = ids[:room], (lps[:room] if lps is not None else None)
            if abs(a) < 1e-12:
                continue  # no gradient: the answer's reward is its group's mean
            examples.append(Example(list(p_ids) + list(ids), len(p_ids), a, lps))
    n = sum(len(g["samples"]) for g in groups)
    if missing and rl.missing_logprobs == "skip":
        raise StageSkipped(f"{missing} of {n} samples have no stored sampling log-probabilities "
                           "(older rounds, or an engine that cannot return them) and training.rl.missing_logprobs = 'skip'")
    if not examples:
        raise StageSkipped(f"none of the {n} samples is trainable within training.max_length = {tc.max_length} tokens")
    _incumbent_logps(tc, model, examples)
    rewards = [float(s["reward"]) for g in groups for s in g["samples"]]
    info = {"grpo_groups": len(groups), "grpo_samples": n, "grpo_examples": len(examples),
            "grpo_missing_logprobs": missing, "grpo_too_long": too_long,
            "grpo_group_reward_mean": round(sum(rewards) / len(rewards), 4)}
    return examples, info


def prepare_distill(spec, tok, model, rows: list[dict[str, Any]]) -> tuple[list[Example], dict[str, Any]]:
    """Examples of the round's distillation rows (spec.DATA_FORMAT kind "distill") with the
    incumbent's log-probabilities and the per-token advantage coef * (teacher - incumbent); call
    before any stage trains. StageSkipped when fewer than training.distill.min_samples are usable."""
    import torch

    from selfdistill.engines.local import render

    tc = spec.training_config()
    dc = tc.distill
    k = dc.top_k if dc.objective != "reverse_kl" else 0
    vocab = model.get_output_embeddings().weight.shape[0]
    examples: list[Example] = []
    bad = too_long = 0
    prompts: dict[str, list[int]] = {}
    for r in rows:
        ids, t_lps, lps = r.get("token_ids") or [], r.get("teacher_logprobs") or [], r.get("logprobs")
        if not ids or len(t_lps) != len(ids) or (lps is not None and len(lps) != len(ids)):
            bad += 1
            continue
        top_ids = top_lp = None
        if k:
            ti, tl = r.get("topk_ids") or [], r.get("topk_logprobs") or []
            if (len(ti) != len(ids) or len(tl) != len(ids) or any(len(x) < k for x in ti) or any(len(x) < k for x in tl)
                    or any(t >= vocab for x in ti for t in x[:k])):
                bad += 1  # scored without alternatives, or by a teacher whose vocabulary is not this model's
                continue
            top_ids = torch.tensor([x[:k] for x in ti], dtype=torch.long)
            top_lp = torch.tensor([x[:k] for x in tl], dtype=torch.float32)
        if r["prompt"] not in prompts:
            prompts[r["prompt"]] = render(tok, chat_messages(r["prompt"], spec.system_prompt))
        p_ids = prompts[r["prompt"]]
        room = tc.max_length - len(p_ids)
        if room < 1:
            too_long += 1
            continue
        examples.append(Example(list(p_ids) + list(ids[:room]), len(p_ids), None, lps[:room] if lps is not None else None,
                                teacher=torch.tensor(t_lps[:room], dtype=torch.float32),
                                top_ids=top_ids[:room] if k else None, top_lp=top_lp[:room] if k else None))
    if len(examples) < dc.min_samples:
        raise StageSkipped(f"{len(examples)} samples scored by the teacher < training.distill.min_samples {dc.min_samples}"
                           + (f" ({bad} with mismatched log-probabilities, {too_long} over training.max_length)" if bad or too_long else ""))
    _incumbent_logps(tc, model, examples)
    gap = torch.cat([ex.old - ex.teacher for ex in examples])
    mean, std = float(-gap.mean()), float(gap.std()) if gap.numel() > 1 else 1.0
    for ex in examples:
        a = ex.teacher - ex.old
        if dc.baseline != "none":
            a = a - mean
        if dc.baseline == "whiten":
            a = a / (std + 1e-6)
        ex.advantage = dc.coef * a
    info = {"distill_samples": len(examples), "distill_rejected": bad, "distill_too_long": too_long,
            "distill_reverse_kl_before": round(float(gap.mean()), 6)}
    if k:
        model.eval()
        with torch.no_grad():
            div = [float(topk_divergence(s_top, ex.top_lp, dc.objective, dc.jsd_beta).sum())
                   for batch in _batches(examples, tc.batch_size) for ex, s_top in zip(batch, _answer_logps(model, batch, top=True)[2])]
        info["distill_divergence_before"] = round(sum(div) / sum(len(ex.ids) - ex.prompt_len for ex in examples), 6)
    return examples, info


def topk_divergence(s_top, t_top, objective: str, beta: float = 0.5):
    """Per position, the divergence of student from teacher over the teacher's top-k tokens and the
    rest as one bucket (see the module's formula); `s_top`, `t_top` [tokens, k] log-probabilities
    of the same token ids under the student and the teacher. A tensor [tokens], differentiable in
    `s_top`."""
    import torch

    def with_rest(lp):
        rest = torch.log(torch.clamp(1 - lp.exp().sum(-1, keepdim=True), min=1e-6))
        return torch.cat([lp, rest], dim=-1)

    s, t = with_rest(s_top), with_rest(t_top)
    if objective == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    if objective == "jsd":
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    raise ValueError(f"unknown top-k objective {objective!r}")


def _incumbent_logps(tc, model, examples: list[Example]) -> None:
    """Fill each example's `old` (the incumbent's log-probabilities, the model as it is now) and,
    with a KL term, its `ref` (training.reference)."""
    import torch

    model.eval()
    with torch.no_grad():
        for batch in _batches(examples, tc.batch_size):
            for ex, lp in zip(batch, _answer_logps(model, batch)[0]):
                ex.old = lp.float()
        if tc.rl.kl_beta > 0:
            if tc.reference == "incumbent":  # the incumbent sampled: its log-probabilities are logp_old
                for ex in examples:
                    ex.ref = ex.old
            else:
                with model.disable_adapter():
                    for batch in _batches(examples, tc.batch_size):
                        for ex, lp in zip(batch, _answer_logps(model, batch)[0]):
                            ex.ref = lp.float()


def _batches(examples: list[Example], size: int):
    for i in range(0, len(examples), size):
        yield examples[i:i + size]


def _answer_logps(model, batch: list[Example], entropy: bool = False, top: bool = False):
    """Per example, the log-probability of each answer token (a tensor), the mean token entropy
    over the batch's answer tokens (a scalar tensor, when asked) and, with `top`, per example the
    log-probabilities [answer tokens, k] of the teacher's top-k tokens at each position (else None)."""
    import torch

    width = max(len(ex.ids) for ex in batch)
    pad = 0
    ids = torch.tensor([ex.ids + [pad] * (width - len(ex.ids)) for ex in batch])
    mask = torch.tensor([[1] * len(ex.ids) + [0] * (width - len(ex.ids)) for ex in batch])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    tok_lp = logp_all.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    out = [tok_lp[b, ex.prompt_len - 1:len(ex.ids) - 1] for b, ex in enumerate(batch)]
    ent = None
    if entropy:
        sel = torch.zeros_like(tok_lp, dtype=torch.bool)
        for b, ex in enumerate(batch):
            sel[b, ex.prompt_len - 1:len(ex.ids) - 1] = True
        h = -(logp_all.exp() * logp_all).sum(-1)
        ent = h[sel].mean()
    tops = None
    if top:
        tops = [logp_all[b, ex.prompt_len - 1:len(ex.ids) - 1].gather(-1, ex.top_ids) for b, ex in enumerate(batch)]
    return out, ent, tops


def token_loss(lp, ex: Example, rl):
    """(per-token loss, importance ratio, per-token KL or None) of one answer; `lp` its tokens'
    log-probabilities under the policy being trained (see the module's formula)."""
    import torch

    ratio = torch.exp(lp - ex.old)
    a = ex.advantage
    clipped = torch.clamp(ratio, 1 - rl.clip_epsilon, 1 + rl.clip_epsilon_high)
    per_tok = -torch.min(ratio * a, clipped * a)
    if ex.sampler is not None:
        per_tok = per_tok * torch.exp(ex.old - torch.tensor(ex.sampler)).clamp(max=rl.sampler_ratio_cap)
    return _with_kl(per_tok, ratio, lp, ex, rl)


def divergence_loss(lp, s_top, ex: Example, rl, dc):
    """(per-token loss, importance ratio, per-token KL or None) of one answer under a top-k
    objective: the divergence at each position (topk_divergence), plus the KL term to the
    reference; the ratio is for the log and the guard only."""
    import torch

    return _with_kl(topk_divergence(s_top, ex.top_lp, dc.objective, dc.jsd_beta), torch.exp(lp - ex.old), lp, ex, rl)


def _with_kl(per_tok, ratio, lp, ex: Example, rl):
    """(per-token loss plus the k3 KL term to the reference when kl_beta > 0, ratio, per-token KL or None)."""
    import torch

    kl = None
    if rl.kl_beta > 0:
        d = ex.ref - lp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + rl.kl_beta * kl
    return per_tok, ratio, kl


def train(spec, model, examples: list[Example], log: list[dict[str, float]], inject_nan_at: int | None = None,
          stage: str = "grpo") -> int:
    """Optimise the LoRA on `examples` for the stage's passes ("grpo": training.rl, "distill":
    training.distill); the number of optimizer steps.

    Raises TrainingError (via the caller's RoundFailed) with the guard's reason."""
    import torch

    tc = spec.training_config()
    rl = tc.rl
    guard = PolicyGuard(explode_grad_norm=tc.explode_grad_norm, max_ratio=rl.max_ratio, min_entropy=rl.min_entropy, stage=stage)
    params = [p for p in model.parameters() if p.requires_grad]
    own = tc.distill if stage == "distill" else rl
    opt = torch.optim.AdamW(params, lr=own.learning_rate or tc.learning_rate / 4, weight_decay=0.0)
    norm = "token_mean" if stage == "distill" else LOSS_NORMALISATION[rl.variant]
    topk = stage == "distill" and tc.distill.objective != "reverse_kl"
    longest = max(len(ex.ids) - ex.prompt_len for ex in examples)
    rng = random.Random(spec.seed)
    micro = tc.batch_size
    per_step = micro * tc.grad_accum
    step = 0
    model.train()
    for _ in range(own.passes):
        order = list(examples)
        rng.shuffle(order)
        for s in range(0, len(order), per_step):
            chunk = order[s:s + per_step]
            if inject_nan_at is not None and step == inject_nan_at:
                params[0].data.fill_(math.nan)
            opt.zero_grad(set_to_none=True)
            tokens = sum(len(ex.ids) - ex.prompt_len for ex in chunk)
            stats = {"loss": 0.0, "ratio": 0.0, "clipped": 0.0, "kl": 0.0, "policy_kl": 0.0, "entropy": 0.0, "tokens": 0,
                     "reverse_kl": 0.0, "divergence": 0.0}
            for mb in _batches(chunk, micro):
                logps, ent, tops = _answer_logps(model, mb, entropy=True, top=topk)
                total = 0.0
                for j, (ex, lp) in enumerate(zip(mb, logps)):
                    if topk:
                        per_tok, ratio, kl = divergence_loss(lp, tops[j], ex, rl, tc.distill)
                        stats["divergence"] += float((per_tok.detach() - (rl.kl_beta * kl.detach() if kl is not None else 0)).sum())
                        a = torch.zeros_like(ratio)  # no advantage: nothing is clipped
                    else:
                        per_tok, ratio, kl = token_loss(lp, ex, rl)
                        a = ex.advantage
                    if kl is not None:
                        stats["kl"] += float(kl.detach().sum())
                    if ex.teacher is not None:
                        stats["reverse_kl"] += float((lp.detach() - ex.teacher).sum())
                    if norm == "answer_mean":
                        total = total + per_tok.mean() / len(chunk)
                    elif norm == "constant":
                        total = total + per_tok.sum() / (len(chunk) * longest)
                    else:
                        total = total + per_tok.sum() / tokens
                    r = ratio.detach()
                    stats["ratio"] += float(r.sum())
                    # k3 estimate of KL(sampling policy || trained policy) on the sampled tokens: how far
                    # the passes have moved the policy from the one that answered (PPO's approx-KL)
                    stats["policy_kl"] += float((r - 1 - torch.log(r)).sum())
                    stats["clipped"] += float((((r < 1 - rl.clip_epsilon) & (a < 0)) | ((r > 1 + rl.clip_epsilon_high) & (a > 0))).sum())
                    stats["tokens"] += len(lp)
                total.backward()
                stats["loss"] += float(total.detach())
                stats["entropy"] += float(ent.detach()) * len(mb) / len(chunk)
            grad = float(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm))
            entry = {"loss": stats["loss"], "grad_norm": grad, "ratio_mean": stats["ratio"] / max(1, stats["tokens"]),
                     "clip_fraction": stats["clipped"] / max(1, stats["tokens"]),
                     # the KL to training.reference is computed only where it is penalised (kl_beta > 0)
                     "kl": stats["kl"] / max(1, stats["tokens"]) if rl.kl_beta > 0 else None,
                     "policy_kl": stats["policy_kl"] / max(1, stats["tokens"]), "entropy": stats["entropy"], "step": step + 1}
            if stage == "distill":
                entry["reverse_kl"] = stats["reverse_kl"] / max(1, stats["tokens"])
            if topk:
                entry["divergence"] = stats["divergence"] / max(1, stats["tokens"])
            log.append(entry)
            reason = guard.observe(entry, step + 1)
            if reason:
                raise TrainingError(reason)
            opt.step()
            step += 1
    return step


def stage_metrics(log: list[dict[str, float]], stage: str = "grpo") -> dict[str, Any]:
    """The stage's figures for the result: clip fraction and the two KLs per step summarised (to
    training.reference: None unless kl_beta > 0; from the sampling policy: always), entropy (and,
    distilling, the reverse KL to the teacher) first and last."""
    if not log:
        return {}
    p = stage
    m: dict[str, Any] = {f"{p}_clip_fraction": round(sum(e["clip_fraction"] for e in log) / len(log), 4),
                         f"{p}_kl": None if log[0]["kl"] is None else round(sum(e["kl"] for e in log) / len(log), 6),
                         f"{p}_policy_kl": round(sum(e["policy_kl"] for e in log) / len(log), 6),
                         f"{p}_ratio_mean": round(sum(e["ratio_mean"] for e in log) / len(log), 4),
                         f"{p}_entropy_first": round(log[0]["entropy"], 4), f"{p}_entropy_last": round(log[-1]["entropy"], 4),
                         f"{p}_loss_first": log[0]["loss"], f"{p}_loss_last": log[-1]["loss"]}
    for key in ("reverse_kl", "divergence"):
        if key in log[0]:
            m.update({f"{p}_{key}_first": round(log[0][key], 6), f"{p}_{key}_last": round(log[-1][key], 6)})
    return m
