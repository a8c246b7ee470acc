"""distill-prep's command line on bad input, and the tokenizer travelling inside the pipeline to worker processes
and a fresh interpreter (the in-process data-prep tests are tests/unit/test_data_prep.py)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
from support import BIN
from support import private_tmpdir as _private_tmpdir

from data_prep.config import PrepConfig
from data_prep.manifest import load_manifest
from data_prep.tokenization import load_tokenizer


def _cli(*args):
    proc = subprocess.run([os.path.join(BIN, "distill-prep"), *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr.strip().splitlines()


def test_cli_bad_input(tmp_path, tokenizer_dir, corpus_dir, monkeypatch):
    scratch = _private_tmpdir(tmp_path, monkeypatch)  # every run below, failed or not, must leave it empty
    out = tmp_path / "out"
    code, err = _cli("--input", str(tmp_path / "nothing*.txt"), "--tokenizer", tokenizer_dir, "--output", str(out))
    assert code == 2 and err == [
        f"distill-prep: error: --input '{tmp_path / 'nothing*.txt'}' matches no files; check the path or glob (quote globs so the shell does not expand them)"
    ]
    code, err = _cli("--input", corpus_dir, "--tokenizer", corpus_dir, "--output", str(out))
    assert code == 2 and len(err) == 1 and "holds no tokenizer files" in err[0]
    assert not out.exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, err = _cli("--input", corpus_dir, "--tokenizer", tokenizer_dir, "--output", str(existing))
    assert code == 2 and len(err) == 1 and "already holds data" in err[0] and "--overwrite" in err[0]
    assert os.listdir(existing) == ["keep.txt"]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"a fine line of text with enough words to keep it as a sequence\nbroken \xff\xfe bytes\n" * 3)
    code, err = _cli("--input", str(bad), "--tokenizer", tokenizer_dir, "--output", str(out), "--workers", "2")
    assert code == 2 and len(err) == 1, err
    assert "a.txt line 2: invalid UTF-8" in err[0] and "--on-decode-error skip" in err[0]
    assert not out.exists(), "a failed run leaves no output (and so no manifest)"
    code, _ = _cli(
        "--input",
        str(bad),
        "--tokenizer",
        tokenizer_dir,
        "--output",
        str(out),
        "--workers",
        "1",
        "--on-decode-error",
        "skip",
        "--min-seq-len",
        "3",
    )
    assert code == 0
    manifest = load_manifest(str(out))
    assert manifest.stats["dropped"]["invalid_utf8"]["documents"] == 3
    assert manifest.stats["documents_read"] == 3

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("\n\n   \n")
    code, err = _cli("--input", str(empty), "--tokenizer", tokenizer_dir, "--output", str(tmp_path / "o2"), "--workers", "1")
    assert code == 2 and len(err) == 1 and "no text found" in err[0]
    assert not (tmp_path / "o2").exists()
    assert os.listdir(scratch) == [], "failed and finished runs leave no temporary files or directories"


def test_tokenizer_travels_inside_the_pipeline(tmp_path, corpus_dir, tokenizer_dir, monkeypatch):
    """Workers rebuild the tokenizer from bytes pickled with the DoFn, never from the --tokenizer path.

    HF directory: the pipeline is built, the directory deleted, then the job runs in 2 worker processes.
    Sentencepiece .model: the DoFn is pickled, the file deleted, and a fresh interpreter runs it.
    """
    import apache_beam as beam
    from apache_beam.internal import pickler

    from data_prep.pipeline import TokenizeAndPack, build_pipeline
    from data_prep.runner import beam_options, local_runner
    from data_prep.sentencepiece_tok import train_sentencepiece

    docs = list(
        dict.fromkeys(
            line.strip() for line in open(os.path.join(corpus_dir, sorted(os.listdir(corpus_dir))[0]), encoding="utf-8") if line.strip()
        )
    )[:300]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(docs) + "\n")

    tok_dir = str(tmp_path / "hf_tokenizer")
    shutil.copytree(tokenizer_dir, tok_dir)
    out = str(tmp_path / "out")
    cfg = PrepConfig(
        inputs=[str(corpus)], tokenizer=tok_dir, output=out, max_seq_len=32, min_seq_len=3, validation_fraction=0.0, dedup=False
    )
    tok = load_tokenizer(tok_dir)
    options = beam_options(cfg, [], workers=2)
    pipeline = beam.Pipeline(runner=local_runner(options), options=options)
    build_pipeline(pipeline, cfg, [str(corpus)], tok.payload(), tok.vocab_size, "uint16", 1)
    shutil.rmtree(tok_dir)
    pipeline.run().wait_until_finish()
    rows = [
        tuple(r) for path in sorted((tmp_path / "out" / "train").iterdir()) for r in pq.read_table(path).column("input_ids").to_pylist()
    ]
    expected = [
        tuple([tok.cls_id] + ids[s : s + 30] + [tok.sep_id])
        for ids in tok.tokenizer(docs, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), 30)
    ]
    assert collections.Counter(rows) == collections.Counter(expected)

    model = train_sentencepiece(docs, 400, str(tmp_path / "spm"))
    sp_tok = load_tokenizer(model)
    fn = TokenizeAndPack(dataclasses.replace(cfg, tokenizer=model), sp_tok.payload(), sp_tok.vocab_size)
    (tmp_path / "dofn.pkl").write_bytes(pickler.dumps(fn))
    os.unlink(model)
    script = (
        "import json, sys\n"
        "from apache_beam.internal import pickler\n"
        "from data_prep.rows import RowBlock\n"
        "fn = pickler.loads(open(sys.argv[1], 'rb').read())\n"
        "fn.setup(); fn.start_bundle()\n"
        "out = [o for d in sys.argv[2:] for o in fn.process(d)] + [getattr(o, 'value', o) for o in fn.finish_bundle()]\n"
        "print(json.dumps([ids.tolist() for o in out if isinstance(o, RowBlock) for ids, _ in o.rows()]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "dofn.pkl"), *docs[:5]], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = [[sp_tok.cls_id] + ids[s : s + 30] + [sp_tok.sep_id] for ids in sp_tok.sp.encode(docs[:5]) for s in range(0, len(ids), 30)]
    assert sorted(json.loads(proc.stdout.strip().splitlines()[-1])) == sorted(w for w in want if len(w) >= 3)
