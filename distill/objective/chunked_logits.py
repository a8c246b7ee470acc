"""Logit losses whose memory is flat in the vocabulary size (for decoder LLMs with 128k-256k vocabularies).

`chunked_logit_loss` takes final hidden states and the LM-head weights (and biases) of student and teacher,
never logits: it walks over the positions `chunk_size` at a time, so only one chunk's (chunk x vocab)
teacher and student logits exist at once, never a whole (tokens x vocab) tensor.

Losses (per position, then averaged over the positions that count, times T^2 as in Hinton et al.):

- ``forward_kl``: KL(P_T || P_S) at temperature T, today's ``ce`` loss of `distill.objective.losses`.
- ``reverse_kl``: KL(P_S || P_T).
- ``jsd``: generalized Jensen-Shannon divergence, the convention of TRL's `GKDTrainer.generalized_jsd_loss`
  and Liger's `LigerFusedLinearJSD` (P_T teacher, P_S student, both at temperature T)::

      M = beta * P_T + (1 - beta) * P_S
      JSD_beta = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)

  As in both, ``beta == 0`` *is* forward KL and ``beta == 1`` *is* reverse KL (the formula itself tends to 0
  at both ends; JSD_beta / beta -> KL(P_T || P_S) as beta -> 0 and JSD_beta / (1 - beta) -> KL(P_S || P_T) as
  beta -> 1). Unlike TRL and Liger we multiply by T^2, like the two KLs, so every kind is on today's scale
  (at T = 1 the values are theirs).
- Causal-LM cross-entropy of the student's logits (at T = 1) against ``labels`` (``ignore_index`` skipped),
  fused into the same pass because the chunk's student logits are already there.

Returned: ``LogitLosses(loss, kd, ce)``: ``loss = kd_weight * kd + ce_weight * ce`` is the differentiable
total, ``kd`` and ``ce`` are detached values for logging (None when not computed). Means are over the positions
that count (0, not NaN, when none does, so an all-ignored micro batch does not stop a run).

``vocab_size``: only the first ``vocab_size`` rows of both heads count (checkpoints of one tokenizer pad their
embedding matrices differently, e.g. 152064 vs 151936 rows); the padded rows get zero gradient.

Gradients: the student's gradients (hidden states, head weight, head bias) are computed in the forward sweep,
chunk by chunk, the head's summed in fp32 and stored in the parameters' dtypes; backward only scales them by the
incoming gradient (the trick of Liger's fused linear losses: the same matmul count as the direct computation; so
backward runs once per forward). ``grad_in_forward=False`` instead recomputes each chunk's logits in backward
(nothing stored, two more (tokens x hidden x vocab) matmuls; `bench/kd_loss_memory.py` measures both). The teacher
never gets gradients. In fp32 and fp64 the results equal the direct computation (`naive_logit_loss`) to rounding;
in bf16 the matmuls run in bf16 and everything after them in fp32 (each chunk's head-gradient product is rounded
to bf16 before the fp32 sum: tested as accurate as the direct bf16 computation against an fp64 truth).

DeepSpeed ZeRO-3: the student's LM-head weight is a partitioned parameter, gathered only while a module whose
forward uses it runs; read anywhere else (e.g. by a loss after ``engine(...)`` returned) it is an empty tensor, and
`chunked_logit_loss` then raises. Use `ChunkedLogitLoss` (distill/objective/head_loss.py): a parameter-less module that holds a reference to the
head and registers its weight and bias as external parameters of itself
(`deepspeed.zero.register_external_parameter`), so ZeRO-3 gathers them for its own forward and releases them
after (its backward needs nothing gathered, the gradients are ready; with grad_in_forward=False ZeRO-3's backward
hook gathers the head again for the recomputation). Make it a submodule of the module
DeepSpeed wraps (so the engine hooks it) and call it either from that module's forward, or after the engine's
forward as ``engine.module.logit_loss(hidden, ...)`` (both tested at ZeRO-3, the second with recomputation;
without the registration the second fails)::

    class Student(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.logit_loss = ChunkedLogitLoss(model.lm_head, "jsd", beta=0.5, temperature=2.0, vocab_size=151936)

        def forward(self, input_ids, attention_mask, teacher_hidden, teacher_head, labels):
            hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.logit_loss(hidden, teacher_hidden, teacher_head, labels=labels)

The teacher head is passed to forward (a frozen teacher outside the engine; a ZeRO-3-partitioned teacher must be
gathered by its caller, e.g. `deepspeed.zero.GatheredParameters`, no gradients needed). ZeRO-0/1/2 need nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from distill.model_outputs import LogitTransform

IGNORE_INDEX = -100
KINDS = ("forward_kl", "reverse_kl", "jsd")
# default chunk: about 2^26 fp32 logits' bytes per (chunk x vocab) buffer (256 MiB; the sweep keeps ~3.5 such buffers
# alive at once; fp32 models work in fp64, so half the positions), whatever the vocabulary: 512 positions at 128k, 256 at 256k. Smaller chunks save memory but pay
# the per-chunk cost (reading both heads again, adding to the fp32 head gradient) more often: on a CPU, 128 and 64
# positions per chunk cost 1.3x and 1.8x the direct computation's time at 128k, 256 about 1.0x, 512 0.9x.
CHUNK_ELEMENTS = 1 << 26
# bf16 head gradients: each chunk's product is added to the fp32 sum this many elements at a time
GRAD_BLOCK_ELEMENTS = 1 << 24

Head = Union[torch.Tensor, tuple, nn.Module]  # a weight (rows, H), a (weight, bias) pair, or a module with .weight / .bias


class LogitLosses(NamedTuple):
    loss: torch.Tensor  # kd_weight * kd + ce_weight * ce (differentiable)
    kd: Optional[torch.Tensor]  # the divergence, detached (None without a teacher loss)
    ce: Optional[torch.Tensor]  # the student's cross-entropy, detached (None without labels)


@dataclass(frozen=True)
class _Options:
    kind: Optional[str]
    temperature: float
    beta: float
    chunk_size: int
    vocab_size: int
    kd_weight: float
    ce_weight: float
    with_ce: bool
    grads: tuple  # which of (student hidden, student weight, student bias) need a gradient
    s_transform: Optional[LogitTransform] = None  # what the student's forward does after its projection (None: nothing)
    t_transform: Optional[LogitTransform] = None  # the teacher's


def weight_bias(head: Head) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(head, torch.Tensor):
        return head, None
    if isinstance(head, (tuple, list)):
        weight, bias = head
        return weight, bias
    return head.weight, getattr(head, "bias", None)


def check_head(name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], hidden: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"the {name} head weight has shape {tuple(weight.shape)}, expected (vocab rows, {hidden.shape[-1]}); an empty weight is "
            f"what DeepSpeed ZeRO-3 shows outside the forward of a module that uses it: use distill.objective.head_loss.ChunkedLogitLoss, "
            f"a submodule of the DeepSpeed-wrapped model that gathers the head for its forward"
        )
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"the {name} head weight has shape {tuple(weight.shape)} but the {name} hidden states have width {hidden.shape[-1]}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"the {name} hidden states are {hidden.dtype} but its head weight is {weight.dtype}; cast one of them")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"the {name} head bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")


def resolve_vocab(vocab_size: Optional[int], *weights: torch.Tensor) -> int:
    rows = sorted({w.shape[0] for w in weights})
    if vocab_size is None:
        if len(rows) > 1:
            raise ValueError(
                f"the heads have {' and '.join(map(str, rows))} rows (padded embedding matrices?); pass vocab_size, the tokenizer's size"
            )
        return rows[0]
    if not 0 < vocab_size <= rows[0]:
        raise ValueError(f"vocab_size={vocab_size} must be in 1..{rows[0]} (the smallest head's rows)")
    return vocab_size


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums and gradients: fp32 for bf16/fp16/fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """A chunk's softmax and divergence: fp32 for bf16/fp16 logits, fp64 for fp32 (and fp64) ones. In fp32 the
    log-softmax's normaliser (about log(vocab), so rounded by ~5e-7) shifts each row's log-probabilities by an error
    that does not cancel in the divergence: ~2e-5 relative at T = 1 where student and teacher are close; in fp64 the
    fp32 loss is within 1e-6 of an fp64 reference (tests/unit/test_logit_losses.py)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def default_chunk(vocab: int, dtype: torch.dtype) -> int:
    """Positions per chunk: about CHUNK_ELEMENTS fp32 logits' bytes per (chunk x vocab) buffer of the work dtype."""
    return max(1, CHUNK_ELEMENTS * 4 // (torch.empty((), dtype=work_dtype(dtype)).element_size() * vocab))


def _log_probs(z: torch.Tensor, temperature: float, work: torch.dtype) -> torch.Tensor:
    """log_softmax(z / T) in `work` precision; may overwrite `z` when it is in `work` already."""
    if temperature == 1.0:
        return F.log_softmax(z, -1, dtype=work)
    return F.log_softmax(z.to(work).div_(temperature), -1)


def _logits(h: torch.Tensor, weight, bias, transform: Optional[LogitTransform], work: torch.dtype) -> torch.Tensor:
    """A chunk's vocabulary logits as the model makes them: the projection in the model's dtype, then its output transform
    (if any) on a fresh `work` copy."""
    z = F.linear(h, weight, bias)
    return transform.apply_(z.to(work)) if transform is not None and not transform.identity else z


def _divergence(s: torch.Tensor, t: torch.Tensor, kind: str, beta: float, want_grad: bool):
    """Per-row divergence of tempered log-probabilities s (student) and t (teacher), and its gradient w.r.t. the
    student's tempered logits (None unless `want_grad`). Overwrites s and t.

    Each row's sum is a `.sum(-1)` of a product formed in place (no (rows x vocab) temporary): torch's summation keeps
    fp32 within about 1e-6 of an fp64 reference even where the divergence is small against its terms (a fused row-dot,
    `einsum`, was 3e-5 off at T = 1; tests/unit/test_logit_losses.py holds it)."""
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":  # sum p (t - s); d/dz = q - p
        p = t.exp()
        loss = t.sub_(s).mul_(p).sum(-1)
        return loss, (s.exp_().sub_(p) if want_grad else None)
    if kind == "reverse_kl":  # sum q (s - t); d/dz = q (s - t - KL) = q (s - t) - q KL
        q = s.exp()
        weighted = t.neg_().add_(s).mul_(q)
        loss = weighted.sum(-1)
        return loss, (weighted.sub_(q.mul_(loss[:, None])) if want_grad else None)
    # jsd: log M = logaddexp(t + log beta, s + log(1 - beta)); dJSD/ds = (1 - beta) q (s - log M), then through log_softmax
    p, q = t.exp(), s.exp()
    log_m = t + math.log(beta)
    torch.logaddexp(log_m, s + math.log1p(-beta), out=log_m)
    loss = beta * t.sub_(log_m).mul_(p).sum(-1)
    del p
    weighted = s.sub_(log_m).mul_(q)  # q (s - log M)
    del log_m
    loss += (1 - beta) * weighted.sum(-1)
    if not want_grad:
        return loss, None
    g = weighted.mul_(1 - beta)
    return loss, g.addcmul_(q, g.sum(-1, keepdim=True).neg_())


def _sweep(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, kd_row, ce_row, o: _Options, want_grads: bool):
    """One pass over the positions, `o.chunk_size` at a time: (kd, ce) sums weighted by kd_row / ce_row, and the
    student's gradients of kd_weight * kd + ce_weight * ce (None unless `want_grads`). Each chunk's logits go through
    the model's output transform (`o.s_transform`, `o.t_transform`) before the softmax, and the student's logit
    gradient back through it (a softcap's derivative 1 - (z / cap)^2 takes one more chunk buffer)."""
    acc, work = acc_dtype(s_hidden.dtype), work_dtype(s_hidden.dtype)
    vocab, temperature = o.vocab_size, o.temperature
    sw, sb = s_weight[:vocab], (s_bias[:vocab] if s_bias is not None else None)
    tw = t_weight[:vocab] if t_weight is not None else None
    tb = t_bias[:vocab] if t_bias is not None else None
    s_transform = o.s_transform if o.s_transform is not None and not o.s_transform.identity else None
    kd_sum = torch.zeros((), dtype=work, device=s_hidden.device)
    ce_sum = torch.zeros((), dtype=work, device=s_hidden.device)
    want_h, want_w, want_b = o.grads if want_grads else (False, False, False)
    grad_h = torch.zeros_like(s_hidden) if want_h else None
    grad_w = torch.zeros(s_weight.shape, dtype=acc, device=s_weight.device) if want_w else None
    grad_b = torch.zeros(s_bias.shape, dtype=acc, device=s_bias.device) if want_b else None
    for start in range(0, s_hidden.shape[0], o.chunk_size):
        rows = slice(start, start + o.chunk_size)
        h = s_hidden[rows]
        z = _logits(h, sw, sb, s_transform, work)  # the chunk's student logits, as its forward makes them
        dlogits = log_q1 = derivative = None
        if o.with_ce:  # -log softmax(z)[label] at T = 1; gradient softmax - onehot
            target = labels[rows].clamp(min=0)[:, None]  # ignored rows have ce_row 0
            log_q1 = F.log_softmax(z, -1, dtype=work)
            ce_sum -= (ce_row[rows] * log_q1.gather(1, target).squeeze(1)).sum()
            if want_grads and o.ce_weight != 0:
                coef = (ce_row[rows] * o.ce_weight).to(work)[:, None]
                dlogits = log_q1.exp().mul_(coef)
                dlogits.scatter_add_(1, target, -coef)
        if o.kind is not None:
            s = log_q1 if log_q1 is not None and temperature == 1.0 else _log_probs(z, temperature, work)
            log_q1 = None
            if s_transform is not None and s_transform.softcap is not None and want_grads:
                derivative = s_transform.derivative_(z, divided_by=temperature)
            z = None  # free before the teacher's logits exist
            t = _log_probs(_logits(t_hidden[rows], tw, tb, o.t_transform, work), temperature, work)
            div, grad = _divergence(s, t, o.kind, o.beta, want_grads and o.kd_weight != 0)
            kd_sum += (kd_row[rows] * div).sum() * temperature**2
            if grad is not None:  # d(T^2 div)/d logits = T d div/dz
                coef = (kd_row[rows] * (o.kd_weight * temperature)).to(work)[:, None]
                dlogits = grad.mul_(coef) if dlogits is None else dlogits.addcmul_(grad, coef)
            del s, t, grad
        elif s_transform is not None and s_transform.softcap is not None and dlogits is not None:
            derivative = s_transform.derivative_(z)
        z = log_q1 = None
        if dlogits is None:
            continue
        if derivative is not None:  # back through the output transform
            dlogits.mul_(derivative)
            derivative = None
        elif s_transform is not None:
            dlogits.mul_(s_transform.scale)
        d = dlogits.to(sw.dtype)
        if want_h:
            grad_h[rows] = d @ sw
        if want_w:
            if d.dtype == acc:
                grad_w[:vocab].addmm_(d.t(), h)
            else:  # bf16 products, summed in fp32 a block of vocabulary rows at a time (bounded temporaries)
                block = max(1, GRAD_BLOCK_ELEMENTS // h.shape[1])
                for v in range(0, vocab, block):
                    end = min(v + block, vocab)
                    grad_w[v:end] += d[:, v:end].t() @ h
        if want_b:
            grad_b[:vocab] += dlogits.sum(0)
        del d, dlogits
    grads = None
    if want_grads:
        grads = (grad_h, grad_w.to(s_weight.dtype) if want_w else None, grad_b.to(s_bias.dtype) if want_b else None)
    return kd_sum.to(acc), ce_sum.to(acc), grads


class _ChunkedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, kd_row, ce_row, o: _Options, grad_in_forward: bool):
        needs = any(o.grads)
        kd, ce, grads = _sweep(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, kd_row, ce_row, o, needs and grad_in_forward)
        ctx.o = o
        ctx.grads = grads  # gradients are intermediates, kept on ctx; backward consumes them
        if needs and not grad_in_forward:
            ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, kd_row, ce_row)
        ctx.recompute = needs and not grad_in_forward
        ctx.mark_non_differentiable(kd, ce)
        return o.kd_weight * kd + o.ce_weight * ce, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        if ctx.recompute:
            _, _, grads = _sweep(*ctx.saved_tensors, ctx.o, True)
        else:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(
                    "backward ran twice through a chunked logit loss whose gradients were computed in forward "
                    "(they are consumed by the first backward); use grad_in_forward=False to backpropagate more than once"
                )
        grads = tuple(None if g is None else g.mul_(grad_loss) for g in grads)
        return grads + (None,) * 8


