"""The ranks of tests/e2e/test_any_causal_lm.py: ONE deepspeed launch (2 processes, gloo on CPU) that runs the real
trainer once per entry of a plan, one run after the other, so that the launch's start-up (torch, DeepSpeed,
transformers, the process group) is paid once for every family instead of once per family.

Each run is exactly what `deepspeed --module distill ARGS` does before it exits: distill-train's parser and config
(`distill.cli.train_parser`, `train_config`), then `distill.train.trainer.train`. ARGV: PLAN.json, a list of
distill-train argument lists (the launcher adds --local_rank).
"""

from __future__ import annotations

import json
import sys


def main(plan_path: str) -> None:
    from distill.cli import train_config, train_parser
    from distill.train.trainer import train

    with open(plan_path) as handle:
        plan = json.load(handle)
    for argv in plan:
        args = train_parser().parse_args(argv)
        train(train_config(args), args.local_rank)


if __name__ == "__main__":
    main(next(a for a in sys.argv[1:] if not a.startswith("--")))
