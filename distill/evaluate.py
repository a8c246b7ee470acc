"""Held-out masked-LM evaluation of a student (and its teacher) on a prepared split.

Every model sees the same masked sequences (uniform 15% masking, 80/10/10, fixed seed), so the
numbers are comparable across models and runs: masked-LM loss, perplexity (exp of the loss),
masked-token accuracy and, with a teacher, top-1 agreement of student and teacher at masked positions.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from data_prep.manifest import check_tokenizer_matches, load_manifest, tokenizer_identity
from distill.data import TokenSequences
from distill.losses import IGNORE_INDEX, Batch, select_logit_positions
from distill.masking import MaskingCollator, MaskingPolicy
from distill.models import ModelError, mlm_forward

EVAL_SEED = 1234


def load_masked_lm(path: str, device: torch.device):
    """A local masked LM and its tokenizer, for evaluation."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    if not os.path.isdir(path):
        raise ModelError(f"model {path!r} is not a local directory; pass a directory written by distill-export or save_pretrained")
    try:
        model = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path!r} could not be loaded as a masked LM with its tokenizer ({first})") from None
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def evaluate(model_dir: str, data_dir: str, teacher_dir: Optional[str] = None, split: str = "validation",
             max_sequences: Optional[int] = None, batch_size: int = 32, device: Optional[str] = None) -> dict:
    """Masked-LM metrics of the model (and teacher) on `split`; returns a JSON-able dict."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    manifest = load_manifest(data_dir)
    models = {"student": load_masked_lm(model_dir, dev)}
    if teacher_dir:
        models["teacher"] = load_masked_lm(teacher_dir, dev)
    for name, (_, tokenizer) in models.items():
        check_tokenizer_matches(manifest, tokenizer_identity(tokenizer, model_dir if name == "student" else teacher_dir), name)
    tokenizer = models["student"][1]
    sequences = TokenSequences(data_dir, split, manifest)
    n = len(sequences) if max_sequences is None else min(max_sequences, len(sequences))
    vocab = max(m.config.vocab_size for m, _ in models.values())
    policy = MaskingPolicy(mask_id=tokenizer.mask_token_id, pad_id=tokenizer.pad_token_id, vocab_size=vocab, special_ids=manifest.tokenizer.all_special_ids)
    collator = MaskingCollator(policy, EVAL_SEED, pad_to_multiple_of=8)
    order = np.argsort(sequences.lengths[:n], kind="stable")  # similar lengths together: less padding

    totals = {name: {"loss_sum": 0.0, "correct": 0} for name in models}
    agree = 0
    masked = 0
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        raw = collator(sequences.rows(rows), rows)
        batch = select_logit_positions(Batch(raw["input_ids"].to(dev), raw["attention_mask"].to(dev), raw["labels"].to(dev)), "masked")
        labels = batch.position_labels
        predictions = {}
        for name, (model, _) in models.items():
            logits = mlm_forward(model, batch.input_ids, batch.attention_mask, batch.logit_positions).logits.float()
            totals[name]["loss_sum"] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            predictions[name] = logits.argmax(-1)
            totals[name]["correct"] += int((predictions[name] == labels).sum())
        if "teacher" in predictions:
            agree += int((predictions["teacher"] == predictions["student"]).sum())
        masked += int((labels != IGNORE_INDEX).sum())

    result = {"split": split, "sequences": int(n), "masked_tokens": masked, "models": {}}
    for name, t in totals.items():
        loss = t["loss_sum"] / max(masked, 1)
        result["models"][name] = {
            "path": model_dir if name == "student" else teacher_dir,
            "mlm_loss": loss,
            "perplexity": float(np.exp(min(loss, 50.0))),
            "accuracy": t["correct"] / max(masked, 1),
            "parameters": sum(p.numel() for p in models[name][0].parameters()),
        }
    if teacher_dir:
        result["top1_agreement"] = agree / max(masked, 1)
        result["accuracy_retained"] = result["models"]["student"]["accuracy"] / max(result["models"]["teacher"]["accuracy"], 1e-12)
    return result


def render_table(result: dict) -> str:
    """The evaluation as a fixed-width text table."""
    lines = [f"{'model':<8} {'params':>10} {'mlm loss':>9} {'ppl':>9} {'mask acc':>9}"]
    for name, m in result["models"].items():
        lines.append(f"{name:<8} {m['parameters'] / 1e6:>9.2f}M {m['mlm_loss']:>9.4f} {m['perplexity']:>9.2f} {m['accuracy']:>9.2%}")
    if "top1_agreement" in result:
        lines.append(f"top-1 agreement student/teacher: {result['top1_agreement']:.2%}; accuracy retained: {result['accuracy_retained']:.1%}")
    lines.append(f"{result['sequences']} sequences of split {result['split']!r}, {result['masked_tokens']} masked tokens")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
