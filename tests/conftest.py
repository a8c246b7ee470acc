"""Shared fixtures: every test asset is built locally (no network), once per session."""

from __future__ import annotations

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
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


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, corpus_dir, tokenizer_dir) -> str:
    """The demo corpus prepared by distill-prep (Beam, 2 workers) at max_seq_len 64."""
    import subprocess

    out = str(tmp_path_factory.mktemp("prepared") / "data")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "distill-prep"),
        "--input",
        corpus_dir,
        "--tokenizer",
        tokenizer_dir,
        "--output",
        out,
        "--max-seq-len",
        "64",
        "--validation-fraction",
        "0.05",
        "--workers",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def shared_data_path(*parts: str) -> str:
    """Path under ../shared/data, or skip the test (a user's fresh clone has no shared folder)."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (../shared/data only exists beside the team's checkout)")
    return path


@pytest.fixture
def python_exe() -> str:
    return sys.executable
