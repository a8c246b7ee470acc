"""Training throughput through the trainer users run (`distill-train`), against baselines measured in the same run.

    python bench/train_throughput.py                          # demo recipe, 2 processes: fast vs our baseline path
    python bench/train_throughput.py --ablate                 # + each fast-path piece switched off alone
    python bench/train_throughput.py --hf-distiller-config    # issue 16: vs Hugging Face's distiller, re-implemented
                                                              #   (bench/reference_distiller.py), 12 interleaved rounds,
                                                              #   + fixed cost per step, syncs per step, loader ceiling
    python bench/train_throughput.py --overhead               # only: fixed cost per optimizer step + host syncs per step
    python bench/train_throughput.py --loader-ceiling         # only: real tokens/s one loader core delivers vs a GPU's need
    python bench/train_throughput.py --config configs/distilbert.yaml --teacher-size base --procs 1 \\
        --packing full_sentences --max-seq-len 128 train.global_batch=1024 train.micro_batch=256   # GPU, BERT-base
    python bench/train_throughput.py ... --find-max-micro-batch  # largest micro batch that fits (GPU)

Paths (each is a process of its own, started fresh; the sides of a comparison run in interleaved rounds,
alternating which goes first, on the same prepared sequences):
  fast       `distill-train` with the recipe as it is: teacher bf16 (GPU) under torch.inference_mode, SDPA
             attention, length-grouped micro batches, vocabulary logits only where a loss reads them
  compile    fast + train.compile=true
  bf16       fast + teacher.dtype=bf16 train.precision=bf16 (GPUs; CPUs with AVX512-BF16 or AMX): its ratio to the
             reference is reported apart, since the reference runs fp32
  baseline   our own trainer with the fast-path pieces off: teacher.dtype=fp32 teacher.inference_mode=false
             teacher/student attn_implementation=eager train.logits_where_needed=false data.group_by_length=false
  reference  Hugging Face's DistilBERT distiller (transformers examples/research_projects/distillation) written
             out in plain PyTorch (bench/reference_distiller.py): its per-batch masking with smoothed token
             probabilities, full-vocabulary logits of both models, masked_select'ed losses, plain AdamW +
             clip_grad_norm_, its length-grouped sampler; no DeepSpeed. Same teacher, data, batch, loss weights,
             temperature, masking rates and optimizer settings as the resolved recipe; one process only.

How speed is measured: `bench/step_probe.py` runs `distill-train` and records the wall-clock time at the end of every
optimizer step (a global hook on torch's optimizer step); the reference is timed by the same hook. A side's throughput
is an aggregate over the measured steps (after --warmup): total real tokens (attention_mask.sum()) / wall time from
the end of step `warmup` to the end of the last step, everything between steps included; never a median of per-step
rates. Over rounds: the median of the per-round aggregates, the pooled aggregate, and the ratio per round. The whole
process (interpreter start to exit, at the same number of steps) and its start-up (process start to the end of the
first optimizer step: imports, loading, set-up and one step) are timed too.

FLOPs per step (bench/flops.py), matrix multiplications only:
    layer(l)  = 2*l*(4*h^2 + 2*h*f) + 4*l^2*h              one encoder layer over a sequence of l tokens
    teacher   = L_t * sum_seq layer_t(l)                     forward
    student   = 3 * L_s * sum_seq layer_s(l)                 forward + backward (= 2 x forward)
    heads     = P * [(2*h_t^2 + 2*h_t*V) + 3*(2*h_s^2 + 2*h_s*V)]   P = positions with logits
  model FLOPs    = real tokens only, P = positions a loss needs           -> "TFLOP/s", "MFU"
  hardware FLOPs = padded tokens, P = positions the path really computes -> "hw TFLOP/s"
  MFU = model FLOP/s / peak: the datasheet dense peak on a GPU (H100 bf16 989 TFLOP/s), on a CPU the best
  fp32 1024^3 matmul rate measured here with the same threads per process (--peak-tflops overrides).

Without --data the demo corpus (text shipped with Python) is prepared with distill-prep; without --teacher a
randomly initialised BERT of --teacher-size is saved (throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)
sys.path.insert(0, BENCH)
from flops import BERT_BASE, DISTILBERT_STUDENT, Shape, gpu_peak_tflops, measured_matmul_tflops, per_token_mflops, step_flops  # noqa: E402

BIN = os.path.dirname(sys.executable)
TEACHER_SIZES = {  # layers, hidden, heads, intermediate
    "tiny": (1, 8, 2, 8),
    "demo": (4, 256, 4, 1024),
    "small": (4, 128, 2, 512),
    "base": (12, 768, 12, 3072),
}
BASELINE = [
    "teacher.dtype=fp32",
    "teacher.inference_mode=false",
    "teacher.attn_implementation=eager",
    "student.attn_implementation=eager",
    "train.logits_where_needed=false",
    "data.group_by_length=false",
]
COMPILE = ["train.compile=true"]
# bf16 student (fp32 master weights) and teacher: GPUs, and CPUs with native bf16 matmul (AVX512-BF16, AMX); not the arithmetic of
# the reference's fp32 configuration, so its ratio to the reference is printed as its own line, never as the issue's verdict
BF16 = ["teacher.dtype=bf16", "train.precision=bf16"]
# (name, overrides applied to the fast path): each fast-path piece switched off (or an optional one on) alone
ABLATIONS_CPU = [
    ("fast - inference_mode", ["teacher.inference_mode=false"]),
    ("fast - sdpa (eager attn)", ["teacher.attn_implementation=eager", "student.attn_implementation=eager"]),
    ("fast - logits where needed", ["train.logits_where_needed=false"]),
    ("fast - group_by_length", ["data.group_by_length=false"]),
    ("fast + 1 loader worker", ["data.num_workers=1"]),
    ("fast + torch.compile", COMPILE),
    # issue 16, point 4: the step's fixed costs and the start-up
    ("fast - lean 1-process ZeRO", ["deepspeed.lean_single_process=false"]),
    ("fast - batched masking", ["data.masking=per_sequence"]),
    ("fast - lean start-up", ["train.lean_startup=false"]),
    ("fast - CPU padding (8)", ["data.pad_to_multiple_of=8"]),
]
ABLATIONS_GPU = [
    ("fast - bf16 teacher", ["teacher.dtype=fp32"]),
    *ABLATIONS_CPU[:4],
    ("fast - loader workers/pinning", ["data.num_workers=0", "data.pin_memory=false"]),
    ("fast + torch.compile", COMPILE),
]
DISTILBERT_OBJECTIVE = ["train.precision=fp32", "teacher.dtype=fp32", "loss.weights={ce: 5.0, mlm: 2.0, cos: 1.0}", "loss.ce_positions=all"]
HF_DISTILLER = {  # issue 16: Hugging Face's DistilBERT distiller configuration on a 2-core CPU
    "procs": 1,
    "vocab_size": 1000,
    "teacher_size": "small",
    "max_seq_len": 128,
    "steps": 81,
    "warmup": 5,
    "rounds": 12,
    "paths": "reference,fast",
    "overrides": [
        "train.global_batch=32",
        "train.micro_batch=32",
        "student.num_layers=2",
        *DISTILBERT_OBJECTIVE,
        "data.group_by_length=true",
        "data.length_group_steps=32",
    ],  # lengths grouped over pools of 32 batches, like the reference's sampler
    # the reference's sequences average ~60 tokens (one per corpus line, cut at 128): documents of 12-60 words
    "short_docs": (12, 60),
    "targets": {"per_step": 1.5, "whole_process": 1.2},
    # what the issue measured with the real reference (for the consistency check only, never for a verdict)
    "issue": {"reference": 10984.0, "fast": 12499.0, "compile": 13123.0},
}
OVERHEAD = {  # a model so small its compute is negligible: what is left of a step is fixed cost
    "teacher_size": "tiny",
    "vocab_size": 1000,
    "max_seq_len": 12,
    "steps": 60,
    "warmup": 10,
    "sync_steps": 6,
    "micro_batch": 2,
    "accumulations": (1, 4),
    "overrides": ["student.num_layers=1", *DISTILBERT_OBJECTIVE, "data.group_by_length=true"],
    "target_ms": 2.0,
    "target_syncs": 1,
}
GPU_TARGET = {"name": "H100 bf16 at 50% MFU, BERT-base -> 6 layers, seq 128, logits at masked positions", "peak_tflops": 989.0, "mfu": 0.5}


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


def prepare(
    cache: str,
    max_seq_len: int,
    vocab_size: int,
    packing: str = "document",
    short_docs: tuple[int, int] | None = None,
    min_seq_len: int | None = None,
) -> tuple[str, str]:
    """Demo corpus -> WordPiece tokenizer -> distill-prep output (cached under `cache`). `short_docs`
    (min, max words): prepare the corpus cut into short documents instead (see write_short_documents)."""
    from distill.tools.demo_assets import train_wordpiece_tokenizer, write_corpus

    suffix = "" if packing == "document" else f"_{packing}"
    if min_seq_len is not None:
        suffix += f"_min{min_seq_len}"
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
        cmd = [
            os.path.join(BIN, "distill-prep"),
            "--input",
            corpus,
            "--tokenizer",
            tok,
            "--output",
            data,
            "--packing",
            packing,
            "--max-seq-len",
            str(max_seq_len),
            "--validation-fraction",
            "0.01",
            "--overwrite",
        ]
        if min_seq_len is not None:
            cmd += ["--min-seq-len", str(min_seq_len)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return data, tok


def teacher_for(cache: str, size: str, vocab_size: int, tokenizer: str) -> str:
    from distill.tools.demo_assets import save_random_bert_teacher

    layers, hidden, heads, inter = TEACHER_SIZES[size]
    teacher = os.path.join(cache, f"teacher_{size}_{vocab_size}")
    if not os.path.exists(os.path.join(teacher, "config.json")):
        save_random_bert_teacher(tokenizer, teacher, layers, hidden, heads, inter, max_positions=512)
    return teacher


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


def shutil_rm(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def load_uptime() -> str:
    try:
        with open("/proc/loadavg") as handle:
            one, five, fifteen = handle.read().split()[:3]
        return f"load average {one}, {five}, {fifteen} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


# ----------------------------------------------------------------------------------------------
# One process of one side


def _window(step_times: list[float], warmup: int, steps: int) -> tuple[float, float]:
    """(start, end) wall clock of optimizer steps warmup+1 .. steps: from the end of step `warmup` to the end of the last."""
    if not 1 <= warmup < steps:
        raise SystemExit(f"--warmup {warmup} must be at least 1 and leave a measured step of {steps}")
    if len(step_times) < steps:
        raise SystemExit(f"the step clock saw {len(step_times)} optimizer steps of {steps}")
    return step_times[warmup - 1], step_times[steps - 1]


def run_ours(name: str, args, train_args: list[str], extra: list[str], port: int, env: dict, probe_env: dict | None = None) -> dict:
    """Train args.steps steps through distill-train (under bench/step_probe.py) with `extra` overrides."""
    out = tempfile.mkdtemp(prefix="bench_run_", dir=args.cache)
    os.rmdir(out)
    probe_file = out + ".probe.json"
    full = [*train_args, f"output_dir={out}", *extra]
    script = os.path.join(BENCH, "step_probe.py")
    if args.procs > 1:
        cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(args.procs), "--master_port", str(port), script, *full]
    else:
        cmd = [sys.executable, script, *full]
    run_env = dict(env, STEP_PROBE_OUT=probe_file, STEP_PROBE_STEPS=str(args.steps), **(probe_env or {}))
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        text = proc.stdout[-2000:] + proc.stderr[-4000:]
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
        shutil_rm(out)
        return {"name": name, "error": "out of memory" if oom else f"exit {proc.returncode}", "log": text}
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    with open(os.path.join(out, "config.yaml")) as handle:
        import yaml

        cfg = yaml.safe_load(handle)
    with open(probe_file) as handle:
        probe = json.load(handle)
    os.remove(probe_file)
    shutil_rm(out)
    from distill.objective.losses import needs_teacher_logits

    teacher, student = model_shapes(cfg, cfg["teacher"]["path"])
    t_logits = needs_teacher_logits(cfg["loss"]["weights"])
    full_logits = not cfg["train"].get("logits_where_needed", True)
    steps = len(rows)
    warmup = min(args.warmup, steps - 1)
    measured = rows[warmup:]
    t0, t1 = _window(probe["step_times"], warmup, steps)
    window = t1 - t0
    model_flops = hw_flops = data_wait = 0.0
    parts = None
    for r in measured:
        elapsed = r["tokens"] / r["tokens_per_s"]
        parts = step_flops(teacher, student, r["tokens"], r["token_pairs"], r["logit_positions"], t_logits)
        hw_positions = r["padded_tokens"] if full_logits else r["logit_positions"]
        model_flops += parts["total"]
        hw_flops += step_flops(teacher, student, r["padded_tokens"], r["padded_token_pairs"], hw_positions, t_logits)["total"]
        data_wait += r["data_wait_share"] * elapsed
    tokens = sum(r["tokens"] for r in measured)
    result = {
        "name": name,
        "overrides": extra,
        "steps": len(measured),
        "wall_s": wall,
        "startup_s": probe["step_times"][0] - start,
        "window_s": window,
        "tokens": tokens,
        "tokens_per_s": tokens / window,
        "tokens_per_s_per_proc": tokens / window / args.procs,
        "samples_per_s": len(measured) * cfg["train"]["global_batch"] / window,
        "model_tflops": model_flops / window / 1e12,
        "model_tflops_per_proc": model_flops / window / 1e12 / args.procs,
        "hardware_tflops_per_proc": hw_flops / window / 1e12 / args.procs,
        "peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
        "data_wait_share": data_wait / args.procs / window,
        "padding_share": 1 - tokens / sum(r["padded_tokens"] for r in measured),
        "tokens_per_sequence": tokens / (len(measured) * cfg["train"]["global_batch"]),
        "flops_per_token": {k: v / measured[-1]["tokens"] / 1e6 for k, v in parts.items()},
        "shapes": {"teacher": teacher.__dict__, "student": student.__dict__},
        "global_batch": cfg["train"]["global_batch"],
        "micro_batch": cfg["train"]["micro_batch"],
        "phase_seconds": (
            {k: sum(r["phase_seconds"][k] for r in measured) / len(measured) for k in measured[0]["phase_seconds"]}
            if "phase_seconds" in measured[0]
            else None
        ),
        "step_seconds": window / len(measured),
        "last_loss": rows[-1].get("loss"),
    }
    for key in ("syncs", "profiled_steps"):
        if key in probe:
            result[key] = probe[key]
    return result


def reference_command(cfg, teacher: str, data: str, steps: int, procs: int, same_batches: bool = True) -> list[str]:
    """bench/reference_distiller.py with the resolved recipe's batch, objective, masking and optimizer settings;
    `same_batches`: on the rows distill-train puts in each micro batch (else the reference's own length-grouped sampler)."""
    if procs != 1:
        raise SystemExit("the reference baseline runs one process: use --procs 1")
    weights = {k: v for k, v in cfg.loss.weights.items() if v > 0}
    unsupported = sorted(set(weights) - {"ce", "mlm", "cos"})
    if unsupported or "mlm" not in weights:
        raise SystemExit(f"the reference distiller computes ce/mlm/cos (mlm required); this recipe also uses {unsupported}")
    if cfg.data.whole_word_masking:
        raise SystemExit("the reference distiller masks single tokens: set data.whole_word_masking=false")
    with open(os.path.join(teacher, "config.json")) as handle:
        teacher_layers = json.load(handle)["num_hidden_layers"]
    layers = cfg.student.num_layers or (len(cfg.student.init_layers) if cfg.student.init_layers else teacher_layers // 2)
    mask, rand = cfg.data.mask_token_fraction, cfg.data.random_token_fraction
    cmd = [
        sys.executable,
        os.path.join(BENCH, "reference_distiller.py"),
        "--teacher",
        teacher,
        "--data",
        data,
        "--steps",
        str(steps),
        "--batch-size",
        str(cfg.train.micro_batch),
        "--gradient-accumulation-steps",
        str(cfg.train.global_batch // cfg.train.micro_batch),
        "--student-layers",
        str(layers),
        "--student-dropout",
        str(cfg.student.dropout),
        "--temperature",
        str(cfg.loss.temperature),
        "--alpha-ce",
        str(weights.get("ce", 0.0)),
        "--alpha-mlm",
        str(weights["mlm"]),
        "--alpha-cos",
        str(weights.get("cos", 0.0)),
        "--mlm-mask-prop",
        str(cfg.data.mlm_probability),
        "--word-mask",
        str(mask),
        "--word-rand",
        str(rand),
        "--word-keep",
        str(round(1.0 - mask - rand, 12)),
        "--mlm-smoothing",
        str(cfg.data.token_frequency_smoothing),
        "--learning-rate",
        str(cfg.optim.lr),
        "--adam-epsilon",
        str(cfg.optim.eps),
        "--weight-decay",
        str(cfg.optim.weight_decay),
        "--max-grad-norm",
        str(cfg.optim.grad_clip),
        "--warmup-prop",
        str(cfg.optim.warmup_fraction),
        "--seed",
        str(cfg.seed),
    ]
    if cfg.loss.ce_positions == "masked":
        cmd.append("--restrict-ce-to-mask")
    if same_batches:
        group_steps = cfg.data.length_group_steps if cfg.data.group_by_length else 0
        cmd += ["--same-batches-as-plan", "--plan-global-batch", str(cfg.train.global_batch), "--plan-group-steps", str(group_steps)]
    return cmd


def run_reference(args, cfg, teacher: str, data: str, env: dict) -> dict:
    clock_file = tempfile.mkstemp(prefix="reference_clock_", suffix=".json", dir=args.cache)[1]
    cmd = reference_command(cfg, teacher, data, args.steps, args.procs, args.reference_sampler == "plan") + ["--clock", clock_file]
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        os.remove(clock_file)
        return {"name": "reference", "error": f"exit {proc.returncode}", "log": proc.stdout[-2000:] + proc.stderr[-4000:]}
    with open(clock_file) as handle:
        clock = json.load(handle)
    os.remove(clock_file)
    acc = clock["accumulation"]
    warmup = min(args.warmup, args.steps - 1)
    t0, t1 = _window(clock["step_times"], warmup, args.steps)
    first = warmup * acc
    tokens = sum(clock["tokens"][first:])
    sequences = sum(clock["batch_sequences"][first:])
    window = t1 - t0
    return {
        "name": "reference",
        "steps": args.steps - warmup,
        "wall_s": wall,
        "startup_s": clock["step_times"][0] - start,
        "window_s": window,
        "tokens": tokens,
        "tokens_per_s": tokens / window,
        "tokens_per_s_per_proc": tokens / window,
        "samples_per_s": sequences / window,
        "padding_share": 1 - tokens / sum(clock["padded_tokens"][first:]),
        "tokens_per_sequence": tokens / sequences,
        "step_seconds": window / (args.steps - warmup),
        "last_loss": clock.get("last_loss"),
        "dataset_sequences": clock["dataset_sequences"],
        "removed_sequences": clock["removed_sequences"],
    }


# ----------------------------------------------------------------------------------------------
# Rounds


def run_rounds(plan: list[tuple[str, list[str]]], args, train_args, env, cfg, teacher, data, rounds: int) -> dict[str, list[dict]]:
    """Every path once per round, in fresh processes, alternating the order from round to round."""
    results: dict[str, list[dict]] = {name: [] for name, _ in plan}
    for r in range(rounds):
        order = plan if r % 2 == 0 else list(reversed(plan))
        for i, (name, extra) in enumerate(order):
            if name == "reference":
                res = run_reference(args, cfg, teacher, data, env)
            else:
                res = run_ours(name, args, train_args, extra, args.master_port + i + r * len(plan), env)
            results[name].append(res)
            if "error" in res:
                print(f"  round {r + 1} {name}: FAILED ({res['error']})\n{res['log']}", file=sys.stderr, flush=True)
            else:
                print(
                    f"  round {r + 1}/{rounds} {name:<10} {res['tokens_per_s_per_proc']:>9,.0f} real tokens/s/proc (steps {args.warmup + 1}..{args.steps}), "
                    f"{res['samples_per_s']:,.1f} sequences/s, whole process {res['wall_s']:.1f} s (first step done at {res['startup_s']:.1f} s); "
                    f"{load_uptime()}",
                    flush=True,
                )
    return results


def summarise(runs: list[dict]) -> dict | None:
    """Median over rounds of the per-round aggregates, the pooled aggregate, and their spread."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    med = statistics.median
    out = dict(ok[0])
    out.update(
        rounds=len(ok),
        tokens_per_s=med([r["tokens_per_s"] for r in ok]),
        tokens_per_s_per_proc=med([r["tokens_per_s_per_proc"] for r in ok]),
        tokens_per_s_range=(min(r["tokens_per_s"] for r in ok), max(r["tokens_per_s"] for r in ok)),
        pooled_tokens_per_s=sum(r["tokens"] for r in ok) / sum(r["window_s"] for r in ok),
        samples_per_s=med([r["samples_per_s"] for r in ok]),
        wall_s=med([r["wall_s"] for r in ok]),
        startup_s=med([r["startup_s"] for r in ok]),
        step_seconds=med([r["step_seconds"] for r in ok]),
        padding_share=med([r["padding_share"] for r in ok]),
        tokens_per_sequence=med([r["tokens_per_sequence"] for r in ok]),
    )
    for key in ("model_tflops", "model_tflops_per_proc", "hardware_tflops_per_proc", "data_wait_share"):
        if key in ok[0]:
            out[key] = med([r[key] for r in ok])
    if "peak_memory_mb" in ok[0]:
        out["peak_memory_mb"] = max(r["peak_memory_mb"] for r in ok)
    return out


def paired_ratios(results: dict[str, list[dict]], name: str, base: str, key: str, invert: bool = False) -> list[float]:
    """Per round: name / base of `key` (base / name with invert, for times)."""
    pairs = [(a, b) for a, b in zip(results[name], results[base]) if "error" not in a and "error" not in b]
    return [(b[key] / a[key]) if invert else (a[key] / b[key]) for a, b in pairs]


# ----------------------------------------------------------------------------------------------
# Fixed cost per step and host syncs


def overhead_section(args, env) -> dict:
    """Per-optimizer-step wall time of distill-train with a model whose compute is negligible (1 layer, hidden 8,
    8-token sequences, micro batch 2), at accumulation 1 and 4; the same configuration in the reference baseline
    (plain PyTorch); host-device syncs per optimizer step counted in the fast path."""
    from distill.config import load_config

    o = OVERHEAD
    data, tok = prepare(args.cache, o["max_seq_len"], o["vocab_size"], "full_sentences", min_seq_len=o["max_seq_len"])
    teacher = teacher_for(args.cache, o["teacher_size"], o["vocab_size"], tok)
    sub = argparse.Namespace(**vars(args))
    sub.procs, sub.steps, sub.warmup = 1, args.overhead_steps, min(args.overhead_warmup, args.overhead_steps - 1)
    base_args = [
        "--config",
        args.config,
        f"teacher.path={teacher}",
        f"data.path={data}",
        f"train.max_steps={sub.steps}",
        f"checkpoint.every_steps={10**6}",
        "checkpoint.keep_last=1",
        "train.log_every=1000",
        "student.init_layers=null",
        *o["overrides"],
    ]
    print(
        f"\nfixed cost per optimizer step: {TEACHER_SIZES[o['teacher_size']]} (layers, hidden, heads, ffn) teacher, 1-layer student, vocabulary "
        f"{o['vocab_size']}, {o['max_seq_len']}-token sequences, micro batch {o['micro_batch']}; {sub.steps} steps, the last "
        f"{sub.steps - sub.warmup} measured; {load_uptime()}",
        flush=True,
    )
    out: dict = {"per_step": {}, "load": load_uptime()}
    for acc in o["accumulations"]:
        batch = [f"train.micro_batch={o['micro_batch']}", f"train.global_batch={o['micro_batch'] * acc}"]
        res = run_ours(f"fast acc {acc}", sub, base_args + batch, [], args.master_port + 50 + acc, env)
        if "error" in res:
            print(f"  fast, accumulation {acc}: FAILED ({res['error']})\n{res['log']}", file=sys.stderr)
            continue
        out["per_step"][acc] = res["step_seconds"]
        print(
            f"  distill-train, accumulation {acc}: {1e3 * res['step_seconds']:.2f} ms per optimizer step ({res['steps']} steps, "
            f"{1e3 * res['window_s']:.0f} ms), whole process {res['wall_s']:.1f} s",
            flush=True,
        )
    cfg = load_config(
        args.config,
        base_args[2:] + [f"train.micro_batch={o['micro_batch']}", f"train.global_batch={o['micro_batch']}", "output_dir=unused"],
    )
    ref = run_reference(sub, cfg, teacher, data, env)
    if "error" in ref:
        print(f"  reference: FAILED ({ref['error']})\n{ref['log']}", file=sys.stderr)
    else:
        out["reference_per_step"] = ref["step_seconds"]
        print(f"  reference (plain PyTorch, same model and batch): {1e3 * ref['step_seconds']:.2f} ms per step", flush=True)
    if 1 in out["per_step"] and len(out["per_step"]) > 1:
        hi = max(out["per_step"])
        per_micro = (out["per_step"][hi] - out["per_step"][1]) / (hi - 1)
        out["per_micro_step"] = per_micro
        out["per_optimizer_step_fixed"] = out["per_step"][1] - per_micro
        noisy = (
            " (negative: the two runs disagree by more than the difference, too noisy to split)"
            if out["per_optimizer_step_fixed"] < 0
            else ""
        )
        print(
            f"  => per optimizer step {1e3 * out['per_step'][1]:.2f} ms = {1e3 * out['per_optimizer_step_fixed']:.2f} ms once per step "
            f"+ {1e3 * per_micro:.2f} ms per micro step (forward/backward of a negligible model and its bookkeeping){noisy}; "
            f"target <= {o['target_ms']:.0f} ms per step",
            flush=True,
        )
        if "reference_per_step" in out:
            print(f"     above plain PyTorch: {1e3 * (out['per_step'][1] - out['reference_per_step']):+.2f} ms per step", flush=True)
    # host syncs per optimizer step (a separate, counted run: the counting hook slows the loop)
    sync_sub = argparse.Namespace(**vars(sub))
    sync_sub.steps, sync_sub.warmup = o["sync_steps"], 1
    acc = max(o["accumulations"])
    counts = {}
    for a in sorted({1, acc}):
        batch = [f"train.micro_batch={o['micro_batch']}", f"train.global_batch={o['micro_batch'] * a}"]
        sync_args = [x if not x.startswith("train.max_steps=") else f"train.max_steps={sync_sub.steps}" for x in base_args] + batch
        res = run_ours(f"syncs acc {a}", sync_sub, sync_args, [], args.master_port + 60 + a, env, {"STEP_PROBE_SYNCS": "1"})
        if "error" in res:
            print(f"  sync count, accumulation {a}: FAILED ({res['error']})\n{res['log']}", file=sys.stderr)
            continue
        counts[a] = res["syncs"]
    out["syncs"] = counts
    for a, syncs in counts.items():
        print_syncs(syncs, a)
    if args.overhead_profile:
        prof = os.path.join(args.cache, "overhead.prof")
        profile_sub = argparse.Namespace(**vars(sub))
        batch = [f"train.micro_batch={o['micro_batch']}", f"train.global_batch={o['micro_batch']}"]
        res = run_ours(
            "profiled",
            profile_sub,
            base_args + batch,
            [],
            args.master_port + 70,
            env,
            {
                "STEP_PROBE_CPROFILE": prof,
                "STEP_PROBE_PROFILE_FROM": str(sub.warmup),
                "STEP_PROBE_PROFILE_STEPS": str(sub.steps - sub.warmup),
            },
        )
        if "error" not in res:
            out["profile"] = print_profile(prof, res["profiled_steps"], res["step_seconds"])
    return out


def sync_summary(syncs: dict) -> dict:
    """Per optimizer step after the first (which includes one-time set-up): max count by kind."""
    steps = syncs["per_step"][1:] or syncs["per_step"]
    kinds = sorted({k for s in steps for k in s})
    return {k: max(s.get(k, 0) for s in steps) for k in kinds}


def print_syncs(syncs: dict, accumulation: int) -> None:
    summary = sync_summary(syncs)
    python_visible = sum(v for k, v in summary.items() if k != "cuda_sync_debug")
    n_steps = max(1, len(syncs["per_step"]))
    print(
        f"  host-device syncs per optimizer step (fast path, accumulation {accumulation}, device {syncs['device']}): {python_visible} "
        f"({', '.join(f'{k} {v}' for k, v in summary.items())}); target {OVERHEAD['target_syncs']}. By call site, per step:"
    )
    for site, entry in sorted(syncs["sites"].items(), key=lambda kv: -kv[1]["count"]):
        print(f"    {entry['count'] / n_steps:>5.2f}  {entry['kind']:<8} {entry['what']:<34} {site}")


def print_profile(path: str, steps: int, step_seconds: float, top: int = 18) -> dict:
    """cProfile of the measured steps: time per step by package and the functions with the most own time."""
    import pstats

    stats = pstats.Stats(path)
    by_package: dict[str, float] = {}
    rows = []
    for (filename, line, func), (cc, nc, tottime, cumtime, callers) in stats.stats.items():
        package = _package_of(filename)
        by_package[package] = by_package.get(package, 0.0) + tottime
        rows.append((tottime, cumtime, nc, f"{package}: {os.path.basename(filename)}:{line} {func}"))
    steps = max(1, steps)
    total = sum(by_package.values())
    print(
        f"  where an overhead step goes (cProfile of {steps} steps, own time; profiling inflates Python-heavy parts, "
        f"{1e3 * total / steps:.1f} ms profiled per step vs {1e3 * step_seconds:.2f} ms unprofiled):"
    )
    for package, seconds in sorted(by_package.items(), key=lambda kv: -kv[1])[:10]:
        print(f"    {1e3 * seconds / steps:>7.2f} ms {100 * seconds / total:>5.1f}%  {package}")
    print("  functions with the most own time per step:")
    for tottime, cumtime, calls, where in sorted(rows, reverse=True)[:top]:
        print(
            f"    {1e3 * tottime / steps:>7.3f} ms own, {1e3 * cumtime / steps:>7.2f} ms cumulative, {calls / steps:>6.1f} calls  {where}"
        )
    return {"by_package_ms": {k: 1e3 * v / steps for k, v in by_package.items()}}


def _package_of(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins (C calls: torch ops, tensor methods)"
    parts = filename.split(os.sep)
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].split(".")[0]
    for name in ("distill", "bench", "data_prep"):
        if name in parts:
            return f"{name} (this repository)"
    return "python standard library"


# ----------------------------------------------------------------------------------------------
# Input pipeline ceiling


def loader_rate(data: str, global_batch: int, micro_batch: int, group_steps: int, seconds: float, seed: int = 56) -> dict:
    """Real tokens/s that the reader + collator (TokenSequences, StepPlan, MicroBatches, BatchedMaskingCollator, as the trainer
    builds them) deliver on one core, in this process with one thread."""
    import numpy as np
    import torch

    from data_prep.manifest import load_manifest
    from distill.data.masking import BatchedMaskingCollator, MaskingPolicy
    from distill.data.reader import MicroBatches, StepPlan, TokenSequences

    torch.set_num_threads(1)
    manifest = load_manifest(data)
    sequences = TokenSequences(data, "train", manifest)
    steps = max(1, 10**6 // global_batch)
    plan = StepPlan(len(sequences), global_batch, micro_batch, 1, 0, seed, sequences.lengths, group_steps)
    counts = np.load(os.path.join(data, manifest.token_counts["path"]))
    tok = manifest.tokenizer
    policy = MaskingPolicy.with_smoothing(
        counts,
        0.7,
        mask_id=tok.special_token_ids["mask"],
        pad_id=tok.special_token_ids["pad"],
        vocab_size=tok.vocab_size,
        special_ids=tok.all_special_ids,
    )
    items = MicroBatches(sequences, plan, BatchedMaskingCollator(policy, seed, 8), 0, steps)  # the trainer's collator, GPU padding
    items[0]  # first touch (memory map, caches)
    tokens = padded = n = 0
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    while time.perf_counter() - wall0 < seconds and n < len(items):
        batch = items[n]
        tokens += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
        n += 1
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    return {
        "micro_batches": n,
        "tokens": tokens,
        "tokens_per_cpu_s": tokens / cpu,
        "tokens_per_wall_s": tokens / wall,
        "tokens_per_sequence": tokens / (n * micro_batch),
        "padding_share": 1 - tokens / padded,
        "cpu_s": cpu,
        "wall_s": wall,
    }


def loader_section(args) -> dict:
    """Reader + collator rate per loader core, next to what one GPU consumes at the target."""
    per_token = per_token_mflops(BERT_BASE, DISTILBERT_STUDENT, 128, 0.15)["total"] * 1e6
    gpu_need = GPU_TARGET["peak_tflops"] * 1e12 * GPU_TARGET["mfu"] / per_token
    cases = [
        (
            "HF-distiller config: ~64-token sequences, vocab 1000, micro 32, grouped over 32 steps",
            prepare(args.cache, 128, HF_DISTILLER["vocab_size"], "document", HF_DISTILLER["short_docs"])[0],
            32,
            32,
            32,
        ),
        (
            "distilbert recipe shape: full 128-token windows, vocab 8000, micro 32 of a 4096 batch",
            prepare(args.cache, 128, 8000, "full_sentences")[0],
            4096,
            32,
            1,
        ),
    ]
    print(f"\ninput pipeline ceiling (one core, one thread, in process; {load_uptime()}):", flush=True)
    out = {"gpu_need_tokens_per_s": gpu_need, "gpu": GPU_TARGET["name"], "cases": []}
    for label, data, global_batch, micro, group in cases:
        r = loader_rate(data, global_batch, micro, group, args.loader_seconds)
        rate = r["tokens_per_cpu_s"]
        r.update(label=label, cores_per_gpu=gpu_need / rate, default_workers_share=2 * rate / gpu_need)
        out["cases"].append(r)
        print(
            f"  {label}: {rate / 1e6:.2f} M real tokens/s per loader core (CPU time; {r['tokens_per_wall_s'] / 1e6:.2f} M per wall second on "
            f"this machine now), {r['tokens_per_sequence']:.1f} real tokens per sequence, {100 * r['padding_share']:.1f}% padding, "
            f"{r['micro_batches']} micro batches",
            flush=True,
        )
        print(
            f"    one GPU at the target consumes {gpu_need / 1e6:.2f} M tokens/s ({GPU_TARGET['name']}, {per_token / 1e6:.0f} MFLOP/token): "
            f"{gpu_need / rate:.2f} loader cores per GPU; the loader becomes the limit below {gpu_need / rate:.2f} cores per GPU "
            f"({math.ceil(8 * gpu_need / rate)} cores for the 8 GPUs of a node); one worker delivers {rate / gpu_need:.2f}x the need, "
            f"data.num_workers=2 (the GPU default) {2 * rate / gpu_need:.2f}x",
            flush=True,
        )
    return out


# ----------------------------------------------------------------------------------------------


def find_max_micro_batch(args, train_args, extra, port, env, start: int = 8, cap: int = 8192) -> int:
    """Double the micro batch (3 steps each, global = micro x procs) until a run fails with out-of-memory."""
    best, micro = 0, start
    saved_steps, saved_warmup = args.steps, args.warmup
    args.steps, args.warmup = 3, 1
    try:
        while micro <= cap:
            res = run_ours(
                f"micro {micro}",
                args,
                train_args,
                [*extra, f"train.micro_batch={micro}", f"train.global_batch={micro * args.procs}"],
                port,
                env,
            )
            if "error" in res:
                if res["error"] != "out of memory":
                    print(res["log"], file=sys.stderr)
                break
            print(
                f"  micro batch {micro}: fits, peak {res['peak_memory_mb']:,.0f} MiB, {res['tokens_per_s_per_proc']:,.0f} tokens/s/proc",
                flush=True,
            )
            best, micro = micro, micro * 2
    finally:
        args.steps, args.warmup = saved_steps, saved_warmup
    return best


def print_breakdown(profiled: list[dict], timed: dict) -> None:
    """Milliseconds per step and share of each phase (rank 0) for every profiled path."""
    from distill.train.profiling import PHASES

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
    print("other = step time not in any phase (host bookkeeping, metrics, logging, the next batch's wait between steps)")


def print_table(summaries: dict[str, dict], base_name: str | None, peak: float | None, gpu: bool) -> None:
    mem = "GPU allocated" if gpu else "CPU RSS"
    header = (
        f"{'path':<28} {'tok/s/proc':>11} {'range over rounds':>19} {'samples/s':>10} {'step ms':>8} {'TFLOP/s/proc':>13} {'MFU':>7} "
        f"{'peak ' + mem:>18} {'data wait':>10} {'padding':>8} {'process s':>10} {'1st step s':>10} {'vs ' + (base_name or '-'):>13}"
    )
    print(header)
    print("-" * len(header))
    base = summaries.get(base_name) if base_name else None
    for name, r in summaries.items():
        if r is None:
            print(f"{name:<28} failed")
            continue
        lo, hi = r["tokens_per_s_range"]
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        tflops = f"{r['model_tflops_per_proc']:.4f}" if "model_tflops_per_proc" in r else "-"
        mfu = f"{100 * r['model_tflops_per_proc'] / peak:.1f}%" if peak and "model_tflops_per_proc" in r else "-"
        memory = f"{r['peak_memory_mb']:,.0f} MiB" if "peak_memory_mb" in r else "-"
        wait = f"{100 * r['data_wait_share']:.1f}%" if "data_wait_share" in r else "-"
        print(
            f"{name:<28} {r['tokens_per_s_per_proc']:>11,.0f} {f'{lo:,.0f}-{hi:,.0f}':>19} {r['samples_per_s']:>10,.1f} {1e3 * r['step_seconds']:>8.1f} "
            f"{tflops:>13} {mfu:>7} {memory:>18} {wait:>10} {100 * r['padding_share']:>7.1f}% {r['wall_s']:>10.1f} {r['startup_s']:>10.1f} {ratio:>13}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--procs", type=int, default=2, help="processes (GPUs) on this machine")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 30; --hf-distiller-config: 81)")
    parser.add_argument("--warmup", type=int, help="first steps left out of the measurement (default 5: steps 6.. are measured)")
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds, each path in a fresh process per round (default 1; --hf-distiller-config: 12)"
    )
    parser.add_argument("--data", help="prepared dataset (default: the demo corpus, prepared here)")
    parser.add_argument("--teacher", help="teacher directory (default: random BERT of --teacher-size)")
    parser.add_argument("--teacher-size", choices=sorted(TEACHER_SIZES), default="demo")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument(
        "--packing",
        choices=["document", "full_sentences"],
        default="document",
        help="distill-prep packing of the demo corpus: full_sentences = full windows, no padding (GPU figures)",
    )
    parser.add_argument(
        "--paths", help="comma-separated: fast, compile, baseline, reference (default fast,baseline; --hf-distiller-config: reference,fast)"
    )
    parser.add_argument("--ablate", action="store_true", help="also run the fast path with each piece switched off (or compile on) alone")
    parser.add_argument(
        "--ablations",
        help="with --ablate: only the ablations whose name contains one of these comma-separated words (e.g. 'lean,masking,padding')",
    )
    parser.add_argument(
        "--hf-distiller-config",
        action="store_true",
        help="issue 16: 1 process, fp32, 4x128x2 random BERT teacher, 2-layer "
        "DistilBERT, WordPiece 1000, ~64-token sequences, batch 32, alpha 5/2/1, against the reference distiller run in the same "
        "session; also the fixed cost per step, syncs per step and the loader ceiling",
    )
    parser.add_argument(
        "--reference-sampler",
        choices=["plan", "own"],
        default="plan",
        help="batches of the reference baseline: plan = the same rows per micro batch as distill-train (default), own = the "
        "reference's GroupedBatchSampler (its first batches hold shorter sequences than average)",
    )
    parser.add_argument("--skip", default="", help="with --hf-distiller-config: comma-separated sections to leave out: overhead, loader")
    parser.add_argument("--overhead", action="store_true", help="only the fixed cost per optimizer step and the host syncs per step")
    parser.add_argument("--overhead-steps", type=int, default=OVERHEAD["steps"])
    parser.add_argument("--overhead-warmup", type=int, default=OVERHEAD["warmup"])
    parser.add_argument(
        "--overhead-profile", action="store_true", help="also cProfile the overhead run's measured steps and print where they go"
    )
    parser.add_argument("--loader-ceiling", action="store_true", help="only the input pipeline's real tokens/s per loader core")
    parser.add_argument("--loader-seconds", type=float, default=5.0, help="how long each loader measurement runs")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run fast (and baseline) with train.profile_phases=true and print where a "
        "step's time goes (data, teacher, student forward, loss, backward, optimizer, comm); phases are serialised, so only shares count",
    )
    parser.add_argument(
        "--profile-paths", default="fast,baseline", help="--profile: the paths profiled (baseline only if it is in --paths)"
    )
    parser.add_argument(
        "--find-max-micro-batch", action="store_true", help="largest micro batch that fits, for the fast and the baseline path"
    )
    parser.add_argument(
        "--micro-batch-range",
        type=int,
        nargs=2,
        default=(8, 8192),
        metavar=("START", "CAP"),
        help="--find-max-micro-batch: doubling from START up to CAP",
    )
    parser.add_argument("--peak-tflops", type=float, help="peak per process for MFU (default: datasheet on GPU, measured matmul on CPU)")
    parser.add_argument("--fast", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides of the fast path only")
    parser.add_argument("--json", help="write every figure to this JSON file")
    parser.add_argument("--cache", default=os.path.join(REPO, "runs", "bench_cache"))
    parser.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29910")))
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe (every path)")
    args = parser.parse_args()
    hf = args.hf_distiller_config
    overrides = list(args.overrides)
    if hf:
        args.procs, args.vocab_size, args.teacher_size, args.max_seq_len = (
            HF_DISTILLER[k] for k in ("procs", "vocab_size", "teacher_size", "max_seq_len")
        )
        overrides = HF_DISTILLER["overrides"] + overrides
    args.steps = args.steps or (HF_DISTILLER["steps"] if hf else 30)
    args.warmup = HF_DISTILLER["warmup"] if args.warmup is None else args.warmup
    rounds = args.rounds or (HF_DISTILLER["rounds"] if hf else 1)
    os.makedirs(args.cache, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    threads = int(env.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // args.procs))
    env["OMP_NUM_THREADS"] = str(threads)
    report: dict = {"load_at_start": load_uptime(), "args": vars(args)}

    def finish(code: int) -> int:
        report["load_at_end"] = load_uptime()
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=1, default=str)
        return code

    if args.overhead or args.loader_ceiling:
        if args.overhead:
            report["overhead"] = overhead_section(args, env)
        if args.loader_ceiling:
            report["loader"] = loader_section(args)
        return finish(0)

    tokenizer = None
    data = args.data
    if not data:
        data, tokenizer = prepare(args.cache, args.max_seq_len, args.vocab_size, args.packing, HF_DISTILLER["short_docs"] if hf else None)
    teacher = args.teacher or teacher_for(args.cache, args.teacher_size, args.vocab_size, tokenizer or os.path.join(data, "tokenizer"))
    train_args = [
        "--config",
        args.config,
        f"teacher.path={teacher}",
        f"data.path={data}",
        f"train.max_steps={args.steps}",
        f"checkpoint.every_steps={10**6}",
        "checkpoint.keep_last=1",
        "train.log_every=10",
        "student.init_layers=null",
        *overrides,
    ]

    import torch

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores, {threads} threads per process)"
    precision = "fp32" if any(o.startswith("train.precision=fp32") for o in overrides) or not gpu else "bf16"
    peak = args.peak_tflops or (gpu_peak_tflops(device, precision) if gpu else measured_matmul_tflops(threads))
    peak_note = (
        "--peak-tflops" if args.peak_tflops else ("datasheet dense " + precision if gpu else f"measured fp32 matmul, {threads} threads")
    )
    print(
        f"recipe {args.config} | teacher {args.teacher_size if not args.teacher else teacher} | {args.procs} process(es) on {device} | "
        f"{load_uptime()}",
        flush=True,
    )
    print(f"overrides: {' '.join(overrides) or '-'}", flush=True)
    report.update(device=device, peak_tflops=peak, peak_note=peak_note, procs=args.procs)

    if args.find_max_micro_batch:
        for name, extra in (("fast", args.fast), ("baseline", BASELINE)):
            print(f"{name}: searching the largest micro batch at max_seq_len {args.max_seq_len}", flush=True)
            best = find_max_micro_batch(args, train_args, extra, args.master_port, env, *args.micro_batch_range)
            print(f"{name}: largest micro batch that fits: {best or 'none'}", flush=True)
            report.setdefault("largest_micro_batch", {})[name] = best
        return finish(0)

    known = {
        "fast": list(args.fast),
        "compile": [*args.fast, *COMPILE],
        "bf16": [*args.fast, *BF16],
        "baseline": BASELINE,
        "reference": None,
    }
    wanted = [p.strip() for p in (args.paths or (HF_DISTILLER["paths"] if hf else "fast,baseline")).split(",") if p.strip()]
    unknown = [p for p in wanted if p not in known]
    if unknown:
        parser.error(f"--paths: unknown {unknown} (known: {', '.join(known)})")
    if "reference" in wanted and args.procs != 1:
        parser.error("the reference path runs one process: add --procs 1 (or leave it out of --paths)")
    plan = [(p, known[p]) for p in wanted]
    if args.ablate:
        words = [w.strip() for w in (args.ablations or "").split(",") if w.strip()]
        plan += [
            (name, [*args.fast, *extra])
            for name, extra in (ABLATIONS_GPU if gpu else ABLATIONS_CPU)
            if not words or any(w in name for w in words)
        ]
    cfg = None
    if "reference" in wanted:
        from distill.config import load_config

        cfg = load_config(args.config, train_args[2:] + ["output_dir=unused"])
    print(
        f"{rounds} interleaved round(s) of {', '.join(n for n, _ in plan)}: {args.steps} optimizer steps each, steps {args.warmup + 1}..{args.steps} "
        f"measured",
        flush=True,
    )
    results = run_rounds(plan, args, train_args, env, cfg, teacher, data, rounds)
    summaries = {name: summarise(runs) for name, runs in results.items()}
    if args.profile:
        for name in args.profile_paths.split(","):
            if name == "fast" or name in wanted:
                res = run_ours(
                    f"{name} (profiled)", args, train_args, [*known[name], "train.profile_phases=true"], args.master_port + 99, env
                )
                results[f"{name} (profiled)"] = [res]
                summaries[f"{name} (profiled)"] = summarise([res])
    report["rounds"] = {name: [{k: v for k, v in r.items() if k != "log"} for r in runs] for name, runs in results.items()}
    report["summary"] = summaries
    ok = {n: s for n, s in summaries.items() if s is not None}
    if not ok:
        return finish(1)
    first = next(s for s in ok.values() if "flops_per_token" in s) if any("flops_per_token" in s for s in ok.values()) else None
    print()
    base_name = "reference" if "reference" in ok else ("baseline" if "baseline" in ok else None)
    if first:
        print(
            f"global batch {first['global_batch']}, micro batch {first['micro_batch']}, max_seq_len {args.max_seq_len}, "
            f"{first['steps']} measured steps of {args.steps} per run, {rounds} round(s); {first['tokens_per_sequence']:.1f} real tokens per sequence"
        )
        fpt = first["flops_per_token"]
        print(
            f"model MFLOP per real token ({first['name']}): teacher fwd {fpt['teacher_fwd']:.2f}, student fwd+bwd {fpt['student_fwd_bwd']:.2f}, "
            f"heads {fpt['teacher_head'] + fpt['student_head_fwd_bwd']:.2f}, total {fpt['total']:.2f}"
        )
    print(f"peak for MFU: {peak:.3g} TFLOP/s per process ({peak_note})")
    print(
        "tokens/s: aggregate over the measured steps of each run (total real tokens / their wall time), median over rounds; "
        "process s: whole process at the same number of steps; 1st step s: process start to the end of the first optimizer step "
        "(start-up + one step); medians over rounds"
    )
    print_table(ok, base_name, peak, gpu)
    if "reference" in ok:
        ref = ok["reference"]
        print(
            f"reference: {ref['dataset_sequences']:,} sequences after its filters ({ref['removed_sequences']} removed), "
            f"{ref['tokens_per_sequence']:.1f} real tokens per sequence in its batches"
        )
    profiled = [s for s in ok.values() if s.get("phase_seconds")]
    if profiled:
        print_breakdown(profiled, ok)
    if base_name:
        print()
        for name in ok:
            if name == base_name or name.endswith("(profiled)"):
                continue
            per_step = paired_ratios(results, name, base_name, "tokens_per_s")
            whole = paired_ratios(results, name, base_name, "wall_s", invert=True)
            if not per_step:
                continue
            pooled = ok[name]["pooled_tokens_per_s"] / ok[base_name]["pooled_tokens_per_s"]
            line = (
                f"{name} / {base_name}: per step {statistics.median(per_step):.2f}x (median of {len(per_step)} rounds, per round "
                f"{min(per_step):.2f}-{max(per_step):.2f}, pooled {pooled:.2f}x); whole process at {args.steps} steps "
                f"{statistics.median(whole):.2f}x ({ok[name]['wall_s']:.1f} s vs {ok[base_name]['wall_s']:.1f} s; first step done at "
                f"{ok[name]['startup_s']:.1f} s vs {ok[base_name]['startup_s']:.1f} s)"
            )
            if base_name == "reference" and name == "bf16":
                line += "\n  bf16 against the reference's fp32: a different arithmetic (the reference has no bf16 path on a CPU); not the issue's verdict"
            elif base_name == "reference":
                t = HF_DISTILLER["targets"]
                met = (statistics.median(per_step) >= t["per_step"], statistics.median(whole) >= t["whole_process"])
                line += (
                    f"\n  target >= {t['per_step']}x per step: {'met' if met[0] else 'not met'}; >= {t['whole_process']}x whole process: "
                    f"{'met' if met[1] else 'not met'}"
                )
                report.setdefault("verdict", {})[name] = {
                    "per_step": statistics.median(per_step),
                    "whole_process": statistics.median(whole),
                    "per_step_met": met[0],
                    "whole_process_met": met[1],
                }
            print(line)
        if hf and "reference" in ok and "fast" in ok:
            issue = HF_DISTILLER["issue"]
            ratio = statistics.median(paired_ratios(results, "reference", "fast", "tokens_per_s"))
            print(
                f"consistency with the issue (the real reference distiller there: {issue['reference']:,.0f} vs fast {issue['fast']:,.0f} tokens/s, "
                f"reference/fast {issue['reference'] / issue['fast']:.2f}): here reference/fast {ratio:.2f} (per round median)"
            )
    if hf:
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        if "overhead" not in skip:
            report["overhead"] = overhead_section(args, env)
        if "loader" not in skip:
            report["loader"] = loader_section(args)
    print(f"\nmachine: {report['load_at_start']} at start, {load_uptime()} at the end")
    return finish(0 if all("error" not in r for runs in results.values() for r in runs) else 1)


if __name__ == "__main__":
    sys.exit(main())
