"""Identity by content (issue 23, items 1-2): a teacher is its weights, not its config and file sizes; a dataset's
tokenizer/ folder is the one its manifest records. Real runs: distill-train (1 process, DeepSpeed ZeRO-2), distill-cache
(Beam), distill-eval and distill-export, each refusing in one line with exit 2 and nothing changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from support import byte_level_bpe, train_args

from distill.checkpoints import layout as ckpt
from distill.models import fingerprint as fp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
ENV.pop("WORLD_SIZE", None)
pytestmark = pytest.mark.timeout(900)


def cli(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, name), *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess, prog: str, *fragments: str) -> str:
    """The run failed with exit 2 and exactly one `PROG: error` line holding every fragment, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-4000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def train(teacher, data, out, *extra) -> subprocess.CompletedProcess:
    """distill-train, one process, a 6-step run that checkpoints every 3 steps."""
    return cli(
        "distill-train",
        *train_args(teacher, data, out, config=os.path.join(REPO, "configs", "demo.yaml")),
        "train.max_steps=6",
        "train.micro_batch=2",
        "train.global_batch=4",
        "student.num_layers=1",
        "student.init_layers=null",
        "checkpoint.every_steps=3",
        "checkpoint.keep_last=0",
        "train.log_every=1000",
        *extra,
    )


def snapshot(root) -> dict:
    """Every file under `root`: its size, mtime and sha256 (what 'untouched' means)."""
    from kd_common.files import sha256_file

    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns, sha256_file(path))
    return found


