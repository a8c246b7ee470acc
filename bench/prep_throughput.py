"""distill-prep throughput and memory, side by side with a plain single-process `datasets.map(batched=True)` loop.

    python bench/prep_throughput.py                     # S = 10 distinct copies of WikiText-2 valid (11 MB), 10xS = 100 (112 MB)
    python bench/prep_throughput.py --copies 1 10       # quicker: 1.1 MB and 11 MB
    python bench/prep_throughput.py --input corpus/*.txt --tokenizer /models/bert-base-uncased
    python bench/prep_throughput.py --huge-line-mb 100  # one 100 MB single-line document: time, memory, accounting
    python bench/prep_throughput.py --runner portable --pipeline-only   # also on Beam's portable runner (Prism)

Every side does the same work on the same corpus: read the documents, tokenize them with the same fast
tokenizer (no special tokens, word-start flags), pack them into [CLS] ... [SEP] windows. The pipeline also
cleans, dedups, splits train/validation, shuffles, shards, counts and writes the manifest. Sides:

- `datasets.map` + tokenizer call: the plain loop, as Hugging Face's examples write it
  (`tokenizer(batch["text"], add_special_tokens=False)`, word ids from the BatchEncoding);
- `datasets.map` + adapter: the same loop calling distill-prep's own tokenizer adapter (its faster path), a
  stricter reference;
- distill-prep in-process (`--workers 1`) and with `--workers N` worker processes; the line of the mode that
  distill-prep picks by itself for that corpus is marked "default";
- with `--runner portable`: distill-prep through Beam's PortableRunner on a Prism job server with one EXTERNAL
  SDK worker pool (launch/portable_cluster.py, started once for the run); its peak RSS is the launcher's, and
  the worker pool's (pool + SDK harness) is printed beside it.

Each measurement runs in a fresh Python process that imports its libraries before its clock starts, and
reports wall seconds, CPU seconds (its threads and child processes) and its peak RSS (with its children).
Measurements are interleaved over `--rounds` rounds and the fastest of each is kept (the machine's speed
drifts), with the largest peak RSS seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_WIKITEXT = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2", "valid.txt")
SIDES = ("plain", "adapter", "pipeline", "workers", "portable")
LABELS = {
    "plain": "datasets.map + tokenizer call (plain loop)",
    "adapter": "datasets.map + distill-prep's tokenizer adapter",
    "pipeline": "distill-prep in-process (--workers 1)",
    "workers": "distill-prep --workers {n}",
    "portable": "distill-prep, PortableRunner on Prism + 1 worker pool",
}


class PeakRSS:
    """Poll the resident memory of this process and its children; keep the peak of the sum."""

    def __init__(self, interval: float = 0.05):
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


def _documents(files: list[str]) -> list[str]:
    return list(dict.fromkeys(line.strip() for path in files for line in open(path, encoding="utf-8") if line.strip()))  # same dedup


def _word_starts(word_ids):
    import numpy as np

    words = np.array(word_ids, dtype=np.float64)  # None -> NaN: a token of no word starts one
    starts = np.ones(len(words), dtype=bool)
    starts[1:] = words[1:] != words[:-1]
    return starts


def baseline(files: list[str], tokenizer_dir: str, max_seq_len: int, batch_size: int, adapter: bool) -> int:
    """datasets.map over the documents: tokenize + pack, one process. Returns the tokens written."""
    import datasets
    import numpy as np

    from data_prep.packing import pack_document
    from data_prep.tokenization import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer(tokenizer_dir)
    hf = tok.tokenizer

    def pack(rows, ids, starts):
        for seq in pack_document(ids, starts, tok.cls_id, tok.sep_id, tok.unk_id, max_seq_len, 12, 0.5).sequences:
            rows["input_ids"].append(seq.ids.tolist())
            rows["word_start"].append(seq.flags.tolist())

    def with_adapter(batch):
        rows = {"input_ids": [], "word_start": []}
        for ids, starts in tok.encode_batch(batch["text"]):
            pack(rows, ids, starts)
        return rows

    def plain(batch):
        rows = {"input_ids": [], "word_start": []}
        encoded = hf(batch["text"], add_special_tokens=False)
        for i, ids in enumerate(encoded["input_ids"]):
            pack(rows, np.asarray(ids, dtype=np.int64), _word_starts(encoded.word_ids(i)))
        return rows

    ds = datasets.Dataset.from_dict({"text": _documents(files)})
    ds = ds.map(with_adapter if adapter else plain, batched=True, batch_size=batch_size, remove_columns=["text"])
    return sum(len(x) for x in ds["input_ids"])


def run_pipeline(files, tokenizer, out, max_seq_len, batch_size, workers, beam_args=None):
    """run_prep (Beam's chatter, also its worker processes', to a log file). Returns (tokens written, manifest)."""
    from data_prep.cli import stderr_to_file
    from data_prep.config import PrepConfig
    from data_prep.driver import run_prep

    cfg = PrepConfig(inputs=files, tokenizer=tokenizer, output=out, max_seq_len=max_seq_len, batch_size=batch_size)
    with stderr_to_file(os.path.join(os.path.dirname(out), "beam.log")):
        manifest = run_prep(cfg, beam_args, workers=workers)
    shutil.rmtree(out, ignore_errors=True)
    return sum(s.tokens for s in manifest.splits.values()), manifest


def measure(args) -> int:
    """One side, in this fresh process: import first, then time. Prints one JSON line."""
    import importlib

    from data_prep.tokenization import load_tokenizer

    for module in ("datasets", "apache_beam.runners.portability.fn_api_runner.fn_runner", "data_prep.driver"):
        importlib.import_module(module)  # libraries load before the clock, for every side alike

    load_tokenizer(args.tokenizer)  # transformers and tokenizers imported
    files = sorted(os.path.join(args.corpus, f) for f in os.listdir(args.corpus))
    start, cpu = time.time(), cpu_seconds()
    with PeakRSS() as rss:
        extra = {}
        if args.measure in ("plain", "adapter"):
            tokens = baseline(files, args.tokenizer, args.max_seq_len, args.batch_size, adapter=args.measure == "adapter")
        else:
            workers = 1 if args.measure == "pipeline" else args.compare_workers
            beam_args = json.loads(args.beam_args) if args.measure == "portable" else None
            tokens, manifest = run_pipeline(
                files, args.tokenizer, os.path.join(args.scratch, "out"), args.max_seq_len, args.batch_size, workers, beam_args
            )
            beam = manifest.pipeline_options["beam"]
            extra = {
                "mode": beam["runner"]
                if args.measure == "portable"
                else f"{beam.get('direct_num_workers', 1)} worker processes"
                if beam.get("direct_running_mode") == "multi_processing"
                else "in-process",
                "documents": manifest.stats["documents_read"],
            }
    print(json.dumps({"tokens": tokens, "seconds": time.time() - start, "cpu": cpu_seconds() - cpu, "peak_rss": rss.peak, **extra}))
    return 0


def scaled_corpus(files: list[str], copies: int, directory: str) -> str:
    """A directory of `copies` distinct copies of the corpus (each line prefixed with its copy number, so dedup keeps them)."""
    os.makedirs(directory, exist_ok=True)
    for c in range(copies):
        with open(os.path.join(directory, f"copy{c:03d}.txt"), "w", encoding="utf-8") as handle:
            for f in files:
                for line in open(f, encoding="utf-8"):
                    handle.write(f"{c} {line}" if line.strip() else line)
    return directory


def _child(side: str, corpus: str, args, scratch: str, cluster=None) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--measure",
        side,
        "--corpus",
        corpus,
        "--tokenizer",
        args.tokenizer,
        "--scratch",
        scratch,
        "--max-seq-len",
        str(args.max_seq_len),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--compare-workers",
        str(args.compare_workers),
    ]
    pool_peak = [0]
    if side == "portable":
        cmd += ["--beam-args", json.dumps(cluster.beam_args())]
        done = threading.Event()

        def poll():  # the worker pool is not a child of the measuring process: its memory is sampled here
            while not done.is_set():
                total = 0
                for pid in cluster.pool_pids():
                    try:
                        total += psutil.Process(pid).memory_info().rss
                    except psutil.Error:
                        pass
                pool_peak[0] = max(pool_peak[0], total)
                done.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if side == "portable":
        done.set()
        poller.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{side} on {corpus} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "pool_rss": pool_peak[0]}


def huge_line(args, work: str) -> int:
    """Issue point 9 at full size: one single-line document of `--huge-line-mb` MB through distill-prep."""
    from data_prep.tokenization import load_tokenizer

    source = args.input or ([SHARED_WIKITEXT] if os.path.exists(SHARED_WIKITEXT) else None)
    if source is None:
        from distill.tools.demo_assets import write_corpus

        source = write_corpus(os.path.join(work, "corpus"))
    words = [w for f in source for line in open(f, encoding="utf-8") for w in line.split()]
    tokenizer = args.tokenizer or _default_tokenizer(source, work)
    path = os.path.join(work, "huge.txt")
    target = args.huge_line_mb * 1_000_000
    with open(path, "w", encoding="utf-8") as handle:  # numbered runs of words, so no two pieces are duplicates
        written, run = 0, 0
        while written < target:
            chunk = f"{run} " + " ".join(words[(run * 997) % len(words) :][:1000]) + " "
            handle.write(chunk)
            written += len(chunk.encode("utf-8"))
            run += 1
        handle.write("\n")
    size = os.path.getsize(path)
    load_tokenizer(tokenizer)  # import transformers before the clock starts
    start, cpu = time.time(), cpu_seconds()
    with PeakRSS() as rss:
        tokens, manifest = run_pipeline([path], tokenizer, os.path.join(work, "out_huge"), args.max_seq_len, args.batch_size, args.workers)
    seconds, cpu = time.time() - start, cpu_seconds() - cpu
    st = manifest.stats
    ok = st["tokens_read"] == st["content_tokens_written"] + st["tokens_dropped"]
    print(f"one line of {size / 1e6:,.1f} MB ({size:,} bytes, no newline inside), max line piece 4 MB:")
    print(
        f"  wall {seconds:.1f}s, CPU {cpu:.1f}s, peak RSS (driver + workers) {rss.peak / 2**20:,.0f} MiB, {tokens:,} tokens written ({tokens / seconds:,.0f} tokens/s)"
    )
    print(
        f"  documents (line pieces) read {st['documents_read']:,}; tokens read {st['tokens_read']:,} = written {st['content_tokens_written']:,} "
        f"+ dropped {st['tokens_dropped']:,} ({', '.join(f'{k}: {v}' for k, v in sorted(st['dropped'].items()))}): {'holds' if ok else 'BROKEN'}"
    )
    return 0 if ok else 1


def _default_tokenizer(files, work):
    from distill.tools.demo_assets import train_wordpiece_tokenizer

    return train_wordpiece_tokenizer(files, os.path.join(work, "tok"), vocab_size=8000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="text files (default: WikiText-2 valid, else the demo corpus)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: WordPiece 8000 trained on the input)")
    parser.add_argument(
        "--copies", type=int, nargs="+", default=[10, 100], help="corpus sizes, in distinct copies of the input (default: 10 100)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest of each side is kept")
    parser.add_argument("--workers", type=int, default=0, help="--huge-line-mb: distill-prep --workers (0: its automatic choice)")
    parser.add_argument(
        "--compare-workers", type=int, default=os.cpu_count() or 1, help="worker processes of the multi-process side (0: skip it)"
    )
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--pipeline-only", action="store_true", help="skip the datasets.map sides (memory at a large size, quicker)")
    parser.add_argument("--huge-line-mb", type=int, default=0, help="instead: run distill-prep on one single-line document of this many MB")
    parser.add_argument("--runner", choices=["local", "portable"], default="local", help="portable: also run the portable-runner side")
    parser.add_argument("--beam-args", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)

    work = tempfile.mkdtemp(prefix="prep_bench_")
    stack = contextlib.ExitStack()
    try:
        if args.huge_line_mb:
            return huge_line(args, work)
        files = args.input
        if not files:
            from distill.tools.demo_assets import write_corpus

            files = [SHARED_WIKITEXT] if os.path.exists(SHARED_WIKITEXT) else write_corpus(os.path.join(work, "corpus"))
        args.tokenizer = args.tokenizer or _default_tokenizer(files, work)
        sides = [s for s in SIDES if (s != "workers" or args.compare_workers) and not (args.pipeline_only and s in ("plain", "adapter"))]
        sides = [s for s in sides if s != "portable" or args.runner == "portable"]
        cluster = None
        if args.runner == "portable":
            from launch.portable_cluster import PortableCluster, prism_binary

            cluster = stack.enter_context(PortableCluster(prism=prism_binary(build=True), log_dir=work))
        results = {}
        for copies in args.copies:
            corpus = scaled_corpus(files, copies, os.path.join(work, f"x{copies}"))
            best: dict[str, dict] = {}
            for _ in range(args.rounds):
                for side in sides:
                    r = _child(side, corpus, args, work, cluster)
                    if side not in best or r["seconds"] < best[side]["seconds"]:
                        best[side] = {**r, "peak_rss": max(r["peak_rss"], best.get(side, {}).get("peak_rss", 0))}
                    else:
                        best[side]["peak_rss"] = max(best[side]["peak_rss"], r["peak_rss"])
                    best[side]["pool_rss"] = max(best[side].get("pool_rss", 0), r["pool_rss"])
            results[copies] = (corpus, best)
            shutil.rmtree(corpus)

        print(
            f"machine: {os.cpu_count()} CPUs; fastest of {args.rounds} interleaved rounds per side; load average {os.getloadavg()[0]:.1f} at the end"
        )
        for copies, (corpus, best) in results.items():
            base = best.get("plain")
            size = sum(os.path.getsize(f) for f in files) * copies
            print(
                f"corpus {copies} x {', '.join(os.path.basename(f) for f in files)} ({size / 1e6:.1f} MB), {best['pipeline'].get('documents', 0):,} documents, "
                f"{best['pipeline']['tokens']:,} tokens written by the pipeline"
            )
            from data_prep.runner import choose_workers

            default_workers = choose_workers(0, [(f, os.path.getsize(f)) for f in files] * copies)
            for side in sides:
                r = best[side]
                rate = r["tokens"] / r["seconds"]
                label = LABELS[side].format(n=args.compare_workers)
                if (side == "pipeline" and default_workers == 1) or (side == "workers" and default_workers == args.compare_workers):
                    label += ", default"
                ratios = "" if side == "plain" or not base else f"  {rate / (base['tokens'] / base['seconds']):.2f}x the plain loop"
                if side not in ("plain", "adapter") and base:
                    ratios += f", {rate / (best['adapter']['tokens'] / best['adapter']['seconds']):.2f}x the adapter loop"
                pool = f", worker pool {r['pool_rss'] / 2**20:,.0f} MiB" if side == "portable" else ""
                print(
                    f"  {label:<62} {rate:>10,.0f} tokens/s ({r['seconds']:.1f}s, CPU {r['cpu']:.1f}s, peak RSS {r['peak_rss'] / 2**20:,.0f} MiB{pool}){ratios}"
                )
            if base and best["pipeline"]["tokens"] != base["tokens"]:
                print(
                    f"  note: the pipeline wrote {best['pipeline']['tokens']:,} tokens, the baseline {base['tokens']:,} (cleaning changed some documents)"
                )
        if len(results) >= 2:
            (small, (_, a)), (large, (_, b)) = list(results.items())[0], list(results.items())[-1]
            for side in sides:
                print(
                    f"peak RSS at {large} copies / at {small} copies, {LABELS[side].format(n=args.compare_workers)}: {b[side]['peak_rss'] / a[side]['peak_rss']:.2f}x"
                )
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
