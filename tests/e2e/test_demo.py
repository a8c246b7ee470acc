"""The demo's pieces at a small size: the eval table's baseline column and extra rows, the fill-mask probes,
the no-teacher student, the shipped demo teacher and the recipe that made it (launch/demo.sh itself is the
10-minute run and is not run here).

Models with known answers stand in where a trained one would cost minutes: a *unigram model* is a BERT whose
output is its bias alone (the transform before the vocabulary projection is zeroed), so it predicts the same
distribution everywhere; with the bias set to the log-frequencies of the masked labels it is exactly the
most-frequent-token baseline, and its top-k are the k most frequent labels with their frequencies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
BIN = os.path.dirname(sys.executable)
SHIPPED = os.path.join(REPO_ROOT, "assets", "demo_teacher")

pytestmark = pytest.mark.timeout(900)


def run(cmd, check=True):
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[:6]} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


N = 96  # validation sequences evaluated: enough for a few thousand masked tokens


def masked_labels(data_dir: str, vocab_size: int, n: int) -> np.ndarray:
    """The labels of every masked position of the first n validation sequences, drawn one at a time (no batching)."""
    from distill.data.masking import MaskingCollator, MaskingPolicy
    from distill.data.reader import TokenSequences
    from distill.tools.evaluate import EVAL_SEED

    sequences = TokenSequences(data_dir, "validation")
    ids = sequences.manifest.tokenizer.special_token_ids
    collator = MaskingCollator(
        MaskingPolicy(
            mask_id=ids["mask"], pad_id=ids["pad"], vocab_size=vocab_size, special_ids=sequences.manifest.tokenizer.all_special_ids
        ),
        EVAL_SEED,
    )
    labels = []
    for i in range(min(n, len(sequences))):
        row = collator(sequences.rows(np.array([i])), [i])["labels"][0]
        labels.extend(int(x) for x in row if x != -100)
    return np.array(labels)


def save_unigram_model(tokenizer_dir: str, out: str, log_probs: np.ndarray) -> str:
    """A BERT masked LM whose logits are `log_probs` at every position, whatever the input."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    with torch.no_grad():
        model.cls.predictions.transform.LayerNorm.weight.zero_()
        model.cls.predictions.transform.LayerNorm.bias.zero_()
        model.cls.predictions.bias.copy_(torch.as_tensor(log_probs, dtype=torch.float32))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def label_counts(prepared_dir, tokenizer_dir):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    return np.bincount(masked_labels(prepared_dir, vocab, N), minlength=vocab)


@pytest.fixture(scope="module")
def oracle_unigram(tmp_path_factory, tokenizer_dir, label_counts):
    """The most-frequent-token baseline as a model: log-frequencies of the validation split's masked labels."""
    p = label_counts / label_counts.sum()
    log_p = np.log(np.maximum(p, 1e-30))
    return save_unigram_model(tokenizer_dir, str(tmp_path_factory.mktemp("oracle")), log_p)


def test_eval_baseline_matches_independent_count_and_the_unigram_model(prepared_dir, label_counts, oracle_unigram, tokenizer_dir):
    from transformers import AutoTokenizer

    from distill.tools.evaluate import evaluate, render_table

    result = evaluate(oracle_unigram, prepared_dir, max_sequences=N, device="cpu")
    base = result["baseline"]
    top = int(np.argmax(label_counts))
    p = label_counts[label_counts > 0] / label_counts.sum()
    assert result["masked_tokens"] == label_counts.sum()
    assert base["token_id"] == top and base["token"] == AutoTokenizer.from_pretrained(tokenizer_dir).convert_ids_to_tokens(top)
    assert base["accuracy"] == pytest.approx(label_counts[top] / label_counts.sum(), abs=1e-12)
    assert base["mlm_loss"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)
    assert 0.02 < base["accuracy"] < 0.3, "a natural-language split: no single token is most of it"
    # the unigram model with the labels' own frequencies is that baseline: same accuracy, loss = their entropy
    row = result["models"]["student"]
    assert row["accuracy"] == pytest.approx(base["accuracy"], abs=1e-12)
    assert row["mlm_loss"] == pytest.approx(base["mlm_loss"], rel=1e-5)
    assert row["accuracy_over_baseline"] == pytest.approx(1.0)
    table = render_table(result)
    assert f"most frequent token {base['token']!r}" in table and f"{base['accuracy']:.2%}" in table


