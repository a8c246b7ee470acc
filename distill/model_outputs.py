"""What a model's forward returns to the losses, what a loss asks of it, and a model's shape.

Shared by models (which fill them), losses (which read them) and the objective (which decides them),
so none of those imports another for its types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ModelOutputs:
    """What a model produced for one micro batch (the optional parts only when a loss needs them)."""

    hidden: torch.Tensor  # (B, L, H) last hidden states
    logits: Optional[torch.Tensor] = None  # (P, V) at `Batch.logit_positions`, or None
    hidden_states: Optional[tuple] = None  # (embedding output, output of layer 0, ..., layer n-1), each (B, L, H)
    projected: Optional[tuple] = None  # student only: `hidden_states` through the trainable projections (teacher width)
    attention: Optional[dict] = None  # layer -> (queries, keys, values), each (B, heads, L, head_dim)
    causal: bool = False  # attention is causal (GPT-2): key j is visible to query i only for j <= i
    # chunked logit losses (loss.chunked_logits): the input of the vocabulary projection at `Batch.logit_positions`, (P, H),
    # instead of `logits`; `head` is the teacher's projection, or the student's ChunkedLogitLoss (which owns its projection)
    head_input: Optional[torch.Tensor] = None
    head: Optional[object] = None


@dataclass(frozen=True)
class Needs:
    """What a loss reads from one model's forward beyond last hidden states and logits."""

    hidden_states: bool = False  # embedding output and every layer's output
    projected: bool = False  # student: hidden states through the trainable projections W_e / W_h
    attention_layers: tuple = ()  # layers (0-based) whose queries / keys / values are captured

    def union(self, other: "Needs") -> "Needs":
        return Needs(
            self.hidden_states or other.hidden_states,
            self.projected or other.projected,
            tuple(sorted(set(self.attention_layers) | set(other.attention_layers))),
        )


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_heads: int
    num_layers: int
    rotary: bool = False  # attention scores use rotary positions (Llama-like): captured q/k do not carry them
