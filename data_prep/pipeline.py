"""The distill-prep Beam pipeline and the driver steps around it.

    (index, file) ─► ReadDocuments ─► TokenizeAndPack ─┬► train rows ───────► shuffle into shards ─► Parquet shards
    (clean, dedup by hash,  │           (batched,       ├► validation rows ──► (same)
     data_prep/documents)   │            helper thread) └► token counts (train) ─► token_counts.npy
                            └─ stats ──────┴─► MergeCounters ─► _prep_tmp/stats.json

Dedup groups 16-byte hashes, never text (data_prep/documents.py); the shuffle into shards goes through
spill files on the local runner and through the runner's GroupByKey elsewhere (data_prep/shards.py).
So on the local runner no grouping holds the corpus, and memory stays flat as it grows.
The tokenizer is read once by the driver and travels inside TokenizeAndPack as bytes.

The driver checks inputs before anything is written, runs the pipeline, re-opens every shard to
record rows, tokens and sha256, checks the token accounting, and writes `manifest.json` last.
Locally all of it goes into a staging directory beside `--output`, moved into place only when complete
(data_prep/output_dir.py); a failed run removes it and leaves `--output` as it was.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from data_prep import manifest as mf
from data_prep.config import PrepConfig
from data_prep.errors import PrepInputError
from data_prep.packing import PACKING_MODES, PackSpec, make_packer, split_of
from data_prep.rows import RowBlock
from data_prep.documents import ReadDocuments, cleaned_documents, dedup_partitions
from data_prep.output_dir import TMP_DIR, check_output, claim_output, is_remote, remove_output
from data_prep.shards import SPILL_BYTES, ShuffleThroughFiles, ShuffleThroughRunner
from data_prep.sources import is_packed, list_inputs
from data_prep.stats import HISTOGRAM_BIN, MergeCounters, add_drop, structure
from data_prep.tokenization import TokenizerPayload, load_tokenizer

log = logging.getLogger("distill-prep")
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
        self.tokenizer = self.tokenizer_payload.load()
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
        for doc in (element if isinstance(element, list) else [element]):
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
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as handle:
        handle.write(json.dumps(data).encode())


def _write_npy(array: np.ndarray, path: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    with FileSystems.create(path) as handle:
        handle.write(buffer.getvalue())


def build_pipeline(pipeline: beam.Pipeline, cfg: PrepConfig, files: list[str], tokenizer: TokenizerPayload, vocab_size: int,
                   token_dtype: str, num_shards: int, spill: bool = True, spill_bytes: int = SPILL_BYTES, dedup_partitions: int = 1,
                   stamps: Optional[list] = None) -> None:
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
    packed = (
        docs
        | "TokenizeAndPack" >> beam.ParDo(TokenizeAndPack(cfg, tokenizer, vocab_size)).with_outputs("validation", "stats", "counts", main="train")
    )
    splits = {"train": packed.train}
    if cfg.validation_fraction > 0:
        splits["validation"] = packed.validation
    for name, rows in splits.items():
        shards = num_shards if name == "train" else max(1, int(np.ceil(num_shards * cfg.validation_fraction)))
        directory = os.path.join(cfg.output, name)
        if spill:
            shuffle = ShuffleThroughFiles(directory, os.path.join(tmp, "spill", name), shards, cfg.seed, token_dtype, cfg.packing, spill_bytes)
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


IN_PROCESS_MAX_BYTES = 16 << 20  # auto mode: smaller inputs run in the launcher process


def choose_workers(workers: int, files: list[tuple[str, int]]) -> int:
    """`workers` if given; else 1 (in-process) for inputs under IN_PROCESS_MAX_BYTES, above that one process
    per CPU, at most one per input file (files are the unit of parallelism, data_prep/documents.py).

    On a small corpus, starting worker processes costs more than the work (bench/prep_throughput.py: ~1.5 s
    and ~400 MiB more at 1.1 and 11 MB of WikiText); in-process, the fast tokenizer still encodes on all cores.
    Compressed inputs count as 4x their size.
    """
    if workers:
        return workers
    text_bytes = sum(size * (4 if is_packed(path) else 1) for path, size in files)
    return 1 if text_bytes <= IN_PROCESS_MAX_BYTES else max(1, min(os.cpu_count() or 1, len(files)))


def beam_options(cfg: PrepConfig, beam_args: list[str], workers: int) -> PipelineOptions:
    """The local runner's settings (`workers` processes) unless the user chose a runner."""
    args = list(beam_args)
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        args.append("--default_sdk_harness_log_level=WARNING")
    if not any("pipeline_type_check" in a for a in args):
        args.append("--no_pipeline_type_check")  # our transforms are untyped; checking them costs ~0.1 s per run
    if not any(a.startswith("--runner") for a in args):
        if workers > 1:
            args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
        else:
            args += ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
    return PipelineOptions(args)


