"""Turn a Slurm allocation (and the job's own arguments) into the launcher's environment.

    eval "$(python -m launch.slurm_env --config configs/distilbert.yaml output_dir=... )"

prints `export` lines for NNODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT and OUTPUT_DIR (the run's output_dir
resolved by distill-train's own parser and config mechanism from the recipe, its overrides and flags, where the stop
file and logs go; with DISTILL_MODULE=distill.cache, the cache's --output + ".slurm", beside it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from kd_common.errors import UserError

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


class JobArgumentsError(UserError, ValueError):
    """The job's distill-train arguments do not parse (an unknown flag, a flag without its value)."""


def job_config(job_args: list[str]):
    """The run config of distill-train's arguments, read by distill-train's own parser and config mechanism
    (--config < key=value < flags, generated flags such as --output-dir X included)."""
    from distill.cli import train_config, train_parser  # pydantic (via distill.cli): not before the Slurm variables are checked

    parser = train_parser()
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args(job_args)
    except argparse.ArgumentError as exc:
        raise JobArgumentsError(f"distill-train arguments: {exc}") from None
    if unknown:
        raise JobArgumentsError(f"distill-train does not take {' '.join(unknown)} (see distill-train --help)")
    return train_config(args)


MODULES = ("distill", "distill.cache")  # what launch/node_launch.sh may run: training, or the teacher cache's ranks


def cache_job_dir(job_args: list[str]) -> str:
    """Where a distill-cache job's logs (and the stop file the script writes) go: OUTPUT.slurm beside its --output, never
    inside it (the cache is moved into --output only when complete), read by distill-cache's own parser."""
    from distill.cache.cli import cache_parser  # pydantic (via distill.cache.cli): not before the Slurm variables are checked
    from distill.cache.settings import CacheConfig  # pydantic: not before the Slurm variables are checked
    from kd_common.config import from_arguments  # pydantic: not before the Slurm variables are checked

    parser = cache_parser()
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args(job_args)
        args.overrides = [a for a in unknown if "=" in a and not a.startswith("-")]
        output = from_arguments(CacheConfig, args).output
    except argparse.ArgumentError as exc:
        raise JobArgumentsError(f"distill-cache arguments: {exc}") from None
    return os.path.abspath(output.rstrip(os.sep)) + ".slurm"


def launcher_env(env: dict[str, str], job_args: list[str]) -> dict[str, str]:
    """The variables launch/node_launch.sh needs, for this allocation (DISTILL_MODULE=distill.cache: a teacher-cache job)."""
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES") if k not in env]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set: run this inside a Slurm job (sbatch launch/slurm.sbatch ...)")
    module = env.get("DISTILL_MODULE", "distill")
    if module not in MODULES:
        raise ValueError(f"DISTILL_MODULE={module} is not one of {', '.join(MODULES)} (training, or the teacher cache's ranks)")
    output_dir = cache_job_dir(job_args) if module == "distill.cache" else os.path.abspath(job_config(job_args).output_dir)
    return {
        "NNODES": env["SLURM_JOB_NUM_NODES"],
        "GPUS_PER_NODE": str(gpus_per_node(env)),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
        # one port per job, so two jobs sharing a node do not collide
        "MASTER_PORT": env.get("MASTER_PORT") or str(PORT_BASE + int(env["SLURM_JOB_ID"]) % PORT_SPAN),
        "OUTPUT_DIR": output_dir,
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
