"""The one exception type users see from distill-prep."""
from __future__ import annotations

import re

_MARKER = "PrepInputError: "


class PrepInputError(ValueError):
    """Bad input (corpus, tokenizer, output directory): the message names the problem and the fix."""

    def __str__(self) -> str:
        return super().__str__()


def extract_message(exc: BaseException) -> str | None:
    """Find a PrepInputError message inside whatever a Beam runner re-raised from a worker."""
    if isinstance(exc, PrepInputError):
        text = str(exc)
    else:
        match = re.search(re.escape(_MARKER) + r"(.+)", str(exc))
        if not match:
            return None
        text = match.group(1)
    return text.split(" [while running")[0].strip().strip("'\"").replace("\\'", "'")