def position_weights(
    hidden: torch.Tensor,
    kind: Optional[str],
    labels: Optional[torch.Tensor],
    kd_mask: Optional[torch.Tensor],
    ignore_index: int = IGNORE_INDEX,
):
    """Which of the (N, H) `hidden` positions count, and their weights: `kd_mask` (default: the labelled positions
    when `labels` are given, else all; none without a KD `kind`), `ce_mask` (the labelled ones), each position's
    share of its mean (`kd_row`, `ce_row`, in the accumulation dtype) and the flat labels (zeros without labels)."""
    n, device, acc = hidden.shape[0], hidden.device, acc_dtype(hidden.dtype)
    with_ce = labels is not None
    ce_mask = (labels.reshape(-1) != ignore_index) if with_ce else torch.zeros(n, dtype=torch.bool, device=device)
    if kd_mask is None:
        kd_mask = ce_mask if with_ce else torch.ones(n, dtype=torch.bool, device=device)
    kd_mask = kd_mask.reshape(-1).bool() & (kind is not None)
    if kd_mask.shape[0] != n or ce_mask.shape[0] != n:
        raise ValueError(f"labels and kd_mask need one entry per position ({n})")
    kd_row = kd_mask.to(acc) / kd_mask.sum().clamp(min=1)
    ce_row = ce_mask.to(acc) / ce_mask.sum().clamp(min=1)
    labels_flat = labels.reshape(-1).long() if with_ce else torch.zeros(n, dtype=torch.long, device=device)
    return kd_mask, ce_mask, kd_row, ce_row, labels_flat


