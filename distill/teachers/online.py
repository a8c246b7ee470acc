"""Where the teacher's outputs come from: the loop asks one interface, whatever the source.

`OnlineTeacher`: a frozen teacher replicated on every rank, run on each micro batch (eval mode, no
gradients, `torch.inference_mode`), returning what the objective decided it must (logits where a loss
reads them, hidden states, q/k/v). Other sources (a teacher partitioned across ranks, a cache of its
distributions written once) implement the same methods; distill/teachers/sources.py names them. Each is built by
`load(teacher_section, plan, ctx)`: section `teacher` of the run config, the run's plan (distill/train/preflight.py:
the teacher's dtype and config, the logits path, ...) and the rank's context (its device).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from distill.model_outputs import ModelOutputs
from distill.models.build import compile_encoder, count_parameters, init_student_from_teacher, load_teacher
from distill.models.fingerprint import shape_fingerprint


class OnlineTeacher:
    """A frozen teacher on this rank, run on every micro batch."""

    def __init__(self, model: nn.Module, path: str, inference_mode: bool = True, full_logits: bool = False):
        self.model = model
        self.path = path
        self.inference_mode = inference_mode
        self.full_logits = full_logits  # the benchmark's baseline path (train.logits_where_needed=false)
        self.objective = None

    @classmethod
    def load(cls, teacher_cfg, plan, ctx) -> "OnlineTeacher":
        """The whole teacher on this rank's device, in the plan's teacher dtype."""
        model = load_teacher(teacher_cfg.path, plan.teacher_dtype, teacher_cfg.attn_implementation, ctx.device)
        return cls(model, teacher_cfg.path, teacher_cfg.inference_mode, plan.full_logits)

    @property
    def config(self):
        return self.model.config

    def bind(self, objective) -> None:
        """The objective that decides what each forward returns."""
        self.objective = objective

    def init_student(self, student: nn.Module, layers: list[int], fold_token_type: bool) -> dict[str, str]:
        """`student.init=teacher`: copy the embeddings, teacher layers `layers` and the head into `student`."""
        return init_student_from_teacher(student, self.model, layers, fold_token_type, self.init_weights())

    def init_weights(self) -> Optional[Mapping[str, torch.Tensor]]:
        """The teacher's weights by name as the layer copy reads them (None: the model's own state dict)."""
        return None

    def compile(self) -> None:
        compile_encoder(self.model)

    def outputs(self, batch) -> ModelOutputs:
        return self.objective.teacher_forward(self.model, batch, self.inference_mode, self.full_logits)

    def describe(self) -> str:
        return f"{type(self.model).__name__}, {count_parameters(self.model) / 1e6:.2f}M parameters, frozen"

    def fingerprint(self) -> str:
        """The shape fingerprint (config + weight file names and sizes) runs recorded before content fingerprints; the run
        identity also records the weights' content, `teacher.content_sha256` (distill/models/fingerprint.py)."""
        return shape_fingerprint(self.path)
