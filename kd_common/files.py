"""Writing files so that readers never see half of one, and hashing them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Union


def write_atomically(path: str, content: Union[str, bytes]) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers see the old or the new file, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    try:
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w") as handle:
            handle.write(content)
            handle.flush()
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