def chunked_logit_loss(
    student_hidden: torch.Tensor,
    student_head: Head,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[Head] = None,
    kind: Optional[str] = "forward_kl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    labels: Optional[torch.Tensor] = None,
    kd_mask: Optional[torch.Tensor] = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    grad_in_forward: bool = True,
    check_labels: bool = True,
    all_positions: bool = False,
    student_transform: Optional[LogitTransform] = None,
    teacher_transform: Optional[LogitTransform] = None,
) -> LogitLosses:
    """KD loss (`kind` in KINDS, or None for the cross-entropy alone) and, with `labels`, the student's cross-entropy,
    from hidden states (..., H) and LM heads, `chunk_size` positions at a time (default: about CHUNK_ELEMENTS logits
    per chunk). `labels` (...): the target token of each position, already shifted for a causal LM (as the
    collator's labels are), `ignore_index` where there is none. Positions that count: for KD `kd_mask` (default: the
    labelled positions when `labels` are given, else all), for CE the labelled ones; the others are skipped.
    `check_labels=False` skips the range check of the labels (two host reads: the trainer's labels are dataset ids the
    embedding lookup already bounds). `all_positions=True` says that every position counts (kd_mask all true, as the
    trainer's soft targets at every logit position): the positions are then not looked up (no nonzero, no host sync).
    `student_transform` / `teacher_transform`: what each model's forward does to its logits after the projection
    (distill.model_outputs.LogitTransform: a scale, a final softcap), applied chunk by chunk. See the module docstring."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)} (or None for the cross-entropy alone)")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if kind is None and labels is None:
        raise ValueError("nothing to compute: kind=None (no KD loss) needs labels for the cross-entropy")
    width = student_hidden.shape[-1]
    s_hidden = student_hidden.reshape(-1, width)
    s_weight, s_bias = weight_bias(student_head)
    check_head("student", s_weight, s_bias, student_hidden)
    t_hidden = t_weight = t_bias = None
    if kind is not None:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError(f"kind {kind!r} needs the teacher's hidden states and head")
        t_weight, t_bias = weight_bias(teacher_head)
        check_head("teacher", t_weight, t_bias, teacher_hidden)
        t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        t_weight, t_bias = t_weight.detach(), (t_bias.detach() if t_bias is not None else None)
        if t_hidden.shape[0] != s_hidden.shape[0]:
            raise ValueError(f"teacher hidden states have {t_hidden.shape[0]} positions, the student's {s_hidden.shape[0]}")
    vocab = resolve_vocab(vocab_size, s_weight, *([t_weight] if t_weight is not None else []))

    with_ce = labels is not None
    kd_mask, ce_mask, kd_row, ce_row, labels_flat = position_weights(s_hidden, kind, labels, kd_mask, ignore_index)
    if with_ce and check_labels:
        picked = labels.reshape(-1)[ce_mask]
        if picked.numel() and (int(picked.min()) < 0 or int(picked.max()) >= vocab):
            raise ValueError(f"labels must be in 0..{vocab - 1} or ignore_index={ignore_index}")

    # positions that count: only these are projected to the vocabulary (one nonzero, the sweep's only host sync)
    if not (all_positions and kind is not None):
        index = (kd_mask | ce_mask).nonzero().squeeze(1)
        s_hidden = s_hidden.index_select(0, index)
        t_hidden = t_hidden.index_select(0, index) if t_hidden is not None else None
        labels_flat, kd_row, ce_row = labels_flat[index], kd_row[index], ce_row[index]

    if chunk_size is None:
        chunk_size = default_chunk(vocab, s_hidden.dtype)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    grads = (
        grad_on and s_hidden.requires_grad,
        grad_on and s_weight.requires_grad,
        grad_on and s_bias is not None and s_bias.requires_grad,
    )
    o = _Options(
        kind,
        float(temperature),
        float(beta),
        int(chunk_size),
        vocab,
        float(kd_weight),
        float(ce_weight),
        with_ce,
        grads,
        student_transform,
        teacher_transform if kind is not None else None,
    )
    loss, kd, ce = _ChunkedLogitLoss.apply(
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels_flat, kd_row, ce_row, o, grad_in_forward
    )
    return LogitLosses(loss, kd if kind is not None else None, ce if with_ce else None)


def naive_logit_loss(
    student_hidden: torch.Tensor,
    student_head: Head,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_head: Optional[Head] = None,
    kind: Optional[str] = "forward_kl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    vocab_size: Optional[int] = None,
    labels: Optional[torch.Tensor] = None,
    kd_mask: Optional[torch.Tensor] = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    student_transform: Optional[LogitTransform] = None,
    teacher_transform: Optional[LogitTransform] = None,
) -> LogitLosses:
    """The direct computation, for tests and the benchmark: full (tokens x vocab) logits of both models (through their
    output transforms), then the loss with PyTorch's own ops (F.kl_div, F.cross_entropy, the mixture as in TRL) and
    autograd for gradients."""
    s_weight, s_bias = weight_bias(student_head)
    width = student_hidden.shape[-1]
    s_hidden = student_hidden.reshape(-1, width)
    n = s_hidden.shape[0]
    acc = acc_dtype(s_hidden.dtype)
    weights = [s_weight]
    if kind is not None:
        t_weight, t_bias = weight_bias(teacher_head)
        weights.append(t_weight)
    vocab = resolve_vocab(vocab_size, *weights)
    s_logits = F.linear(s_hidden, s_weight[:vocab], s_bias[:vocab] if s_bias is not None else None).to(acc)
    if student_transform is not None:
        s_logits = student_transform(s_logits)
    labels = labels.reshape(-1) if labels is not None else None
    ce_mask = labels != ignore_index if labels is not None else None
    loss = torch.zeros((), dtype=acc, device=s_hidden.device)
    kd = ce = None
    if kind is not None:
        with torch.no_grad():
            t_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
            t_logits = F.linear(t_hidden, t_weight[:vocab], t_bias[:vocab] if t_bias is not None else None).to(acc)
            if teacher_transform is not None:
                t_logits = teacher_transform(t_logits)
        s = F.log_softmax(s_logits / temperature, dim=-1)
        t = F.log_softmax(t_logits / temperature, dim=-1)
        if kind == "forward_kl" or (kind == "jsd" and beta == 0):
            per_position = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
        elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
            per_position = F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
        else:
            mixture = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
            per_position = (
                beta * F.kl_div(mixture, t, reduction="none", log_target=True)
                + (1 - beta) * F.kl_div(mixture, s, reduction="none", log_target=True)
            ).sum(-1)
        if kd_mask is None:
            kd_mask = ce_mask if ce_mask is not None else torch.ones(n, dtype=torch.bool, device=s_hidden.device)
        kd_mask = kd_mask.reshape(-1).to(acc)
        kd = (per_position * kd_mask).sum() / kd_mask.sum().clamp(min=1) * temperature**2
        loss = loss + kd_weight * kd
    if labels is not None:
        ce = F.cross_entropy(s_logits, labels, ignore_index=ignore_index, reduction="sum") / ce_mask.sum().clamp(min=1)
        loss = loss + ce_weight * ce
    return LogitLosses(loss, kd.detach() if kd is not None else None, ce.detach() if ce is not None else None)
