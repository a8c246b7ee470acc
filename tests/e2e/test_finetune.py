"""distill-finetune: TSV reading (header, malformed rows), hold-out split, accuracy counted independently."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from distill.tools.finetune import FinetuneConfig, FinetuneError, accuracy_report, finetune, main, read_tsv, split_holdout

POSITIVE = ["good", "great", "fine", "nice", "happy", "love"]
NEGATIVE = ["bad", "poor", "awful", "sad", "hate", "wrong"]
FILLER = ["the", "list", "is", "a", "module", "function", "value", "object", "file", "name"]


def synthetic_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """A learnable task: label 1 iff the sentence holds a word from POSITIVE (else one from NEGATIVE)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path: str, rows, header: bool = True, extra_lines: tuple[str, ...] = ()) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        if header:
            handle.write("sentence\tlabel\n")
        for sentence, label in rows:
            handle.write(f"{sentence}\t{label}\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer_dir) -> str:
    """A 1-layer BERT with the session's WordPiece tokenizer (random weights)."""
    from distill.tools.demo_assets import save_random_bert_teacher

    out = str(tmp_path_factory.mktemp("tiny_bert"))
    return save_random_bert_teacher(tokenizer_dir, out, layers=1, hidden=32, heads=2, intermediate=64, max_positions=64)


def test_read_tsv_header_and_bad_rows(tmp_path):
    path = write_tsv(
        str(tmp_path / "a.tsv"),
        [("good film", 1), ("bad film", 0)],
        extra_lines=("no label here", "x\tpositive", "\t1", "a\tb\tc", "", "ok row\t0"),
    )
    data = read_tsv(path)
    assert data.header
    assert data.sentences == ["good film", "bad film", "ok row"]
    assert data.labels == [1, 0, 0]
    assert data.bad_rows == 4  # the blank line is not a row
    assert "line 4" in data.bad_examples[0]
    no_header = read_tsv(write_tsv(str(tmp_path / "b.tsv"), [("good film", 1)], header=False))
    assert not no_header.header and no_header.labels == [1]


def test_holdout_is_last_rows(tmp_path):
    rows = [(f"s{i}", i % 2) for i in range(20)]
    train, held = split_holdout(read_tsv(write_tsv(str(tmp_path / "a.tsv"), rows)), 0.1)
    assert train.sentences == [f"s{i}" for i in range(18)]
    assert held.sentences == ["s18", "s19"]


def test_accuracy_report_counts():
    report = accuracy_report([1, 0, 1, 1], [1, 1, 1, 0])
    assert report["correct"] == 2 and report["accuracy"] == 0.5
    assert report["majority_baseline"] == 0.75
    assert report["per_class"]["1"] == {"rows": 3, "correct": 2}


def test_bad_inputs_one_line_errors(tmp_path, tiny_model, capsys):
    good = write_tsv(str(tmp_path / "a.tsv"), synthetic_rows(20, 0))
    with pytest.raises(FinetuneError, match="does not exist"):
        read_tsv(str(tmp_path / "missing.tsv"))
    garbage = tmp_path / "garbage.tsv"
    garbage.write_text("just text\nmore text\n")
    with pytest.raises(FinetuneError, match="no usable"):
        read_tsv(str(garbage))
    empty_model = tmp_path / "not_a_model"
    empty_model.mkdir()
    assert main(["--model", str(empty_model), "--train", good, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no config.json" in err[0]
    assert main(["--model", tiny_model, "--train", str(tmp_path / "missing.tsv"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"distill-finetune: error: TSV file {str(tmp_path / 'missing.tsv')!r} does not exist"]


@pytest.mark.timeout(120)
def test_finetune_learns_and_accuracy_matches_independent_count(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = synthetic_rows(400, seed=1)
    path = write_tsv(str(tmp_path / "train.tsv"), rows, extra_lines=("broken row without tab",))
    out = str(tmp_path / "out")
    cfg = FinetuneConfig(
        model=tiny_model,
        output=out,
        train=path,
        holdout_fraction=0.25,
        epochs=4,
        lr=3e-3,
        batch_size=16,
        max_seq_len=32,
        device="cpu",
        seed=0,
    )
    result = finetune(cfg, log=lambda msg: None)
    assert result["train"]["bad_rows"] == 1
    assert result["eval"]["examples"] == 100 and result["train"]["rows_used"] == 300
    assert result["accuracy"] >= 0.85, result  # chance is ~0.5: the synthetic task is learnt

    # Independent count: reload the saved classifier, predict the last 100 rows one by one.
    held = rows[300:]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    correct = 0
    with torch.no_grad():
        for sentence, label in held:
            enc = tokenizer(sentence, return_tensors="pt", truncation=True, max_length=32)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            correct += int(logits.argmax(-1).item() == label)
    assert result["eval"]["correct"] == correct
    assert result["accuracy"] == correct / 100
    with open(os.path.join(out, "eval_results.json")) as handle:
        assert json.load(handle)["eval"]["correct"] == correct


@pytest.mark.timeout(120)
def test_cli_table_and_json(tmp_path, tiny_model):
    train = write_tsv(str(tmp_path / "train.tsv"), synthetic_rows(64, 2))
    held = write_tsv(str(tmp_path / "eval.tsv"), synthetic_rows(16, 3))
    out_json = str(tmp_path / "r.json")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.tools.finetune",
            "--model",
            tiny_model,
            "--train",
            train,
            "--eval",
            held,
            "--output",
            str(tmp_path / "o"),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--no-save-model",
            "--json",
            out_json,
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "majority" in proc.stdout
    result = json.load(open(out_json))
    assert result["eval"]["examples"] == 16 and 0 <= result["accuracy"] <= 1
    assert not os.path.exists(os.path.join(tmp_path, "o", "config.json"))
