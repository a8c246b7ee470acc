"""Settings of one `distill-prep` run, on the config mechanism every command shares (kd_common/config.py):
`--config prep.yaml`, `key=value` overrides and the flags below (`--max-seq-len 128`, `--no-dedup`, ...),
every field bounded and documented, every rule checked in one pass."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from kd_common.config import Bool, Float, Int, Str, section, setting


@section
class PrepConfig:
    inputs: list[Str] = setting(
        help="files, directories or globs (.txt, .jsonl, .parquet; .gz/.bz2/.xz/.zst compressed), on any Beam "
        "filesystem (local, gs://, s3://, hdfs://)",
        flag="--input",
    )
    output: Str = setting(help="new directory for the prepared dataset (built beside it, moved into place when complete)")
    tokenizer: Str = setting("", "the teacher's Hugging Face tokenizer directory, or a sentencepiece .model file")
    train_sentencepiece: Int = setting(
        0,
        "instead of --tokenizer: train a sentencepiece (unigram) model of this vocabulary size on a "
        "corpus sample; saved in OUTPUT/tokenizer/",
        ge=0,
    )
    max_seq_len: Int = setting(128, "tokens per sequence including [CLS] and [SEP]", ge=3, le=1 << 20)
    min_seq_len: Int = setting(12, "drop shorter sequences (DistilBERT dropped <= 11 tokens)", ge=1)
    packing: Literal["document", "full_sentences", "causal"] = setting(
        "document",
        "document: [CLS] window [SEP] within one document; full_sentences: across documents with [SEP] between them "
        "(RoBERTa); causal: GPT-2 style, EOS after each document, windows of exactly max_seq_len, each document's first token "
        "flagged (doc_start: the trainer keeps attention and positions within documents)",
    )
    doc_split: Literal["line", "paragraph"] = setting("line", ".txt documents: one per line, or blank-line separated paragraphs")
    text_field: Str = setting("text", "field of .jsonl records / column of .parquet files holding the text")
    normalization: Literal["NFC", "NFKC", "none"] = setting("NFC", "Unicode normalisation of every document")
    dedup: Bool = setting(True, "drop exact-duplicate documents (same text after cleaning) across the corpus, counted as 'duplicate'")
    validation_fraction: Float = setting(0.01, "share of documents held out, by text hash", ge=0, lt=1)
    max_unk_fraction: Float = setting(0.5, "drop sequences with a larger share of unknown tokens", ge=0, le=1)
    num_shards: Int = setting(0, "train shards; 0 = from shard_rows / shard_mb and a sample of the corpus", ge=0)
    shard_rows: Int = setting(0, "target rows per shard, estimated from a corpus sample; 0 = use shard_mb", ge=0)
    shard_mb: Int = setting(128, "target MB of token data per shard (uncompressed ids + flags)", ge=1)
    batch_size: Int = setting(256, "documents per tokenizer call", ge=1)
    batch_chars: Int = setting(1_000_000, "... or fewer documents when they hold this many characters", ge=1)
    workers: Int = setting(
        0, "local runner worker processes; 0 = automatic (in-process below 16 MB of input, else one per CPU, at most one per file)", ge=0
    )
    on_decode_error: Literal["error", "skip"] = setting(
        "error", "invalid UTF-8 / bad JSON lines, binary, truncated or corrupt files: stop, or count and skip"
    )
    overwrite: Bool = setting(False, "replace --output if it holds a prepared dataset, once the new one is complete (not on object stores)")
    seed: Int = setting(0, "salt of the train/validation split hash and of the shuffle into shards", ge=0)
    max_line_bytes: Int = setting(4 << 20, "longer lines are read in pieces, never whole (data_prep/sources.py)", ge=1024)
    max_piece_chars: Int = setting(100_000, "long documents are tokenized in whitespace-aligned pieces of this size", ge=100)
    sentencepiece_sample_chars: Int = setting(50_000_000, "characters of cleaned documents a sentencepiece model is trained on", ge=1)
    extra: dict[str, Any] = setting({}, "free-form notes recorded in the manifest")

    def problems(self) -> list[str]:
        """The cross-field rules of a prep run, each written once."""
        p = []
        if not self.inputs:
            p.append("--input needs at least one file, directory or glob")
        if self.min_seq_len > self.max_seq_len:
            p.append(f"--min-seq-len {self.min_seq_len} is larger than --max-seq-len {self.max_seq_len}; lower it")
        if self.train_sentencepiece and self.tokenizer:
            p.append("--train-sentencepiece trains a new tokenizer; drop --tokenizer (or drop --train-sentencepiece to use yours)")
        if not self.train_sentencepiece and not self.tokenizer:
            p.append("pass --tokenizer DIR_OR_MODEL, or --train-sentencepiece VOCAB_SIZE to train one")
        return p

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
