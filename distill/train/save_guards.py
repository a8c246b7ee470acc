"""What keeps garbage out of checkpoints: non-finite steps, non-finite weights, a full disk.

Every decision here is taken from values all ranks share (the step's all-reduced metrics, an all-reduced
flag, or rank 0's answer broadcast), so every rank stops at the same point and nothing hangs.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from typing import Callable, Optional

import torch

from kd_common.errors import UserError

log = logging.getLogger(__name__)
BYTES_PER_PARAMETER = 16  # fp32 weights + Adam's fp32 master copy and two moments (ZeRO shards them, the total is the same)


class TrainingStopped(UserError, RuntimeError):
    """The run stopped to keep bad numbers or a partial write out of its checkpoints: one line for the user.

    `rank_local`: only this rank saw it (e.g. its write failed), so this rank, not only rank 0, must say it."""

    def __init__(self, message: str, rank_local: bool = False):
        super().__init__(message)
        self.rank_local = rank_local


def first_nonfinite(values: dict[str, Optional[float]]) -> Optional[tuple[str, float]]:
    """(name, value) of the first value that is not a finite number (None values are absent, not bad)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            return name, value
    return None


class NonFiniteGuard:
    """Stop at the first step whose loss, a loss term or the gradient norm is not finite, or skip up to
    `max_skips` such steps in the whole run when the optimizer left the weights untouched."""

    def __init__(self, max_skips: int, skipped: int = 0):
        self.max_skips = max_skips
        self.skipped = skipped

    def check(
        self, step: int, values: dict[str, Optional[float]], update_skipped: bool, last_checkpoint: Callable[[], Optional[str]]
    ) -> bool:
        """True when `step` was a non-finite step that is skipped; raises TrainingStopped when the run must stop.
        `last_checkpoint()` names the newest complete checkpoint (asked only then)."""
        bad = first_nonfinite(values)
        if bad is None:
            return False
        name, value = bad
        where = f"step {step}: {name} is {value}"
        newest = last_checkpoint()
        newest = f"the newest complete checkpoint is {newest}" if newest else "no checkpoint was written yet"
        if update_skipped and self.skipped < self.max_skips:
            self.skipped += 1
            log.warning(
                "%s; the optimizer skipped this update (%d of train.max_nonfinite_steps=%d skips used)", where, self.skipped, self.max_skips
            )
            return True
        if not update_skipped:
            why = "the update was applied, so the weights are no longer trustworthy"
        elif self.max_skips:
            why = f"train.max_nonfinite_steps={self.max_skips} skips are used up"
        else:
            why = "train.max_nonfinite_steps=0"
        raise TrainingStopped(
            f"{where} (not a finite number; {why}); stopped before saving anything: {newest}. "
            f"Lower optim.lr, check loss.* and the data, then rerun the same command to resume from it"
            + ("" if self.max_skips else ", or allow a few skipped steps with train.max_nonfinite_steps=N")
        )


def local_weights_finite(module: torch.nn.Module) -> bool:
    """Whether this rank's share of the weights is finite (under ZeRO-3 a parameter's data is its local partition)."""
    for param in module.parameters():
        data = getattr(param, "ds_tensor", param)
        if data.numel() and not bool(torch.isfinite(data).all()):
            return False
    return True


def directory_bytes(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


def check_free_space(root: str, previous_checkpoint: Optional[str], parameters: int) -> None:
    """Refuse to start a save that cannot fit: need ~ the previous checkpoint's size (or 16 bytes per parameter) + 10%."""
    os.makedirs(root, exist_ok=True)
    need = directory_bytes(previous_checkpoint) if previous_checkpoint else parameters * BYTES_PER_PARAMETER
    need = int(need * 1.1) + (1 << 20)
    free = shutil.disk_usage(root).free
    if free < need:
        raise TrainingStopped(no_space_message(root, need, free, previous_checkpoint))


def no_space_message(root: str, need: int, free: Optional[int], previous_checkpoint: Optional[str]) -> str:
    kept = f"the newest complete checkpoint {previous_checkpoint} is kept" if previous_checkpoint else "no checkpoint was written yet"
    free_text = f", {free / 2**20:.0f} MB free" if free is not None else ""
    return (
        f"no space left on the filesystem of {root}: a checkpoint needs ~{need / 2**20:.0f} MB{free_text}; {kept}. "
        f"Free space (or lower checkpoint.keep_last), then rerun the same command to resume"
    )


def is_disk_full(exc: BaseException, root: str) -> bool:
    """An OSError for a full disk or quota, or torch.save's RuntimeError for a failed write on an (almost) full filesystem."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, RuntimeError) and "write failed" in str(exc):
        try:
            return shutil.disk_usage(root).free < (64 << 20)
        except OSError:
            return False
    return False
