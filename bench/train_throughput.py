"""Training throughput through the real DeepSpeed engine: the fast path and a baseline path of our own
code, side by side in one run, with tokens/s, samples/s, MFU, peak memory and time waiting for data.

    python bench/train_throughput.py                          # demo recipe, 2 processes: fast vs baseline
    python bench/train_throughput.py --ablate                 # + each fast-path piece switched off alone
    python bench/train_throughput.py --hf-distiller-config    # issue 6 point 6: the reference CPU configuration
    python bench/train_throughput.py --config configs/distilbert.yaml --teacher-size base --procs 1 \\
        --packing full_sentences --max-seq-len 128 train.global_batch=1024 train.micro_batch=256   # GPU, BERT-base
    python bench/train_throughput.py ... --find-max-micro-batch  # largest micro batch that fits (GPU)

Paths (each is a set of `key=value` overrides on top of the recipe and the command line):
  fast      the recipe as it is: teacher bf16 (GPU) under torch.inference_mode, SDPA attention in teacher and
            student, length-grouped micro batches, vocabulary logits only where a loss reads them
  baseline  teacher.dtype=fp32 teacher.inference_mode=false teacher/student attn_implementation=eager
            train.logits_where_needed=false (full-vocabulary logits at every padded position)
            data.group_by_length=false (micro batches padded to their longest random sequence)
Every path trains the same samples from the same initial weights (same seed); only speed differs.

FLOPs per step (bench/flops.py), matrix multiplications only:
    layer(l)  = 2*l*(4*h^2 + 2*h*f) + 4*l^2*h              one encoder layer over a sequence of l tokens
    teacher   = L_t * sum_seq layer_t(l)                     forward
    student   = 3 * L_s * sum_seq layer_s(l)                 forward + backward (= 2 x forward)
    heads     = P * [(2*h_t^2 + 2*h_t*V) + 3*(2*h_s^2 + 2*h_s*V)]   P = positions with logits
  BERT-base -> 6 layers, l = 128: 174.6 + 261.9 MFLOP/token, heads 192.5 MFLOP per logit position
  (28.9 per token at 15% masked positions).
  model FLOPs    = real tokens only, P = positions a loss needs           -> "TFLOP/s", "MFU"
  hardware FLOPs = padded tokens, P = positions the path really computes -> "hw TFLOP/s"
  MFU = model FLOP/s / peak: the datasheet dense peak on a GPU (H100 bf16 989 TFLOP/s), on a CPU the best
  fp32 1024^3 matmul rate measured here with the same threads per process (--peak-tflops overrides).

Figures are medians over the steps after --warmup; tokens are real (non-padding) tokens. Without --data
the demo corpus (text shipped with Python) is prepared with distill-prep; without --teacher a randomly
initialised BERT of --teacher-size is saved (throughput does not depend on the weights).
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
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import Shape, gpu_peak_tflops, measured_matmul_tflops, step_flops  # noqa: E402

BIN = os.path.dirname(sys.executable)
TEACHER_SIZES = {  # layers, hidden, heads, intermediate
    "demo": (4, 256, 4, 1024),
    "small": (4, 128, 2, 512),
    "base": (12, 768, 12, 3072),
}
BASELINE = ["teacher.dtype=fp32", "teacher.inference_mode=false", "teacher.attn_implementation=eager", "student.attn_implementation=eager",
            "train.logits_where_needed=false", "data.group_by_length=false"]
# (name, overrides applied to the fast path): each fast-path piece switched off (or an optional one on) alone
ABLATIONS_CPU = [
    ("fast - inference_mode", ["teacher.inference_mode=false"]),
    ("fast - sdpa (eager attn)", ["teacher.attn_implementation=eager", "student.attn_implementation=eager"]),
    ("fast - logits where needed", ["train.logits_where_needed=false"]),
    ("fast - group_by_length", ["data.group_by_length=false"]),
    ("fast + 1 loader worker", ["data.num_workers=1"]),
    ("fast + torch.compile", ["train.compile=true"]),
]
ABLATIONS_GPU = [
    ("fast - bf16 teacher", ["teacher.dtype=fp32"]),
    *ABLATIONS_CPU[:4],
    ("fast - loader workers/pinning", ["data.num_workers=0", "data.pin_memory=false"]),
    ("fast + torch.compile", ["train.compile=true"]),
]
HF_DISTILLER = {  # issue 6 point 6: Hugging Face's DistilBERT distiller reference on a 2-core CPU
    "procs": 1, "vocab_size": 1000, "teacher_size": "small", "max_seq_len": 128,
    "overrides": ["train.global_batch=32", "train.micro_batch=32", "student.num_layers=2", "train.precision=fp32", "teacher.dtype=fp32",
                  "loss.weights={ce: 5.0, mlm: 2.0, cos: 1.0}", "loss.ce_positions=all", "data.group_by_length=true",
                  "data.length_group_steps=32"],  # lengths grouped over pools of 32 batches, like the reference's sampler
    # the reference's sequences average ~60 tokens (one per corpus line, cut at 128): documents of 12-60 words
    "short_docs": (12, 60),
    "reference_tokens_per_s": 7000.0, "reference_sequences_per_s": 120.0, "target_ratio": 1.5,
}


def write_short_documents(corpus: str, out_dir: str, min_words: int, max_words: int, seed: int = 0) -> None:
    """The demo corpus cut into documents of a uniformly random number of words (one per line), so that
    `--packing document` yields variable-length sequences like a line-per-sentence corpus."""
    import random

    rng = random.Random(seed)
    os.makedirs(out_dir + ".tmp", exist_ok=True)
    with open(os.path.join(out_dir + ".tmp", "short_documents.txt"), "w", encoding="utf-8") as out:
        for name in sorted(os.listdir(corpus)):
            for line in open(os.path.join(corpus, name), encoding="utf-8"):
                words = line.split()
                while words:
                    n = rng.randint(min_words, max_words)
                    out.write(" ".join(words[:n]) + "\n")
                    words = words[n:]
    os.replace(out_dir + ".tmp", out_dir)


def prepare(cache: str, max_seq_len: int, vocab_size: int, packing: str = "document", short_docs: tuple[int, int] | None = None) -> tuple[str, str]:
    """Demo corpus -> WordPiece tokenizer -> distill-prep output (cached under `cache`). `short_docs`
    (min, max words): prepare the corpus cut into short documents instead (see write_short_documents)."""
    from distill.demo_assets import train_wordpiece_tokenizer, write_corpus

    suffix = "" if packing == "document" else f"_{packing}"
    corpus, tok, data = (os.path.join(cache, d) for d in ("corpus", f"tok{vocab_size}", f"data{vocab_size}_{max_seq_len}{suffix}"))
    if not os.path.isdir(corpus):
        write_corpus(corpus)
    if not os.path.isdir(tok):  # always on the demo corpus itself
        train_wordpiece_tokenizer(sorted(os.path.join(corpus, f) for f in os.listdir(corpus)), tok, vocab_size=vocab_size)
    if short_docs:
        short = os.path.join(cache, f"corpus_short_{short_docs[0]}_{short_docs[1]}")
        if not os.path.isdir(short):
            write_short_documents(corpus, short, *short_docs)
        corpus, data = short, data + f"_short_{short_docs[0]}_{short_docs[1]}"
    if not os.path.exists(os.path.join(data, "manifest.json")):
        subprocess.run([os.path.join(BIN, "distill-prep"), "--input", corpus, "--tokenizer", tok, "--output", data, "--packing", packing,
                        "--max-seq-len", str(max_seq_len), "--validation-fraction", "0.01", "--overwrite"], check=True)
    return data, tok


def model_shapes(cfg: dict, teacher_dir: str) -> tuple[Shape, Shape]:
    """Teacher and student shapes as the trainer builds them (student defaults come from the teacher)."""
    with open(os.path.join(teacher_dir, "config.json")) as handle:
        t = json.load(handle)
    t_layers, t_hidden = t.get("num_hidden_layers", t.get("n_layer")), t.get("hidden_size", t.get("n_embd"))
    t_inter = t.get("intermediate_size") or t.get("n_inner") or 4 * t_hidden
    teacher = Shape(t_layers, t_hidden, t_inter, t["vocab_size"])
    s = cfg["student"]
    s_layers = s.get("num_layers") or (len(s["init_layers"]) if s.get("init_layers") else t_layers // 2)
    student = Shape(s_layers, s.get("hidden_size") or t_hidden, s.get("intermediate_size") or t_inter, t["vocab_size"])
    return teacher, student


def run_path(name: str, args, train_args: list[str], extra: list[str], port: int, env: dict) -> dict:
    """Train --steps steps with `extra` overrides; return the measured figures (or an error)."""
    out = tempfile.mkdtemp(prefix="bench_run_", dir=args.cache)
    os.rmdir(out)
    full = [*train_args, f"output_dir={out}", *extra]
    if args.procs > 1:
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(args.procs), "--master_port", str(port), "--module", "distill", *full]
    else:
        cmd = [sys.executable, "-m", "distill", *full]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        text = proc.stdout[-2000:] + proc.stderr[-4000:]
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
        return {"name": name, "error": "out of memory" if oom else f"exit {proc.returncode}", "log": text}
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    with open(os.path.join(out, "config.yaml")) as handle:
        import yaml

        cfg = yaml.safe_load(handle)
    from distill.losses import needs_teacher_logits

    teacher, student = model_shapes(cfg, cfg["teacher"]["path"])
    t_logits = needs_teacher_logits(cfg["loss"]["weights"])
    full_logits = not cfg["train"].get("logits_where_needed", True)
    measured = rows[args.warmup:] or rows[-1:]
    per_step = []
    for r in measured:
        elapsed = r["tokens"] / r["tokens_per_s"]
        model = step_flops(teacher, student, r["tokens"], r["token_pairs"], r["logit_positions"], t_logits)
        hw_positions = r["padded_tokens"] if full_logits else r["logit_positions"]
        hardware = step_flops(teacher, student, r["padded_tokens"], r["padded_token_pairs"], hw_positions, t_logits)
        per_step.append({"elapsed": elapsed, "model": model["total"] / elapsed, "hardware": hardware["total"] / elapsed, "parts": model})
    med = lambda xs: statistics.median(xs)  # noqa: E731
    shutil_rm(out)
    return {
        "name": name,
        "overrides": extra,
        "steps": len(measured),
        "wall_s": wall,
        "tokens_per_s": med([r["tokens_per_s"] for r in measured]),
        "tokens_per_s_per_proc": med([r["tokens_per_s"] for r in measured]) / args.procs,
        "padded_tokens_per_s": med([r["padded_tokens"] / (r["tokens"] / r["tokens_per_s"]) for r in measured]),
        "samples_per_s": med([r["samples_per_s"] for r in measured]),
        "model_tflops": med([s["model"] for s in per_step]) / 1e12,
        "model_tflops_per_proc": med([s["model"] for s in per_step]) / 1e12 / args.procs,
        "hardware_tflops_per_proc": med([s["hardware"] for s in per_step]) / 1e12 / args.procs,
        "peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
        "data_wait_share": med([r["data_wait_share"] for r in measured]),
        "padding_share": med([1 - r["tokens"] / r["padded_tokens"] for r in measured]),
        "tokens_per_sequence": med([r["tokens"] for r in measured]) / cfg["train"]["global_batch"],
        "flops_per_token": {k: v / measured[-1]["tokens"] / 1e6 for k, v in per_step[-1]["parts"].items()},
        "shapes": {"teacher": teacher.__dict__, "student": student.__dict__},
        "global_batch": cfg["train"]["global_batch"], "micro_batch": cfg["train"]["micro_batch"],
        "phase_seconds": ({k: med([r["phase_seconds"][k] for r in measured]) for k in measured[0]["phase_seconds"]}
                          if "phase_seconds" in measured[0] else None),
        "step_seconds": med([r["tokens"] / r["tokens_per_s"] for r in measured]),
    }


def shutil_rm(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def find_max_micro_batch(args, train_args, extra, port, env, start: int = 8, cap: int = 8192) -> int:
    """Double the micro batch (3 steps each, global = micro x procs) until a run fails with out-of-memory."""
    best, micro = 0, start
    saved_steps, saved_warmup = args.steps, args.warmup
    args.steps, args.warmup = 3, 1
    try:
        while micro <= cap:
            res = run_path(f"micro {micro}", args, train_args, [*extra, f"train.micro_batch={micro}", f"train.global_batch={micro * args.procs}"], port, env)
            if "error" in res:
                if res["error"] != "out of memory":
                    print(res["log"], file=sys.stderr)
                break
            print(f"  micro batch {micro}: fits, peak {res['peak_memory_mb']:,.0f} MiB, {res['tokens_per_s_per_proc']:,.0f} tokens/s/proc", flush=True)
            best, micro = micro, micro * 2
    finally:
        args.steps, args.warmup = saved_steps, saved_warmup
    return best


def print_breakdown(profiled: list[dict], timed: dict) -> None:
    """Milliseconds per step and share of each phase (rank 0) for every profiled path."""
    from distill.profiling import PHASES

    print("\nwhere a step's time goes (rank 0, device synchronised at every phase boundary, collectives blocking):")
    header = f"{'phase':<18}" + "".join(f"{r['name'].replace(' (profiled)', ''):>26}" for r in profiled)
    print(header)
    print("-" * len(header))
    for phase in PHASES + ("other",):
        cells = []
        for r in profiled:
            ph = r["phase_seconds"]
            ms = (r["step_seconds"] - sum(ph.values())) * 1e3 if phase == "other" else ph.get(phase, 0.0) * 1e3
            cells.append(f"{ms:>12,.1f} ms {100 * ms / 1e3 / r['step_seconds']:>8.1f}%")
        print(f"{phase:<18}" + "".join(f"{c:>26}" for c in cells))
    cells = []
    for r in profiled:
        plain = timed.get(r["name"].replace(" (profiled)", ""))
        note = f" (unprofiled {plain['step_seconds'] * 1e3:,.0f})" if plain else ""
        cells.append(f"{r['step_seconds'] * 1e3:,.1f} ms{note}")
    print(f"{'step':<18}" + "".join(f"{c:>26}" for c in cells))
    print("other = step time not in any phase (host bookkeeping, metric all-reduce, logging)")


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
    parser.add_argument("--packing", choices=["document", "full_sentences"], default="document",
                        help="distill-prep packing of the demo corpus: full_sentences = full windows, no padding (GPU figures)")
    parser.add_argument("--paths", default="fast,baseline", help="comma-separated: fast, baseline")
    parser.add_argument("--ablate", action="store_true", help="also run the fast path with each piece switched off (or compile on) alone")
    parser.add_argument("--hf-distiller-config", action="store_true", help="issue 6 point 6: 1 process, fp32, 4x128x2 random BERT teacher, "
                        "2-layer DistilBERT, WordPiece 1000, seq <= 128 grouped by length, batch 32, alpha 5/2/1; target >= 1.5 x 7k tokens/s")
    parser.add_argument("--profile", action="store_true", help="also run fast and baseline with train.profile_phases=true and print where a step's "
                        "time goes (data, teacher, student forward, loss, backward, optimizer, comm); phases are serialised, so only shares count")
    parser.add_argument("--find-max-micro-batch", action="store_true", help="largest micro batch that fits, for the fast and the baseline path")
    parser.add_argument("--peak-tflops", type=float, help="peak per process for MFU (default: datasheet on GPU, measured matmul on CPU)")
    parser.add_argument("--fast", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides of the fast path only")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--cache", default=os.path.join(REPO, "runs", "bench_cache"))
    parser.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29910")))
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe (every path)")
    args = parser.parse_args()
    overrides = list(args.overrides)
    if args.hf_distiller_config:
        args.procs, args.vocab_size, args.teacher_size, args.max_seq_len = (HF_DISTILLER[k] for k in ("procs", "vocab_size", "teacher_size", "max_seq_len"))
        overrides = HF_DISTILLER["overrides"] + overrides
    os.makedirs(args.cache, exist_ok=True)
    tokenizer = None
    data = args.data
    if not data:
        data, tokenizer = prepare(args.cache, args.max_seq_len, args.vocab_size, args.packing,
                                  HF_DISTILLER["short_docs"] if args.hf_distiller_config else None)
    teacher = args.teacher
    if not teacher:
        from distill.demo_assets import save_random_bert_teacher

        layers, hidden, heads, inter = TEACHER_SIZES[args.teacher_size]
        teacher = os.path.join(args.cache, f"teacher_{args.teacher_size}_{args.vocab_size}")
        if not os.path.exists(os.path.join(teacher, "config.json")):
            save_random_bert_teacher(tokenizer or os.path.join(data, "tokenizer"), teacher, layers, hidden, heads, inter, max_positions=512)
    train_args = ["--config", args.config, f"teacher.path={teacher}", f"data.path={data}", f"train.max_steps={args.steps}",
                  f"checkpoint.every_steps={10**6}", "checkpoint.keep_last=1", "train.log_every=10", "student.init_layers=null", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    threads = int(env.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // args.procs))
    env["OMP_NUM_THREADS"] = str(threads)

    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores, {threads} threads per process)"
    precision = "fp32" if any(o.startswith("train.precision=fp32") for o in overrides) or not gpu else "bf16"
    peak = args.peak_tflops or (gpu_peak_tflops(device, precision) if gpu else measured_matmul_tflops(threads))
    peak_note = "--peak-tflops" if args.peak_tflops else ("datasheet dense " + precision if gpu else f"measured fp32 matmul, {threads} threads")
    print(f"recipe {args.config} | teacher {args.teacher_size if not args.teacher else teacher} | {args.procs} process(es) on {device}", flush=True)
    print(f"overrides: {' '.join(overrides) or '-'}", flush=True)

    if args.find_max_micro_batch:
        for name, extra in (("fast", args.fast), ("baseline", BASELINE)):
            print(f"{name}: searching the largest micro batch at max_seq_len {args.max_seq_len}", flush=True)
            best = find_max_micro_batch(args, train_args, extra, args.master_port, env)
            print(f"{name}: largest micro batch that fits: {best or 'none'}", flush=True)
        return 0

    plan = []
    wanted = [p.strip() for p in args.paths.split(",") if p.strip()]
    if "fast" in wanted:
        plan.append(("fast", list(args.fast)))
    if "baseline" in wanted:
        plan.append(("baseline", BASELINE))
    if args.ablate:
        plan += [(name, [*args.fast, *extra]) for name, extra in (ABLATIONS_GPU if gpu else ABLATIONS_CPU)]
    if args.profile:
        plan += [(f"{name} (profiled)", [*extra, "train.profile_phases=true"]) for name, extra in list(plan) if name in ("fast", "baseline")]
    results = []
    for i, (name, extra) in enumerate(plan):
        res = run_path(name, args, train_args, extra, args.master_port + i, env)
        results.append(res)
        if "error" in res:
            print(f"{name}: FAILED ({res['error']})\n{res['log']}", file=sys.stderr, flush=True)
        else:
            print(f"  {name}: {res['tokens_per_s_per_proc']:,.0f} tokens/s/proc, {res['samples_per_s']:,.1f} samples/s, "
                  f"peak {res['peak_memory_mb']:,.0f} MiB ({res['wall_s']:.0f}s)", flush=True)
    ok = {r["name"]: r for r in results if "error" not in r}
    base = ok.get("baseline")
    first = next(iter(ok.values()), None)
    if first is None:
        return 1
    print()
    print(f"global batch {first['global_batch']}, micro batch {first['micro_batch']}, max_seq_len {args.max_seq_len}, "
          f"{first['steps']} measured steps of {args.steps}; {first['tokens_per_sequence']:.1f} real tokens per sequence")
    fpt = first["flops_per_token"]
    print(f"model MFLOP per real token ({first['name']}): teacher fwd {fpt['teacher_fwd']:.2f}, student fwd+bwd {fpt['student_fwd_bwd']:.2f}, "
          f"heads {fpt['teacher_head'] + fpt['student_head_fwd_bwd']:.2f}, total {fpt['total']:.2f}")
    print(f"peak for MFU: {peak:.3g} TFLOP/s per process ({peak_note})")
    mem = "GPU allocated" if gpu else "CPU RSS"
    header = f"{'path':<30} {'tok/s/proc':>11} {'samples/s':>10} {'TFLOP/s/proc':>13} {'MFU':>7} {'hw TFLOP/s':>11} {'peak ' + mem:>18} {'data wait':>10} {'padding':>8} {'vs base':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['name']:<30} {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mfu = f"{100 * r['model_tflops_per_proc'] / peak:.1f}%" if peak else "-"
        print(f"{r['name']:<30} {r['tokens_per_s_per_proc']:>11,.0f} {r['samples_per_s']:>10,.1f} {r['model_tflops_per_proc']:>13.4f} {mfu:>7} "
              f"{r['hardware_tflops_per_proc']:>11.4f} {r['peak_memory_mb']:>14,.0f} MiB {100 * r['data_wait_share']:>9.1f}% "
              f"{100 * r['padding_share']:>7.1f}% {ratio:>8}")
    if base and "fast" in ok:
        f = ok["fast"]
        print(f"fast / baseline: {f['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, peak memory {f['peak_memory_mb']:,.0f} vs "
              f"{base['peak_memory_mb']:,.0f} MiB ({f['peak_memory_mb'] / base['peak_memory_mb']:.2f}x)")
    profiled = [r for r in results if r.get("phase_seconds")]
    if profiled:
        print_breakdown(profiled, ok)
    if args.hf_distiller_config and "fast" in ok:
        target = HF_DISTILLER["reference_tokens_per_s"] * HF_DISTILLER["target_ratio"]
        got = ok["fast"]["tokens_per_s"]
        print(f"HF distiller reference ~{HF_DISTILLER['reference_tokens_per_s']:,.0f} real tokens/s; target >= {target:,.0f}: "
              f"fast path {got:,.0f} ({got / HF_DISTILLER['reference_tokens_per_s']:.2f}x the reference) -> {'PASS' if got >= target else 'FAIL'}")
        seqs = ok["fast"]["samples_per_s"]
        print(f"  in sequences: {ok['fast']['tokens_per_sequence']:.1f} real tokens per sequence (reference ~60); {seqs:,.1f} sequences/s vs "
              f"~{HF_DISTILLER['reference_sequences_per_s']:.0f} ({seqs / HF_DISTILLER['reference_sequences_per_s']:.2f}x)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "peak_tflops": peak, "peak_note": peak_note, "procs": args.procs, "args": vars(args),
                       "results": [{k: v for k, v in r.items() if k != "log"} for r in results]}, handle, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
