"""Issue 23 (items 3, 4, 5, 10): explicit names read literally, --overwrite replaces only a command's own files, no
symlink followed, files with the user's umask, an interrupted prep leaves nothing, integer bounds printed whole.

Every case runs the real CLI in a subprocess on real files, and checks what is on disk afterwards.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
from support import cache, shared_data_path

from kd_common.output_rule import FILE_LIST, is_empty_dir

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def _umask022():
    os.umask(0o022)


def cli(name, *args, tmpdir=None):
    """(exit code, stderr lines, stdout) of a real CLI run under umask 022 (TMPDIR private when given)."""
    env = dict(ENV, TMPDIR=str(tmpdir)) if tmpdir else ENV
    proc = subprocess.run(
        [os.path.join(BIN, name), *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600, preexec_fn=_umask022
    )
    return proc.returncode, proc.stderr.strip().splitlines(), proc.stdout


def one_line_error(code, lines, prog, *fragments):
    assert code == 2, lines[-20:]
    errors = [line for line in lines if line.startswith(f"{prog}: error")]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines[-20:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def tree(path) -> dict[str, str]:
    """sha256 of every file under `path`, by relative path."""
    out = {}
    for here, _, files in os.walk(path):
        for name in files:
            full = os.path.join(here, name)
            out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _lines(tag: str, n: int) -> str:
    return "".join(f"document {tag} number {i} tells of the {tag} river and its {i} stones.\n" for i in range(n))


def _documents_read(dataset) -> int:
    return json.load(open(os.path.join(dataset, "manifest.json")))["stats"]["documents_read"]


def test_explicit_names_are_taken_literally_and_globs_still_match(tmp_path, tokenizer_dir):
    """Before: 'doc[1].txt' was globbed (it read doc1.txt, or nothing), '_x.txt' and '.x.txt' 'matched no files'."""
    counts = {"doc[1].txt": 5, "doc1.txt": 7, "_x.txt": 11, ".x.txt": 13, "d[1]/a.txt": 17, "d1/b.txt": 19}
    for name, n in counts.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(_lines(name.replace("/", "-"), n))
    literal = ["doc[1].txt", "_x.txt", ".x.txt", "d[1]"]
    args = ["--input", *(tmp_path / name for name in literal)]
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    code, lines, _ = cli(
        "distill-prep", *args, "--tokenizer", tokenizer_dir, "--output", tmp_path / "lit", "--max-seq-len", 32, tmpdir=scratch
    )
    assert code == 0, lines[-10:]
    assert _documents_read(tmp_path / "lit") == 5 + 11 + 13 + 17, "exactly the named files, not doc1.txt or d1/"
    # a name that exists nowhere is still a glob: 'doc[0-9].txt' reads doc1.txt only
    code, lines, _ = cli(
        "distill-prep",
        "--input",
        tmp_path / "doc[0-9].txt",
        "--tokenizer",
        tokenizer_dir,
        "--output",
        tmp_path / "glob",
        "--max-seq-len",
        32,
    )
    assert code == 0, lines[-10:]
    assert _documents_read(tmp_path / "glob") == 7
    # files written with the user's umask (were 0600): manifest, shards, token counts
    dataset = tmp_path / "lit"
    written = [dataset / "manifest.json", dataset / "token_counts.npy", *glob.glob(str(dataset / "train" / "*.parquet"))]
    assert {str(p): mode(p) for p in written} == {str(p): 0o644 for p in written}
    assert mode(dataset) == 0o755
    assert os.listdir(scratch) == []


def test_integer_bounds_are_printed_as_integers(tmp_path):
    code, lines, _ = cli(
        "distill-prep", "--input", tmp_path / "x.txt", "--tokenizer", tmp_path, "--output", tmp_path / "o", "--max-seq-len", 2000000
    )
    one_line_error(code, lines, "distill-prep", "must be <= 1048576")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_interrupted_prep_exits_128_plus_signal_and_leaves_nothing(tmp_path, tokenizer_dir, workers):
    """Before: rc 1 and a traceback (Beam wrapped the KeyboardInterrupt), a 0-byte log left in TMPDIR; with workers, a hang."""
    text = open(shared_data_path("wikitext-2", "valid.txt"), encoding="utf-8").read().splitlines()
    corpus = tmp_path / "corpus.txt"  # 4 distinct copies of WikiText-2 valid (dedup keeps them): a run of several seconds even idle
    corpus.write_text("".join(f"{copy} {line}\n" for copy in range(4) for line in text if line.strip()), encoding="utf-8")
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    old = tmp_path / "old"  # an earlier dataset under --overwrite: must stay as it was
    old.mkdir()
    (tmp_path / "small.txt").write_text(_lines("small", 40))
    code, lines, _ = cli(
        "distill-prep", "--input", tmp_path / "small.txt", "--tokenizer", tokenizer_dir, "--output", old, "--max-seq-len", 32
    )
    assert code == 0, lines[-10:]
    before = tree(old)
    for sig, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")):
        for output in (tmp_path / f"new-{name}", old):
            cmd = [os.path.join(BIN, "distill-prep"), "--input", str(corpus), "--tokenizer", tokenizer_dir, "--output", str(output)]
            cmd += ["--max-seq-len", "64", "--workers", workers, "--overwrite"]
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=dict(ENV, TMPDIR=str(scratch)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            staging = str(tmp_path / f".{output.name}.partial-*")
            deadline = time.time() + 120
            while not glob.glob(staging) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # into the pipeline (the whole run takes several seconds on an idle machine, more under load)
            assert proc.poll() is None, "the run ended before the signal: give it more input"
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 128 + sig, err[-3000:]
            assert err.strip().splitlines() == [f"distill-prep: interrupted by {name}; nothing was published, --output is as it was"], err
            assert not glob.glob(staging), "the staging directory was left behind"
            assert os.listdir(scratch) == [], "a Beam log was left in TMPDIR"
        assert not (tmp_path / f"new-{name}").exists()
        assert tree(old) == before
    assert not psutil_children_left()


def psutil_children_left() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if "sdk_worker" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, teacher_dir, prepared_dir) -> str:
    """A finished 2-step single-process run (checkpoint at step 2), trained under umask 022."""
    out = tmp_path_factory.mktemp("round2") / "run"
    cmd = [sys.executable, "-m", "distill", "--config", os.path.join(REPO, "configs", "demo.yaml")]
    cmd += [f"teacher.path={teacher_dir}", f"data.path={prepared_dir}", f"output_dir={out}", "train.max_steps=2", "train.micro_batch=2"]
    cmd += ["train.global_batch=4", "student.num_layers=1", "student.init_layers=null", "checkpoint.every_steps=2", "train.log_every=1000"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, preexec_fn=_umask022, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(out)


def test_checkpoint_files_have_the_users_umask(run_dir):
    step = os.path.join(run_dir, "checkpoints", "step_00000002")
    files = [os.path.join(run_dir, "run.json"), os.path.join(run_dir, "checkpoints", "latest"), os.path.join(step, "trainer_state.json")]
    files.append(os.path.join(step, "COMPLETE"))
    assert {f: mode(f) for f in files} == {f: 0o644 for f in files}


def test_export_overwrite_replaces_only_its_own_files(tmp_path, run_dir):
    """Before: --overwrite deleted a README.md the user had put into the old export."""
    out = tmp_path / "export"
    code, lines, _ = cli("distill-export", "--checkpoint", run_dir, "--output", out)
    assert code == 0, lines[-10:]
    listed = json.load(open(out / FILE_LIST))
    assert (
        listed["written_by"] == "distill-export" and "model.safetensors" in listed["files"] and "distill_provenance.json" in listed["files"]
    )
    for name in ("model.safetensors", "config.json", "distill_provenance.json", FILE_LIST):
        assert mode(out / name) == 0o644, name
    (out / "README.md").write_text("my notes on this model")
    before = tree(out)
    code, lines, _ = cli("distill-export", "--checkpoint", run_dir, "--output", out, "--overwrite")
    one_line_error(code, lines, "distill-export", "'README.md'", "did not write")
    assert tree(out) == before, "nothing deleted or changed"
    os.remove(out / "README.md")
    provenance = (out / "distill_provenance.json").stat().st_ino
    code, lines, _ = cli("distill-export", "--checkpoint", run_dir, "--output", out, "--overwrite")
    assert code == 0, lines[-10:]
    assert (out / "distill_provenance.json").stat().st_ino != provenance, "the export's own files were replaced"
    assert sorted(json.load(open(out / FILE_LIST))["files"]) == sorted(n for n in tree(out) if n != FILE_LIST)
    # an export of an older version (no file list) is not replaced blindly either
    os.remove(out / FILE_LIST)
    code, lines, _ = cli("distill-export", "--checkpoint", run_dir, "--output", out, "--overwrite")
    one_line_error(code, lines, "distill-export", FILE_LIST)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "a staging directory was left behind"


def test_symlinked_lock_is_refused_and_never_written_through(tmp_path, teacher_dir, prepared_dir):
    """Before: OUTPUT/.lock -> a file: the file was overwritten with the lock text, rc 0."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(victim, out / ".lock")
    cmd = [os.path.join(BIN, "distill-train"), "--config", os.path.join(REPO, "configs", "demo.yaml"), f"teacher.path={teacher_dir}"]
    cmd += [f"data.path={prepared_dir}", f"output_dir={out}", "train.max_steps=1", "train.micro_batch=2", "train.global_batch=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    one_line_error(proc.returncode, proc.stderr.strip().splitlines(), "distill-train", ".lock is a symlink")
    assert victim.read_text() == "precious" and os.readlink(out / ".lock") == str(victim)
    assert os.listdir(out) == [".lock"], "nothing else written"


def test_a_directory_holding_a_dangling_symlink_or_a_dotfile_is_not_empty(tmp_path):
    from distill.checkpoints.layout import CheckpointError, claim_output_dir

    for name, make in ((".lock", lambda p: os.symlink(tmp_path / "nowhere", p)), (".notes", lambda p: open(p, "w").close())):
        here = tmp_path / name.strip(".")
        here.mkdir()
        make(here / name)
        assert not is_empty_dir(str(here))
    with pytest.raises(CheckpointError, match="not a run of this tool"):
        claim_output_dir(str(tmp_path / "lock"), {"x": 1})  # only a symlinked .lock: not the trainer's own lock file
    assert os.listdir(tmp_path / "lock") == [".lock"]


def test_cache_overwrite_replaces_only_its_own_files(tmp_path, assets):  # noqa: F811  (the fixture imported above)
    """Before: distill-cache --overwrite deleted a NOTES.txt the user had put into the old cache."""
    out = tmp_path / "cache"
    cache(assets, out, "--workers", "1", "--k", "4")
    (out / "NOTES.txt").write_text("which teacher this was")
    before = tree(out)
    args = ("--data", assets["data"], "--teacher", assets["teacher"], "--output", out, "--rows-per-part", 16, "--k", 4, "--overwrite")
    code, lines, _ = cli("distill-cache", *args)
    one_line_error(code, lines, "distill-cache", "'NOTES.txt'", "did not write")
    assert tree(out) == before
    os.remove(out / "NOTES.txt")
    manifest = (out / "manifest.json").stat().st_ino
    code, lines, _ = cli("distill-cache", *args)
    assert code == 0, lines[-10:]
    assert (out / "manifest.json").stat().st_ino != manifest and mode(out / "manifest.json") == 0o644
    shutil.rmtree(out)


def test_prep_overwrite_keeps_a_file_the_user_put_in_the_tokenizer_folder(tmp_path, tokenizer_dir):
    """Before: prep --overwrite deleted a NOTES.txt inside the old dataset's tokenizer/ (the manifest lists no tokenizer files)."""
    (tmp_path / "corpus.txt").write_text(_lines("tok", 9))
    out = tmp_path / "data"
    args = ["--input", tmp_path / "corpus.txt", "--tokenizer", tokenizer_dir, "--output", out, "--max-seq-len", 32]
    code, lines, _ = cli("distill-prep", *args)
    assert code == 0, lines[-10:]
    (out / "tokenizer" / "NOTES.txt").write_text("mine")
    before = tree(out)
    code, lines, _ = cli("distill-prep", *args, "--overwrite")
    one_line_error(code, lines, "distill-prep", "--overwrite")
    assert tree(out) == before
    (out / "tokenizer" / "NOTES.txt").unlink()
    code, lines, _ = cli("distill-prep", *args, "--overwrite")
    assert code == 0, lines[-10:]


def test_a_resumed_run_never_writes_through_a_symlinked_metrics_or_config_file(tmp_path, run_dir, teacher_dir, prepared_dir):
    """Before: metrics.jsonl and config.yaml of a run directory were opened as they were, a symlink there followed."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, symlinks=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.remove(run / "config.yaml")
    os.symlink(victim, run / "config.yaml")
    os.remove(run / "metrics.jsonl")
    os.symlink(victim, run / "metrics.jsonl")
    cmd = [sys.executable, "-m", "distill", "--config", os.path.join(REPO, "configs", "demo.yaml")]
    cmd += [f"teacher.path={teacher_dir}", f"data.path={prepared_dir}", f"output_dir={run}", "train.max_steps=2", "train.micro_batch=2"]
    cmd += ["train.global_batch=4", "student.num_layers=1", "student.init_layers=null", "checkpoint.every_steps=2", "train.log_every=1000"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    one_line_error(proc.returncode, proc.stderr.strip().splitlines(), "distill-train", "metrics.jsonl is a symbolic link")
    assert victim.read_text() == "precious"
    assert not os.path.islink(run / "config.yaml"), "config.yaml is replaced (atomically), not written through"
