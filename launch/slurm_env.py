"""Turn a Slurm allocation (and the job's own arguments) into the launcher's environment.

    eval "$(python -m launch.slurm_env --config configs/distilbert.yaml output_dir=... )"

prints `export` lines for NNODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT and OUTPUT_DIR (the
run's output_dir resolved from the recipe and its overrides, where the stop file and logs go).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

PORT_BASE, PORT_SPAN = 20000, 20000


def first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list such as `gpu[003-010,12]`."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True).stdout.split()
    if not out:
        raise ValueError(f"scontrol could not expand the node list {nodelist!r}")
    return out[0]


def gpus_per_node(env: dict[str, str]) -> int:
    """GPUs Slurm gave each node (--gpus-per-node / --gres=gpu:N), else GPUS_PER_NODE, else 1."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        if value:
            return int(value.split(":")[-1].split("(")[0])
    return int(env.get("GPUS_PER_NODE", "1"))


def launcher_env(env: dict[str, str], job_args: list[str]) -> dict[str, str]:
    """The variables launch/node_launch.sh needs, for this allocation."""
    from distill.config import load_config

    missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES") if k not in env]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set: run this inside a Slurm job (sbatch launch/slurm.sbatch ...)")
    config_path, overrides = None, []
    args = list(job_args)
    while args:
        arg = args.pop(0)
        if arg == "--config" and args:
            config_path = args.pop(0)
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
    config = load_config(config_path, overrides)
    return {
        "NNODES": env["SLURM_JOB_NUM_NODES"],
        "GPUS_PER_NODE": str(gpus_per_node(env)),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
        # one port per job, so two jobs sharing a node do not collide
        "MASTER_PORT": env.get("MASTER_PORT") or str(PORT_BASE + int(env["SLURM_JOB_ID"]) % PORT_SPAN),
        "OUTPUT_DIR": os.path.abspath(config.output_dir),
    }


def main(argv: list[str] | None = None) -> int:
    try:
        values = launcher_env(dict(os.environ), sys.argv[1:] if argv is None else argv)
    except Exception as exc:  # one line for the job log
        print(f"slurm_env: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for key, value in values.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