def test_resume_with_another_teacher_of_the_same_shape_is_refused(twin_teachers, prepared_dir, tmp_path):
    a, b = twin_teachers
    teacher, out = str(tmp_path / "teacher"), tmp_path / "run"
    shutil.copytree(a, teacher)
    proc = train(teacher, prepared_dir, out, "train.halt_at_step=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / ckpt.RUN_FILE).read_text())["identity"][ckpt.CONTENT_KEY] == fp.content_sha256(a)
    before = snapshot(out / ckpt.CHECKPOINTS)
    shutil.rmtree(teacher)
    shutil.copytree(b, teacher)  # same config.json, same file sizes, other weights
    line = one_line_error(
        train(teacher, prepared_dir, out),
        "distill-train",
        "holds a run of another teacher",
        f"{ckpt.CONTENT_KEY}: '{fp.content_sha256(a)}' -> '{fp.content_sha256(b)}'",
        "model.safetensors",
        "put the run's teacher back at teacher.path",
    )
    assert "resumed" not in line
    assert snapshot(out / ckpt.CHECKPOINTS) == before, "a refused resume changed the checkpoints"
    shutil.rmtree(teacher)
    shutil.copytree(a, teacher)  # the run's teacher back (a fresh copy: other inodes, hashed again): it resumes
    proc = train(teacher, prepared_dir, out)
    assert proc.returncode == 0 and "resumed from" in proc.stderr + proc.stdout, proc.stderr[-4000:]


# ------------------------------------------------------------------------------------------------
# The teacher cache: written for teacher A, refused for teacher B of the same shape


@pytest.fixture(scope="module")
def causal_assets(tmp_path_factory, corpus_dir):
    """A byte-level BPE tokenizer (vocab 320), ~80 rows of causal data, and two tiny Llama teachers of one shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("identity_causal")
    corpus, tokenizer = byte_level_bpe(corpus_dir, root, lines=30)
    data = str(root / "data")
    prep = cli(
        "distill-prep",
        *("--input", str(corpus), "--tokenizer", str(root / "tokenizer"), "--output", data),
        *("--max-seq-len", "48", "--packing", "causal", "--validation-fraction", "0.05", "--workers", "1"),
    )
    assert prep.returncode == 0, prep.stderr[-4000:]
    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = str(root / f"teacher{seed}")
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        teachers.append(path)
    return {"root": root, "data": data, "teachers": teachers}


def test_a_cache_of_teacher_a_is_refused_for_teacher_b_of_the_same_shape(causal_assets, tmp_path):
    from distill.teachers.online import OnlineTeacher

    a, b = causal_assets["teachers"]
    data = causal_assets["data"]
    assert OnlineTeacher(None, a).fingerprint() == OnlineTeacher(None, b).fingerprint()  # the old check passed this
    cache = tmp_path / "cache"
    proc = cli("distill-cache", "--data", data, "--teacher", a, "--output", str(cache), "--rows-per-part", "32", "--k", "8")
    assert proc.returncode == 0, proc.stderr[-4000:]
    recorded = json.loads((cache / "manifest.json").read_text())["teacher"]
    assert recorded["content_sha256"] == fp.content_sha256(a) and "model.safetensors" in recorded["files"]
    run = [
        "--config",
        os.path.join(REPO, "configs", "llm_kd.yaml"),
        f"data.path={data}",
        "teacher.source=cache",
        f"teacher.cache={cache}",
        "student.init=random",
        "student.num_layers=1",
        "deepspeed.zero_stage=0",
        "train.global_batch=8",
        "train.micro_batch=4",
        "train.max_steps=1",
    ]
    one_line_error(
        cli("distill-train", *run, f"teacher.path={b}", f"output_dir={tmp_path / 'run_b'}"),
        "distill-train",
        "was written with another teacher",
        f"content sha256 {fp.content_sha256(a)[:12]}",
        f"content sha256 {fp.content_sha256(b)[:12]}",
        "model.safetensors",
    )
    assert not (tmp_path / "run_b").exists()
    proc = cli("distill-train", *run, f"teacher.path={a}", f"output_dir={tmp_path / 'run_a'}")  # its own teacher: it trains
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the cache writer refuses a dataset whose tokenizer folder was replaced, before any work
    bad = tmp_path / "bad_data"
    shutil.copytree(data, bad)
    replace_tokenizer(bad / "tokenizer", os.path.join(causal_assets["root"], "corpus"), bpe=True)
    one_line_error(
        cli("distill-cache", "--data", str(bad), "--teacher", a, "--output", str(tmp_path / "cache2")),
        "distill-cache",
        f"{bad / 'tokenizer'} does not match the tokenizer this dataset was prepared with (manifest {bad / 'manifest.json'}",
        "restore it or prepare the data again",
    )
    assert not (tmp_path / "cache2").exists()


# ------------------------------------------------------------------------------------------------
# A replaced dataset tokenizer folder: train, eval, export refuse


def replace_tokenizer(folder, corpus_dir, bpe: bool = False) -> None:
    """Put another tokenizer of the same kind and vocabulary size into `folder` (trained on one file of the corpus)."""
    files = sorted(os.path.join(corpus_dir, f) for f in os.listdir(corpus_dir))[:1]
    shutil.rmtree(folder)
    if bpe:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train(files, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
        eos = "<|endoftext|>"
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos).save_pretrained(str(folder))
    else:
        from distill.tools.demo_assets import train_wordpiece_tokenizer

        train_wordpiece_tokenizer(files, str(folder), vocab_size=1500)


def test_a_replaced_dataset_tokenizer_is_refused_by_train_eval_and_export(twin_teachers, prepared_dir, corpus_dir, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(prepared_dir, bad)
    replace_tokenizer(bad / "tokenizer", corpus_dir)
    expect = f"{bad / 'tokenizer'} does not match the tokenizer this dataset was prepared with (manifest {bad / 'manifest.json'}"
    one_line_error(train(twin_teachers[0], bad, tmp_path / "run"), "distill-train", expect, "restore it or prepare the data again")
    assert not (tmp_path / "run").exists()
    one_line_error(
        cli("distill-eval", "--model", twin_teachers[0], "--data", str(bad), "--max-sequences", "8"),
        "distill-eval",
        expect,
        "restore it or prepare the data again",
    )
    # export: a checkpoint's tokenizer is checked against the identity its trainer_state.json records
    out = tmp_path / "good_run"
    proc = train(twin_teachers[0], prepared_dir, out, "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    tag = out / ckpt.CHECKPOINTS / ckpt.tag_for(3)
    state = json.loads((tag / ckpt.TRAINER_STATE).read_text())
    assert state["tokenizer"] == json.loads((bad / "manifest.json").read_text())["tokenizer"]
    good = cli("distill-export", "--checkpoint", str(out), "--output", str(tmp_path / "export"))
    assert good.returncode == 0, good.stderr[-4000:]
    shutil.rmtree(tag / "tokenizer")
    shutil.copytree(bad / "tokenizer", tag / "tokenizer")
    one_line_error(
        cli("distill-export", "--checkpoint", str(out), "--output", str(tmp_path / "export2")),
        "distill-export",
        f"{tag / 'tokenizer'} does not match the tokenizer this dataset was prepared with ({tag / ckpt.TRAINER_STATE}",
        "restore it",
    )
    assert not (tmp_path / "export2").exists()
