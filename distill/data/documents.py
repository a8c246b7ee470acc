"""Document-aware packing of causal data: where each row's documents begin, and what the models and labels make of it.

`distill-prep --packing causal` concatenates documents (each followed by EOS) and cuts the stream into rows, so most
rows hold several documents. With `data.document_attention` (the default) a document never sees another: every
causal model run over the data (the student, the teacher online or partitioned, distill-cache's teacher, distill-eval)
gets `position_ids` that restart at 0 at each document's first token and attention that stays inside the document.
This module is the one place that turns a micro batch's document starts into that (`document_layout`), for all of them:

- the boundaries are the `doc_start` flags distill-prep records (format 2); a format-1 dataset has none, and a
  document is then taken to begin after each EOS (the same boundaries, except where a document's own text encoded
  to the EOS id);
- a row that begins inside a document starts its positions at 0 there (the rest of that document is in another row);
- each row's padding is a segment of its own (its positions restart too), so a right-padded row needs no attention
  mask: a real token never attends to a later position;
- the models get `Documents` (distill/model_outputs.py: position ids, and the segments' offsets for flash attention),
  never a hand-made mask: transformers builds the block-diagonal causal mask for sdpa / eager from the position ids,
  sliding windows included, and flash attention runs its varlen kernel on the offsets;
- labels: the last token of a document (its EOS) predicts nothing, since the next document's first token cannot be
  predicted from a document that never sees it (Hugging Face's DataCollatorWithFlattening drops the same label).
  Soft-target losses at every token (loss.ce_positions=all) keep that position: the teacher's distribution after
  EOS, given the document, is still the teacher's. A teacher cache stores every position, so it is read as before.

With `data.document_attention=false` the rows are read as one sequence each, as before (no position ids, the labels
cross documents): the same batches bit for bit.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from distill.model_outputs import Documents


def document_starts(ids: np.ndarray, flags: Optional[np.ndarray], eos_id: Optional[int]) -> np.ndarray:
    """One row's document starts: its recorded `doc_start` flags, or (a format-1 dataset, `flags` None) True after each EOS."""
    if flags is not None:
        return np.asarray(flags, dtype=bool)
    if eos_id is None:
        raise ValueError("these causal rows carry no document starts and no EOS id was given to find them")
    starts = np.zeros(len(ids), dtype=bool)
    starts[1:] = np.asarray(ids[:-1]) == eos_id
    return starts


def document_layout(starts: Sequence[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(position_ids (B, width) int64, cu_seqlens (S + 1,) int32, longest segment) of a right-padded micro batch whose row b
    holds len(starts[b]) tokens with documents beginning where starts[b] is True.

    Segments: each row's documents (the first begins at the row's first token, flagged or not) and its padding run."""
    rows = len(starts)
    begins = np.zeros((rows, width + 1), dtype=bool)
    for b, row in enumerate(starts):
        begins[b, : len(row)] = row
        begins[b, len(row)] = True  # the padding run (or, past the row, nothing: column `width` is dropped)
    begins = begins[:, :width]
    begins[:, 0] = True
    flat = begins.reshape(-1)
    index = np.arange(flat.size, dtype=np.int64)
    position_ids = index - np.maximum.accumulate(np.where(flat, index, 0))
    cu_seqlens = np.append(np.flatnonzero(flat), flat.size).astype(np.int32)
    return position_ids.reshape(rows, width), cu_seqlens, int(np.diff(cu_seqlens).max(initial=0))


def batch_documents(collated: dict, device: torch.device) -> Optional[Documents]:
    """The `Documents` of a micro batch the causal collator made, on `device`; None when it keeps no documents apart."""
    if "position_ids" not in collated:
        return None
    return Documents(collated["position_ids"], collated["cu_seqlens"], int(collated["max_document"])).to(device)


def drop_cross_document_labels(labels: np.ndarray, starts: np.ndarray) -> None:
    """In place: no label at a document's last token (labels[i] is token i + 1; none where token i + 1 begins a document)."""
    labels[: len(starts) - 1][starts[1:]] = -100  # IGNORE_INDEX
