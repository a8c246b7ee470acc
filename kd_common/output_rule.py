"""The output-directory rule of every command: nothing lost.

- An output never overlaps an input: it is not an input, not inside one, and does not contain one
  (paths compared after resolving symlinks).
- An existing non-empty output is replaced only when the user asked (`--overwrite`), only if it is the
  kind of directory the command writes and holds nothing else (`is_ours`: every file in it is one the command
  wrote, as its manifest or its `.distill-files.json` lists them; a README.md the user put there stops it),
  and only after the new result is complete: the
  command writes into a staging directory beside the output, and the old output is swapped out for it
  by renames when (and only when) the new one is finished. A failed or interrupted run leaves the old
  output untouched and removes its staging directory (a killed one leaves a hidden `.NAME.partial-*`
  beside it, never a half-written NAME).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from typing import Callable, Iterable, Iterator, Optional, Union

from kd_common.errors import UserError
from kd_common.files import current_umask, write_json_atomically

log = logging.getLogger(__name__)


class OutputError(UserError, ValueError):
    """An output path that cannot be used as asked: the message names the problem and the fix."""


def is_url(path: str) -> bool:
    """True for object-store / cluster paths (gs://, s3://, hdfs://)."""
    return "://" in path


def _real(path: str) -> str:
    if is_url(path):  # no symlinks on an object store: compare the names
        return path.rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def overlap(a: str, b: str) -> Optional[str]:
    """How paths `a` and `b` overlap ('is', 'is inside', 'contains'), or None when they are disjoint.

    Local paths are compared after resolving symlinks; URLs (gs://...) by name; a URL and a local path never overlap.
    """
    if is_url(a) != is_url(b):
        return None
    ra, rb = _real(a), _real(b)
    sep = "/" if is_url(a) else os.sep
    if ra == rb:
        return "is"
    if ra.startswith(rb.rstrip(sep) + sep):
        return "is inside"
    if rb.startswith(ra.rstrip(sep) + sep):
        return "contains"
    return None


def check_no_overlap(output: str, inputs: Iterable[tuple[str, str]], output_name: str = "--output") -> None:
    """Refuse an `output` that is, is inside, or contains any input; `inputs` are (option name, path) pairs."""
    for name, path in inputs:
        if not path:
            continue
        how = overlap(output, path)
        if how:
            raise OutputError(
                f"{output_name} {output!r} {how} {name} {path!r}; an output must not overlap an input "
                f"(it could overwrite or re-read it): choose an {output_name} outside every input"
            )


def is_empty_dir(path: str) -> bool:
    """A directory with no entry at all (a dotfile or a dangling symlink is an entry)."""
    return os.path.isdir(path) and not os.listdir(path)


FILE_LIST = ".distill-files.json"  # what a command wrote into its output, for a later --overwrite (see record_files)


def files_under(path: str) -> list[str]:
    """Relative paths of every entry under `path` that is not a directory (files, symlinks, dangling ones too), sorted.

    Symlinks are not followed: a link to a directory is one entry.
    """
    found = []
    for directory, dirs, files in os.walk(path):
        rel = os.path.relpath(directory, path)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
            found.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(found)


def record_files(directory: str, command: str) -> None:
    """List every file in the finished `directory` in its FILE_LIST: the files `--overwrite` may replace later."""
    listed = [name for name in files_under(directory) if name != FILE_LIST]
    write_json_atomically(os.path.join(directory, FILE_LIST), {"written_by": command, "files": listed})


def unlisted(path: str, listed: Iterable[str]) -> Optional[str]:
    """None when every file under `path` is in `listed`; else why not (naming the first file that is not), for an error message."""
    known = set(listed)
    strays = [name for name in files_under(path) if name not in known]
    if not strays:
        return None
    more = f" and {len(strays) - 1} more" if len(strays) > 1 else ""
    return f"it holds {strays[0]!r}{more}, which that command did not write"


def written_by(path: str, command: str) -> Union[bool, str]:
    """True when `path` holds only the files its FILE_LIST says `command` wrote; else a short reason (see check_replaceable)."""
    record = os.path.join(path, FILE_LIST)
    try:
        if os.path.islink(record):
            raise ValueError
        with open(record) as handle:
            data = json.load(handle)
        files = data["files"] if data.get("written_by") == command else None
        if not isinstance(files, list):
            raise ValueError
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return f"it has no list of the files {command} wrote ({FILE_LIST}; an older version wrote none)"
    return unlisted(path, [str(f) for f in files] + [FILE_LIST]) or True


def check_replaceable(
    output: str, overwrite: bool, is_ours: Callable[[str], Union[bool, str]], kind: str, output_name: str = "--output"
) -> None:
    """Refuse an existing output unless it is empty, or `overwrite` is set and it holds a `kind` and nothing else (`is_ours`).

    `is_ours(path)` returns True, or False or a short reason (a string) why `path` is not one to replace.
    """
    if not os.path.lexists(output):
        return
    if not os.path.isdir(output):
        raise OutputError(f"{output_name} {output!r} is a file, not a directory; choose a directory path")
    if is_empty_dir(output):
        return
    if not overwrite:
        raise OutputError(f"{output_name} {output!r} already holds data; choose a new {output_name} or pass --overwrite to replace it")
    verdict = is_ours(output)
    if verdict is not True:
        why = f" ({verdict})" if isinstance(verdict, str) else ""
        raise OutputError(
            f"{output_name} {output!r} holds data that is not a {kind}{why}; --overwrite replaces only a {kind} holding nothing "
            f"but the files it wrote: choose another {output_name} (or move that directory or those files away yourself)"
        )


def staging_dir_for(output: str, output_name: str = "--output") -> str:
    """A new hidden directory beside `output` (same filesystem, so the final rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.partial-", dir=parent)
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the published result gets a plain directory's mode
        return staging
    except OSError as exc:
        raise OutputError(
            f"cannot create a staging directory in {parent!r} ({exc.strerror}): the new result is built beside "
            f"{output_name} and moved into place when complete, so its parent must be writable; "
            f"choose an {output_name} in a writable directory"
        ) from None


def publish(staging: str, output: str) -> None:
    """Move the finished `staging` directory to `output`, swapping out what was there (already checked)."""
    if is_empty_dir(output):
        os.rmdir(output)
    if not os.path.lexists(output):
        os.rename(staging, output)
        return
    parent = os.path.dirname(os.path.abspath(output))
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.old-", dir=parent)
    os.rmdir(old)
    os.rename(output, old)  # from here to the next rename the previous result lives at `old`
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)
    log.info("replaced %s with the new result", output)


@contextlib.contextmanager
def replace_when_complete(
    output: str,
    overwrite: bool,
    is_ours: Callable[[str], bool],
    kind: str,
    inputs: Iterable[tuple[str, str]] = (),
    output_name: str = "--output",
) -> Iterator[str]:
    """Check `output` against the rule, yield a staging directory to write into, publish it on success.

    On any exception (KeyboardInterrupt included) the staging directory is removed and `output` is left as it was.
    A symlinked `output` is resolved first: the directory it points to is the one replaced. The rule is checked
    again just before publishing, so an output that appeared or changed during the run is not swapped out unasked.
    """
    check_no_overlap(output, inputs, output_name)
    if os.path.islink(output.rstrip(os.sep) or output):
        output = os.path.realpath(output)
    check_replaceable(output, overwrite, is_ours, kind, output_name)
    created = _missing_ancestors(output)
    staging = staging_dir_for(output, output_name)
    try:
        yield staging
        check_replaceable(output, overwrite, is_ours, kind, output_name)
        _apply_umask(staging)
        publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in created:  # parents made for the staging directory, deepest first, if still empty
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


def _apply_umask(directory: str) -> None:
    """Give every file under `directory` the user's umask (some writers, e.g. safetensors, make 0600 files)."""
    mask = current_umask()
    for here, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                os.chmod(path, (0o666 | (os.lstat(path).st_mode & 0o111)) & ~mask)


def _missing_ancestors(path: str) -> list[str]:
    """The directories above `path` that do not exist yet, deepest first."""
    missing = []
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing


def check_result_file(path: str, inputs: list[tuple[str, Optional[str]]], name: str = "--json") -> None:
    """A result file (written atomically later) must not be an input, lie inside one, or be a directory."""
    check_no_overlap(path, [(n, p) for n, p in inputs if p], name)
    if os.path.isdir(path):
        raise OutputError(f"{name} {path!r} is a directory; give a file path for the JSON result")
