"""The student's shape: asked for directly, or chosen for a parameter budget; then which units of the teacher it keeps.

A shape is (num_layers, hidden_size, num_heads, num_kv_heads, intermediate_size, num_experts). Rules of an asked shape
(each broken rule is a one-line PruneError naming it):

- every width at most the teacher's and at least 1; heads are removed whole (head_dim and rotary dims are the teacher's);
- grouped-query attention: key/value groups are kept whole with their query heads, so num_heads = num_kv_heads x the
  teacher's heads per group (give either one); multi-head attention: num_kv_heads = num_heads;
- families whose head width is hidden_size / num_heads (BERT, RoBERTa, DistilBERT, GPT-2: their configs have no
  head_dim): hidden_size = num_heads x head_dim (give either one);
- a mixture of experts keeps at least num_experts_per_tok experts (experts are removed whole, by router usage; the
  neurons inside each expert and a shared expert are kept).

A budget (`params`: a fraction of the teacher's parameters, embeddings included, tied ones once) is met by these rules:
every width (hidden channels, MLP neurons, key/value groups with their heads) is scaled by one factor f, rounded to a
whole group and to a multiple of `width_multiple` (64, or the largest power of two dividing a smaller teacher width
at most an eighth of it); depth is cut last: layers (the least important first) are removed only when the budget
cannot be met with f >= `min_width`. The chosen shape is the largest one under the budget; it must be within
`tolerance` of it. Keys given beside the budget are held fixed. Parameters are counted from the teacher's own tensors
and the kinds of their axes (distill/prune/slice.py), exactly as the slicing will cut them.

`choose_keep` then picks the units by importance (distill/prune/importance.py): the most important layers, hidden
channels, key/value groups (heads for multi-head attention), MLP neurons and experts, each kept in the teacher's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from distill.models.families import Family
from distill.prune.slice import (
    EXPERT,
    HIDDEN,
    KV,
    NEURON,
    QKV,
    Geometry,
    Keep,
    LayerKeep,
    PruneError,
    Q,
    layouts,
    sliced_numel,
    tensor_axes,
)

SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "num_experts")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")  # where a config keeps its number of experts


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: Optional[int]  # the dense MLPs' width; None: no dense MLP
    num_experts: Optional[int]  # None: no mixture of experts

    def text(self) -> str:
        parts = [f"{self.num_layers} layers", f"hidden {self.hidden_size}", f"{self.num_heads} heads"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"{self.num_kv_heads} kv heads")
        if self.intermediate_size:
            parts.append(f"MLP {self.intermediate_size}")
        if self.num_experts:
            parts.append(f"{self.num_experts} experts")
        return ", ".join(parts)


@dataclass(frozen=True)
class Teacher:
    """What the shape rules need of the teacher."""

    shape: Shape
    geometry: Geometry
    coupled: bool  # head width = hidden_size / num_heads (no head_dim in the config)
    experts_per_token: Optional[int]
    model_type: str


def experts_key(config) -> Optional[str]:
    for key in EXPERT_KEYS:
        if isinstance(getattr(config, key, None), int) and getattr(config, key) > 0:
            return key
    return None


def describe_teacher(model: nn.Module, family: Family) -> Teacher:
    """The teacher's shape and geometry, from its config and its blocks."""
    config = model.config
    s = family.shape(config)
    heads, kv = s["num_heads"], s["num_kv_heads"] or s["num_heads"]
    head_dim = s.get("head_dim") or s["hidden_size"] // heads
    key = experts_key(config)
    dense = [lay for lay in layouts(model, family) if not lay.moe]
    geometry = Geometry(hidden=s["hidden_size"], heads=heads, kv_heads=kv, head_dim=head_dim, layers=s["num_layers"])
    shape = Shape(
        num_layers=s["num_layers"],
        hidden_size=s["hidden_size"],
        num_heads=heads,
        num_kv_heads=kv,
        intermediate_size=s.get("intermediate_size") if dense else None,
        num_experts=getattr(config, key) if key else None,
    )
    return Teacher(shape, geometry, not family.generic, getattr(config, "num_experts_per_tok", None) if key else None, config.model_type)


