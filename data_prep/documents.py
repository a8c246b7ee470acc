"""Documents into the pipeline: read and clean, and exact-duplicate removal that never groups text.

Dedup runs in two passes over the files, so no document text ever goes through a GroupByKey (the
local runner holds every grouped element in memory; text is the bulk of a corpus):

    (index, file) ─► ScanDocuments ─► (partition, block of (content hash, file, ordinal) records) ─► GroupByKey
          └─ stats       ─► first_copies ─► (file, block of (ordinal, copies)) ─► GroupByKey ─► ReadKeptDocuments ─► [(text, key, copies), ...]

The first pass keeps 28 bytes per document (a 16-byte hash and its location) in numpy blocks,
partitioned by hash; each partition finds the first copy of every text (smallest file index, then
position) and how many copies it stands for. The second pass re-reads each file and cleans only the
documents it keeps. Without dedup, `ReadAllDocuments` is one pass. Documents leave in lists of up to
`batch_size` (one Beam element per batch, not per document), in file order; files are the unit of parallelism.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator, Optional

import apache_beam as beam
import numpy as np

from data_prep.cleaning import clean_text, doc_hash
from data_prep.config import PrepConfig
from data_prep.sources import Dropped, read_documents
from data_prep.stats import add_drop

HASH_RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("file", "<u4"), ("ordinal", "<u8")])
KEPT_RECORD = np.dtype([("ordinal", "<u8"), ("copies", "<u4")])
PARTITION_BYTES = 256 << 20  # input bytes per dedup partition


def dedup_partitions(input_bytes: int) -> int:
    """Hash partitions of the dedup pass: one per 256 MB of input, 1 to 256."""
    return int(min(256, max(1, input_bytes // PARTITION_BYTES)))


def cleaned_documents(
    path: str, cfg: PrepConfig, stats: Optional[Counter], keep: Optional[dict] = None, listed: Optional[tuple] = None, verify: bool = True
) -> Iterator[tuple[int, str, Optional[str]]]:
    """(ordinal, cleaned text, split key or None) of one file's documents; counts into `stats` when given.

    The ordinal numbers every document the reader yields (also those that clean to nothing), so two
    passes over a file agree on it (a file that changed between them is refused: `listed` is its
    (size, mtime) when listed). With `keep` ({ordinal: anything}), only those ordinals are cleaned and yielded.
    `verify=False` skips the whole-file check of compressed and Parquet files (for samples that read a part).
    """
    ordinal = -1
    for item in read_documents(path, cfg.doc_split, cfg.text_field, cfg.on_decode_error, cfg.max_line_bytes, listed, verify):
        if isinstance(item, Dropped):
            if stats is not None:
                add_drop(stats, item.reason, item.count, 0, item.unit)
            continue
        ordinal += 1
        if keep is not None and ordinal not in keep:
            continue
        text, removed = clean_text(item.text, cfg.normalization)
        if stats is not None:
            stats["documents_read"] += 1
            stats["control_chars_removed"] += removed
        if not text:
            if stats is not None:
                add_drop(stats, "empty", 1, 0, "documents")
            continue
        yield ordinal, text, item.key


def in_batches(items, size: int) -> Iterator[list]:
    """Lists of up to `size` consecutive items."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _listed(stamps: Optional[list], index: int) -> Optional[tuple]:
    return stamps[index] if stamps else None


class ScanDocuments(beam.DoFn):
    """Dedup pass 1: (file index, path) -> (partition, bytes of HASH_RECORDs) per partition hit; counters to 'stats'."""

    def __init__(self, cfg: PrepConfig, partitions: int, stamps: Optional[list] = None):
        self.cfg = cfg
        self.partitions = partitions
        self.stamps = stamps

    def process(self, element: tuple[int, str]):
        index, path = element
        stats = Counter(files=1)
        digests, ordinals = [], []
        for ordinal, text, _ in cleaned_documents(path, self.cfg, stats, listed=_listed(self.stamps, index)):
            digests.append(doc_hash(text))
            ordinals.append(ordinal)
        if digests:
            halves = np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2)
            records = np.empty(len(digests), dtype=HASH_RECORD)
            records["hi"], records["lo"], records["file"], records["ordinal"] = halves[:, 0], halves[:, 1], index, ordinals
            partition = records["hi"] % np.uint64(self.partitions)
            for p in np.unique(partition).tolist():
                yield p, records[partition == p].tobytes()
        yield beam.pvalue.TaggedOutput("stats", dict(stats))