def test_eval_three_rows_retained_and_agreement(tmp_path, prepared_dir, oracle_unigram, teacher_dir, tokenizer_dir, label_counts):
    """Teacher = the unigram model, student = a random BERT, compared row = a unigram model with another order:
    every row equals that model evaluated alone, and the ratios follow from the rows."""
    from distill.tools.evaluate import evaluate, render_table

    flat = np.zeros(len(label_counts))
    second = int(np.argsort(label_counts)[-2])
    flat[second] = 5.0  # always predicts the second most frequent label
    other = save_unigram_model(tokenizer_dir, str(tmp_path / "second"), flat)
    result = evaluate(
        teacher_dir,
        prepared_dir,
        oracle_unigram,
        name="distilled student",
        compare=[("without teacher", other)],
        max_sequences=N,
        device="cpu",
    )
    assert list(result["models"]) == ["teacher", "distilled student", "without teacher"]
    rows = result["models"]
    for name, path in (("teacher", oracle_unigram), ("distilled student", teacher_dir), ("without teacher", other)):
        alone = evaluate(path, prepared_dir, max_sequences=N, device="cpu")["models"]["student"]
        assert rows[name]["accuracy"] == pytest.approx(alone["accuracy"], abs=1e-12), name
        assert rows[name]["mlm_loss"] == pytest.approx(alone["mlm_loss"], rel=1e-6), name
        assert rows[name]["accuracy_retained"] == pytest.approx(alone["accuracy"] / rows["teacher"]["accuracy"]), name
    assert rows["without teacher"]["accuracy"] == pytest.approx(label_counts[second] / label_counts.sum(), abs=1e-12)
    assert rows["without teacher"]["teacher_agreement"] == 0.0, "it always says the second token, the teacher the first"
    assert rows["teacher"]["teacher_agreement"] == 1.0 and rows["teacher"]["accuracy_retained"] == 1.0
    assert result["top1_agreement"] == rows["distilled student"]["teacher_agreement"]
    assert result["accuracy_retained"] == rows["distilled student"]["accuracy_retained"]

    table = render_table(result).splitlines()
    kept = rows["without teacher"]["accuracy_retained"]
    sentence = [line for line in table if line.startswith("distilled student: ")]
    assert sentence == [
        f"distilled student: {rows['distilled student']['accuracy_retained']:.0%} of the teacher's masked-token accuracy; "
        f"without teacher: {kept:.0%}."
    ]
    assert [line.split()[0] for line in table[1:5]] == ["teacher", "distilled", "without", "most"], "teacher, students, then the baseline"


def test_eval_cli_third_row_and_bad_input(tmp_path, prepared_dir, oracle_unigram, teacher_dir, capsys):
    from distill.tools.evaluate import main

    out = str(tmp_path / "eval.json")
    proc = run(
        [
            sys.executable,
            "-m",
            "distill.tools.evaluate",
            "--model",
            teacher_dir,
            "--name",
            "distilled student",
            "--teacher",
            oracle_unigram,
            "--compare",
            f"without teacher={teacher_dir}",
            "--data",
            prepared_dir,
            "--max-sequences",
            "16",
            "--json",
            out,
        ]
    )
    result = json.load(open(out))
    assert list(result["models"]) == ["teacher", "distilled student", "without teacher"] and result["sequences"] == 16
    assert "without teacher: " in proc.stdout and "most frequent token" in proc.stdout
    common = ["--model", teacher_dir, "--teacher", oracle_unigram, "--data", prepared_dir, "--max-sequences", "4"]
    for args, fragment in (
        (["--compare", "nodir"], "is not NAME=DIR"),
        (["--compare", f"teacher={teacher_dir}"], "two models are named 'teacher'"),
        (["--compare", "x=/nonexistent"], "is not a local directory"),
        (["--split", "test"], "no 'test' rows"),
    ):
        assert main(common + args) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("distill-")]  # (weight-loading progress bars aside)
        assert len(errors) == 1 and errors[0].startswith("distill-eval: error: ") and fragment in errors[0], err
        assert "Traceback" not in err


