"""`teacher.source: partitioned`: the frozen teacher's parameters split across the data-parallel ranks, ZeRO-3 style.

Each rank keeps 1/N of every teacher parameter (DeepSpeed pads each to a multiple of N; parameters below
`zero_optimization.stage3_param_persistence_threshold` elements stay whole on every rank, as for a ZeRO-3
student); a forward gathers each module's parameters just before that module runs and frees them after it,
layer by layer. The teacher is never in an optimizer: it is a ZeRO-3 DeepSpeed engine with no optimizer (an
inference engine), beside the student's. Every rank must run the teacher's forward the same number of
times — the loop does: every rank runs every micro batch.

Until `bind()` the teacher is whole in host memory (the student is initialised from its layers then);
`bind()` moves it to the device a parameter at a time, partitioned, so the device never holds all of it.
When the chunked logit losses read the teacher's vocabulary projection outside its forward, `outputs()`
hands them a gathered copy of that one matrix for the micro batch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch
from torch import nn

from distill.config import read_deepspeed_json
from distill.model_outputs import ModelOutputs
from distill.models.build import load_teacher, resolve_dtype
from distill.teachers.online import OnlineTeacher

log = logging.getLogger("distill.teachers.online")


class _TeacherForward(nn.Module):
    """The module DeepSpeed wraps: one call is the teacher's side of one micro batch (so ZeRO-3's per-forward
    bookkeeping, started and ended by the top module, sees one forward per micro batch)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.objective = None
        self.inference_mode = True
        self.full_logits = False

    def forward(self, batch):
        import deepspeed  # deepspeed: not at start-up

        out = self.objective.teacher_forward(self.model, batch, self.inference_mode, self.full_logits)
        if isinstance(out.head, nn.Module):  # the chunked losses read the projection's weights outside its forward
            params = [p for p in out.head.parameters(recurse=False)]
            with deepspeed.zero.GatheredParameters(params):
                bias = getattr(out.head, "bias", None)
                head = (out.head.weight.detach().clone(), bias.detach().clone() if bias is not None else None)
            out = dataclasses.replace(out, head=head)
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}  # a dict: DeepSpeed's output hooks walk it


def zero3_inference_config(user_zero: Optional[dict], micro_batch: int, dtype: torch.dtype) -> dict[str, Any]:
    """DeepSpeed config of the teacher's engine: stage 3, no optimizer, the user's stage-3 knobs (prefetch, persistence)."""
    zero = {k: v for k, v in (user_zero or {}).items() if k.startswith("stage3_") or k in ("overlap_comm", "offload_param")}
    zero.pop("stage3_gather_16bit_weights_on_model_save", None)
    zero["stage"] = 3
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        ds["fp16"] = {"enabled": True}
    return ds


def partition(model: nn.Module, ds_config: dict) -> tuple[Any, _TeacherForward]:
    """Split `model`'s parameters across the ranks (deepspeed.zero.Init on the built module: each parameter moved to
    the device and partitioned in turn) and wrap it in a stage-3 engine without optimizer. Returns (engine, wrapper)."""
    import deepspeed  # deepspeed: not at start-up

    wrapper = _TeacherForward(model)
    deepspeed.zero.Init(module=wrapper, config_dict_or_path=ds_config)
    engine, _, _, _ = deepspeed.initialize(model=wrapper, config=ds_config, dist_init_required=False)
    engine.eval()
    return engine, wrapper


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of teacher parameters this rank holds between forwards: its partition of each parameter, plus the whole of
    any parameter kept gathered (those under stage3_param_persistence_threshold, whole from their first forward on)."""
    total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
        whole = p.ds_numel if getattr(p, "ds_persist", False) else p.data.numel()  # p.data is empty for a released parameter
        total += whole * p.element_size()
    return total


def full_parameter_bytes(model: nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())


class PartitionedTeacher(OnlineTeacher):
    """The online teacher with its parameters partitioned across the data-parallel ranks (`teacher.source: partitioned`)."""

    def __init__(
        self, model: nn.Module, path: str, inference_mode: bool = True, full_logits: bool = False, ds_config: Optional[dict] = None
    ):
        super().__init__(model, path, inference_mode, full_logits)
        self.ds_config = ds_config
        self.engine = None
        self.wrapper: Optional[_TeacherForward] = None

    @classmethod
    def load(cls, cfg, device: torch.device) -> "PartitionedTeacher":
        dtype = resolve_dtype(cfg.teacher.dtype, device)
        model = load_teacher(cfg.teacher.path, dtype, cfg.teacher.attn_implementation, torch.device("cpu"))  # whole, in host memory
        user_zero = read_deepspeed_json(cfg.deepspeed.config).get("zero_optimization")
        ds = zero3_inference_config(user_zero, cfg.train.micro_batch, dtype)
        return cls(model, cfg.teacher.path, cfg.teacher.inference_mode, not cfg.train.logits_where_needed, ds)

    def bind(self, objective) -> None:
        """The objective, then the partitioning (after the student has copied its layers from the whole teacher)."""
        super().bind(objective)
        if self.engine is None:
            self.engine, self.wrapper = partition(self.model, self.ds_config)
            self.wrapper.inference_mode, self.wrapper.full_logits = self.inference_mode, self.full_logits
            log.info(
                "teacher partitioned across the ranks (ZeRO-3, no optimizer): this rank holds %.1f of %.1f MB of its parameters "
                "(its partitions, and the parameters under stage3_param_persistence_threshold whole)",
                local_parameter_bytes(self.model) / 2**20,
                full_parameter_bytes(self.model) / 2**20,
            )
        self.wrapper.objective = objective

    def compile(self) -> None:
        """Not compiled: ZeRO-3's gather hooks run around each module (train.compile compiles the student only)."""

    def outputs(self, batch) -> ModelOutputs:
        return ModelOutputs(**self.engine(batch))

    def describe(self) -> str:
        count = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())
        return f"{type(self.model).__name__}, {count / 1e6:.2f}M parameters, frozen, partitioned across the ranks"


def partition_problems(cfg, world_size: int) -> list[str]:
    """Where `teacher.source: partitioned` cannot work (preflight / distill-train --check), one line each."""
    if cfg.teacher.source != "partitioned":
        return []
    problems = []
    if not cfg.teacher.path:
        problems.append("teacher.source=partitioned needs a teacher to partition: set teacher.path, or use teacher.source=online")
    if world_size < 2:
        problems.append(
            f"teacher.source=partitioned splits the teacher's parameters across the data-parallel ranks, but this run has {world_size} "
            f"rank: launch 2 or more (deepspeed --num_gpus N), or use teacher.source=online"
        )
    return problems
