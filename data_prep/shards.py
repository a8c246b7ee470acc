"""Packed rows -> globally shuffled Parquet shards, by one of two routes that write identical files.

A row's place is a keyed hash of its token ids: shard = key % shards, and rows are sorted by
(key // shards, ids) inside their shard. Same rows and seed, same shards, on any runner and worker count.

- `ShuffleThroughRunner`: the runner's GroupByKey moves the rows (Dataflow, Flink and Spark shuffle
  through disk across machines).
- `ShuffleThroughFiles`: the local runner's GroupByKey holds every element in memory, so the rows go to
  spill files instead (`SpillRows`, up to `spill_bytes` buffered per bundle) and only the file names
  are grouped; each shard is then read back, sorted and written (`write_spilled_shard`). Memory stays
  bounded by the spill buffer and one shard, whatever the corpus size.

A row is (input_ids as bytes of the token dtype, word_start as one byte per token or None).
"""
from __future__ import annotations

import hashlib
import os
import struct
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

RECORD_HEADER = struct.Struct("<QI")  # shuffle key, tokens in the row
SPILL_BYTES = 64 << 20


def shuffle_key(ids: bytes, seed: int) -> int:
    """64-bit keyed hash of a row's token ids."""
    return int.from_bytes(hashlib.blake2b(ids, digest_size=8, key=seed.to_bytes(8, "little")).digest(), "little")


def parquet_schema(token_dtype: str, packing: str = "document"):
    """Columns of the shards: `input_ids`, plus `word_start` except in causal mode (no masking metadata)."""
    import pyarrow as pa

    fields = [("input_ids", pa.list_(getattr(pa, token_dtype)()))]
    if packing != "causal":
        fields.append(("word_start", pa.list_(pa.bool_())))
    return pa.schema(fields)


def shard_path(directory: str, shard: int, shards: int) -> str:
    return os.path.join(directory, f"part-{shard:05d}-of-{shards:05d}.parquet")


