"""distill-cache: the teacher-logit cache from the command line, written by a Beam pipeline (distill/cache/pipeline.py) or,
with `--ranks` (= `python -m distill.cache`, what `deepspeed --module distill.cache` and torchrun run), by the ranks of a
launcher (distill/cache/ranks.py).

Settings: --config YAML < key=value < the generated flags (the same mechanism as distill-prep); on the Beam path other
`--name=value` options go to Apache Beam (e.g. --runner=DataflowRunner ...)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from data_prep.errors import extract_message
from distill.cache.settings import CacheConfig
from kd_common.config import add_arguments, from_arguments, leaves
from kd_common.errors import UserError


def _quiet_beam_import() -> None:
    """Beam's import warns on the root logger that optional GCP clients are absent; not our users' concern."""
    logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())


def cache_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill-cache",
        description="Run a frozen teacher once over a prepared dataset and write a "
        "sparse cache of its distribution (top-k + tail mass, or samples) row-aligned with the data shards, for "
        "`teacher.source: cache`. Causal data as it is; masked-LM data with static masks (--static-masks D "
        "--train-config YAML: the teacher on each of a row's D masked inputs, drawn as the run with data.static_masks=D draws "
        "them). Written by a Beam pipeline (other --name=value options go to Apache Beam), or with --ranks by the ranks of "
        "a launcher: `deepspeed --num_gpus 8 --module distill.cache ...` (the teacher replicated per GPU, or partitioned "
        "across the ranks when it does not fit one). A rerun of the same command resumes an interrupted cache.",
    )
    add_arguments(p, CacheConfig, overrides=False)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p


def split_arguments(cls, unknown: list[str]) -> tuple[list[str], list[str]]:
    """(key=value settings of `cls`, Beam options) from the arguments argparse did not know."""
    keys = {key for key, _, _ in leaves(cls)}
    overrides = [a for a in unknown if not a.startswith("-") and "=" in a and a.split("=", 1)[0] in keys]
    return overrides, [a for a in unknown if a not in overrides]


def _speaks() -> bool:
    """Whether this process reports: rank 0 of a process group (every rank hears the same error), or a process before its
    group was up (an error of its own)."""
    dist = sys.modules.get("torch.distributed")
    return int(os.environ.get("RANK", "0")) == 0 or dist is None or not dist.is_initialized()


def main(argv: list[str] | None = None, ranks: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv) + (["--ranks"] if ranks else [])
    parser = cache_parser()
    args, unknown = parser.parse_known_args(argv)
    args.overrides, extra = split_arguments(CacheConfig, unknown)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = from_arguments(CacheConfig, args)
        if cfg.ranks:
            logging.getLogger().setLevel(logging.WARNING)  # until distill/cache/ranks.py sets up rank-tagged logging
            if extra:
                raise UserError(f"distill-cache --ranks does not take {' '.join(extra)} (Beam options are for the Beam path)")
            from distill.cache.ranks import run_ranks  # torch, deepspeed: only for --ranks

            manifest = run_ranks(cfg)
        else:
            _quiet_beam_import()
            logging.getLogger("apache_beam").setLevel(logging.ERROR)
            from distill.cache.pipeline import run_cache  # apache_beam: imported after _quiet_beam_import()

            manifest = run_cache(cfg, extra)
    except UserError as exc:
        if _speaks():
            print(f"distill-cache: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill-cache: interrupted; nothing was published, --output is as it was (rerun to resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # Beam re-raises worker errors wrapped in its own types
        message = extract_message(exc)
        if message is None:
            raise
        if _speaks():
            print(f"distill-cache: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    if not _speaks():
        return 0
    stats = manifest.stats
    masks = (
        f" ({manifest.static_masks} static masks: {stats['bytes_per_masked_copy_token']:.1f} per token of each masked copy)"
        if manifest.static_masks
        else ""
    )
    print(
        f"{manifest.tokens:,} tokens, {manifest.rows:,} rows, {len(manifest.parts)} parts; {stats['bytes_per_token']:.1f} bytes per token"
        f"{masks}; {stats['tokens_per_second']:,.0f} tokens/s"
    )
    print(cfg.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
