"""Console entry points: distill-train, distill-export (thin wrappers over the library); distill-eval is distill.tools.evaluate:main."""

from __future__ import annotations

import argparse
import errno
import logging
import os

from kd_common.config import add_arguments, from_arguments
from kd_common.errors import UserError, report_one_line


def train_parser() -> argparse.ArgumentParser:
    """distill-train's command line (also how launch/slurm_env.py reads a job's arguments): flags, --config and key=value overrides."""
    from distill.config import Config  # distill.config: not at start-up of distill-export

    parser = argparse.ArgumentParser(
        prog="distill-train",
        description="Distil a teacher into a student with DeepSpeed. Start it with "
        "`deepspeed --num_gpus N --module distill --config ...` or as one process. Settings come from "
        "--config, then key=value overrides, then the flags below (later wins).",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default, meaning and bounds")
    parser.add_argument(
        "--check",
        action="store_true",
        help="print the resolved config and every problem found reading only configs "
        "(dataset manifest, teacher config.json and tokenizer, DeepSpeed JSON; no weights), then exit: 0 = ready to run",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="with --check: the number of ranks to check batch sizes for (default: $WORLD_SIZE or 1)",
    )
    add_arguments(parser, Config)
    return parser


def train_config(args: argparse.Namespace):
    """The run config from parsed distill-train arguments (--config < key=value < flags), every problem checked."""
    from distill.config import Config  # distill.config: not at start-up of distill-export

    return from_arguments(Config, args, replace=("weights",))  # a weights override replaces the whole mapping


def train_main(argv: list[str] | None = None) -> int:
    from distill.config import ConfigError, describe_fields  # distill.config: not at start-up of distill-export

    parser = train_parser()
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(describe_fields()))
        return 0
    if not args.config and not args.overrides and not any(k.startswith("setting:") for k in vars(args)):
        parser.error("--config is required (e.g. --config configs/distilbert.yaml)")
    if args.check:
        return _check_train(args, ConfigError)
    try:
        config = train_config(args)
        from distill.train.trainer import train  # torch (via distill.train.trainer): not at start-up

        result = train(config, args.local_rank)
    except UserError as exc:
        return report_one_line("distill-train", exc)
    except RuntimeError as exc:  # a collective timed out (distill/train/heartbeat.py names a rank that went silent before)
        from distill.train.heartbeat import collective_timeout_error  # psutil (via distill.train.heartbeat): not at start-up

        timeout = collective_timeout_error(exc)
        if timeout is None:
            raise
        return report_one_line("distill-train", timeout)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = OSError(
            f"no space left writing {exc.filename or 'the run directory'} ({exc.strerror}); the newest complete checkpoint "
            f"is kept: free space, then rerun the same command to resume"
        )
        full.rank_local = True  # type: ignore[attr-defined]  # every rank that hit it says so
        return report_one_line("distill-train", full)
    from distill.train.distributed import end_finished_rank  # torch (via distill.train.distributed): not at start-up
    from distill.train.preemption import PREEMPTED_EXIT_CODE  # psutil (via distill.train.preemption): not at start-up

    # checkpointed on request (stopped_by): the scheduler requeues, the same command resumes
    code = PREEMPTED_EXIT_CODE if result.get("stopped_by") else 0
    end_finished_rank(code)  # several ranks: ends the process here, after the run's last barrier
    return code


def _check_train(args, config_error) -> int:
    """`distill-train --check`: the resolved config, then every problem (or none); exit 2 when there are problems."""
    import torch  # torch: not at start-up

    try:
        config = train_config(args)
    except config_error as exc:
        print("problems (config):\n" + "\n".join(f"  - {p}" for p in exc.problems))
        return 2
    from distill.train.preflight import preflight  # torch (via distill.train.preflight): not at start-up

    print(config.to_yaml(), end="")
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = preflight(config, world, device)
    from distill.train.memory_estimate import estimate_from_preflight  # torch (via distill.train.memory_estimate): not at start-up

    estimate = estimate_from_preflight(config, world, device, found)
    if found.problems:
        print(f"problems ({world} rank{'s' if world > 1 else ''}):\n" + "\n".join(f"  - {p}" for p in found.problems))
    else:
        print(f"no problems found for {world} rank{'s' if world > 1 else ''}: ready to run")
    if estimate is not None:  # after the verdict: what precedes it stays the resolved config's YAML
        print("\n".join(estimate.lines()))
    return 2 if found.problems else 0


def export_main(argv: list[str] | None = None) -> int:
    from distill.tools.export import ExportConfig, export_checkpoint  # torch (via distill.tools.export): not at start-up

    parser = argparse.ArgumentParser(
        prog="distill-export",
        description="Export a checkpoint (any ZeRO stage) as a Hugging Face model directory. Settings: --config YAML < key=value < flags.",
    )
    add_arguments(parser, ExportConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("deepspeed").setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        cfg = from_arguments(ExportConfig, args)
        out = export_checkpoint(cfg.checkpoint, cfg.output, cfg.overwrite)
    except UserError as exc:
        return report_one_line("distill-export", exc)
    print(out)
    return 0
