"""The distill-prep Beam pipeline: the graph of transforms (the driver around it is data_prep/driver.py).

    (index, file) ─► ReadDocuments ─► TokenizeAndPack ─┬► train rows ───────► shuffle into shards ─► Parquet shards
    (clean, dedup by hash,  │           (batched,       ├► validation rows ──► (same)
     data_prep/documents)   │            helper thread) └► token counts (train) ─► token_counts.npy
                            └─ stats ──────┴─► MergeCounters ─► _prep_tmp/stats.json

Dedup groups 16-byte hashes, never text (data_prep/documents.py); the shuffle into shards goes through
spill files on the local runner and through the runner's GroupByKey elsewhere (data_prep/shards.py).
So on the local runner no grouping holds the corpus, and memory stays flat as it grows.
The tokenizer is read once by the driver and travels inside TokenizeAndPack as bytes.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from data_prep import manifest as mf
from data_prep.config import PrepConfig
from data_prep.documents import ReadDocuments
from data_prep.output_dir import TMP_DIR
from data_prep.packing import PackSpec, make_packer, split_of
from data_prep.rows import RowBlock
from data_prep.shards import SPILL_BYTES, ShuffleThroughFiles, ShuffleThroughRunner
from data_prep.stats import HISTOGRAM_BIN, MergeCounters, add_drop
from data_prep.tokenization import load_payload
from data_prep.tokenizer_base import TokenizerPayload

SPLIT_NAMES = ("train", "validation")


def pack_spec(cfg: PrepConfig, tok) -> PackSpec:
    """The packing settings of `cfg` with the special-token ids of `tok`."""
    return PackSpec(cfg.packing, cfg.max_seq_len, cfg.min_seq_len, cfg.max_unk_fraction, tok.unk_id, tok.cls_id, tok.sep_id, tok.eos_id)


def _as_doc(element) -> tuple[str, Optional[str], int]:
    """(text, split key or None, copies): readers emit plain text or this triple."""
    return (element, None, 1) if isinstance(element, str) else element


def token_dtype_for(vocab_size: int) -> str:
    """The smallest dtype that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


