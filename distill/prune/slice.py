"""Cutting a teacher's tensors to a student: what each axis of each tensor is, and the slicing itself.

Every parameter of the teacher is described by the kind of each of its axes (`tensor_axes`), found through the family
registry and the block layout (distill/models/families.py, distill/models/blocks.py) — never by a table of names here:

- `hidden`: the residual stream's channels (embeddings, every projection's input or output on the stream, every
  LayerNorm / RMSNorm of hidden width, the vocabulary projection's input, an MLM head's transform);
- `q` / `kv`: the rows of the query / key-value heads, `head_dim` rows per head (heads are removed whole, head_dim and
  rotary dims are kept); `qkv`: a fused projection (Phi-3's qkv_proj, GPT-2's c_attn), its q, k and v row blocks;
- `neuron`: an MLP's intermediate units (up and gate outputs, down input); `gate_up`: a fused gate and up projection;
- `expert`: a mixture of experts' experts (stacked expert weights, the router's rows).

A layer of the student takes the teacher layer it was kept from (`Keep.layers`); GQA groups are kept whole with their
query heads; the same hidden channels are kept everywhere (the residual stream is one space). Norms over hidden channels
keep their weights (and biases) of the kept channels, so a LayerNorm / RMSNorm then normalises over the kept channels
only: its statistics change (Minitron does the same; the distillation that follows recovers it). A norm over one head
(Qwen3's q/k norms) is untouched; one over all heads (OLMo-2's) is sliced by head rows, its statistics changing likewise.

`slice_state` fills a student built from the pruned config: each of its tensors is the teacher's, sliced by the kinds
of its axes, and must come out with exactly the student's shape (a tensor no part claims may only lose hidden channels,
recognised by its sizes; anything else is a one-line PruneError naming the tensor, never a silent guess).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from distill.models.blocks import BlockLayout, family_block_layout
from distill.models.families import Family, FamilyError, module_name, submodule
from kd_common.errors import UserError

HIDDEN, Q, KV, QKV, NEURON, GATE_UP, EXPERT = "hidden", "q", "kv", "qkv", "neuron", "gate_up", "expert"
Axes = tuple[Optional[str], ...]  # the kind of each axis of a tensor, None = kept whole


class PruneError(UserError, ValueError):
    """A pruning that cannot be done as asked: the message names the problem and the fix."""


@dataclass(frozen=True)
class Geometry:
    """The teacher's widths the slicing needs."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class LayerKeep:
    """What one student layer keeps of its teacher layer (teacher indices, sorted)."""

    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    neurons: Optional[tuple[int, ...]]  # None: the layer has no dense MLP (a mixture of experts)
    experts: Optional[tuple[int, ...]]  # None: the layer has no experts


@dataclass(frozen=True)
class Keep:
    """The kept units: `layers[i]` is the teacher layer of student layer i, `per_layer[i]` what it keeps."""

    layers: tuple[int, ...]
    hidden: tuple[int, ...]
    per_layer: tuple[LayerKeep, ...]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 Conv1D: weight (in, out)


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _projection(module: nn.Module, out_kind: Optional[str], in_kind: Optional[str]) -> dict[str, Axes]:
    """Axes of a linear map's parameters (nn.Linear: weight (out, in); Conv1D: weight (in, out); bias (out,))."""
    axes: dict[str, Axes] = {}
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise PruneError(f"{type(module).__name__} is not a linear projection (no 2-d weight); the pruner cannot slice it")
    axes["weight"] = (in_kind, out_kind) if _is_conv1d(module) else (out_kind, in_kind)
    if getattr(module, "bias", None) is not None:
        axes["bias"] = (out_kind,)
    return axes


def _norm(module: nn.Module, width: int, kind: str) -> dict[str, Axes]:
    return {name: (kind,) for name, p in module.named_parameters(recurse=False) if p.dim() == 1 and p.shape[0] == width}


def _prefixed(prefix: str, axes: dict[str, Axes]) -> dict[str, Axes]:
    return {f"{prefix}.{name}": kinds for name, kinds in axes.items()}


