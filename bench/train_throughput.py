"""Training throughput of a recipe through the real DeepSpeed engine: tokens/s, samples/s, peak memory.

    python bench/train_throughput.py                               # demo recipe, 2 processes, CPU or GPU
    python bench/train_throughput.py --procs 1 --steps 40 train.micro_batch=64
    python bench/train_throughput.py --config configs/distilbert.yaml --teacher-size base --procs 1 \
        train.global_batch=256 train.micro_batch=32          # BERT-base-sized random teacher (GPU)

Without --data it prepares the demo corpus (text shipped with Python) with distill-prep; without
--teacher it saves a randomly initialised BERT teacher of --teacher-size (throughput does not
depend on the weights). Figures are medians over the steps after --warmup.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TEACHER_SIZES = {  # layers, hidden, heads, intermediate
    "demo": (4, 256, 4, 1024),
    "small": (4, 128, 2, 512),
    "base": (12, 768, 12, 3072),
}


def prepare(cache: str, max_seq_len: int, vocab_size: int) -> tuple[str, str]:
    """Demo corpus -> WordPiece tokenizer -> distill-prep output (cached under `cache`)."""
    from distill.demo_assets import train_wordpiece_tokenizer, write_corpus

    corpus, tok, data = (os.path.join(cache, d) for d in ("corpus", f"tok{vocab_size}", f"data{vocab_size}_{max_seq_len}"))
    if not os.path.isdir(corpus):
        write_corpus(corpus)
    if not os.path.isdir(tok):
        train_wordpiece_tokenizer(sorted(os.path.join(corpus, f) for f in os.listdir(corpus)), tok, vocab_size=vocab_size)
    if not os.path.exists(os.path.join(data, "manifest.json")):
        subprocess.run([os.path.join(BIN, "distill-prep"), "--input", corpus, "--tokenizer", tok, "--output", data,
                        "--max-seq-len", str(max_seq_len), "--validation-fraction", "0.01", "--overwrite"], check=True)
    return data, tok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--procs", type=int, default=2, help="processes (GPUs) on this machine")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--data", help="prepared dataset (default: the demo corpus, prepared here)")
    parser.add_argument("--teacher", help="teacher directory (default: random BERT of --teacher-size)")
    parser.add_argument("--teacher-size", choices=sorted(TEACHER_SIZES), default="demo")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--cache", default=os.path.join(REPO, "runs", "bench_cache"))
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    args = parser.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    tokenizer = None
    data = args.data
    if not data:
        data, tokenizer = prepare(args.cache, args.max_seq_len, args.vocab_size)
    teacher = args.teacher
    if not teacher:
        from distill.demo_assets import save_random_bert_teacher

        layers, hidden, heads, inter = TEACHER_SIZES[args.teacher_size]
        teacher = os.path.join(args.cache, f"teacher_{args.teacher_size}_{args.vocab_size}")
        if not os.path.exists(os.path.join(teacher, "config.json")):
            save_random_bert_teacher(tokenizer or os.path.join(data, "tokenizer"), teacher, layers, hidden, heads, inter, max_positions=512)
    out = tempfile.mkdtemp(prefix="bench_run_", dir=args.cache)
    os.rmdir(out)
    train_args = ["--config", args.config, f"teacher.path={teacher}", f"data.path={data}", f"output_dir={out}",
                  f"train.max_steps={args.steps}", f"checkpoint.every_steps={args.steps}", "train.log_every=10", "student.init_layers=null", *args.overrides]
    if args.procs > 1:
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(args.procs), "--master_port", os.environ.get("MASTER_PORT", "29720"), "--module", "distill", *train_args]
    else:
        cmd = [sys.executable, "-m", "distill", *train_args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.procs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.procs))
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        return proc.returncode
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle][args.warmup:]
    tokens = statistics.median(r["tokens_per_s"] for r in rows)
    samples = statistics.median(r["samples_per_s"] for r in rows)
    peak = max(r["peak_memory_mb"] for r in rows)
    with open(os.path.join(out, "config.yaml")) as handle:
        import yaml

        cfg = yaml.safe_load(handle)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"recipe {args.config} | teacher {args.teacher_size if not args.teacher else teacher} | {args.procs} process(es) on {device}")
    print(f"global batch {cfg['train']['global_batch']}, micro batch {cfg['train']['micro_batch']}, max_seq_len {args.max_seq_len}, "
          f"{len(rows)} measured steps of {args.steps} (wall {time.time() - start:.0f}s incl. start-up)")
    print(f"tokens/s (all ranks, non-padding): {tokens:,.0f}")
    print(f"samples/s: {samples:,.1f}")
    print(f"peak memory (rank 0, {'GPU allocated' if torch.cuda.is_available() else 'CPU RSS'}): {peak:,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
