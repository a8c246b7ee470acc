"""A rank that stops answering ends the run, named, instead of blocking the other ranks silently.

Every rank's watchdog thread rewrites a small file, OUTPUT/heartbeat/rank-NNNNN (a counter, its pid, start time and
host), every `interval` seconds. While this rank's loop makes no progress (it waits at a collective, or a step or a
save is long), the same thread also reads the other ranks' files: a rank whose file has not changed for `stale_after`
seconds (half of train.collective_timeout_s), measured on this rank's own clock (no clocks of two hosts compared), is
frozen (SIGSTOP, a hung host, a node gone). The thread then prints one line naming it, kills it when it runs on this
host (a stopped process still dies of SIGKILL), and ends this rank at once with `RANK_STOPPED_EXIT_CODE`. Nothing is
taken as complete that is not: a checkpoint becomes complete only by its COMPLETE marker, written after every rank
saved, and resume skips one without it. A rank that is alive (its heartbeat goes on) but never arrives at a collective
is ended by the process group's own timeout (the whole of train.collective_timeout_s), in one line too
(`collective_timeout_error`).

Cost: one small write per rank per interval (at most 30 s); the other ranks' files are read only while a rank's loop is
stalled, so a healthy run with short steps reads none.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Optional

import psutil

from kd_common.errors import UserError

log = logging.getLogger(__name__)

HEARTBEAT_DIR = "heartbeat"
RANK_STOPPED_EXIT_CODE = 3  # a rank stopped answering; the run ended, the newest complete checkpoint is kept
_RECORD = 320  # bytes of one heartbeat record (fixed: rewritten in place, so a full disk cannot stop it)


class CollectiveTimeout(UserError, RuntimeError):
    """A collective waited train.collective_timeout_s for a rank that never arrived."""


class RankWatchdog:
    """This rank's heartbeat, and the watch over the other ranks' (only with 2 or more ranks)."""

    def __init__(self, output_dir: str, rank: int, world_size: int, timeout_s: float, prog: str = "distill-train"):
        self.dir = os.path.join(output_dir, HEARTBEAT_DIR)
        self.rank, self.world_size, self.timeout_s, self.prog = rank, world_size, timeout_s, prog
        self.stale_after = timeout_s / 2
        self.interval = min(30.0, max(0.5, timeout_s / 20))
        self.steps = 0  # bumped by the loop (`progress`): while it moves, no other rank's file is read
        self._beats = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._warned = False

    def path(self, rank: int) -> str:
        return os.path.join(self.dir, f"rank-{rank:05d}")

    def start(self) -> "RankWatchdog":
        """Write the first heartbeat and start the thread (call once the run directory is this run's)."""
        if self.world_size < 2 or self._thread is not None:
            return self
        os.makedirs(self.dir, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="rank-watchdog", daemon=True)
        self._thread.start()
        return self

    def progress(self) -> None:
        """The loop finished a step."""
        self.steps += 1

    def stop(self) -> None:
        """End the thread and remove this rank's file (a missing file is never taken for a stopped rank)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)
        self._thread = None
        for remove, path in ((os.unlink, self.path(self.rank)), (os.rmdir, self.dir)):
            try:
                remove(path)
            except OSError:
                pass  # the directory still holds another rank's file

    def _beat(self) -> None:
        self._beats += 1
        me = psutil.Process()
        record = f"{self._beats} {me.pid} {me.create_time():.2f} {socket.gethostname()}"
        fd = os.open(self.path(self.rank), os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            os.pwrite(fd, record.ljust(_RECORD)[:_RECORD].encode(), 0)
        finally:
            os.close(fd)  # closed each time: a network filesystem publishes the write at close

    def _watch(self) -> None:
        seen_steps, heard = self.steps, {}  # heard: rank -> (record, when this rank first read it)
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except OSError as exc:
                if not self._warned:
                    log.warning(
                        "cannot write the heartbeat %s (%s); the other ranks may take this rank for stopped", self.path(self.rank), exc
                    )
                    self._warned = True
            if self.steps != seen_steps:  # a step ended since the last look: every rank answered it
                seen_steps, heard = self.steps, {}
                continue
            silent = self._silent_ranks(heard, time.monotonic())
            if silent:
                self._end(silent)

    def _silent_ranks(self, heard: dict, now: float) -> list[tuple[int, str, float]]:
        """(rank, record, seconds unchanged) of each other rank whose file has not changed for `stale_after` seconds."""
        silent = []
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            try:
                with open(self.path(rank)) as handle:
                    record = handle.read(_RECORD).strip()
            except OSError:  # not started yet, or finished and removed: not a stopped rank
                heard.pop(rank, None)
                continue
            if rank not in heard or heard[rank][0] != record:
                heard[rank] = (record, now)
            elif now - heard[rank][1] >= self.stale_after:
                silent.append((rank, record, now - heard[rank][1]))
        return silent

    def _end(self, silent: list[tuple[int, str, float]]) -> None:
        """One line naming the silent ranks, each killed when it runs on this host, then this rank ends (no cleanup runs)."""
        described = [f"rank {rank} ({_end_if_here(record)})" for rank, record, _ in silent]
        quiet = max(age for _, _, age in silent)
        message = (
            f"{', '.join(described)} stopped answering: no heartbeat for {quiet:.0f} s while rank {self.rank} waited "
            f"(train.collective_timeout_s={self.timeout_s:g}; a rank silent for half of it is taken as gone); the run ends "
            f"(exit {RANK_STOPPED_EXIT_CODE}) and keeps its newest complete checkpoint: find out why that rank stopped "
            f"(SIGSTOP, a frozen or lost node), then rerun the same command to resume"
        )
        after_progress_bar = "\n" if self.rank == 0 else ""  # rank 0's bar (distill/train/trainer.py) ends without a newline
        print(f"{after_progress_bar}{self.prog}: error (rank {self.rank}): {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(RANK_STOPPED_EXIT_CODE)


def _end_if_here(record: str) -> str:
    """Describe the process of a heartbeat `record`; SIGKILL it if it is that very process on this host."""
    try:
        _, pid_text, started, host = record.split(" ", 3)
        pid = int(pid_text)
    except ValueError:
        return "unreadable heartbeat"
    where = f"pid {pid} on {host}"
    if host != socket.gethostname():
        return where + "; the launcher of its node ends it"
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - float(started)) > 0.05:
            return where + ", no longer running"
        state = proc.status()
        proc.send_signal(signal.SIGKILL)
    except (psutil.Error, ValueError):
        return where + ", no longer running"
    return where + (", stopped (SIGSTOP)" if state == psutil.STATUS_STOPPED else f", {state}") + ", killed"


def collective_timeout_error(exc: BaseException) -> Optional[CollectiveTimeout]:
    """The one-line error for a collective of a multi-rank run that timed out (gloo: 'Timed out waiting'), else None."""
    import torch.distributed as dist  # torch: not at start-up

    text = str(exc)
    timed_out = "Timed out waiting" in text or "collective operation timeout" in text  # gloo's words, NCCL's
    if not (timed_out and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    error = CollectiveTimeout(
        f"a collective waited train.collective_timeout_s for another rank, which never arrived ({first[-160:]}); "
        f"that rank is alive but stuck or far slower (a long save, an uneven start) or stopped before the heartbeats began: see the "
        f"other ranks' lines; raise train.collective_timeout_s if they were only slow, then rerun the same command to resume"
    )
    error.rank_local = True  # type: ignore[attr-defined]  # every rank that timed out says so
    return error
