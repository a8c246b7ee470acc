"""Which device each cache writer takes, and where the teacher goes (whole on every device, or partitioned).

- A rank of a launcher (`deepspeed`, torchrun, srun) takes GPU `LOCAL_RANK` of its node: 8 ranks on a node of 8 GPUs
  take one each (NCCL takes one rank per GPU: distill/cache/ranks.py refuses more ranks than GPUs in one line).
- A local Beam worker process takes GPU `i mod count`, i being its worker index (the local runner numbers its worker
  processes worker_0, worker_1, ... in WORKER_ID); in-process (--workers 1) that is GPU 0.
- No GPU (or --device cpu): the CPU.

Pure functions of the index and the device count, so the rule is tested with the count given (no GPU here).
"""

from __future__ import annotations

import os
import re
from typing import Optional

REPLICATE_FRACTION = 0.7  # a teacher whose weights fit in this share of a device's memory is replicated (placement=auto)


def device_for(index: int, gpu_count: int, want: str = "auto") -> str:
    """The device (a torch device string) of writer `index` (a local rank, or a local Beam worker's index)."""
    if want == "cpu" or (want == "auto" and gpu_count == 0):
        return "cpu"
    if gpu_count == 0:
        raise RuntimeError("--device cuda but no GPU is visible here (CUDA_VISIBLE_DEVICES, drivers); use --device auto or cpu")
    return f"cuda:{index % gpu_count}"


def beam_worker_index(environ: Optional[dict] = None) -> int:
    """This Beam worker's index: the number in WORKER_ID (worker_3 -> 3) the local runner gives each worker process, else 0."""
    worker = (environ if environ is not None else os.environ).get("WORKER_ID", "")
    found = re.search(r"(\d+)$", worker)
    return int(found.group(1)) if found else 0


def choose_placement(want: str, teacher_bytes: int, device_bytes: int, copies: int = 1) -> str:
    """`want` unless auto; auto = replicated when `copies` whole teachers fit in REPLICATE_FRACTION of `device_bytes`
    (a GPU's memory, copies = 1; on CPU the host memory, copies = the node's ranks), else partitioned."""
    if want != "auto":
        return want
    return "replicated" if teacher_bytes * copies <= REPLICATE_FRACTION * device_bytes else "partitioned"


def teacher_bytes(config, dtype) -> int:
    """Bytes of the teacher's parameters in `dtype`, counted on the meta device from its config (no weights read)."""
    import torch  # torch: not at start-up

    from distill.models.build import make_student  # torch (via distill.models.build): not at start-up

    with torch.device("meta"):  # shapes only: no memory
        model = make_student(config, "sdpa")
    return sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=dtype).element_size()


def device_memory(device: str, local_ranks: int = 1) -> tuple[int, int]:
    """(bytes of memory of `device`, teacher copies that memory would hold when replicated): a GPU's own memory, one copy;
    on CPU the host's memory, one copy per rank of this node."""
    import torch  # torch: not at start-up

    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory, 1
    import psutil  # psutil: not at start-up

    return psutil.virtual_memory().total, max(1, local_ranks)