def _head_norm(block: nn.Module, name: Optional[str], geo: Geometry, kind: str) -> dict[str, Axes]:
    """A q/k norm: over one head (Qwen3: untouched) or over all heads' rows (OLMo-2: sliced by head rows)."""
    if name is None:
        return {}
    module = submodule(block, name)
    heads = geo.heads if kind == Q else geo.kv_heads
    return _prefixed(name, _norm(module, heads * geo.head_dim, kind))


def _experts(block: nn.Module, layout: BlockLayout, geo: Geometry) -> dict[str, Axes]:
    """Stacked expert weights (E, ...): the first axis is the expert; the hidden axis is the one of the teacher's width in
    the standard place (gate_up (E, 2I, H), down (E, H, I)), else the other one of that width."""
    experts = submodule(block, layout.experts)
    if isinstance(experts, nn.ModuleList):
        raise PruneError(
            f"decoder block {layout.block}: its experts are a list of modules, not stacked weights; the pruner slices the stacked "
            f"experts transformers 5 builds (gate_up_proj (E, 2I, H), down_proj (E, H, I)) only"
        )
    axes: dict[str, Axes] = {}
    for name, p in experts.named_parameters():
        kinds: list[Optional[str]] = [EXPERT] + [None] * (p.dim() - 1)
        down = "down" in name
        preferred = (1, 2) if down else (2, 1)
        for dim in preferred:
            if dim < p.dim() and p.shape[dim] == geo.hidden and (p.dim() == 3 or down):
                kinds[dim] = HIDDEN
                break
        axes[f"{layout.experts}.{name}"] = tuple(kinds)
    return axes


def _moe_rest(block: nn.Module, layout: BlockLayout, geo: Geometry) -> dict[str, Axes]:
    """The router (rows = experts), the shared expert (its input and output on the stream) and any other linear map of the
    MoE block reading the stream (Qwen2-MoE's shared_expert_gate)."""
    axes: dict[str, Axes] = {}
    if layout.router is not None:
        router = submodule(block, layout.router)
        for name, p in router.named_parameters():
            if p.dim() == 2:
                axes[f"{layout.router}.{name}"] = (EXPERT, HIDDEN)
            elif p.dim() == 1:
                axes[f"{layout.router}.{name}"] = (EXPERT,)
    if layout.shared_expert is not None:
        shared = submodule(block, layout.shared_expert)
        for name, module in shared.named_modules():
            if isinstance(module, nn.Linear) or _is_conv1d(module):
                out_kind, in_kind = (HIDDEN, None) if "down" in name else (None, HIDDEN)
                axes.update(_prefixed(f"{layout.shared_expert}.{name}", _projection(module, out_kind, in_kind)))
    mlp = submodule(block, layout.mlp)
    taken = {layout.experts, layout.router, layout.shared_expert}
    for name, module in mlp.named_children():
        full = f"{layout.mlp}.{name}"
        if full not in taken and isinstance(module, nn.Linear) and module.in_features == geo.hidden:
            axes.update(_prefixed(full, _projection(module, None, HIDDEN)))
    return axes


def layer_axes(block: nn.Module, layout: BlockLayout, geo: Geometry) -> dict[str, Axes]:
    """Axes of every parameter of one block that its layout claims, by name relative to the block."""
    axes: dict[str, Axes] = {}

    def part(name: Optional[str], out_kind: Optional[str], in_kind: Optional[str]) -> None:
        if name is not None:
            axes.update(_prefixed(name, _projection(submodule(block, name), out_kind, in_kind)))

    if layout.qkv is not None:
        part(layout.qkv, QKV, HIDDEN)
    else:
        part(layout.q, Q, HIDDEN)
        part(layout.k, KV, HIDDEN)
        part(layout.v, KV, HIDDEN)
    part(layout.o, HIDDEN, Q)
    axes.update(_head_norm(block, layout.q_norm, geo, Q))
    axes.update(_head_norm(block, layout.k_norm, geo, KV))
    if layout.moe:
        axes.update(_experts(block, layout, geo))
        axes.update(_moe_rest(block, layout, geo))
    else:
        part(layout.gate, NEURON, HIDDEN)
        part(layout.up, NEURON, HIDDEN)
        part(layout.gate_up, GATE_UP, HIDDEN)
        part(layout.down, HIDDEN, NEURON)
    for name in layout.norms:
        axes.update(_prefixed(name, _norm(submodule(block, name), geo.hidden, HIDDEN)))
    return axes


