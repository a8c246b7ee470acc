"""Blocks of packed rows -> globally shuffled Parquet shards, by one of two routes that write identical files.

Every row gets a seeded 64-bit key from its token ids (`RowBlock.shuffle_keys`): shard = key % shards,
and inside a shard rows are sorted by (key, ids, flags). Same rows and seed, same shards, on any
runner and worker count; row groups hold `ROW_GROUP` rows (the last one fewer) on both routes.

- `ShuffleThroughRunner`: rows go one by one through the runner's GroupByKey (Dataflow, Flink and
  Spark shuffle through disk across machines).
- `ShuffleThroughFiles`: the local runner's GroupByKey holds every element in memory, so rows go to
  spill files instead and only the file names are grouped. `SpillRows` buffers rows per shard (up to
  `spill_bytes` per bundle) and writes each shard's buffer as one file sorted by key;
  `write_spilled_shard` then writes a shard one key range at a time, reading from every spill file only
  the rows of that range (`SHARD_PIECE_BYTES` of tokens at most, on average). Memory stays bounded by the
  spill buffer and one key range, whatever the corpus and shard sizes.

Spill file: rows n (u64), keys (n × u64, ascending), lengths (n × u32), ids (token dtype), flags (one byte
per token: word starts, or document starts in causal mode).
"""

from __future__ import annotations

import os
import struct
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from data_prep import manifest as mf
from data_prep.rows import RowBlock

SPILL_BYTES = 16 << 20
SHARD_PIECE_BYTES = 8 << 20
ROW_GROUP = 8192  # rows per Parquet row group
_ROWS = struct.Struct("<Q")


def flag_column(packing: str) -> str:
    """The shards' per-token flag column: `doc_start` (each document's first token) in causal mode, else `word_start`."""
    return mf.DOCUMENT_START_COLUMN if packing == "causal" else mf.WORD_START_COLUMN


def parquet_schema(token_dtype: str, packing: str = "document"):
    """Columns of the shards: `input_ids` and the flags (`flag_column`), list<bool> with one flag per token."""
    return pa.schema([("input_ids", pa.list_(getattr(pa, token_dtype)())), (flag_column(packing), pa.list_(pa.bool_()))])


def shard_path(directory: str, shard: int, shards: int) -> str:
    return os.path.join(directory, f"part-{shard:05d}-of-{shards:05d}.parquet")


