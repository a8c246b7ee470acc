"""The distill-prep driver: check inputs and output, choose the runner, run the pipeline (data_prep/pipeline.py),
re-open every shard to record rows, tokens and sha256, check the token accounting, write `manifest.json` last.

Locally all of it goes into a staging directory beside `--output`, moved into place only when complete
(data_prep/output_dir.py); a failed run removes it and leaves `--output` as it was.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from data_prep import manifest as mf
from data_prep.config import PrepConfig
from data_prep.documents import cleaned_documents, dedup_partitions
from data_prep.errors import PrepInputError
from data_prep.output_dir import TMP_DIR, check_output, claim_output, is_remote, remove_output
from data_prep.pipeline import SPLIT_NAMES, build_pipeline, token_dtype_for
from data_prep.runner import beam_options, check_runner, choose_workers, local_runner
from data_prep.sentencepiece_tok import MODEL_FILE, SentencePieceTokenizer, train_sentencepiece
from data_prep.sources import is_packed, list_inputs
from data_prep.stats import structure
from data_prep.storage import save_tokenizer, sha256, shard_infos, write_manifest
from data_prep.tokenization import load_tokenizer

log = logging.getLogger("distill-prep")


def finalize(
    cfg: PrepConfig, tokenizer, files: list[tuple[str, int]], token_dtype: str, options: dict, recorded: Optional[PrepConfig] = None
) -> mf.Manifest:
    """Re-open the shards in `cfg.output`, check the accounting, write manifest.json last (atomically). Any Beam filesystem.

    `recorded`: the settings the manifest records (the user's `--output`, not the staging directory written to).
    """
    recorded = recorded or cfg
    tmp = os.path.join(cfg.output, TMP_DIR)
    with FileSystems.open(os.path.join(tmp, "stats.json"), compression_type="uncompressed") as handle:
        flat = json.loads(handle.read())
    stats = structure(flat)
    stats["input_bytes"] = sum(size for _, size in files)
    if stats.get("documents_read", 0) == 0:
        raise PrepInputError(
            f"no text found in --input {' '.join(cfg.inputs)} (all files empty or every document or file skipped); check the inputs"
        )
    splits = {name: info for name in SPLIT_NAMES if (info := mf.SplitInfo(shard_infos(cfg, name))).shards}
    for name, info in splits.items():
        expected = stats["splits"].get(name, {})
        if info.rows != expected.get("sequences", 0) or info.tokens != expected.get("content_tokens", 0) + expected.get(
            "special_tokens", 0
        ):
            raise RuntimeError(
                f"shards of {name!r} hold {info.rows} rows / {info.tokens} tokens, the pipeline counted {expected}; output is inconsistent"
            )
    if stats["tokens_read"] != stats["content_tokens_written"] + stats["tokens_dropped"]:
        raise RuntimeError(
            f"token accounting broken: read {stats['tokens_read']} != written {stats['content_tokens_written']} + dropped {stats['tokens_dropped']}"
        )
    if "train" not in splits or splits["train"].rows == 0:
        raise PrepInputError(
            "no training sequences were produced (every sequence was dropped); lower --min-seq-len or check the corpus and tokenizer"
        )
    save_tokenizer(tokenizer, cfg)
    manifest = mf.Manifest(
        tokenizer=tokenizer.identity(),
        max_seq_len=cfg.max_seq_len,
        packing=cfg.packing,
        token_dtype=token_dtype,
        splits=splits,
        token_counts={"path": mf.TOKEN_COUNTS_FILE, "sha256": sha256(os.path.join(cfg.output, mf.TOKEN_COUNTS_FILE)), "split": "train"},
        stats=stats,
        pipeline_options={"prep": recorded.to_json(), "beam": options, "files": len(files)},
        document_starts=mf.DOCUMENT_START_COLUMN if cfg.packing == "causal" else None,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    remove_output(tmp)
    write_manifest(cfg, manifest)
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
    row_bytes = np.dtype(token_dtype).itemsize + 1  # a token id and its flag byte (word or document start)
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
    log.info(
        "training a sentencepiece model (vocab %d) on up to %d characters of the corpus",
        cfg.train_sentencepiece,
        cfg.sentencepiece_sample_chars,
    )
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
    problems = cfg.problems()  # the field bounds were checked when cfg was built
    if problems:
        raise PrepInputError("; ".join(problems))
    inputs = list_inputs(cfg.inputs)
    check_output(cfg.output, cfg.overwrite, cfg.inputs, [f.path for f in inputs], cfg.tokenizer)  # before the slow tokenizer load
    tokenizer = None if cfg.train_sentencepiece else load_tokenizer(cfg.tokenizer, cfg.max_piece_chars, cfg.packing)
    if hasattr(tokenizer, "check_max_seq_len"):
        tokenizer.check_max_seq_len(cfg.max_seq_len)
    with claim_output(cfg.output, cfg.overwrite, cfg.inputs, [f.path for f in inputs], cfg.tokenizer) as work_dir:
        manifest = _prepare(cfg, dataclasses.replace(cfg, output=work_dir), tokenizer, inputs, beam_args or [], workers or cfg.workers, t0)
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
    if runner is None:  # another runner's workers do not share the launcher's working directory
        check_runner(options, [path for path, _ in files] + [work.output])
        files = [(path if is_remote(path) else os.path.abspath(path), size) for path, size in files]
        work = work if is_remote(work.output) else dataclasses.replace(work, output=os.path.abspath(work.output))
    mode = ("in-process" if workers == 1 else f"{workers} worker processes") if runner is not None else "runner from the Beam options"
    log.info(
        "%d input files, %.1f MB; tokenizer %s (vocab %d); %d train shards; %s",
        len(files),
        input_bytes / 1e6,
        cfg.tokenizer,
        tokenizer.vocab_size,
        num_shards,
        mode,
    )
    beam_recorded = options.get_all_options(drop_default=True)
    if runner is not None:
        beam_recorded["runner"] = "FnApiRunner"
    pipeline = beam.Pipeline(runner=runner, options=options)
    try:
        with pipeline:
            build_pipeline(
                pipeline,
                work,
                [path for path, _ in files],
                tokenizer.payload(),
                tokenizer.vocab_size,
                token_dtype,
                num_shards,
                spill=runner is not None,
                dedup_partitions=dedup_partitions(input_bytes),
                stamps=[(f.size, f.mtime) for f in inputs],
            )
    finally:  # Beam removes its temp dir only after a run that was not interrupted
        shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)
    log.info("pipeline finished in %.1fs; verifying shards", time.time() - t0)
    return finalize(work, tokenizer, files, token_dtype, beam_recorded, recorded=cfg)
