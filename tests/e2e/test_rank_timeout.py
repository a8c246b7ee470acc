"""A rank that stops answering (SIGSTOP) in a real 2-process DeepSpeed run: the other rank names it in one line within a
bound, the stopped one is ended, the run exits non-zero, and the same command resumes from the newest complete checkpoint.
Also the backstop: a collective that times out for a rank that is alive but never arrives is one line too."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import psutil
import pytest
from support import fault_job_args as job_args
from support import latest, launcher, metrics, run, start, steps_logged, wait_for, worker

from distill.train.heartbeat import RANK_STOPPED_EXIT_CODE

pytestmark = pytest.mark.timeout(900)
TIMEOUT_S = 20  # train.collective_timeout_s: a rank silent for 10 s is named


def test_sigstopped_rank_is_named_ended_and_the_run_resumes(tmp_path, teacher_dir, prepared_dir):
    out = tmp_path / "run"
    args = job_args(teacher_dir, prepared_dir, out) + [f"train.collective_timeout_s={TIMEOUT_S}"]
    proc = start(args, 29671)
    wait_for(lambda: steps_logged(out) >= 5, proc, what="step 5")  # checkpoint 4 is complete
    stopped = worker(proc, 1)
    stopped.send_signal(signal.SIGSTOP)
    t0 = time.time()
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # the test failed: leave nothing stopped behind
            stopped.send_signal(signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
    took = time.time() - t0
    print(f"the run ended {took:.1f} s after the SIGSTOP of rank 1, exit code {proc.returncode}")
    errors = [line for line in output.splitlines() if line.startswith("distill-train: error")]
    assert len(errors) == 1, output[-4000:]
    assert errors[0].startswith("distill-train: error (rank 0): rank 1 (pid ") and "stopped answering" in errors[0], errors[0]
    assert "stopped (SIGSTOP), killed" in errors[0] and f"train.collective_timeout_s={TIMEOUT_S}" in errors[0], errors[0]
    assert "Traceback" not in output, output[-4000:]
    # named after 10 s of silence (+ up to 2 heartbeat intervals), before gloo's own 20 s timeout; the launcher adds a poll
    assert 8 < took < 45, f"the run ended {took:.0f} s after the stop"
    # rank 0 exits RANK_STOPPED_EXIT_CODE; the launcher reports it, or the SIGKILL of rank 1 if it polls that one first
    assert proc.returncode in (RANK_STOPPED_EXIT_CODE, 256 - signal.SIGKILL), proc.returncode
    assert not stopped.is_running() or stopped.status() == psutil.STATUS_ZOMBIE, "the stopped rank is ended too"

    k = steps_logged(out)
    complete = latest(out)
    assert complete in ("step_00000004", "step_00000008") and (out / "checkpoints" / complete / "COMPLETE").exists()
    assert k >= int(complete[5:])
    again = run(launcher(args, 29671))
    log = again.stdout + again.stderr
    assert f"resumed from {out}/checkpoints/{complete}" in log
    assert latest(out) == "step_00000012"
    assert [m["step"] for m in metrics(out)] == list(range(1, 13)), "each step once: the redone steps replaced the stopped run's lines"
    assert not (out / "heartbeat").exists() or not os.listdir(out / "heartbeat"), "a finished run leaves no heartbeat file"


def _timed_out_collective(rank: int, port: int, queue) -> None:
    """Rank 0 waits 3 s at an all-reduce that rank 1 (alive, sleeping) never joins."""
    import datetime

    import torch
    import torch.distributed as dist

    from distill.train.heartbeat import collective_timeout_error

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=3))
    if rank == 1:
        time.sleep(8)
        return
    try:
        dist.all_reduce(torch.ones(2))
        queue.put(None)
    except RuntimeError as exc:
        error = collective_timeout_error(exc)
        queue.put((type(error).__name__, str(error), collective_timeout_error(RuntimeError("something else"))))


def test_a_collective_timeout_is_one_named_error():
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_timed_out_collective, args=(r, 29672, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert got is not None, "the all-reduce did not time out"
    name, message, other = got
    assert name == "CollectiveTimeout" and "train.collective_timeout_s" in message and "Timed out waiting 3000ms" in message
    assert other is None, "only a timed-out collective is converted"


def test_collective_timeout_setting_is_checked_and_resolved():
    from distill.config import ConfigError, load_config
    from distill.train.distributed import default_collective_timeout_s

    base = ["output_dir=o", "data.path=d", "teacher.path=t"]
    assert load_config("configs/distilbert.yaml", base).train.collective_timeout_s is None
    assert load_config("configs/distilbert.yaml", base + ["train.collective_timeout_s=20"]).train.collective_timeout_s == 20
    for bad in ("5", "inf", "soon"):
        with pytest.raises(ConfigError, match="train.collective_timeout_s"):
            load_config("configs/distilbert.yaml", base + [f"train.collective_timeout_s={bad}"])
    assert (default_collective_timeout_s(cuda=True), default_collective_timeout_s(cuda=False)) == (1800.0, 600.0)
