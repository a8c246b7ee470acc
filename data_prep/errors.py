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
