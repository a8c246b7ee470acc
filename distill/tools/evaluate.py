"""distill-eval: held-out evaluation of a student, its teacher and other models on a prepared split.

The dataset decides the task, the family registry (distill/models/families.py) which models fit it: on data packed
`causal` (distill-prep --packing causal), causal LMs are evaluated by distill/tools/eval_causal.py (perplexity,
next-token accuracy, top-1 agreement and per-token KL(teacher || student) at every real next-token position);
on any other packing, masked LMs as follows. Settings are an `EvalConfig` section (kd_common/config.py):
--config YAML < key=value < the flags, every value checked before any model loads.

Masked LMs: every model sees the same masked sequences (uniform 15% masking, 80/10/10, fixed seed), so the
numbers are comparable across models and runs: masked-LM loss, perplexity (exp of the loss),
masked-token accuracy and, with a teacher, each model's top-1 agreement with the teacher and the
share of the teacher's accuracy it keeps. The table also shows the most-frequent-token baseline,
computed from the masked positions' labels alone: always predicting the most frequent of those
tokens (its accuracy), and the best context-free distribution, their own frequencies (its loss).
A model below that row has learnt nothing a unigram count would not give.

    distill-eval --model STUDENT --teacher TEACHER --data PREPARED \\
                 [--name "distilled student"] [--compare "without teacher=OTHER_STUDENT"] ...
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from data_prep.manifest import check_tokenizer_matches, load_dataset_tokenizer, load_manifest, tokenizer_identity, write_json_atomically
from distill.data.masking import CausalLMCollator, MaskingCollator, MaskingPolicy
from distill.data.reader import TokenSequences
from distill.models.build import ModelError, check_layout, check_logits, check_positions, mlm_forward
from distill.models.families import Family, FamilyError, family_of
from distill.objective.losses import IGNORE_INDEX, Batch, select_logit_positions
from kd_common.config import Bool, Int, Str, add_arguments, from_arguments, section, setting
from kd_common.errors import UserError, first_line, report_one_line
from kd_common.hf_dirs import LOCAL_ONLY, refuse_remote_code
from kd_common.output_rule import check_result_file

EVAL_SEED = 1234
TEACHER = "teacher"


@section
class EvalConfig:
    model: Str = setting(help="student (or any masked or causal LM) directory, e.g. a distill-export output")
    data: Str = setting(help="prepared dataset directory (distill-prep output); packing causal = causal-LM metrics, any other = masked-LM")
    name: Str = setting("student", "the model's row name in the table")
    teacher: Optional[Str] = setting(
        None, "teacher directory: its own row, and every model's top-1 agreement with it (causal: and KL(teacher||model))"
    )
    compare: list[Str] = setting(
        [],
        "another model evaluated on the same tokens, as its own row, written NAME=DIR (repeatable), "
        "e.g. --compare 'without teacher=runs/mlm_student'",
        repeat=True,
    )
    split: Str = setting("validation", "split of the prepared dataset to evaluate on")
    max_sequences: Optional[Int] = setting(None, "evaluate on the first N sequences only; null = all", ge=1)
    batch_size: Int = setting(32, "sequences per forward pass", ge=1)
    chunk_positions: Optional[Int] = setting(
        None,
        "causal: positions whose vocabulary logits are computed at once; null = about 2^26 "
        "logits per model per chunk (512 positions at a 128k vocabulary)",
        ge=1,
    )
    document_attention: Bool = setting(
        True,
        "causal data: each document of a row attends only within itself, with position ids restarting at each (as training "
        "with data.document_attention, the default); false = each row is one sequence (before issue 25)",
    )
    json: Optional[Str] = setting(None, "also write the results to this JSON file (atomically; not inside an input)")
    device: Optional[Str] = setting(None, "cpu, cuda, cuda:1 ...; null = cuda if available")

    def problems(self) -> list[str]:
        """Every --compare is NAME=DIR and every row has its own name."""
        try:
            names = [TEACHER] * bool(self.teacher) + [self.name] + [n for n, _ in parse_compare(self.compare)]
        except ValueError as exc:
            return [str(exc)]
        twice = sorted({n for n in names if names.count(n) > 1})
        return [f"two models are named {n!r}; give each compared model its own name" for n in twice]


def model_family(path: str) -> Family:
    """The family of the model in local directory `path`, from its config.json alone (no weights)."""
    return family_of(model_config(path))


def model_config(path: str):
    """The Hugging Face config of the model in local directory `path` (config.json alone: no weights)."""
    from transformers import AutoConfig  # transformers: not at start-up

    if not os.path.isdir(path):
        raise ModelError(f"model {path!r} is not a local directory; pass a directory written by distill-export or save_pretrained")
    refuse_remote_code(path, "model")
    try:
        config = AutoConfig.from_pretrained(path, **LOCAL_ONLY)
    except Exception as exc:  # transformers raises many types for unreadable configs
        first = first_line(exc)
        raise ModelError(
            f"{path!r} could not be loaded as a model ({first}); pass a directory written by distill-export or save_pretrained"
        ) from None
    return config


def load_lm(path: str, device: torch.device, causal: bool = False):
    """A local masked LM (or causal LM) and its tokenizer, for evaluation."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer  # transformers: not at start-up

    if not os.path.isdir(path):
        raise ModelError(f"model {path!r} is not a local directory; pass a directory written by distill-export or save_pretrained")
    kind = "causal LM" if causal else "masked LM"
    refuse_remote_code(path, "model")
    try:
        model = (AutoModelForCausalLM if causal else AutoModelForMaskedLM).from_pretrained(path, **LOCAL_ONLY)
        tokenizer = AutoTokenizer.from_pretrained(path, **LOCAL_ONLY)
    except Exception as exc:
        first = first_line(exc)
        raise ModelError(f"{path!r} could not be loaded as a {kind} with its tokenizer ({first})") from None
    model = model.to(device).eval()
    check_logits(model, f"model {path}")  # the metrics read its logits as its own forward makes them
    return model, tokenizer


