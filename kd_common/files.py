"""Writing files so that readers never see half of one, and hashing them.

Files get the user's umask (0644 under umask 022), as `open()` would make them: mkstemp makes 0600, so the
temp file is chmod-ed before the rename. Nothing is written through a symlink: the temp file is a new file
of our own (O_EXCL), and the rename replaces a symlink at the destination itself, never its target.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Union


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_atomically(path: str, content: Union[str, bytes], prefix: str = ".tmp-") -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers see the old or the new file, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=os.path.splitext(path)[1], dir=directory)
    try:
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w") as handle:
            handle.write(content)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())  # mkstemp made it 0600
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomically(path: str, data: Any) -> None:
    """`data` as indented JSON, written atomically (see `write_atomically`)."""
    write_atomically(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
