"""What `teacher.source: partitioned` costs in throughput and saves in host memory: the same distillation run with the
teacher replicated on every rank and partitioned across the ranks (ZeRO-3 style), interleaved in one run of this script
on one machine; and each rank's peak host memory while it loads a larger teacher either way.

    OMP_NUM_THREADS=1 python bench/partitioned_teacher.py [--steps 30] [--rounds 2] [--out DIR] [--load-only]

Host memory of the load (first): a random 16-layer Llama, hidden 384 (28.7M parameters, 110 MiB in fp32), loaded by 2
DeepSpeed processes, a fresh pair per setting: replicated (`load_teacher`, then every weight read once, as the first
forward does: the weights may be mapped from the file until then), whole then partitioned (`load_teacher`, then
`partition`: how teacher.source=partitioned loaded before each rank read only its partition) and partitioned
(`load_partitioned`, every tensor partitioned). Each rank's peak resident memory (VmHWM, reset through /proc/self/clear_refs) above its resident memory
before the load, after a warm-up load of a tiny teacher (imports and first collectives not counted).

Data: the demo corpus (first 1500 lines of each file), a byte-level BPE tokenizer (vocab 2000) trained on it,
`distill-prep --packing causal --max-seq-len 64`. Teacher: a random 4-layer Llama, 256 wide. Runs: configs/llm_kd.yaml
(forward KL + causal LM, chunked), 2 DeepSpeed processes, student at ZeRO-2, global batch 16, micro batch 8;
the DeepSpeed JSON sets stage3_param_persistence_threshold 0, so every teacher parameter is partitioned (the
most communication). Steps/s = steps after the first `--skip` / their summed step times (metrics.jsonl); also the median step time
(the steadier figure on a shared machine), and rank 0's peak resident memory over the run (metrics.jsonl peak_memory_mb).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def sh(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:5])} ... failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def prepare(out: str) -> tuple[str, str]:
    """(teacher dir, prepared causal dataset), built once under `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from distill.tools.demo_assets import write_corpus

    teacher, data = os.path.join(out, "teacher"), os.path.join(out, "data")
    if os.path.exists(os.path.join(teacher, "config.json")) and os.path.exists(os.path.join(data, "manifest.json")):
        return teacher, data
    corpus = os.path.join(out, "corpus")
    os.makedirs(corpus, exist_ok=True)
    with tempfile.TemporaryDirectory() as full:
        write_corpus(full)
        for name in sorted(os.listdir(full)):
            lines = open(os.path.join(full, name)).read().splitlines()[:1500]
            open(os.path.join(corpus, name), "w").write("\n".join(lines) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(
        sorted(os.path.join(corpus, f) for f in os.listdir(corpus)),
        trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    eos = tokenizer.eos_token_id
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    sh(
        [
            os.path.join(BIN, "distill-prep"),
            "--input",
            corpus,
            "--tokenizer",
            teacher,
            "--output",
            data,
            "--max-seq-len",
            "64",
            "--packing",
            "causal",
            "--validation-fraction",
            "0.05",
            "--workers",
            "1",
        ]
    )
    return teacher, data


def run(out: str, name: str, teacher: str, data: str, ds_json: str, steps: int, skip: int, partition: bool, port: int) -> dict:
    run_dir = os.path.join(out, name)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (the same command would resume an old one)
    log = sh(
        [
            os.path.join(BIN, "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            "--module",
            "distill",
            "--config",
            "configs/llm_kd.yaml",
            f"teacher.path={teacher}",
            f"data.path={data}",
            f"output_dir={run_dir}",
            f"train.max_steps={steps}",
            f"checkpoint.every_steps={steps}",
            "train.global_batch=16",
            "train.micro_batch=8",
            "train.log_every=1",
            "student.dropout=0.0",
            "optim.warmup_fraction=0.0",
            f"deepspeed.config={ds_json}",
            f"teacher.source={'partitioned' if partition else 'online'}",
        ]
    )
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    times = [r["samples_seen"] / r["step"] / r["samples_per_s"] for r in rows[skip:]]
    held = re.search(r"this rank holds ([\d.]+) of ([\d.]+) MB", log)
    return {
        "steps_per_s": len(times) / sum(times),
        "median_step_s": statistics.median(times),
        "losses": [r["loss"] for r in rows],
        "held": held.groups() if held else None,
        "peak_rss_mib": max(r["peak_memory_mb"] for r in rows),
    }


def _memory_mib(key: str) -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(key + ":")) / 1024


def load_worker(mode: str, out: str, tiny: str, big: str) -> None:
    """One rank of the host-memory measurement (started by the deepspeed launcher): load `big` as `mode` after a warm-up
    load of `tiny`, write this rank's figures to OUT.rank<r>.json."""
    import gc

    import deepspeed
    import torch

    from distill.models.build import load_teacher
    from distill.teachers.partitioned import full_parameter_bytes, load_partitioned, partition, zero3_inference_config

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    ds = zero3_inference_config({"stage3_param_persistence_threshold": 0}, 1, torch.float32)

    def load(path: str):
        if mode == "partitioned":
            return load_partitioned(path, torch.float32, "sdpa", ds)
        model = load_teacher(path, torch.float32, "sdpa", torch.device("cpu"))
        if mode == "whole_then_partitioned":
            partition(model, ds)
            return model
        sum(float(p.sum()) for p in model.parameters())  # read every weight once, as the first forward does
        return model

    load(tiny)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current VmRSS
    before = _memory_mib("VmRSS")
    model = load(big)
    held = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in model.parameters())
    figures = {
        "rank": rank,
        "peak_above_start_mib": _memory_mib("VmHWM") - before,
        "resident_after_mib": _memory_mib("VmRSS") - before,
        "teacher_mib": full_parameter_bytes(model) / 2**20,
        "held_mib": held / 2**20,
    }
    with open(f"{out}.rank{rank}.json", "w") as handle:
        json.dump(figures, handle)


def load_memory(out: str, port: int) -> None:
    """Print each rank's peak host memory while it loads the 110 MiB teacher replicated, then partitioned."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny, big = os.path.join(out, "load_tiny"), os.path.join(out, "load_big")
    for path, layers, width, ffn in ((tiny, 2, 64, 112), (big, 16, 384, 1024)):
        if not os.path.exists(os.path.join(path, "config.json")):
            config = AutoConfig.for_model(
                "llama",
                vocab_size=512,
                hidden_size=width,
                intermediate_size=ffn,
                num_hidden_layers=layers,
                num_attention_heads=width // 64,
                num_key_value_heads=width // 64,
                max_position_embeddings=64,
            )
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for mode in ("replicated", "whole_then_partitioned", "partitioned"):
        prefix = os.path.join(out, f"load_{mode}")
        launch = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(port), os.path.abspath(__file__)]
        sh(launch + ["--load-worker", mode, prefix, tiny, big])
        for rank in range(2):
            f = json.load(open(f"{prefix}.rank{rank}.json"))
            print(
                f"load {mode:<22} rank {rank}: peak host memory +{f['peak_above_start_mib']:.1f} MiB above the start "
                f"(+{f['resident_after_mib']:.1f} MiB after), teacher {f['teacher_mib']:.1f} MiB, parameter bytes held "
                f"{f['held_mib']:.1f} MiB",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the rate (start-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--load-only", action="store_true", help="only the host memory of the load")
    parser.add_argument("--load-worker", nargs=4, metavar=("MODE", "OUT", "TINY", "BIG"), help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args()
    if args.load_worker:
        return load_worker(*args.load_worker)
    out = args.out or tempfile.mkdtemp(prefix="bench_partitioned_teacher_")
    load_memory(out, 29779)
    if args.load_only:
        return
    teacher, data = prepare(out)
    ds_json = os.path.join(out, "zero2_teacher_all_partitioned.json")
    with open(os.path.join(REPO, "configs", "deepspeed", "zero2.json")) as handle:
        ds = json.load(handle)
    ds.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = 0
    json.dump(ds, open(ds_json, "w"))
    rates: dict[str, list[float]] = {"replicated": [], "partitioned": []}
    medians: dict[str, list[float]] = {"replicated": [], "partitioned": []}
    for r in range(args.rounds):
        for name, partition in (("replicated", False), ("partitioned", True)):
            result = run(out, f"{name}_{r}", teacher, data, ds_json, args.steps, args.skip, partition, 29780 + r)
            rates[name].append(result["steps_per_s"])
            held = f"; teacher bytes on rank 0: {result['held'][0]} of {result['held'][1]} MB" if result["held"] else ""
            medians[name].append(result["median_step_s"])
            print(
                f"round {r} {name:<11} {result['steps_per_s']:.3f} steps/s (steps {args.skip + 1}-{args.steps}), median step "
                f"{result['median_step_s'] * 1000:.0f} ms{held}; rank 0 peak RSS {result['peak_rss_mib']:.0f} MiB; "
                f"last loss {result['losses'][-1]:.6f}",
                flush=True,
            )
    load = os.getloadavg()[0]
    mean = {k: sum(v) / len(v) for k, v in rates.items()}
    print(f"cpu count {os.cpu_count()}, load average {load:.1f}; 2 processes, OMP_NUM_THREADS={ENV['OMP_NUM_THREADS']}")
    print(
        f"replicated {mean['replicated']:.3f} steps/s, partitioned {mean['partitioned']:.3f} steps/s: "
        f"partitioned / replicated = {mean['partitioned'] / mean['replicated']:.2f} (rounds averaged); median step "
        f"{statistics.median(medians['replicated']) * 1000:.0f} ms vs {statistics.median(medians['partitioned']) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
