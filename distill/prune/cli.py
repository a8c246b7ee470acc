"""distill-prune from the command line: --config YAML < key=value < the generated flags (the one config mechanism of every command).

distill-prune --teacher T --data PREPARED --output OUT --num-layers 6 --hidden-size 512
distill-prune --teacher T --data PREPARED --output OUT --params 0.5
distill-prune --teacher T --scores EARLIER_OUT --output OUT2 --num-layers 4       # the same scores, another shape
deepspeed --num_gpus 8 --module distill.prune --teacher T --data PREPARED --output OUT --params 0.5   # calibration on 8 GPUs
"""

from __future__ import annotations

import argparse
import logging
import sys

from distill.prune.job import PruneConfig, describe_result, run_prune
from kd_common.config import add_arguments, from_arguments
from kd_common.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill-prune",
        description="Cut a student from its teacher by importance (Minitron): score every attention head, MLP neuron, expert, "
        "hidden channel and layer over calibration sequences of a prepared dataset, keep the most important ones for a shape or a "
        "parameter budget, and write the student as a Hugging Face directory with its provenance (prune.json); train it with "
        "student.path=OUTPUT (docs/pruning.md).",
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    add_arguments(p, PruneConfig)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = from_arguments(PruneConfig, args)
        record = run_prune(cfg)
    except UserError as exc:
        print(f"distill-prune: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill-prune: interrupted; nothing was published, --output is as it was", file=sys.stderr)
        return 130
    if record:
        print(describe_result(record))
        print(cfg.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