class ShardWriter:
    """One Parquet shard, written from rows handed over in their final order, in row groups of ROW_GROUP rows."""

    def __init__(self, path: str, token_dtype: str, packing: str):
        # Arrow's default allocator (mimalloc) keeps the pages of every row group written; the system one hands
        # them back (a 20 MB shard: +72 MB peak RSS with mimalloc, +37 MB with the system allocator).
        pa.set_memory_pool(pa.system_memory_pool())
        self.path, self.token_dtype = path, token_dtype
        self.schema = parquet_schema(token_dtype, packing)
        self.flags = flag_column(packing)
        self.handle = FileSystems.create(path)
        self.writer = pq.ParquetWriter(self.handle, self.schema, compression="snappy")
        self.pending: list[RowBlock] = []
        self.pending_rows = 0
        self.rows_written = 0

    def write(self, rows: RowBlock) -> None:
        self.pending.append(rows)
        self.pending_rows += len(rows)
        if self.pending_rows >= ROW_GROUP:
            block = RowBlock.concat(self.pending, self.token_dtype)
            full = (len(block) // ROW_GROUP) * ROW_GROUP
            for start in range(0, full, ROW_GROUP):
                self._write_group(block.take(np.arange(start, start + ROW_GROUP)))
            rest = block.take(np.arange(full, len(block)))
            self.pending, self.pending_rows = ([rest] if len(rest) else []), len(rest)

    def _write_group(self, rows: RowBlock) -> None:
        offsets = rows.offsets.astype(np.int32)
        columns = [
            pa.ListArray.from_arrays(offsets, rows.ids.astype(self.token_dtype, copy=False), type=self.schema.field("input_ids").type),
            pa.ListArray.from_arrays(offsets, rows.flags, type=self.schema.field(self.flags).type),
        ]
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.rows_written += len(rows)

    def close(self) -> str:
        if self.pending_rows or not self.rows_written:
            self._write_group(RowBlock.concat(self.pending, self.token_dtype))
        self.writer.close()
        self.handle.close()
        return self.path


def write_sorted(writer: ShardWriter, block: RowBlock, keys: np.ndarray) -> None:
    """Hand `block`'s rows to `writer` sorted by (key, ids, flags), a row group's worth at a time."""
    order = block.sort_order(keys)
    for start in range(0, len(order), ROW_GROUP):
        writer.write(block.take(order[start : start + ROW_GROUP]))


def write_shard(block: RowBlock, keys: np.ndarray, path: str, token_dtype: str, packing: str) -> str:
    """Sort one shard's rows by (key, ids, flags) and write them as one Parquet file at `path`."""
    writer = ShardWriter(path, token_dtype, packing)
    write_sorted(writer, block, keys)
    return writer.close()


class ShuffleThroughRunner(beam.PTransform):
    """Row blocks -> shard paths, each row grouped by the runner's GroupByKey."""

    def __init__(self, directory: str, shards: int, seed: int, token_dtype: str, packing: str):
        super().__init__()
        self.directory, self.shards, self.seed, self.token_dtype, self.packing = directory, shards, seed, token_dtype, packing

    def expand(self, blocks):
        shards, seed, directory, dtype, packing = self.shards, self.seed, self.directory, self.token_dtype, self.packing

        def keyed_rows(block: RowBlock):
            keys = block.shuffle_keys(seed)
            for key, (ids, flags) in zip(keys.tolist(), block.rows()):
                yield key % shards, (key, ids.tobytes(), flags.tobytes())

        def write(shard, rows):
            rows = list(rows)
            keys = np.array([key for key, _, _ in rows], dtype=np.uint64)
            ids = [np.frombuffer(i, dtype=dtype) for _, i, _ in rows]
            block = RowBlock(
                np.array([len(i) for i in ids], dtype=np.int64),
                np.concatenate(ids) if ids else np.zeros(0, dtype),
                np.frombuffer(b"".join(f for _, _, f in rows), dtype=bool),
            )
            return write_shard(block, keys, shard_path(directory, shard, shards), dtype, packing)

        return blocks | "KeyRows" >> beam.FlatMap(keyed_rows) | "GroupShards" >> beam.GroupByKey() | "WriteShards" >> beam.MapTuple(write)


class SpillRows(beam.DoFn):
    """Row blocks -> (shard, spill file): rows are buffered per shard and written out, sorted by key,
    whenever `spill_bytes` are held. File names are unique per write, so a retried bundle never
    clobbers a file another attempt emitted."""

    def __init__(self, directory: str, shards: int, seed: int, token_dtype: str, spill_bytes: int = SPILL_BYTES):
        self.directory, self.shards, self.seed, self.spill_bytes = directory, shards, seed, spill_bytes
        self.token_dtype = token_dtype

    def start_bundle(self):
        self.buffers: dict[int, list[tuple[np.ndarray, RowBlock]]] = {}
        self.held = 0

    def process(self, block: RowBlock):
        keys = block.shuffle_keys(self.seed)
        shard_of_row = (keys % np.uint64(self.shards)).astype(np.int64)
        order = np.argsort(shard_of_row, kind="stable")
        counts = np.bincount(shard_of_row, minlength=self.shards)
        start = 0
        for shard in np.flatnonzero(counts).tolist():
            rows = order[start : start + counts[shard]]
            start += counts[shard]
            part = block.take(rows)
            self.buffers.setdefault(shard, []).append((keys[rows], part))
            self.held += part.nbytes + 8 * len(rows)
        if self.held >= self.spill_bytes:
            yield from self._spill()

    def _spill(self):
        for shard, parts in sorted(self.buffers.items()):
            keys = np.concatenate([k for k, _ in parts])
            order = np.argsort(keys, kind="stable")
            block = RowBlock.concat([b for _, b in parts], self.token_dtype).take(order)
            arrays = [keys[order].astype("<u8"), block.lengths.astype("<u4"), block.ids, block.flags]
            path = os.path.join(self.directory, f"{shard:05d}", f"{uuid.uuid4().hex}.spill")
            with FileSystems.create(path) as handle:
                handle.write(_ROWS.pack(len(keys)))
                for array in arrays:
                    handle.write(memoryview(np.ascontiguousarray(array)).cast("B"))  # no bytes copy of the data
            yield shard, path
        self.buffers, self.held = {}, 0

    def finish_bundle(self):
        for shard_and_path in self._spill():
            yield WindowedValue(shard_and_path, 0, [GlobalWindow()])


def _read_exactly(handle, size: int, path: str) -> bytes:
    """`size` bytes, or an error: a spill file shorter than its header says is never read as complete."""
    data = handle.read(size)
    if len(data) != size:
        raise OSError(
            f"spill file {path} is cut short ({len(data)} of {size} bytes where more were written); the run's temporary data was damaged"
        )
    return data


class SpillFile:
    """A spill file's keys and row offsets in memory (12 bytes a row); its tokens read a key range at a time."""

    def __init__(self, path: str, token_dtype: str):
        self.path, self.dtype = path, np.dtype(token_dtype)
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            (rows,) = _ROWS.unpack(_read_exactly(handle, _ROWS.size, path))
            self.keys = np.frombuffer(_read_exactly(handle, 8 * rows, path), dtype="<u8")
            self.lengths = np.frombuffer(_read_exactly(handle, 4 * rows, path), dtype="<u4").astype(np.int64)
        self.offsets = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.ids_at = _ROWS.size + 12 * rows
        self.flags_at = self.ids_at + int(self.offsets[-1]) * self.dtype.itemsize

    def read(self, low: int, high: int) -> tuple[np.ndarray, RowBlock]:
        """(keys, rows) of the rows with low <= key < high."""
        a = int(np.searchsorted(self.keys, np.uint64(low), side="left"))
        b = len(self.keys) if high >= 1 << 64 else int(np.searchsorted(self.keys, np.uint64(high), side="left"))
        first, last = int(self.offsets[a]), int(self.offsets[b])
        if a == b:
            return self.keys[a:b], RowBlock(self.lengths[a:b], np.zeros(0, self.dtype), np.zeros(0, bool))
        with FileSystems.open(self.path, compression_type="uncompressed") as handle:
            handle.seek(self.ids_at + first * self.dtype.itemsize)
            ids = np.frombuffer(_read_exactly(handle, (last - first) * self.dtype.itemsize, self.path), dtype=self.dtype)
            handle.seek(self.flags_at + first)
            flags = np.frombuffer(_read_exactly(handle, last - first, self.path), dtype=bool)
        return self.keys[a:b], RowBlock(self.lengths[a:b], ids, flags)


def write_spilled_shard(shard: int, spill_files, directory: str, shards: int, token_dtype: str, packing: str) -> str:
    """Write one shard from its spill files, one key range at a time; delete the spill files."""
    spill_files = sorted(spill_files)
    files = [SpillFile(path, token_dtype) for path in spill_files]
    tokens = sum(int(f.offsets[-1]) for f in files)
    pieces = max(1, -(-tokens * (np.dtype(token_dtype).itemsize + 1) // SHARD_PIECE_BYTES))
    bounds = [(i << 64) // pieces for i in range(pieces + 1)]  # keys are uniform: equal key ranges hold about equal tokens
    writer = ShardWriter(shard_path(directory, shard, shards), token_dtype, packing)
    for low, high in zip(bounds[:-1], bounds[1:]):
        parts = [f.read(low, high) for f in files]
        keys = np.concatenate([k for k, _ in parts]).astype(np.uint64) if parts else np.zeros(0, np.uint64)
        write_sorted(writer, RowBlock.concat([b for _, b in parts], token_dtype), keys)
    path = writer.close()
    FileSystems.delete(spill_files)
    return path


class ShuffleThroughFiles(beam.PTransform):
    """Row blocks -> shard paths, through spill files under `spill_directory` (only file names are grouped)."""

    def __init__(
        self, directory: str, spill_directory: str, shards: int, seed: int, token_dtype: str, packing: str, spill_bytes: int = SPILL_BYTES
    ):
        super().__init__()
        self.directory, self.spill_directory, self.shards, self.seed = directory, spill_directory, shards, seed
        self.token_dtype, self.packing, self.spill_bytes = token_dtype, packing, spill_bytes

    def expand(self, blocks):
        directory, shards, dtype, packing = self.directory, self.shards, self.token_dtype, self.packing
        spill = SpillRows(self.spill_directory, shards, self.seed, dtype, self.spill_bytes)
        return (
            blocks
            | "Spill" >> beam.ParDo(spill)
            | "GroupSpills" >> beam.GroupByKey()
            | "WriteShards" >> beam.MapTuple(lambda shard, files: write_spilled_shard(shard, files, directory, shards, dtype, packing))
        )