def resolve_shape(teacher: Teacher, asked: dict) -> Shape:
    """The student shape of the asked keys (None = the teacher's, or derived as the module docstring says); a one-line
    PruneError for a shape the teacher's heads, groups or experts cannot make."""
    t, geo = teacher.shape, teacher.geometry
    given = {k: v for k, v in asked.items() if v is not None}
    for key, value in given.items():
        limit = getattr(t, key)
        if limit is None and key == "intermediate_size":
            raise PruneError(
                f"intermediate_size={value}: the {teacher.model_type} teacher has no dense MLP (its MLPs are experts, removed whole by "
                f"router usage: give num_experts); drop intermediate_size"
            )
        if limit is None:
            raise PruneError(f"num_experts={value}: the {teacher.model_type} teacher has no mixture of experts; drop num_experts")
        if not 1 <= value <= limit:
            raise PruneError(
                f"{key}={value} is outside 1..{limit} (the teacher's); a pruned student is at most as wide and deep as its teacher"
            )
    heads, kv, hidden = given.get("num_heads"), given.get("num_kv_heads"), given.get("hidden_size")
    if geo.group > 1:
        if kv is not None and heads is not None and heads != kv * geo.group:
            raise PruneError(
                f"num_heads={heads} with num_kv_heads={kv}: the teacher has {geo.group} query heads per key/value group and groups are "
                f"kept whole, so num_heads must be num_kv_heads x {geo.group} = {kv * geo.group} (give one of them)"
            )
        if heads is not None and kv is None:
            if heads % geo.group:
                raise PruneError(
                    f"num_heads={heads} is not a whole number of the teacher's key/value groups ({geo.group} query heads each, kept "
                    f"whole): use a multiple of {geo.group} (or give num_kv_heads)"
                )
            kv = heads // geo.group
        heads = kv * geo.group if kv is not None else t.num_heads
        kv = kv if kv is not None else t.num_kv_heads
    else:
        if kv is not None and heads is not None and kv != heads:
            raise PruneError(
                f"num_kv_heads={kv} with num_heads={heads}: the teacher has one key/value head per query head (multi-head attention), "
                f"so the student does too; give num_heads only"
            )
        heads = heads or kv
    if teacher.coupled:
        if hidden is not None and heads is not None and hidden != heads * geo.head_dim:
            raise PruneError(
                f"hidden_size={hidden} with num_heads={heads}: a {teacher.model_type} head is hidden_size / num_heads wide and the pruner "
                f"keeps whole heads of {geo.head_dim}, so hidden_size must be num_heads x {geo.head_dim} = {heads * geo.head_dim} "
                f"(give one of them)"
            )
        if hidden is not None and heads is None:
            if hidden % geo.head_dim:
                raise PruneError(
                    f"hidden_size={hidden}: a {teacher.model_type} head is hidden_size / num_heads wide and the pruner keeps whole heads "
                    f"of {geo.head_dim}, so hidden_size must be a multiple of {geo.head_dim}"
                )
            heads = hidden // geo.head_dim
        if heads is not None and hidden is None:
            hidden = heads * geo.head_dim
    heads = heads or t.num_heads
    kv = kv or (heads if geo.group == 1 else t.num_kv_heads)
    experts = given.get("num_experts", t.num_experts)
    if experts is not None and teacher.experts_per_token and experts < teacher.experts_per_token:
        raise PruneError(
            f"num_experts={experts} is fewer than the {teacher.experts_per_token} experts the router picks per token "
            f"(num_experts_per_tok); keep at least {teacher.experts_per_token}"
        )
    return Shape(
        num_layers=given.get("num_layers", t.num_layers),
        hidden_size=hidden or t.hidden_size,
        num_heads=heads,
        num_kv_heads=kv,
        intermediate_size=given.get("intermediate_size", t.intermediate_size),
        num_experts=experts,
    )


