"""distill-finetune: TSV reading (header, malformed rows), hold-out split, accuracy counted independently."""

from __future__ import annotations

import json
import os

import pytest
from support import synthetic_rows, write_tsv

from distill.tools.finetune import FinetuneConfig, FinetuneError, accuracy_report, finetune, main, read_tsv, split_holdout


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
