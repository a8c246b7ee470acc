"""One trainer per run directory: an exclusive lock held by rank 0 for the whole run.

The lock is `OUTPUT/.lock`, locked with `flock` (released by the kernel when the holder dies, so a lock
left by a crashed or killed run is never in the way) and holding who took it (host, pid, start time),
which a second trainer reports when it is refused. Filesystems without `flock` get an exclusive-create
lock file instead; a stale one (same host, holder no longer alive) is taken over. A symlink (or anything but a
regular file) at the lock's name is refused, never followed: the lock text is written only into a file of the run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import time
from typing import Optional

from kd_common.errors import UserError
from kd_common.output_rule import OutputError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


class RunLockedError(UserError, RuntimeError):
    """Another trainer holds the run directory."""


class LockPathError(UserError, RuntimeError):
    """The lock's name is taken by a symlink or a non-file, or the directory does not allow a lock file."""


def _open_lock(path: str, flags: int) -> int:
    """os.open of the lock file without following a symlink at its name (O_NOFOLLOW); refuse anything but a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP and not os.path.islink(path):
            raise
        raise LockPathError(
            f"{path} is a symlink; the run lock is never written through one (it could overwrite the file it points to): "
            f"remove the link and start again"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockPathError(f"{path} is not a regular file; remove it (the trainer creates its run lock there) and start again")
    return fd


def _holder_text() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})


def _describe(path: str) -> str:
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW)) as handle:
            info = json.loads(handle.read() or "{}")
        return f"pid {info.get('pid')} on host {info.get('host')} since {info.get('since')}"
    except (OSError, ValueError):
        return "an unknown process"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Hold `output_dir/.lock` exclusively until `release()` (or process exit)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._fd: Optional[int] = None
        self._exclusive_file = False
        self.created_dir = False

    def acquire(self) -> "RunLock":
        """Take the lock, or a one-line error: RunLockedError (held by another trainer), OutputError (cannot write there)."""
        try:
            return self._acquire()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # distill-train says "no space left" itself
            raise OutputError(
                f"output_dir {self.output_dir!r} cannot be written ({exc.strerror}: {exc.filename or self.path}); choose an output_dir "
                f"this user can write, or make it writable"
            ) from None

    def _acquire(self) -> "RunLock":
        if not os.path.isdir(self.output_dir):
            os.makedirs(self.output_dir)
            self.created_dir = True
        while True:
            fd = _open_lock(self.path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunLockedError(
                    f"output_dir {self.output_dir!r} is in use by another trainer ({_describe(self.path)}); "
                    f"wait for it to finish, stop it, or choose another output_dir"
                ) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._acquire_exclusive_file()
                return self
            try:
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released (and removed) the file between our open and flock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, _holder_text().encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _acquire_exclusive_file(self) -> None:
        """Fallback without flock: create the lock file exclusively; take over a stale one of this host."""
        for _ in range(2):
            try:
                fd = _open_lock(self.path + ".x", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                try:
                    with os.fdopen(_open_lock(self.path + ".x", os.O_RDONLY)) as handle:
                        info = json.loads(handle.read() or "{}")
                except (OSError, ValueError):
                    info = {}
                if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
                    log.warning("taking over the stale lock of dead process %s in %s", info["pid"], self.output_dir)
                    os.unlink(self.path + ".x")
                    continue
                raise RunLockedError(
                    f"output_dir {self.output_dir!r} is in use by another trainer ({_describe(self.path + '.x')}); "
                    f"if that process is gone, delete {self.path + '.x'}"
                ) from None
            os.write(fd, _holder_text().encode())
            os.close(fd)
            self._exclusive_file = True
            return

    def release(self, remove_dir_if_created: bool = False) -> None:
        """Give the lock up; with `remove_dir_if_created`, also remove the output dir this lock created (if still empty)."""
        if self._exclusive_file:
            _unlink_quietly(self.path + ".x")
            self._exclusive_file = False
        if self._fd is not None:
            _unlink_quietly(self.path)  # while still locked: a waiting trainer then locks a fresh file
            os.close(self._fd)
            self._fd = None
        if remove_dir_if_created and self.created_dir:
            try:
                os.rmdir(self.output_dir)
            except OSError:
                pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