# ------------------------------------------------------------------------------------------------
# Counting parameters of a shape, and the budget


class ParameterCount:
    """Parameters of any student shape, from the teacher's tensors and their axes (tied tensors once)."""

    def __init__(self, model: nn.Module, family: Family, geometry: Geometry):
        axes = tensor_axes(model, family, geometry)
        prefix = family.layer_prefix(model)
        self.geometry = geometry
        self.outer: list[tuple[tuple[int, ...], Optional[tuple]]] = []
        self.per_layer: list[list[tuple[tuple[int, ...], Optional[tuple]]]] = [[] for _ in range(geometry.layers)]
        for name, p in model.named_parameters():  # tied parameters appear once
            entry = (tuple(p.shape), axes.get(name))
            if name.startswith(prefix):
                self.per_layer[int(name[len(prefix) :].split(".", 1)[0])].append(entry)
            else:
                self.outer.append(entry)
        self.teacher = sum(math.prod(s) for s, _ in self.outer) + sum(math.prod(s) for layer in self.per_layer for s, _ in layer)

    def sizes(self, shape: Shape) -> dict[str, int]:
        hd = self.geometry.head_dim
        return {
            HIDDEN: shape.hidden_size,
            Q: shape.num_heads * hd,
            KV: shape.num_kv_heads * hd,
            QKV: (shape.num_heads + 2 * shape.num_kv_heads) * hd,
            NEURON: shape.intermediate_size or 0,
            EXPERT: shape.num_experts or 0,
        }

    def __call__(self, shape: Shape, layers: list[int]) -> int:
        sizes, hidden = self.sizes(shape), self.geometry.hidden
        total = sum(sliced_numel(s, kinds, sizes, hidden) for s, kinds in self.outer)
        return total + sum(sliced_numel(s, kinds, sizes, hidden) for i in layers for s, kinds in self.per_layer[i])


