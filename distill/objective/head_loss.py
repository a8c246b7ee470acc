"""The student's LM head inside a logit loss: one module that runs the chunked sweep against a live teacher
(distill/objective/chunked_logits.py) or the sparse sweep against cached targets (distill/objective/sparse_logits.py),
with the head registered so that DeepSpeed ZeRO-3 gathers it for this module's forward."""

from __future__ import annotations

from typing import Optional

from torch import nn

from distill.model_outputs import LogitTransform
from distill.objective.chunked_logits import LogitLosses, chunked_logit_loss
from distill.objective.sparse_logits import SparseTargets, sparse_logit_loss


def _register_external(module: nn.Module, *params) -> None:
    """Tell DeepSpeed ZeRO-3 to gather `params` for `module`'s forward (a no-op without DeepSpeed or ZeRO-3)."""
    try:
        import deepspeed  # deepspeed: not at start-up
    except ImportError:  # DeepSpeed is a dependency, but the losses work without it
        return
    for param in params:
        if isinstance(param, nn.Parameter):
            deepspeed.zero.register_external_parameter(module, param)


class ChunkedLogitLoss(nn.Module):
    """`chunked_logit_loss` with the student's LM head read inside this module's forward: the ZeRO-3-safe way.

    Holds a reference to `head` (not a submodule: its parameters stay where they are, once in the state dict) and
    registers the head's weight and bias as external parameters, so ZeRO-3 gathers them for this forward. Must be a
    submodule of the module DeepSpeed wraps, called from its forward or after it (``engine.module.<name>(...)``).
    `transform`: what the student's forward does to its logits after `head` (a LogitTransform: Granite's scaling, Gemma's
    final softcap; None = nothing), applied chunk by chunk; the teacher's comes with its head (`teacher_transform`).
    `options` are `chunked_logit_loss`'s keywords.
    """

    def __init__(self, head: nn.Module, kind: Optional[str] = "forward_kl", transform: Optional[LogitTransform] = None, **options):
        super().__init__()
        self._head = (head,)  # a tuple hides it from nn.Module's registration
        self.kind = kind
        self.transform = transform if transform is not None and not transform.identity else None
        self.options = options
        _register_external(self, head.weight, getattr(head, "bias", None))

    def extra_repr(self) -> str:
        extra = [f"transform={self.transform}"] if self.transform is not None else []
        return ", ".join([f"kind={self.kind!r}"] + extra + [f"{k}={v!r}" for k, v in self.options.items()])

    def forward(
        self, student_hidden, teacher_hidden=None, teacher_head=None, labels=None, kd_mask=None, all_positions=False, teacher_transform=None
    ) -> LogitLosses:
        if isinstance(teacher_hidden, SparseTargets):  # the teacher from a cache (teacher.source: cache)
            return sparse_logit_loss(
                student_hidden,
                self._head[0],
                teacher_hidden,
                self.kind,
                labels=labels,
                kd_mask=kd_mask,
                student_transform=self.transform,
                **self.options,
            )
        return chunked_logit_loss(
            student_hidden,
            self._head[0],
            teacher_hidden,
            teacher_head,
            self.kind,
            labels=labels,
            kd_mask=kd_mask,
            all_positions=all_positions,
            student_transform=self.transform,
            teacher_transform=teacher_transform,
            **self.options,
        )
