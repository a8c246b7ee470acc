"""The training objective of a run: the active losses, what they need from each model, and the teacher side.

Built once the teacher and student exist (or only their configs, for `distill-train --check`): the layer
mapping depends on their depths. It decides once what every forward returns — where vocabulary logits are
computed (`prepare(batch)` picks the positions), which hidden states and q/k/v each model hands over — and
computes the weighted losses. The loop only calls `prepare`, the teacher source, the student and `losses`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from distill.model_outputs import ModelShape
from distill.models.build import AttentionCapture, model_forward, router_aux_coefficient
from distill.models.families import FamilyError, family_of
from distill.models.layer_map import LayerMapError, resolve_layers
from distill.models.provenance import Provenance
from distill.objective.head_loss import ChunkedLogitLoss
from distill.objective.losses import (
    Batch,
    LossContext,
    ModelOutputs,
    check_losses,
    compute_losses,
    logit_plan,
    logits_positions_needed,
    needs_of,
    needs_teacher,
    needs_teacher_logits,
    select_logit_positions,
)
from kd_common.config import ConfigError

ROUTER_AUX = "router_aux"  # the logged name of an MoE student's load-balancing loss (metrics.jsonl: loss_router_aux)


def shape_of(model_or_config: Any) -> ModelShape:
    """Hidden size, heads and layers of a model or of its config (no weights needed)."""
    try:
        return family_of(model_or_config).model_shape(getattr(model_or_config, "config", model_or_config))
    except FamilyError as exc:
        raise ConfigError(str(exc)) from None


def pruned_from(provenance: Optional[Provenance], teacher: ModelShape, student: ModelShape) -> bool:
    """Whether `provenance` (a pruned student's prune.json) maps this student onto this teacher: the teacher has the depth and
    width the student was cut from, and the student has one recorded teacher layer per layer (and one kept channel per channel)."""
    if provenance is None:
        return False
    record = provenance.record["shape"]["teacher"]
    channels = provenance.hidden_channels
    return (
        record["num_layers"] == teacher.num_layers
        and record["hidden_size"] == teacher.hidden_size
        and len(provenance.layers) == student.num_layers
        and (len(channels) if channels is not None else teacher.hidden_size) == student.hidden_size
    )


class Objective:
    """`teacher` and `student` are models, or only their Hugging Face configs (shapes are all the checks need).

    `vocab_size`: the tokenizer's real vocabulary (logit losses ignore padded head rows). `chunked`: compute the logit
    losses in one chunked sweep from hidden states and LM-head weights (`student_logit_loss` builds the student's side)."""

    def __init__(
        self,
        loss_cfg,
        teacher: Optional[Any],
        student: Any,
        vocab_size: Optional[int] = None,
        chunked: bool = False,
        provenance: Optional[Provenance] = None,
    ):
        self.weights = loss_cfg.weights
        t_shape = shape_of(teacher) if teacher is not None else None
        s_shape = shape_of(student)
        problems = []
        layer_map: tuple = ()
        attention_layer = -1
        channels = None
        if t_shape is not None:
            pruned = pruned_from(provenance, t_shape, s_shape)
            strategy = loss_cfg.layer_map or ("pruned" if pruned else "uniform")
            if loss_cfg.layer_map_layers is None and strategy == "pruned":
                if pruned:
                    layer_map = tuple(provenance.layers)
                else:
                    problems.append(
                        "loss.layer_map=pruned pairs each student layer with the teacher layer it was cut from: it needs a student.path "
                        "written by distill-prune from a teacher of this shape (its prune.json); use another loss.layer_map"
                    )
            else:
                try:
                    layer_map = tuple(
                        resolve_layers(
                            strategy,
                            t_shape.num_layers,
                            s_shape.num_layers,
                            loss_cfg.layer_map_layers,
                            key="loss.layer_map_layers" if loss_cfg.layer_map_layers else "loss.layer_map",
                        )
                    )
                except LayerMapError as exc:
                    problems.append(str(exc))
            if pruned and provenance.width_pruned:
                channels = provenance.hidden_channels  # cos / pkd compare the student with the teacher's kept channels
            attention_layer = loss_cfg.attention_teacher_layer
            if not -t_shape.num_layers <= attention_layer < t_shape.num_layers:
                problems.append(f"loss.attention_teacher_layer={attention_layer} is out of range for a {t_shape.num_layers}-layer teacher")
            attention_layer %= t_shape.num_layers
        self.ctx = LossContext(
            cfg=loss_cfg,
            teacher=t_shape,
            student=s_shape,
            layer_map=layer_map,
            attention_teacher_layer=attention_layer,
            vocab_size=vocab_size,
            teacher_channels=channels,
        )
        self.plan, plan_problem = logit_plan(self.weights)
        if plan_problem and chunked:
            problems.append(plan_problem + " (or set loss.chunked_logits=false)")
        if not problems:
            problems += check_losses(self.weights, self.ctx)
        if not problems:
            t_needs, s_needs = needs_of(self.weights, self.ctx)
            rotary = [
                side
                for side, shape, needs in (("teacher", t_shape, t_needs), ("student", s_shape, s_needs))
                if shape is not None and shape.rotary and needs.attention_layers
            ]
            if rotary:
                problems.append(
                    f"the attention losses ({', '.join(n for n in self.weights if n.startswith(('tinybert_attn', 'minilm')) and self.weights[n] > 0)}) "
                    f"compare q.k scores, but the {' and '.join(rotary)} uses rotary positions that the captured q/k do not carry; "
                    f"use the logit and hidden-state losses for this family"
                )
        if problems:
            raise ConfigError(problems)
        self.teacher_needs, self.student_needs = needs_of(self.weights, self.ctx)
        self.logits_at = logits_positions_needed(self.weights, loss_cfg)
        self.teacher_logits = needs_teacher_logits(self.weights)
        self.uses_teacher = needs_teacher(self.weights)  # false e.g. for MLM only from a teacher-initialised student
        self.teacher_width = t_shape.hidden_size if t_shape is not None else None
        self.chunked = chunked and self.plan is not None
        # an MoE student: its family's load-balancing loss x its config's router_aux_loss_coef joins the total (logged alone)
        self.router_aux_coef = router_aux_coefficient(student)
        self.capture = None
        self.attach_teacher(teacher)

    @property
    def term_names(self) -> list[str]:
        """The logged loss terms: every weighted loss, and `router_aux` (unweighted) for an MoE student."""
        return [n for n, w in self.weights.items() if w > 0] + ([ROUTER_AUX] if self.router_aux_coef else [])

    def attach_teacher(self, teacher: Any) -> None:
        """The loaded teacher model (the plan's objective was built from configs): its q/k/v hooks, where a loss reads them."""
        if isinstance(teacher, nn.Module) and self.teacher_needs.attention_layers and self.capture is None:
            self.capture = AttentionCapture(teacher, self.teacher_needs.attention_layers)

    def describe(self) -> str:
        parts = [f"losses {', '.join(f'{n} x{w:g}' for n, w in self.weights.items() if w > 0)}"]
        if self.router_aux_coef:
            parts.append(f"the student's router load-balancing loss x{self.router_aux_coef:g} (its router_aux_loss_coef)")
        if self.ctx.layer_map:
            parts.append(f"layer map (student -> teacher) {list(self.ctx.layer_map)}")
        if self.ctx.teacher_channels is not None:
            parts.append(f"hidden states compared on the teacher's {len(self.ctx.teacher_channels)} kept channels")
        for side, needs in (("teacher", self.teacher_needs), ("student", self.student_needs)):
            extra = [name for name, on in (("hidden states", needs.hidden_states), ("projected states", needs.projected)) if on]
            if needs.attention_layers:
                extra.append(f"q/k/v of layers {list(needs.attention_layers)}")
            if extra:
                parts.append(f"{side}: {', '.join(extra)}")
        return "; ".join(parts)

    def prepare(self, batch: Batch) -> Batch:
        """Choose the positions where vocabulary logits are computed (all real tokens, masked ones, or none)."""
        return select_logit_positions(batch, self.logits_at)

    def teacher_forward(self, teacher: nn.Module, batch: Batch, inference_mode: bool = True, full_logits: bool = False) -> ModelOutputs:
        """The frozen teacher's forward: under `torch.inference_mode` (no autograd bookkeeping; `teacher.inference_mode`)
        or `torch.no_grad` (the baseline path). Same values either way; the outputs only ever feed loss targets."""
        with torch.inference_mode() if inference_mode else torch.no_grad():
            return model_forward(
                teacher,
                batch.input_ids,
                batch.attention_mask if batch.padded else None,
                batch.logit_positions if self.teacher_logits else None,
                self.teacher_needs,
                self.capture,
                full_logits,
                head_input=self.chunked and not full_logits,
                documents=batch.documents,
            )

    def student_logit_loss(self, student: nn.Module):
        """The student's side of the chunked sweep: a ChunkedLogitLoss over its LM head, weighted as the plan says
        (a submodule of the engine's wrapper, so ZeRO-3 gathers the head for it), or None when not chunked."""
        if not self.chunked:
            return None

        plan, cfg = self.plan, self.ctx.cfg
        family = family_of(student)
        module = ChunkedLogitLoss(
            family.vocab_projection(student),
            plan.kind,
            transform=family.output_transform(student.config),
            temperature=cfg.temperature,
            beta=cfg.jsd_beta,
            chunk_size=cfg.chunk_positions,
            vocab_size=self.ctx.vocab_size,
            kd_weight=plan.kd_weight,
            ce_weight=plan.ce_weight,
            check_labels=False,
        )  # labels are dataset ids: bounded by the embedding lookup
        module.plan = plan
        return module

    def losses(self, teacher_out: Optional[ModelOutputs], student_out: ModelOutputs, batch: Batch):
        total, terms = compute_losses(self.weights, teacher_out, student_out, batch, self.ctx)
        if student_out.aux_loss is not None:  # an MoE student's router loss, with its config coefficient
            total = total + self.router_aux_coef * student_out.aux_loss
            terms[ROUTER_AUX] = student_out.aux_loss.detach()
        return total, terms
