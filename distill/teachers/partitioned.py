"""`teacher.source: partitioned`: the frozen teacher's parameters split across the data-parallel ranks, ZeRO-3 style.

Each rank keeps 1/N of every teacher parameter (DeepSpeed pads each to a multiple of N; parameters below
`zero_optimization.stage3_param_persistence_threshold` elements are gathered whole on every rank at their first
forward and kept, as for a ZeRO-3 student); a forward gathers each module's parameters just before that module runs
and frees them after it, layer by layer. The teacher is never in an optimizer: it is a ZeRO-3 DeepSpeed engine with
no optimizer (an inference engine), beside the student's. Every rank must run the teacher's forward the same number
of times — the loop does: every rank runs every micro batch.

The teacher is never whole in any rank's memory, host or device (`load_partitioned`): the model is built under
`deepspeed.zero.Init` (each module's parameters partitioned as soon as the module is constructed, no weight
initialisation), then each rank reads only its own slice of every tensor from the safetensors checkpoint, one tensor
at a time, straight into its partition. `student.init=teacher` copies from it a parameter at a time, each gathered
for the copy and freed (`GatheredWeights`). When the chunked logit losses read the teacher's vocabulary projection
outside its forward, `outputs()` hands them a gathered copy of that one matrix for the micro batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from distill.model_outputs import ModelOutputs
from distill.models.build import ModelError, load_teacher_config
from distill.models.families import family_of
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
    return ds | precision_section(dtype)


def precision_section(dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed precision keys that make ZeRO-3 hold parameters in `dtype` ({} = fp32)."""
    return {torch.bfloat16: {"bf16": {"enabled": True}}, torch.float16: {"fp16": {"enabled": True}}}.get(dtype, {})


def partition(model: nn.Module, ds_config: dict) -> tuple[Any, _TeacherForward]:
    """Wrap `model` in a stage-3 engine without optimizer, its parameters split across the ranks: already partitioned
    by `load_partitioned`, or (a model built whole) each moved to the device and partitioned in turn by
    deepspeed.zero.Init. Returns (engine, wrapper)."""
    wrapper = _TeacherForward(model)
    return inference_engine(wrapper, ds_config), wrapper


def inference_engine(module: nn.Module, ds_config: dict) -> Any:
    """A stage-3 DeepSpeed engine without optimizer around `module` (its parameters partitioned, each submodule's
    gathered just before it runs), in eval mode: one forward call of the engine per batch."""
    import deepspeed  # deepspeed: not at start-up

    deepspeed.zero.Init(module=module, config_dict_or_path=ds_config)
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config, dist_init_required=False)
    engine.eval()
    return engine


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


# ------------------------------------------------------------------------------------------------
# Loading: each rank reads only its partition


