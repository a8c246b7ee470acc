"""One rank of tests/e2e/test_activation_checkpointing.py (started by the deepspeed launcher, 2 processes, gloo on CPU).

Runs distill-train's trainer (`distill.train.trainer.train`, what `distill-train` calls once its arguments are parsed)
once per line of the JSON file given, one after the other in this process: each line is a distill-train argument list.
Rank 0 prints `=== run <output_dir>` before each, so the test can tell the runs' logs apart.
"""

from __future__ import annotations

import json
import sys


def main(runs_file: str) -> None:
    import torch.distributed as dist

    from distill.cli import train_config, train_parser
    from distill.train.trainer import train

    with open(runs_file) as handle:
        runs = json.load(handle)
    for argv in runs:
        config = train_config(train_parser().parse_args(argv))
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"=== run {config.output_dir}", file=sys.stderr, flush=True)
        train(config)
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[-1])
