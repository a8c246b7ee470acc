"""Importance of every prunable unit of a teacher, from a calibration pass: Minitron's activation-based scores.

The frozen teacher runs over N sequences of a prepared dataset (`calibrate`); forward hooks read, per sequence, the mean
over its real tokens (padding excluded) of:

- attention heads: the L2 norm of each head's output (the input of the output projection, head_dim values per head);
  a key/value group's score is the sum of its query heads' scores;
- MLP neurons: |activation| of each intermediate unit (the input of the down projection: act(gate) x up, or act(up));
- experts (mixture of experts): the routing weight each expert gets (the softmax probability of the router's top-k picks,
  0 where not picked): router usage; experts are pruned whole by it, the neurons inside them are not scored;
- hidden (embedding) channels: |output| of every norm of hidden width in the transformer (the embeddings' LayerNorm,
  each block's norms, the final norm), summed over those norms;
- layers: 1 - cos(block input, block output) per token (ShortGPT's block importance); optionally (`layer_drop_kl`) the
  divergence KL(teacher || teacher without the block) of the next-token (or masked-LM) distributions when the block is
  skipped, the increase of the distillation loss a student without that block starts from.

The per-sequence values are then aggregated over the sequences as Minitron documents: `l2` = sqrt(sum of squares) or
`mean`. Scores are kept in float64. Several processes (a launch of N) each score every N-th batch and the sums are
all-reduced: the same scores as one process, up to summation order. The teacher is then either whole in each process or
partitioned across them (`partitioned`: a ZeRO-3 engine without optimizer, every process running as many forwards).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.models.families import Family, submodule
from distill.prune.slice import Geometry, is_norm, layouts

log = logging.getLogger("distill.prune")
AGGREGATIONS = ("l2", "mean")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) values -> (B, ...): the mean over each sequence's real tokens (mask (B, T) of 0/1)."""
    weights = mask.to(values.dtype)
    while weights.dim() < values.dim():
        weights = weights.unsqueeze(-1)
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class ImportanceRecorder:
    """Forward hooks on a teacher that collect the per-sequence statistics of the module docstring; `scores()` aggregates."""

    def __init__(self, model: nn.Module, family: Family, geometry: Geometry, aggregation: str = "l2"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {aggregation!r} (one of {AGGREGATIONS})")
        self.model, self.family, self.geo, self.aggregation = model, family, geometry, aggregation
        self.blocks = family.layer_list(model)
        self.layouts = layouts(model, family)
        self.dense = [i for i, lay in enumerate(self.layouts) if not lay.moe]
        self.moe = [i for i, lay in enumerate(self.layouts) if lay.moe]
        self.top_k = int(getattr(model.config, "num_experts_per_tok", 1) or 1)
        self.sums: dict[str, torch.Tensor] = {}
        self.squares: dict[str, torch.Tensor] = {}
        self.sequences = 0
        self.tokens = 0
        self.mask: Optional[torch.Tensor] = None
        self.current: dict[str, torch.Tensor] = {}
        self.recording = True
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._hook_everything()

    # -------------------------------------------------------------------- hooks

    def _hook_everything(self) -> None:
        for i, (block, layout) in enumerate(zip(self.blocks, self.layouts)):
            o = submodule(block, layout.o)
            self._handles.append(o.register_forward_pre_hook(self._heads_hook(i)))
            if not layout.moe:
                self._handles.append(submodule(block, layout.down).register_forward_pre_hook(self._neurons_hook(i)))
            elif layout.router is not None:
                self._handles.append(submodule(block, layout.router).register_forward_pre_hook(self._router_hook(i)))
            self._handles.append(block.register_forward_pre_hook(self._block_input_hook(i), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._block_output_hook(i)))
        for norm in self.hidden_norms():
            self._handles.append(norm.register_forward_hook(self._hidden_hook))

    def hidden_norms(self) -> list[nn.Module]:
        """Every norm of hidden width in the transformer body (not the q/k norms over heads, not an MLM head's)."""
        base = self.family.base_model(self.model)
        found = []
        for name, module in base.named_modules():
            if not is_norm(module) or any(part in name.split(".") for part in ("q_norm", "k_norm", "q_layernorm", "k_layernorm")):
                continue
            weight = getattr(module, "weight", None)
            shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", None)  # ds_shape: a ZeRO-3 partitioned parameter
            if shape is not None and len(shape) == 1 and shape[0] == self.geo.hidden:
                found.append(module)
        return found

    def _slot(self, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if name not in self.current:
            self.current[name] = torch.zeros(shape, dtype=torch.float32, device=device)
        return self.current[name]

    def _sequences(self, x: torch.Tensor) -> torch.Tensor:
        """A hook's input as (B, T, ...) of the current batch (an MoE block may flatten its tokens to (B*T, ...))."""
        b, t = self.mask.shape
        return x.reshape(b, t, *x.shape[1:]) if x.dim() == 2 and x.shape[0] == b * t else x

    def _heads_hook(self, layer: int):
        def hook(module, args):
            if not self.recording:
                return
            x = self._sequences(args[0]).float()
            b, t = x.shape[:2]
            per_head = x.reshape(b, t, self.geo.heads, -1).norm(dim=-1)
            self._slot("heads", (b, self.geo.layers, self.geo.heads), x.device)[:, layer] = _masked_mean(per_head, self.mask)

        return hook

    def _neurons_hook(self, layer: int):
        def hook(module, args):
            if not self.recording:
                return
            x = self._sequences(args[0]).float()
            self._slot("neurons", (x.shape[0], self.geo.layers, x.shape[-1]), x.device)[:, layer] = _masked_mean(x.abs(), self.mask)

        return hook

    def _router_hook(self, layer: int):
        def hook(module, args):
            if not self.recording:
                return
            x = self._sequences(args[0]).float()
            bias = getattr(module, "bias", None)
            logits = F.linear(x, module.weight.float(), bias.float() if bias is not None else None)
            probs = logits.softmax(-1)
            top, index = probs.topk(min(self.top_k, probs.shape[-1]), dim=-1)
            usage = torch.zeros_like(probs).scatter_(-1, index, top)
            self._slot("experts", (x.shape[0], self.geo.layers, probs.shape[-1]), x.device)[:, layer] = _masked_mean(usage, self.mask)

        return hook

    def _hidden_hook(self, module, args, output):
        if not self.recording:
            return
        x = _first(output).float()
        self._slot("hidden", (x.shape[0], self.geo.hidden), x.device).add_(_masked_mean(x.abs(), self.mask))

    def _block_input_hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            self._inputs[layer] = hidden

        return hook

    def _block_output_hook(self, layer: int):
        def hook(module, args, output):
            if not self.recording:
                return
            before, after = self._inputs.pop(layer).float(), _first(output).float()
            distance = 1.0 - F.cosine_similarity(before, after, dim=-1)
            self._slot("layers", (after.shape[0], self.geo.layers), after.device)[:, layer] = _masked_mean(distance, self.mask)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -------------------------------------------------------------------- accumulation

    def begin(self, attention_mask: torch.Tensor) -> None:
        self.mask = attention_mask
        self.current = {}

    def commit(self) -> None:
        """Add the current batch's per-sequence values to the running sums."""
        for name, values in self.current.items():
            v = values.double()
            if name not in self.sums:
                self.sums[name] = torch.zeros(v.shape[1:], dtype=torch.float64, device=v.device)
                self.squares[name] = torch.zeros_like(self.sums[name])
            self.sums[name] += v.sum(0)
            self.squares[name] += (v * v).sum(0)
        self.sequences += int(self.mask.shape[0])
        self.tokens += int(self.mask.sum())
        self.current = {}

    def all_reduce(self) -> None:
        """Sum the running sums of every process of a data-parallel launch (torch.distributed initialised)."""
        import torch.distributed as dist  # torch.distributed: only in a launch of several processes

        for name in sorted(self.sums):
            dist.all_reduce(self.sums[name])
            dist.all_reduce(self.squares[name])
        counts = torch.tensor([self.sequences, self.tokens], dtype=torch.float64, device=next(iter(self.sums.values())).device)
        dist.all_reduce(counts)
        self.sequences, self.tokens = int(counts[0]), int(counts[1])

    def scores(self) -> dict[str, torch.Tensor]:
        """Aggregated scores (float64, on the CPU): layers (L,), [layer_drop_kl (L,)], heads (L, heads), kv_groups (L, kv heads),
        neurons (L, intermediate; NaN rows for layers without a dense MLP), experts (L, experts; NaN rows for dense
        layers), hidden (hidden,)."""
        out = {}
        for name, total in self.sums.items():
            agg = self.squares[name].sqrt() if self.aggregation == "l2" else total / max(1, self.sequences)
            out[name] = agg.cpu()
        heads = out["heads"]
        out["kv_groups"] = heads.reshape(heads.shape[0], self.geo.kv_heads, self.geo.group).sum(-1)
        if "neurons" in out:
            out["neurons"][self.moe] = float("nan")
        if "experts" in out:
            out["experts"][self.dense] = float("nan")
        return out

    # -------------------------------------------------------------------- the layer-drop divergence

    @contextlib.contextmanager
    def skipping(self, layer: int) -> Iterator[None]:
        """Block `layer` passes its input through (its output replaced by its input), recording off."""
        block = self.blocks[layer]
        seen = {}

        def keep_input(module, args, kwargs):
            seen["x"] = args[0] if args else kwargs.get("hidden_states")

        def pass_through(module, args, output):
            if isinstance(output, tuple):
                return (seen["x"],) + tuple(output[1:])
            return seen["x"]

        handles = [block.register_forward_pre_hook(keep_input, with_kwargs=True), block.register_forward_hook(pass_through)]
        self.recording = False
        try:
            yield
        finally:
            self.recording = True
            for handle in handles:
                handle.remove()


class TeacherPass(nn.Module):
    """One calibration forward of the teacher: its transformer body (the hooks see every block), or with `log_probs` the whole
    model's next-token / masked-LM log-probabilities (its own logits: `check_logits` holds them to the family's head and output
    transform). A module of its own so that a partitioned teacher's DeepSpeed engine wraps exactly one call per batch."""

    def __init__(self, model: nn.Module, family: Family):
        super().__init__()
        self.model = model
        self.family = family

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, log_probs: bool = False) -> torch.Tensor:
        if log_probs:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float().log_softmax(-1)
        return self.family.base_model(self.model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def partitioned(model: nn.Module, family: Family, config: dict):
    """A DeepSpeed ZeRO-3 engine without optimizer over the teacher loaded by `load_partitioned` (every parameter split
    across the processes of the launch, each module's gathered just before it runs; `config`: distill/teachers/partitioned.py's
    `zero3_inference_config`)."""
    from distill.teachers.partitioned import inference_engine  # deepspeed (via distill.teachers): not at start-up

    return inference_engine(TeacherPass(model, family), config)


def layer_drop_kl(recorder: ImportanceRecorder, forward, input_ids: torch.Tensor, attention_mask: torch.Tensor, full: torch.Tensor) -> None:
    """KL(teacher || teacher without block l) per sequence (mean over real tokens), for every layer, into the current batch."""
    values = torch.zeros(input_ids.shape[0], recorder.geo.layers, device=full.device)
    for layer in range(recorder.geo.layers):
        with recorder.skipping(layer):
            dropped = forward(input_ids, attention_mask, log_probs=True)
        kl = (full.exp() * (full - dropped)).sum(-1)
        values[:, layer] = _masked_mean(kl, attention_mask)
    recorder.current["layer_drop_kl"] = values


def batches(lengths: np.ndarray, indices: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The chosen rows in batches of similar length (longest first: a memory problem shows at once)."""
    order = indices[np.argsort(-lengths[indices], kind="stable")]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(rows: list, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return input_ids.to(device), mask.to(device)


@torch.inference_mode()
def calibrate(
    model: nn.Module,
    family: Family,
    geometry: Geometry,
    sequences,
    indices: np.ndarray,
    batch_size: int,
    pad_id: int,
    aggregation: str = "l2",
    drop_kl: bool = False,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    forward: Optional[nn.Module] = None,
    device: Optional[torch.device] = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Score `model` over rows `indices` of `sequences` (distill.data.reader.TokenSequences); with `world` > 1 this process
    takes every world-th batch and the sums are all-reduced. `forward`: the teacher's pass (a TeacherPass, or the engine of a
    partitioned one: then every process runs as many batches, a process short of one repeating a batch it does not count).
    Returns (scores, timing: seconds, sequences, tokens, tokens/s, device, processes)."""
    from tqdm import tqdm  # tqdm: not at start-up

    device = device or next(model.parameters()).device
    lockstep = forward is not None and world > 1  # a partitioned teacher: its forwards are collectives
    forward = forward or TeacherPass(model, family)
    todo = batches(sequences.lengths, indices, batch_size)
    if len(todo) < world:
        raise ValueError(f"{len(todo)} calibration batches for {world} processes")
    recorder = ImportanceRecorder(model, family, geometry, aggregation)
    mine = todo[rank::world]
    count = -(-len(todo) // world) if lockstep else len(mine)
    filler = [None] * (count - len(mine))  # a partitioned teacher: every process runs the same number of forwards
    start = time.perf_counter()
    bar = tqdm(total=int(sum(len(b) for b in mine)), unit="seq", desc="calibration", disable=not progress or rank != 0, dynamic_ncols=True)
    try:
        for chunk in mine + filler:
            counted = chunk is not None
            input_ids, mask = collate(sequences.rows(chunk if counted else todo[0]), pad_id, device)
            recorder.begin(mask)
            if drop_kl:
                full = forward(input_ids, mask, log_probs=True)
                layer_drop_kl(recorder, forward, input_ids, mask, full)
            else:
                forward(input_ids, mask)
            if counted:
                recorder.commit()
                bar.update(len(chunk))
    finally:
        bar.close()
        recorder.remove()
    if world > 1:
        recorder.all_reduce()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    timing = {
        "seconds": round(seconds, 3),
        "sequences": recorder.sequences,
        "tokens": recorder.tokens,
        "tokens_per_second": round(recorder.tokens / seconds, 1) if seconds > 0 else None,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "processes": world,
        "layer_drop_kl": drop_kl,
    }
    return recorder.scores(), timing


# ------------------------------------------------------------------------------------------------
# The scores file and its summary

SCORES_FILE = "importance.safetensors"
SUMMARY_FILE = "importance.txt"
SCORES_FORMAT = "distill-prune-scores"


def save_scores(path: str, scores: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """The scores as safetensors; `metadata` (the teacher's fingerprint, the calibration data and timing) kept in its header as JSON."""
    from safetensors.torch import save_file  # safetensors: not at start-up

    header = {
        "format": SCORES_FORMAT,
        "version": "1",
        "teacher_sha256": str(metadata.get("teacher_sha256")),
        "record": json.dumps(metadata),
    }
    save_file({k: v.contiguous() for k, v in scores.items()}, path, metadata=header)


def load_scores(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(scores, metadata) of a file `save_scores` wrote; a ValueError for any other file."""
    from safetensors import safe_open  # safetensors: not at start-up

    with safe_open(path, framework="pt") as handle:
        header = handle.metadata() or {}
        if header.get("format") != SCORES_FORMAT:
            raise ValueError(f"not a distill-prune scores file (format {header.get('format')!r})")
        return {k: handle.get_tensor(k) for k in handle.keys()}, json.loads(header.get("record") or "{}")


def _units(values: torch.Tensor, count: int, prefix: str) -> str:
    valid = [(float(v), i) for i, v in enumerate(values.tolist()) if not math.isnan(v)]
    ordered = sorted(valid)
    weak = ", ".join(f"{prefix}{i} {v:.4g}" for v, i in ordered[:count])
    strong = ", ".join(f"{prefix}{i} {v:.4g}" for v, i in reversed(ordered[-count:]))
    return f"weakest {weak}; strongest {strong}"


def summary(scores: dict[str, torch.Tensor], meta: dict[str, Any], count: int = 4) -> str:
    """A readable account of the scores: the weakest and strongest units of every kind, per layer."""
    lines = [
        f"importance of {meta.get('teacher')} ({meta.get('model_type')}): {meta.get('sequences')} sequences, {meta.get('tokens')} tokens "
        f"of {meta.get('data')} ({meta.get('split')}), aggregation {meta.get('aggregation')} over sequences of the mean over tokens; "
        f"calibration {meta.get('seconds')} s on {meta.get('device')} ({meta.get('tokens_per_second')} tokens/s)",
        "",
        f"layers, 1 - cos(block input, output): {_units(scores['layers'], len(scores['layers']), 'layer ')}",
    ]
    if "layer_drop_kl" in scores:
        lines.append(f"layers, KL(teacher || without the block): {_units(scores['layer_drop_kl'], len(scores['layer_drop_kl']), 'layer ')}")
    lines.append(f"hidden channels: {_units(scores['hidden'], 2 * count, 'c')}")
    lines.append("")
    for layer in range(len(scores["layers"])):
        lines.append(f"layer {layer} (block importance {float(scores['layers'][layer]):.4g}):")
        lines.append(f"  heads: {_units(scores['heads'][layer], count, 'h')}")
        if scores["kv_groups"].shape[1] != scores["heads"].shape[1]:
            lines.append(f"  kv groups: {_units(scores['kv_groups'][layer], count, 'g')}")
        if "neurons" in scores and not torch.isnan(scores["neurons"][layer]).all():
            lines.append(f"  MLP neurons: {_units(scores['neurons'][layer], count, 'n')}")
        if "experts" in scores and not torch.isnan(scores["experts"][layer]).all():
            lines.append(f"  experts (router usage): {_units(scores['experts'][layer], count, 'e')}")
    return "\n".join(lines) + "\n"