def test_probes_print_each_models_top3(tmp_path, oracle_unigram, teacher_dir, label_counts):
    """The unigram model's top 3 are the three most frequent labels with their frequencies, for every probe."""
    from transformers import AutoTokenizer

    from distill.tools.demo_assets import DEMO_PROBES, fill_mask_probes, render_probes

    tok = AutoTokenizer.from_pretrained(oracle_unigram)
    results = fill_mask_probes([("teacher", oracle_unigram), ("random", teacher_dir)])
    assert [r["sentence"] for r in results] == [s for s, _ in DEMO_PROBES]
    freq = label_counts / label_counts.sum()
    top3 = np.sort(freq)[::-1][:3]
    for r in results:  # the three highest frequencies, each named by a token of that frequency (tied tokens in either order)
        guesses = r["guesses"]["teacher"]
        assert [p for _, p in guesses] == pytest.approx(list(top3), rel=1e-4)
        assert [freq[tok.convert_tokens_to_ids(t)] for t, _ in guesses] == pytest.approx(list(top3), rel=1e-4)
        assert len(r["guesses"]["random"]) == 3
    # the first guess counts as expected only when it is one of the probe's answers
    results[0]["expected"] = [results[0]["guesses"]["teacher"][0][0]]
    text = render_probes(results)
    assert text.count("<- as expected") == 1 and f"first guess as expected: teacher 1/{len(results)}, random 0/{len(results)}" in text
    for sentence, _ in DEMO_PROBES:
        assert repr(sentence) in text
    proc = run([os.path.join(BIN, "distill-demo-assets"), "probe", f"teacher={oracle_unigram}", "bad"], check=False)
    assert proc.returncode == 2 and "is not NAME=DIR" in proc.stderr


