"""Bad input to distill-train / distill-export / distill-eval: one-line error, non-zero exit, nothing overwritten."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
from support import assert_one_line_error, cli, train_args

from distill.config import load_config
from distill.train.engine import deepspeed_config

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
BIN = os.path.dirname(sys.executable)


def train(*args):
    return cli("distill-train", "--config", "configs/demo.yaml", *args)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_dir, tokenizer_dir):
    out = str(tmp_path_factory.mktemp("bad") / "data")
    code, lines = cli(
        "distill-prep",
        "--input",
        os.path.join(corpus_dir, "python_topics.txt"),
        "--tokenizer",
        tokenizer_dir,
        "--output",
        out,
        "--max-seq-len",
        "64",
        "--validation-fraction",
        "0.1",
        "--workers",
        "1",
    )
    assert code == 0, lines
    return out


def test_teacher_that_is_a_hub_name_or_broken(tmp_path, prepared):
    code, lines = train("teacher.path=bert-base-uncased", f"data.path={prepared}", f"output_dir={tmp_path / 'o'}")
    assert_one_line_error(code, lines, "teacher.path 'bert-base-uncased' is not a local directory", "never downloads")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "vocab_size": 2000}')
    code, lines = train(*train_args(broken, prepared, tmp_path / "o", config=None))
    assert_one_line_error(code, lines, "could not be loaded")
    assert not (tmp_path / "o").exists(), "nothing written for a run that could not start"


def test_tokenizer_mismatch(tmp_path, prepared, corpus_dir):
    from distill.tools.demo_assets import save_random_bert_teacher, train_wordpiece_tokenizer

    other_tok = train_wordpiece_tokenizer([os.path.join(corpus_dir, "python_topics.txt")], str(tmp_path / "tok"), vocab_size=1500)
    other_teacher = save_random_bert_teacher(
        other_tok, str(tmp_path / "teacher"), layers=2, hidden=32, heads=2, intermediate=64, max_positions=64
    )
    code, lines = train(*train_args(other_teacher, prepared, tmp_path / "o", config=None))
    assert_one_line_error(code, lines, "does not match", "re-run distill-prep with --tokenizer")


def test_config_errors(tmp_path, prepared, teacher_dir):
    code, lines = train(*train_args(teacher_dir, prepared, tmp_path / "o", config=None), "train.micro_bach=4")
    assert_one_line_error(code, lines, "unknown config key train.micro_bach (did you mean train.micro_batch?)")
    code, lines = train(
        *train_args(teacher_dir, prepared, tmp_path / "o", config=None),
        "train.global_batch=100",
        "train.micro_batch=16",
    )
    assert_one_line_error(code, lines, "train.global_batch=100 is not a multiple of train.micro_batch=16")
    cfg = load_config(
        "configs/demo.yaml", ["teacher.path=t", "data.path=d", "output_dir=o", "train.global_batch=64", "train.micro_batch=8"]
    )
    with pytest.raises(Exception, match=r"not divisible by train.micro_batch=8 x 3 ranks = 24"):
        deepspeed_config(cfg, world_size=3, precision=__import__("torch").float32)
    ds = deepspeed_config(cfg, world_size=2, precision=__import__("torch").float32)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 64 and ds["zero_optimization"]["stage"] == 2


def test_unfinished_or_damaged_dataset(tmp_path, prepared, teacher_dir):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(prepared, unfinished)
    os.remove(unfinished / "manifest.json")
    code, lines = train(*train_args(teacher_dir, unfinished, tmp_path / "o", config=None))
    assert_one_line_error(code, lines, "has no manifest.json", "did not finish")
    damaged = tmp_path / "damaged"
    shutil.copytree(prepared, damaged)
    manifest = json.load(open(damaged / "manifest.json"))
    manifest["splits"]["train"]["shards"][0]["rows"] += 1
    json.dump(manifest, open(damaged / "manifest.json", "w"))
    code, lines = train(*train_args(teacher_dir, damaged, tmp_path / "o", config=None))
    assert_one_line_error(code, lines, "rows but the manifest says")


def test_output_dir_with_foreign_data_or_another_run(tmp_path, prepared, teacher_dir):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    code, lines = train(*train_args(teacher_dir, prepared, foreign, config=None))
    assert_one_line_error(code, lines, "already holds data that is not a run")
    assert os.listdir(foreign) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "precious"

    out = tmp_path / "run"
    args = [
        *train_args(teacher_dir, prepared, out, config=None),
        "train.max_steps=1",
        "train.global_batch=8",
        "train.micro_batch=8",
    ]
    code, lines = train(*args)
    assert code == 0, lines
    before = sorted(os.listdir(out / "checkpoints"))
    code, lines = train(*args, "optim.lr=1e-5")
    assert_one_line_error(code, lines, "holds another run", "optim.lr: 0.001 -> 1e-05")
    assert sorted(os.listdir(out / "checkpoints")) == before

    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "keep.txt").write_text("x")
    code, lines = cli("distill-export", "--checkpoint", str(out), "--output", str(exported))
    assert_one_line_error(code, lines, "already holds data", "--overwrite")
    assert os.listdir(exported) == ["keep.txt"]
    code, lines = cli("distill-export", "--checkpoint", str(tmp_path / "nothing"), "--output", str(tmp_path / "e2"))
    assert_one_line_error(code, lines, "no complete checkpoint")
