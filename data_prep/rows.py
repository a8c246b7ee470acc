"""Packed rows in blocks: many rows as three flat arrays, so per-row work is numpy work.

A `RowBlock` holds rows back to back: `lengths` (tokens per row), `ids` (the token ids of every row,
in the dataset's token dtype) and `flags` (one bool per token: word starts in the masked-LM modes, document
starts in causal mode).
TokenizeAndPack emits one block per batch and split; the shuffle, the spill files and the shard
writer all work on blocks. `shuffle_keys` gives every row a seeded 64-bit key from its ids alone,
which is what makes the shuffle deterministic: same rows and seed, same shards, on any runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_TOKEN, _POSITION, _LENGTH = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@dataclass
class RowBlock:
    lengths: np.ndarray  # int64, tokens per row (every row holds at least one token)
    ids: np.ndarray  # token dtype, all rows concatenated
    flags: np.ndarray  # bool, all rows concatenated: word starts, or document starts (causal)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def offsets(self) -> np.ndarray:
        out = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    @property
    def nbytes(self) -> int:
        return self.lengths.nbytes + self.ids.nbytes + self.flags.nbytes

    @classmethod
    def from_sequences(cls, sequences, token_dtype: str) -> "RowBlock":
        """A block of `Sequence`s (data_prep/packing.py)."""
        lengths = np.array([len(s.ids) for s in sequences], dtype=np.int64)
        ids = np.concatenate([s.ids for s in sequences]).astype(token_dtype) if sequences else np.zeros(0, token_dtype)
        flags = np.concatenate([s.flags for s in sequences]).astype(bool) if sequences else np.zeros(0, bool)
        return cls(lengths, ids, flags)

    @classmethod
    def concat(cls, blocks: list["RowBlock"], token_dtype: str) -> "RowBlock":
        if not blocks:
            return cls(np.zeros(0, np.int64), np.zeros(0, token_dtype), np.zeros(0, bool))
        return cls(
            np.concatenate([b.lengths for b in blocks]), np.concatenate([b.ids for b in blocks]), np.concatenate([b.flags for b in blocks])
        )

    def token_index(self, order: np.ndarray) -> np.ndarray:
        """Positions in `ids` of the tokens of rows `order`, in that order."""
        lengths = self.lengths[order]
        starts = self.offsets[:-1][order]
        out_starts = np.zeros(len(order), dtype=np.int64)
        np.cumsum(lengths[:-1], out=out_starts[1:])
        return np.repeat(starts - out_starts, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)

    def take(self, order: np.ndarray) -> "RowBlock":
        """The rows `order` (indices), in that order."""
        index = self.token_index(order)
        return RowBlock(self.lengths[order], self.ids[index], self.flags[index])

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[start:end], self.flags[start:end]

    def rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        offsets = self.offsets
        for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            yield self.ids[start:end], self.flags[start:end]

    def shuffle_keys(self, seed: int) -> np.ndarray:
        """A seeded 64-bit key per row from its token ids and their positions (and nothing else)."""
        offsets = self.offsets
        if not len(self.lengths):
            return np.zeros(0, dtype=np.uint64)
        position = np.arange(len(self.ids), dtype=np.int64) - np.repeat(offsets[:-1], self.lengths)
        salt = _mix(np.array([seed], dtype=np.uint64) + _TOKEN)
        with np.errstate(over="ignore"):
            token_hash = _mix(self.ids.astype(np.uint64) * _TOKEN + position.astype(np.uint64) * _POSITION + salt)
            sums = np.add.reduceat(token_hash, offsets[:-1])
            return _mix(sums + self.lengths.astype(np.uint64) * _LENGTH)

    def sort_order(self, keys: np.ndarray) -> np.ndarray:
        """Row indices sorted by (key, ids, flags): a total order on content, so equal input gives equal output."""
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        if len(order) < 2 or not (ordered[1:] == ordered[:-1]).any():
            return order
        # equal keys: identical ids (or a 64-bit collision); order those rows by their content
        bounds = np.concatenate(([0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1, [len(order)]))
        sizes = np.diff(bounds)
        offsets = self.offsets

        def content(i: int) -> tuple[bytes, bytes]:
            a, b = offsets[i], offsets[i + 1]
            return self.ids[a:b].tobytes(), self.flags[a:b].tobytes()

        for start, size in zip(bounds[:-1][sizes > 1].tolist(), sizes[sizes > 1].tolist()):
            order[start : start + size] = sorted(order[start : start + size].tolist(), key=content)
        return order
