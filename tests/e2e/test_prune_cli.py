"""distill-prune end to end (issue 26): the command on prepared datasets of a BERT and a Llama teacher, the written
directory reopened and checked against the library's own slicing of the same scores, scores reused for another shape,
the output rule, a calibration pass shared by 2 processes (the same scores as one), every bad input of the issue in one
line with nothing written, and training from pruned students under the real DeepSpeed engine (the DistilBERT objective
with Patient-KD on a width-pruned BERT, llm_kd on a pruned Llama) in ONE 2-process launch.

What needs no process (exactness of the slicing, the scores against an independent computation, the shape rules) is in
tests/unit/test_pruning.py."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from support import BIN, LLM_TINY, assert_one_line_error_of, metrics, run, run_log, tiny_teacher

pytestmark = pytest.mark.timeout(1800)
PRUNE = [sys.executable, "-m", "distill.prune"]
CALIBRATION = ["--sequences", "48", "--batch-size", "16", "--threads", "1"]


def prune(*args, check=True):
    return run([*PRUNE, *CALIBRATION, *args], check=check)


@pytest.fixture(scope="module")
def bert_pruned(tmp_path_factory, teacher_dir, prepared_dir):
    """The session's 4-layer BERT (hidden 64, 4 heads of 16, MLP 128) pruned to 3 layers, 2 heads (hidden 32), MLP 64."""
    out = str(tmp_path_factory.mktemp("pruned") / "bert")
    log = prune(
        "--teacher",
        teacher_dir,
        "--data",
        prepared_dir,
        "--output",
        out,
        "--num-layers",
        "3",
        "--num-heads",
        "2",
        "--intermediate-size",
        "64",
    )
    return out, log.stdout + log.stderr


@pytest.fixture(scope="module")
def llama_pruned(assets):
    out = str(assets["root"] / "pruned_llama")
    log = prune(
        "--teacher",
        assets["teacher"],
        "--data",
        assets["data"],
        "--output",
        out,
        "--num-layers",
        "2",
        "--num-kv-heads",
        "1",
        "--hidden-size",
        "48",
    )
    return out, log.stdout + log.stderr


