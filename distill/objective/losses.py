"""Distillation losses: small pure functions of (teacher outputs, student outputs, batch, config).

Each loss is registered by name with what it needs (a teacher, vocabulary logits and where, hidden
states of every layer, the student's hidden states projected to the teacher's width, the queries /
keys / values of chosen layers), so the forward passes compute only that: in particular vocabulary
logits are produced only at the positions some active loss uses (all non-padding tokens, or masked
tokens only), and hidden states / attention internals only when a loss reads them. The trainer knows
no loss by name.

Literature covered: DistilBERT (ce, mlm, cos), Patient-KD (pkd), TinyBERT general distillation
(tinybert_emb, tinybert_hidden, tinybert_attn, optional ce), MiniLM (minilm_attn, minilm_value),
DistilGPT2 (ce, clm, cos on causal data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from distill.model_outputs import Documents, ModelOutputs, ModelShape, Needs  # noqa: F401  (re-exported: losses are written against these)

IGNORE_INDEX = -100


@dataclass
class LossContext:
    """The loss config plus what is known once the models exist (shapes, resolved layer mapping).

    Attribute access falls through to the `LossConfig`, so losses read `ctx.temperature` etc.
    """

    cfg: object
    teacher: Optional[ModelShape] = None
    student: Optional[ModelShape] = None
    layer_map: tuple = ()  # teacher layer (0-based) distilled into each student layer, one per student layer
    attention_teacher_layer: int = -1  # MiniLM: the teacher layer (0-based, resolved) mimicked by the student's last layer
    vocab_size: Optional[int] = None  # the tokenizer's real vocabulary: logit losses ignore the rows a head is padded with
    teacher_channels: Optional[tuple] = None  # a width-pruned student: the teacher's hidden channels it kept (its prune.json)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.cfg, name)

    @property
    def pkd_pairs(self) -> list:
        """(student layer, teacher layer) pairs of the patient loss: the student's last layer is left to
        the output losses unless `pkd_include_last` (as in Sun et al.: PKD-Skip 2,4,6,8,10 of 12)."""
        pairs = list(enumerate(self.layer_map))
        return pairs if getattr(self.cfg, "pkd_include_last", False) else pairs[:-1]


@dataclass
class Batch:
    """A masked micro batch plus where logits are computed."""

    input_ids: torch.Tensor  # (B, L) with [MASK]/random replacements applied
    attention_mask: torch.Tensor  # (B, L) 1 for real tokens, 0 for padding
    labels: torch.Tensor  # (B, L) original id at selected positions, -100 elsewhere
    logit_positions: Optional[torch.Tensor] = None  # (P,) flat indices into B*L
    position_labels: Optional[torch.Tensor] = None  # (P,) labels at those positions (-100 = not selected)
    rows: Optional[torch.Tensor] = None  # (B,) dataset row of each sample (CPU): a teacher cache looks its targets up by it
    mask_variants: Optional[torch.Tensor] = None  # (B,) static-mask variant of each sample (data.static_masks > 0; CPU), for a cache
    # computed on the host from the collated batch before the copy (distill/data/reader.py), so nothing below reads device values:
    token_positions: Optional[torch.Tensor] = None  # (T,) flat indices of the real (non-padding) tokens
    masked_positions: Optional[torch.Tensor] = None  # (M,) flat indices of the selected (labelled) positions
    padded: bool = True  # False when no sequence of the micro batch is padded: the models then get no attention mask
    documents: Optional[Documents] = None  # causal data with data.document_attention: the models keep its documents apart

    @property
    def position_is_masked(self) -> torch.Tensor:
        return self.position_labels != IGNORE_INDEX


def _no_needs(ctx) -> Needs:
    return Needs()


def _no_problem(ctx) -> Optional[str]:
    return None


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[Optional[ModelOutputs], ModelOutputs, Batch, object], torch.Tensor]
    needs_teacher: bool
    # where this loss needs vocabulary logits: None, "masked" (selected tokens) or "tokens" (all non-padding)
    logits_at: Callable[[object], Optional[str]]
    needs_teacher_logits: bool = False
    student_needs: Callable[[LossContext], Needs] = _no_needs
    teacher_needs: Callable[[LossContext], Needs] = _no_needs
    # a problem with the models' shapes for this loss (e.g. widths differ), or None; called once at start
    check: Callable[[LossContext], Optional[str]] = _no_problem
    # a loss over vocabulary logits that the chunked sweep computes (distill/objective/chunked_logits.py): "forward_kl", "reverse_kl",
    # "jsd" (teacher vs student) or "ce" (the student's cross-entropy against the labels); None for the others
    logit_kind: Optional[str] = None


LOSSES: dict[str, LossSpec] = {}


def register(
    name: str,
    needs_teacher: bool,
    logits_at: Callable[[object], Optional[str]] = lambda cfg: None,
    needs_teacher_logits: bool = False,
    student_needs: Callable[[LossContext], Needs] = _no_needs,
    teacher_needs: Callable[[LossContext], Needs] = _no_needs,
    check: Callable[[LossContext], Optional[str]] = _no_problem,
    logit_kind: Optional[str] = None,
):
    """Decorator: make a loss available under `name` in `loss.weights`, with what it reads from the models."""

    def wrap(fn):
        LOSSES[name] = LossSpec(
            fn=fn,
            needs_teacher=needs_teacher,
            logits_at=logits_at,
            needs_teacher_logits=needs_teacher_logits,
            student_needs=student_needs,
            teacher_needs=teacher_needs,
            check=check,
            logit_kind=logit_kind,
        )
        return fn

    return wrap


def _vocab(logits: torch.Tensor, ctx) -> torch.Tensor:
    """Only the tokenizer's real vocabulary counts (heads padded to other sizes, e.g. 152064 vs 151936 rows)."""
    vocab = getattr(ctx, "vocab_size", None)
    return logits[:, :vocab].float() if vocab else logits.float()


