"""Reading back and publishing a prep run's files through Beam's filesystems (local disk, gs://, s3://, hdfs://)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from data_prep import manifest as mf
from data_prep.config import PrepConfig
from data_prep.output_dir import is_remote


def sha256(path: str, chunk_size: int = 1 << 20) -> str:
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    digest = hashlib.sha256()
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(pattern: str) -> list:
    """FileMetadata of the files matching `pattern`, sorted by path (none: empty)."""
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    return sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path)


def shard_infos(cfg: PrepConfig, split: str) -> list[mf.ShardInfo]:
    import pyarrow.compute as pc  # pyarrow: not at start-up
    import pyarrow.parquet as pq  # pyarrow: not at start-up
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    infos = []
    root = cfg.output.rstrip("/") + "/"
    for meta in list_files(os.path.join(cfg.output, split, "*.parquet")):
        rows = tokens = 0
        with FileSystems.open(meta.path, compression_type="uncompressed") as handle:
            shard = pq.ParquetFile(handle)
            for group in range(shard.num_row_groups):  # one row group at a time: memory does not grow with the shard
                ids = shard.read_row_group(group, columns=["input_ids"]).column("input_ids")
                rows += len(ids)
                tokens += int(pc.sum(pc.list_value_length(ids)).as_py() or 0)
        infos.append(
            mf.ShardInfo(
                path=meta.path[len(root) :] if meta.path.startswith(root) else os.path.relpath(meta.path, cfg.output),
                rows=rows,
                tokens=tokens,
                sha256=sha256(meta.path),
                bytes=meta.size_in_bytes,
            )
        )
    return infos


def save_tokenizer(tokenizer, cfg: PrepConfig) -> None:
    """OUTPUT/tokenizer/: written in place locally, else written to a temporary directory and copied up."""
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    target = os.path.join(cfg.output, mf.TOKENIZER_DIR)
    if not is_remote(cfg.output):
        tokenizer.save(target)
        return
    with tempfile.TemporaryDirectory(prefix="distill-prep-tokenizer-") as tmp:
        tokenizer.save(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as src, FileSystems.create(os.path.join(target, name)) as dst:
                shutil.copyfileobj(src, dst)


def write_manifest(cfg: PrepConfig, manifest: mf.Manifest) -> None:
    """manifest.json, last: locally write-to-temp + rename; an object store publishes an object whole when it is closed."""
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    path = os.path.join(cfg.output, mf.MANIFEST_FILE)
    if not is_remote(cfg.output):
        mf.write_json_atomically(path, manifest.to_json())
        return
    with FileSystems.create(path, mime_type="application/json") as handle:
        handle.write((json.dumps(manifest.to_json(), indent=2) + "\n").encode())