def local_runner(options: PipelineOptions):
    """The runner for a run without `--runner`: the FnApiRunner, built as Beam's DirectRunner builds it.

    Beam's DirectRunner first tries the Prism runner, a Go binary it downloads from GitHub: offline, that
    fails and falls back to the FnApiRunner, leaking an empty `beam-temp*` directory in the temp dir on
    every run; online, the job runs on Prism, another runner than the one tested and measured here.
    Going to the FnApiRunner directly gives the same execution on every machine, with the pipeline options handed to
    its worker processes as the DirectRunner does. Returns None when the user named a runner.
    """
    from apache_beam.options.pipeline_options import StandardOptions

    if options.view_as(StandardOptions).runner is not None:
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def _sha256(path: str, chunk_size: int = 1 << 20) -> str:
    from apache_beam.io.filesystems import FileSystems

    digest = hashlib.sha256()
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _list_files(pattern: str) -> list:
    """FileMetadata of the files matching `pattern`, sorted by path (none: empty)."""
    from apache_beam.io.filesystems import FileSystems

    return sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path)


def _shard_infos(cfg: PrepConfig, split: str) -> list[mf.ShardInfo]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    infos = []
    root = cfg.output.rstrip("/") + "/"
    for meta in _list_files(os.path.join(cfg.output, split, "*.parquet")):
        rows = tokens = 0
        with FileSystems.open(meta.path, compression_type="uncompressed") as handle:
            shard = pq.ParquetFile(handle)
            for group in range(shard.num_row_groups):  # one row group at a time: memory does not grow with the shard
                ids = shard.read_row_group(group, columns=["input_ids"]).column("input_ids")
                rows += len(ids)
                tokens += int(pc.sum(pc.list_value_length(ids)).as_py() or 0)
        infos.append(mf.ShardInfo(path=meta.path[len(root):] if meta.path.startswith(root) else os.path.relpath(meta.path, cfg.output),
                                  rows=rows, tokens=tokens, sha256=_sha256(meta.path), bytes=meta.size_in_bytes))
    return infos


