"""Issue 13, data prep: nothing lost, nothing half-read taken as complete, nothing read from outside a dataset.

Every fault is made for real (damaged files written with gzip/bz2/lzma/zstandard/pyarrow, real directories, the
real `distill-prep` in a subprocess where the whole command matters) and the test checks what the user keeps.
"""

from __future__ import annotations

import bz2
import gzip
import os
import re
import shutil
import subprocess

import pytest
from support import BIN
from support import file_tree as _tree
from support import flip_middle_bytes as _flip

from data_prep.config import PrepConfig
from data_prep.driver import run_prep
from data_prep.errors import PrepInputError
from data_prep.manifest import load_manifest


def _prep(tmp_path, *args):
    """Run the real CLI with a private TMPDIR; (exit code, stderr lines, stdout). Every run must leave TMPDIR empty."""
    scratch = tmp_path / "tmpdir"
    scratch.mkdir(exist_ok=True)
    proc = subprocess.run(
        [os.path.join(BIN, "distill-prep"), *args], capture_output=True, text=True, timeout=300, env=dict(os.environ, TMPDIR=str(scratch))
    )
    assert os.listdir(scratch) == [], f"the run left {os.listdir(scratch)} in the temp directory"
    return proc.returncode, proc.stderr.strip().splitlines(), proc.stdout


def test_failed_overwrite_keeps_the_old_dataset_bit_identical(tmp_path, prepared, lines, tokenizer_dir):
    """Before: --overwrite deleted OUTPUT first, so any failure left the old dataset gone. Now the new one is built beside
    it and swapped in only when complete: failures (in the reader, and after the whole pipeline ran) change nothing."""
    out = tmp_path / "data"
    shutil.copytree(prepared, out)
    before = _tree(out)
    (tmp_path / "blank.txt").write_text("\n   \n")
    good = "\n".join(lines[:50]).encode()
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(good)[:-20])
    for bad_input, message in ((tmp_path / "blank.txt", "no text found"), (tmp_path / "cut.txt.gz", "is truncated")):
        code, err, _ = _prep(tmp_path, "--input", str(bad_input), "--tokenizer", tokenizer_dir, "--output", str(out), "--overwrite")
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert _tree(out) == before, "a failed --overwrite run changed the old dataset"
        assert sorted(os.listdir(tmp_path)) == ["blank.txt", "cut.txt.gz", "data", "tmpdir"], "staging left behind"

    (tmp_path / "new.txt").write_text("\n".join(lines[100:]) + "\n")
    run_prep(
        PrepConfig(inputs=[str(tmp_path / "new.txt")], tokenizer=tokenizer_dir, output=str(out), max_seq_len=32, overwrite=True), workers=1
    )
    assert load_manifest(str(out)).max_seq_len == 32 and _tree(out) != before
    assert sorted(os.listdir(tmp_path)) == ["blank.txt", "cut.txt.gz", "data", "new.txt", "tmpdir"], "staging or old copy left behind"


def test_output_overlapping_an_input_is_refused_with_the_corpus_intact(tmp_path, lines, tokenizer_dir):
    """Before: `--output CORPUS_DIR --overwrite` deleted the corpus. Now an output that is, contains or is inside an input
    (a file, a directory, a `**` glob's directory, the tokenizer) is refused before anything is written."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(lines) + "\n")
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    before, tok_before = _tree(corpus), _tree(tok)

    code, err, _ = _prep(tmp_path, "--input", str(corpus), "--tokenizer", str(tok), "--output", str(corpus), "--overwrite")
    assert code == 2 and len(err) == 1 and f"--output '{corpus}' is --input '{corpus}'" in err[0], err

    cases = [
        ([str(corpus / "a.txt")], str(corpus), f"--output '{corpus}' contains --input '{corpus / 'a.txt'}'"),
        ([str(corpus)], str(corpus / "prepared"), "is inside --input"),
        ([str(corpus / "**")], str(corpus / "prepared"), "is inside the directory that --input"),
        ([str(tmp_path / "*" / "a.txt")], str(corpus), "contains --input file"),
        ([str(corpus)], str(tok / "prepared"), "is inside --tokenizer"),
    ]
    for inputs, output, message in cases:
        with pytest.raises(PrepInputError, match=re.escape(message) if "'" in message else message):
            run_prep(PrepConfig(inputs=inputs, tokenizer=str(tok), output=output, overwrite=True))
    assert _tree(corpus) == before and _tree(tok) == tok_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tmpdir", "tok"]


def test_truncated_and_corrupt_compressed_inputs(tmp_path, lines, tokenizer_dir):
    """Before: a truncated .gz was read up to the cut (rc 0, the cut line kept as a document), a truncated .bz2 beside a good
    file added 0 documents silently, a corrupt .gz gave a zlib traceback and an empty output dir. Now: one line naming the
    file, rc 2, no output; with --on-decode-error skip the damaged file is left out whole and counted."""
    text = ("\n".join(lines) + "\n").encode()
    good = tmp_path / "good.txt"
    good.write_text("\n".join(lines[:100]) + "\n")
    damaged = {
        "truncated_gz": ("cut.txt.gz", gzip.compress(text)[: len(gzip.compress(text)) // 2], "is truncated"),
        "truncated_bz2": ("cut.txt.bz2", bz2.compress(text)[:-100], "is truncated"),
        "corrupt_gz": ("bad.txt.gz", _flip(gzip.compress(text)), "is corrupt"),
    }
    out = tmp_path / "out"
    runs = {}
    for name, (file_name, data, message) in damaged.items():  # the three runs side by side, to save time
        folder = tmp_path / name
        folder.mkdir()
        (folder / file_name).write_bytes(data)
        shutil.copy(good, folder / "good.txt")
        command = [
            os.path.join(BIN, "distill-prep"),
            "--input",
            str(folder),
            "--tokenizer",
            tokenizer_dir,
            "--output",
            str(tmp_path / f"out_{name}" / "data"),
        ]
        runs[name] = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=str(tmp_path))
        )
    for name, (file_name, _, message) in damaged.items():
        err = runs[name].communicate(timeout=300)[1].strip().splitlines()
        assert runs[name].returncode == 2 and len(err) == 1, err
        assert err[0].startswith(f"distill-prep: error: {tmp_path / name / file_name} {message}") and "--on-decode-error skip" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt_gz", "good.txt", "truncated_bz2", "truncated_gz"], (
        "output or staging left"
    )

    code, err, stdout = _prep(
        tmp_path,
        "--input",
        *(str(tmp_path / name) for name in damaged),
        "--tokenizer",
        tokenizer_dir,
        "--output",
        str(out),
        "--on-decode-error",
        "skip",
        "--min-seq-len",
        "3",
    )
    assert code == 0, err
    stats = load_manifest(str(out)).stats
    assert stats["dropped"]["truncated_file"] == {"files": 2, "tokens": 0}
    assert stats["dropped"]["corrupt_file"] == {"files": 1, "tokens": 0}
    assert stats["files"] == 6 and stats["documents_read"] == 300, "only the three good copies were read"
    assert stats["dropped"]["duplicate"]["documents"] == 200
    assert stats["tokens_read"] == stats["content_tokens_written"] + stats["tokens_dropped"]
    assert "truncated_file" in stdout and "corrupt_file" in stdout
