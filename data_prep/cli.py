"""distill-prep: corpus -> tokenized, packed, sharded dataset with masking metadata (Apache Beam)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile

from data_prep.config import PrepConfig
from data_prep.errors import extract_message, runner_failure
from kd_common.config import ConfigError, add_arguments, from_arguments, leaves


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill-prep",
        description="Tokenize, pack and shard a text corpus for distillation. Settings: --config YAML < key=value < the flags below. "
        "Other options go to Apache Beam (write them as --name=value, e.g. --runner=DataflowRunner --project=P --region=R "
        "--temp_location=gs://...).",
    )
    add_arguments(p, PrepConfig, overrides=False)  # key=value overrides are told apart from Beam's options in `split_arguments`
    return p


def split_arguments(unknown: list[str]) -> tuple[list[str], list[str]]:
    """(key=value settings of PrepConfig, Beam options) from the arguments argparse did not know."""
    keys = {key for key, _, _ in leaves(PrepConfig)}
    overrides = [a for a in unknown if not a.startswith("-") and "=" in a and a.split("=", 1)[0] in keys]
    return overrides, [a for a in unknown if a not in overrides]


def print_summary(manifest) -> None:
    """The run's statistics as a table on stdout."""
    from rich.console import Console  # rich: not at start-up
    from rich.table import Table  # rich: not at start-up

    stats = manifest.stats
    table = Table(title="distill-prep summary", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("files / documents read", f"{manifest.pipeline_options['files']:,} / {stats['documents_read']:,}")
    table.add_row("tokens read (no specials)", f"{stats['tokens_read']:,}")
    for name, info in manifest.splits.items():
        docs = stats["splits"].get(name, {}).get("documents", 0)
        table.add_row(
            f"{name}: documents / sequences / tokens / shards", f"{docs:,} / {info.rows:,} / {info.tokens:,} / {len(info.shards)}"
        )
    for reason, d in sorted(stats["dropped"].items()):
        units = ", ".join(f"{v:,} {k}" for k, v in d.items())
        table.add_row(f"dropped: {reason}", units)
    table.add_row("packing / max length / token dtype", f"{manifest.packing} / {manifest.max_seq_len} / {manifest.token_dtype}")
    hist = stats.get("length_histogram", {})
    if hist:
        total = sum(hist.values()) or 1
        table.add_row(
            "sequence lengths",
            "  ".join(f"{k}: {100 * v / total:.0f}%" for k, v in sorted(hist.items(), key=lambda kv: int(kv[0].split("-")[0]))),
        )
    table.add_row(
        "accounting", f"{stats['tokens_read']:,} = {stats['content_tokens_written']:,} written + {stats['tokens_dropped']:,} dropped"
    )
    Console().print(table)


@contextlib.contextmanager
def stderr_to_file(path: str):
    """Send file descriptor 2 (ours and the Beam worker processes') to `path` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log_file:
        os.dup2(log_file.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


_received: list[int] = []  # the stop signals that reached this run


def _stop(signum, frame):
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop, `kill`) unwind the run, so its staging directory is removed.

    Beam wraps what a transform raises (a RuntimeError naming the step), so the signal is also recorded here and
    `main` reports it whatever the exception became. A second signal while unwinding is only recorded. The Beam
    worker processes (--workers N) are stopped first: Beam's shutdown waits for them, and a signal sent to this
    process alone (`kill PID`) does not reach them.
    """
    _received.append(signum)
    if len(_received) == 1:
        _stop_workers()
        raise KeyboardInterrupt


def _stop_workers() -> None:
    """SIGTERM to every process this one started (the Beam SDK workers and their shells)."""
    import psutil  # psutil: not at start-up

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    args.overrides, beam_args = split_arguments(unknown)
    try:
        cfg = from_arguments(PrepConfig, args)
    except ConfigError as exc:
        print(f"distill-prep: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    # Progress goes to stdout; Beam's own chatter (and its worker processes') to a log file.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)  # worker errors come back as exceptions, handled below
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: "apitools not found" not in record.getMessage())
    fd, beam_log = tempfile.mkstemp(prefix="distill-prep-", suffix=".log")  # a new file of our own, never one already there
    os.close(fd)
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with stderr_to_file(beam_log):
            from data_prep.driver import run_prep  # apache_beam (via data_prep.driver): not at start-up

            manifest = run_prep(cfg, beam_args)
        for sig, handler in previous.items():  # published: nothing left to clean up
            signal.signal(sig, handler)
    except BaseException as exc:  # Beam re-raises worker errors (and our KeyboardInterrupt) wrapped in its own types
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # the staging directory is already removed; finish the report
        if _received or isinstance(exc, KeyboardInterrupt):  # asked to stop: the log holds only Beam's shutdown chatter
            with contextlib.suppress(OSError):
                os.unlink(beam_log)
        if _received:
            name = signal.Signals(_received[0]).name
            print(f"distill-prep: interrupted by {name}; nothing was published, --output is as it was", file=sys.stderr)
            return 128 + _received[0]
        if isinstance(exc, KeyboardInterrupt):
            print("distill-prep: interrupted; nothing was published, --output is as it was", file=sys.stderr)
            return 130
        if not isinstance(exc, Exception):
            raise
        message = extract_message(exc)
        failure = None if message else runner_failure(exc)
        if failure:
            print(
                f"distill-prep: error: {' '.join(failure.split())}; nothing was published, --output is as it was (Beam log: {beam_log})",
                file=sys.stderr,
            )
            return 1
        if message is None:
            print(f"distill-prep: pipeline failed; Beam log: {beam_log}", file=sys.stderr)
            raise
        print(f"distill-prep: error: {' '.join(message.split())}", file=sys.stderr)
        os.unlink(beam_log)  # the one-line message says it all; keep the log only for unexpected failures
        return 2
    os.unlink(beam_log)
    print_summary(manifest)
    print(os.path.abspath(cfg.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