def load_masked_lm(path: str, device: torch.device):
    """A local masked LM and its tokenizer, for evaluation."""
    return load_lm(path, device, causal=False)


def check_task(label: str, path: str, family: Family, data_dir: str, packing: str) -> None:
    """A causal LM is evaluated on causally packed data, a masked LM on the others: a one-line ModelError otherwise."""
    causal_data = packing == "causal"
    if family.causal == causal_data:
        return
    if family.causal:
        raise ModelError(
            f"{label} {path!r} is a causal LM ({family.name}) but {data_dir} is packed {packing!r} for masked LMs; evaluate it on "
            f"data prepared with `distill-prep --packing causal`"
        )
    raise ModelError(
        f"{label} {path!r} is a masked LM ({family.name}) but {data_dir} is packed for causal LMs; evaluate a causal LM "
        f"(any model AutoModelForCausalLM builds) on it, or a masked LM on data prepared with --packing document"
    )


def most_frequent_token_baseline(label_counts: np.ndarray, tokenizer=None) -> dict:
    """The context-free baseline of masked-token counts (`eval_causal.unigram_baseline`, loss under "mlm_loss")."""
    from distill.tools.eval_causal import unigram_baseline  # distill.tools.eval_causal: not at start-up of distill-eval

    return unigram_baseline(label_counts, tokenizer, loss_key="mlm_loss")


