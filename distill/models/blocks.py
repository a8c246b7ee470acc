"""Where one decoder block keeps its parts, found by the standard Hugging Face module names: the generic description of a
decoder layer that every causal LM transformers ships fits without a registry entry.

`block_layout(block)` finds, inside one decoder layer, its attention module and the projections in it (q, k, v and o,
or a fused qkv as Phi-3's `qkv_proj`), the q/k norms some families add (Qwen3, OLMo-2, Gemma 3), its MLP (gate, up and
down projections, a fused `gate_up_proj`, or GPT-2's `c_fc`/`c_proj`) or its mixture of experts (the experts, the
router, a shared expert), and the block's norms. Every name is relative to the block: a caller reads a module
(`layout.module(block, "q")`) or builds state-dict keys (`f"{layer_prefix}{i}.{layout.q}.weight"`). A part that is
required but absent raises a one-line FamilyError naming the block's class, the part and the names looked for.

Used by the attention captures (q/k/v) today; importance pruning (attention heads with their GQA groups, MLP
neurons, experts, norms) builds on the same layout. A family whose blocks use other names gets them in its
`families.py` entry, not in a second registry here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

from torch import nn

from distill.models.families import FamilyError, submodule

ATTENTION = ("self_attn", "attn", "attention", "self_attention")
Q, K, V = ("q_proj", "query", "q_lin"), ("k_proj", "key", "k_lin"), ("v_proj", "value", "v_lin")
FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv")
OUT = ("o_proj", "out_proj", "dense", "c_proj", "out_lin")
Q_NORM, K_NORM = ("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")
MLP = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe")
GATE, UP, DOWN = ("gate_proj", "w1"), ("up_proj", "w3", "c_fc", "fc1", "lin1"), ("down_proj", "w2", "c_proj", "fc2", "lin2")
FUSED_GATE_UP = ("gate_up_proj",)
EXPERTS, ROUTER, SHARED_EXPERT = ("experts",), ("gate", "router"), ("shared_expert", "shared_experts", "shared_mlp")
LOOKED_FOR = {
    "attention": ATTENTION,
    "q": Q,
    "k": K,
    "v": V,
    "qkv": FUSED_QKV,
    "o": OUT,
    "mlp": MLP,
    "gate": GATE,
    "up": UP,
    "down": DOWN,
    "gate_up": FUSED_GATE_UP,
    "experts": EXPERTS,
    "router": ROUTER,
}


@dataclass(frozen=True)
class BlockLayout:
    """Dotted names of one decoder block's parts, relative to the block; None where the block has no such part."""

    block: str  # the block's class name (for messages)
    attention: str
    q: Optional[str]
    k: Optional[str]
    v: Optional[str]
    qkv: Optional[str]  # a fused q/k/v projection (then q, k, v are None)
    o: Optional[str]
    q_norm: Optional[str]
    k_norm: Optional[str]
    mlp: str
    gate: Optional[str]  # dense MLP: gate, up, down (gate None for an ungated MLP; gate_up for a fused gate and up)
    up: Optional[str]
    down: Optional[str]
    gate_up: Optional[str]
    experts: Optional[str]  # mixture of experts: the experts (a module list, or one module with stacked (E, ...) weights)
    router: Optional[str]  # the router's linear (num_experts x hidden)
    shared_expert: Optional[str]
    norms: tuple[str, ...]  # the block's own norms, in module order (input, post-attention, pre/post feed-forward ...)

    @property
    def moe(self) -> bool:
        return self.experts is not None

    def qkv_names(self) -> tuple[str, ...]:
        """(q, k, v), or (qkv,) for a fused projection; a FamilyError when the attention has neither (e.g. latent attention)."""
        if self.qkv is not None:
            return (self.qkv,)
        if self.q and self.k and self.v:
            return (self.q, self.k, self.v)
        raise FamilyError(
            f"decoder block {self.block}: its attention ({self.attention}) has no q/k/v projections by the standard names "
            f"({'/'.join(Q + K + V)}, or a fused {'/'.join(FUSED_QKV)}); name them in a families.py entry"
        )

    def module(self, block: nn.Module, part: str) -> nn.Module:
        """The submodule `part` (a field name: "q", "o", "router", ...) of `block`; a FamilyError when the block has none."""
        name = getattr(self, part)
        if name is None:
            looked = "/".join(LOOKED_FOR.get(part, (part,)))
            raise FamilyError(f"decoder block {self.block} has no {part} projection (looked for {looked}); name it in a families.py entry")
        return submodule(block, name)


