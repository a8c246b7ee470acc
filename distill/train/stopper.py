"""When the run stops: on request (a signal, the STOP file, the launcher gone, on any rank) after a checkpoint,
or at a step that is not finite, before any checkpoint (distill/train/save_guards.py), or at its last step.

Every rank decides from the same all-reduced step metrics, so every rank stops after the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from distill.train.preemption import StopRequest
from distill.train.save_guards import NonFiniteGuard, TrainingStopped


@dataclass
class Verdict:
    skipped_update: bool = False  # a non-finite step whose update the optimizer skipped (allowed by train.max_nonfinite_steps)
    stop_requested: bool = False  # some rank was asked to stop: checkpoint this step, then exit 99
    error: Optional[TrainingStopped] = None  # raise once the step is logged, before anything is saved


class Stopper:
    def __init__(self, request: StopRequest, max_nonfinite_steps: int, skipped_so_far: int = 0):
        self.request = request
        self.guard = NonFiniteGuard(max_nonfinite_steps, skipped_so_far)

    @property
    def skipped(self) -> int:
        return self.guard.skipped

    def local_flag(self) -> float:
        """1.0 when this rank was asked to stop (summed over the ranks with the step's metrics)."""
        return float(self.request.requested_here)

    def after_step(self, step: int, reduced: dict, update_skipped: bool, newest_checkpoint: Callable[[], Optional[str]]) -> Verdict:
        """The step's verdict from its all-reduced metrics (`stop_flag`, the loss terms, the gradient norm)."""
        checked = {
            **{f"loss term {name[len('loss_') :]!r}": v for name, v in reduced.items() if name.startswith("loss_")},
            "the total loss": reduced["loss"],
            "the gradient norm": reduced.get("grad_norm"),
        }
        verdict = Verdict(stop_requested=reduced["stop_flag"] > 0)
        try:
            verdict.skipped_update = self.guard.check(step, checked, update_skipped, newest_checkpoint)
        except TrainingStopped as exc:
            verdict.error = exc
        return verdict

    def reason(self) -> str:
        return self.request.reason() if self.request.requested_here else "another rank"
