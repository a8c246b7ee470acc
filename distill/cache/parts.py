"""The parts of a cache: which there are (the one place that decides them), who writes which, the one function that
writes a part (both orchestrators call it), and when a part counts as complete.

A part is rows [start, stop) of one data shard (`parts_of`: cut by `rows_per_part`, fixed by the settings, never by the
workers). `write_cache_part` reads its rows, runs the teacher, writes the Parquet file under a temporary name, renames it,
and only then records its sha256 and size in `.progress/` of the work directory. A part is complete when its file and
its record exist and the file's sha256 is the recorded one: a file cut short by a kill is a temp file or has no record,
a damaged one fails its hash, and either is written again.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.cache_manifest import CachePart
from kd_common.files import sha256_file, write_json_atomically

PROGRESS = ".progress"  # in the work directory: run.json (what is being written) and one record per finished part
TMP_MARK = ".tmp-"

Unit = tuple  # (shard index, shard path, first row, end row)


def parts_of(manifest, split: str, rows_per_part: int) -> list[Unit]:
    """(shard index, shard path, first row, end row) of every part: fixed by the dataset and `rows_per_part` alone."""
    return [
        (i, shard.path, start, min(start + rows_per_part, shard.rows))
        for i, shard in enumerate(manifest.splits[split].shards)
        for start in range(0, shard.rows, rows_per_part)
    ]


def part_name(split: str, shard: int, row_start: int) -> str:
    return f"{split}/{shard:05d}-{row_start:09d}.parquet"


def forwards_of(unit: Unit, batch_size: int, variants: int = 0) -> int:
    """Teacher forwards `write_cache_part` runs for `unit`: one per batch of rows (per static mask)."""
    return -(-(unit[3] - unit[2]) // batch_size) * max(1, variants)


def shares(units: list[Unit], world_size: int) -> list[list[Unit]]:
    """Each rank's parts, a pure function of the part list and the world size: the biggest part first to the rank with the
    fewest rows so far (the lowest rank on a tie); each rank's parts in list order."""
    load, owner = [0] * world_size, {}
    for i in sorted(range(len(units)), key=lambda i: (-(units[i][3] - units[i][2]), i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += units[i][3] - units[i][2]
    return [[u for i, u in enumerate(units) if owner[i] == rank] for rank in range(world_size)]


def record_path(work: str, name: str) -> str:
    return os.path.join(work, PROGRESS, name[: -len(".parquet")] + ".json")


def is_complete(work: str, name: str, identity: str) -> bool:
    """The part's file and record exist, the record is of this cache (`identity`), and the file's size and sha256 are the
    recorded ones."""
    path = os.path.join(work, name)
    try:
        with open(record_path(work, name)) as handle:
            record = json.load(handle)
        return record.get("identity") == identity and os.path.getsize(path) == record["bytes"] and sha256_file(path) == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def write_cache_part(scorer, cfg, unit: Unit, work: str, identity: str, masker=None) -> tuple[str, int, float]:
    """THE function that writes a part (the Beam DoFn and every rank call it): the teacher on rows [start, stop) of the data
    shard, the part's file written (temp name, then rename), then its record. Returns (its name, tokens the teacher ran on,
    seconds)."""
    shard, shard_path, start, stop = unit
    t0 = time.time()
    rows = read_rows(cfg.data, shard_path, start, stop)
    out = []
    for b in range(0, len(rows), cfg.batch_size):
        out += scorer.score(rows[b : b + cfg.batch_size], shard, start + b, masker)
    name = part_name(cfg.split, shard, start)
    path = os.path.join(work, name)
    write_part(path, out, cfg.value_bits)
    os.makedirs(os.path.dirname(record_path(work, name)), exist_ok=True)
    write_json_atomically(record_path(work, name), {"identity": identity, "sha256": sha256_file(path), "bytes": os.path.getsize(path)})
    tokens = sum(len(r) for r, _ in rows) * (masker.variants if masker is not None else 1)
    return name, tokens, time.time() - t0


def write_part(path: str, rows: list[tuple], value_bits: int) -> None:
    """One part file: a row per dataset row (see data_prep/cache_manifest.py); a temp file of its own, then rename (two
    writers of the same part, e.g. a retried Beam bundle, write the same bytes and never each other's temp file)."""
    vtype = np.float16 if value_bits == 16 else np.float32
    columns = {
        "indices": pa.array([r[0].astype(np.int32) for r in rows], type=pa.list_(pa.int32())),
        "values": pa.array([r[1].astype(vtype) for r in rows], type=pa.list_(pa.from_numpy_dtype(vtype))),
    }
    if rows and rows[0][2] is not None:
        columns["tail"] = pa.array([r[2].astype(vtype) for r in rows], type=pa.list_(pa.from_numpy_dtype(vtype)))
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        pq.write_table(
            pa.table(columns),
            tmp,
            compression="zstd",
            compression_level=9,
            use_dictionary=False,
            column_encoding={
                "indices.list.element": "DELTA_BINARY_PACKED",
                "values.list.element": "BYTE_STREAM_SPLIT",
                **({"tail.list.element": "BYTE_STREAM_SPLIT"} if "tail" in columns else {}),
            },
        )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_rows(data_dir: str, shard_path: str, start: int, stop: int) -> list[tuple[np.ndarray, Optional[np.ndarray]]]:
    """(token ids, word-start or document-start flags, or None) of rows [start, stop) of a data shard."""
    shard = pq.ParquetFile(os.path.join(data_dir, shard_path))
    ids = read_column(shard, "input_ids", start, stop, np.int64)
    flags = next((c for c in ("word_start", "doc_start") if c in shard.schema_arrow.names), None)
    if flags is None:
        return [(r, None) for r in ids]
    return list(zip(ids, read_column(shard, flags, start, stop, bool)))


def read_column(shard, column: str, start: int, stop: int, dtype) -> list[np.ndarray]:
    """Rows [start, stop) of a list column of an open Parquet data shard, as numpy arrays."""
    groups, first, at = [], None, 0  # only the row groups that overlap [start, stop)
    for g in range(shard.metadata.num_row_groups):
        n = shard.metadata.row_group(g).num_rows
        if at < stop and at + n > start:
            groups.append(g)
            first = at if first is None else first
        at += n
    table = shard.read_row_groups(groups, columns=[column]) if groups else pa.table({column: pa.array([], pa.list_(pa.int32()))})
    values = table.column(column).slice(start - (first or 0), stop - start)
    return [np.asarray(r, dtype=dtype) for r in values.to_pylist()]


def verify_part(work: str, cfg, unit: Unit, variants: int = 0) -> CachePart:
    """Re-open a written part: it exists and holds its rows (x D static masks), each with length x entries ids (masked
    positions only: a multiple of the entries); its sha256 and size as the manifest will list them. A RuntimeError
    naming the part otherwise."""
    shard, shard_path, start, stop = unit
    name = part_name(cfg.split, shard, start)
    path = os.path.join(work, name)
    if not os.path.exists(path):
        raise RuntimeError(f"the writers finished but part {name} was not written")
    data = pq.ParquetFile(os.path.join(cfg.data, shard_path))
    lengths = np.array([len(r) for r in read_column(data, "input_ids", start, stop, np.int64)], dtype=np.int64)
    entries = pc.list_value_length(pq.read_table(path, columns=["indices"]).column("indices")).to_numpy(zero_copy_only=False)
    want = np.repeat(lengths, max(1, variants)) * cfg.entries
    if variants and cfg.positions == "masked":
        ok = len(entries) == len(want) and not np.any(entries % cfg.entries) and np.all(entries <= want)
    else:
        ok = len(entries) == len(want) and np.array_equal(entries, want)
    if not ok:
        raise RuntimeError(
            f"part {name} does not hold rows {start}-{stop} of shard {shard} x {cfg.entries} entries; output is inconsistent"
        )
    return CachePart(
        path=name,
        shard=shard,
        row_start=start,
        rows=stop - start,
        tokens=int(lengths.sum()),
        sha256=sha256_file(path),
        bytes=os.path.getsize(path),
    )