def _save_tokenizer(tokenizer, cfg: PrepConfig) -> None:
    """OUTPUT/tokenizer/: written in place locally, else written to a temporary directory and copied up."""
    import tempfile

    from apache_beam.io.filesystems import FileSystems

    target = os.path.join(cfg.output, mf.TOKENIZER_DIR)
    if not is_remote(cfg.output):
        tokenizer.save(target)
        return
    with tempfile.TemporaryDirectory(prefix="distill-prep-tokenizer-") as tmp:
        tokenizer.save(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as src, FileSystems.create(os.path.join(target, name)) as dst:
                shutil.copyfileobj(src, dst)


def _write_manifest(cfg: PrepConfig, manifest: mf.Manifest) -> None:
    """manifest.json, last: locally write-to-temp + rename; an object store publishes an object whole when it is closed."""
    from apache_beam.io.filesystems import FileSystems

    path = os.path.join(cfg.output, mf.MANIFEST_FILE)
    if not is_remote(cfg.output):
        mf.write_json_atomically(path, manifest.to_json())
        return
    with FileSystems.create(path, mime_type="application/json") as handle:
        handle.write((json.dumps(manifest.to_json(), indent=2) + "\n").encode())


def finalize(cfg: PrepConfig, tokenizer, files: list[tuple[str, int]], token_dtype: str, options: dict,
             recorded: Optional[PrepConfig] = None) -> mf.Manifest:
    """Re-open the shards in `cfg.output`, check the accounting, write manifest.json last (atomically). Any Beam filesystem.

    `recorded`: the settings the manifest records (the user's `--output`, not the staging directory written to).
    """
    from apache_beam.io.filesystems import FileSystems

    recorded = recorded or cfg
    tmp = os.path.join(cfg.output, TMP_DIR)
    with FileSystems.open(os.path.join(tmp, "stats.json"), compression_type="uncompressed") as handle:
        flat = json.loads(handle.read())
    stats = structure(flat)
    stats["input_bytes"] = sum(size for _, size in files)
    if stats.get("documents_read", 0) == 0:
        raise PrepInputError(f"no text found in --input {' '.join(cfg.inputs)} (all files empty or every document or file skipped); check the inputs")
    splits = {name: info for name in SPLIT_NAMES if (info := mf.SplitInfo(_shard_infos(cfg, name))).shards}
    for name, info in splits.items():
        expected = stats["splits"].get(name, {})
        if info.rows != expected.get("sequences", 0) or info.tokens != expected.get("content_tokens", 0) + expected.get("special_tokens", 0):
            raise RuntimeError(f"shards of {name!r} hold {info.rows} rows / {info.tokens} tokens, the pipeline counted {expected}; output is inconsistent")
    if stats["tokens_read"] != stats["content_tokens_written"] + stats["tokens_dropped"]:
        raise RuntimeError(f"token accounting broken: read {stats['tokens_read']} != written {stats['content_tokens_written']} + dropped {stats['tokens_dropped']}")
    if "train" not in splits or splits["train"].rows == 0:
        raise PrepInputError("no training sequences were produced (every sequence was dropped); lower --min-seq-len or check the corpus and tokenizer")
    _save_tokenizer(tokenizer, cfg)
    manifest = mf.Manifest(
        tokenizer=tokenizer.identity(),
        max_seq_len=cfg.max_seq_len,
        packing=cfg.packing,
        token_dtype=token_dtype,
        splits=splits,
        token_counts={"path": mf.TOKEN_COUNTS_FILE, "sha256": _sha256(os.path.join(cfg.output, mf.TOKEN_COUNTS_FILE)), "split": "train"},
        stats=stats,
        pipeline_options={"prep": recorded.to_json(), "beam": options, "files": len(files)},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    remove_output(tmp)
    _write_manifest(cfg, manifest)
    return manifest


def sample_documents(cfg: PrepConfig, files: list[str], chars: Optional[int] = None):
    """Cleaned documents from every file in turn, up to `chars` (default `sentencepiece_sample_chars`) in all.

    Only the part of a file the sample needs is read (no whole-file check; a damaged file ends its part of the
    sample where the damage is: the pipeline itself refuses or counts it).
    """
    budget = max(1, (chars or cfg.sentencepiece_sample_chars) // max(1, len(files)))
    lenient = dataclasses.replace(cfg, on_decode_error="skip")
    for path in files:
        taken = 0
        for _, text, _ in cleaned_documents(path, lenient, None, verify=False):
            text = text[: budget - taken]
            yield text
            taken += len(text)
            if taken >= budget:
                break


ESTIMATE_SAMPLE_CHARS = 256_000
ESTIMATE_SAMPLE_FILES = 16


def estimate_shards(cfg: PrepConfig, tokenizer, files: list[tuple[str, int]], token_dtype: str) -> int:
    """Train shards for `shard_rows` / `shard_mb`, from the rows and tokens per input byte of a sample.

    The sample is ~256k characters from at most 16 files spread over the list (not a pass over the corpus).
    With `shard_mb`, an uncompressed input too small to fill one shard (even at two tokens per byte,
    which covers the specials of short rows) gets one shard without sampling.
    """
    if cfg.num_shards:
        return cfg.num_shards
    row_bytes = np.dtype(token_dtype).itemsize + (0 if cfg.packing == "causal" else 1)
    packed = any(is_packed(p) for p, _ in files)
    if not cfg.shard_rows and not packed and 2 * sum(size for _, size in files) * row_bytes <= cfg.shard_mb * (1 << 20):
        return 1
    step = max(1, -(-len(files) // ESTIMATE_SAMPLE_FILES))
    sample = list(sample_documents(cfg, [p for p, _ in files[::step]], ESTIMATE_SAMPLE_CHARS))
    sample_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in sample) or 1
    lengths = [len(ids) for ids, _ in tokenizer.encode_batch(sample)] if sample else [0]
    width = cfg.max_seq_len - (0 if cfg.packing == "causal" else 2)
    rows = sum(-(-n // width) for n in lengths) if cfg.packing == "document" else sum(lengths) / width
    scale = sum(size for _, size in files) * (4.0 if packed else 1.0) / sample_bytes  # compressed input: ~4x the bytes as text
    est_rows, est_tokens = rows * scale, sum(lengths) * scale
    if cfg.shard_rows:
        return max(1, int(np.ceil(est_rows / cfg.shard_rows)))
    return max(1, int(np.ceil(est_tokens * row_bytes / (cfg.shard_mb * (1 << 20)))))


def _train_tokenizer(cfg: PrepConfig, files: list[str]):
    """Train a sentencepiece model on the launcher (in a temporary directory) and hold it as bytes.

    The workers get the bytes inside the DoFn; the model is saved as OUTPUT/tokenizer/spiece.model
    (the path it is known by; it is written there with the rest of the dataset, when complete).
    """
    import tempfile

    from data_prep.sentencepiece_tok import MODEL_FILE, SentencePieceTokenizer, train_sentencepiece

    log.info("training a sentencepiece model (vocab %d) on up to %d characters of the corpus", cfg.train_sentencepiece, cfg.sentencepiece_sample_chars)
    with tempfile.TemporaryDirectory(prefix="distill-prep-spm-") as tmp:
        model = train_sentencepiece(sample_documents(cfg, files), cfg.train_sentencepiece, os.path.join(tmp, "spiece"))
        with open(model, "rb") as handle:
            model_bytes = handle.read()
    name = os.path.join(cfg.output, mf.TOKENIZER_DIR, MODEL_FILE)
    return SentencePieceTokenizer(name, cfg.max_piece_chars, cfg.packing, model_bytes=model_bytes)


def run_prep(cfg: PrepConfig, beam_args: Optional[list[str]] = None, workers: int = 0) -> mf.Manifest:
    """Check inputs and output, run the pipeline into a staging directory (remote: the empty output prefix),
    write the manifest, then publish; on failure remove what was written and leave `--output` as it was."""
    t0 = time.time()
    if not 3 <= cfg.max_seq_len <= 1 << 20:
        raise PrepInputError(f"--max-seq-len {cfg.max_seq_len} must be at least 3")
    if not 0 <= cfg.validation_fraction < 1:
        raise PrepInputError(f"--validation-fraction {cfg.validation_fraction} must be in [0, 1)")
    inputs = list_inputs(cfg.inputs)
    if cfg.packing not in PACKING_MODES:
        raise PrepInputError(f"--packing {cfg.packing!r} is not one of {', '.join(PACKING_MODES)}")
    if cfg.min_seq_len > cfg.max_seq_len:
        raise PrepInputError(f"--min-seq-len {cfg.min_seq_len} is larger than --max-seq-len {cfg.max_seq_len}; lower it")
    if cfg.train_sentencepiece and cfg.tokenizer:
        raise PrepInputError("--train-sentencepiece trains a new tokenizer; drop --tokenizer (or drop --train-sentencepiece to use yours)")
    check_output(cfg.output, cfg.overwrite, cfg.inputs, [f.path for f in inputs], cfg.tokenizer)  # before the slow tokenizer load
    tokenizer = None if cfg.train_sentencepiece else load_tokenizer(cfg.tokenizer, cfg.max_piece_chars, cfg.packing)
    with claim_output(cfg.output, cfg.overwrite, cfg.inputs, [f.path for f in inputs], cfg.tokenizer) as work_dir:
        manifest = _prepare(cfg, dataclasses.replace(cfg, output=work_dir), tokenizer, inputs, beam_args or [], workers, t0)
    log.info("wrote %s in %.1fs", cfg.output, time.time() - t0)
    return manifest


def _prepare(cfg: PrepConfig, work: PrepConfig, tokenizer, inputs: list, beam_args: list[str], workers: int, t0: float) -> mf.Manifest:
    """Everything `run_prep` writes, into `work.output`; `cfg` is what the manifest records."""
    files = [(f.path, f.size) for f in inputs]
    if cfg.train_sentencepiece:
        tokenizer = _train_tokenizer(cfg, [path for path, _ in files])
        cfg, work = dataclasses.replace(cfg, tokenizer=tokenizer.path), dataclasses.replace(work, tokenizer=tokenizer.path)
    token_dtype = token_dtype_for(tokenizer.vocab_size)
    input_bytes = sum(size for _, size in files)
    num_shards = estimate_shards(work, tokenizer, files, token_dtype)
    workers = choose_workers(workers, files)
    options = beam_options(work, beam_args, workers)
    runner = local_runner(options)
    mode = ("in-process" if workers == 1 else f"{workers} worker processes") if runner is not None else "runner from the Beam options"
    log.info("%d input files, %.1f MB; tokenizer %s (vocab %d); %d train shards; %s", len(files), input_bytes / 1e6, cfg.tokenizer,
             tokenizer.vocab_size, num_shards, mode)
    beam_recorded = options.get_all_options(drop_default=True)
    if runner is not None:
        beam_recorded["runner"] = "FnApiRunner"
    with beam.Pipeline(runner=runner, options=options) as pipeline:
        build_pipeline(pipeline, work, [path for path, _ in files], tokenizer.payload(), tokenizer.vocab_size, token_dtype, num_shards,
                       spill=runner is not None, dedup_partitions=dedup_partitions(input_bytes), stamps=[(f.size, f.mtime) for f in inputs])
    log.info("pipeline finished in %.1fs; verifying shards", time.time() - t0)
    return finalize(work, tokenizer, files, token_dtype, beam_recorded, recorded=cfg)
