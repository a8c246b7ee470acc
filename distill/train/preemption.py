"""Cooperative stop: a signal, a stop file or the death of the launcher asks every rank to finish its
step, checkpoint and exit.

A signal handler only sets a flag. Each step the flag (or the presence of `OUTPUT/STOP`, for
schedulers that can signal only the batch shell, see launch/slurm.sbatch, or the disappearance of a
process that launched this worker, see `StopRequest.watch_launcher`) is all-reduced, so all ranks
stop after the same step, save one complete checkpoint together and exit with `PREEMPTED_EXIT_CODE`;
rerunning the same command resumes from that checkpoint.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
from typing import Iterable

import psutil

from kd_common.output_rule import OutputError

log = logging.getLogger(__name__)

# "Stopped on request after a complete checkpoint; rerun the same command to continue."
# launch/slurm.sbatch requeues the job on this code (Slurm's RequeueExit can name it too).
PREEMPTED_EXIT_CODE = 99
STOP_FILE = "STOP"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Set by launch/single_node.sh and launch/node_launch.sh to their own pid: the workers stop if that script dies.
LAUNCH_PID_ENV = "DISTILL_LAUNCH_PID"


class StopRequest:
    """Remembers whether this process was asked to stop (signal, launcher gone) or the run was (stop file)."""

    def __init__(self, output_dir: str, signals: Iterable[signal.Signals] = STOP_SIGNALS):
        self.stop_file = os.path.join(output_dir, STOP_FILE)
        self.signal_name: str | None = None
        self.launchers: list[psutil.Process] = []
        self.pid = os.getpid()  # a forked data-loader worker inherits the handler; the signal is not for it
        signals = tuple(signals)
        for sig in signals:
            signal.signal(sig, self._on_signal)
        # Python restores the default handlers (die) while exiting: a repeated stop signal, or the launcher's
        # SIGTERM once another rank exited 99, would turn this rank's exit 99 into a death by signal.
        atexit.register(ignore, signals)

    def _on_signal(self, signum, frame) -> None:
        if self.signal_name is None and os.getpid() == self.pid:
            self.signal_name = signal.Signals(signum).name
            log.warning("received %s: finishing this step, then checkpointing and exiting", self.signal_name)

    def watch_launcher(self) -> None:
        """From now on, the exit of any process that launched this worker counts as a stop request (checked each step)."""
        self.launchers = launcher_processes()
        if self.launchers:
            log.debug("stopping if any of these launcher processes exits: %s", [p.pid for p in self.launchers])

    def _launcher_gone(self) -> bool:
        for proc in self.launchers:
            if not _alive(proc):
                self.signal_name = f"launcher process {proc.pid} exited"
                log.warning("%s: finishing this step, then checkpointing and exiting", self.signal_name)
                self.launchers = []
                return True
        return False

    @property
    def requested_here(self) -> bool:
        return self.signal_name is not None or self._launcher_gone() or os.path.exists(self.stop_file)

    def reason(self) -> str:
        return self.signal_name or f"stop file {self.stop_file}"

    def clear_stop_file(self) -> None:
        """Called once at start: a stop file left by the previous (stopped) attempt must not stop this one."""
        if os.path.isdir(self.stop_file) and not os.path.islink(self.stop_file):
            raise OutputError(
                f"{self.stop_file} is a directory; that name is the stop-request file (`touch` it to stop a run), which a new "
                f"attempt removes: move that directory out of output_dir (it was left as it is) and rerun"
            )
        try:
            os.remove(self.stop_file)
            log.info("removed %s left by the previous attempt", self.stop_file)
        except FileNotFoundError:
            pass


def _alive(proc: psutil.Process) -> bool:
    try:  # is_running() compares start times (no pid reuse); an exited but unreaped process is a zombie
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_launcher(proc: psutil.Process) -> bool:
    """DeepSpeed's `deepspeed` runner or per-node launcher, or torchrun."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return False
    names = {os.path.basename(arg) for arg in cmd[:2]}
    return bool(names & {"deepspeed", "ds", "torchrun"}) or any(
        arg in ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run") for arg in cmd[:4]
    )


def launcher_processes() -> list[psutil.Process]:
    """This worker's ancestors up to the launch script named by DISTILL_LAUNCH_PID, else its launcher ancestors (none when run by hand)."""
    try:
        ancestors = psutil.Process().parents()  # parent first
    except psutil.Error:
        return []
    script = os.environ.get(LAUNCH_PID_ENV, "")
    pids = [p.pid for p in ancestors]
    if script.isdigit() and int(script) in pids:
        return ancestors[: pids.index(int(script)) + 1]
    chain = []
    for proc in ancestors:
        if not _is_launcher(proc):
            break
        chain.append(proc)
    return chain


def ignore(signals: Iterable[signal.Signals]) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def restore_default_handlers(signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_DFL)
