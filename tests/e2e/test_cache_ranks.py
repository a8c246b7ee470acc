"""The teacher cache written by the ranks of a launcher (issue 27): `deepspeed --module distill.cache` in 2 real processes
writes the Beam writer's bytes (1 worker), with the teacher replicated and partitioned across the ranks; a rank SIGKILLed
half-way through a part, then the same command on 1 rank, keeps every complete part and writes only the rest; the
refusals; and a run trained from a cache without the teacher's files. The tiny causal assets of tests/e2e/conftest.py
(Llama teacher, 2 data shards of 1436 and 1450 rows; parts of 64 rows: 46 parts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import psutil
import pytest
from support import BIN, ENV, REPO_ROOT, cache, cli, save_teacher, wait_for, worker
from support import assert_one_line_error_of as assert_one_line_error
from support import run_log as run

pytestmark = pytest.mark.timeout(900)

STALL = """
import os, time
if os.environ.get("RANK") == "1" and os.environ.get("STALL_MARKER"):
    import distill.cache.parts as parts
    _write, _calls = parts.write_part, [0]
    def write_part(path, rows, value_bits):
        _calls[0] += 1
        if _calls[0] == 3:  # this rank's third part: half of it on disk under its temp name, then wait to be killed
            with open(path + parts.TMP_MARK + "killed", "wb") as handle:
                handle.write(b"PAR1 half a part")
            open(os.environ["STALL_MARKER"], "w").close()
            time.sleep(600)
        _write(path, rows, value_bits)
    parts.write_part = write_part
"""


SETTINGS = ["--rows-per-part", "64", "--k", "8"]
PARTS = 46


@pytest.fixture(scope="module")
def beam_cache(assets):
    """The Beam writer's cache (1 worker process), what the ranks must write byte for byte."""
    out = assets["root"] / "beam_k8"
    cache(assets, out, "--workers", "1", *SETTINGS)
    return out


def cache_args(assets, out, *extra) -> list[str]:
    return ["--data", assets["data"], "--teacher", assets["teacher"], "--output", str(out), *SETTINGS, *extra]


def ranks(args, port) -> list[str]:
    return [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "distill.cache", *args]


def one_rank(args) -> list[str]:
    return [os.path.join(BIN, "python"), "-m", "distill.cache", *args]


