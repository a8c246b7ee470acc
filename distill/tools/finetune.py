"""Downstream check: fine-tune an exported model for sentence classification and report accuracy.

    distill-finetune --model models/student --train sst2/train.tsv --holdout-fraction 0.1 --output runs/sst2-student

Input is a TSV of `sentence<TAB>label` rows (integer labels 0..K-1); a header line (`sentence<TAB>label`)
is recognised and skipped. Rows that are not `text<TAB>integer` are counted and skipped, and the count is
reported. The held-out set is either `--eval TSV` or the *last* `--holdout-fraction` of the training
rows (file order, no shuffling: the same rows for every model). The model directory is loaded with
`AutoModelForSequenceClassification.from_pretrained` (a fresh classification head on top of the exported
encoder: DistilBERT, BERT and the other families transformers knows).

Accuracy is counted directly: predictions equal to labels over held-out rows, next to the
majority-class baseline, as a table and JSON (`--json`, and `eval_results.json` in `--output`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from data_prep.manifest import write_json_atomically
from distill.config import OptimConfig
from kd_common.config import Bool, ConfigError, Float, Int, Str, add_arguments, from_arguments, section, setting
from kd_common.errors import UserError
from kd_common.hf_dirs import LOCAL_ONLY, refuse_remote_code
from kd_common.output_rule import (
    OutputError,
    check_no_overlap,
    check_replaceable,
    check_result_file,
    record_files,
    replace_when_complete,
    written_by,
)


class FinetuneError(UserError, ValueError):
    """Bad input to distill-finetune: one line for the user."""


@dataclass
class TsvData:
    sentences: list[str]
    labels: list[int]
    path: str
    header: bool = False
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)  # first few line numbers with the reason


def read_tsv(path: str) -> TsvData:
    """`sentence<TAB>label` rows; a header line is skipped; malformed rows are counted and skipped."""
    if not os.path.isfile(path):
        raise FinetuneError(f"TSV file {path!r} does not exist")
    data = TsvData([], [], path)
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.split("\t")
                if number == 1 and len(parts) == 2 and not _is_int(parts[1]):
                    data.header = True  # e.g. "sentence\tlabel"
                    continue
                reason = None
                if len(parts) != 2:
                    reason = f"{len(parts)} tab-separated fields, expected 2"
                elif not parts[0].strip():
                    reason = "empty sentence"
                elif not _is_int(parts[1]) or int(parts[1]) < 0:
                    reason = f"label {parts[1].strip()!r} is not an integer >= 0"
                if reason:
                    data.bad_rows += 1
                    if len(data.bad_examples) < 3:
                        data.bad_examples.append(f"line {number}: {reason}")
                    continue
                data.sentences.append(parts[0].strip())
                data.labels.append(int(parts[1]))
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"TSV file {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not data.sentences:
        detail = f"; {data.bad_rows} malformed rows, e.g. {data.bad_examples[0]}" if data.bad_rows else ""
        raise FinetuneError(f"TSV file {path!r} has no usable `sentence<TAB>label` rows{detail}")
    return data


def _is_int(text: str) -> bool:
    try:
        int(text.strip())
        return True
    except ValueError:
        return False


def split_holdout(data: TsvData, fraction: float) -> tuple[TsvData, TsvData]:
    """The last `fraction` of the rows (file order) held out."""
    if not 0 < fraction < 1:
        raise FinetuneError(f"--holdout-fraction must be in (0, 1), got {fraction}")
    n_eval = max(1, int(round(len(data.labels) * fraction)))
    if n_eval >= len(data.labels):
        raise FinetuneError(f"{data.path!r} has {len(data.labels)} usable rows: too few to hold out {fraction:.0%}")
    cut = len(data.labels) - n_eval
    train = TsvData(data.sentences[:cut], data.labels[:cut], data.path, data.header, data.bad_rows, data.bad_examples)
    held = TsvData(data.sentences[cut:], data.labels[cut:], data.path + f" (last {n_eval} rows)")
    return train, held


@section
class FinetuneConfig:
    model: Str = setting(help="model directory (distill-export output or any save_pretrained directory)")
    output: Str = setting(help="new directory for the fine-tuned model and eval_results.json (not inside an input)")
    train: Str = setting(help="TSV of sentence<TAB>label rows (a header line is skipped)")
    eval: Optional[Str] = setting(None, "held-out TSV (default: the last holdout_fraction of train)")
    holdout_fraction: Float = setting(0.1, "share of the train rows, taken from the end, held out when eval is not given", gt=0, lt=1)
    epochs: Float = setting(1.0, "passes over the training rows", gt=0)
    lr: Float = setting(5e-5, "peak learning rate (AdamW, linear warmup then decay)", gt=0, le=1)
    batch_size: Int = setting(32, "sentences per step", ge=1)
    max_seq_len: Int = setting(64, "tokens per sentence (longer ones are cut)", ge=2)
    max_train_examples: Optional[Int] = setting(None, "train on the first N training rows only (CPU budgets)", ge=1)
    warmup_fraction: Float = setting(0.06, "fraction of the steps with linear warmup", ge=0, lt=1)
    weight_decay: Float = setting(0.01, "AdamW weight decay (not on biases and LayerNorm)", ge=0, le=1)
    seed: Int = setting(0, "seed of the classifier head, the order of rows and dropout", ge=0)
    device: Optional[Str] = setting(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    eval_batch_size: Int = setting(128, "sentences per evaluation batch", ge=1)
    save_model: Bool = setting(True, "save the fine-tuned model in output (--no-save-model: only eval_results.json)")
    overwrite: Bool = setting(False, "replace output if it holds an earlier distill-finetune result (only once the new one is complete)")
    json: Optional[Str] = setting(None, "also write the result to this JSON file")


RESULTS = "eval_results.json"
OUTPUT_KIND = "distill-finetune output (it holds eval_results.json)"


def is_finetune_dir(path: str):
    """A directory distill-finetune wrote (it holds eval_results.json) and nothing else: True, or False / why not."""
    return os.path.isfile(os.path.join(path, RESULTS)) and written_by(path, "distill-finetune")


def _inputs(cfg: FinetuneConfig) -> list[tuple[str, str]]:
    return [(name, path) for name, path in (("--model", cfg.model), ("--train", cfg.train), ("--eval", cfg.eval)) if path]


def load_classifier(path: str, num_labels: int, device):
    """A local model directory as a sequence classifier (fresh head) with its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # torch: not at start-up
    from transformers.utils import logging as hf_logging  # transformers: not at start-up

    if not os.path.isdir(path):
        raise FinetuneError(f"--model {path!r} is not a directory; pass a directory written by distill-export or save_pretrained")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FinetuneError(f"--model {path!r} has no config.json; pass a directory written by distill-export or save_pretrained")
    refuse_remote_code(path, "--model")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier weights" is expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **LOCAL_ONLY)
    except Exception as exc:
        raise FinetuneError(f"--model {path!r} has no usable tokenizer ({_first_line(exc)})") from None
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **LOCAL_ONLY)
    except Exception as exc:
        raise FinetuneError(f"--model {path!r} could not be loaded for sequence classification ({_first_line(exc)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device), tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _batches(tokenizer, sentences: list[str], labels: list[int], order, batch_size: int, max_len: int, device):
    import torch  # torch: not at start-up

    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        enc = tokenizer([sentences[i] for i in rows], truncation=True, max_length=max_len, padding=True, return_tensors="pt")
        # only what every encoder accepts (DistilBERT has no token_type_ids)
        inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
        yield inputs, torch.tensor([labels[i] for i in rows], device=device)


def predict(model, tokenizer, data: TsvData, batch_size: int, max_len: int, device) -> list[int]:
    """Predicted label of every row of `data`, in row order."""
    import torch  # torch: not at start-up

    model.eval()
    order = sorted(range(len(data.sentences)), key=lambda i: len(data.sentences[i]))  # less padding
    preds = [0] * len(order)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ((inputs, _),) = _batches(tokenizer, data.sentences, data.labels, rows, batch_size, max_len, device)
            for row, p in zip(rows, model(**inputs).logits.argmax(-1).tolist()):
                preds[row] = p
    return preds


def accuracy_report(labels: list[int], preds: list[int]) -> dict:
    """Accuracy, per-class counts and the majority-class baseline, counted directly."""
    correct = sum(int(p == y) for p, y in zip(preds, labels))
    classes = sorted(set(labels) | set(preds))
    per_class = {
        str(c): {"rows": sum(1 for y in labels if y == c), "correct": sum(1 for p, y in zip(preds, labels) if y == c and p == c)}
        for c in classes
    }
    majority = max((sum(1 for y in labels if y == c) for c in set(labels)), default=0)
    return {
        "examples": len(labels),
        "correct": correct,
        "accuracy": correct / max(len(labels), 1),
        "majority_baseline": majority / max(len(labels), 1),
        "per_class": per_class,
    }


def finetune(cfg: FinetuneConfig, log=print) -> dict:
    """Fine-tune `cfg.model` on the TSV, evaluate on the held-out rows; returns a JSON-able dict."""
    import numpy as np  # numpy: not at start-up
    import torch  # torch: not at start-up

    if cfg.output:  # checked before the work, and again when the result replaces it
        check_no_overlap(cfg.output, _inputs(cfg))
        check_replaceable(cfg.output, cfg.overwrite, is_finetune_dir, OUTPUT_KIND)
    train = read_tsv(cfg.train)
    if cfg.eval:
        held = read_tsv(cfg.eval)
        train_rows_total = len(train.labels)
    else:
        train_rows_total = len(train.labels)
        train, held = split_holdout(train, cfg.holdout_fraction)
    if cfg.max_train_examples is not None:
        if cfg.max_train_examples < 1:
            raise FinetuneError("--max-train-examples must be >= 1")
        train = TsvData(
            train.sentences[: cfg.max_train_examples],
            train.labels[: cfg.max_train_examples],
            train.path,
            train.header,
            train.bad_rows,
            train.bad_examples,
        )
    if cfg.epochs <= 0 or cfg.lr <= 0 or cfg.batch_size < 1 or cfg.max_seq_len < 3:
        raise FinetuneError("--epochs and --lr must be > 0, --batch-size >= 1, --max-seq-len >= 3")
    num_labels = max(max(train.labels), max(held.labels)) + 1
    if num_labels < 2:
        raise FinetuneError(f"labels must cover at least two classes (0 and 1); {cfg.train!r} has only label 0")
    if train.bad_rows:
        log(f"distill-finetune: skipped {train.bad_rows} malformed rows of {cfg.train} ({'; '.join(train.bad_examples)})")
    if cfg.eval and held.bad_rows:
        log(f"distill-finetune: skipped {held.bad_rows} malformed rows of {cfg.eval} ({'; '.join(held.bad_examples)})")

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_classifier(cfg.model, num_labels, device)
    rng = np.random.default_rng(cfg.seed)

    n = len(train.labels)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
    from distill.train.engine import make_optimizer, warmup_linear_decay  # torch (via distill.train.engine): not at start-up

    # torch's AdamW defaults (betas 0.9/0.999, eps 1e-8), as fine-tuning recipes use; no decay on biases and LayerNorm
    optimizer = make_optimizer(model, OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=[0.9, 0.999], eps=1e-8), device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps, int(cfg.warmup_fraction * total_steps)))

    t0 = time.time()
    step = 0
    losses: list[float] = []
    model.train()
    while step < total_steps:
        order = rng.permutation(n).tolist()
        for inputs, labels in _batches(tokenizer, train.sentences, train.labels, order, cfg.batch_size, cfg.max_seq_len, device):
            loss = torch.nn.functional.cross_entropy(model(**inputs).logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if step % max(1, total_steps // 10) == 0 or step == total_steps:
                log(f"distill-finetune: step {step}/{total_steps} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)")
            if step >= total_steps:
                break
    train_seconds = time.time() - t0
    preds = predict(model, tokenizer, held, cfg.eval_batch_size, cfg.max_seq_len, device)
    report = accuracy_report(held.labels, preds)
    result = {
        "model": cfg.model,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train": {"path": cfg.train, "rows_used": n, "usable_rows": train_rows_total, "bad_rows": train.bad_rows, "header": train.header},
        "eval": {"path": held.path, **report},
        "accuracy": report["accuracy"],
        "steps": total_steps,
        "final_train_loss": float(np.mean(losses[-50:])) if losses else None,
        "train_seconds": train_seconds,
        "config": asdict(cfg),
    }
    if cfg.output:  # written beside it, then swapped in whole; eval_results.json last
        with replace_when_complete(cfg.output, cfg.overwrite, is_finetune_dir, OUTPUT_KIND, _inputs(cfg)) as staging:
            if cfg.save_model:
                model.save_pretrained(staging)
                tokenizer.save_pretrained(staging)
            with open(os.path.join(staging, RESULTS), "w") as handle:
                json.dump(result, handle, indent=2)
            record_files(staging, "distill-finetune")  # what a later --overwrite may replace
    return result


def render_table(result: dict) -> str:
    ev = result["eval"]
    lines = [
        f"{'model':<40} {'params':>9} {'held-out':>9} {'accuracy':>9} {'majority':>9}",
        f"{os.path.basename(os.path.normpath(result['model']))[:40]:<40} {result['parameters'] / 1e6:>8.2f}M {ev['examples']:>9} {ev['accuracy']:>9.2%} {ev['majority_baseline']:>9.2%}",
        f"trained {result['steps']} steps on {result['train']['rows_used']} rows in {result['train_seconds']:.0f}s"
        + (f"; {result['train']['bad_rows']} malformed rows skipped" if result["train"]["bad_rows"] else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="distill-finetune",
        description="Fine-tune an exported model for sentence classification "
        "on a `sentence<TAB>label` TSV and report held-out accuracy. Settings: --config YAML < key=value < flags.",
    )
    add_arguments(p, FinetuneConfig)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = from_arguments(FinetuneConfig, args)
        if cfg.json:
            check_result_file(cfg.json, _inputs(cfg) + [("--output", cfg.output)])  # --output is replaced whole
        result = finetune(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (FinetuneError, OutputError, ConfigError, UserError) as exc:  # UserError: e.g. a --model that asks for remote code
        print(f"distill-finetune: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(render_table(result))
    if cfg.json:
        write_json_atomically(cfg.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
