"""Guards that fail a training stage before a bad adapter is ever written.

`Guard.observe(logs, step)` is fed every logged step (loss, grad_norm, rewards/margins) and returns
a one-line reason the first time something is wrong; `Guard.finish()` applies the checks that need
the whole run. run.py wraps it in a transformers TrainerCallback that stops training on a reason.

- a NaN or infinite loss or gradient norm,
- a gradient norm above `explode_grad_norm`,
- a loss that does not move: |first - last| < `min_loss_change` over a run of at least
  `MIN_STEPS_FOR_FLAT_LOSS` logged steps (fewer steps say nothing about convergence),
- a DPO-family stage whose final mean reward margin is below `min_dpo_margin`.

Pure: standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_STEPS_FOR_FLAT_LOSS = 8


@dataclass
class Guard:
    stage: str  # "sft" or "dpo"
    explode_grad_norm: float
    min_loss_change: float
    min_dpo_margin: float | None  # None: not a preference stage
    losses: list[float] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    reason: str | None = None

    def observe(self, logs: dict[str, float], step: int) -> str | None:
        if self.reason is not None:
            return self.reason
        loss = logs.get("loss")
        grad = logs.get("grad_norm")
        if loss is not None:
            if not math.isfinite(loss):
                self.reason = f"{self.stage}: loss is {loss} at step {step}"
                return self.reason
            self.losses.append(float(loss))
        if grad is not None:
            if not math.isfinite(grad):
                self.reason = f"{self.stage}: gradient norm is {grad} at step {step}"
            elif grad > self.explode_grad_norm:
                self.reason = f"{self.stage}: gradient norm {grad:.3g} > explode_grad_norm {self.explode_grad_norm:g} at step {step}"
        margin = logs.get("rewards/margins")
        if margin is not None and math.isfinite(margin):
            self.margins.append(float(margin))
        return self.reason

    def finish(self) -> str | None:
        if self.reason is not None:
            return self.reason
        if len(self.losses) >= MIN_STEPS_FOR_FLAT_LOSS:
            change = abs(self.losses[0] - self.losses[-1])
            if change < self.min_loss_change:
                self.reason = (
                    f"{self.stage}: loss did not move over {len(self.losses)} steps "
                    f"({self.losses[0]:.6g} -> {self.losses[-1]:.6g}, change {change:.3g} < min_loss_change {self.min_loss_change:g})"
                )
                return self.reason
        if self.min_dpo_margin is not None and self.margins and self.margins[-1] < self.min_dpo_margin:
            self.reason = (
                f"{self.stage}: mean reward margin collapsed to {self.margins[-1]:.4g} "
                f"(< min_dpo_margin {self.min_dpo_margin:g})"
            )
        return self.reason