def write_shard(keyed_rows: list, path: str, token_dtype: str, packing: str) -> str:
    """Sort (key // shards, row) pairs by (key, ids, flags) and write the rows as one Parquet file at `path`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    rows = [row for _, row in sorted(keyed_rows, key=lambda kr: (kr[0], kr[1][0], kr[1][1] or b""))]
    schema = parquet_schema(token_dtype, packing)
    ids = [np.frombuffer(r[0], dtype=token_dtype) for r in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in ids], out=offsets[1:])
    columns = [pa.ListArray.from_arrays(offsets, np.concatenate(ids) if ids else np.zeros(0, token_dtype), type=schema.field("input_ids").type)]
    if "word_start" in schema.names:
        starts = np.frombuffer(b"".join(r[1] for r in rows), dtype=bool)
        columns.append(pa.ListArray.from_arrays(offsets, starts, type=schema.field("word_start").type))
    table = pa.Table.from_arrays(columns, schema=schema)
    with FileSystems.create(path) as handle:
        pq.write_table(table, handle, compression="snappy", row_group_size=8192)
    return path


class ShuffleThroughRunner(beam.PTransform):
    """Rows -> shard paths, grouped by the runner's GroupByKey."""

    def __init__(self, directory: str, shards: int, seed: int, token_dtype: str, packing: str):
        super().__init__()
        self.directory, self.shards, self.seed, self.token_dtype, self.packing = directory, shards, seed, token_dtype, packing

    def expand(self, rows):
        shards, seed, directory, dtype, packing = self.shards, self.seed, self.directory, self.token_dtype, self.packing

        def keyed(row):
            key = shuffle_key(row[0], seed)
            return key % shards, (key // shards, row)

        return (
            rows
            | "ShuffleKey" >> beam.Map(keyed)
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards" >> beam.MapTuple(lambda shard, keyed_rows: write_shard(list(keyed_rows), shard_path(directory, shard, shards), dtype, packing))
        )


class SpillRows(beam.DoFn):
    """Rows -> (shard, spill file): rows are buffered per shard and written out whenever `spill_bytes` are held.

    A spill file is a run of records: shuffle key (u64), tokens n (u32), n ids of the token dtype, and
    n word-start bytes unless the rows carry none. File names are unique per write, so a retried bundle
    never clobbers a file another attempt emitted.
    """

    def __init__(self, directory: str, shards: int, seed: int, token_dtype: str, spill_bytes: int = SPILL_BYTES):
        self.directory, self.shards, self.seed, self.spill_bytes = directory, shards, seed, spill_bytes
        self.itemsize = np.dtype(token_dtype).itemsize

    def start_bundle(self):
        self.buffers: dict[int, list[bytes]] = {}
        self.held = 0

    def process(self, row):
        ids, flags = row
        key = shuffle_key(ids, self.seed)
        record = RECORD_HEADER.pack(key, len(ids) // self.itemsize) + ids + (flags or b"")
        self.buffers.setdefault(key % self.shards, []).append(record)
        self.held += len(record)
        if self.held >= self.spill_bytes:
            yield from self._spill()

    def _spill(self):
        from apache_beam.io.filesystems import FileSystems

        for shard, records in sorted(self.buffers.items()):
            path = os.path.join(self.directory, f"{shard:05d}", f"{uuid.uuid4().hex}.spill")
            with FileSystems.create(path) as handle:
                handle.write(b"".join(records))
            yield shard, path
        self.buffers, self.held = {}, 0

    def finish_bundle(self):
        for shard_and_path in self._spill():
            yield WindowedValue(shard_and_path, 0, [GlobalWindow()])


def read_spill(path: str, token_dtype: str, with_flags: bool, shards: int) -> list:
    """The (key // shards, row) pairs of one spill file."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type="uncompressed") as handle:
        data = handle.read()
    itemsize = np.dtype(token_dtype).itemsize
    out, pos, header = [], 0, RECORD_HEADER.size
    while pos < len(data):
        key, n = RECORD_HEADER.unpack_from(data, pos)
        pos += header
        ids = data[pos : pos + n * itemsize]
        pos += n * itemsize
        flags = None
        if with_flags:
            flags = data[pos : pos + n]
            pos += n
        out.append((key // shards, (ids, flags)))
    return out


def write_spilled_shard(shard: int, spill_files, directory: str, shards: int, token_dtype: str, packing: str) -> str:
    """Read one shard's spill files, write its Parquet file, delete the spill files."""
    from apache_beam.io.filesystems import FileSystems

    spill_files = sorted(spill_files)
    keyed_rows = [kr for path in spill_files for kr in read_spill(path, token_dtype, packing != "causal", shards)]
    path = write_shard(keyed_rows, shard_path(directory, shard, shards), token_dtype, packing)
    FileSystems.delete(spill_files)
    return path


class ShuffleThroughFiles(beam.PTransform):
    """Rows -> shard paths, through spill files under `spill_directory` (only file names are grouped)."""

    def __init__(self, directory: str, spill_directory: str, shards: int, seed: int, token_dtype: str, packing: str,
                 spill_bytes: int = SPILL_BYTES):
        super().__init__()
        self.directory, self.spill_directory, self.shards, self.seed = directory, spill_directory, shards, seed
        self.token_dtype, self.packing, self.spill_bytes = token_dtype, packing, spill_bytes

    def expand(self, rows):
        directory, shards, dtype, packing = self.directory, self.shards, self.token_dtype, self.packing
        return (
            rows
            | "Spill" >> beam.ParDo(SpillRows(self.spill_directory, shards, self.seed, dtype, self.spill_bytes))
            | "GroupSpills" >> beam.GroupByKey()
            | "WriteShards" >> beam.MapTuple(lambda shard, files: write_spilled_shard(shard, files, directory, shards, dtype, packing))
        )
