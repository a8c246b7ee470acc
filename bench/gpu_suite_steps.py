"""One step of bench/gpu_suite.sh: `python bench/gpu_suite_steps.py STEP --out OUT [--smoke]`.

Runs the step's benchmark, then writes its figures to OUT/STEP.json atomically (temp file + rename): a file that
exists is complete, so the suite skips the step on a rerun. `summary OUT` writes OUT/summary.md from the results.
Steps (in the suite's priority order):
  a1  BERT-base -> 6 layers, seq 128, ZeRO-1: fast vs baseline, profiled phases, MFU (teacher / student apart),
      peak memory (torch.cuda.max_memory_allocated) beside distill-train --check's estimate
  a2  the largest micro batch that fits at seq 128 (bounded doubling search), fast and baseline
  a3  as a1 at ZeRO-2          a4  as a1 at seq 512
  b   configs/llm_kd.yaml, a random ~1B Llama-shaped teacher (16 x 2048, vocabulary 128,256) -> 8 layers, 2048 tokens:
      chunked vs full logits
  b2  as b (chunked), with activation checkpointing of every student layer (train.activation_checkpointing=1): its cost
      in tokens/s and what it saves in peak memory against b's chunked row (not in the smoke run: b covers its code)
  c   distill-cache (top-k 64) of the same teacher over the same data: tokens/s, bytes/token
  d0 d1 ...  bench/quality.py --scale gpu, one call each: the teacher, then each variant x seed, then the table
--smoke: every step at tiny sizes on a CPU (part of the test suite, tests/e2e/test_gpu_suite.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, REPO)
sys.path.insert(0, BENCH)
PY = sys.executable
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
QUALITY_PLAN = ["teacher"] + [f"{v}{s}" for s in (1, 2) for v in "abcd"] + ["table"]
QUALITY_SMOKE_PLAN = ["teacher", "a1", "table"]


def write_result(out: str, step: str, result: dict) -> str:
    path = os.path.join(out, f"{step}.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(result, handle, indent=1, default=str)
    os.replace(path + ".tmp", path)
    return path


def sh(cmd: list[str], log: str | None = None) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-20000:])
    sys.stderr.write(proc.stderr[-20000:])
    if proc.returncode:
        name = cmd[2] if cmd[1:2] == ["-m"] else os.path.basename(cmd[1] if cmd[0] == PY else cmd[0])
        raise SystemExit(f"{name} exited {proc.returncode}")
    return proc


# ----------------------------------------------------------------------------------------------
# a: BERT-base throughput


def bert_setup(smoke: bool) -> dict:
    if smoke:
        return dict(
            config="configs/demo.yaml",
            size="tiny",
            student=["student.num_layers=1"],  # teacher 1 x 8 (train_throughput's "tiny"), student 1 layer
            vocab=1000,
            steps=3,
            warmup=1,
            seq=(32, 64),
            micro=4,
            cap=(2, 4),  # one doubling
            profile="fast",  # the baseline is profiled on the GPU only
        )
    return dict(
        config="configs/distilbert.yaml",
        size="base",
        student=[],
        vocab=30522,
        steps=30,
        warmup=5,
        seq=(128, 512),
        micro=256,
        cap=(128, 2048),
        profile="fast,baseline",
    )


def throughput(out: str, name: str, extra: list[str]) -> dict:
    """bench/train_throughput.py run in this process (one interpreter start less per call: most of a smoke step)."""
    import train_throughput

    json_path = os.path.join(out, "work", f"{name}.throughput.json")
    argv = ["train_throughput.py", "--cache", os.path.join(out, "work", "cache"), "--json", json_path, *extra]
    print("+ " + " ".join(argv), flush=True)
    saved, sys.argv = sys.argv, argv
    try:
        rc = train_throughput.main()
    finally:
        sys.argv = saved
    if rc:
        raise SystemExit(f"train_throughput.py exited {rc}")
    with open(json_path) as handle:
        return json.load(handle)


def memory_estimate_mib(config: str, overrides: list[str], world: int = 1) -> dict:
    """distill-train --check's estimate (distill/train/memory_estimate.py) for the config a throughput run used."""
    import torch

    from distill.config import load_config
    from distill.train.memory_estimate import GIB, estimate_from_preflight
    from distill.train.preflight import preflight

    cfg = load_config(os.path.join(REPO, config), [*overrides, "output_dir=unused"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = preflight(cfg, world, device)
    est = estimate_from_preflight(cfg, world, device, found)
    if est is None:
        return {"error": "; ".join(found.problems) or "no estimate"}
    return {"total_mib": est.total / 2**20, "parts_mib": {k: v / 2**20 for k, v in est.parts.items()}, "total_gib": est.total / GIB}


def step_a(out: str, step: str, smoke: bool) -> dict:
    s = bert_setup(smoke)
    from train_throughput import prepare, teacher_for

    seq = s["seq"][1] if step == "a4" else s["seq"][0]
    stage = 2 if step == "a3" else 1
    base = ["--config", s["config"], "--teacher-size", s["size"], "--vocab-size", str(s["vocab"]), "--procs", "1"]
    base += ["--packing", "full_sentences", "--max-seq-len", str(seq), "--steps", str(s["steps"]), "--warmup", str(s["warmup"])]
    micro = max(1, s["micro"] * 128 // seq)
    batch = [f"train.global_batch={micro}", f"train.micro_batch={micro}", f"deepspeed.zero_stage={stage}", *s["student"]]
    if step == "a2":
        res = throughput(out, step, [*base, *s["student"], "--find-max-micro-batch", "--micro-batch-range", *map(str, s["cap"])])
        return {"seq": seq, "largest_micro_batch": res.get("largest_micro_batch"), "device": res.get("device")}
    paths = "fast,baseline" if step == "a1" or not smoke else "fast"  # smoke: the baseline once
    res = throughput(
        out, step, [*base, "--paths", paths, *(["--profile", "--profile-paths", s["profile"]] if step == "a1" else []), *batch]
    )
    data, tok = prepare(os.path.join(out, "work", "cache"), seq, s["vocab"], "full_sentences")
    teacher = teacher_for(os.path.join(out, "work", "cache"), s["size"], s["vocab"], tok)
    estimate = memory_estimate_mib(s["config"], [f"teacher.path={teacher}", f"data.path={data}", "student.init_layers=null", *batch])
    return {"seq": seq, "zero_stage": stage, "micro_batch": micro, "device": res.get("device"), "peak_tflops": res.get("peak_tflops"),
            "summary": res.get("summary"), "memory_estimate": estimate}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# b, c: a ~1B Llama-shaped teacher with a 128k vocabulary, random weights


def llm_assets(out: str, smoke: bool) -> tuple[str, str]:
    """A byte-level BPE tokenizer on the demo corpus, the corpus prepared `--packing causal`, a random Llama teacher."""
    work = os.path.join(out, "work", "llm_smoke" if smoke else "llm")
    seq = 32 if smoke else 2048
    tok_dir, data, teacher = (os.path.join(work, d) for d in ("tokenizer", "data", "teacher"))
    corpus = os.path.join(out, "work", "corpus")
    if not os.path.isdir(corpus):
        from distill.tools.demo_assets import write_corpus

        write_corpus(corpus + ".tmp")
        os.replace(corpus + ".tmp", corpus)
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train(sorted(os.path.join(corpus, f) for f in os.listdir(corpus)), trainer)
        e = "<|endoftext|>"
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=e, eos_token=e, pad_token=e).save_pretrained(tok_dir)
    if not os.path.exists(os.path.join(data, "manifest.json")):
        sh([os.path.join(os.path.dirname(PY), "distill-prep"), "--input", corpus, "--tokenizer", tok_dir, "--output", data, "--packing",
            "causal", "--max-seq-len", str(seq), "--validation-fraction", "0.01", "--overwrite"])  # fmt: skip
    if not os.path.exists(os.path.join(teacher, "config.json")):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        shape = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=2000
        )
        if not smoke:  # ~1.5B with its untied 128k head and embeddings (Llama-3.2-1B: 16 x 2048, FFN 8192, 32 / 8 heads)
            shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256)  # fmt: skip
        eos = tokenizer.eos_token_id
        config = AutoConfig.for_model("llama", max_position_embeddings=seq, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **shape)
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        model.save_pretrained(teacher + ".tmp")
        tokenizer.save_pretrained(teacher + ".tmp")
        os.replace(teacher + ".tmp", teacher)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # this process stays alive beside the runs it starts: hand the ~3 GB back
    return data, teacher