def safetensors_files(path: str) -> list[str]:
    """The weight files of the model directory `path`: model.safetensors, or the shards its index lists (in name order);
    [] when it has none (only pytorch_model.bin, say)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            names = sorted(set(json.load(handle).get("weight_map", {}).values()))
        bad = [n for n in names if os.path.basename(n) != n or n in ("", ".", "..")]
        if bad:
            raise ModelError(f"{index} names weight files outside its directory ({bad[0]!r}); re-save the teacher with save_pretrained")
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise ModelError(f"{index} lists {missing[0]}, which is not in {path}: the teacher's checkpoint is incomplete")
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.exists(single) else []


def load_partitioned(path: str, dtype: torch.dtype, attn_implementation: str, ds_config: dict) -> nn.Module:
    """The frozen teacher at `path` (a local Hugging Face directory with safetensors weights) with its parameters
    partitioned across the ranks of the process group as DeepSpeed ZeRO-3 partitions them (`ds_config`: a stage-3
    config, e.g. `zero3_inference_config(...)`), never whole in any rank's memory. Every rank must call it (the
    construction is collective); `dtype` is the parameters' dtype, `attn_implementation` the attention kernel.

    The model is built under `deepspeed.zero.Init` without weight initialisation (each module's parameters are
    partitioned as soon as the module is constructed; tied parameters are tied, one parameter); then each rank reads
    from the checkpoint, one tensor at a time and memory-mapped, only the elements of its own partition and writes them
    into it (`fill_partitions`). Peak host memory per rank: its partition of the teacher (1/N) plus one tensor's slice;
    a parameter the checkpoint stores in another layout (transformers' weight conversions, e.g. an MoE layer's experts
    fused into one parameter) is converted whole, one at a time. A checkpoint in pickle format (pytorch_model.bin) is
    refused: convert it once with save_pretrained (safetensors). Run it with `partition()` (the inference engine);
    `GatheredWeights` reads it one parameter at a time."""
    import deepspeed  # deepspeed: not at start-up
    import transformers  # transformers: not at start-up
    from transformers.initialization import no_init_weights  # transformers: not at start-up
    from transformers.integrations.deepspeed import prevent_arange_dtype_change  # transformers: not at start-up

    config = load_teacher_config(path)
    files = safetensors_files(path)
    if not files:
        raise ModelError(not_safetensors(path))
    auto = getattr(transformers, family_of(config).auto_class)
    # the model's classes imported before zero.Init: a class created inside it keeps the __init__ it had before its
    # decorators (transformers' hub-kernel wrappers) once zero.Init restores the originals at its exit
    auto._model_mapping[type(config)]
    # zero.Init takes the parameters' dtype from the config's precision keys (its dtype argument is ignored on a CPU)
    ds_config = {k: v for k, v in ds_config.items() if k not in ("bf16", "fp16")} | precision_section(dtype)
    # prevent_arange_dtype_change: RoPE tables stay float32 under zero.Init; it must be entered before zero.Init
    with no_init_weights(), prevent_arange_dtype_change(), _partitioned_init(deepspeed)(config_dict_or_path=ds_config):
        model = auto.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # skipped with the initialisation: an output projection tied to the input embedding is one parameter
    fill_partitions(model, files)
    model.eval()
    model.requires_grad_(False)
    return model


def _partitioned_init(deepspeed):
    """deepspeed.zero.Init that partitions each parameter as its module is built without first broadcasting rank 0's
    values of it to every rank: every partition is written from the checkpoint next (a parameter it lacks is refused),
    so the broadcast would only send the whole teacher, a parameter at a time, through every rank for nothing."""

    class InitWithoutBroadcast(deepspeed.zero.Init):
        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    return InitWithoutBroadcast


def not_safetensors(path: str) -> str:
    return (
        f"teacher.path {path!r} has no safetensors weights (model.safetensors or model.safetensors.index.json), which "
        f"teacher.source=partitioned reads a partition at a time; convert it once (AutoModel...from_pretrained(DIR)"
        f".save_pretrained(NEW_DIR) writes safetensors) or use teacher.source=online"
    )


class _Source:
    """One tensor of the checkpoint: its shape, and any flat range of its elements (from a safetensors file, memory-mapped
    and closed after each read, or from a tensor already converted in memory)."""

    def __init__(self, name: str, file: Optional[str] = None, tensor: Optional[torch.Tensor] = None):
        self.name, self.file, self.tensor = name, file, tensor
        if tensor is not None:
            self.shape = tuple(tensor.shape)
        else:
            from safetensors import safe_open  # safetensors: with torch, not at start-up

            with safe_open(file, framework="pt") as handle:
                self.shape = tuple(handle.get_slice(name).get_shape())
        self.numel = math.prod(self.shape)

    def read(self, start: int, end: int) -> torch.Tensor:
        """Flat elements [start, end) (rows read whole from the file, then cut)."""
        if self.tensor is not None:
            return self.tensor.reshape(-1)[start:end]
        from safetensors import safe_open  # safetensors: with torch, not at start-up

        with safe_open(self.file, framework="pt") as handle:
            if len(self.shape) < 2:
                return handle.get_slice(self.name)[start:end] if self.shape else handle.get_tensor(self.name).reshape(-1)
            row = math.prod(self.shape[1:])
            first, last = start // row, -(-end // row)
            return handle.get_slice(self.name)[first:last].reshape(-1)[start - first * row : end - first * row]


def _write(name: str, target: torch.Tensor, source: _Source) -> None:
    """Write `source` into `target`: a ZeRO-3 parameter gets only this rank's partition of it (the flat range
    [rank * p, (rank + 1) * p) of the whole, p = its partition size; DeepSpeed's layout), anything else all of it."""
    shape = tuple(getattr(target, "ds_shape", target.shape))
    if shape != source.shape:
        raise ModelError(
            f"the teacher's checkpoint holds {source.name} with shape {source.shape}, its config.json makes {name} {shape}; "
            f"the directory's weights and config do not belong together"
        )
    if not hasattr(target, "ds_id"):
        target.copy_(source.read(0, source.numel).view(shape))
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # deepspeed: not at start-up

    if target.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        raise RuntimeError(f"{name} is gathered while the teacher loads; expected only its partition here")
    part = target.ds_tensor
    rank = torch.distributed.get_rank(group=target.ds_process_group)
    start, end = min(rank * part.ds_numel, target.ds_numel), min((rank + 1) * part.ds_numel, target.ds_numel)
    if end > start:
        part.narrow(0, 0, end - start).copy_(source.read(start, end))


