"""distill-cache: the teacher-logit cache (distill/cache/pipeline.py) from the command line.

Settings: --config YAML < key=value < the generated flags (the same mechanism as distill-prep); other
`--name=value` options go to Apache Beam (e.g. --runner=DataflowRunner ...)."""

from __future__ import annotations

import argparse
import logging
import sys

from data_prep.errors import extract_message
from kd_common.config import add_arguments, from_arguments, leaves
from kd_common.errors import UserError


def _quiet_beam_import() -> None:
    """Beam's import warns on the root logger that optional GCP clients are absent; not our users' concern."""
    logging.getLogger().addFilter(lambda record: "apitools not found" not in record.getMessage())


def _parser() -> argparse.ArgumentParser:
    _quiet_beam_import()
    from distill.cache.pipeline import CacheConfig  # apache_beam: imported after _quiet_beam_import()

    p = argparse.ArgumentParser(
        prog="distill-cache",
        description="Run a frozen teacher once over a prepared dataset and write a "
        "sparse cache of its distribution (top-k + tail mass, or samples) row-aligned with the data shards, for "
        "`teacher.source: cache`. Causal data as it is; masked-LM data with static masks (--static-masks D "
        "--train-config YAML: the teacher on each of a row's D masked inputs, drawn as the run with data.static_masks=D draws "
        "them). Other --name=value options go to Apache Beam.",
    )
    add_arguments(p, CacheConfig, overrides=False)
    return p


def split_arguments(cls, unknown: list[str]) -> tuple[list[str], list[str]]:
    """(key=value settings of `cls`, Beam options) from the arguments argparse did not know."""
    keys = {key for key, _, _ in leaves(cls)}
    overrides = [a for a in unknown if not a.startswith("-") and "=" in a and a.split("=", 1)[0] in keys]
    return overrides, [a for a in unknown if a not in overrides]


def main(argv: list[str] | None = None) -> int:
    _quiet_beam_import()
    from distill.cache.pipeline import CacheConfig, run_cache  # apache_beam: imported after _quiet_beam_import()

    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    args.overrides, beam_args = split_arguments(CacheConfig, unknown)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    try:
        cfg = from_arguments(CacheConfig, args)
        manifest = run_cache(cfg, beam_args)
    except UserError as exc:
        print(f"distill-cache: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill-cache: interrupted; nothing was published, --output is as it was", file=sys.stderr)
        return 130
    except Exception as exc:  # Beam re-raises worker errors wrapped in its own types
        message = extract_message(exc)
        if message is None:
            raise
        print(f"distill-cache: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
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