B_VARIANTS = {
    "b": (("chunked", []), ("full", ["loss.chunked_logits=false"])),
    "b2": (("checkpointed", ["train.activation_checkpointing=1"]),),
}


def step_b(out: str, step: str, smoke: bool) -> dict:
    data, teacher = llm_assets(out, smoke)
    steps, warmup, micro = (3, 1, 2) if smoke else (12, 3, 2)
    base = ["--config", "configs/llm_kd.yaml", "--data", data, "--teacher", teacher, "--procs", "1", "--paths", "fast"]
    base += ["--steps", str(steps), "--warmup", str(warmup), f"train.micro_batch={micro}", f"train.global_batch={micro}"]
    base += ["deepspeed.config=configs/deepspeed/zero2.json", "checkpoint.keep_last=0"]
    result: dict = {"teacher": teacher, "seq": 32 if smoke else 2048, "zero_stage": 2}
    for name, extra in B_VARIANTS[step]:
        res = throughput(out, f"b_{name}", [*base, *extra])
        result[name] = {"summary": res.get("summary"), "device": res.get("device"), "peak_tflops": res.get("peak_tflops")}
        result[name]["memory_estimate"] = memory_estimate_mib(
            "configs/llm_kd.yaml", [f"teacher.path={teacher}", f"data.path={data}", f"train.micro_batch={micro}",
                                    f"train.global_batch={micro}", "deepspeed.config=configs/deepspeed/zero2.json", *extra])  # fmt: skip
    return result


