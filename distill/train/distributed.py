"""Process-group setup, rank-tagged logging and small collective helpers."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    collective_timeout_s: float = 600.0  # init_process_group's timeout (train.collective_timeout_s, resolved)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_collective_timeout_s(cuda: bool) -> float:
    """train.collective_timeout_s=null: 1800 s with GPUs (large saves and conversions keep ranks waiting), 600 s on CPU."""
    return 1800.0 if cuda else 600.0


def init_distributed(local_rank_arg: int | None = None, collective_timeout_s: float | None = None) -> DistContext:
    """Join the process group the launcher (deepspeed, torchrun, srun) set up, or make a 1-process one; its collectives wait
    `collective_timeout_s` for the other ranks (None: `default_collective_timeout_s`)."""
    import deepspeed  # deepspeed: not at start-up
    from deepspeed.accelerator import get_accelerator  # deepspeed: not at start-up

    # DeepSpeed's ZeRO calls a collective torch renamed; the warning repeats on every rank and step.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if not torch.cuda.is_available() and os.environ.get("DISTILL_CPU_SHM_COMM", "0") != "1":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op at every process start (minutes on a
        # small machine, and again whenever another environment rebuilt it); gloo is enough for CPU runs.
        import deepspeed.ops  # deepspeed: not at start-up

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    if "WORLD_SIZE" not in os.environ:  # started as a plain process
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    accelerator = get_accelerator()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = collective_timeout_s or default_collective_timeout_s(torch.cuda.is_available())
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=accelerator.communication_backend_name(), verbose=False, timeout=datetime.timedelta(seconds=timeout)
        )
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    return DistContext(dist.get_rank(), world, local_rank, local_world, device, timeout)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, world: int):
        super().__init__()
        self.tag = f"rank {rank}/{world}"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.tag
        return True


def setup_logging(rank: int, world: int, level: int | None = None) -> None:
    """Every log line says which rank speaks; ranks other than 0 log warnings and errors only."""
    handler = logging.StreamHandler()
    handler.addFilter(_RankFilter(rank, world))
    handler.setFormatter(logging.Formatter("%(asctime)s [%(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level is not None else (logging.INFO if rank == 0 else logging.WARNING))
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def end_finished_rank(code: int) -> None:
    """End a rank of a multi-rank run that finished (or stopped on request) and passed the run's last barrier: flush the
    logs and exit with `code` without interpreter teardown. At teardown, ranks of 2-process ZeRO-3 runs (CPU, gloo) sometimes
    aborted ('terminate called without an active exception', exit -6) after everything was written, in a communication
    library's thread destructor, also with the process group destroyed first; nothing is left to run by then."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def on_main_then_broadcast(ctx: DistContext, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only; every rank returns its result or raises its exception."""
    payload: list[Any] = [None]
    if ctx.is_main:
        try:
            payload[0] = ("ok", fn())
        except Exception as exc:  # re-raised on every rank below
            payload[0] = ("error", exc)
    if ctx.world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()
