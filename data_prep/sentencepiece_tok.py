"""Sentencepiece `.model` tokenizers behind the same interface as the HF adapter, and training one.

Ids always come from the `sentencepiece` library itself. The dataset's `tokenizer/` directory holds
the `.model` file and a Hugging Face fast tokenizer built from its pieces and scores, so that the
trainer loads it with `AutoTokenizer` (same vocabulary, same special ids, same identity hash).
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from data_prep.errors import PrepInputError
from data_prep.manifest import TokenizerIdentity, tokenizer_identity
from data_prep.tokenizer_base import REQUIRED_SPECIALS, TokenizerPayload, split_pieces

SPECIAL_PIECES = {  # role -> pieces that play it, first found wins
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
    "pad": ("<pad>", "[PAD]"),
    "unk": ("<unk>", "[UNK]"),
    "eos": ("</s>", "<|endoftext|>"),
    "bos": ("<s>",),
}
TRAINED_SPECIALS = ["[CLS]", "[SEP]", "[MASK]"]
MODEL_FILE = "spiece.model"


def _read_model(path: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    try:
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            return handle.read()
    except Exception as exc:
        raise PrepInputError(
            f"--tokenizer {path!r} cannot be read ({str(exc).splitlines()[0][:120]}); pass a readable .model file"
        ) from None


def _load_processor(path: str, model_bytes: bytes):
    import sentencepiece as spm  # sentencepiece: not at start-up

    try:
        return spm.SentencePieceProcessor(model_proto=model_bytes)
    except Exception as exc:
        raise PrepInputError(
            f"--tokenizer {path!r} is not a sentencepiece model ({str(exc).splitlines()[0][:120]}); pass a .model file or a tokenizer directory"
        ) from None


class SentencePieceTokenizer:
    """A sentencepiece `.model` file: encode_batch -> (ids, word-start flags), like HFTokenizer.

    The model is held as bytes (`model_bytes`, else read from `path` once), so that `payload()` can ship
    it to the workers inside the DoFn.
    """

    kind = "sentencepiece"

    def __init__(self, path: str, max_piece_chars: int = 100_000, packing: str = "document", model_bytes: bytes | None = None):
        self.path = path
        self.max_piece_chars = max_piece_chars
        self.packing = packing
        self.model_bytes = _read_model(path) if model_bytes is None else model_bytes
        self.sp = _load_processor(path, self.model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
        self.ids = {}
        for role, names in SPECIAL_PIECES.items():
            for name in names:
                i = self.sp.piece_to_id(name)
                if self.sp.id_to_piece(i) == name and (name != "<unk>" or i == self.sp.unk_id()):
                    self.ids[role] = i
                    break
        missing = [r for r in REQUIRED_SPECIALS[packing] if r not in self.ids]
        if missing:
            raise PrepInputError(
                f"--tokenizer {path!r} has no {', '.join(missing)} piece(s) ({', '.join(SPECIAL_PIECES[missing[0]])}); "
                f"use a model trained with them as user_defined_symbols, or --train-sentencepiece"
            )
        self.cls_id, self.sep_id = self.ids.get("cls"), self.ids.get("sep")
        self.eos_id, self.unk_id = self.ids.get("eos"), self.ids.get("unk")
        specials = set(self.ids.values())
        self._starts_word = np.array([p.startswith("\u2581") or i in specials for i, p in enumerate(pieces)], dtype=bool)
        self._hf = None

    def encode_batch(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.finish_batch(self.start_batch(texts))

    def start_batch(self, texts: list[str]):
        """Every text's pieces encoded in one sentencepiece call (its own threads, one per CPU)."""
        pieces, owner = split_pieces(texts, self.max_piece_chars)
        return (self.sp.encode(pieces, num_threads=os.cpu_count() or 1) if pieces else []), owner, len(texts)

    def finish_batch(self, started) -> list[tuple[np.ndarray, np.ndarray]]:
        encoded, owner, count = started
        parts: list[list] = [[] for _ in range(count)]
        for ids, i in zip(encoded, owner):
            parts[i].append(np.asarray(ids, np.int64))
        out = []
        for text_parts in parts:
            ids = np.concatenate(text_parts) if text_parts else np.zeros(0, np.int64)
            starts = self._starts_word[ids] if len(ids) else np.zeros(0, bool)
            if len(starts):
                starts[0] = True
            out.append((ids, starts))
        return out

    def hf_tokenizer(self):
        """A PreTrainedTokenizerFast with the model's pieces, scores and special tokens."""
        if self._hf is None:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # tokenizers: not at start-up
            from transformers import PreTrainedTokenizerFast  # transformers: not at start-up

            vocab = [(self.sp.id_to_piece(i), float(self.sp.get_score(i))) for i in range(self.vocab_size)]
            tok = Tokenizer(models.Unigram(vocab, unk_id=self.sp.unk_id()))
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
            tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
            names = {f"{role}_token": self.sp.id_to_piece(i) for role, i in self.ids.items()}
            self._hf = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
            self._hf.model_max_length = 10**12
        return self._hf

    def payload(self):
        return TokenizerPayload(self.kind, zlib.compress(self.model_bytes, 9), self.path, (), self.max_piece_chars, self.packing)

    def identity(self) -> TokenizerIdentity:
        return tokenizer_identity(self.hf_tokenizer(), self.path, self.kind)

    def save(self, directory: str) -> None:
        self.hf_tokenizer().save_pretrained(directory)
        with open(os.path.join(directory, MODEL_FILE), "wb") as handle:
            handle.write(self.model_bytes)


def train_sentencepiece(texts, vocab_size: int, model_prefix: str, model_type: str = "unigram") -> str:
    """Train a sentencepiece model on an iterable of documents; returns the `.model` path.

    Specials: <pad>=0, <unk>=1, </s>=2 (EOS) and [CLS], [SEP], [MASK] as user-defined pieces, so the
    model serves masked-LM and causal packing alike. No extra normalisation (the pipeline already
    applied NFC/NFKC), so the Hugging Face copy in the dataset encodes the same way.
    """
    import sentencepiece as spm  # sentencepiece: not at start-up

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            unk_id=1,
            eos_id=2,
            bos_id=-1,
            user_defined_symbols=TRAINED_SPECIALS,
            normalization_rule_name="identity",
            character_coverage=0.9995,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
            hard_vocab_limit=False,
        )
    except RuntimeError as exc:
        raise PrepInputError(
            f"--train-sentencepiece {vocab_size}: training failed ({str(exc).splitlines()[0][:160]}); use a smaller vocabulary or a larger corpus"
        ) from None
    return model_prefix + ".model"