@torch.no_grad()
def evaluate(
    model_dir: str,
    data_dir: str,
    teacher_dir: Optional[str] = None,
    split: str = "validation",
    max_sequences: Optional[int] = None,
    batch_size: int = 32,
    device: Optional[str] = None,
    *,
    name: str = "student",
    compare: Sequence[tuple[str, str]] = (),
    chunk_positions: Optional[int] = None,
    document_attention: bool = True,
) -> dict:
    """Metrics of the model `name`, the teacher and the `compare` (name, dir) models on `split`: causal-LM metrics
    (distill/tools/eval_causal.py) when the dataset is packed causal, else the masked-LM metrics below.

    Returns a JSON-able dict: per model (teacher first) loss, perplexity, accuracy, parameters, its
    accuracy over the most-frequent-token baseline's and, with a teacher, `accuracy_retained` and
    `teacher_agreement`; the baseline itself under "baseline". `top1_agreement` and
    `accuracy_retained` at the top level are those of model `name`.
    """
    paths: dict[str, str] = {}
    for label, path in ([(TEACHER, teacher_dir)] if teacher_dir else []) + [(name, model_dir)] + list(compare):
        if label in paths:
            raise ModelError(f"two models are named {label!r}; give each compared model its own name")
        paths[label] = path
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    manifest = load_manifest(data_dir)
    load_dataset_tokenizer(data_dir, manifest)  # a dataset whose tokenizer/ folder is not its manifest's is refused by every reader
    if split not in manifest.splits or manifest.splits[split].rows == 0:
        raise ModelError(f"{data_dir} has no {split!r} rows to evaluate on (splits: {', '.join(manifest.splits) or 'none'})")
    causal = manifest.packing == "causal"
    for label, path in paths.items():  # every model's kind, from its config alone, before any weights load
        config = model_config(path)
        try:
            check_task(label, path, family_of(config), data_dir, manifest.packing)
        except FamilyError as exc:
            raise ModelError(f"{label} {path!r}: {exc}") from None
        check_layout(config, f"{label} {path}")
        check_positions(config, manifest.max_seq_len, f"{label} {path}", f"--data {data_dir}")
    models = {label: load_lm(path, dev, causal) for label, path in paths.items()}
    for label, (_, tokenizer) in models.items():
        check_tokenizer_matches(manifest, tokenizer_identity(tokenizer, paths[label]), label)
    tokenizer = models[name][1]
    sequences = TokenSequences(data_dir, split, manifest)
    sequences.id_limit = manifest.tokenizer.vocab_size  # an id beyond the vocabulary: one line naming shard and row
    n = len(sequences) if max_sequences is None else min(max_sequences, len(sequences))
    if causal:
        return _causal(models, paths, sequences, n, manifest, split, batch_size, dev, name, tokenizer, chunk_positions, document_attention)
    vocab = max(m.config.vocab_size for m, _ in models.values())
    policy = MaskingPolicy(
        mask_id=tokenizer.mask_token_id, pad_id=tokenizer.pad_token_id, vocab_size=vocab, special_ids=manifest.tokenizer.all_special_ids
    )
    collator = MaskingCollator(policy, EVAL_SEED, pad_to_multiple_of=8)
    order = np.argsort(sequences.lengths[:n], kind="stable")  # similar lengths together: less padding

    totals = {label: {"loss_sum": 0.0, "correct": 0, "agree": 0} for label in models}
    label_counts = np.zeros(vocab, dtype=np.int64)
    masked = 0
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        raw = collator(sequences.rows(rows), rows)
        batch = select_logit_positions(Batch(raw["input_ids"].to(dev), raw["attention_mask"].to(dev), raw["labels"].to(dev)), "masked")
        labels = batch.position_labels
        predictions = {}
        for label, (model, _) in models.items():
            logits = mlm_forward(model, batch.input_ids, batch.attention_mask, batch.logit_positions).logits.float()
            totals[label]["loss_sum"] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            predictions[label] = logits.argmax(-1)
            totals[label]["correct"] += int((predictions[label] == labels).sum())
        if TEACHER in predictions:
            for label in models:
                totals[label]["agree"] += int((predictions[label] == predictions[TEACHER]).sum())
        kept = labels[labels != IGNORE_INDEX].cpu().numpy()
        label_counts += np.bincount(kept, minlength=vocab)[:vocab]
        masked += len(kept)

    baseline = most_frequent_token_baseline(label_counts, tokenizer)
    result = {"split": split, "sequences": int(n), "masked_tokens": masked, "student": name, "baseline": baseline, "models": {}}
    for label, t in totals.items():
        loss = t["loss_sum"] / max(masked, 1)
        accuracy = t["correct"] / max(masked, 1)
        row = {
            "path": paths[label],
            "mlm_loss": loss,
            "perplexity": float(np.exp(min(loss, 50.0))),
            "accuracy": accuracy,
            "accuracy_over_baseline": accuracy / baseline["accuracy"] if baseline["accuracy"] > 0 else None,
            "parameters": sum(p.numel() for p in models[label][0].parameters()),
        }
        if teacher_dir:
            row["teacher_agreement"] = t["agree"] / max(masked, 1)
        result["models"][label] = row
    if teacher_dir:
        teacher_accuracy = result["models"][TEACHER]["accuracy"]
        for row in result["models"].values():
            row["accuracy_retained"] = row["accuracy"] / max(teacher_accuracy, 1e-12)
        result["top1_agreement"] = result["models"][name]["teacher_agreement"]
        result["accuracy_retained"] = result["models"][name]["accuracy_retained"]
    return result


