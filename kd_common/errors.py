"""The base of every error a user can fix: a command prints its message as one line and exits 2 (no traceback)."""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """Bad input, a bad setting or a fault the user can act on; the message names the problem and the fix."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (its type's name when it has none): what a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def report_one_line(prog: str, exc: BaseException) -> int:
    """`exc` as one line on stderr (said by rank 0 when distributed, or by the one rank that saw it); returns exit code 2."""
    rank = os.environ.get("RANK", "0")
    if rank == "0" or getattr(exc, "rank_local", False):  # an error only one rank saw is said by that rank
        message = " ".join(str(exc).split())
        where = "" if rank == "0" else f" (rank {rank})"
        print(f"{prog}: error{where}: {message}", file=sys.stderr, flush=True)
    return 2