def effective_multiple(dim: int, multiple: int) -> int:
    """The rounding step of a width: the largest power of two <= `multiple` and <= dim / 8 that divides `dim` (at least 1)."""
    step = 1
    while step * 2 <= multiple and step * 2 <= max(1, dim // 8) and dim % (step * 2) == 0:
        step *= 2
    return step


def _round_to(value: float, step: int, limit: int) -> int:
    return int(min(limit, max(step, round(value / step) * step)))


def scaled(teacher: Teacher, factor: float, depth: int, fixed: dict, multiple: int) -> Shape:
    """Every width of the teacher scaled by `factor` (rounded as the module docstring says), `depth` layers; `fixed` keys kept."""
    t, geo = teacher.shape, teacher.geometry
    values = {}
    if geo.group > 1:
        values["num_kv_heads"] = max(1, min(t.num_kv_heads, round(factor * t.num_kv_heads)))
    else:
        values["num_heads"] = max(1, min(t.num_heads, round(factor * t.num_heads)))
    if not teacher.coupled:
        values["hidden_size"] = _round_to(factor * t.hidden_size, effective_multiple(t.hidden_size, multiple), t.hidden_size)
    if t.intermediate_size:
        step = effective_multiple(t.intermediate_size, multiple)
        values["intermediate_size"] = _round_to(factor * t.intermediate_size, step, t.intermediate_size)
    values["num_layers"] = depth
    asked = {**values, **fixed}
    if teacher.coupled and "hidden_size" in fixed:
        asked.pop("num_heads", None)
    if geo.group > 1 and ("num_heads" in fixed or "num_kv_heads" in fixed):
        asked.pop("num_kv_heads" if "num_heads" in fixed else "num_heads", None)
    return resolve_shape(teacher, asked)


def budget_shape(
    teacher: Teacher,
    count: Callable[[Shape, list[int]], int],
    layers_for: Callable[[int], list[int]],
    fraction: float,
    fixed: dict,
    multiple: int = 64,
    min_width: float = 0.5,
    tolerance: float = 0.05,
) -> tuple[Shape, int]:
    """The shape for a budget of `fraction` x the teacher's parameters (rules in the module docstring) and its parameter count;
    a one-line PruneError when it is below the smallest student or no divisible shape comes within `tolerance` of it."""
    t = teacher.shape
    whole = count(t, list(range(t.num_layers)))
    budget = fraction * whole
    depths = [fixed["num_layers"]] if "num_layers" in fixed else list(range(t.num_layers, 0, -1))
    factors = [i / 256 for i in range(256, 0, -1)]
    chosen = fallback = above = None  # above: the nearest shape over the budget, for the message
    for depth in depths:
        layers = layers_for(depth)
        for factor in factors:
            shape = scaled(teacher, factor, depth, fixed, multiple)
            params = count(shape, layers)
            if params <= budget:
                if factor >= min_width and chosen is None:
                    chosen = (shape, params)
                if fallback is None or params > fallback[1]:
                    fallback = (shape, params)
                break
            if above is None or params < above[1]:
                above = (shape, params)
        if chosen is not None:
            break
    result = chosen or fallback
    if result is None:
        smallest = scaled(teacher, 0.0, depths[-1], fixed, multiple)
        raise PruneError(
            f"params={fraction:g} x {whole:,} = {budget:,.0f} parameters is below the smallest student this teacher makes "
            f"({smallest.text()}: {count(smallest, layers_for(smallest.num_layers)):,}, embeddings included); ask for a larger budget"
        )
    if result[1] < (1 - tolerance) * budget:
        over = f"; the next above has {above[1]:,} ({above[0].text()})" if above else ""
        raise PruneError(
            f"no shape the teacher's heads and widths divide into comes within {tolerance:.0%} of params={fraction:g} "
            f"({budget:,.0f} parameters): the nearest below has {result[1]:,} ({result[0].text()}){over}; give the shape instead, "
            f"or raise params_tolerance"
        )
    return result


# ------------------------------------------------------------------------------------------------
# Which units a shape keeps


def _top(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    """The k highest-scoring indices (ties: the lower index first), in increasing order."""
    order = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return tuple(sorted(int(i) for i in order))


def choose_layers(scores: dict[str, torch.Tensor], depth: int, metric: str) -> list[int]:
    """The `depth` most important teacher layers (by `metric`: "cosine" = 1 - cos(block input, output), "drop_kl" = the
    divergence from the teacher when the block is skipped), in the teacher's order."""
    name = "layers" if metric == "cosine" else "layer_drop_kl"
    if name not in scores:
        raise PruneError(f"layer_metric={metric}: the scores hold no {name} (compute them with layer_metric={metric})")
    return list(_top(scores[name], depth))


def choose_keep(scores: dict[str, torch.Tensor], teacher: Teacher, shape: Shape, layers: list[int]) -> Keep:
    """The units `shape` keeps of the teacher, the most important ones (see the module docstring)."""
    geo = teacher.geometry
    hidden = _top(scores["hidden"], shape.hidden_size)
    per_layer = []
    for layer in layers:
        if geo.group > 1 or shape.num_kv_heads != shape.num_heads:
            groups = _top(scores["kv_groups"][layer], shape.num_kv_heads)
            heads = tuple(g * geo.group + j for g in groups for j in range(geo.group))
        else:
            heads = _top(scores["heads"][layer], shape.num_heads)
            groups = heads
        neurons = experts = None
        if "neurons" in scores and not torch.isnan(scores["neurons"][layer]).all():
            neurons = _top(scores["neurons"][layer], shape.intermediate_size)
        if "experts" in scores and not torch.isnan(scores["experts"][layer]).all():
            experts = _top(scores["experts"][layer], shape.num_experts)
        per_layer.append(LayerKeep(heads=heads, kv_heads=groups, neurons=neurons, experts=experts))
    return Keep(layers=tuple(layers), hidden=hidden, per_layer=tuple(per_layer))