def _causal(models, paths, sequences, n, manifest, split, batch_size, dev, name, tokenizer, chunk_positions, documents) -> dict:
    from distill.tools.eval_causal import evaluate_causal  # distill.tools.eval_causal: not at start-up of distill-eval

    vocab = manifest.tokenizer.vocab_size
    small = [f"{label} ({m.config.vocab_size})" for label, (m, _) in models.items() if m.config.vocab_size < vocab]
    if small:
        raise ModelError(
            f"{', '.join(small)}: vocabulary smaller than the dataset's tokenizer ({vocab}); evaluate on data prepared with its tokenizer"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = CausalLMCollator(pad, pad_to_multiple_of=8, documents=documents, eos_id=tokenizer.eos_token_id)
    result = evaluate_causal(
        {label: m for label, (m, _) in models.items()},
        paths,
        sequences,
        n,
        vocab,
        collator,
        batch_size,
        dev,
        name,
        tokenizer,
        chunk_positions,
    )
    result["split"] = split
    result["document_attention"] = documents
    return result


def render_table(result: dict) -> str:
    """The evaluation as a fixed-width text table, the baseline as its last row, then the comparison in words."""
    if result.get("task") == "causal_lm":
        from distill.tools.eval_causal import render_causal_table  # distill.tools.eval_causal: not at start-up of distill-eval

        return render_causal_table(result)
    models = result["models"]
    baseline = result.get("baseline")
    has_teacher = TEACHER in models
    base_name = f"most frequent token {baseline['token']!r}" if baseline and baseline.get("token") else "most frequent token"
    width = max([len(n) for n in models] + ([len(base_name)] if baseline else []) + [5])

    def line(name, params, loss, ppl, acc, times, kept, agree):
        return f"{name:<{width}} {params:>8} {loss:>9} {ppl:>9} {acc:>9} {times:>7} {kept:>8} {agree:>8}"

    lines = [line("model", "params", "mlm loss", "ppl", "mask acc", "x base", "of teach", "agree")]
    for name, m in models.items():
        times = f"{m['accuracy_over_baseline']:.1f}x" if m.get("accuracy_over_baseline") is not None else "-"
        kept = f"{m['accuracy_retained']:.1%}" if "accuracy_retained" in m else "-"
        agree = f"{m['teacher_agreement']:.1%}" if "teacher_agreement" in m and name != TEACHER else "-"
        lines.append(
            line(
                name,
                f"{m['parameters'] / 1e6:.2f}M",
                f"{m['mlm_loss']:.4f}",
                f"{m['perplexity']:.2f}",
                f"{m['accuracy']:.2%}",
                times,
                kept,
                agree,
            )
        )
    if baseline:
        kept = f"{baseline['accuracy'] / models[TEACHER]['accuracy']:.1%}" if has_teacher and models[TEACHER]["accuracy"] > 0 else "-"
        lines.append(
            line(
                base_name,
                "-",
                f"{baseline['mlm_loss']:.4f}",
                f"{baseline['perplexity']:.2f}",
                f"{baseline['accuracy']:.2%}",
                "1.0x",
                kept,
                "-",
            )
        )
    if has_teacher:
        student = result.get("student", "student")
        others = [n for n in models if n not in (TEACHER, student)]
        words = [f"{student}: {models[student]['accuracy_retained']:.0%} of the teacher's masked-token accuracy"]
        words += [f"{n}: {models[n]['accuracy_retained']:.0%}" for n in others]
        lines.append("; ".join(words) + ".")
        lines.append(
            f"top-1 agreement {student}/teacher: {result['top1_agreement']:.2%}; accuracy retained: {result['accuracy_retained']:.1%}"
        )
    if baseline:
        lines.append(
            f"x base: accuracy over always predicting {baseline['token']!r}, the most frequent of the masked tokens "
            f"(its loss: their own frequencies as the prediction)"
        )
    lines.append(f"{result['sequences']} sequences of split {result['split']!r}, {result['masked_tokens']} masked tokens")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    """Atomically (temp file + rename): a reader never sees half a result."""
    write_json_atomically(path, result)


def parse_compare(items: Sequence[str]) -> list[tuple[str, str]]:
    """`NAME=DIR` arguments as (name, dir) pairs; a ValueError names the first malformed one."""
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path:
            raise ValueError(f"--compare {item!r} is not NAME=DIR (e.g. --compare 'without teacher=runs/mlm_student')")
        pairs.append((name.strip(), path))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-eval",
        description="Held-out evaluation of a student, its teacher and any models "
        "compared with it. Masked LMs: masked-LM loss, perplexity, accuracy, the most-frequent-token baseline, "
        "teacher agreement and retained accuracy. Causal LMs (data packed causal): perplexity, next-token "
        "accuracy, top-1 agreement and KL(teacher||student) per token. Settings: --config YAML < key=value "
        "< the flags below.",
    )
    add_arguments(parser, EvalConfig)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """distill-eval: the table on stdout; bad input (settings first, before any model loads) is one line on stderr, exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        cfg = from_arguments(EvalConfig, args)
        compare = parse_compare(cfg.compare)
        if cfg.json:
            check_result_file(
                cfg.json,
                [("--model", cfg.model), ("--teacher", cfg.teacher), ("--data", cfg.data)] + [(f"--compare {n}", p) for n, p in compare],
            )
        result = evaluate(
            cfg.model,
            cfg.data,
            cfg.teacher,
            cfg.split,
            cfg.max_sequences,
            cfg.batch_size,
            cfg.device,
            name=cfg.name,
            compare=compare,
            chunk_positions=cfg.chunk_positions,
            document_attention=cfg.document_attention,
        )
    except (ValueError, UserError) as exc:
        return report_one_line("distill-eval", exc)
    print(render_table(result))
    if cfg.json:
        write_json(result, cfg.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
