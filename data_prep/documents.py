"""Documents into the pipeline: read and clean, and exact-duplicate removal that never groups text.

Dedup runs in two passes over the files, so no document text ever goes through a GroupByKey (the
local runner holds every grouped element in memory; text is the bulk of a corpus):

    (index, path) ─► ScanDocuments ─► (content hash, (split key, file index, ordinal)) ─► CombinePerKey(FirstCopy)
                          └─ stats                      ─► (file index, (ordinal, copies)) ─► GroupByKey ─► ReadKeptDocuments ─► (text, key, copies)

The first pass keeps 16-byte hashes and locations only (a few dozen bytes per distinct document);
the second re-reads each file and cleans only the documents it keeps, the first copy of each text
(smallest split key, then file, then position), carrying how many copies it stands for. Without
dedup, `ReadAllDocuments` is one pass. Either way documents go to tokenization in file order within
a file; files are the unit of parallelism.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterator, Optional

import apache_beam as beam

from data_prep.cleaning import clean_text, doc_hash
from data_prep.config import PrepConfig
from data_prep.sources import Dropped, read_documents
from data_prep.stats import add_drop


def cleaned_documents(path: str, cfg: PrepConfig, stats: Optional[Counter], keep: Optional[dict] = None) -> Iterator[tuple[int, str, Optional[str]]]:
    """(ordinal, cleaned text, split key or None) of one file's documents; counts into `stats` when given.

    The ordinal numbers every document the reader yields (also those that clean to nothing), so two
    passes over a file agree on it. With `keep` ({ordinal: anything}), only those ordinals are cleaned and yielded.
    """
    ordinal = -1
    for item in read_documents(path, cfg.doc_split, cfg.text_field, cfg.on_decode_error, cfg.max_line_bytes):
        if isinstance(item, Dropped):
            if stats is not None:
                add_drop(stats, item.reason, item.count, 0, "documents")
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


class ScanDocuments(beam.DoFn):
    """Dedup pass 1: (file index, path) -> (content hash, (split key or "", file index, ordinal)); counters to 'stats'."""

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg

    def process(self, element: tuple[int, str]):
        index, path = element
        stats = Counter(files=1)
        for ordinal, text, key in cleaned_documents(path, self.cfg, stats):
            yield doc_hash(text), (key or "", index, ordinal)
        yield beam.pvalue.TaggedOutput("stats", dict(stats))


class FirstCopy(beam.CombineFn):
    """Locations of one text -> (the smallest location, number of copies)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, location):
        return (location, 1) if acc is None else (min(acc[0], location), acc[1] + 1)

    def merge_accumulators(self, accumulators):
        out = None
        for acc in accumulators:
            if acc is not None:
                out = acc if out is None else (min(out[0], acc[0]), out[1] + acc[1])
        return out

    def extract_output(self, acc):
        return acc


def kept_by_file(element) -> tuple[int, tuple[int, int]]:
    """(hash, ((key, file index, ordinal), copies)) -> (file index, (ordinal, copies))."""
    _, ((_, index, ordinal), copies) = element
    return index, (ordinal, copies)


class ReadKeptDocuments(beam.DoFn):
    """Dedup pass 2: (file index, [(ordinal, copies)]) -> (text, split key or None, copies) of the kept documents."""

    def __init__(self, cfg: PrepConfig, files: list[str]):
        self.cfg = cfg
        self.files = files

    def process(self, element):
        index, kept = element
        copies = dict(kept)
        for ordinal, text, key in cleaned_documents(self.files[index], self.cfg, None, copies):
            yield text, key, copies[ordinal]


class ReadAllDocuments(beam.DoFn):
    """No dedup: (file index, path) -> (text, split key or None, 1) of every document; counters to 'stats'."""

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg

    def process(self, element: tuple[int, str]):
        _, path = element
        stats = Counter(files=1)
        for _, text, key in cleaned_documents(path, self.cfg, stats):
            yield text, key, 1
        yield beam.pvalue.TaggedOutput("stats", dict(stats))


class ReadDocuments(beam.PTransform):
    """PCollection of (file index, path) -> documents (text, split key or None, copies) and a 'stats' PCollection."""

    def __init__(self, cfg: PrepConfig, files: list[str]):
        super().__init__()
        self.cfg = cfg
        self.files = files

    def expand(self, indexed_paths):
        if not self.cfg.dedup:
            read = indexed_paths | "ReadAll" >> beam.ParDo(ReadAllDocuments(self.cfg)).with_outputs("stats", main="docs")
            return read.docs, read.stats
        scan = indexed_paths | "Scan" >> beam.ParDo(ScanDocuments(self.cfg)).with_outputs("stats", main="hashes")
        docs = (
            scan.hashes
            | "FirstCopy" >> beam.CombinePerKey(FirstCopy())
            | "ByFile" >> beam.Map(kept_by_file)
            | "GroupByFile" >> beam.GroupByKey()
            | "ReadKept" >> beam.ParDo(ReadKeptDocuments(self.cfg, self.files))
        )
        return docs, scan.stats
