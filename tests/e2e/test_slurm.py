"""launch/slurm.sbatch under a real one-node Slurm cluster (slurmctld + slurmd on this machine, CPU, 2 ranks).

The test installs Debian's slurm-wlm and munge when they are missing (root + apt), starts munged,
slurmctld and slurmd with a throw-away slurm.conf, submits the project's sbatch script with sbatch,
and checks what the job wrote. The second test preempts the job (USR1 to the batch script, as
`--signal=B:USR1@...` does before a time limit) and checks it checkpointed, was requeued and resumed.
Skipped, with the reason, only where Slurm cannot be installed or started.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
from support import REPO_ROOT, metrics, train_args

pytestmark = pytest.mark.timeout(900)


def _sh(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _ensure_installed():
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and cannot be (needs root and apt-get): apt-get install slurm-wlm munge")
    proc = _sh(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if proc.returncode != 0:
        pytest.skip(f"apt-get install slurm-wlm munge failed: {proc.stderr.strip().splitlines()[-1:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node cluster; yields the environment that points sbatch/squeue/scontrol at it."""
    _ensure_installed()
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    hw = dict(kv.split("=", 1) for kv in _sh(["slurmd", "-C"]).stdout.split() if "=" in kv)
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    conf.write_text(f"""
ClusterName=distilltest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=60
NodeName={host} CPUs={hw.get("CPUs", 2)} RealMemory={int(hw.get("RealMemory", 4000)) // 2} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    os.makedirs("/run/munge", exist_ok=True)
    if _sh(["pgrep", "-x", "munged"]).returncode != 0:
        started = _sh(["munged", "--force"])
        if started.returncode != 0:
            pytest.skip(f"munged does not start here: {started.stderr.strip()}")
    daemons = [
        subprocess.Popen([b, "-D", "-f", str(conf)] + extra, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for b, extra in (("slurmctld", ["-i"]), ("slurmd", []))
    ]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            info = _sh(["sinfo", "-h", "-o", "%T"], env=env)
            if info.returncode == 0 and info.stdout.strip() in ("idle", "mixed"):
                break
            time.sleep(1)
        else:
            log = (d / "slurmctld.log").read_text()[-2000:] if (d / "slurmctld.log").exists() else ""
            pytest.skip(f"the local Slurm cluster did not come up: {info.stdout.strip()} {info.stderr.strip()} {log}")
        yield env
    finally:
        _sh(["scancel", "--full", "-u", "root"], env=env)
        for proc in daemons:
            proc.terminate()
        for proc in daemons:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _job(env, job_id) -> dict[str, str]:
    out = _sh(["scontrol", "show", "job", job_id, "-o"], env=env).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait_done(env, job_id, timeout=600) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(env, job_id)
        if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return job
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {_job(env, job_id)}")


def _start_when_requeued(env, job_id, timeout=600) -> None:
    """Slurm holds a requeued job back (its BeginTime ~2 minutes ahead); once the job is pending again after its restart,
    let it start now. Only the test's wait is shortened: the requeue itself is what launch/slurm.sbatch did."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(env, job_id)
        if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return
        if job.get("JobState") == "PENDING" and int(job.get("Restarts", 0)) >= 1:
            _sh(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env)
            return
        time.sleep(1)


def _submit(env, tmp_path, args, name):
    env = dict(env, GPUS_PER_NODE="2", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = _sh(
        ["sbatch", "--parsable", f"--output={tmp_path}/{name}-%j.out", "--cpus-per-task=2", "launch/slurm.sbatch"] + args,
        cwd=REPO_ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job_args(teacher_dir, prepared_dir, out, steps):
    return [
        *train_args(teacher_dir, prepared_dir, out),
        "student.init=random",
        "student.init_layers=null",
        "train.global_batch=32",
        "train.micro_batch=8",
        f"train.max_steps={steps}",
        "optim.lr=3e-3",
        "checkpoint.every_steps=100",
        "train.log_every=1",
    ]


def test_sbatch_trains_two_ranks_and_writes_checkpoint_and_per_rank_logs(slurm, tmp_path, teacher_dir, prepared_dir):
    out = tmp_path / "run"
    job_id = _submit(slurm, tmp_path, _job_args(teacher_dir, prepared_dir, out, 4), "train")
    job = _wait_done(slurm, job_id)
    job_log = (tmp_path / f"train-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", f"{job}\n{job_log}"
    assert "1 node(s) x 2 process(es)" in job_log and "training exited with 0" in job_log
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert (out / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    log_dir = out / "logs" / job_id
    rank_logs = sorted(os.listdir(log_dir / "rank-logs"))
    assert len(rank_logs) == 2, rank_logs
    rank0 = (log_dir / "rank-logs" / rank_logs[0]).read_text() + (log_dir / "rank-logs" / rank_logs[1]).read_text()
    assert "[rank 0/2]" in rank0 and "training finished at step 4" in rank0
    assert (log_dir / "node-0.log").exists()


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path, teacher_dir, prepared_dir):
    out = tmp_path / "run"
    steps = 60  # long enough that the stop notice, sent after step 3, lands mid-run (a warm job ran 12 steps before it did)
    job_id = _submit(slurm, tmp_path, _job_args(teacher_dir, prepared_dir, out, steps), "preempt")
    deadline = time.time() + 600
    while time.time() < deadline and not (out / "metrics.jsonl").exists() or len(metrics(out)) < 3:
        assert time.time() < deadline, "the job never started training"
        time.sleep(0.2)
    # What --signal=B:USR1@300 does before the time limit: USR1 to the batch script only.
    assert _sh(["scancel", "--signal=USR1", "--batch", job_id], env=slurm).returncode == 0
    _start_when_requeued(slurm, job_id)
    job = _wait_done(slurm, job_id, timeout=800)
    job_log = (tmp_path / f"preempt-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", f"{job}\n{job_log}"
    assert int(job.get("Restarts", 0)) == 1, job_log
    assert "received a stop notice" in job_log and f"requeueing job {job_id}" in job_log
    assert "restart 1" in job_log and "training exited with 0" in job_log
    # metrics.jsonl is appended by both attempts: 1..k from the first, k+1..steps from the requeued one
    steps_seen = [m["step"] for m in metrics(out)]
    assert steps_seen == list(range(1, steps + 1)), f"the requeued job did not continue where the first stopped: {steps_seen}"
    state = json.loads((out / "checkpoints" / f"step_{steps:08d}" / "trainer_state.json").read_text())
    assert state["step"] == steps
    logs = "".join(p.read_text() for p in (out / "logs").rglob("*") if p.is_file())
    stop_line = [line for line in logs.splitlines() if "stopped at step" in line]
    assert stop_line, "the first attempt did not report its cooperative stop"
    k = int(stop_line[0].split("stopped at step ")[1].split()[0])
    assert 3 <= k < steps and f"resumed from {out}/checkpoints/step_{k:08d}" in logs