class TokenizeAndPack(beam.DoFn):
    """Documents -> blocks of packed rows of the train/validation split, counters and token counts.

    An element is one document (text, split key or None, copies), a plain text, or a list of documents.
    Documents are tokenized in batches of `batch_size` documents or `batch_chars` characters; the
    packers keep their state for a whole bundle (across-document modes pack across batches).
    The tokenizer travels inside the DoFn as bytes (`TokenizerPayload`): workers never read `--tokenizer`.
    One batch is encoded on a helper thread (`start_batch`: the tokenizer's own code, which releases the
    GIL) while this thread turns the previous one into arrays (`finish_batch`) and packs it, so Python
    work (reading, packing, counting, Beam's own) overlaps the tokenization;
    batches are packed in the order they arrived, so the output does not depend on the timing.
    Each batch leaves as one `RowBlock` per split (ids in the token dtype): per-row work is numpy work.
    """

    def __init__(self, cfg: PrepConfig, tokenizer: TokenizerPayload, vocab_size: int):
        self.cfg = cfg
        self.tokenizer_payload = tokenizer
        self.vocab_size = vocab_size
        self.token_dtype = token_dtype_for(vocab_size)

    def setup(self):
        self.tokenizer = load_payload(self.tokenizer_payload)
        self.spec = pack_spec(self.cfg, self.tokenizer)
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-prep-tokenize")

    def teardown(self):
        encoder = getattr(self, "encoder", None)
        if encoder is not None:
            encoder.shutdown(wait=True)

    def start_bundle(self):
        self.stats = Counter()
        self.counts = np.zeros(self.vocab_size, dtype=np.int64)
        self.packers = {name: make_packer(self.spec) for name in SPLIT_NAMES}
        self.buffer: list = []
        self.buffered_chars = 0
        self.in_flight = None  # (documents, future of their encodings): the batch being tokenized

    def process(self, element):
        for doc in element if isinstance(element, list) else [element]:
            doc = _as_doc(doc)
            self.buffer.append(doc)
            self.buffered_chars += len(doc[0])
            if len(self.buffer) >= self.cfg.batch_size or self.buffered_chars >= self.cfg.batch_chars:
                yield from self._tokenize_buffer()

    def _tokenize_buffer(self, drain: bool = False):
        """Start encoding the buffered documents; pack the batch started before (all of them if `drain`)."""
        docs = self.buffer
        self.buffer, self.buffered_chars = [], 0
        previous = self.in_flight
        self.in_flight = (docs, self.encoder.submit(self.tokenizer.start_batch, [d[0] for d in docs])) if docs else None
        if previous:
            yield from self._pack(*previous)
        if drain and self.in_flight:
            current, self.in_flight = self.in_flight, None
            yield from self._pack(*current)

    def _pack(self, docs, encodings):
        cfg, stats = self.cfg, self.stats
        by_split: dict[str, list] = {name: [] for name in SPLIT_NAMES}
        for (text, key, copies), encoded in zip(docs, self.tokenizer.finish_batch(encodings.result())):
            by_split[split_of(key or text, cfg.validation_fraction, cfg.seed)].append(encoded)
            stats["tokens_read"] += len(encoded[0]) * copies
            if copies > 1:
                add_drop(stats, "duplicate", copies - 1, len(encoded[0]) * (copies - 1), "documents")
        for split, encoded in by_split.items():
            if encoded:
                stats[f"split.{split}.documents"] += len(encoded)
                yield from self._emit(split, *self.packers[split].add_batch(encoded))

    def _emit(self, split: str, block: RowBlock, content_tokens: int):
        """Count a block of rows and pass it on in the token dtype (validation rows on their own output)."""
        if not len(block):
            return
        stats = self.stats
        stats[f"split.{split}.sequences"] += len(block)
        stats[f"split.{split}.content_tokens"] += content_tokens
        stats[f"split.{split}.special_tokens"] += len(block.ids) - content_tokens
        histogram = np.bincount(block.lengths // HISTOGRAM_BIN)
        for bin_index in np.flatnonzero(histogram).tolist():
            stats[f"hist.{bin_index}"] += int(histogram[bin_index])
        block = RowBlock(block.lengths, block.ids.astype(self.token_dtype), block.flags)
        if split == "train":
            self.counts += np.bincount(block.ids, minlength=self.vocab_size)[: self.vocab_size]
            yield block
        else:
            yield beam.pvalue.TaggedOutput(split, block)

    def finish_bundle(self):
        def windowed(out):
            if isinstance(out, beam.pvalue.TaggedOutput):
                return beam.pvalue.TaggedOutput(out.tag, WindowedValue(out.value, 0, [GlobalWindow()]))
            return WindowedValue(out, 0, [GlobalWindow()])

        for out in self._tokenize_buffer(drain=True):
            yield windowed(out)
        for split, packer in self.packers.items():
            for out in self._emit(split, *packer.flush_batch()):
                yield windowed(out)
            for reason, (sequences, tokens) in packer.dropped.items():
                add_drop(self.stats, reason, sequences, tokens, "sequences")
        yield beam.pvalue.TaggedOutput("stats", WindowedValue(dict(self.stats), 0, [GlobalWindow()]))
        yield beam.pvalue.TaggedOutput("counts", WindowedValue(self.counts, 0, [GlobalWindow()]))


class SumArrays(beam.CombineFn):
    def __init__(self, size: int):
        self.size = size

    def create_accumulator(self):
        return np.zeros(self.size, dtype=np.int64)

    def add_input(self, acc, element):
        acc += element
        return acc

    def merge_accumulators(self, accumulators):
        out = np.zeros(self.size, dtype=np.int64)
        for acc in accumulators:
            out += acc
        return out

    def extract_output(self, acc):
        return acc


def _write_json(data: dict, path: str) -> None:
    with FileSystems.create(path) as handle:
        handle.write(json.dumps(data).encode())


def _write_npy(array: np.ndarray, path: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    with FileSystems.create(path) as handle:
        handle.write(buffer.getvalue())


def build_pipeline(
    pipeline: beam.Pipeline,
    cfg: PrepConfig,
    files: list[str],
    tokenizer: TokenizerPayload,
    vocab_size: int,
    token_dtype: str,
    num_shards: int,
    spill: bool = True,
    spill_bytes: int = SPILL_BYTES,
    dedup_partitions: int = 1,
    stamps: Optional[list] = None,
) -> None:
    """Attach the prep transforms to `pipeline` (also used by tests); `tokenizer` is pickled into the DoFn.

    `spill`: shuffle rows into shards through spill files (the local runner, whose GroupByKey is in
    memory), `spill_bytes` buffered per bundle; False: through the runner's GroupByKey (Dataflow, Flink,
    Spark). Both write the same shards. `dedup_partitions`: hash partitions of the dedup pass (data_prep/documents.py).
    `stamps`: (size, mtime) of each file when listed; the readers refuse a file that changed since.
    """
    tmp = os.path.join(cfg.output, TMP_DIR)
    docs, read_stats = (
        pipeline
        | "Files" >> beam.Create(list(enumerate(files)))
        | "SpreadFiles" >> beam.GroupByKey()  # one file per key: files spread over the workers
        | "OneFile" >> beam.MapTuple(lambda index, paths: (index, next(iter(paths))))
        | "Read" >> ReadDocuments(cfg, files, dedup_partitions, stamps)
    )
    packed = docs | "TokenizeAndPack" >> beam.ParDo(TokenizeAndPack(cfg, tokenizer, vocab_size)).with_outputs(
        "validation", "stats", "counts", main="train"
    )
    splits = {"train": packed.train}
    if cfg.validation_fraction > 0:
        splits["validation"] = packed.validation
    for name, rows in splits.items():
        shards = num_shards if name == "train" else max(1, int(np.ceil(num_shards * cfg.validation_fraction)))
        directory = os.path.join(cfg.output, name)
        if spill:
            shuffle = ShuffleThroughFiles(
                directory, os.path.join(tmp, "spill", name), shards, cfg.seed, token_dtype, cfg.packing, spill_bytes
            )
        else:
            shuffle = ShuffleThroughRunner(directory, shards, cfg.seed, token_dtype, cfg.packing)
        _ = rows | f"Shuffle_{name}" >> shuffle
    _ = (
        (read_stats, packed.stats)
        | "AllStats" >> beam.Flatten()
        | "MergeStats" >> beam.CombineGlobally(MergeCounters()).without_defaults()
        | "WriteStats" >> beam.Map(_write_json, os.path.join(tmp, "stats.json"))
    )
    _ = (
        packed.counts
        | "SumCounts" >> beam.CombineGlobally(SumArrays(vocab_size)).without_defaults()
        | "WriteCounts" >> beam.Map(_write_npy, os.path.join(cfg.output, mf.TOKEN_COUNTS_FILE))
    )