def library_student(teacher_path: str, scores_path: str, asked: dict):
    """The same pruning done in this process by the library, from the written scores: what the command must have written."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from distill.models.families import family_of
    from distill.prune.importance import load_scores
    from distill.prune.shape import choose_keep, choose_layers, describe_teacher, resolve_shape
    from distill.prune.student import build_student, fill, pruned_config

    config_type = json.load(open(os.path.join(teacher_path, "config.json")))["model_type"]
    auto = AutoModelForMaskedLM if config_type == "bert" else AutoModelForCausalLM
    teacher = auto.from_pretrained(teacher_path).eval()
    family = family_of(teacher)
    scores, _ = load_scores(scores_path)
    t = describe_teacher(teacher, family)
    shape = resolve_shape(t, asked)
    layers = choose_layers(scores, shape.num_layers, "cosine")
    student = build_student(teacher, family, pruned_config(teacher.config, family, t, shape, layers))
    fill(teacher, student, family, t, choose_keep(scores, t, shape, layers))
    return student, layers


def test_the_pruned_directory_is_a_model_with_its_provenance(bert_pruned, teacher_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from distill.models.fingerprint import content_sha256
    from kd_common.files import sha256_file

    out, log = bert_pruned
    assert "calibration pass:" in log and "tokens/s" in log
    record = json.load(open(os.path.join(out, "prune.json")))
    assert record["teacher"]["content_sha256"] == content_sha256(teacher_dir)
    assert record["scores"]["sha256"] == sha256_file(os.path.join(out, "importance.safetensors"))
    assert record["scores"]["sequences"] == 48 and record["scores"]["tokens"] > 48 and record["scores"]["seconds"] > 0
    assert record["shape"]["student"] == {
        "num_layers": 3,
        "hidden_size": 32,
        "num_heads": 2,
        "num_kv_heads": 2,
        "intermediate_size": 64,
        "num_experts": None,
    }
    kept = record["kept"]
    assert len(kept["layers"]) == 3 and len(kept["hidden_channels"]) == 32
    assert all(len(layer["heads"]) == 2 and len(layer["neurons"]) == 64 for layer in kept["per_layer"])
    student = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 3
    assert sum(p.numel() for p in student.parameters()) == record["params"]["student"]
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    expected, layers = library_student(
        teacher_dir, os.path.join(out, "importance.safetensors"), {"num_layers": 3, "num_heads": 2, "intermediate_size": 64}
    )
    assert layers == kept["layers"]
    written = load_file(os.path.join(out, "model.safetensors"))
    state = expected.state_dict()
    assert all(torch.equal(written[k], state[k]) for k in written)
    assert "importance of" in open(os.path.join(out, "importance.txt")).read()


def test_scores_reused_for_another_shape_and_the_output_rule(bert_pruned, teacher_dir, prepared_dir, tmp_path):
    from safetensors.torch import load_file

    first, _ = bert_pruned
    out = str(tmp_path / "depth_only")
    log = run_log([*PRUNE, "--teacher", teacher_dir, "--scores", first, "--output", out, "--num-layers", "2"])
    assert "calibration" not in log  # no pass: the scores are the first run's
    scores_sha = json.load(open(os.path.join(first, "prune.json")))["scores"]["sha256"]
    assert json.load(open(os.path.join(out, "prune.json")))["scores"]["sha256"] == scores_sha
    expected, _ = library_student(teacher_dir, os.path.join(first, "importance.safetensors"), {"num_layers": 2})
    written = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(written[k], expected.state_dict()[k]) for k in written)
    again = run([*PRUNE, "--teacher", teacher_dir, "--scores", first, "--output", out, "--num-layers", "3"], check=False)
    assert_one_line_error_of(again.returncode, again.stderr.splitlines(), "distill-prune", "already holds data", "--overwrite")
    assert json.load(open(os.path.join(out, "config.json")))["num_hidden_layers"] == 2  # untouched
    # replaced by a run whose calibration pass is in bf16 (as on a GPU): the student is still cut from the fp32 weights as stored
    prune("--teacher", teacher_dir, "--data", prepared_dir, "--output", out, "--num-layers", "3", "--dtype", "bf16", "--overwrite")
    assert json.load(open(os.path.join(out, "config.json")))["num_hidden_layers"] == 3
    expected, _ = library_student(teacher_dir, os.path.join(out, "importance.safetensors"), {"num_layers": 3})
    written = load_file(os.path.join(out, "model.safetensors"))
    assert all(written[k].dtype == torch.float32 and torch.equal(written[k], expected.state_dict()[k]) for k in written)


@pytest.mark.parametrize("partition", [False, True], ids=["replicated", "partitioned"])
def test_two_processes_share_the_calibration_and_give_the_scores_of_one(partition, bert_pruned, teacher_dir, prepared_dir, tmp_path):
    """Each process scores every second batch and the sums are all-reduced; with --partition the teacher's parameters are split
    across the two (ZeRO-3, each module gathered as it runs, both processes in lockstep: 3 batches, one repeated uncounted)."""
    from safetensors.torch import load_file

    one, _ = bert_pruned
    out = str(tmp_path / "two")
    shape = ["--num-layers", "3", "--num-heads", "2", "--intermediate-size", "64"]
    args = ["--teacher", teacher_dir, "--data", prepared_dir, "--output", out, *shape, *(["--partition"] if partition else [])]
    port = str(29871 + partition)
    log = run_log(
        [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", port, "--module", "distill.prune", *CALIBRATION, *args]
    )
    assert "rank 0/2" in log and ("teacher partitioned across the 2 processes" in log) == partition
    a, b = load_file(os.path.join(one, "importance.safetensors")), load_file(os.path.join(out, "importance.safetensors"))
    assert set(a) == set(b)
    for name in a:  # the same sums in another order (partitioned: from gathered weights, in other processes' kernels)
        torch.testing.assert_close(b[name], a[name], rtol=1e-5 if partition else 1e-9, atol=1e-12, equal_nan=True, msg=name)
    record = json.load(open(os.path.join(out, "prune.json")))
    assert record["scores"]["processes"] == 2 and record["scores"]["sequences"] == 48 and record["scores"]["partitioned"] == partition
    assert record["kept"] == json.load(open(os.path.join(one, "prune.json")))["kept"]


@pytest.fixture(scope="module")
def unsliceable(assets):
    return tiny_teacher("deepseek_v3", assets["tokenizer"], str(assets["root"] / "deepseek"), vocab=assets["vocab"] + 8)


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("heads", ["num_heads=3 is not a whole number of the teacher's key/value groups (2 query heads each"]),
        ("bert_width", ["hidden_size must be a multiple of 16"]),
        ("tiny_budget", ["is below the smallest student this teacher makes"]),
        ("no_shape", ["no shape the teacher's heads and widths divide into comes within 5% of params=0.6"]),
        ("family", ["cannot prune a deepseek_v3 model", "has no q/k/v projections"]),
        ("tokenizer", ["does not match the one the dataset was prepared with", "re-run distill-prep"]),
    ],
)
def test_bad_input_is_one_line_and_nothing_is_written(case, fragments, assets, teacher_dir, prepared_dir, unsliceable, tmp_path, capsys):
    from distill.prune.cli import main as prune_main

    llama = ["--teacher", assets["teacher"], "--data", assets["data"]]
    bert = ["--teacher", teacher_dir, "--data", prepared_dir]
    args = {
        "heads": [*llama, "--num-heads", "3"],
        "bert_width": [*bert, "--hidden-size", "40"],
        "tiny_budget": [*bert, "--params", "0.001"],
        "no_shape": [*llama, "--params", "0.6"],
        "family": ["--teacher", unsliceable, "--data", assets["data"], "--num-layers", "1"],
        "tokenizer": ["--teacher", "assets/demo_teacher", "--data", prepared_dir, "--num-layers", "2"],  # its own 8000-token WordPiece
    }[case]
    out = tmp_path / "out"
    # the command's own main() in this process (the subprocess start of each case cost 20 s; the rest is the same code)
    code = prune_main([*CALIBRATION, *args, "--output", str(out)])
    assert_one_line_error_of(code, capsys.readouterr().err.splitlines(), "distill-prune", *fragments)
    assert not out.exists() and os.listdir(tmp_path) == []  # no output, no staging directory


def test_training_from_pruned_students(bert_pruned, llama_pruned, teacher_dir, prepared_dir, assets, tmp_path):
    """ONE 2-process launch (tests/e2e/any_causal_lm_worker.py): the DistilBERT objective with Patient-KD from the width-pruned
    BERT (cos and pkd on the teacher's kept channels, pkd on the teacher layers the student's came from), and llm_kd from the
    pruned Llama; each run's log names its layer map, its losses are finite, and the last checkpoint exports."""
    bert_out, llama_out = str(tmp_path / "bert_run"), str(tmp_path / "llama_run")
    bert_dir, llama_dir = bert_pruned[0], llama_pruned[0]
    steps = 6
    plan = [
        [
            "--config",
            "configs/distilbert.yaml",
            f"teacher.path={teacher_dir}",
            f"data.path={prepared_dir}",
            f"student.path={bert_dir}",
            "student.architecture=null",  # the recipe's own student (a DistilBERT cut from teacher layers) cleared
            "student.init=null",
            "student.init_layers=null",
            f"output_dir={bert_out}",
            "loss.weights={ce: 5.0, mlm: 2.0, cos: 1.0, pkd: 10.0}",
            "loss.pkd_include_last=true",
            "train.global_batch=16",
            "train.micro_batch=8",
            f"train.max_steps={steps}",
            f"checkpoint.every_steps={steps}",
            "train.log_every=1",
        ],
        [
            "--config",
            "configs/llm_kd.yaml",
            f"teacher.path={assets['teacher']}",
            f"data.path={assets['data']}",
            f"student.path={llama_dir}",
            f"output_dir={llama_out}",
            f"train.max_steps={steps}",
            f"checkpoint.every_steps={steps}",
            "loss.weights={ce: 1.0, clm: 1.0}",
            *[a for a in LLM_TINY if not a.startswith(("student.", "train.log_every"))],
            "train.log_every=1",
        ],
    ]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    log = run_log(
        [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29873", "tests/e2e/any_causal_lm_worker.py", str(plan_file)]
    )
    bert_layers = json.load(open(os.path.join(bert_dir, "prune.json")))["kept"]["layers"]
    llama_layers = json.load(open(os.path.join(llama_dir, "prune.json")))["kept"]["layers"]
    assert f"layer map (student -> teacher) {bert_layers}" in log and "hidden states compared on the teacher's 32 kept channels" in log
    assert f"layer map (student -> teacher) {llama_layers}" in log
    for out, terms in ((bert_out, ("loss_ce", "loss_mlm", "loss_cos", "loss_pkd")), (llama_out, ("loss_ce", "loss_clm"))):
        rows = [r for r in metrics(out) if "loss" in r]
        assert len(rows) == steps and all(np.isfinite(r[t]) for r in rows for t in terms), rows
    first_cos = [r["loss_cos"] for r in metrics(bert_out) if "loss_cos" in r][0]
    assert first_cos < 0.5  # the pruned student starts close to its teacher's kept channels (random init: ~1)
    export = str(tmp_path / "export")
    run([os.path.join(BIN, "distill-export"), "--checkpoint", llama_out, "--output", export])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 48 and model.config.head_dim == 16
