"""Distillation losses: small pure functions of (teacher outputs, student outputs, batch, config).

Each loss is registered by name with what it needs (a teacher, vocabulary logits and where), so the
trainer computes only that: in particular vocabulary logits are produced only at the positions some
active loss uses (all non-padding tokens, or masked tokens only). The trainer knows no loss by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class ModelOutputs:
    """What a model produced for one micro batch."""

    hidden: torch.Tensor  # (B, L, H) last hidden states
    logits: Optional[torch.Tensor] = None  # (P, V) at `Batch.logit_positions`, or None


@dataclass
class Batch:
    """A masked micro batch plus where logits are computed."""

    input_ids: torch.Tensor  # (B, L) with [MASK]/random replacements applied
    attention_mask: torch.Tensor  # (B, L) 1 for real tokens, 0 for padding
    labels: torch.Tensor  # (B, L) original id at selected positions, -100 elsewhere
    logit_positions: Optional[torch.Tensor] = None  # (P,) flat indices into B*L
    position_labels: Optional[torch.Tensor] = None  # (P,) labels at those positions (-100 = not selected)

    @property
    def position_is_masked(self) -> torch.Tensor:
        return self.position_labels != IGNORE_INDEX


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[Optional[ModelOutputs], ModelOutputs, Batch, object], torch.Tensor]
    needs_teacher: bool
    # where this loss needs vocabulary logits: None, "masked" (selected tokens) or "tokens" (all non-padding)
    logits_at: Callable[[object], Optional[str]]
    needs_teacher_logits: bool = False


LOSSES: dict[str, LossSpec] = {}


def register(name: str, needs_teacher: bool, logits_at: Callable[[object], Optional[str]] = lambda cfg: None, needs_teacher_logits: bool = False):
    """Decorator: make a loss available under `name` in `loss.weights`."""

    def wrap(fn):
        LOSSES[name] = LossSpec(fn=fn, needs_teacher=needs_teacher, logits_at=logits_at, needs_teacher_logits=needs_teacher_logits)
        return fn

    return wrap


@register("ce", needs_teacher=True, logits_at=lambda cfg: "tokens" if cfg.ce_positions == "all" else "masked", needs_teacher_logits=True)
def soft_target_loss(teacher: ModelOutputs, student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """KL(teacher_T || student_T) per position, averaged over positions, times T^2 (Hinton et al.).

    Positions: every non-padding token (`ce_positions: all`, as the DistilBERT release) or masked only.
    """
    s_logits, t_logits = student.logits.float(), teacher.logits.float()
    if cfg.ce_positions == "masked":
        keep = batch.position_is_masked
        s_logits, t_logits = s_logits[keep], t_logits[keep]
    temperature = cfg.temperature
    s_log_probs = F.log_softmax(s_logits / temperature, dim=-1)
    t_log_probs = F.log_softmax(t_logits / temperature, dim=-1)
    kl = F.kl_div(s_log_probs, t_log_probs, log_target=True, reduction="batchmean")
    return kl * temperature**2


@register("mlm", needs_teacher=False, logits_at=lambda cfg: "masked")
def masked_lm_loss(teacher: Optional[ModelOutputs], student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """Cross-entropy of the student's predictions at the selected (masked) positions."""
    keep = batch.position_is_masked
    return F.cross_entropy(student.logits[keep].float(), batch.position_labels[keep])


@register("cos", needs_teacher=True)
def cosine_hidden_loss(teacher: ModelOutputs, student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """1 - cos(student, teacher) of last hidden states, averaged over non-padding tokens."""
    mask = batch.attention_mask.bool()
    s_hidden = student.hidden[mask].float()
    t_hidden = teacher.hidden[mask].float()
    return (1.0 - F.cosine_similarity(s_hidden, t_hidden, dim=-1)).mean()


def active_losses(weights: dict[str, float]) -> dict[str, tuple[LossSpec, float]]:
    """The registered losses with a positive weight."""
    return {name: (LOSSES[name], w) for name, w in weights.items() if w > 0}


def logits_positions_needed(weights: dict[str, float], cfg) -> Optional[str]:
    """Union of where the active losses need logits: "tokens" covers "masked"."""
    wanted = {spec.logits_at(cfg) for spec, _ in active_losses(weights).values()} - {None}
    if "tokens" in wanted:
        return "tokens"
    return "masked" if "masked" in wanted else None


def needs_teacher(weights: dict[str, float]) -> bool:
    return any(spec.needs_teacher for spec, _ in active_losses(weights).values())


def needs_teacher_logits(weights: dict[str, float]) -> bool:
    return any(spec.needs_teacher_logits for spec, _ in active_losses(weights).values())


def compute_losses(weights: dict[str, float], teacher: Optional[ModelOutputs], student: ModelOutputs, batch: Batch, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the active losses, and each term (unweighted, detached) for logging."""
    terms = {}
    total = None
    for name, (spec, weight) in active_losses(weights).items():
        value = spec.fn(teacher, student, batch, cfg)
        terms[name] = value.detach()
        total = weight * value if total is None else total + weight * value
    return total, terms


def select_logit_positions(batch: Batch, where: Optional[str]) -> Batch:
    """Fill `logit_positions`/`position_labels` for "tokens" (non-padding) or "masked" positions."""
    if where is None:
        return batch
    flat_labels = batch.labels.reshape(-1)
    if where == "tokens":
        positions = batch.attention_mask.reshape(-1).nonzero(as_tuple=True)[0]
    else:
        positions = (flat_labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    batch.logit_positions = positions
    batch.position_labels = flat_labels[positions]
    return batch
