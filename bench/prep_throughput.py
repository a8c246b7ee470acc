"""distill-prep throughput, side by side with a plain single-process `datasets.map(batched=True)` loop.

    python bench/prep_throughput.py                     # WikiText-2 valid (../shared/data) or the demo corpus
    python bench/prep_throughput.py --input corpus/ --tokenizer /models/bert-base-uncased --workers 2
    python bench/prep_throughput.py --huge-line-mb 100  # one 100 MB single-line document: time, memory, accounting

Both sides do the same work on the same corpus, at size S and at 10xS: read documents, tokenize with the
same fast tokenizer, pack into [CLS] ... [SEP] windows, and (pipeline only) clean, dedup, shuffle, shard,
count and write the manifest. Prints tokens/s, the ratios, and the pipeline's peak RSS (the driver plus
its Beam worker processes), for distill-prep's default mode and with worker processes forced.
"""
from __future__ import annotations

import argparse
import os
import resource
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


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all its threads, and its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def baseline(files: list[str], tokenizer_dir: str, max_seq_len: int, batch_size: int) -> tuple[int, float, float]:
    """Plain datasets.map over the same documents: tokenize + pack, one process. Returns (tokens, seconds, CPU seconds)."""
    import datasets

    from data_prep.packing import pack_document
    from data_prep.tokenization import load_tokenizer

    datasets.disable_progress_bars()
    start, cpu = time.time(), cpu_seconds()
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
    return tokens, time.time() - start, cpu_seconds() - cpu


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


def run_pipeline(files, tokenizer, out, args, workers):
    """run_prep in this process (Beam's chatter, also its worker processes', to a log file).

    Returns (manifest, seconds, peak RSS, CPU seconds of this process and the worker processes)."""
    from data_prep.cli import stderr_to_file
    from data_prep.config import PrepConfig
    from data_prep.pipeline import run_prep

    cfg = PrepConfig(inputs=files, tokenizer=tokenizer, output=out, max_seq_len=args.max_seq_len, batch_size=args.batch_size)
    start, cpu = time.time(), cpu_seconds()
    with PeakRSS() as rss, stderr_to_file(os.path.join(os.path.dirname(out), "beam.log")):
        manifest = run_prep(cfg, workers=workers)
    seconds, cpu = time.time() - start, cpu_seconds() - cpu
    shutil.rmtree(out, ignore_errors=True)
    return manifest, seconds, rss.peak, cpu


def written_tokens(manifest) -> int:
    return sum(s.tokens for s in manifest.splits.values())


def mode_name(manifest) -> str:
    beam = manifest.pipeline_options["beam"]
    n = beam.get("direct_num_workers", 1)
    return f"{n} worker processes" if beam.get("direct_running_mode") == "multi_processing" else "in-process"


def huge_line(args, work: str) -> int:
    """Issue point 9 at full size: one single-line document of `--huge-line-mb` MB through distill-prep."""
    from data_prep.tokenization import load_tokenizer

    source = args.input or ([SHARED_WIKITEXT] if os.path.exists(SHARED_WIKITEXT) else None)
    if source is None:
        from distill.demo_assets import write_corpus

        source = write_corpus(os.path.join(work, "corpus"))
    words = [w for f in source for line in open(f, encoding="utf-8") for w in line.split()]
    tokenizer = args.tokenizer or _default_tokenizer(source, work)
    path = os.path.join(work, "huge.txt")
    target = args.huge_line_mb * 1_000_000
    with open(path, "w", encoding="utf-8") as handle:  # numbered runs of words, so no two pieces are duplicates
        written, run = 0, 0
        while written < target:
            chunk = f"{run} " + " ".join(words[(run * 997) % len(words):][:1000]) + " "
            handle.write(chunk)
            written += len(chunk.encode("utf-8"))
            run += 1
        handle.write("\n")
    size = os.path.getsize(path)
    load_tokenizer(tokenizer)  # import transformers before the clock starts, as the other figures do
    manifest, seconds, peak, cpu = run_pipeline([path], tokenizer, os.path.join(work, "out_huge"), args, args.workers)
    st = manifest.stats
    ok = st["tokens_read"] == st["content_tokens_written"] + st["tokens_dropped"]
    print(f"one line of {size / 1e6:,.1f} MB ({size:,} bytes, no newline inside), distill-prep {mode_name(manifest)}, max line piece 4 MB:")
    print(f"  wall {seconds:.1f}s, CPU {cpu:.1f}s, peak RSS (driver + workers) {peak / 2**20:,.0f} MiB, {written_tokens(manifest):,} tokens written "
          f"({written_tokens(manifest) / seconds:,.0f} tokens/s)")
    print(f"  documents (line pieces) read {st['documents_read']:,}; tokens read {st['tokens_read']:,} = written {st['content_tokens_written']:,} "
          f"+ dropped {st['tokens_dropped']:,} ({', '.join(f'{k}: {v}' for k, v in sorted(st['dropped'].items()))}): {'holds' if ok else 'BROKEN'}")
    return 0 if ok else 1


