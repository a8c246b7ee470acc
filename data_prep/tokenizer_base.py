"""What every tokenizer adapter shares: the special tokens each packing needs, cutting long texts into pieces,
and the payload that carries a tokenizer to the workers as bytes. (The adapters: data_prep/tokenization.py for
Hugging Face fast tokenizers, data_prep/sentencepiece_tok.py for sentencepiece models; both import only this.)"""

from __future__ import annotations

import os
from dataclasses import dataclass

REQUIRED_SPECIALS = {"document": ("cls", "sep", "pad", "mask"), "full_sentences": ("cls", "sep", "pad", "mask"), "causal": ("eos",)}
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def has_tokenizer_files(path: str) -> bool:
    """True if `path` holds a vocabulary (transformers would otherwise build an empty tokenizer)."""
    return any(os.path.exists(os.path.join(path, name)) for name in TOKENIZER_FILES)


def _split_long(text: str, max_chars: int) -> list[str]:
    """Cut `text` at whitespace into pieces of at most ~max_chars (a word longer than that stays whole)."""
    if len(text) <= max_chars:
        return [text]
    pieces = []
    start = 0
    while start < len(text):
        end = start + max_chars
        if end >= len(text):
            pieces.append(text[start:])
            break
        cut = text.rfind(" ", start, end)
        if cut <= start:
            cut = text.find(" ", end)
            if cut == -1:
                pieces.append(text[start:])
                break
        pieces.append(text[start:cut])
        start = cut + 1
    return [p for p in pieces if p]


def split_pieces(texts: list[str], max_chars: int) -> tuple[list[str], list[int]]:
    """Every text cut by `_split_long`, as (pieces, index of the text each piece came from)."""
    pieces: list[str] = []
    owner: list[int] = []
    for i, text in enumerate(texts):
        for piece in _split_long(text, max_chars):
            pieces.append(piece)
            owner.append(i)
    return pieces, owner


@dataclass(frozen=True)
class TokenizerPayload:
    """A tokenizer as bytes, read once on the launcher and pickled with the DoFns that use it.

    Workers (Dataflow, Flink, Spark, the DirectRunner's processes) rebuild the tokenizer from these
    bytes in `setup()`: they never read the launcher's `--tokenizer` path (or the sentencepiece model
    `--train-sentencepiece` trained on the launcher's disk).
    """

    kind: str  # "hf-fast": zlib(tokenizer.json text) / "sentencepiece": zlib(.model bytes)
    data: bytes
    source: str  # the path it was read from, for messages and the manifest
    special_ids: tuple = ()  # hf-fast: ((role, id or None), ...) for cls, sep, eos, unk
    max_piece_chars: int = 100_000
    packing: str = "document"
