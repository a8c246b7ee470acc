"""Packing token runs into training sequences (pure functions, no Beam).

Mode `document`: each document's tokens are cut into consecutive windows of at most
`max_seq_len - 2` tokens, each wrapped as `[CLS] window [SEP]`; sequences never cross documents.
Sequences shorter than `min_seq_len` (specials included) are dropped as `too_short`; sequences whose
content is more than `max_unk_fraction` unknown tokens are dropped as `mostly_unknown`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Packed:
    sequences: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (ids, word_start) with specials
    dropped: dict[str, list[int]] = field(default_factory=dict)  # reason -> [sequences, content tokens]

    def drop(self, reason: str, tokens: int) -> None:
        entry = self.dropped.setdefault(reason, [0, 0])
        entry[0] += 1
        entry[1] += tokens


def pack_document(ids: np.ndarray, word_start: np.ndarray, cls_id: int, sep_id: int, unk_id: int | None,
                  max_seq_len: int, min_seq_len: int, max_unk_fraction: float) -> Packed:
    """Windows of one document as [CLS] ... [SEP] sequences, with drops counted."""
    if max_seq_len < 3:
        raise ValueError("max_seq_len must be at least 3 ([CLS] token [SEP])")
    out = Packed()
    width = max_seq_len - 2
    for start in range(0, len(ids), width):
        window = ids[start : start + width]
        starts = word_start[start : start + width]
        if len(window) + 2 < min_seq_len:
            out.drop("too_short", len(window))
            continue
        if unk_id is not None and np.count_nonzero(window == unk_id) > max_unk_fraction * len(window):
            out.drop("mostly_unknown", len(window))
            continue
        seq = np.concatenate(([cls_id], window, [sep_id]))
        flags = np.concatenate(([True], starts, [True]))
        out.sequences.append((seq, flags))
    return out


def split_of(text: str, validation_fraction: float, seed: int = 0) -> str:
    """'validation' or 'train' from a stable hash of the document text (never both)."""
    if validation_fraction <= 0:
        return "train"
    import hashlib

    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return "validation" if int.from_bytes(digest, "little") % 1_000_000 < validation_fraction * 1_000_000 else "train"
