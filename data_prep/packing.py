"""Packing token runs into training sequences (pure functions and small stateful packers, no Beam).

Modes (`PrepConfig.packing`):

- `document`: each document's tokens are cut into consecutive windows of at most `max_seq_len - 2`
  tokens, each wrapped as `[CLS] window [SEP]`; sequences never cross documents (DistilBERT).
- `full_sentences`: documents are concatenated into one token stream with an extra `[SEP]` between
  documents, cut into windows of `max_seq_len - 2`, each wrapped as `[CLS] window [SEP]`; sequences
  cross document boundaries (RoBERTa FULL-SENTENCES).
- `causal`: documents are concatenated with EOS after each one (GPT-2's `<|endoftext|>`), cut into
  windows of exactly `max_seq_len` tokens, no other special tokens. Instead of word-start flags each row
  carries document-start flags: True at the first token of every document that begins in the row (a row
  that starts inside a document has no flag at its first token). The trainer restarts position ids and
  attention there (distill/data/documents.py); the flags, not the EOS ids, are the boundaries, so a
  document whose own text encodes to the EOS id stays one document.

In the stream modes only the last window of a stream (a bundle of documents) can be short.
Sequences shorter than `min_seq_len` (specials included) are dropped as `too_short`; sequences whose
content is more than `max_unk_fraction` unknown tokens are dropped as `mostly_unknown`. Drops count
content tokens only (inserted separators / EOS are not read tokens), so
tokens read == content tokens written + content tokens dropped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from data_prep.rows import RowBlock

PACKING_MODES = ("document", "full_sentences", "causal")


@dataclass
class Sequence:
    ids: np.ndarray  # int64, specials included
    flags: np.ndarray  # bool, same length: word starts (masked-LM modes) or document starts (causal)
    content_tokens: int  # tokens that came from documents (not inserted specials)


@dataclass
class Packed:
    sequences: list = field(default_factory=list)  # list[Sequence]
    dropped: dict[str, list[int]] = field(default_factory=dict)  # reason -> [sequences, content tokens]

    def drop(self, reason: str, tokens: int) -> None:
        entry = self.dropped.setdefault(reason, [0, 0])
        entry[0] += 1
        entry[1] += tokens


@dataclass(frozen=True)
class PackSpec:
    """What a packer needs to know about the tokenizer and the limits."""

    mode: str
    max_seq_len: int
    min_seq_len: int
    max_unk_fraction: float
    unk_id: Optional[int]
    cls_id: Optional[int] = None
    sep_id: Optional[int] = None
    eos_id: Optional[int] = None

    def __post_init__(self):
        if self.mode not in PACKING_MODES:
            raise ValueError(f"packing {self.mode!r} is not one of {', '.join(PACKING_MODES)}")
        if self.mode == "causal":
            if self.eos_id is None:
                raise ValueError("causal packing needs a tokenizer with an EOS token")
            if self.max_seq_len < 2:
                raise ValueError("max_seq_len must be at least 2 for causal packing")
        else:
            if self.cls_id is None or self.sep_id is None:
                raise ValueError(f"{self.mode} packing needs a tokenizer with [CLS] and [SEP] tokens")
            if self.max_seq_len < 3:
                raise ValueError("max_seq_len must be at least 3 ([CLS] token [SEP])")


def _check(out: Packed, spec: PackSpec, window: np.ndarray, real: Optional[np.ndarray], extra: int) -> bool:
    """Apply the min-length and unknown-share filters to one window; count a drop.

    `real` flags the tokens that came from documents; None means all of them did (document mode)."""
    content = len(window) if real is None else int(np.count_nonzero(real))
    if len(window) + extra < spec.min_seq_len:
        out.drop("too_short", content)
        return False
    if spec.unk_id is not None and content:
        unknown = window == spec.unk_id
        if np.count_nonzero(unknown if real is None else unknown & real) > spec.max_unk_fraction * content:
            out.drop("mostly_unknown", content)
            return False
    return True


def pack_document(
    ids: np.ndarray,
    word_start: np.ndarray,
    cls_id: int,
    sep_id: int,
    unk_id: int | None,
    max_seq_len: int,
    min_seq_len: int,
    max_unk_fraction: float,
) -> Packed:
    """Windows of one document as [CLS] ... [SEP] sequences, with drops counted."""
    if max_seq_len < 3:
        raise ValueError("max_seq_len must be at least 3 ([CLS] token [SEP])")
    out = Packed()
    _pack_windows(ids, word_start, PackSpec("document", max_seq_len, min_seq_len, max_unk_fraction, unk_id, cls_id, sep_id), out)
    return out


def _pack_windows(ids: np.ndarray, word_start: np.ndarray, spec: PackSpec, out: Packed) -> None:
    """pack_document's loop over the windows of one document."""
    width = spec.max_seq_len - 2
    for start in range(0, len(ids), width):
        window = ids[start : start + width]
        if not _check(out, spec, window, None, 2):
            continue
        n = len(window)
        seq = np.empty(n + 2, np.int64)
        seq[0], seq[1:-1], seq[-1] = spec.cls_id, window, spec.sep_id
        flags = np.empty(n + 2, bool)
        flags[0], flags[1:-1], flags[-1] = True, word_start[start : start + width], True
        out.sequences.append(Sequence(seq, flags, n))


