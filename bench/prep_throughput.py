"""distill-prep throughput, side by side with a plain single-process `datasets.map(batched=True)` loop.

    python bench/prep_throughput.py                     # WikiText-2 valid (../shared/data) or the demo corpus
    python bench/prep_throughput.py --input corpus/ --tokenizer /models/bert-base-uncased --workers 2

Both sides do the same work: read documents, tokenize with the same fast tokenizer, pack into
[CLS] ... [SEP] windows, and (pipeline only) shard, count and write the manifest. Prints tokens/s,
the ratio, and the pipeline's peak RSS (the driver plus its Beam worker processes).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_WIKITEXT = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2", "valid.txt")


class PeakRSS:
    """Poll the resident memory of this process and its children; keep the peak of the sum."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me] + me.children(recursive=True):
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def baseline(files: list[str], tokenizer_dir: str, max_seq_len: int, batch_size: int) -> tuple[int, float]:
    """Plain datasets.map over the same documents: tokenize + pack, one process. Returns (tokens, seconds)."""
    import datasets

    from data_prep.packing import pack_document
    from data_prep.tokenization import load_tokenizer

    datasets.disable_progress_bars()
    start = time.time()
    tok = load_tokenizer(tokenizer_dir)
    docs = list(dict.fromkeys(line.strip() for path in files for line in open(path, encoding="utf-8") if line.strip()))  # same dedup

    def tokenize_and_pack(batch):
        rows = {"input_ids": [], "word_start": []}
        for ids, starts in tok.encode_batch(batch["text"]):
            for seq in pack_document(ids, starts, tok.cls_id, tok.sep_id, tok.unk_id, max_seq_len, 12, 0.5).sequences:
                rows["input_ids"].append(seq.ids.tolist())
                rows["word_start"].append(seq.word_start.tolist())
        return rows

    ds = datasets.Dataset.from_dict({"text": docs}).map(tokenize_and_pack, batched=True, batch_size=batch_size, remove_columns=["text"])
    tokens = sum(len(x) for x in ds["input_ids"])
    return tokens, time.time() - start


def scaled_corpus(files: list[str], copies: int, directory: str) -> list[str]:
    """`copies` distinct copies of the corpus (each line prefixed with its copy number, so dedup keeps them)."""
    os.makedirs(directory, exist_ok=True)
    out = []
    for c in range(copies):
        path = os.path.join(directory, f"copy{c:03d}.txt")
        with open(path, "w", encoding="utf-8") as handle:
            for f in files:
                for line in open(f, encoding="utf-8"):
                    handle.write(f"{c} {line}" if line.strip() else line)
        out.append(path)
    return out


def run_pipeline(files, tokenizer, out, args):
    from data_prep.config import PrepConfig
    from data_prep.pipeline import run_prep

    cfg = PrepConfig(inputs=files, tokenizer=tokenizer, output=out, max_seq_len=args.max_seq_len, batch_size=args.batch_size)
    start = time.time()
    with PeakRSS() as rss:
        manifest = run_prep(cfg, workers=args.workers)
    return manifest, time.time() - start, rss.peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="text files (default: WikiText-2 valid, else the demo corpus)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: WordPiece 8000 trained on the input)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--scale", type=int, default=10, help="memory check: also run on this many distinct copies of the corpus")
    args = parser.parse_args()
    from distill.demo_assets import train_wordpiece_tokenizer, write_corpus

    work = tempfile.mkdtemp(prefix="prep_bench_")
    try:
        files = args.input
        if not files:
            files = [SHARED_WIKITEXT] if os.path.exists(SHARED_WIKITEXT) else write_corpus(os.path.join(work, "corpus"))
        tokenizer = args.tokenizer or train_wordpiece_tokenizer(files, os.path.join(work, "tok"), vocab_size=8000)
        size = sum(os.path.getsize(f) for f in files)

        base_tokens, base_seconds = baseline(files, tokenizer, args.max_seq_len, args.batch_size)
        manifest, seconds, peak = run_pipeline(files, tokenizer, os.path.join(work, "out"), args)
        tokens = sum(s.tokens for s in manifest.splits.values())
        if tokens != base_tokens:
            print(f"note: pipeline wrote {tokens} tokens, the baseline {base_tokens} (cleaning changed some documents)")
        big_files = scaled_corpus(files, args.scale, os.path.join(work, "big"))
        big_manifest, big_seconds, big_peak = run_pipeline(big_files, tokenizer, os.path.join(work, "out_big"), args)
        big_tokens = sum(s.tokens for s in big_manifest.splits.values())
        print(f"corpus S: {', '.join(os.path.basename(f) for f in files)} ({size / 1e6:.1f} MB, {manifest.stats['documents_read']:,} documents, {tokens:,} tokens written)")
        print(f"machine: {os.cpu_count()} CPUs; pipeline: DirectRunner multi_processing, {args.workers} workers")
        print(f"datasets.map (1 process, tokenize + pack):      {base_tokens / base_seconds:>12,.0f} tokens/s  ({base_seconds:.1f}s)")
        print(f"distill-prep S (Beam, + clean/dedup/shuffle/shard/count/manifest): {tokens / seconds:>12,.0f} tokens/s  ({seconds:.1f}s, peak RSS {peak / 2**20:,.0f} MiB)")
        print(f"distill-prep {args.scale}xS ({big_tokens:,} tokens):  {big_tokens / big_seconds:>12,.0f} tokens/s  ({big_seconds:.1f}s, peak RSS {big_peak / 2**20:,.0f} MiB)")
        print(f"ratio distill-prep / datasets.map (S): {(tokens / seconds) / (base_tokens / base_seconds):.2f}x")
        print(f"ratio distill-prep / datasets.map ({args.scale}xS throughput vs S baseline): {(big_tokens / big_seconds) / (base_tokens / base_seconds):.2f}x")
        print(f"peak RSS {args.scale}xS / S: {big_peak / peak:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
