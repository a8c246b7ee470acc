"""Where a training step's time goes (`train.profile_phases: true`): wall time per phase, with the
device synchronised at every phase boundary, and the time of DeepSpeed's collectives taken out of the
phase they ran in and reported as `comm`.

Collectives are timed by DeepSpeed's own comms logger (`comms_logger` in the DeepSpeed config), which
makes every collective blocking. Profiling therefore serialises what normally overlaps (gradient
reduction with the backward pass, data loading with compute): the phases add up to more than an
unprofiled step, and are meant for finding the largest cost, not for throughput figures.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

PHASES = ("data", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "comm")
COMMS_LOGGER = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}


def _comm_seconds_so_far() -> float:
    """Total time of every collective DeepSpeed's comms logger has recorded in this process.

    The logger keeps one timer per operation name and reads it without resetting, so each latency it
    appends ({name: {bytes: [count, latencies ms, algbw, busbw]}}) is that operation's running total:
    the largest value per name is the total so far."""
    from deepspeed.comm.comm import comms_logger  # deepspeed: not at start-up

    total_ms = 0.0
    for sizes in comms_logger.comms_dict.values():
        total_ms += max((max(record[1]) for record in sizes.values() if record[1]), default=0.0)
    return total_ms / 1000.0


class PhaseTimer:
    """`with timer("backward"): ...` adds the block's wall time to that phase (no-op when disabled)."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device = device
        self.enabled = enabled
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        comm0, t0 = _comm_seconds_so_far(), time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - t0
            comm = min(elapsed, _comm_seconds_so_far() - comm0)  # two clocks: never more than the phase took
            self.seconds[phase] += elapsed - comm
            self.seconds["comm"] += comm

    def take(self) -> dict[str, float]:
        """This step's seconds per phase; the counters start again from zero."""
        out, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        return out
