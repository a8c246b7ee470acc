"""distill-eval on causal data: perplexity, next-token accuracy, top-1 agreement and KL(teacher || student) per
token, against an independent computation (each document of a row alone through Hugging Face's forward, or each row
alone with --no-document-attention; torch's cross_entropy and kl_div over the tokenizer's vocabulary); the CLI's
settings on the one config mechanism."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from support import BIN, ENV, REPO_ROOT, save_teacher

N = 12
pytestmark = pytest.mark.timeout(600)


def save_student(tokenizer, path: str, vocab_rows: int) -> str:
    """A 2-layer Llama of another seed: a student that disagrees with the teacher often."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab_rows,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked distributions: agreement and KL far from their random-init values
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def validation_rows(data: str, n: int, documents: bool = True) -> list[np.ndarray]:
    """The first n validation sequences, read from the shards the manifest lists (pyarrow, not the job's reader): each
    row cut at its documents' starts (the doc_start flags), or whole."""
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    rows = []
    for shard in manifest["splits"]["validation"]["shards"]:
        table = pq.read_table(os.path.join(data, shard["path"]))
        rows += zip(table.column("input_ids").to_pylist(), table.column("doc_start").to_pylist())
    pieces = []
    for ids, starts in rows[:n]:
        cuts = [0] + [i for i in range(1, len(ids)) if starts[i] and documents] + [len(ids)]
        pieces += [np.asarray(ids[a:b], dtype=np.int64) for a, b in zip(cuts, cuts[1:])]
    return pieces


def direct(student_dir: str, teacher_dir: str, pieces, vocab: int) -> dict:
    from transformers import AutoModelForCausalLM

    s = AutoModelForCausalLM.from_pretrained(student_dir, local_files_only=True).eval()
    t = AutoModelForCausalLM.from_pretrained(teacher_dir, local_files_only=True).eval()
    sums = {"ce_s": 0.0, "ce_t": 0.0, "kl": 0.0, "agree": 0, "acc_s": 0, "positions": 0}
    with torch.no_grad():
        for ids in pieces:
            x = torch.as_tensor(ids)[None]
            ls = s(input_ids=x).logits[0, :-1, :vocab].log_softmax(-1)
            lt = t(input_ids=x).logits[0, :-1, :vocab].log_softmax(-1)
            y = x[0, 1:]
            sums["ce_s"] += F.cross_entropy(ls, y, reduction="sum").item()
            sums["ce_t"] += F.cross_entropy(lt, y, reduction="sum").item()
            sums["kl"] += F.kl_div(ls, lt, log_target=True, reduction="sum").item()  # KL(teacher || student)
            sums["agree"] += int((ls.argmax(-1) == lt.argmax(-1)).sum())
            sums["acc_s"] += int((ls.argmax(-1) == y).sum())
            sums["positions"] += len(y)
    return sums


@pytest.fixture(scope="module")
def models(tmp_path_factory, bpe_data):  # noqa: F811
    tokenizer, data = bpe_data
    root = tmp_path_factory.mktemp("eval_causal")
    teacher = save_teacher("llama", tokenizer, str(root / "teacher"), vocab_rows=len(tokenizer) + 24)  # a padded head
    student = save_student(tokenizer, str(root / "student"), vocab_rows=len(tokenizer))
    return data, teacher, student, len(tokenizer)


def test_causal_metrics_equal_the_direct_computation(models):
    from distill.tools.evaluate import evaluate, render_table

    data, teacher, student, vocab = models
    result = evaluate(student, data, teacher, max_sequences=N, batch_size=5, device="cpu", chunk_positions=7)  # padding and chunks
    d = direct(student, teacher, validation_rows(data, N), vocab)
    s, t = result["models"]["student"], result["models"]["teacher"]
    assert result["task"] == "causal_lm" and result["sequences"] == N and result["tokens"] == d["positions"]
    assert s["loss"] == pytest.approx(d["ce_s"] / d["positions"], rel=1e-5)
    assert t["loss"] == pytest.approx(d["ce_t"] / d["positions"], rel=1e-5)
    assert s["perplexity"] == pytest.approx(np.exp(d["ce_s"] / d["positions"]), rel=1e-5)
    assert s["kl_from_teacher"] == pytest.approx(d["kl"] / d["positions"], rel=1e-4) and result["kl_from_teacher"] == s["kl_from_teacher"]
    assert t["kl_from_teacher"] == pytest.approx(0.0, abs=1e-6) and t["teacher_agreement"] == 1.0
    assert abs(s["teacher_agreement"] * d["positions"] - d["agree"]) <= 1, "same argmax up to a float tie"
    assert abs(s["accuracy"] * d["positions"] - d["acc_s"]) <= 1
    assert 0.0 < s["teacher_agreement"] < 1.0 and s["kl_from_teacher"] > 0.1, "a student that differs from its teacher"
    table = render_table(result)
    assert "KL(t||s)" in table and f"{s['kl_from_teacher']:.4f}" in table and f"{s['perplexity']:.2f}" in table
    assert len(validation_rows(data, N)) > N, "the rows hold several documents"
    # the switch off: each row one sequence, as before document attention
    whole = evaluate(student, data, teacher, max_sequences=N, batch_size=5, device="cpu", document_attention=False)
    d = direct(student, teacher, validation_rows(data, N, documents=False), vocab)
    assert whole["tokens"] == d["positions"] > result["tokens"] and not whole["document_attention"]
    assert whole["models"]["student"]["loss"] == pytest.approx(d["ce_s"] / d["positions"], rel=1e-5)


def test_cli_json_and_bad_input(tmp_path, models, teacher_dir):
    data, teacher, student, _ = models
    out = str(tmp_path / "eval.json")
    proc = subprocess.run(
        [
            os.path.join(BIN, "distill-eval"),
            "--model",
            student,
            "--teacher",
            teacher,
            "--compare",
            f"twin={teacher}",
            "--data",
            data,
            "max_sequences=4",
            "--json",
            out,
        ],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out))
    assert list(result["models"]) == ["teacher", "student", "twin"] and result["sequences"] == 4
    assert result["models"]["twin"]["kl_from_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert "top-1 agreement" in proc.stdout

    def fails(*args):
        proc = subprocess.run(
            [os.path.join(BIN, "distill-eval"), *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("distill-")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        return errors[0]

    # a masked LM (BERT) on causal data: said from its config, before any weights load
    assert "is a masked LM (bert) but" in fails("--model", teacher_dir, "--data", data)
    line = fails("--model", student, "--data", data, "--batch-size", "0", "--chunk-positions", "-1", "--compare", "x")
    assert "batch_size=0 is out of range" in line and "chunk_positions=-1 is out of range" in line and "is not NAME=DIR" in line
    settings = tmp_path / "eval.yaml"
    settings.write_text(f"model: {student}\ndata: {data}\nmax_sequences: 0\nbatch_sise: 4\n")
    line = fails("--config", str(settings))
    assert "max_sequences=0 is out of range" in line and "unknown config key batch_sise (did you mean batch_size?)" in line
