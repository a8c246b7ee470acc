"""Stop signals reaching a real 2-process DeepSpeed run from every side: the `deepspeed` launcher killed
alone, the launch scripts signalled (alone, as a process group, on one of two "nodes") or killed, a
worker crashing under them. Nothing is mocked; each run is stopped a few steps in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import psutil
import pytest
from support import BIN, ENV, REPO_ROOT, latest, metrics, run, steps_logged, train_args, wait_for, worker

pytestmark = pytest.mark.timeout(600)
STEPS = 20  # the stop lands a step or two after the signal (at step 2), long before this
SCRIPT_ENV = dict(ENV, PATH=f"{BIN}{os.pathsep}{ENV['PATH']}")


def job_args(teacher_dir, data_dir, out, steps=STEPS):
    return [
        *train_args(teacher_dir, data_dir, out),
        "student.init=random",
        "student.init_layers=null",
        "train.global_batch=32",
        "train.micro_batch=8",
        f"train.max_steps={steps}",
        "optim.lr=3e-3",
        "checkpoint.every_steps=1000",
        "checkpoint.keep_last=0",
        "train.log_every=1",
    ]


def start(cmd, env):
    return subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def processes_of(out) -> list[psutil.Process]:
    """Every live process of the run writing to `out` (script, launcher, workers: their command lines name it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if f"output_dir={out}" in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
            found.append(proc)
    return found


@contextlib.contextmanager
def no_leftovers(out, *procs):
    """Kill whatever is left of the run in the end, whichever process group or session it ended up in."""
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in processes_of(out):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=30)


def finish(proc, timeout=300) -> str:
    """The run's whole output: returns once every process holding its stdout (launcher, workers) has exited."""
    output, _ = proc.communicate(timeout=timeout)
    return output


def assert_stopped_with_complete_checkpoint(out, output) -> int:
    k = steps_logged(out)
    assert 2 <= k < STEPS and latest(out) == f"step_{k:08d}", (k, output[-3000:])
    step_dir = out / "checkpoints" / f"step_{k:08d}"
    assert (step_dir / "COMPLETE").exists()
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(os.listdir(step_dir))
    assert f"stopped at step {k} of {STEPS} on request" in output
    assert not processes_of(out), "a worker or launcher outlived the run"
    return k


def test_sigterm_to_deepspeed_launcher_alone_stops_every_worker_with_checkpoint_and_rerun_resumes(tmp_path, teacher_dir, prepared_dir):
    """Before: the launcher died, its per-node launcher and workers trained on to the end unsupervised."""
    out = tmp_path / "run"
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29781", "--module", "distill"]
    proc = start(cmd + job_args(teacher_dir, prepared_dir, out), ENV)
    with no_leftovers(out, proc):
        wait_for(lambda: steps_logged(out) >= 2, proc, what="step 2")
        proc.send_signal(signal.SIGTERM)  # the `deepspeed` process only
        output = finish(proc)
        k = assert_stopped_with_complete_checkpoint(out, output)
        assert f"on request (launcher process {proc.pid} exited)" in output

        again = run(cmd + job_args(teacher_dir, prepared_dir, out))
        assert f"resumed from {out}/checkpoints/step_{k:08d}" in again.stdout + again.stderr
        assert [m["step"] for m in metrics(out)] == list(range(1, STEPS + 1)), "every step trained exactly once"


def test_sigterm_to_process_group_of_single_node_sh_checkpoints_and_exits_99(tmp_path, teacher_dir, prepared_dir):
    """Before: the launcher died of it (exit 143) while the workers checkpointed; Ctrl-C (SIGINT) crashed them."""
    out = tmp_path / "run"
    proc = start(["launch/single_node.sh", "2"] + job_args(teacher_dir, prepared_dir, out), dict(SCRIPT_ENV, MASTER_PORT="29782"))
    with no_leftovers(out, proc):
        wait_for(lambda: steps_logged(out) >= 2, proc, what="step 2")
        os.killpg(proc.pid, signal.SIGTERM)  # the script's process group, as a terminal or `kill -- -PGID` does
        output = finish(proc)
        assert proc.returncode == 99, output[-3000:]
        assert_stopped_with_complete_checkpoint(out, output)
        assert "received SIGTERM: asking every worker" in output and "the workers checkpointed on request: exit 99" in output


def test_sigusr1_to_node_launch_sh_of_one_node_stops_both_nodes_with_exit_99(tmp_path, teacher_dir, prepared_dir):
    """Two node launchers (one process each) on loopback; only node 0's script hears the signal."""
    out = tmp_path / "run"
    env = dict(SCRIPT_ENV, NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29783")
    nodes = [start(["launch/node_launch.sh"] + job_args(teacher_dir, prepared_dir, out), dict(env, NODE_RANK=str(r))) for r in (0, 1)]
    with no_leftovers(out, *nodes):
        wait_for(lambda: steps_logged(out) >= 2, nodes[1], what="step 2")
        nodes[0].send_signal(signal.SIGUSR1)
        outputs = [finish(node) for node in nodes]
        assert [n.returncode for n in nodes] == [99, 99], outputs[0][-2000:] + outputs[1][-2000:]
        assert_stopped_with_complete_checkpoint(out, outputs[0])
        assert (
            "received SIGUSR1: asking every worker" in outputs[0] and "received SIG" not in outputs[1]
        )  # node 1 stopped with node 0's ranks


def test_sigkill_to_launch_script_stops_its_workers_with_checkpoint(tmp_path, teacher_dir, prepared_dir):
    """The launcher runs in its own session (so the script can forward signals); the workers watch the script."""
    out = tmp_path / "run"
    proc = start(["launch/single_node.sh", "2"] + job_args(teacher_dir, prepared_dir, out), dict(SCRIPT_ENV, MASTER_PORT="29784"))
    with no_leftovers(out, proc):
        wait_for(lambda: steps_logged(out) >= 2, proc, what="step 2")
        proc.send_signal(signal.SIGKILL)
        output = finish(proc)
        assert proc.returncode == -signal.SIGKILL
        assert_stopped_with_complete_checkpoint(out, output)
        assert f"on request (launcher process {proc.pid} exited)" in output


def test_sigkill_of_a_worker_under_launch_script_is_a_failure_not_99(tmp_path, teacher_dir, prepared_dir):
    """A crash is not a requeue: the script exits non-zero, other than 99, once every process is gone."""
    out = tmp_path / "run"
    proc = start(["launch/single_node.sh", "2"] + job_args(teacher_dir, prepared_dir, out), dict(SCRIPT_ENV, MASTER_PORT="29785"))
    with no_leftovers(out, proc):
        wait_for(lambda: steps_logged(out) >= 2, proc, what="step 2")
        worker(proc, 1).send_signal(signal.SIGKILL)
        output = finish(proc)
        assert proc.returncode not in (0, 99), output[-3000:]
        assert not processes_of(out)
