"""Held-out causal-LM metrics of a student, its teacher and other models on a prepared causal split.

At every real next-token position (each sequence's tokens but its last, and with document attention not a document's
last; never padding), as training sees them (the collator it is given, `CausalLMCollator`: with document attention each
model's positions and attention restart at every document, distill/data/documents.py): each model's cross-entropy (perplexity = exp of its mean), next-token accuracy and, with a
teacher, top-1 agreement with the teacher and the per-token KL(teacher || student) at temperature 1.

Each model runs its transformer once per batch; vocabulary logits are then computed a chunk of positions at a
time for all models together (about 2^26 logits per model per chunk, `chunk_positions` to choose), so no
(tokens x vocabulary) tensor of a batch is ever alive whole. Head rows past the tokenizer's vocabulary (the
padding many checkpoints carry) are dropped, as in training: every distribution is over the real vocabulary.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from distill.data.documents import batch_documents
from distill.models.build import apply_mlm_head, model_forward
from distill.objective.chunked_logits import CHUNK_ELEMENTS
from distill.objective.losses import Batch, select_logit_positions

TEACHER = "teacher"


def unigram_baseline(label_counts: np.ndarray, tokenizer=None, loss_key: str = "loss") -> dict:
    """Context-free baseline of label counts (next tokens, or masked tokens with loss_key="mlm_loss"): always
    predicting the most frequent (its accuracy), and predicting their own frequencies (its loss: their entropy)."""
    total = int(label_counts.sum())
    if total == 0:
        return {"token_id": None, "token": None, "accuracy": 0.0, loss_key: 0.0, "perplexity": 1.0}
    top = int(np.argmax(label_counts))
    p = label_counts[label_counts > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    token = tokenizer.convert_ids_to_tokens(top) if tokenizer is not None else None
    return {
        "token_id": top,
        "token": token,
        "accuracy": float(label_counts[top]) / total,
        loss_key: entropy,
        "perplexity": float(np.exp(entropy)),
    }


@torch.no_grad()
def evaluate_causal(
    models: dict,
    paths: dict[str, str],
    sequences,
    n: int,
    vocab_size: int,
    collator,
    batch_size: int,
    device: torch.device,
    name: str,
    tokenizer=None,
    chunk_positions: Optional[int] = None,
) -> dict:
    """Metrics of `models` (label -> causal LM; the teacher under "teacher") on the first `n` of `sequences`, batched by
    `collator` (distill/data/masking.py CausalLMCollator: padding, labels, and the documents when it keeps them apart)."""
    order = np.argsort(sequences.lengths[:n], kind="stable")  # similar lengths together: less padding
    chunk = chunk_positions or max(1, CHUNK_ELEMENTS // vocab_size)
    has_teacher = TEACHER in models
    totals = {label: {"loss_sum": 0.0, "correct": 0, "agree": 0, "kl_sum": 0.0} for label in models}
    label_counts = np.zeros(vocab_size, dtype=np.int64)
    positions_seen = 0
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        raw = collator(sequences.rows(rows), rows)
        batch = select_logit_positions(
            Batch(
                raw["input_ids"].to(device),
                raw["attention_mask"].to(device),
                raw["labels"].to(device),
                documents=batch_documents(raw, device),
            ),
            "masked",
        )
        labels = batch.position_labels
        hidden = {}
        for label, model in models.items():
            h = model_forward(model, batch.input_ids, batch.attention_mask, None, documents=batch.documents).hidden
            hidden[label] = h.reshape(-1, h.shape[-1]).index_select(0, batch.logit_positions)
        for c in range(0, len(labels), chunk):
            y = labels[c : c + chunk]
            log_p = {
                label: torch.log_softmax(apply_mlm_head(model, hidden[label][c : c + chunk]).float()[:, :vocab_size], dim=-1)
                for label, model in models.items()
            }
            predictions = {label: lp.argmax(-1) for label, lp in log_p.items()}
            for label, lp in log_p.items():
                t = totals[label]
                t["loss_sum"] -= float(lp.gather(1, y[:, None]).double().sum())
                t["correct"] += int((predictions[label] == y).sum())
                if has_teacher:
                    teacher = log_p[TEACHER]
                    t["kl_sum"] += float((teacher.exp() * (teacher - lp)).sum(-1).double().sum())
                    t["agree"] += int((predictions[label] == predictions[TEACHER]).sum())
        label_counts += np.bincount(labels.cpu().numpy(), minlength=vocab_size)[:vocab_size]
        positions_seen += len(labels)

    baseline = unigram_baseline(label_counts, tokenizer)
    result = {
        "task": "causal_lm",
        "split": None,
        "sequences": int(n),
        "tokens": positions_seen,
        "vocab_size": vocab_size,
        "student": name,
        "baseline": baseline,
        "models": {},
    }
    count = max(positions_seen, 1)
    for label, t in totals.items():
        loss = t["loss_sum"] / count
        row = {
            "path": paths[label],
            "loss": loss,
            "perplexity": float(np.exp(min(loss, 50.0))),
            "accuracy": t["correct"] / count,
            "parameters": sum(p.numel() for p in models[label].parameters()),
        }
        if has_teacher:
            row["teacher_agreement"] = t["agree"] / count
            row["kl_from_teacher"] = t["kl_sum"] / count
        result["models"][label] = row
    if has_teacher:
        student, teacher = result["models"][name], result["models"][TEACHER]
        result["top1_agreement"] = student["teacher_agreement"]
        result["kl_from_teacher"] = student["kl_from_teacher"]
        result["perplexity_ratio"] = student["perplexity"] / teacher["perplexity"]
    return result


def render_causal_table(result: dict) -> str:
    """The causal evaluation as a fixed-width table (teacher, models, the unigram baseline), then the comparison in words."""
    models, baseline = result["models"], result.get("baseline")
    has_teacher = TEACHER in models
    base_name = f"most frequent token {baseline['token']!r}" if baseline and baseline.get("token") else "most frequent token"
    width = max([len(n) for n in models] + ([len(base_name)] if baseline else []) + [5])

    def line(name, params, loss, ppl, acc, agree, kl):
        return f"{name:<{width}} {params:>8} {loss:>9} {ppl:>10} {acc:>9} {agree:>8} {kl:>10}"

    lines = [line("model", "params", "ce loss", "ppl", "next acc", "agree", "KL(t||s)")]
    for label, m in models.items():
        agree = f"{m['teacher_agreement']:.1%}" if has_teacher and label != TEACHER else "-"
        kl = f"{m['kl_from_teacher']:.4f}" if has_teacher and label != TEACHER else "-"
        lines.append(
            line(label, f"{m['parameters'] / 1e6:.2f}M", f"{m['loss']:.4f}", f"{m['perplexity']:.2f}", f"{m['accuracy']:.2%}", agree, kl)
        )
    if baseline:
        lines.append(
            line(base_name, "-", f"{baseline['loss']:.4f}", f"{baseline['perplexity']:.2f}", f"{baseline['accuracy']:.2%}", "-", "-")
        )
    if has_teacher:
        student = result["student"]
        lines.append(
            f"{student}: perplexity {models[student]['perplexity']:.2f} vs the teacher's {models[TEACHER]['perplexity']:.2f} "
            f"({result['perplexity_ratio']:.2f}x); top-1 agreement {result['top1_agreement']:.2%}; "
            f"KL(teacher||student) {result['kl_from_teacher']:.4f} nats per token"
        )
    lines.append(
        f"{result['sequences']} sequences of split {result['split']!r}, {result['tokens']} next-token positions, "
        f"vocabulary {result['vocab_size']}"
    )
    return "\n".join(lines)