def step_c(out: str, step: str, smoke: bool) -> dict:
    data, teacher = llm_assets(out, smoke)
    path = os.path.join(out, "work", "cache_topk64" + ("_smoke" if smoke else ""))
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    start = time.time()
    split = "validation" if smoke else "train"  # smoke: the 1% validation split (~160 rows of 32 tokens)
    sh([PY, "-m", "distill.cache.cli", "--data", data, "--teacher", teacher, "--output", path, "--mode", "topk",
        "--k", "64", "--workers", "1", "--split", split, "--batch-size", "4" if smoke else "16"])  # fmt: skip
    wall = time.time() - start
    with open(os.path.join(path, "manifest.json")) as handle:
        manifest = json.load(handle)
    size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    tokens = sum(part["tokens"] for part in manifest["parts"])
    stats = manifest["stats"]  # the pipeline's own figures (its run, without the process start)
    return {"split": split, "wall_s": wall, "bytes": size, "tokens": tokens, "tokens_per_s": stats["tokens_per_second"],
            "tokens_per_s_whole_process": tokens / wall, "bytes_per_token": stats["bytes_per_token"],
            "bytes_per_token_on_disk": size / tokens}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# d: the quality benchmark, one resumable call per piece


def step_d(out: str, step: str, smoke: bool) -> dict:
    index = int(step[1:])
    plan = QUALITY_SMOKE_PLAN if smoke else QUALITY_PLAN
    if index >= len(plan):
        raise SystemExit(f"{step}: the quality plan has {len(plan)} pieces (d0..d{len(plan) - 1})")
    piece = plan[index]
    scale = ["--smoke"] if smoke else ["--scale", "gpu"]
    qout = os.path.join(out, "work", "quality_smoke" if smoke else "quality_gpu")
    cmd = [PY, os.path.join(BENCH, "quality.py"), *scale, "--out", qout, "--seeds"]
    if piece == "teacher":
        cmd += ["1", "--variants"]
    elif piece == "table":  # what is trained, every variant and seed of the plan (smoke: seed 1)
        cmd += ["1", "--only-finished"] if smoke else ["1", "2", "--only-finished"]
    else:
        cmd += [piece[1], "--variants", piece[0]]
    if smoke:
        cmd += ["--skip-finetune"]
    sh(cmd)
    result = {"piece": piece, "out": qout}
    if piece == "table":
        with open(os.path.join(qout, "quality.json")) as handle:
            result["quality"] = json.load(handle)
    return result


