"""Console entry points: distill-train, distill-export (thin wrappers over the library); distill-eval is distill.tools.evaluate:main."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
    """Every error a user can act on (kd_common.errors.UserError): one line, exit 2."""
    from kd_common.errors import UserError

    return (UserError,)


def _fail(prog: str, exc: BaseException) -> int:
    """One line on stderr (from rank 0 only when distributed), exit code 2."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or getattr(exc, "rank_local", False):  # an error only one rank saw is said by that rank
        message = " ".join(str(exc).split())
        where = "" if rank == "0" else f" (rank {rank})"
        print(f"{prog}: error{where}: {message}", file=sys.stderr, flush=True)
    return 2


def check_result_file(path: str, inputs: list[tuple[str, str | None]], name: str = "--json") -> None:
    """A result file (written atomically later) must not be an input, lie inside one, or be a directory."""
    from kd_common.output_rule import OutputError, check_no_overlap

    check_no_overlap(path, [(n, p) for n, p in inputs if p], name)
    if os.path.isdir(path):
        raise OutputError(f"{name} {path!r} is a directory; give a file path for the JSON result")


def train_main(argv: list[str] | None = None) -> int:
    from distill.config import Config, ConfigError, describe_fields
    from kd_common.config import add_arguments, from_arguments

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
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(describe_fields()))
        return 0
    if not args.config and not args.overrides and not any(k.startswith("setting:") for k in vars(args)):
        parser.error("--config is required (e.g. --config configs/distilbert.yaml)")
    if args.check:
        return _check_train(args, Config, from_arguments, ConfigError)
    try:
        config = from_arguments(Config, args, replace=("weights",))
        from distill.train.trainer import train

        result = train(config, args.local_rank)
    except _user_errors() as exc:
        return _fail("distill-train", exc)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = OSError(
            f"no space left writing {exc.filename or 'the run directory'} ({exc.strerror}); the newest complete checkpoint "
            f"is kept: free space, then rerun the same command to resume"
        )
        full.rank_local = True  # type: ignore[attr-defined]  # every rank that hit it says so
        return _fail("distill-train", full)
    from distill.train.distributed import end_finished_rank
    from distill.train.preemption import PREEMPTED_EXIT_CODE

    # checkpointed on request (stopped_by): the scheduler requeues, the same command resumes
    code = PREEMPTED_EXIT_CODE if result.get("stopped_by") else 0
    end_finished_rank(code)  # several ranks: ends the process here, after the run's last barrier
    return code


def _check_train(args, config_cls, from_arguments, config_error) -> int:
    """`distill-train --check`: the resolved config, then every problem (or none); exit 2 when there are problems."""
    import torch

    try:
        config = from_arguments(config_cls, args, replace=("weights",))
    except config_error as exc:
        print("problems (config):\n" + "\n".join(f"  - {p}" for p in exc.problems))
        return 2
    from distill.train.preflight import preflight

    print(config.to_yaml(), end="")
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    found = preflight(config, world, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if found.problems:
        print(f"problems ({world} rank{'s' if world > 1 else ''}):\n" + "\n".join(f"  - {p}" for p in found.problems))
        return 2
    print(f"no problems found for {world} rank{'s' if world > 1 else ''}: ready to run")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    from distill.tools.export import ExportConfig, export_checkpoint
    from kd_common.config import add_arguments, from_arguments

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
    except _user_errors() as exc:
        return _fail("distill-export", exc)
    print(out)
    return 0
