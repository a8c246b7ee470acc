"""Settings of one `distill-prep` run."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass
class PrepConfig:
    inputs: list[str]  # files, directories or globs (any Beam filesystem)
    tokenizer: str  # Hugging Face fast tokenizer directory or sentencepiece .model ("" with train_sentencepiece)
    output: str  # new (or empty) directory
    max_seq_len: int = 128  # tokens per sequence, [CLS] and [SEP] included
    min_seq_len: int = 12  # shorter sequences are dropped (DistilBERT dropped <= 11 tokens)
    packing: Literal["document", "full_sentences", "causal"] = "document"  # see data_prep/packing.py
    doc_split: Literal["line", "paragraph"] = "line"  # how .txt files hold documents
    text_field: str = "text"  # field of .jsonl records / column of .parquet files that holds the text
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"  # Unicode normalisation before tokenization
    dedup: bool = True  # drop exact-duplicate documents (same text after cleaning) across the corpus
    validation_fraction: float = 0.01  # share of documents (by text hash) held out
    max_unk_fraction: float = 0.5  # sequences with a larger share of unknown tokens are dropped
    num_shards: int = 0  # train shards; 0 = from shard_rows / shard_mb and a sample of the corpus
    shard_rows: int = 0  # target rows per shard (approximate: estimated from a sample); 0 = use shard_mb
    shard_mb: int = 128  # target token data per shard in MB (uncompressed ids + flags)
    batch_size: int = 256  # documents per tokenizer call
    batch_chars: int = 1_000_000  # ... or fewer documents when they hold this many characters
    on_decode_error: Literal["error", "skip"] = "error"  # invalid UTF-8 / bad JSON lines: stop, or count and skip
    overwrite: bool = False
    seed: int = 0
    max_line_bytes: int = 4 << 20  # longer lines are read in pieces (never whole), see data_prep/sources.py
    max_piece_chars: int = 100_000  # long documents are tokenized in whitespace-aligned pieces of this size
    train_sentencepiece: int = 0  # > 0: train a sentencepiece model of this vocabulary size on a corpus sample
    sentencepiece_sample_chars: int = 50_000_000  # characters of cleaned documents the model is trained on
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