def first_copies(partition: int, blocks) -> Iterator[tuple[int, bytes]]:
    """One hash partition -> (file index, bytes of KEPT_RECORDs): the first copy of every text and its number of copies."""
    records = np.frombuffer(b"".join(blocks), dtype=HASH_RECORD)
    records = records[np.lexsort((records["ordinal"], records["file"], records["lo"], records["hi"]))]
    first = np.ones(len(records), dtype=bool)
    first[1:] = (records["hi"][1:] != records["hi"][:-1]) | (records["lo"][1:] != records["lo"][:-1])
    starts = np.flatnonzero(first)
    kept = records[starts]
    out = np.empty(len(kept), dtype=KEPT_RECORD)
    out["ordinal"], out["copies"] = kept["ordinal"], np.diff(np.append(starts, len(records)))
    by_file = np.argsort(kept["file"], kind="stable")
    files, counts = np.unique(kept["file"][by_file], return_counts=True)
    start = 0
    for file_index, count in zip(files.tolist(), counts.tolist()):
        yield file_index, out[by_file[start : start + count]].tobytes()
        start += count


class ReadKeptDocuments(beam.DoFn):
    """Dedup pass 2: (file index, [bytes of KEPT_RECORDs]) -> lists of (text, split key or None, copies), the kept documents."""

    def __init__(self, cfg: PrepConfig, files: list[str], stamps: Optional[list] = None):
        self.cfg = cfg
        self.files = files
        self.stamps = stamps

    def process(self, element):
        index, blocks = element
        kept = np.frombuffer(b"".join(blocks), dtype=KEPT_RECORD)
        copies = dict(zip(kept["ordinal"].tolist(), kept["copies"].tolist()))
        docs = (
            (text, key, copies[ordinal])
            for ordinal, text, key in cleaned_documents(self.files[index], self.cfg, None, copies, _listed(self.stamps, index))
        )
        yield from in_batches(docs, self.cfg.batch_size)


class ReadAllDocuments(beam.DoFn):
    """No dedup: (file index, path) -> lists of (text, split key or None, 1), every document; counters to 'stats'."""

    def __init__(self, cfg: PrepConfig, stamps: Optional[list] = None):
        self.cfg = cfg
        self.stamps = stamps

    def process(self, element: tuple[int, str]):
        index, path = element
        stats = Counter(files=1)
        docs = ((text, key, 1) for _, text, key in cleaned_documents(path, self.cfg, stats, listed=_listed(self.stamps, index)))
        yield from in_batches(docs, self.cfg.batch_size)
        yield beam.pvalue.TaggedOutput("stats", dict(stats))


class ReadDocuments(beam.PTransform):
    """PCollection of (file index, path) -> lists of documents (text, split key or None, copies) and a 'stats' PCollection.

    `stamps`: (size, mtime) of each file when listed; a file that differs from it when read is refused.
    """

    def __init__(self, cfg: PrepConfig, files: list[str], partitions: int = 1, stamps: Optional[list] = None):
        super().__init__()
        self.cfg = cfg
        self.files = files
        self.partitions = partitions
        self.stamps = stamps

    def expand(self, indexed_paths):
        if not self.cfg.dedup:
            read = indexed_paths | "ReadAll" >> beam.ParDo(ReadAllDocuments(self.cfg, self.stamps)).with_outputs("stats", main="docs")
            return read.docs, read.stats
        scan = indexed_paths | "Scan" >> beam.ParDo(ScanDocuments(self.cfg, self.partitions, self.stamps)).with_outputs(
            "stats", main="hashes"
        )
        docs = (
            scan.hashes
            | "GroupByHash" >> beam.GroupByKey()
            | "FirstCopies" >> beam.FlatMapTuple(first_copies)
            | "GroupByFile" >> beam.GroupByKey()
            | "ReadKept" >> beam.ParDo(ReadKeptDocuments(self.cfg, self.files, self.stamps))
        )
        return docs, scan.stats