def layouts(model: nn.Module, family: Family) -> list[BlockLayout]:
    """The block layout of every layer of `model`; a one-line PruneError for a block the pruner cannot read."""
    try:
        found = [family_block_layout(family, block) for block in family.layer_list(model)]
        for layout in found:
            layout.qkv_names()  # attention the pruner can cut by heads: q/k/v projections (or a fused one) by their standard names
            if layout.moe and layout.router is None:
                raise FamilyError(
                    f"decoder block {layout.block}: its mixture of experts has no router (gate / router) by the standard names"
                )
        return found
    except FamilyError as exc:
        raise PruneError(f"cannot prune a {model.config.model_type} model: {exc}") from None


def tensor_axes(model: nn.Module, family: Family, geo: Geometry) -> dict[str, Axes]:
    """The axes of every tensor of `model` the family and the block layouts claim, by state-dict key; outside the layers:
    embeddings (their width), the vocabulary projection (its input), norms and linear maps of hidden width (an MLM head's
    transform) on the stream."""
    prefix = family.layer_prefix(model)
    axes: dict[str, Axes] = {}
    for i, (block, layout) in enumerate(zip(family.layer_list(model), layouts(model, family))):
        axes.update(_prefixed(f"{prefix}{i}", layer_axes(block, layout, geo)))
    head = family.vocab_projection(model)
    head_name = module_name(model, head)
    for name, module in model.named_modules():
        if name == "" or (name + ".").startswith(prefix):
            continue  # the model itself, the layer list and what is in it
        if module is head:
            axes.update(_prefixed(head_name, _projection(module, None, HIDDEN)))
        elif isinstance(module, nn.Embedding):
            axes[f"{name}.weight"] = (None, HIDDEN)
        elif is_norm(module):
            axes.update(_prefixed(name, _norm(module, geo.hidden, HIDDEN)))
        elif isinstance(module, nn.Linear):
            kinds = (HIDDEN if module.out_features == geo.hidden else None, HIDDEN if module.in_features == geo.hidden else None)
            if any(kinds):
                axes.update(_prefixed(name, _projection(module, *kinds)))
    return axes