def _kd_positions(batch: Batch, cfg) -> Optional[torch.Tensor]:
    """Positions of the soft-target losses among the logit positions: all of them, or the masked ones (loss.ce_positions)."""
    return batch.position_is_masked if cfg.ce_positions == "masked" else None


def logit_divergence(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: str, temperature: float, beta: float = 0.5) -> torch.Tensor:
    """Mean over positions of the divergence between teacher and student at temperature T, times T^2 (the direct computation
    the chunked sweep is checked against): forward KL(P_T||P_S), reverse KL(P_S||P_T), or the generalized JSD with `beta`
    (TRL / Liger convention: M = beta P_T + (1 - beta) P_S, beta KL(P_T||M) + (1 - beta) KL(P_S||M); beta 0 = forward, 1 = reverse)."""
    s_log = F.log_softmax(s_logits / temperature, dim=-1)
    t_log = F.log_softmax(t_logits / temperature, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        per_position = (t_log.exp() * (t_log - s_log)).sum(-1)
    elif kind == "reverse_kl":
        per_position = (s_log.exp() * (s_log - t_log)).sum(-1)
    else:
        m_log = torch.logsumexp(torch.stack([t_log + math.log(beta), s_log + math.log(1 - beta)]), dim=0)
        per_position = beta * (t_log.exp() * (t_log - m_log)).sum(-1) + (1 - beta) * (s_log.exp() * (s_log - m_log)).sum(-1)
    return per_position.mean() * temperature**2 if per_position.numel() else s_logits.sum() * 0.0


def _same_width(name: str):
    def check(ctx: LossContext) -> Optional[str]:
        if ctx.teacher_channels is not None:
            return None  # a width-pruned student: compared with the teacher's kept channels
        if ctx.teacher and ctx.student and ctx.teacher.hidden_size != ctx.student.hidden_size:
            return (
                f"loss '{name}' compares hidden states directly and needs the teacher's width {ctx.teacher.hidden_size}, the student has "
                f"{ctx.student.hidden_size}; set loss.weights.{name}=0 (or use the projected tinybert_* losses, or a student pruned from "
                f"this teacher by distill-prune: its kept channels are compared)"
            )
        return None

    return check


def _same_heads(name: str):
    def check(ctx: LossContext) -> Optional[str]:
        if ctx.teacher and ctx.student and ctx.teacher.num_heads != ctx.student.num_heads:
            return (
                f"loss '{name}' compares attention head by head and needs as many heads as the teacher ({ctx.teacher.num_heads}), "
                f"the student has {ctx.student.num_heads}; set student.num_heads={ctx.teacher.num_heads} (widths may differ)"
            )
        return None

    return check


def _soft_targets(kind: str):
    def loss(teacher: ModelOutputs, student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
        s_logits, t_logits = _vocab(student.logits, cfg), _vocab(teacher.logits, cfg)
        keep = _kd_positions(batch, cfg)
        if keep is not None:
            s_logits, t_logits = s_logits[keep], t_logits[keep]
        return logit_divergence(s_logits, t_logits, kind, cfg.temperature, cfg.jsd_beta)

    return loss


_KD_AT = {"logits_at": lambda cfg: "tokens" if cfg.ce_positions == "all" else "masked", "needs_teacher_logits": True}

soft_target_loss = register("ce", needs_teacher=True, logit_kind="forward_kl", **_KD_AT)(_soft_targets("forward_kl"))
soft_target_loss.__doc__ = """KL(teacher_T || student_T) per position, averaged over positions, times T^2 (Hinton et al.; DistilBERT's L_ce).
Positions: every non-padding token (`ce_positions: all`, as the DistilBERT release) or masked only."""
reverse_kl_loss = register("reverse_kl", needs_teacher=True, logit_kind="reverse_kl", **_KD_AT)(_soft_targets("reverse_kl"))
reverse_kl_loss.__doc__ = """KL(student_T || teacher_T): mode-seeking (MiniLLM, GKD); same positions and T^2 scale as ce."""
jsd_loss = register("jsd", needs_teacher=True, logit_kind="jsd", **_KD_AT)(_soft_targets("jsd"))
jsd_loss.__doc__ = (
    """Generalized Jensen-Shannon divergence with loss.jsd_beta (0 = forward KL, 1 = reverse KL; TRL/Liger convention), T^2 scale."""
)


@register("mlm", needs_teacher=False, logits_at=lambda cfg: "masked", logit_kind="ce")
def masked_lm_loss(teacher: Optional[ModelOutputs], student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """Cross-entropy of the student's predictions at the selected (masked) positions."""
    keep = batch.position_is_masked
    return F.cross_entropy(_vocab(student.logits[keep], cfg), batch.position_labels[keep])


@register("clm", needs_teacher=False, logits_at=lambda cfg: "masked", logit_kind="ce")
def causal_lm_loss(teacher: Optional[ModelOutputs], student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """Causal LM cross-entropy: on causal data the collator's labels are the next tokens (-100 after the
    last real token), so this is the masked-LM loss at the positions that have a next token."""
    return masked_lm_loss(teacher, student, batch, cfg)


_CHANNELS: dict = {}  # (channels, device) -> index tensor: a width-pruned student's kept teacher channels, made once per device


def kept_channels(hidden: torch.Tensor, cfg) -> torch.Tensor:
    """The teacher's hidden states (..., H) on the channels a width-pruned student kept (all of them otherwise)."""
    channels = getattr(cfg, "teacher_channels", None)
    if channels is None:
        return hidden
    key = (channels, hidden.device)
    if key not in _CHANNELS:
        _CHANNELS[key] = torch.tensor(channels, dtype=torch.long, device=hidden.device)
    return hidden.index_select(-1, _CHANNELS[key])


@register("cos", needs_teacher=True, check=_same_width("cos"))
def cosine_hidden_loss(teacher: ModelOutputs, student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """1 - cos(student, teacher) of last hidden states, averaged over non-padding tokens (a width-pruned student: against the
    teacher's kept channels)."""
    if batch.token_positions is not None:  # the same rows, gathered by positions known on the host (no device read)
        s_hidden = student.hidden.reshape(-1, student.hidden.shape[-1]).index_select(0, batch.token_positions).float()
        t_hidden = teacher.hidden.reshape(-1, teacher.hidden.shape[-1]).index_select(0, batch.token_positions).float()
    else:
        mask = batch.attention_mask.bool()
        s_hidden = student.hidden[mask].float()
        t_hidden = teacher.hidden[mask].float()
    return (1.0 - F.cosine_similarity(s_hidden, kept_channels(t_hidden, cfg), dim=-1)).mean()


# ----------------------------------------------------------------------------------------------
# Intermediate-layer losses (Patient-KD, TinyBERT, MiniLM)


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the entries of the non-padding tokens (mask (B, L)) and all features."""
    return F.mse_loss(a[mask].float(), b[mask].float())


def _all_student_layers(ctx: LossContext) -> Needs:
    return Needs(attention_layers=tuple(range(ctx.student.num_layers)))


@register(
    "pkd",
    needs_teacher=True,
    student_needs=lambda ctx: Needs(hidden_states=True),
    teacher_needs=lambda ctx: Needs(hidden_states=True),
    check=lambda ctx: (
        _same_width("pkd")(ctx)
        or (None if ctx.pkd_pairs else "loss 'pkd' has no layer pairs: a 1-layer student needs loss.pkd_include_last=true")
    ),
)
def patient_loss(teacher: ModelOutputs, student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """Patient-KD (Sun et al., 2019): MSE between the L2-normalised [CLS] (position 0) hidden states of
    student layer j and teacher layer g(j), over the pairs `cfg.pkd_pairs`; the mean over (batch, layers,
    features) as in the released code (F.mse_loss of the normalised (B, layers, H) stacks). A width-pruned student:
    against the teacher's kept channels."""
    pairs = cfg.pkd_pairs
    s_cls = torch.stack([student.hidden_states[j + 1][:, 0] for j, _ in pairs], dim=1).float()
    t_cls = kept_channels(torch.stack([teacher.hidden_states[t + 1][:, 0] for _, t in pairs], dim=1).float(), cfg)
    return F.mse_loss(F.normalize(s_cls, p=2, dim=-1), F.normalize(t_cls, p=2, dim=-1))


@register(
    "tinybert_emb", needs_teacher=True, student_needs=lambda ctx: Needs(projected=True), teacher_needs=lambda ctx: Needs(hidden_states=True)
)
def tinybert_embedding_loss(teacher: ModelOutputs, student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """TinyBERT embedding-layer loss: MSE(E_s W_e, E_t) over non-padding tokens."""
    return _masked_mse(student.projected[0], teacher.hidden_states[0], batch.attention_mask.bool())


@register(
    "tinybert_hidden",
    needs_teacher=True,
    student_needs=lambda ctx: Needs(projected=True),
    teacher_needs=lambda ctx: Needs(hidden_states=True),
)
def tinybert_hidden_loss(teacher: ModelOutputs, student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """TinyBERT hidden-state loss: sum over student layers m of MSE(H_s^m W_h, H_t^g(m)) over non-padding tokens."""
    mask = batch.attention_mask.bool()
    return sum(_masked_mse(student.projected[m + 1], teacher.hidden_states[t + 1], mask) for m, t in enumerate(cfg.layer_map))


def _key_mask(attention_mask: torch.Tensor, causal: bool, documents: Optional[Documents] = None) -> torch.Tensor:
    """(B, 1, L, L) True where query i may attend key j: both real tokens (and j <= i when causal, in the same document
    when the micro batch keeps its documents apart)."""
    real = attention_mask.bool()
    mask = real[:, None, :, None] & real[:, None, None, :]
    if causal:
        length = attention_mask.shape[1]
        mask = mask & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if documents is not None:
        segment = documents.segment_ids()
        mask = mask & (segment[:, None, :, None] == segment[:, None, None, :])
    return mask


def _scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a b^T / sqrt(head_dim) per head: (B, h, L, d) x (B, h, L, d) -> (B, h, L, L)."""
    return torch.matmul(a.float(), b.float().transpose(-1, -2)) / math.sqrt(a.shape[-1])


@register(
    "tinybert_attn",
    needs_teacher=True,
    student_needs=_all_student_layers,
    teacher_needs=lambda ctx: Needs(attention_layers=tuple(ctx.layer_map)),
    check=_same_heads("tinybert_attn"),
)
def tinybert_attention_loss(teacher: ModelOutputs, student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """TinyBERT attention loss: sum over student layers m of the MSE between pre-softmax attention scores
    (q k^T / sqrt(d), per head) of student layer m and teacher layer g(m), averaged over the (query, key)
    pairs where both are real tokens: padding is excluded through the attention mask, not by thresholding
    scores as TinyBERT's released code does."""
    allowed = _key_mask(batch.attention_mask, student.causal, batch.documents)
    total = 0.0
    for m, t in enumerate(cfg.layer_map):
        s_q, s_k, _ = student.attention[m]
        t_q, t_k, _ = teacher.attention[t]
        mask = allowed.expand(-1, s_q.shape[1], -1, -1)
        total = total + F.mse_loss(_scores(s_q, s_k)[mask], _scores(t_q, t_k)[mask])
    return total


def _relation_kl(
    t_logits: torch.Tensor, s_logits: torch.Tensor, attention_mask: torch.Tensor, causal: bool, documents: Optional[Documents] = None
) -> torch.Tensor:
    """KL(softmax(t) || softmax(s)) over the visible keys of each (batch, head, real query), averaged."""
    allowed = _key_mask(attention_mask, causal, documents)
    fill = torch.finfo(torch.float32).min
    t_log = F.log_softmax(t_logits.masked_fill(~allowed, fill), dim=-1)
    s_log = F.log_softmax(s_logits.masked_fill(~allowed, fill), dim=-1)
    kl = torch.where(allowed, t_log.exp() * (t_log - s_log), torch.zeros((), device=t_log.device)).sum(-1)  # (B, h, L)
    queries = attention_mask.bool()[:, None, :].expand_as(kl)
    return kl[queries].mean()


def _minilm_needs_teacher(ctx: LossContext) -> Needs:
    return Needs(attention_layers=(ctx.attention_teacher_layer,))


def _minilm_needs_student(ctx: LossContext) -> Needs:
    return Needs(attention_layers=(ctx.student.num_layers - 1,))


@register(
    "minilm_attn",
    needs_teacher=True,
    student_needs=_minilm_needs_student,
    teacher_needs=_minilm_needs_teacher,
    check=_same_heads("minilm_attn"),
)
def minilm_attention_loss(teacher: ModelOutputs, student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """MiniLM self-attention distribution transfer: KL(A_T || A_S) of the teacher's chosen (last) layer and
    the student's last layer, per head and real query, averaged over heads and queries."""
    s_q, s_k, _ = student.attention[cfg.student.num_layers - 1]
    t_q, t_k, _ = teacher.attention[cfg.attention_teacher_layer]
    return _relation_kl(_scores(t_q, t_k), _scores(s_q, s_k), batch.attention_mask, student.causal, batch.documents)


@register(
    "minilm_value",
    needs_teacher=True,
    student_needs=_minilm_needs_student,
    teacher_needs=_minilm_needs_teacher,
    check=_same_heads("minilm_value"),
)
def minilm_value_relation_loss(teacher: ModelOutputs, student: ModelOutputs, batch: Batch, cfg) -> torch.Tensor:
    """MiniLM value-relation transfer: KL(softmax(V_T V_T^T / sqrt(d_T)) || softmax(V_S V_S^T / sqrt(d_S))) of the
    same layers, per head and real query; head dims (so widths) may differ, no projection."""
    _, _, s_v = student.attention[cfg.student.num_layers - 1]
    _, _, t_v = teacher.attention[cfg.attention_teacher_layer]
    return _relation_kl(_scores(t_v, t_v), _scores(s_v, s_v), batch.attention_mask, student.causal, batch.documents)


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


def compute_losses(
    weights: dict[str, float], teacher: Optional[ModelOutputs], student: ModelOutputs, batch: Batch, cfg
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the active losses, and each term (unweighted, detached) for logging.

    With chunked logits (`student.head` set), the logit losses come from one fused sweep of the student's
    ChunkedLogitLoss, built with their weights (see `LogitPlan`); the others from their functions."""
    terms = {}
    total = None
    active = active_losses(weights)
    if student.head is not None:
        fused = _fused_logit_losses(active, teacher, student, batch, cfg)
        if fused is not None:
            total, found = fused
            terms.update(found)
    for name, (spec, weight) in active.items():
        if name in terms:
            continue
        value = spec.fn(teacher, student, batch, cfg)
        terms[name] = value.detach()
        total = weight * value if total is None else total + weight * value
    return total, terms


@dataclass(frozen=True)
class LogitPlan:
    """The one fused sweep of the chunked logit losses: at most one soft-target loss (`kd_name`, `kind`) and one cross-entropy."""

    kd_name: Optional[str]
    kind: Optional[str]
    kd_weight: float
    ce_name: Optional[str]
    ce_weight: float


def logit_plan(weights: dict[str, float]) -> tuple[Optional[LogitPlan], Optional[str]]:
    """(the sweep of the active logit losses or None, a problem or None)."""
    active = active_losses(weights)
    kd = [(n, s, w) for n, (s, w) in active.items() if s.logit_kind not in (None, "ce")]
    ce = [(n, s, w) for n, (s, w) in active.items() if s.logit_kind == "ce"]
    if len(kd) > 1:
        return None, f"losses {[n for n, _, _ in kd]} are each a soft-target loss over the vocabulary; use one of them at a time"
    if len(ce) > 1:
        return None, f"losses {[n for n, _, _ in ce]} are each a cross-entropy over the vocabulary; use one of them"
    if not kd and not ce:
        return None, None
    return LogitPlan(
        kd[0][0] if kd else None,
        kd[0][1].logit_kind if kd else None,
        kd[0][2] if kd else 0.0,
        ce[0][0] if ce else None,
        ce[0][2] if ce else 0.0,
    ), None


def _fused_logit_losses(active, teacher: Optional[ModelOutputs], student: ModelOutputs, batch: Batch, cfg):
    plan: LogitPlan = student.head.plan
    kd_mask, every = None, False
    if plan.kind is not None:
        kd_mask = _kd_positions(batch, cfg)
        if kd_mask is None:
            kd_mask, every = torch.ones_like(batch.position_labels, dtype=torch.bool), True
    extra = {"all_positions": True} if every else {}  # soft targets at every logit position: the sweep looks no positions up
    result = student.head(
        student.head_input,
        teacher.head_input if plan.kind else None,
        teacher.head if plan.kind else None,
        labels=batch.position_labels if plan.ce_name else None,
        kd_mask=kd_mask,
        teacher_transform=teacher.head_transform if plan.kind else None,
        **extra,
    )
    terms = {}
    if plan.kd_name:
        terms[plan.kd_name] = result.kd
    if plan.ce_name:
        terms[plan.ce_name] = result.ce
    return result.loss, terms


def select_logit_positions(batch: Batch, where: Optional[str]) -> Batch:
    """Fill `logit_positions`/`position_labels` for "tokens" (non-padding) or "masked" positions."""
    if where is None:
        return batch
    flat_labels = batch.labels.reshape(-1)
    known = batch.token_positions if where == "tokens" else batch.masked_positions  # from the host, when the data source gave them
    if known is not None:
        positions = known
    elif where == "tokens":
        positions = batch.attention_mask.reshape(-1).nonzero(as_tuple=True)[0]
    else:
        positions = (flat_labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    batch.logit_positions = positions
    batch.position_labels = flat_labels[positions]
    return batch


def needs_of(weights: dict[str, float], ctx: LossContext) -> tuple[Needs, Needs]:
    """(teacher needs, student needs): the union over the active losses."""
    teacher, student = Needs(), Needs()
    for spec, _ in active_losses(weights).values():
        teacher = teacher.union(spec.teacher_needs(ctx))
        student = student.union(spec.student_needs(ctx))
    return teacher, student


def check_losses(weights: dict[str, float], ctx: LossContext) -> list[str]:
    """Problems of the active losses with these models (empty when all fit)."""
    problems = [spec.check(ctx) for spec, _ in active_losses(weights).values()]
    return [p for p in problems if p]