@torch.no_grad()
def fill_partitions(model: nn.Module, files: list[str]) -> None:
    """Every parameter and persistent buffer of `model` (built under zero.Init) from the safetensors `files`, each rank
    writing its own partitions. Checkpoint names map to the model's as `from_pretrained` maps them (transformers' weight
    renamings and conversions, the base-model prefix added or dropped); names the model does not have are skipped, a
    parameter the checkpoint lacks is refused in one line."""
    from safetensors import safe_open  # safetensors: with torch, not at start-up
    from transformers.conversion_mapping import get_model_conversion_mapping  # transformers: not at start-up
    from transformers.core_model_loading import (  # transformers: not at start-up
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    targets = model.state_dict(keep_vars=True)  # name -> the parameter or buffer itself (a tied parameter under both names)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    stored = []
    for file in files:
        with safe_open(file, framework="pt") as handle:
            stored += [(key, file) for key in handle.keys()]
    stored.sort(key=lambda item: dot_natural_key(item[0]))  # the order conversions expect (experts 0, 1, ..., 10)
    filled: set[int] = set()
    groups: dict[str, Any] = {}
    for key, file in stored:
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, targets)
        if name not in targets:
            continue  # not part of the model (as from_pretrained, which reports it as unexpected)
        if pattern is None:
            _write(name, targets[name], _Source(key, file=file))
            filled.add(id(targets[name]))
            continue
        if name not in groups:  # one converter per target parameter, as transformers converts them
            template = by_pattern[pattern]
            groups[name] = template.copy(template.source_patterns, template.target_patterns, operations=template.operations)
        groups[name].add_tensor(name, key, pattern, _reader(file, key))
    for name, group in groups.items():
        for target, tensor in group.convert(name, model=model, config=model.config).items():
            tensor = tensor[0] if isinstance(tensor, list) else tensor
            if target in targets:
                _write(target, targets[target], _Source(target, tensor=tensor))
                filled.add(id(targets[target]))
        del group
    missing = [name for name, p in model.named_parameters() if id(p) not in filled]
    if missing:
        raise ModelError(
            f"the teacher's checkpoint lacks {len(missing)} of the model's parameters (first: {missing[0]}); the directory's "
            f"weights do not belong to its config.json"
        )


def _reader(file: str, key: str) -> Callable[[], torch.Tensor]:
    """A whole tensor of the checkpoint, read when a conversion asks for it."""

    def read() -> torch.Tensor:
        from safetensors import safe_open  # safetensors: with torch, not at start-up

        with safe_open(file, framework="pt") as handle:
            return handle.get_tensor(key)

    return read


class GatheredWeights(Mapping):
    """A partitioned model's tensors by state-dict name, each gathered whole when read (a copy; the partition is released
    again): what `student.init=teacher` copies from, one parameter at a time. Each read is a collective: every rank
    must read the same names in the same order (the layer copy does)."""

    def __init__(self, model: nn.Module):
        self._entries = model.state_dict(keep_vars=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        import deepspeed  # deepspeed: not at start-up

        tensor = self._entries[name]
        if not hasattr(tensor, "ds_id"):
            return tensor.detach()
        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()

    def __contains__(self, name: object) -> bool:
        return name in self._entries  # without gathering

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


# ------------------------------------------------------------------------------------------------
# The teacher source


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
    def load(cls, teacher_cfg, plan, ctx) -> "PartitionedTeacher":
        """This rank's partition of the teacher (`load_partitioned`, the plan's dtype and stage-3 config)."""
        model = load_partitioned(teacher_cfg.path, plan.teacher_dtype, teacher_cfg.attn_implementation, plan.teacher_ds_config)
        log.info(
            "teacher loaded partitioned across the ranks: this rank holds %.1f of %.1f MB of its parameters",
            local_parameter_bytes(model) / 2**20,
            full_parameter_bytes(model) / 2**20,
        )
        return cls(model, teacher_cfg.path, teacher_cfg.inference_mode, plan.full_logits, plan.teacher_ds_config)

    def init_weights(self) -> GatheredWeights:
        return GatheredWeights(self.model)

    def bind(self, objective) -> None:
        """The objective, then the inference engine around the partitioned teacher."""
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


def partition_problems(teacher_cfg, world_size: int, zero: Optional[dict] = None) -> list[str]:
    """Where `teacher.source: partitioned` cannot work (preflight / distill-train --check), one line each; `zero`: the
    run's zero_optimization settings (the teacher's engine takes its stage-3 knobs)."""
    if teacher_cfg.source != "partitioned":
        return []
    problems = []
    if not teacher_cfg.path:
        problems.append("teacher.source=partitioned needs a teacher to partition: set teacher.path, or use teacher.source=online")
    elif os.path.exists(os.path.join(teacher_cfg.path, "config.json")):
        try:
            if not safetensors_files(teacher_cfg.path):
                problems.append(not_safetensors(teacher_cfg.path))
        except ModelError as exc:
            problems.append(str(exc))
    if world_size < 2:
        problems.append(
            f"teacher.source=partitioned splits the teacher's parameters across the data-parallel ranks, but this run has {world_size} "
            f"rank: launch 2 or more (deepspeed --num_gpus N), or use teacher.source=online"
        )
    if ((zero or {}).get("offload_param") or {}).get("device") == "nvme":
        problems.append(
            "teacher.source=partitioned writes each rank's partition of the teacher in place, which zero_optimization.offload_param "
            "device nvme does not allow: use offload_param device cpu or none"
        )
    return problems
