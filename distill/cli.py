"""Console entry points: distill-train, distill-export, distill-eval (thin wrappers over the library)."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from data_prep.manifest import DatasetError



def _user_errors() -> tuple[type[BaseException], ...]:
    from distill.checkpoint import CheckpointError
    from distill.config import ConfigError
    from distill.export import ExportError
    from distill.guards import TrainingStopped
    from distill.models import ModelError
    from distill.run_lock import RunLockedError
    from kd_common.outputs import OutputError

    return (DatasetError, ConfigError, ModelError, CheckpointError, ExportError, TrainingStopped, RunLockedError, OutputError)


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
    from kd_common.outputs import OutputError, check_no_overlap

    check_no_overlap(path, [(n, p) for n, p in inputs if p], name)
    if os.path.isdir(path):
        raise OutputError(f"{name} {path!r} is a directory; give a file path for the JSON result")


def train_main(argv: list[str] | None = None) -> int:
    from distill.config import describe_fields, load_config

    parser = argparse.ArgumentParser(prog="distill-train", description="Distil a teacher into a student with DeepSpeed. Start it with "
                                     "`deepspeed --num_gpus N $(which distill-train) --config ...` or as one process.")
    parser.add_argument("--config", help="recipe YAML, e.g. configs/distilbert.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100 data.path=/data/prep")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(describe_fields()))
        return 0
    if not args.config and not args.overrides:
        parser.error("--config is required (e.g. --config configs/distilbert.yaml)")
    try:
        config = load_config(args.config, args.overrides)
        from distill.trainer import train

        result = train(config, args.local_rank)
    except _user_errors() as exc:
        return _fail("distill-train", exc)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = OSError(f"no space left writing {exc.filename or 'the run directory'} ({exc.strerror}); the newest complete checkpoint "
                       f"is kept: free space, then rerun the same command to resume")
        full.rank_local = True  # type: ignore[attr-defined]  # every rank that hit it says so
        return _fail("distill-train", full)
    if result.get("stopped_by"):
        from distill.preemption import PREEMPTED_EXIT_CODE

        return PREEMPTED_EXIT_CODE  # checkpointed on request: the scheduler requeues, the same command resumes
    return 0


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill-export", description="Export a checkpoint (any ZeRO stage) as a Hugging Face model directory.")
    parser.add_argument("--checkpoint", required=True, help="run directory (newest complete checkpoint), its checkpoints/ dir, or one step_XXXXXXXX dir")
    parser.add_argument("--output", required=True, help="new directory for the Hugging Face model (not inside the run)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it holds an earlier distill-export result "
                        "(only once the new export is complete)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("deepspeed").setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    try:
        from distill.export import export_checkpoint

        out = export_checkpoint(args.checkpoint, args.output, args.overwrite)
    except _user_errors() as exc:
        return _fail("distill-export", exc)
    print(out)
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill-eval", description="Held-out masked-LM loss, perplexity, accuracy and teacher agreement.")
    parser.add_argument("--model", required=True, help="student (or any masked LM) directory")
    parser.add_argument("--teacher", help="teacher directory, to compare and measure top-1 agreement")
    parser.add_argument("--data", required=True, help="prepared dataset directory (distill-prep output)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--max-sequences", type=int, default=None, help="evaluate on the first N sequences only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    args = parser.parse_args(argv)
    try:
        from distill.evaluate import evaluate, render_table, write_json

        if args.json:  # checked before the work: the result file must not land in (or replace) an input
            check_result_file(args.json, [("--model", args.model), ("--teacher", args.teacher), ("--data", args.data)])
        result = evaluate(args.model, args.data, args.teacher, args.split, args.max_sequences, args.batch_size, args.device)
    except _user_errors() as exc:
        return _fail("distill-eval", exc)
    print(render_table(result))
    if args.json:
        write_json(result, args.json)
    return 0