def _count_drops(dropped: dict, reason: str, mask: np.ndarray, tokens: np.ndarray) -> None:
    if mask.any():
        entry = dropped.setdefault(reason, [0, 0])
        entry[0] += int(np.count_nonzero(mask))
        entry[1] += int(tokens[mask].sum())


def pack_documents(docs: list[tuple[np.ndarray, np.ndarray]], spec: PackSpec, dropped: dict) -> RowBlock:
    """`document` mode for many documents at once, in numpy: the rows `_pack_windows` gives document by
    document, in the same order, with the same drops counted into `dropped` (tests/unit/test_data_prep.py compares them)."""
    width = spec.max_seq_len - 2
    lengths = np.fromiter((len(ids) for ids, _ in docs), dtype=np.int64, count=len(docs))
    if not lengths.sum():
        return RowBlock(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))
    ids = np.concatenate([np.asarray(ids, np.int64) for ids, _ in docs])
    starts = np.concatenate([np.asarray(flags, bool) for _, flags in docs])
    windows = -(-lengths // width)
    doc_of_window = np.repeat(np.arange(len(docs)), windows)
    first_window = np.cumsum(windows) - windows
    k = np.arange(len(doc_of_window)) - first_window[doc_of_window]  # window number inside its document
    begin = (np.cumsum(lengths) - lengths)[doc_of_window] + k * width
    size = np.minimum(width, lengths[doc_of_window] - k * width)
    too_short = size + 2 < spec.min_seq_len
    mostly_unknown = np.zeros_like(too_short)
    if spec.unk_id is not None:
        unknown = np.concatenate(([0], np.cumsum(ids == spec.unk_id)))
        mostly_unknown = ~too_short & (unknown[begin + size] - unknown[begin] > spec.max_unk_fraction * size)
    _count_drops(dropped, "too_short", too_short, size)
    _count_drops(dropped, "mostly_unknown", mostly_unknown, size)
    keep = ~(too_short | mostly_unknown)
    begin, size = begin[keep], size[keep]
    row_lengths = size + 2
    row_start = np.cumsum(row_lengths) - row_lengths
    source = np.repeat(begin, size) + np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
    content = np.ones(int(row_lengths.sum()), dtype=bool)
    content[row_start] = False
    content[row_start + row_lengths - 1] = False
    out_ids = np.empty(len(content), dtype=np.int64)
    out_ids[row_start], out_ids[row_start + row_lengths - 1] = spec.cls_id, spec.sep_id
    out_ids[content] = ids[source]
    out_flags = np.ones(len(content), dtype=bool)
    out_flags[content] = starts[source]
    return RowBlock(row_lengths, out_ids, out_flags)


class DocumentPacker:
    """`document` mode behind the packer interface (no state between documents)."""

    def __init__(self, spec: PackSpec):
        self.spec = spec
        self.dropped: dict[str, list[int]] = {}

    def add_batch(self, docs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[RowBlock, int]:
        """(the rows of these documents as one block of int64 ids, their content tokens)."""
        block = pack_documents(docs, self.spec, self.dropped)
        return block, len(block.ids) - 2 * len(block)

    def flush_batch(self) -> tuple[RowBlock, int]:
        return _as_block([])


def _as_block(sequences: list[Sequence]) -> tuple[RowBlock, int]:
    return RowBlock.from_sequences(sequences, "int64"), sum(s.content_tokens for s in sequences)


class StreamPacker:
    """`full_sentences` and `causal` modes: documents concatenated into one stream, cut into windows."""

    def __init__(self, spec: PackSpec):
        self.spec = spec
        causal = spec.mode == "causal"
        self.width = spec.max_seq_len if causal else spec.max_seq_len - 2
        self.prefix = [] if causal else [spec.cls_id]
        self.suffix = [] if causal else [spec.sep_id]
        self.between = None if causal else spec.sep_id  # inserted before a document that continues a stream
        self.after = spec.eos_id if causal else None  # appended after every document
        self.causal = causal  # flags are document starts (each document's first token), not word starts
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (ids, flags, real)
        self._length = 0
        self.dropped: dict[str, list[int]] = {}

    def _append(self, ids, starts, real) -> None:
        self._parts.append((ids, starts, real))
        self._length += len(ids)

    def _special(self, token_id: int):
        # an inserted special: a word of its own (masked-LM modes), never a document's first token (causal)
        return np.array([token_id], np.int64), np.full(1, not self.causal), np.zeros(1, bool)

    def add(self, ids: np.ndarray, word_start: np.ndarray) -> list[Sequence]:
        if not len(ids):
            return []
        if self.between is not None and self._length:
            self._append(*self._special(self.between))
        if self.causal:
            flags = np.zeros(len(ids), bool)
            flags[0] = True  # the document's first token
        else:
            flags = np.asarray(word_start, bool)
        self._append(np.asarray(ids, np.int64), flags, np.ones(len(ids), bool))
        if self.after is not None:
            self._append(*self._special(self.after))
        if self._length < self.width:
            return []
        ids_all, starts_all, real_all = (np.concatenate(x) for x in zip(*self._parts))
        full = (len(ids_all) // self.width) * self.width
        out = [
            seq
            for start in range(0, full, self.width)
            for seq in self._emit(
                ids_all[start : start + self.width], starts_all[start : start + self.width], real_all[start : start + self.width]
            )
        ]
        self._parts, self._length = [], 0
        if full < len(ids_all):
            self._append(ids_all[full:], starts_all[full:], real_all[full:])
        return out

    def flush(self) -> list[Sequence]:
        """Emit (or drop) the short remainder at the end of a stream."""
        if not self._parts:
            return []
        ids_all, starts_all, real_all = (np.concatenate(x) for x in zip(*self._parts))
        self._parts, self._length = [], 0
        return self._emit(ids_all, starts_all, real_all)

    def add_batch(self, docs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[RowBlock, int]:
        """(rows completed by adding these documents in order as one block of int64 ids, their content tokens)."""
        return _as_block([seq for ids, starts in docs for seq in self.add(ids, starts)])

    def flush_batch(self) -> tuple[RowBlock, int]:
        return _as_block(self.flush())

    def _emit(self, window, starts, real) -> list[Sequence]:
        packed = Packed(dropped=self.dropped)
        if not _check(packed, self.spec, window, real, len(self.prefix) + len(self.suffix)):
            return []
        content = int(np.count_nonzero(real))
        if self.causal:
            return [Sequence(window.copy(), starts.copy(), content)]
        seq = np.concatenate((self.prefix, window, self.suffix)).astype(np.int64)
        flags = np.concatenate(([True] * len(self.prefix), starts, [True] * len(self.suffix))).astype(bool)
        return [Sequence(seq, flags, content)]


def make_packer(spec: PackSpec):
    """The packer of `spec.mode`: `add_batch(documents)` -> (RowBlock of completed rows, content tokens), `flush_batch()` at the end.

    The stream packer also takes one document at a time (`add`, `flush`: lists of Sequence)."""
    return DocumentPacker(spec) if spec.mode == "document" else StreamPacker(spec)


def split_of(text: str, validation_fraction: float, seed: int = 0) -> str:
    """'validation' or 'train' from a stable hash of the document text (never both)."""
    if validation_fraction <= 0:
        return "train"
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return "validation" if int.from_bytes(digest, "little") % 1_000_000 < validation_fraction * 1_000_000 else "train"
