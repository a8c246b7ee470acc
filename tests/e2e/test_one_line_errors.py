"""Issue 23 items 6-8: no code from a model directory ever runs, and every input problem is one line (exit 2, no traceback).

Each case is a real subprocess run of a CLI (distill-prep, -train, -export, -eval, -cache) on real damaged inputs; it
asserts rc 2, exactly one `PROG: error: ...` line naming the problem, no "Traceback" anywhere in stderr, and that
nothing was written or changed. Model directories that ask for remote code carry a modeling_x.py that would write a
marker file when imported; the commands run on a pseudo-terminal that answers "y" to any prompt, and the marker must
never appear. A read-only output_dir is a read-only tmpfs mount (root ignores file modes); skipped where mounting is
not allowed. A full disk is a small tmpfs mount."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import BIN, ENV, REPO_ROOT

pytestmark = pytest.mark.timeout(900)

MARKER = "REMOTE_CODE_RAN"
TRAIN_TINY = ["student.init_layers=null", "train.global_batch=8", "train.micro_batch=8", "train.max_steps=2", "checkpoint.every_steps=2"]


def run(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`name` (a console script) on a pseudo-terminal as stdin that has "y" typed ahead, stdout/stderr captured."""
    master, slave = pty.openpty()
    try:
        os.write(master, b"y\n" * 20)
        return subprocess.run(
            [os.path.join(BIN, name), *args], stdin=slave, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
        )
    finally:
        os.close(slave)
        os.close(master)


