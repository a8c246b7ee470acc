"""launch/slurm_env.py turns a Slurm allocation into the launcher's variables, in process (the launches: tests/e2e/test_launch.py)."""

from __future__ import annotations

import pytest


def test_slurm_env_turns_the_allocation_into_launcher_variables(tmp_path):
    from launch.slurm_env import gpus_per_node, launcher_env

    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[001-004]",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_GPUS_ON_NODE": "8",
        "MASTER_ADDR": "gpu001",
    }
    got = launcher_env(env, ["--config", "configs/distilbert.yaml", f"output_dir={tmp_path}/run", "data.path=/d", "teacher.path=/t"])
    assert got == {
        "NNODES": "4",
        "GPUS_PER_NODE": "8",
        "MASTER_ADDR": "gpu001",
        "MASTER_PORT": str(20000 + 123456 % 20000),
        "OUTPUT_DIR": f"{tmp_path}/run",
    }
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "a100:4"}) == 4 and gpus_per_node({}) == 1
    with pytest.raises(ValueError, match="inside a Slurm job"):
        launcher_env({}, [])


def test_a_teacher_cache_job_keeps_its_logs_beside_the_cache(tmp_path):
    """DISTILL_MODULE=distill.cache: launch/node_launch.sh runs the cache's ranks with distill-cache's arguments; the job's
    logs and stop file go to OUTPUT.slurm, never into the cache (moved into --output only when complete)."""
    from launch.slurm_env import launcher_env

    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_JOB_NUM_NODES": "2",
        "MASTER_ADDR": "n1",
        "DISTILL_MODULE": "distill.cache",
    }
    args = ["--data", "/d", "--teacher", "/t", "--output", f"{tmp_path}/cache/", "--k", "64", "batch_size=8"]
    assert launcher_env(env, args)["OUTPUT_DIR"] == f"{tmp_path}/cache.slurm"
    with pytest.raises(ValueError, match="DISTILL_MODULE=distill.tools is not one of distill, distill.cache"):
        launcher_env(dict(env, DISTILL_MODULE="distill.tools"), args)