def _default_tokenizer(files, work):
    from distill.demo_assets import train_wordpiece_tokenizer

    return train_wordpiece_tokenizer(files, os.path.join(work, "tok"), vocab_size=8000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="text files (default: WikiText-2 valid, else the demo corpus)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: WordPiece 8000 trained on the input)")
    parser.add_argument("--workers", type=int, default=0, help="distill-prep --workers (default 0: its automatic choice)")
    parser.add_argument("--compare-workers", type=int, default=os.cpu_count() or 1,
                        help="also run with this many worker processes forced, at both sizes (0: skip)")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--scale", type=int, default=10, help="memory check: also run on this many distinct copies of the corpus")
    parser.add_argument("--huge-line-mb", type=int, default=0, help="instead: run distill-prep on one single-line document of this many MB")
    args = parser.parse_args()
    from distill.demo_assets import write_corpus

    work = tempfile.mkdtemp(prefix="prep_bench_")
    try:
        if args.huge_line_mb:
            return huge_line(args, work)
        files = args.input
        if not files:
            files = [SHARED_WIKITEXT] if os.path.exists(SHARED_WIKITEXT) else write_corpus(os.path.join(work, "corpus"))
        tokenizer = args.tokenizer or _default_tokenizer(files, work)
        from data_prep.tokenization import load_tokenizer

        load_tokenizer(tokenizer)  # import transformers once, before any clock starts (both sides load the tokenizer on the clock)
        big_files = scaled_corpus(files, args.scale, os.path.join(work, "big"))
        sizes = {"S": files, f"{args.scale}xS": big_files}
        rows = []
        for name, inputs in sizes.items():
            base_tokens, base_seconds, base_cpu = baseline(inputs, tokenizer, args.max_seq_len, args.batch_size)
            runs = [run_pipeline(inputs, tokenizer, os.path.join(work, "out"), args, args.workers)]
            if args.compare_workers:
                runs.append(run_pipeline(inputs, tokenizer, os.path.join(work, "out"), args, args.compare_workers))
            for manifest, *_ in runs:
                if written_tokens(manifest) != base_tokens:
                    print(f"note ({name}): pipeline wrote {written_tokens(manifest)} tokens, the baseline {base_tokens} (cleaning changed some documents)")
            rows.append((name, inputs, base_tokens, base_seconds, base_cpu, runs))

        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end (other jobs share the CPUs)")
        for name, inputs, base_tokens, base_seconds, base_cpu, runs in rows:
            size = sum(os.path.getsize(f) for f in inputs)
            print(f"corpus {name}: {len(inputs)} file(s), {size / 1e6:.1f} MB, {runs[0][0].stats['documents_read']:,} documents, {base_tokens:,} tokens written")
            base_rate = base_tokens / base_seconds
            base_per_cpu = base_tokens / base_cpu
            print(f"  datasets.map (1 process, tokenize + pack):  {base_rate:>10,.0f} tokens/s  ({base_seconds:.1f}s; CPU {base_cpu:.1f}s, {base_per_cpu:,.0f} tokens/CPU-s)")
            for i, (manifest, seconds, peak, cpu) in enumerate(runs):
                label = "default" if i == 0 else f"--workers {args.compare_workers}"
                rate = written_tokens(manifest) / seconds
                print(f"  distill-prep {label} ({mode_name(manifest)}; + clean/dedup/shuffle/shard/count/manifest): "
                      f"{rate:>10,.0f} tokens/s  ({seconds:.1f}s, peak RSS {peak / 2**20:,.0f} MiB; CPU {cpu:.1f}s, "
                      f"{written_tokens(manifest) / cpu:,.0f} tokens/CPU-s)  ratio {rate / base_rate:.2f}x (per CPU-s {written_tokens(manifest) / cpu / base_per_cpu:.2f}x)")
        for i in range(len(rows[0][5])):
            label = "default" if i == 0 else f"--workers {args.compare_workers}"
            print(f"peak RSS {rows[1][0]} / S ({label}): {rows[1][5][i][2] / rows[0][5][i][2]:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
