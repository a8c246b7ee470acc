"""Logit losses against a sparse view of the teacher (a `distill-cache` cache), chunk by chunk over positions.

`SparseTargets` per position: `indices` (P, k) token ids and `values` (P, k) the teacher's log-probabilities there at
temperature T, plus for top-k `tail` (P,) the teacher's mass outside them.

- top-k: the distributions are compared over k + 1 buckets, the cached ids and one tail bucket (everything else): the
  student's bucket log-probabilities are its log-softmax gathered at the ids and the logsumexp of the rest. With k = the
  vocabulary (tail 0) these are exactly the full forward KL / reverse KL / JSD. The teacher's stored buckets are
  renormalised to sum to 1 (16-bit values and tail are rounded: 1 +- ~1e-4, which made the logged KL of a student near
  the teacher negative), so each position's divergence is that of two distributions, >= 0.
- sampled: the k ids are n draws x ~ P_T (weight 1/n each); the divergences are importance-weighted estimates whose
  expectations (values and gradients) are the full ones: KL(P_T||P_S) = E_x[log p - log q], KL(P_S||P_T) =
  E_x[(q/p)(log q - log p)], JSD_beta = E_x[beta (log p - log m) + (1 - beta)(q/p)(log q - log m)].

All at temperature T, times T^2, averaged over the positions that count, optionally fused with the student's causal-LM
cross-entropy, exactly as `distill.objective.chunked_logits.chunked_logit_loss` (same options, same `LogitLosses` result). The
student's logits exist one chunk at a time (positions x vocabulary); each chunk's gradient is computed in the forward
sweep by autograd on that chunk alone, so backward only scales stored gradients. The default chunk is half the dense
sweep's, as this sweep keeps about twice as many (chunk x vocabulary) buffers alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from distill.objective.chunked_logits import (
    CHUNK_ELEMENTS,
    IGNORE_INDEX,
    KINDS,
    LogitLosses,
    acc_dtype,
    check_head,
    position_weights,
    resolve_vocab,
    weight_bias,
)


@dataclass
class SparseTargets:
    """The teacher's side of a micro batch from a cache, at the batch's logit positions."""

    indices: torch.Tensor  # (P, k) int64
    values: torch.Tensor  # (P, k) teacher log-probabilities at T (fp32)
    tail: Optional[torch.Tensor]  # (P,) teacher mass outside `indices` (top-k); None for sampled
    mode: str  # "topk" | "sampled"
    temperature: float


def sparse_divergence(
    z: torch.Tensor,
    idx: torch.Tensor,
    tv: torch.Tensor,
    tail: Optional[torch.Tensor],
    mode: str,
    kind: str,
    temperature: float,
    beta: float,
) -> torch.Tensor:
    """Per-position divergence (not yet times T^2) of the student's logits z (c, V) from the sparse teacher (differentiable)."""
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    s_all = F.log_softmax(z / temperature, dim=-1)
    ls = s_all.gather(1, idx)
    if mode == "sampled":
        lp = tv
        if kind == "forward_kl":
            per = lp - ls
        elif kind == "reverse_kl":
            per = (ls - lp).exp() * (ls - lp)
        else:
            lm = torch.logaddexp(lp + math.log(beta), ls + math.log1p(-beta))
            per = beta * (lp - lm) + (1 - beta) * (ls - lp).exp() * (ls - lm)
        return per.mean(-1)
    low = torch.finfo(s_all.dtype).min
    rest = torch.logsumexp(s_all.scatter(1, idx, low), dim=-1, keepdim=True)  # student's log-mass outside the ids
    ls = torch.cat([ls, rest], dim=1)
    # ids covering the whole vocabulary leave nothing outside them: a teacher tail there is rounding (1 - sum of k
    # probabilities, ~1e-7), which against the student's empty bucket (log-mass ~ the dtype's min) would blow up
    p_tail = torch.where(rest <= low / 2, 0.0, tail[:, None].to(ls.dtype))
    lp = torch.cat([tv, torch.log(p_tail.clamp(min=torch.finfo(ls.dtype).tiny))], dim=1)
    # the stored buckets are rounded (16-bit values and tail): they sum to 1 +- ~1e-4, and against a student near the
    # teacher an unnormalised p gives a divergence of that size and either sign; renormalised, p is a distribution again
    p = torch.cat([tv.exp(), p_tail], dim=1)
    total = p.sum(-1, keepdim=True)
    p, lp = p / total, lp - total.log()  # an empty tail bucket stays exactly 0
    if kind == "forward_kl":
        per = (p * (lp - ls)).sum(-1)
    else:
        q = ls.exp()
        if kind == "reverse_kl":
            per = (q * (ls - lp)).sum(-1)
        else:
            lm = torch.logaddexp(lp + math.log(beta), ls + math.log1p(-beta))
            per = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (ls - lm)).sum(-1)
    # two distributions: >= 0 up to the last bits of the sum (~1e-9 below 0 where the student equals the teacher)
    return per.clamp(min=0.0)


