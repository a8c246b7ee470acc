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