def _rows(heads: tuple[int, ...], head_dim: int) -> torch.Tensor:
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def axis_index(kind: str, size: int, keep: Keep, layer: Optional[LayerKeep], geo: Geometry) -> torch.Tensor:
    """The teacher indices an axis of `kind` (teacher length `size`) keeps, in the student's order."""
    if kind == HIDDEN:
        return torch.tensor(keep.hidden, dtype=torch.long)
    if layer is None:
        raise PruneError(f"a {kind} axis outside the layers; the pruner cannot slice it")
    if kind == Q:
        return _rows(layer.heads, geo.head_dim)
    if kind == KV:
        return _rows(layer.kv_heads, geo.head_dim)
    if kind == QKV:
        q, kv = geo.heads * geo.head_dim, geo.kv_heads * geo.head_dim
        if size != q + 2 * kv:
            raise PruneError(f"a fused q/k/v projection of {size} rows, not {q} + 2 x {kv}; the pruner cannot slice it")
        rows_kv = _rows(layer.kv_heads, geo.head_dim)
        return torch.cat([_rows(layer.heads, geo.head_dim), q + rows_kv, q + kv + rows_kv])
    if kind in (NEURON, GATE_UP):
        if layer.neurons is None:
            raise PruneError("MLP neurons asked of a layer without a dense MLP")
        neurons = torch.tensor(layer.neurons, dtype=torch.long)
        return neurons if kind == NEURON else torch.cat([neurons, size // 2 + neurons])
    if kind == EXPERT:
        if layer.experts is None:
            raise PruneError("experts asked of a layer without experts")
        return torch.tensor(layer.experts, dtype=torch.long)
    raise PruneError(f"unknown axis kind {kind!r}")


def slice_tensor(tensor: torch.Tensor, kinds: Axes, keep: Keep, layer: Optional[LayerKeep], geo: Geometry) -> torch.Tensor:
    out = tensor
    for dim, kind in enumerate(kinds):
        if kind is not None:
            out = out.index_select(dim, axis_index(kind, tensor.shape[dim], keep, layer, geo).to(out.device))
    return out


def _teacher_key(key: str, prefix: str, keep: Keep) -> tuple[str, Optional[int]]:
    """(teacher key, student layer index or None) of a student state-dict key."""
    if not key.startswith(prefix):
        return key, None
    index, rest = key[len(prefix) :].split(".", 1)
    student_layer = int(index)
    return f"{prefix}{keep.layers[student_layer]}.{rest}", student_layer


def _inferred(key: str, source: torch.Tensor, target: torch.Size, keep: Keep, geo: Geometry) -> Axes:
    """Axes of a tensor no part claims: it may only lose hidden channels (teacher width -> student width, unambiguous)."""
    kinds: list[Optional[str]] = []
    for t_size, s_size in zip(source.shape, target):
        if t_size == s_size:
            kinds.append(None)
        elif t_size == geo.hidden and s_size == len(keep.hidden):
            kinds.append(HIDDEN)
        else:
            raise PruneError(
                f"tensor {key} ({tuple(source.shape)} in the teacher, {tuple(target)} in the student) belongs to no part the pruner knows; "
                f"keep the teacher's widths (prune depth only) or name the part in the family's block_parts (distill/models/families.py)"
            )
    return tuple(kinds)


@torch.no_grad()
def slice_state(teacher: nn.Module, student: nn.Module, family: Family, keep: Keep, geo: Geometry) -> dict[str, str]:
    """Fill every tensor of `student` (built from the pruned config) with the teacher's, sliced; returns student key -> how
    it was made (the teacher key and the kinds of its sliced axes) for the record. A one-line PruneError when a tensor does
    not come out with the student's shape."""
    axes = tensor_axes(teacher, family, geo)
    prefix = family.layer_prefix(teacher)
    if family.layer_prefix(student) != prefix:
        raise PruneError(
            f"the student's layers are not where the teacher's are ({prefix}); the pruned config is not of the teacher's family"
        )
    t_state = teacher.state_dict()
    made = {}
    for key, target in student.state_dict(keep_vars=True).items():
        t_key, s_layer = _teacher_key(key, prefix, keep)
        if t_key not in t_state:
            continue  # a buffer the student makes itself
        source = t_state[t_key]
        layer = keep.per_layer[s_layer] if s_layer is not None else None
        kinds = axes.get(t_key) or _inferred(key, source, target.shape, keep, geo)
        if len(kinds) != source.dim():
            raise PruneError(f"tensor {t_key} has {source.dim()} axes, its part says {len(kinds)}; the pruner cannot slice it")
        sliced = slice_tensor(source, kinds, keep, layer, geo)
        if sliced.shape != target.shape:
            raise PruneError(
                f"tensor {key}: sliced to {tuple(sliced.shape)} from the teacher's {t_key} {tuple(source.shape)}, but the student built "
                f"from the pruned config has {tuple(target.shape)}; a {teacher.config.model_type} model cannot take this shape "
                f"(e.g. its head width is hidden_size / num_heads: keep hidden_size = num_heads x {geo.head_dim})"
            )
        target.data.copy_(sliced.to(target.dtype))
        made[key] = t_key + ("" if not any(kinds) else f" [{', '.join(k or ':' for k in kinds)}]")
    return made


def sliced_numel(shape: tuple[int, ...], kinds: Optional[Axes], sizes: dict[str, int], hidden: int) -> int:
    """Elements of a tensor of teacher `shape` after slicing to `sizes` (kind -> the student's length of such an axis; gate_up
    is twice the neurons), without slicing it; a tensor no part claims (`kinds` None) loses hidden channels only."""
    total = 1
    for dim, size in enumerate(shape):
        kind = kinds[dim] if kinds is not None else (HIDDEN if size == hidden else None)
        if kind is None:
            total *= size
        elif kind == GATE_UP:
            total *= 2 * sizes[NEURON]
        else:
            total *= sizes[kind]
    return total
