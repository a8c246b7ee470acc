"""What a model's forward returns to the losses, what a loss asks of it, a model's shape, and where the documents of a
packed causal micro batch begin (what a causal model's forward takes beside the token ids).

Shared by models (which fill them), losses (which read them) and the objective (which decides them),
so none of those imports another for its types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

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


# attention implementations whose transformers mask builders read packed documents from `position_ids` (with no
# attention mask and no cache: transformers/masking_utils.py, find_packed_sequence_indices); any other (flash attention
# 2/3/4, hub kernels) gets the documents' offsets as the flash varlen kwargs instead
MASKS_FROM_POSITIONS = ("sdpa", "eager", "flex_attention")


class Documents(NamedTuple):
    """The documents of a packed causal micro batch (distill/data/documents.py builds it from the rows' document starts):
    with these a causal model's attention and positions never cross a document.

    Segments are the documents and each row's padding run, in the (B, L) batch flattened to B*L tokens. A named tuple,
    so that DeepSpeed's ZeRO-3 module hooks see the tensors inside when it is a forward argument."""

    position_ids: torch.Tensor  # (B, L) int64: each token's position within its segment (0 at a segment's first token)
    cu_seqlens: torch.Tensor  # (S + 1,) int32: where each of the S segments begins in the flattened batch, then B*L
    max_length: int  # the longest segment (flash attention's varlen kernel takes it as a host int)

    def to(self, device: torch.device) -> "Documents":
        return Documents(self.position_ids.to(device, non_blocking=True), self.cu_seqlens.to(device, non_blocking=True), self.max_length)

    def forward_kwargs(self, attn_implementation: Optional[str]) -> dict:
        """Keyword arguments of a transformers causal LM's base-model forward (with attention_mask=None): the position ids,
        no cache (transformers reads packed documents from the position ids only without one), and for attention kernels
        that build no mask (flash attention) the segments' offsets, as transformers' DataCollatorWithFlattening passes them.
        sdpa / eager then get a block-diagonal causal mask of (B, 1, L, L) from transformers, flash attention its varlen kernel.
        """
        kwargs = {"position_ids": self.position_ids, "use_cache": False}
        if attn_implementation not in MASKS_FROM_POSITIONS:
            kwargs.update(
                cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens, max_length_q=self.max_length, max_length_k=self.max_length
            )
        return kwargs

    def segment_ids(self) -> torch.Tensor:
        """(B, L): the number of the segment each token is in, counted along its row (equal ids = same document)."""
        return (self.position_ids == 0).cumsum(1)


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
