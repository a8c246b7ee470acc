"""Fixtures for tests/e2e only (assets made by real CLIs, once per session: a test that changes one works on a copy, and
writes beside one only under a name of its own); every test under tests/e2e/ carries the `e2e` marker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from support import BIN, byte_level_bpe, cache, run, run_log, save_teacher

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    """Mark every test collected from this folder `e2e` (so `-m "not e2e"` selects exactly tests/unit)."""
    for item in items:
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, corpus_dir, tokenizer_dir) -> str:
    """The demo corpus prepared by distill-prep (Beam, 2 workers) at max_seq_len 64."""
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


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, corpus_dir):
    """The first 1500 lines of each demo corpus file."""
    out = tmp_path_factory.mktemp("small_corpus")
    for name in sorted(os.listdir(corpus_dir)):
        with open(os.path.join(corpus_dir, name)) as handle:
            lines = handle.read().splitlines()[:1500]
        (out / name).write_text("\n".join(lines) + "\n")
    return str(out)


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory, small_corpus):
    """A byte-level BPE tokenizer (<|endoftext|> as BOS/EOS/pad) and the small corpus prepared for causal LMs with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(sorted(os.path.join(small_corpus, f) for f in os.listdir(small_corpus)), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(str(root / "tokenizer"))
    data = str(root / "data")
    run(
        [
            os.path.join(BIN, "distill-prep"),
            "--input",
            small_corpus,
            "--tokenizer",
            str(root / "tokenizer"),
            "--output",
            data,
            "--max-seq-len",
            "48",
            "--packing",
            "causal",
            "--validation-fraction",
            "0.05",
            "--workers",
            "1",
        ]
    )
    return tokenizer, data


@pytest.fixture(scope="session")
def assets(tmp_path_factory, corpus_dir):
    """A byte-level BPE tokenizer (vocab 320), ~100 rows of causal data (48 tokens), a tiny random Llama teacher."""
    root = tmp_path_factory.mktemp("cache_assets")
    corpus, tokenizer = byte_level_bpe(corpus_dir, root, lines=40)
    data = str(root / "data")
    run_log(
        [
            os.path.join(BIN, "distill-prep"),
            "--input",
            str(corpus),
            "--tokenizer",
            str(root / "tokenizer"),
            "--output",
            data,
            "--max-seq-len",
            "48",
            "--packing",
            "causal",
            "--validation-fraction",
            "0.05",
            "--workers",
            "1",
            "--num-shards",
            "2",
        ]
    )
    teacher = save_teacher("llama", tokenizer, str(root / "teacher"), vocab_rows=len(tokenizer) + 8)
    return {"root": root, "data": data, "teacher": teacher, "tokenizer": tokenizer, "vocab": len(tokenizer)}


@pytest.fixture(scope="session")
def small_cache(assets):
    out = assets["root"] / "cache_k8"
    cache(assets, out, "--workers", "1", "--k", "8")
    return out
