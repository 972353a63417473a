"""The arithmetic of the policy-gradient stage that needs no tensors: advantages and the guard.

`group_advantages(rewards, variant)` turns one task's k rewards into k advantages:

- `grpo`    (r - mean) / (std + 1e-4), std the unbiased spread of the group (DeepSeekMath's GRPO,
            TRL's default `scale_rewards`);
- `dr_grpo` r - mean (Dr. GRPO: no std, which up-weights easy and hard groups' rare answers);
- `rloo`    r - mean of the others = k / (k - 1) * (r - mean) (REINFORCE leave-one-out).

How the per-token losses are summed also follows the variant (`LOSS_NORMALISATION`, applied in
policy_gradient.py): per-answer token mean then batch mean (grpo), token sum over the batch's
answers times a constant length (dr_grpo: no length bias), token mean over the batch (rloo).

`PolicyGuard` fails the stage on a NaN, an exploding gradient, a mean importance ratio above
`max_ratio`, or a mean token entropy below `min_entropy` (collapse).

Pure: standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LOSS_NORMALISATION = {"grpo": "answer_mean", "dr_grpo": "constant", "rloo": "token_mean"}


def group_advantages(rewards: list[float], variant: str) -> list[float]:
    k = len(rewards)
    if k < 2:
        return [0.0] * k
    mean = sum(rewards) / k
    centred = [r - mean for r in rewards]
    if variant == "grpo":
        std = math.sqrt(sum(c * c for c in centred) / (k - 1))
        return [c / (std + 1e-4) for c in centred]
    if variant == "dr_grpo":
        return centred
    if variant == "rloo":
        return [c * k / (k - 1) for c in centred]
    raise ValueError(f"unknown policy-gradient variant {variant!r} (expected grpo, dr_grpo or rloo)")


@dataclass
class PolicyGuard:
    explode_grad_norm: float
    max_ratio: float
    min_entropy: float
    stage: str = "grpo"
    entropies: list[float] = field(default_factory=list)
    reason: str | None = None

    def observe(self, logs: dict[str, float], step: int) -> str | None:
        if self.reason is not None:
            return self.reason
        for key in ("loss", "grad_norm", "ratio_mean", "entropy"):
            v = logs.get(key)
            if v is not None and not math.isfinite(v):
                self.reason = f"{self.stage}: {key.replace('_', ' ')} is {v} at step {step}"
                return self.reason
        if logs.get("grad_norm", 0.0) > self.explode_grad_norm:
            self.reason = (f"{self.stage}: gradient norm {logs['grad_norm']:.3g} > explode_grad_norm "
                           f"{self.explode_grad_norm:g} at step {step}")
        elif logs.get("ratio_mean", 1.0) > self.max_ratio:
            self.reason = (f"{self.stage}: mean importance ratio {logs['ratio_mean']:.3g} > training.rl.max_ratio "
                           f"{self.max_ratio:g} at step {step} (the policy ran away from its samples)")
        elif "entropy" in logs:
            self.entropies.append(logs["entropy"])
            if logs["entropy"] < self.min_entropy:
                self.reason = (f"{self.stage}: mean token entropy collapsed to {logs['entropy']:.3g} nats "
                               f"(< training.rl.min_entropy {self.min_entropy:g}) at step {step}")
        return self.reason

    def finish(self) -> str | None:
        return self.reason