def one_line_error(proc: subprocess.CompletedProcess, prog: str, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one `prog: error:` line holding every fragment; returns that line."""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-4000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def snapshot(root) -> dict[str, str]:
    """Every file under `root` (hidden ones too) -> sha256 of its bytes: 'nothing changed' is an equal snapshot."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return out


def edit_json(path, **changes) -> None:
    with open(path) as handle:
        data = json.load(handle)
    data.update(changes)
    with open(path, "w") as handle:
        json.dump(data, handle)


def train_args(teacher, data, out, *extra) -> list[str]:
    return ["--config", "configs/demo.yaml", f"teacher.path={teacher}", f"data.path={data}", f"output_dir={out}", *TRAIN_TINY, *extra]


@contextlib.contextmanager
def tmpfs(path, size: str, read_only: bool = False):
    """A fresh tmpfs at `path` (skip the test where mounting is not allowed)."""
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here (needs root in a container that permits mount)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def remote_dir(tmp_path_factory, teacher_dir):
    """The test teacher with auto_map entries in config.json and tokenizer_config.json and a modeling_x.py that writes a marker."""
    root = tmp_path_factory.mktemp("remote")
    path = root / "model"
    shutil.copytree(teacher_dir, path)
    edit_json(path / "config.json", auto_map={"AutoConfig": "modeling_x.MyConfig", "AutoModelForMaskedLM": "modeling_x.MyModel"})
    edit_json(path / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "modeling_x.MyTokenizer"]})
    (path / "modeling_x.py").write_text(f"open({str(root / MARKER)!r}, 'w').write('ran')\n")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, teacher_dir, prepared_dir):
    """A finished 2-step single-process run (one checkpoint) to export and resume from."""
    out = tmp_path_factory.mktemp("run") / "run"
    proc = run("distill-train", *train_args(teacher_dir, prepared_dir, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _step_dir(run_dir) -> str:
    root = os.path.join(run_dir, "checkpoints")
    return os.path.join(root, sorted(d for d in os.listdir(root) if d.startswith("step_"))[-1])


# ----------------------------------------------------------------------------------------------
# 6. no remote code, ever


def test_remote_code_is_refused_by_every_cli_and_never_runs(tmp_path, corpus_dir, remote_dir, prepared_dir, teacher_dir, run_dir, assets):  # noqa: F811
    marker = remote_dir.parent / MARKER
    want = "asks for remote code (auto_map AutoConfig -> modeling_x.MyConfig)"
    proc = run("distill-prep", "--input", corpus_dir, "--tokenizer", str(remote_dir), "--output", str(tmp_path / "out"))
    one_line_error(proc, "distill-prep", want, "config.json")
    one_line_error(run("distill-eval", "--model", str(remote_dir), "--data", prepared_dir), "distill-eval", want)
    one_line_error(run("distill-eval", "--model", teacher_dir, "--teacher", str(remote_dir), "--data", prepared_dir), "distill-eval", want)
    one_line_error(run("distill-train", *train_args(remote_dir, prepared_dir, tmp_path / "run")), "distill-train", want)
    check = run("distill-train", "--check", *train_args(remote_dir, prepared_dir, tmp_path / "run"))
    assert check.returncode == 2 and "Traceback" not in check.stderr and want in check.stdout, check.stdout[-2000:] + check.stderr[-2000:]
    proc = run("distill-cache", "--data", assets["data"], "--teacher", str(remote_dir), "--output", str(tmp_path / "cache"))
    one_line_error(proc, "distill-cache", want)
    tsv = tmp_path / "sst.tsv"
    tsv.write_text("a good film\t1\na bad film\t0\nfine\t1\nawful\t0\n")
    proc = run(
        "distill-finetune", "--model", str(remote_dir), "--train", str(tsv), "--holdout-fraction", "0.5", "--output", str(tmp_path / "ft")
    )
    one_line_error(proc, "distill-finetune", want)
    # a checkpoint whose hf_config (or tokenizer) asks for remote code: distill-export refuses it too
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir, ckpt)
    edit_json(os.path.join(_step_dir(ckpt), "tokenizer", "tokenizer_config.json"), auto_map={"AutoTokenizer": ["modeling_x.Tok", None]})
    one_line_error(
        run("distill-export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "export")), "distill-export", "modeling_x.Tok"
    )
    assert not marker.exists(), "code from a model directory ran"
    assert not any((tmp_path / name).exists() for name in ("out", "run", "cache", "export", "ft"))


def test_a_model_type_transformers_does_not_ship_is_refused_before_loading(tmp_path, teacher_dir, prepared_dir):
    model = tmp_path / "model"
    shutil.copytree(teacher_dir, model)
    edit_json(model / "config.json", model_type="my_secret_model")
    one_line_error(run("distill-eval", "--model", str(model), "--data", prepared_dir), "distill-eval", "'my_secret_model'", "does not ship")


# ----------------------------------------------------------------------------------------------
# 7. max_seq_len longer than the model's positions


def test_data_longer_than_the_models_positions_is_one_line_in_train_eval_and_cache(tmp_path, teacher_dir, prepared_dir, assets):  # noqa: F811
    short = tmp_path / "short"  # 32 positions for data of 64 (config only: every check runs before the weights load)
    shutil.copytree(teacher_dir, short)
    edit_json(short / "config.json", max_position_embeddings=32)
    want = "has 32 positions (config.json max_position_embeddings)"
    check = run("distill-train", "--check", *train_args(short, prepared_dir, tmp_path / "run"))
    assert check.returncode == 2 and want in check.stdout and "--max-seq-len 32" in check.stdout, check.stdout[-2000:]
    assert "raise student.max_position_embeddings" not in check.stdout  # the advice that cannot help with a teacher this short
    one_line_error(run("distill-train", *train_args(short, prepared_dir, tmp_path / "run")), "distill-train", want, "max_seq_len")
    one_line_error(run("distill-eval", "--model", str(short), "--data", prepared_dir), "distill-eval", want)
    causal = tmp_path / "causal"  # a Llama teacher of 32 positions for causal data of 48
    shutil.copytree(assets["teacher"], causal)
    edit_json(causal / "config.json", max_position_embeddings=32)
    proc = run("distill-cache", "--data", assets["data"], "--teacher", str(causal), "--output", str(tmp_path / "cache"))
    one_line_error(proc, "distill-cache", want, "--max-seq-len 32")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_prep_refuses_a_max_seq_len_above_the_tokenizers_model_max_length(tmp_path, corpus_dir, tokenizer_dir):
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    edit_json(tok / "tokenizer_config.json", model_max_length=128)
    proc = run("distill-prep", "--input", corpus_dir, "--tokenizer", str(tok), "--output", str(tmp_path / "out"), "--max-seq-len", "512")
    one_line_error(proc, "distill-prep", "--max-seq-len 512", "model_max_length 128", "--max-seq-len 128 or less")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# 8. tracebacks turned into one line


def _first_shard(data) -> str:
    with open(os.path.join(data, "manifest.json")) as handle:
        return os.path.join(data, json.load(handle)["splits"]["train"]["shards"][0]["path"])


def test_a_truncated_shard_in_train_and_cache(tmp_path, teacher_dir, prepared_dir, assets):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    shard = _first_shard(data)
    os.truncate(shard, os.path.getsize(shard) // 2)
    one_line_error(run("distill-train", *train_args(teacher_dir, data, tmp_path / "run")), "distill-train", shard, "not a readable Parquet")
    causal = tmp_path / "causal"
    shutil.copytree(assets["data"], causal)
    shard = _first_shard(causal)
    os.truncate(shard, os.path.getsize(shard) // 2)
    proc = run("distill-cache", "--data", str(causal), "--teacher", assets["teacher"], "--output", str(tmp_path / "cache"))
    one_line_error(proc, "distill-cache", shard, "not a readable Parquet")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_token_id_outside_the_vocabulary_names_shard_and_row(tmp_path, teacher_dir, prepared_dir):
    from kd_common.files import sha256_file

    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    shard = _first_shard(data)
    table = pq.read_table(shard)
    ids = table.column("input_ids").to_pylist()
    for row in ids:
        row[1] = 5000  # the vocabulary has 2000 ids; every row, so the first step meets one
    field = table.schema.field("input_ids")
    pq.write_table(table.set_column(table.schema.get_field_index("input_ids"), field, pa.array(ids, type=field.type)), shard)
    with open(data / "manifest.json") as handle:
        manifest = json.load(handle)
    manifest["splits"]["train"]["shards"][0]["sha256"] = sha256_file(shard)  # consistent files: only the ids are wrong
    (data / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    proc = run("distill-train", *train_args(teacher_dir, data, out, "data.num_workers=1"))
    one_line_error(proc, "distill-train", shard, " row ", "token id 5000", "vocabulary of 2000")
    assert not os.path.exists(out / "checkpoints") or not [d for d in os.listdir(out / "checkpoints") if d.startswith("step_")]


def test_a_read_only_output_dir(tmp_path, teacher_dir, prepared_dir):
    with tmpfs(tmp_path / "ro", "1m") as mount:
        os.makedirs(mount / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        proc = run("distill-train", *train_args(teacher_dir, prepared_dir, mount / "run"))
        one_line_error(proc, "distill-train", "cannot be written (Read-only file system", "output_dir")
        assert os.listdir(mount / "run") == []


def test_an_empty_or_cut_run_json_is_left_as_it_is(tmp_path, teacher_dir, prepared_dir, run_dir):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    full = (out / "run.json").read_text()
    for text in ("", full[: len(full) // 2]):
        (out / "run.json").write_text(text)
        before = snapshot(out)
        one_line_error(run("distill-train", *train_args(teacher_dir, prepared_dir, out)), "distill-train", "run.json is unreadable")
        assert snapshot(out) == before


def test_stop_as_a_directory(tmp_path, teacher_dir, prepared_dir, run_dir):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "STOP").mkdir()
    (out / "STOP" / "mine.txt").write_text("not the trainer's")
    proc = run("distill-train", *train_args(teacher_dir, prepared_dir, out))
    one_line_error(proc, "distill-train", f"{out}/STOP is a directory")
    assert (out / "STOP" / "mine.txt").read_text() == "not the trainer's"


@pytest.mark.parametrize("key", ["dim", "vocab_size"])
def test_export_with_an_hf_config_of_another_width_or_vocabulary(tmp_path, run_dir, key):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir, ckpt)
    config = os.path.join(_step_dir(ckpt), "hf_config", "config.json")
    with open(config) as handle:
        edit_json(config, **{key: json.load(handle)[key] * 2})
    proc = run("distill-export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "export"))
    one_line_error(proc, "distill-export", "does not match the checkpoint's weights", "hf_config")
    assert not (tmp_path / "export").exists()


def test_export_on_a_full_disk_keeps_the_old_export(tmp_path, run_dir):
    with tmpfs(tmp_path / "small", "1300k") as mount:  # one export (~0.9 MB) fits, a second beside it does not
        out = mount / "export"
        assert run("distill-export", "--checkpoint", str(run_dir), "--output", str(out)).returncode == 0
        before = snapshot(out)
        proc = run("distill-export", "--checkpoint", str(run_dir), "--output", str(out), "--overwrite")
        one_line_error(proc, "distill-export", "no space left", "is as it was")
        assert snapshot(out) == before and sorted(os.listdir(mount)) == ["export"]


def test_a_tampered_cache_part_is_named_even_unverified(tmp_path, assets, small_cache):  # noqa: F811
    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    part = sorted((cache / "train").iterdir())[0]
    size = part.stat().st_size
    with open(part, "r+b") as handle:  # the same size (the manifest's byte count holds), the pages garbage
        handle.seek(size // 4)
        handle.write(bytes((i * 37 + 11) % 256 for i in range(size // 2)))
    out = tmp_path / "run"
    proc = run(
        "distill-train",
        "--config",
        "configs/llm_kd.yaml",
        f"teacher.path={assets['teacher']}",
        f"data.path={assets['data']}",
        "teacher.source=cache",
        f"teacher.cache={cache}",
        "teacher.cache_verify=false",
        f"output_dir={out}",
        "student.init=random",
        "student.num_layers=1",
        "deepspeed.zero_stage=0",
        "train.global_batch=8",
        "train.micro_batch=4",
        "train.max_steps=1",
    )
    one_line_error(proc, "distill-train", f"cache part {part}", "unreadable")
    assert not out.exists()
