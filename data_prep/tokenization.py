"""Tokenizer adapters: text in, (token ids without specials, word-start flags) out.

One interface so that the pipeline does not care which kind of tokenizer the teacher uses.
"""

from __future__ import annotations

import logging
import os
import zlib

import numpy as np

from data_prep.errors import PrepInputError
from data_prep.manifest import TokenizerIdentity, tokenizer_identity
from data_prep.sentencepiece_tok import SentencePieceTokenizer
from data_prep.tokenizer_base import REQUIRED_SPECIALS, TOKENIZER_FILES, TokenizerPayload, has_tokenizer_files, split_pieces  # noqa: F401
from kd_common.errors import first_line
from kd_common.hf_dirs import LOCAL_ONLY, RemoteCodeError, refuse_remote_code


def _fast_backend(tokenizer_json: str):
    """A `tokenizers.Tokenizer` from its JSON, with truncation and padding off (we cut sequences ourselves)."""
    from tokenizers import Tokenizer  # tokenizers: not at start-up

    backend = Tokenizer.from_str(tokenizer_json)
    backend.no_truncation()
    backend.no_padding()
    return backend


class HFTokenizer:
    """A Hugging Face fast tokenizer loaded from a local directory (on workers: from its tokenizer.json text).

    Encoding goes straight to the `tokenizers` backend, as `PreTrainedTokenizerFast.__call__` does
    (`encode_batch(..., add_special_tokens=False)`), so workers need neither the directory nor `transformers`.
    """

    kind = "hf-fast"

    def __init__(self, path: str, max_piece_chars: int = 100_000, packing: str = "document"):
        self.path = path
        self.max_piece_chars = max_piece_chars
        self.packing = packing
        self.tokenizer = load_hf_tokenizer(path, packing)
        self._json = self.tokenizer.backend_tokenizer.to_str()
        self._init_backend(self._json, {role: getattr(self.tokenizer, f"{role}_token_id") for role in ("cls", "sep", "eos", "unk")})
        self.vocab_size = len(self.tokenizer)

    def check_max_seq_len(self, max_seq_len: int) -> None:
        """A PrepInputError when --max-seq-len exceeds the tokenizer's own model_max_length (the model's positions)."""
        limit = self.tokenizer.max_seq_len_limit
        if limit is not None and max_seq_len > limit:
            raise PrepInputError(
                f"--max-seq-len {max_seq_len} is longer than --tokenizer {self.path!r} allows (model_max_length {limit} in its "
                f"tokenizer_config.json: the model has that many positions); pass --max-seq-len {limit} or less"
            )

    def _init_backend(self, tokenizer_json: str, ids: dict) -> None:
        self.backend = _fast_backend(tokenizer_json)
        self.cls_id, self.sep_id, self.eos_id, self.unk_id = ids["cls"], ids["sep"], ids["eos"], ids["unk"]
        self.continues_word = _continuation_table(self.backend)

    @classmethod
    def from_payload(cls, payload: TokenizerPayload) -> "HFTokenizer":
        self = cls.__new__(cls)
        self.path, self.max_piece_chars, self.packing, self.tokenizer = payload.source, payload.max_piece_chars, payload.packing, None
        self._json = zlib.decompress(payload.data).decode("utf-8")
        self._init_backend(self._json, dict(payload.special_ids))
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        return self

    def payload(self) -> TokenizerPayload:
        ids = (("cls", self.cls_id), ("sep", self.sep_id), ("eos", self.eos_id), ("unk", self.unk_id))
        return TokenizerPayload(self.kind, zlib.compress(self._json.encode("utf-8"), 9), self.path, ids, self.max_piece_chars, self.packing)

    def identity(self) -> TokenizerIdentity:
        return tokenizer_identity(self.tokenizer, self.path, self.kind)

    def save(self, directory: str) -> None:
        self.tokenizer.save_pretrained(directory)

    def encode_batch(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids (no special tokens) and word-start flags for each text."""
        return self.finish_batch(self.start_batch(texts))

    def start_batch(self, texts: list[str]):
        """The part of `encode_batch` that runs in Rust without the GIL (on all cores); `finish_batch` completes it.

        TokenizeAndPack runs this on a helper thread while its own thread finishes the previous batch."""
        limit = self.max_piece_chars
        if all(len(text) <= limit for text in texts):  # the common case: one piece per text
            return self._encode(texts) if texts else [], None, len(texts)
        pieces, owner = split_pieces(texts, limit)
        return (self._encode(pieces) if pieces else []), owner, len(texts)

    def finish_batch(self, started) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, word starts) per text from what `start_batch` returned."""
        encodings, owner, count = started
        if owner is None:
            return [self._ids_and_starts(enc) for enc in encodings]
        ids_parts: list[list[np.ndarray]] = [[] for _ in range(count)]
        start_parts: list[list[np.ndarray]] = [[] for _ in range(count)]
        for enc, i in zip(encodings, owner):
            ids, starts = self._ids_and_starts(enc)
            ids_parts[i].append(ids)
            start_parts[i].append(starts)
        return [
            (np.concatenate(a) if a else np.zeros(0, np.int64), np.concatenate(b) if b else np.zeros(0, bool))
            for a, b in zip(ids_parts, start_parts)
        ]

    def _needs_word_ids(self) -> bool:
        return self.packing != "causal" and self.continues_word is None

    def _encode(self, texts: list[str]):
        """Encodings without special tokens; without character offsets (faster) unless word ids are needed."""
        if self._needs_word_ids() or not hasattr(self.backend, "encode_batch_fast"):
            return self.backend.encode_batch(texts, add_special_tokens=False)
        return self.backend.encode_batch_fast(texts, add_special_tokens=False)

    def _ids_and_starts(self, encoding) -> tuple[np.ndarray, np.ndarray]:
        if self._needs_word_ids():
            return _ids_and_starts(encoding)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        if self.packing == "causal":  # no word starts: the causal packer flags document starts itself
            return ids, np.ones(len(ids), dtype=bool)
        return ids, ~self.continues_word[ids]


def _continuation_table(backend):
    """For a WordPiece model: a flag per id, True for the tokens that continue a word ('##' prefix); else None.

    WordPiece splits every pre-tokenized word into a first piece without the prefix and continuation
    pieces with it, so a token starts a word exactly when it is not a continuation piece, which is what
    the word ids say (tests/unit/test_data_prep.py compares the two) without asking the tokenizer for offsets.
    """
    from tokenizers import models  # tokenizers: not at start-up

    model = backend.model
    prefix = getattr(model, "continuing_subword_prefix", None) if isinstance(model, models.WordPiece) else None
    if not prefix:
        return None
    table = np.zeros(backend.get_vocab_size(with_added_tokens=True), dtype=bool)
    for token, index in backend.get_vocab(with_added_tokens=False).items():
        table[index] = token.startswith(prefix)
    return table


def _ids_and_starts(encoding) -> tuple[np.ndarray, np.ndarray]:
    """One fast-tokenizer encoding as (int64 ids, word-start flags): a token starts a word when its word
    index differs from the previous token's, or when it belongs to no word (None -> NaN, unequal to all)."""
    ids = np.asarray(encoding.ids, dtype=np.int64)
    words = np.array(encoding.word_ids, dtype=np.float64)
    starts = np.ones(len(ids), dtype=bool)
    starts[1:] = words[1:] != words[:-1]
    return ids, starts


def load_hf_tokenizer(path: str, packing: str = "document"):
    """AutoTokenizer from a local directory, or a one-line PrepInputError saying what is wrong."""
    from transformers import AutoTokenizer  # torch: not at start-up
    from transformers.utils import logging as hf_logging  # transformers: not at start-up

    hf_logging.set_verbosity_error()
    if not os.path.isdir(path):
        raise PrepInputError(
            f"--tokenizer {path!r} is not a local directory or .model file; pass the teacher's directory (with tokenizer.json / vocab files) "
            f"or a sentencepiece .model, "
            f"downloaded beforehand: this job never downloads"
        )
    if not has_tokenizer_files(path):
        raise PrepInputError(
            f"--tokenizer {path!r} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); pass the teacher's tokenizer directory"
        )
    try:
        refuse_remote_code(path, "--tokenizer")
    except RemoteCodeError as exc:
        raise PrepInputError(str(exc)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **LOCAL_ONLY)
    except Exception as exc:
        first = first_line(exc)
        raise PrepInputError(
            f"--tokenizer {path!r} is not a loadable tokenizer ({first[:200]}); pass a directory written by save_pretrained"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise PrepInputError(f"--tokenizer {path!r} is a slow (Python) tokenizer; save it with its tokenizer.json (a fast tokenizer)")
    missing = [name for name in REQUIRED_SPECIALS[packing] if getattr(tokenizer, f"{name}_token_id", None) is None]
    if missing and packing == "causal":
        raise PrepInputError(
            f"--tokenizer {path!r} has no EOS token; causal packing puts EOS between documents, use the teacher's GPT-2-style tokenizer"
        )
    if missing:
        raise PrepInputError(
            f"--tokenizer {path!r} has no {', '.join(missing)} token(s); masked-LM data needs [CLS], [SEP], [PAD] and [MASK] equivalents "
            f"(for a GPT-2-style teacher pass --packing causal)"
        )
    limit = tokenizer.model_max_length
    tokenizer.max_seq_len_limit = int(limit) if isinstance(limit, (int, float)) and 0 < limit < 10**12 else None  # not the 1e30 "unset"
    tokenizer.model_max_length = 10**12  # we cut sequences ourselves; silence the length warning
    return tokenizer


def load_tokenizer(path: str, max_piece_chars: int = 100_000, packing: str = "document"):
    """The tokenizer adapter for `path`: a sentencepiece `.model` file, or an HF fast tokenizer directory."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if path.endswith(".model") and ("://" in path or os.path.isfile(path)):  # read once here, through Beam's filesystems
        return SentencePieceTokenizer(path, max_piece_chars, packing)
    return HFTokenizer(path, max_piece_chars, packing)


def load_payload(payload: TokenizerPayload):
    """The tokenizer adapter rebuilt from a payload's bytes alone (on a worker)."""
    if payload.kind == "sentencepiece":
        return SentencePieceTokenizer(payload.source, payload.max_piece_chars, payload.packing, model_bytes=zlib.decompress(payload.data))
    return HFTokenizer.from_payload(payload)
