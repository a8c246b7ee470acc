"""Faults of the training side, reproduced for real (issue "nothing lost, nothing executed"):
settings that would diverge or crash, non-finite steps, a second trainer on the same run, a full disk,
an attempt that died before its first checkpoint. Single-process `distill-train` runs (the DeepSpeed
engine, ZeRO-2, gloo) on the tiny fixtures of conftest.py.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import time

import pytest
from support import BIN, ENV, REPO_ROOT, metrics, train_args
from support import blow_up_weights as _blow_up_weights

pytestmark = pytest.mark.timeout(600)
TRAIN = os.path.join(BIN, "distill-train")


def args(teacher_dir, data_dir, out, *extra):
    return [
        *train_args(teacher_dir, data_dir, out),
        "student.init=random",
        "student.init_layers=null",
        "train.global_batch=16",
        "train.micro_batch=8",
        "train.max_steps=6",
        "optim.lr=3e-3",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=1",
        "train.log_every=1",
        "deepspeed.config=configs/deepspeed/zero2.json",
        *extra,
    ]


def train(*argv, check=None):
    proc = subprocess.run([TRAIN, *argv], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=500)
    if check is not None and proc.returncode != check:
        raise AssertionError(f"exit {proc.returncode}, expected {check}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("distill-train: error")]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def complete_checkpoints(out) -> list[str]:
    return sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(out, "checkpoints", "step_*", "COMPLETE")))


# ------------------------------------------------------------------------------------------------
# Every numeric setting is checked before anything is written


def test_a_typo_leaves_nothing_behind_and_every_problem_is_named_at_once(tmp_path, teacher_dir, prepared_dir):
    out = tmp_path / "run"
    proc = train(*args(teacher_dir, prepared_dir, out, "loss.temperature=.nan", "optim.lr=1e10"), check=2)
    line = error_line(proc)
    assert "loss.temperature=nan is not a finite number" in line and "optim.lr=10000000000.0 is out of range" in line
    assert not out.exists()
    # batch sizes that do not divide are known only with the world size: still refused before the run dir is claimed
    proc = train(*args(teacher_dir, prepared_dir, out, "train.global_batch=12"), check=2)
    assert "not a multiple" in error_line(proc) or "not divisible" in error_line(proc)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# Non-finite steps never reach a checkpoint


def test_non_finite_step_stops_before_any_save_and_keeps_the_last_good_checkpoint(tmp_path, teacher_dir, prepared_dir):
    out = str(tmp_path / "run")
    train(*args(teacher_dir, prepared_dir, out, "train.halt_at_step=2"), check=0)
    assert complete_checkpoints(out) == ["step_00000002"]
    _blow_up_weights(out, "step_00000002")
    before = sorted(os.listdir(os.path.join(out, "checkpoints")))

    proc = train(*args(teacher_dir, prepared_dir, out), check=2)
    line = error_line(proc)
    assert "step 3: loss term" in line and "not a finite number" in line and "stopped before saving" in line, line
    assert "step_00000002" in line  # names the checkpoint to resume from
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before  # nothing written, nothing pruned
    assert metrics(out)[-1]["step"] == 3  # the bad step is logged

    # skip mode: ZeRO's overflow check leaves the weights untouched, two skips allowed, then the weights
    # (still not finite) are refused at the step-4 save
    proc = train(*args(teacher_dir, prepared_dir, out, "train.max_nonfinite_steps=2"), check=2)
    assert "skipped this update (1 of train.max_nonfinite_steps=2" in proc.stderr
    assert "step 4: the weights are not finite numbers; stopped before saving" in error_line(proc)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before
    rows = metrics(out)[-2:]
    assert [r["step"] for r in rows] == [3, 4] and all(r.get("skipped_update") for r in rows) and rows[-1]["skipped_steps"] == 2


# ------------------------------------------------------------------------------------------------
# One trainer per run directory


def test_second_trainer_is_refused_and_a_dead_holder_does_not_block(tmp_path, teacher_dir, prepared_dir):
    out = str(tmp_path / "run")
    log_path = tmp_path / "first.log"
    first = subprocess.Popen(
        [TRAIN, *args(teacher_dir, prepared_dir, out, "train.max_steps=400", "checkpoint.every_steps=1000")],
        cwd=REPO_ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "w"),
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while not (os.path.exists(os.path.join(out, "metrics.jsonl")) and metrics(out)):
            assert first.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "the first trainer did not start"
            time.sleep(0.2)
        second = train(*args(teacher_dir, prepared_dir, out), check=2)
        line = error_line(second)
        assert f"is in use by another trainer (pid {first.pid} on host" in line, line
        assert first.poll() is None  # the first one is untouched
        steps_before = len(metrics(out))
        os.killpg(first.pid, signal.SIGKILL)  # dies holding the lock, before any checkpoint
        first.wait(60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert steps_before >= 1 and not complete_checkpoints(out)

    # the dead holder's lock is gone with it; that attempt wrote no checkpoint, so corrected settings may take the directory
    third = train(*args(teacher_dir, prepared_dir, out, "optim.lr=1e-3", "train.max_steps=2"), check=0)
    assert "never wrote a checkpoint" in third.stderr
    assert [r["step"] for r in metrics(out)] == [1, 2]
    aside = glob.glob(os.path.join(out, "abandoned", "*", "metrics.jsonl"))
    assert len(aside) == 1 and sum(1 for _ in open(aside[0])) >= steps_before
    assert not os.path.exists(os.path.join(out, ".lock"))  # released at the end


# ------------------------------------------------------------------------------------------------
# Disk full


@pytest.fixture
def small_filesystem(tmp_path):
    """A tmpfs of a few MB (needs root: skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()

    def make(megabytes: int) -> str:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}M", "tmpfs", str(mount)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): the disk-full test needs root")
        return str(mount)

    yield make
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _checkpoint_megabytes(out: str, tag: str) -> float:
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(out, "checkpoints", tag)) for f in files)
    return total / 2**20


def test_disk_full_says_so_and_keeps_the_last_complete_checkpoint(tmp_path, teacher_dir, prepared_dir, small_filesystem):
    probe = str(tmp_path / "probe")
    train(*args(teacher_dir, prepared_dir, probe, "train.max_steps=2"), check=0)
    size = _checkpoint_megabytes(probe, "step_00000002")
    out = os.path.join(small_filesystem(int(size * 1.6) + 2), "run")  # room for one checkpoint (and the logs), not two

    proc = train(*args(teacher_dir, prepared_dir, out, "checkpoint.keep_last=0"), check=2)
    line = error_line(proc)
    assert "no space left on the filesystem of" in line and "a checkpoint needs ~" in line and "MB free" in line, line
    assert "step_00000002 is kept" in line
    assert complete_checkpoints(out) == ["step_00000002"]
    assert open(os.path.join(out, "checkpoints", "latest")).read() == "step_00000002"
    assert not glob.glob(os.path.join(out, "checkpoints", "step_00000004*"))
