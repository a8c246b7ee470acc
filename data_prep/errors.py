"""The one exception type users see from distill-prep."""

from __future__ import annotations

import errno
import re

from kd_common.errors import UserError

_MARKER = "PrepInputError: "


class PrepInputError(UserError, ValueError):
    """Bad input (corpus, tokenizer, output directory): the message names the problem and the fix."""

    def __str__(self) -> str:
        return super().__str__()


def extract_message(exc: BaseException) -> str | None:
    """Find a PrepInputError message inside whatever a Beam runner re-raised from a worker (or say the disk is full)."""
    if isinstance(exc, PrepInputError):
        text = str(exc)
    else:
        match = re.search(re.escape(_MARKER) + r"(.+)", str(exc))
        if not match:
            if "No space left on device" in str(exc) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
                return (
                    "no space left on device while writing the dataset (nothing was published: --output is as it was); "
                    "free space beside --output, where the new dataset is built, and rerun"
                )
            return None
        text = match.group(1)
    return text.split(" [while running")[0].strip().strip("'\"").replace("\\'", "'")


def runner_failure(exc: BaseException) -> str | None:
    """One line for a job that another runner (Flink, Prism, a job service) failed or could not start, or None."""
    text = str(exc)
    if "Unable to fetch remote job server jar" in text:
        jar = re.search(r"stage the jar at (\S+)", text)
        return (
            "Beam could not download the job server jar for this runner (Maven Central did not serve it); pass "
            "--flink_job_server_jar=PATH (or --spark_job_server_jar), or start a job server and use --runner=PortableRunner "
            f"--job_endpoint=HOST:PORT{f' (or put the jar at {jar.group(1)})' if jar else ''}"
        )
    match = re.search(r"Pipeline (\S+) failed in state (\w+): (.*)", text)
    if match:
        return f"the runner failed job {match.group(1)} ({match.group(2)}): {match.group(3).splitlines()[0][:300]}"
    return None