def files(root) -> dict[str, bytes]:
    out = {}
    for here, _, names in os.walk(root):
        for name in names:
            path = os.path.join(here, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def assert_same_cache(got, want):
    """Every part byte for byte, and the manifest but for when and how fast it was written."""
    a, b = files(got), files(want)
    assert sorted(a) == sorted(b) and len(a) == PARTS + 1
    different = [name for name in a if name != "manifest.json" and a[name] != b[name]]
    assert not different, f"{len(different)} parts differ from the Beam writer's, e.g. {different[:3]}"
    ma, mb = (json.loads(x["manifest.json"]) for x in (a, b))
    for m in (ma, mb):
        m.pop("stats"), m.pop("created")
    assert ma == mb


def test_two_ranks_write_the_beam_writers_bytes(assets, beam_cache, tmp_path):
    out = tmp_path / "ranks"
    log = run(ranks(cache_args(assets, out), 29793))
    for rank in (0, 1):
        assert f"[rank {rank}/2] INFO distill-cache: 23 parts to write here (cpu, teacher replicated)" in log
    assert_same_cache(out, beam_cache)


def test_two_ranks_with_the_teacher_partitioned_write_the_same_bytes(assets, beam_cache, tmp_path):
    """The teacher split across the 2 ranks (ZeRO-3, gathered layer by layer). 23 parts each, but 91 forwards of 16 rows on
    rank 0 and 90 on rank 1 (the shards' last parts are short): rank 1 runs one one-token forward, as every forward gathers
    from every rank."""
    out = tmp_path / "partitioned"
    log = run(ranks(cache_args(assets, out, "--placement", "partitioned"), 29794))
    assert "teacher partitioned across the ranks" in log
    assert "[rank 1/2] INFO distill-cache: ran 1 one-token forwards to match the busiest rank's 91" in log
    assert_same_cache(out, beam_cache)


def test_a_rank_killed_mid_part_then_the_same_command_on_one_rank_writes_only_the_rest(assets, beam_cache, tmp_path):
    out = tmp_path / "cache"
    work = tmp_path / ".cache.partial"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STALL)  # rank 1 stalls half-way through its third part
    marker = tmp_path / "stalled"
    env = dict(ENV, PYTHONPATH=f"{hook}{os.pathsep}{REPO_ROOT}", STALL_MARKER=str(marker))
    proc = subprocess.Popen(
        ranks(cache_args(assets, out), 29795), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for(marker.exists, proc, what="rank 1 half-way through a part")
    ranks_started = [worker(proc, 0), worker(proc, 1)]
    ranks_started[1].send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0, "the launcher reports the dead rank"
    gone, alive = psutil.wait_procs(ranks_started, timeout=60)  # the launcher stops rank 0: nothing writes from here on
    assert not alive, alive
    assert not out.exists() and not (work / "manifest.json").exists(), "no manifest, nothing published"
    parts = sorted(p for p in os.listdir(work / "train") if p.endswith(".parquet"))
    records = sorted(r for r in os.listdir(work / ".progress" / "train") if not r.startswith("."))  # not a record's temp file
    assert any(".tmp-" in p for p in os.listdir(work / "train")), "the half-written part is on disk"
    assert 2 <= len(records) < PARTS and len(parts) >= len(records)

    # another teacher's rerun into the same output is refused in one line; the parts stay
    other = save_teacher("llama", assets["tokenizer"], str(tmp_path / "other"), vocab_rows=assets["vocab"])
    code, lines = cli("python", "-m", "distill.cache", *cache_args(dict(assets, teacher=other), out))
    assert_one_line_error(code, lines, "distill-cache", "holds the parts of an unfinished cache of another teacher", "--overwrite")
    assert sorted(r for r in os.listdir(work / ".progress" / "train") if not r.startswith(".")) == records

    # a complete part damaged since (one bit): written again with the rest, on 1 rank instead of 2
    damaged = work / "train" / records[0].replace(".json", ".parquet")
    blob = bytearray(damaged.read_bytes())
    blob[len(blob) // 2] ^= 1
    damaged.write_bytes(bytes(blob))
    log = run(one_rank(cache_args(assets, out)))
    kept = len(records) - 1
    assert f"{kept} of {PARTS} parts already complete in {work}, writing {PARTS - kept}" in log
    assert "begun" in log and "by 2 ranks; now 1 rank" in log
    assert f"[rank 0/1] INFO distill-cache: {PARTS - kept} parts to write here" in log
    assert_same_cache(out, beam_cache)
    assert not work.exists()


def test_refusals_one_line_each_and_a_finished_cache_is_left_alone(assets, beam_cache, tmp_path):
    # an output inside the dataset (the ranks' entry point)
    code, lines = cli("python", "-m", "distill.cache", *cache_args(assets, os.path.join(assets["data"], "cache")))
    assert_one_line_error(code, lines, "distill-cache", "is inside --data", "must not overlap an input")
    # a teacher whose tokenizer is not the dataset's: refused at the start, nothing written (training would refuse the cache)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets["root"] / "tokenizer"), local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|other|>"]})
    tok.bos_token = "<|other|>"
    foreign = save_teacher("llama", tok, str(tmp_path / "foreign"), vocab_rows=assets["vocab"] + 8)
    code, lines = cli("distill-cache", *cache_args(dict(assets, teacher=foreign), tmp_path / "c"))
    assert_one_line_error(code, lines, "distill-cache", "does not match the one the dataset was prepared with")
    assert os.listdir(tmp_path) == ["foreign"] and not os.path.exists(os.path.join(assets["data"], "cache")), "a refused run left files"
    # the same command again over a finished cache (a requeued job): nothing to do, nothing touched
    manifest = os.stat(beam_cache / "manifest.json")
    assert "already holds this cache" in run([os.path.join(BIN, "distill-cache"), *cache_args(assets, beam_cache)])
    assert os.stat(beam_cache / "manifest.json").st_mtime_ns == manifest.st_mtime_ns


def test_training_from_a_cache_needs_no_teacher_files(assets, beam_cache, tmp_path):
    """No teacher.path: the student's shape, the tokenizer and the identity come from the cache's manifest."""
    out = tmp_path / "run"
    args = ["--config", "configs/llm_kd.yaml", f"data.path={assets['data']}", "teacher.source=cache", f"teacher.cache={beam_cache}"]
    args += ["deepspeed.zero_stage=0", "train.global_batch=8", "train.micro_batch=4", "train.max_steps=1"]
    log = run([os.path.join(BIN, "distill-train"), *args, f"output_dir={out}", "student.init=random"])
    assert "no teacher model in memory" in log and "top-k 8 ids + tail" in log
    assert json.loads(open(out / "metrics.jsonl").readline())["step"] == 1
    code, lines = cli("distill-train", *args, f"output_dir={tmp_path / 'other'}", "student.init=teacher")
    assert_one_line_error(code, lines, "distill-train", "student.init=teacher needs teacher.path", "a teacher cache holds no weights")