def test_no_teacher_row_is_the_distilled_students_shape_without_the_teacher():
    """configs/demo_no_teacher.yaml builds exactly the student configs/demo.yaml derives from the shipped teacher,
    and differs from that recipe only in what the teacher gives: init, losses (and the paths)."""
    from transformers import AutoModelForMaskedLM

    from distill.config import load_config
    from distill.models.build import build_student

    distilled_cfg = load_config("configs/demo.yaml", [f"teacher.path={SHIPPED}", "data.path=d", "output_dir=o"])
    plain_cfg = load_config("configs/demo_no_teacher.yaml", ["data.path=d", "output_dir=o"])
    teacher = AutoModelForMaskedLM.from_pretrained(SHIPPED, local_files_only=True)
    vocab, pad = teacher.config.vocab_size, teacher.config.pad_token_id
    distilled = build_student(distilled_cfg.student, teacher, vocab, pad, 128)
    plain = build_student(plain_cfg.student, None, vocab, pad, 128)
    assert type(distilled) is type(plain)
    assert [(n, p.shape) for n, p in distilled.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    a, b = distilled_cfg.to_dict(), plain_cfg.to_dict()
    differ = {
        f"{section}.{key}" for section in a if isinstance(a[section], dict) for key in a[section] if a[section][key] != b[section].get(key)
    }
    assert differ <= {
        "teacher.path",
        "student.init",
        "student.num_layers",
        "student.hidden_size",
        "student.num_heads",
        "student.intermediate_size",
        "loss.weights",
        "loss.ce_positions",
    }, differ  # ce_positions: read by the ce term only
    assert a["loss"]["weights"].keys() >= {"ce", "mlm", "cos"} and b["loss"]["weights"] == {"mlm": 1.0}
    assert b["student"]["init"] == "random" and b["teacher"]["path"] is None
    assert a["train"] == b["train"] and a["optim"] == b["optim"] and a["data"] == b["data"] and a["seed"] == b["seed"]


def test_no_teacher_row_trains_in_two_processes(tmp_path, prepared_dir):
    """The demo's stage 5 at a tiny size: 2-process DeepSpeed, masked LM only, no teacher, exported as a DistilBERT."""
    out = str(tmp_path / "run")
    run(
        [
            os.path.join(BIN, "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            "29741",
            "--module",
            "distill",
            "--config",
            "configs/demo_no_teacher.yaml",
            f"data.path={prepared_dir}",
            f"output_dir={out}",
            "student.hidden_size=32",
            "student.intermediate_size=64",
            "student.num_heads=2",
            "train.max_steps=12",
            "train.global_batch=16",
            "train.micro_batch=8",
            "train.log_every=1",
            "optim.lr=5e-3",
            "optim.warmup_fraction=0",
        ]
    )
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        m = [json.loads(line) for line in handle]
    assert [x["step"] for x in m] == list(range(1, 13))
    assert all(x["loss"] == x["loss_mlm"] for x in m) and not any("loss_ce" in x or "loss_cos" in x for x in m)
    assert np.mean([x["loss"] for x in m[-3:]]) < m[0]["loss"] - 0.5, "masked LM alone moves it off the uniform guess"
    export = str(tmp_path / "export")
    run([os.path.join(BIN, "distill-export"), "--checkpoint", out, "--output", export])
    config = json.load(open(os.path.join(export, "config.json")))
    assert config["architectures"] == ["DistilBertForMaskedLM"] and config["n_layers"] == 2


# --- the shipped demo teacher (assets/demo_teacher) and the recipe that made it --------------------------------

PREP_ARGS = ["--max-seq-len", "128", "--validation-fraction", "0.05", "--workers", "2"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory, corpus_dir):
    """The demo corpus prepared as launch/demo.sh prepares it: the shipped teacher's tokenizer, 128 tokens, 5% held out."""
    with open(os.path.join(REPO_ROOT, "launch", "demo.sh")) as handle:
        assert " ".join(PREP_ARGS) in handle.read(), "launch/demo.sh prepares the data as this test does"
    out = str(tmp_path_factory.mktemp("demo") / "data")
    run([os.path.join(BIN, "distill-prep"), "--input", corpus_dir, "--tokenizer", SHIPPED, "--output", out] + PREP_ARGS)
    return out


@pytest.fixture(scope="module")
def record():
    from distill.tools.demo_assets import RECORD_FILE

    with open(os.path.join(SHIPPED, RECORD_FILE)) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def same_data(demo_data, record):
    """Whether this machine's demo corpus is the one the shipped teacher trained on (it is text from the installed
    Python: another Python version has other docstrings)."""
    from distill.tools.demo_assets import split_fingerprint

    return split_fingerprint(demo_data) == record["train_fingerprint"]


def test_shipped_teacher_is_small_and_has_learnt_the_corpus(demo_data, record, same_data):
    from distill.tools.evaluate import evaluate

    assert os.path.getsize(os.path.join(SHIPPED, "model.safetensors")) < 8e6
    result = evaluate(SHIPPED, demo_data, device="cpu")
    accuracy, baseline = result["models"]["student"]["accuracy"], result["baseline"]["accuracy"]
    assert accuracy >= 3 * baseline, f"teacher {accuracy:.2%} is not 3x the most-frequent-token baseline {baseline:.2%}"
    if same_data:
        assert accuracy == pytest.approx(record["validation_final"]["accuracy"], abs=2e-3)
        assert result["masked_tokens"] == record["validation_final"]["masked_tokens"]


def test_teacher_recipe_reproduces_the_shipped_run(tmp_path, demo_data, record, same_data):
    """`configs/demo_teacher.yaml` as the README runs it, stopped at step 200 of its 3000 (train.halt_at_step: the
    schedule is the full run's), against the shipped teacher's own run: on the same data the losses follow its
    recorded ones step by step; on any data the step-200 model is off the unigram plateau and at least as good
    as the shipped run was at step 200. Retraining all 3000 steps (~25 min on 2 cores) is `launch/demo.sh --train-teacher`."""
    from distill.tools.evaluate import evaluate
    from distill.tools.export import export_checkpoint

    step = record["check_step"]
    out = str(tmp_path / "teacher_run")
    run(
        [
            os.path.join(BIN, "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            "29742",
            "--module",
            "distill",
            "--config",
            "configs/demo_teacher.yaml",
            f"data.path={demo_data}",
            f"output_dir={out}",
            f"train.halt_at_step={step}",
        ]
    )
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        losses = [json.loads(line)["loss"] for line in handle]
    recorded = record["loss_per_step"][:step]
    assert len(losses) == step
    if same_data:
        assert losses[0] == pytest.approx(recorded[0], abs=1e-4), "same init, same first batch"
        assert np.mean(np.abs(np.array(losses[-50:]) - recorded[-50:])) < 0.03, "the run follows the shipped teacher's"
    result = evaluate(export_checkpoint(out, str(tmp_path / "teacher"), False), demo_data, device="cpu")
    accuracy, baseline = result["models"]["student"]["accuracy"], result["baseline"]["accuracy"]
    assert accuracy >= 2 * baseline, f"step {step}: {accuracy:.2%}, still on the unigram plateau ({baseline:.2%})"
    assert accuracy >= record["validation_at_check_step"]["accuracy"] - 0.01
