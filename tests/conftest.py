"""Fixtures shared by tests/unit and tests/e2e: every test asset is built locally (no network), once per session.

Plain helpers (paths, the argument builder, the tiny teacher factory) live in tests/support.py; e2e-only fixtures
in tests/e2e/conftest.py."""

from __future__ import annotations

import os
import sys

import pytest
import support

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
    """The demo corpus: text shipped with CPython, one document per line, two files."""
    from distill.tools.demo_assets import write_corpus

    out = str(tmp_path_factory.mktemp("corpus"))
    write_corpus(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> str:
    """A WordPiece tokenizer (vocab 2000) trained on the demo corpus, saved as an HF fast tokenizer."""
    from distill.tools.demo_assets import train_wordpiece_tokenizer

    out = str(tmp_path_factory.mktemp("tokenizer"))
    files = sorted(os.path.join(corpus_dir, f) for f in os.listdir(corpus_dir))
    return train_wordpiece_tokenizer(files, out, vocab_size=2000)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir) -> str:
    """A randomly initialised 4-layer BERT masked LM with the tokenizer, saved with save_pretrained."""
    from distill.tools.demo_assets import save_random_bert_teacher

    out = str(tmp_path_factory.mktemp("teacher"))
    return save_random_bert_teacher(tokenizer_dir, out, layers=4, hidden=64, heads=4, intermediate=128, max_positions=128)


@pytest.fixture
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def make_teacher():
    """The tiny teacher factory (support.tiny_teacher): a BERT or causal-family teacher, in memory or saved with its tokenizer."""
    return support.tiny_teacher


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory, corpus_dir) -> str:
    """A GPT-2-style byte-level BPE tokenizer (vocab 1000, <|endoftext|> as BOS/EOS, no [CLS]/[MASK]/unk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(sorted(os.path.join(corpus_dir, f) for f in os.listdir(corpus_dir)), trainer)
    out = str(tmp_path_factory.mktemp("gpt2tok"))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def twin_teachers(tmp_path_factory, tokenizer_dir):
    """Two random BERT teachers of one shape (same config.json, same file sizes), different weights (seeds 0 and 1); identity-by-content tests, unit and e2e."""
    from distill.tools.demo_assets import save_random_bert_teacher

    root = tmp_path_factory.mktemp("twins")
    shape = dict(layers=4, hidden=64, heads=4, intermediate=128, max_positions=128)
    a = save_random_bert_teacher(tokenizer_dir, str(root / "a"), seed=0, **shape)
    b = save_random_bert_teacher(tokenizer_dir, str(root / "b"), seed=1, **shape)
    return a, b


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer_dir) -> str:
    """A 1-layer BERT with the session's WordPiece tokenizer (random weights); the finetune tests, unit and e2e."""
    from distill.tools.demo_assets import save_random_bert_teacher

    out = str(tmp_path_factory.mktemp("tiny_bert"))
    return save_random_bert_teacher(tokenizer_dir, out, layers=1, hidden=32, heads=2, intermediate=64, max_positions=64)