def _child(module: nn.Module, names: tuple[str, ...]) -> Optional[str]:
    for name in names:
        if isinstance(getattr(module, name, None), nn.Module):
            return name
    return None


def _joined(prefix: str, name: Optional[str]) -> Optional[str]:
    return f"{prefix}.{name}" if name is not None else None


def _is_norm(name: str, module: nn.Module) -> bool:
    kind = type(module).__name__.lower()
    return "norm" in kind or "norm" in name.lower() or name.startswith("ln_")


def block_layout(block: nn.Module, names: Optional[Mapping[str, Any]] = None) -> BlockLayout:
    """The parts of decoder block `block` by the standard names (see the module docstring); a one-line FamilyError when it
    has no attention module, no output projection in it, or no MLP / mixture of experts. `names`: a family's own part
    names (its `Family.block_parts`, e.g. BERT's nested attention.self.query), taken as they are instead."""
    kind = type(block).__name__
    if names is not None:
        given = {f.name: None for f in fields(BlockLayout) if f.name != "block"}
        return BlockLayout(block=kind, **{**given, "norms": (), **names})
    attention = _child(block, ATTENTION)
    if attention is None:
        raise FamilyError(
            f"decoder block {kind} has no attention module (looked for {'/'.join(ATTENTION)}); name it in a families.py entry"
        )
    attn = getattr(block, attention)
    fused = _child(attn, FUSED_QKV)
    q, k, v = (None, None, None) if fused else (_child(attn, Q), _child(attn, K), _child(attn, V))
    out = _child(attn, OUT)
    if out is None:
        raise FamilyError(
            f"decoder block {kind}: its attention ({attention}) has no output projection (looked for {'/'.join(OUT)}); name it in a "
            f"families.py entry"
        )
    mlp_name = _child(block, MLP)
    if mlp_name is None:
        raise FamilyError(f"decoder block {kind} has no MLP (looked for {'/'.join(MLP)}); name it in a families.py entry")
    mlp = getattr(block, mlp_name)
    experts = _child(mlp, EXPERTS)
    dense = {"gate": None, "up": None, "down": None, "gate_up": None}
    router = shared = None
    if experts is not None:
        router, shared = _child(mlp, ROUTER), _child(mlp, SHARED_EXPERT)
    else:
        dense = {"gate": _child(mlp, GATE), "up": _child(mlp, UP), "down": _child(mlp, DOWN), "gate_up": _child(mlp, FUSED_GATE_UP)}
        if dense["down"] is None or (dense["up"] is None and dense["gate_up"] is None):
            raise FamilyError(
                f"decoder block {kind}: its MLP ({mlp_name}) has no up/down projections (looked for {'/'.join(UP + FUSED_GATE_UP)} and "
                f"{'/'.join(DOWN)}) and no experts; name them in a families.py entry"
            )
    norms = tuple(name for name, child in block.named_children() if _is_norm(name, child))
    return BlockLayout(
        block=kind,
        attention=attention,
        q=_joined(attention, q),
        k=_joined(attention, k),
        v=_joined(attention, v),
        qkv=_joined(attention, fused),
        o=_joined(attention, out),
        q_norm=_joined(attention, _child(attn, Q_NORM)),
        k_norm=_joined(attention, _child(attn, K_NORM)),
        mlp=mlp_name,
        **{part: _joined(mlp_name, name) for part, name in dense.items()},
        experts=_joined(mlp_name, experts),
        router=_joined(mlp_name, router),
        shared_expert=_joined(mlp_name, shared),
        norms=norms,
    )


def family_block_layout(family: Any, block: nn.Module) -> BlockLayout:
    """The layout of `block` of a model of `family` (a distill.models.families.Family): its `block_parts`, else by the standard names."""
    return block_layout(block, getattr(family, "block_parts", None))


def parts(layout: BlockLayout) -> dict[str, str]:
    """The layout's named parts (field -> dotted name), the ones present only."""
    return {f.name: getattr(layout, f.name) for f in fields(layout) if isinstance(getattr(layout, f.name), str) and f.name != "block"}