def summary(out: str) -> None:
    """OUT/summary.md: a table of every finished step to paste into the README (pending steps say so)."""
    rows = [
        "| step | what | tokens/s/GPU | MFU | model TFLOP/s | peak memory (estimate) | data wait | vs baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(f[:-5] for f in os.listdir(out) if f.endswith(".json")):
        with open(os.path.join(out, name + ".json")) as handle:
            r = json.load(handle)
        named = [k for k in ("chunked", "full", "checkpointed") if k in r]
        if "summary" in r or named:
            variants = [(k, r[k]) for k in named] if named else [("", r)]
            for label, v in variants:
                peak = v.get("peak_tflops") or 0
                est = (v.get("memory_estimate") or r.get("memory_estimate") or {}).get("total_mib")
                summaries = v.get("summary") or {}
                base = summaries.get("baseline")
                for path, s in summaries.items():
                    if not s:
                        continue
                    mfu = f"{100 * s['model_tflops_per_proc'] / peak:.1f}%" if peak else "-"
                    ratio = f"{s['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
                    memory = f"{s['peak_memory_mb']:,.0f} MiB" + (f" ({est:,.0f})" if est and "profiled" not in path else "")
                    what = f"{name} {label} seq {r.get('seq', '')} ZeRO {r.get('zero_stage', '')} micro {s.get('micro_batch')} {path}"
                    rows.append(f"| {name} | {' '.join(what.split())} | {s['tokens_per_s_per_proc']:,.0f} | {mfu} | "
                                f"{s['model_tflops_per_proc']:.2f} | {memory} | {100 * s['data_wait_share']:.1f}% | {ratio} |")  # fmt: skip
        elif "largest_micro_batch" in r:
            rows.append(f"| {name} | largest micro batch at seq {r['seq']}: {r['largest_micro_batch']} | | | | | | |")
        elif "bytes_per_token" in r:
            rows.append(
                f"| {name} | distill-cache top-k 64: {r['tokens_per_s'] or 0:,.0f} tokens/s, {r['bytes_per_token'] or 0:,.1f} bytes/token | | | | | | |"
            )
        elif "piece" in r:
            rows.append(f"| {name} | quality {r['piece']}: done | | | | | | |")
    with open(os.path.join(out, "summary.md.tmp"), "w") as handle:
        handle.write("\n".join(rows) + "\n")
    os.replace(os.path.join(out, "summary.md.tmp"), os.path.join(out, "summary.md"))
    print("\n".join(rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", help="a1 a2 a3 a4 b b2 c d0..d9, or summary")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    os.makedirs(os.path.join(args.out, "work"), exist_ok=True)
    os.environ.update(ENV)  # for what runs in this process and starts its own (train_throughput.py's distill-train runs)
    if args.step == "summary":
        summary(args.out)
        return 0
    run = {"a": step_a, "b": step_b, "c": step_c, "d": step_d}.get(args.step[0])
    if run is None:
        p.error(f"unknown step {args.step!r}")
    start = time.time()
    result = run(args.out, args.step, args.smoke)
    result.update(step=args.step, smoke=args.smoke, seconds=time.time() - start)
    print(f"{args.step}: done in {result['seconds']:.0f} s -> {write_result(args.out, args.step, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
