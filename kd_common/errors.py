"""The base of every error a user can fix: a command prints its message as one line and exits 2 (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a bad setting or a fault the user can act on; the message names the problem and the fix."""