def _sweep(s_hidden, s_weight, s_bias, targets: SparseTargets, labels, kd_row, ce_row, o, want_grads: bool):
    acc = acc_dtype(s_hidden.dtype)
    vocab, temperature = o["vocab"], o["temperature"]
    sw, sb = s_weight[:vocab], (s_bias[:vocab] if s_bias is not None else None)
    kd_sum = torch.zeros((), dtype=acc, device=s_hidden.device)
    ce_sum = torch.zeros((), dtype=acc, device=s_hidden.device)
    want_h, want_w, want_b = o["grads"] if want_grads else (False, False, False)
    grad_h = torch.zeros_like(s_hidden) if want_h else None
    grad_w = torch.zeros(s_weight.shape, dtype=acc, device=s_weight.device) if want_w else None
    grad_b = torch.zeros(s_bias.shape, dtype=acc, device=s_bias.device) if want_b else None
    for start in range(0, s_hidden.shape[0], o["chunk"]):
        rows = slice(start, start + o["chunk"])
        h = s_hidden[rows]
        with torch.enable_grad():
            raw = F.linear(h.detach(), sw.detach(), sb.detach() if sb is not None else None).to(acc).requires_grad_(want_grads)
            z = o["transform"](raw) if o["transform"] is not None else raw  # the student's logits as its forward makes them
            total = torch.zeros((), dtype=acc, device=z.device)
            if o["kind"] is not None:
                div = sparse_divergence(
                    z,
                    targets.indices[rows],
                    targets.values[rows].to(acc),
                    targets.tail[rows] if targets.tail is not None else None,
                    targets.mode,
                    o["kind"],
                    temperature,
                    o["beta"],
                )
                kd = (kd_row[rows] * div).sum() * temperature**2
                kd_sum += kd.detach()
                total = total + o["kd_weight"] * kd
            if o["with_ce"]:
                target = labels[rows].clamp(min=0)[:, None]
                ce = -(ce_row[rows] * F.log_softmax(z, -1).gather(1, target).squeeze(1)).sum()
                ce_sum += ce.detach()
                total = total + o["ce_weight"] * ce
            if not want_grads or not total.requires_grad:
                continue
            (dlogits,) = torch.autograd.grad(total, raw)
        d = dlogits.to(sw.dtype)
        if want_h:
            grad_h[rows] = d @ sw
        if want_w:
            grad_w[:vocab].addmm_(dlogits.t(), h.to(acc))
        if want_b:
            grad_b[:vocab] += dlogits.sum(0)
        del d, dlogits, z, raw
    grads = None
    if want_grads:
        grads = (grad_h, grad_w.to(s_weight.dtype) if want_w else None, grad_b.to(s_bias.dtype) if want_b else None)
    return kd_sum, ce_sum, grads


class _SparseLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, targets, labels, kd_row, ce_row, o):
        kd, ce, grads = _sweep(s_hidden, s_weight, s_bias, targets, labels, kd_row, ce_row, o, any(o["grads"]))
        ctx.grads = grads
        ctx.mark_non_differentiable(kd, ce)
        return o["kd_weight"] * kd + o["ce_weight"] * ce, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("backward ran twice through a sparse logit loss (its gradients are computed once, in forward)")
        return tuple(None if g is None else g.mul_(grad_loss) for g in grads) + (None,) * 5


def sparse_logit_loss(
    student_hidden: torch.Tensor,
    student_head,
    targets: SparseTargets,
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
    student_transform=None,
    **_unused,
) -> LogitLosses:
    """`chunked_logit_loss` with the teacher's side from a cache (`targets`, one row per position of `student_hidden`);
    `student_transform` (a distill.model_outputs.LogitTransform) is what the student's forward does after its projection."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind is not None and abs(targets.temperature - temperature) > 1e-9:
        raise ValueError(f"the cache holds the teacher at T={targets.temperature:g}, the loss asks T={temperature:g}")
    width = student_hidden.shape[-1]
    s_hidden = student_hidden.reshape(-1, width)
    s_weight, s_bias = weight_bias(student_head)
    check_head("student", s_weight, s_bias, student_hidden)
    vocab = resolve_vocab(vocab_size, s_weight)
    n = s_hidden.shape[0]
    if targets.indices.shape[0] != n:
        raise ValueError(f"the cache gives {targets.indices.shape[0]} positions, the student {n}")
    with_ce = labels is not None
    kd_mask, ce_mask, kd_row, ce_row, labels_flat = position_weights(s_hidden, kind, labels, kd_mask, ignore_index)
    index = (kd_mask | ce_mask).nonzero().squeeze(1)
    picked = SparseTargets(
        targets.indices.index_select(0, index),
        targets.values.index_select(0, index),
        targets.tail.index_select(0, index) if targets.tail is not None else None,
        targets.mode,
        targets.temperature,
    )
    s_hidden = s_hidden.index_select(0, index)
    labels_flat, kd_row, ce_row = labels_flat[index], kd_row[index], ce_row[index]
    grad_on = torch.is_grad_enabled()
    o = {
        "kind": kind,
        "temperature": float(temperature),
        "beta": float(beta),
        "vocab": vocab,
        "kd_weight": float(kd_weight),
        "ce_weight": float(ce_weight),
        "with_ce": with_ce,
        "transform": student_transform if student_transform is not None and not student_transform.identity else None,
        "chunk": int(chunk_size or max(1, CHUNK_ELEMENTS // (2 * vocab))),
        "grads": (
            grad_on and s_hidden.requires_grad,
            grad_on and s_weight.requires_grad,
            grad_on and s_bias is not None and s_bias.requires_grad,
        ),
    }
    loss, kd, ce = _SparseLogitLoss.apply(s_hidden, s_weight, s_bias, picked, labels_flat, kd_row, ce_row, o)
    return LogitLosses(loss, kd if kind is not None else None, ce if with_ce else None)
