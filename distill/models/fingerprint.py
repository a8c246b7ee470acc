"""Which model a directory holds, by the content of its files: the identity of a teacher (or any model directory).

`content_identity(path)` hashes every byte of config.json and of every weight file (`*.safetensors`, `*.bin`, their
`*.index.json`) with sha256 in 8 MiB blocks, one file per thread (hashlib releases the GIL, so shards hash in
parallel), and combines the per-file hashes, by name, into one `sha256`. Two directories with the same config and
file sizes but other weights get other fingerprints; touching, copying or moving the directory does not change it.

Checking again is cheap: the result lists, per file, its sha256 with the (size, mtime_ns, ctime_ns, inode) it had when
hashed, and whoever binds a model keeps that record beside the binding (run.json of a run, the manifest of a teacher
cache). A later check reuses a file's recorded hash only when all four are unchanged, else it hashes the file again.
Why that is safe: ctime is set by the kernel on every write, rename, link or chmod of the file and cannot be set by
a user (`touch -d`, `os.utime` set only atime/mtime), and a file copied or renamed into place is another inode; a
same-size swap with its mtime restored still changes ctime and is hashed. What it trusts: that the filesystem keeps
ctime and inode numbers (local and common network filesystems do), and that nobody rewrites the disk underneath it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

BLOCK = 8 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
CONFIG = "config.json"
_MEMO: dict[tuple, str] = {}  # (realpath, size, mtime_ns, ctime_ns, inode) -> sha256, for this process


def identity_files(path: str) -> list[str]:
    """The files that make a model: config.json and the weight files (with their index), in name order."""
    return sorted(n for n in os.listdir(path) if n == CONFIG or n.endswith(WEIGHT_SUFFIXES))


def _stat(path: str) -> dict[str, int]:
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def content_identity(path: str, known: Optional[dict[str, Any]] = None, threads: Optional[int] = None) -> dict[str, Any]:
    """{"sha256": the model's fingerprint, "files": {name: {bytes, mtime_ns, ctime_ns, inode, sha256}}}.

    `known`: the "files" of an earlier result; a file whose four stat values are unchanged keeps its recorded hash."""
    names = identity_files(path)
    files = {name: _stat(os.path.join(path, name)) for name in names}
    todo = []
    for name, stat in files.items():
        before = (known or {}).get(name) or {}
        key = (os.path.realpath(os.path.join(path, name)), *stat.values())
        if all(before.get(k) == v for k, v in stat.items()) and isinstance(before.get("sha256"), str):
            stat["sha256"] = before["sha256"]
        elif key in _MEMO:
            stat["sha256"] = _MEMO[key]
        else:
            todo.append((name, key))
    if todo:
        workers = threads or min(len(todo), os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for (name, key), sha in zip(todo, pool.map(lambda item: _sha256(os.path.join(path, item[0])), todo)):
                files[name]["sha256"] = _MEMO[key] = sha
    combined = hashlib.sha256("".join(f"{name}\t{files[name]['sha256']}\n" for name in names).encode())
    return {"sha256": combined.hexdigest(), "files": files}


def content_sha256(path: str, known: Optional[dict[str, Any]] = None) -> str:
    """The model's fingerprint alone (`content_identity`)."""
    return content_identity(path, known)["sha256"]


def differing_files(before: Optional[dict[str, Any]], now: dict[str, Any]) -> list[str]:
    """Names of the files whose content (or presence) differs between two `files` records, for messages."""
    before = before or {}
    return sorted(n for n in set(before) | set(now) if (before.get(n) or {}).get("sha256") != (now.get(n) or {}).get("sha256"))


def shape_fingerprint(path: str) -> str:
    """Config hash plus weight file names and sizes: the identity runs and caches recorded before content fingerprints
    (kept so that they still resume / load; it cannot tell two teachers of one shape apart)."""
    digest = hashlib.sha256(open(os.path.join(path, "config.json"), "rb").read())
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin")):
            digest.update(f"{name}:{os.path.getsize(os.path.join(path, name))}".encode())
    return digest.hexdigest()


def weights_sha256(path: str) -> str:
    """sha256 over the teacher's weight files (name + content), in name order: what caches before content fingerprints
    recorded (the reader checks it for them; new caches record `content_identity`)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin")):
            digest.update(name.encode())
            with open(os.path.join(path, name), "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()
