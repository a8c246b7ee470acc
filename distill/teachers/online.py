"""Where the teacher's outputs come from: the loop asks one interface, whatever the source.

`OnlineTeacher`: a frozen teacher replicated on every rank, run on each micro batch (eval mode, no
gradients, `torch.inference_mode`), returning what the objective decided it must (logits where a loss
reads them, hidden states, q/k/v). Other sources (a teacher partitioned across ranks, a cache of its
distributions written once) implement `outputs(batch)` and `fingerprint()` and register in `TEACHER_SOURCES`.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from distill.model_outputs import ModelOutputs
from distill.models.build import compile_encoder, count_parameters, load_teacher, resolve_dtype


class OnlineTeacher:
    """A frozen teacher on this rank, run on every micro batch."""

    def __init__(self, model: nn.Module, path: str, inference_mode: bool = True, full_logits: bool = False):
        self.model = model
        self.path = path
        self.inference_mode = inference_mode
        self.full_logits = full_logits  # the benchmark's baseline path (train.logits_where_needed=false)
        self.objective = None

    @classmethod
    def load(cls, cfg, device: torch.device) -> "OnlineTeacher":
        if getattr(cfg.teacher, "partition", False) and cls is OnlineTeacher:  # the same teacher, split across the ranks
            return TEACHER_SOURCES["online_partitioned"].load(cfg, device)
        model = load_teacher(cfg.teacher.path, resolve_dtype(cfg.teacher.dtype, device), cfg.teacher.attn_implementation, device)
        return cls(model, cfg.teacher.path, cfg.teacher.inference_mode, not cfg.train.logits_where_needed)

    @property
    def config(self):
        return self.model.config

    def bind(self, objective) -> None:
        """The objective that decides what each forward returns."""
        self.objective = objective

    def init_model(self) -> nn.Module:
        """The weights `student.init=teacher` copies from."""
        return self.model

    def compile(self) -> None:
        compile_encoder(self.model)

    def outputs(self, batch) -> ModelOutputs:
        return self.objective.teacher_forward(self.model, batch, self.inference_mode, self.full_logits)

    def describe(self) -> str:
        return f"{type(self.model).__name__}, {count_parameters(self.model) / 1e6:.2f}M parameters, frozen"

    def fingerprint(self) -> str:
        """Config hash plus weight file names and sizes: cheap, and stable when the directory moves."""
        digest = hashlib.sha256(open(os.path.join(self.path, "config.json"), "rb").read())
        for name in sorted(os.listdir(self.path)):
            if name.endswith((".safetensors", ".bin")):
                digest.update(f"{name}:{os.path.getsize(os.path.join(self.path, name))}".encode())
        return digest.hexdigest()


TEACHER_SOURCES = {"online": OnlineTeacher}


def _register_partitioned() -> None:
    import distill.teachers.partitioned  # noqa: F401  teacher.partition: true (its own module, which registers itself)


_register_partitioned()


def _register_cache() -> None:
    from distill.teachers.cache import CacheTeacher  # its own module (distill/teachers/cache.py)

    TEACHER_SOURCES["cache"] = CacheTeacher


_register_cache()
