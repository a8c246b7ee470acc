"""A step's numbers, by name: summed over micro batches, reduced over ranks once, logged by rank 0.

`StepSums` collects one optimizer step: device-side sums (the loss and its terms, which stay on the
device so the host never waits inside the accumulation loop) and host-side counters (tokens, padding,
data wait, the stop flag). `reduce()` sums both over every rank in ONE all-reduce and reads the result
back once: the step's only host-device synchronisation. `MetricsLog` (rank 0) writes each step to
metrics.jsonl, chosen names to TensorBoard, and a console line every `log_every` steps. A resumed run first cuts
metrics.jsonl back to the steps its checkpoint holds, so the redone steps are logged once, with the new values.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from kd_common.files import write_atomically
from kd_common.output_rule import OutputError

# TensorBoard tag of each logged name (loss terms are added as loss/<name>)
TENSORBOARD_TAGS = {
    "loss": "loss/total",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "samples_per_s": "train/samples_per_s",
    "samples_seen": "train/samples_seen",
    "peak_memory_mb": "train/peak_memory_mb",
    "skipped_steps": "train/skipped_steps",
}


class StepSums:
    """Sums of one optimizer step on this rank, reduced over all ranks by `reduce()`."""

    def __init__(self, device: torch.device, device_names: list[str], host_names: list[str]):
        self.device = device
        self.device_names = list(device_names)
        self.host_names = list(host_names)
        self.device_sums = torch.zeros(len(self.device_names), dtype=torch.float64, device=device)
        self.host = dict.fromkeys(self.host_names, 0.0)

    def add_device(self, values: list[torch.Tensor]) -> None:
        """Add detached scalar tensors, in the order of `device_names` (no host read)."""
        self.device_sums += torch.stack([v.detach().reshape(()) for v in values]).double()

    def add_device_value(self, name: str, value: torch.Tensor) -> None:
        """One more device-side scalar under its own name (e.g. the gradient norm), read back with the sums; summed over ranks
        like them (a value every rank shares is added by one rank, the others add 0)."""
        self.device_names.append(name)
        self.device_sums = torch.cat([self.device_sums, value.detach().reshape(1).to(self.device_sums.dtype)])

    def add(self, name: str, value: float) -> None:
        self.host[name] += float(value)

    def reduce(self) -> dict[str, float]:
        """Every sum over all ranks, by name: one all-reduce and one read back to the host."""
        host = torch.tensor([self.host[n] for n in self.host_names], dtype=torch.float64)
        flat = torch.cat([self.device_sums, host.to(self.device, non_blocking=True)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        values = flat.tolist()
        return dict(zip(self.device_names + self.host_names, values))


HOST_COUNTERS = ("tokens", "padded_tokens", "logit_positions", "token_pairs", "padded_token_pairs", "data_wait", "stop_flag")


def count_batch(sums: StepSums, attention_mask: torch.Tensor, logit_positions: Optional[torch.Tensor], data_wait: float) -> None:
    """Add one micro batch's real tokens, padded slots, sum of length^2 (attention FLOPs) and logit positions (CPU mask: no sync)."""
    lengths = attention_mask.sum(1)
    sums.add("tokens", int(lengths.sum()))
    sums.add("token_pairs", int((lengths * lengths).sum()))
    sums.add("padded_tokens", attention_mask.numel())
    sums.add("padded_token_pairs", attention_mask.numel() * attention_mask.shape[1])
    sums.add("logit_positions", 0 if logit_positions is None else logit_positions.numel())
    sums.add("data_wait", data_wait)


def step_metrics(
    step: int,
    reduced: dict[str, float],
    term_names: list[str],
    micro_batches: int,
    world_size: int,
    elapsed: float,
    global_batch: int,
    **extra: Any,
) -> dict[str, Any]:
    """One step's metrics by name from its reduced sums (means over every micro batch of every rank)."""
    denom = micro_batches * world_size
    return {
        "step": step,
        "loss": reduced["loss"] / denom,
        **{f"loss_{n}": reduced[f"loss_{n}"] / denom for n in term_names},
        **{k: v for k, v in extra.items() if k in ("lr", "grad_norm")},
        "tokens_per_s": reduced["tokens"] / elapsed,
        "samples_per_s": global_batch / elapsed,
        "samples_seen": step * global_batch,
        **{k: v for k, v in extra.items() if k not in ("lr", "grad_norm")},
        # for the throughput benchmark (bench/train_throughput.py): sums over ranks
        "tokens": reduced["tokens"],
        "padded_tokens": reduced["padded_tokens"],
        "logit_positions": reduced["logit_positions"],
        "data_wait_share": reduced["data_wait"] / world_size / elapsed,
        "token_pairs": reduced["token_pairs"],
        "padded_token_pairs": reduced["padded_token_pairs"],
    }


def keep_steps_up_to(path: str, step: int) -> None:
    """Make the metrics file hold each step <= `step` once (its last line: the run the checkpoint continues) and nothing
    after: a run resumed from step `step` redoes the later steps and logs them again. Replaced atomically, only when needed.
    """
    if not os.path.exists(path):
        return
    with open(path) as handle:
        lines = handle.readlines()
    kept: dict[int, str] = {}
    for line in lines:
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill mid-write
        if isinstance(logged, int) and logged <= step:
            kept.pop(logged, None)
            kept[logged] = line if line.endswith("\n") else line + "\n"
    result = [kept[s] for s in sorted(kept)]
    if result != lines:
        write_atomically(path, "".join(result))


class MetricsLog:
    """Rank 0's outputs: one JSON line per step, TensorBoard scalars and a console line every `log_every` steps."""

    def __init__(
        self, output_dir: str, start_step: int, config_yaml: str, log_every: int, term_names: list[str], world_size: int, total_steps: int
    ):
        from torch.utils.tensorboard import SummaryWriter  # torch: not at start-up

        self.log_every = log_every
        self.term_names = term_names
        self.world_size = world_size
        self.total_steps = total_steps
        # TensorBoard's event files are append-only: purge_step makes TensorBoard hide what earlier files logged at the
        # redone steps (> start_step; the first step this run logs is start_step + 1), so each step shows once
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", start_step)
        write_atomically(os.path.join(output_dir, "config.yaml"), config_yaml)  # replaces a symlink there, never writes through it
        path = os.path.join(output_dir, "metrics.jsonl")
        if os.path.islink(path):
            raise OutputError(f"{path} is a symbolic link; this run writes its metrics there itself: remove the link and rerun")
        keep_steps_up_to(path, start_step)
        # O_NOFOLLOW: a link put there after the check is refused by the kernel, not followed
        self.jsonl = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666), "a")

    def write(self, metrics: dict[str, Any], last_step: bool, console) -> None:
        step = metrics["step"]
        self.jsonl.write(json.dumps(metrics) + "\n")
        self.jsonl.flush()
        if step % self.log_every and not last_step:
            return
        for name, tag in list(TENSORBOARD_TAGS.items()) + [(f"loss_{n}", f"loss/{n}") for n in self.term_names]:
            if metrics.get(name) is not None:
                self.writer.add_scalar(tag, metrics[name], step)
        terms = " ".join(f"{n} {metrics[f'loss_{n}']:.4f}" for n in self.term_names)
        grad = metrics["grad_norm"] if metrics["grad_norm"] is None else round(metrics["grad_norm"], 3)
        console(
            f"[rank 0/{self.world_size}] step {step}/{self.total_steps} loss {metrics['loss']:.4f} ({terms}) lr {metrics['lr']:.2e} "
            f"grad {grad} {metrics['tokens_per_s']:.0f} tok/s"
        )

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        self.jsonl.close()
