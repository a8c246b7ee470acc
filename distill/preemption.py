"""Cooperative stop: a signal or a stop file asks every rank to finish its step, checkpoint and exit.

A signal handler only sets a flag. Each step the flag (or the presence of `OUTPUT/STOP`, for
schedulers that can signal only the batch shell, see launch/slurm.sbatch) is all-reduced, so all
ranks stop after the same step, save one complete checkpoint together and exit with
`PREEMPTED_EXIT_CODE`; rerunning the same command resumes from that checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Iterable

log = logging.getLogger(__name__)

# "Stopped on request after a complete checkpoint; rerun the same command to continue."
# launch/slurm.sbatch requeues the job on this code (Slurm's RequeueExit can name it too).
PREEMPTED_EXIT_CODE = 99
STOP_FILE = "STOP"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Remembers whether this process was asked to stop (signal) or the run was (stop file)."""

    def __init__(self, output_dir: str, signals: Iterable[signal.Signals] = STOP_SIGNALS):
        self.stop_file = os.path.join(output_dir, STOP_FILE)
        self.signal_name: str | None = None
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("received %s: finishing this step, then checkpointing and exiting", self.signal_name)

    @property
    def requested_here(self) -> bool:
        return self.signal_name is not None or os.path.exists(self.stop_file)

    def reason(self) -> str:
        return self.signal_name or f"stop file {self.stop_file}"

    def clear_stop_file(self) -> None:
        """Called once at start: a stop file left by the previous (stopped) attempt must not stop this one."""
        try:
            os.remove(self.stop_file)
            log.info("removed %s left by the previous attempt", self.stop_file)
        except FileNotFoundError:
            pass


def restore_default_handlers(signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_DFL)
