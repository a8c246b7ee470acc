"""Peak memory and step time of the student's forward + backward with and without activation checkpointing
(train.activation_checkpointing), side by side in one run, beside what distill-train --check's estimate says.

    python bench/activation_checkpointing.py --threads 1                      # CPU: a Llama and a BERT student, fp32
    python bench/activation_checkpointing.py --device cuda --dtype bf16 --families llama --seq 8192 --hidden 2048 --layers 16

Each family's student (random weights; Llama: sequences of --seq tokens, BERT: --micro-batch sequences of 512) runs
through the trainer's own wrapper (distill.models.build.StudentForDistillation, the forward the engine runs) with the
loss a squared mean of its last hidden states, so what is measured is the transformer's activations, not a head.
Variants: off, every layer (train.activation_checkpointing=1), every other layer (=2).

Memory: every (family, variant) runs in a fresh process that builds the student, runs one small forward + backward
(thread pools, kernels; the parameter gradients are allocated there and kept), then measures one forward + backward:
on CPU the peak resident set size above the resident size just before it (VmHWM, reset through /proc/self/clear_refs;
MALLOC_MMAP_THRESHOLD_ is set so that glibc returns large freed blocks at once and the resident size follows the live
tensors), on CUDA torch.cuda.max_memory_allocated above memory_allocated. Beside it: the student activations that
distill/train/memory_estimate.py counts for the same shape and setting.
Time: one more fresh process per family runs the variants interleaved, `--rounds` times, rotating the order; wall and
CPU time of forward + backward, ratios of medians against `off`. The loss and the global gradient norm of every variant
are printed (they are equal: same weights, same inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANTS = {"off": 0, "every layer": 1, "every other layer": 2}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def shape_of(args, family: str):
    """(Hugging Face config, auto class, (sequences, tokens each)) of `family`'s student."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    h, layers = args.hidden, args.layers
    if family == "llama":
        config = AutoConfig.for_model(
            "llama", vocab_size=1000, hidden_size=h, intermediate_size=int(h * 2.75), num_hidden_layers=layers,
            num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 128), max_position_embeddings=args.seq,
        )  # fmt: skip
        return config, AutoModelForCausalLM, (1, args.seq)
    config = AutoConfig.for_model(
        "bert", vocab_size=1000, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=layers,
        num_attention_heads=max(1, h // 64), max_position_embeddings=512, hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
    )  # fmt: skip
    return config, AutoModelForMaskedLM, (args.micro_batch, 512)


def student(args, family: str):
    """A random student of `family` as the trainer builds it, in train mode; (model, wrapper, input shape)."""
    import torch

    from distill.model_outputs import Needs
    from distill.models.build import StudentForDistillation

    config, auto, shape = shape_of(args, family)
    torch.manual_seed(0)
    model = auto.from_config(config, attn_implementation="sdpa", dtype=getattr(torch, DTYPES[args.dtype])).to(args.device)
    model.train()
    return model, StudentForDistillation(model, Needs()), shape


def set_variant(model, every: int) -> None:
    """Checkpoint every `every`-th layer (0: none): the flags enable_activation_checkpointing sets, switched per round."""
    from distill.models.build import enable_activation_checkpointing
    from distill.models.families import family_of

    if every and not getattr(model, "_bench_enabled", False):
        enable_activation_checkpointing(model, every)
        model._bench_enabled = True
    for index, block in enumerate(family_of(model).layer_list(model)):
        block.gradient_checkpointing = bool(every) and index % every == 0


def step(wrapper, ids):
    """One forward + backward of the student; (loss, global gradient norm)."""
    import torch

    torch.manual_seed(1)  # the same dropout masks for every variant
    hidden = wrapper(ids, None)["hidden"]
    loss = hidden.float().pow(2).mean()
    loss.backward()
    norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in wrapper.parameters() if p.grad is not None))
    return loss.item(), norm.item()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def inputs(args, shape):
    import torch

    return torch.randint(3, 1000, shape, generator=torch.Generator().manual_seed(2)).to(args.device)


def measure_memory(args, family: str, every: int) -> dict:
    import torch

    model, wrapper, shape = student(args, family)
    set_variant(model, every)
    step(wrapper, inputs(args, (shape[0], 64)))  # thread pools, kernels, the parameter gradients (kept)
    ids = inputs(args, shape)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss, norm = step(wrapper, ids)
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # the peak resident set size (VmHWM) back to the current one
        base = _status_kib("VmRSS")
        start = time.perf_counter()
        loss, norm = step(wrapper, ids)
        peak, how = (_status_kib("VmHWM") - base) * 1024, "peak RSS (VmHWM) in a fresh process"
    return {"peak_bytes": peak, "seconds": time.perf_counter() - start, "how": how, "loss": loss, "grad_norm": norm}


def measure_time(args, family: str) -> dict:
    import torch

    model, wrapper, shape = student(args, family)
    ids = inputs(args, shape)
    set_variant(model, 1)  # installs transformers' checkpoint function once; the rounds switch the flags
    step(wrapper, inputs(args, (shape[0], 64)))
    names = list(VARIANTS)
    wall, cpu, found = {n: [] for n in names}, {n: [] for n in names}, {}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            set_variant(model, VARIANTS[name])
            wrapper.zero_grad(set_to_none=False)
            if args.device == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            found[name] = step(wrapper, ids)
            if args.device == "cuda":
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {"wall": wall, "cpu": cpu, "loss_and_norm": found}


def estimate(args, family: str, every: int) -> float:
    """The student activations distill/train/memory_estimate.py counts for this shape and setting."""
    from distill.train.memory_estimate import materialises_probabilities, student_activation_bytes

    config, _, (sequences, length) = shape_of(args, family)
    dropout = args.dropout if family == "bert" else 0.0
    act_bytes = 2 if args.dtype == "bf16" else 4
    probabilities = materialises_probabilities("sdpa", dropout, args.device)
    total, _ = student_activation_bytes(config, sequences * length, length, act_bytes, probabilities, dropout, every)
    return total


def child(what: list) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:] + ["--child"] + what
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # large blocks mmap'ed: freed memory leaves the resident set at once
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(n) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=["llama", "bert"], default=["llama", "bert"])
    parser.add_argument("--seq", type=int, default=2048, help="Llama: tokens per sequence (one sequence per micro batch)")
    parser.add_argument("--micro-batch", type=int, default=4, help="BERT: sequences of 512 tokens per micro batch")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.1, help="BERT: dropout of hidden states and attention probabilities")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        family = args.child[1]
        result = measure_memory(args, family, int(args.child[2])) if args.child[0] == "memory" else measure_time(args, family)
        print(json.dumps(result))
        return

    print(
        f"{args.device}, {args.dtype}, student hidden {args.hidden} x {args.layers} layers, forward + backward, {args.rounds} interleaved "
        f"rounds, torch threads {args.threads or 'default'}; cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows, out = [], {}
    for family in args.families:
        memory = {name: child(["memory", family, str(every)]) for name, every in VARIANTS.items()}
        timing = child(["time", family, "-"])
        est = {name: estimate(args, family, every) for name, every in VARIANTS.items()}
        tokens = args.seq if family == "llama" else 512 * args.micro_batch
        what = f"{family}, {tokens} tokens" + (f" ({args.micro_batch} x 512)" if family == "bert" else " (1 sequence)")
        out[family] = {"tokens": tokens, "memory": memory, "timing": timing, "estimate_bytes": est}
        how = next((m["how"] for m in memory.values() if "how" in m), "?")
        print(f"{what}: memory by {how}", flush=True)
        for name in VARIANTS:
            m = memory[name]
            if "error" in m:
                print(f"  {name:18s} memory: {m['error']}")
            else:
                print(
                    f"  {name:18s} peak {mib(m['peak_bytes'])} MiB (estimate {mib(est[name])}), loss {m['loss']:.9g} grad norm {m['grad_norm']:.9g}"
                )
        if "error" in timing:
            print(f"  time: {timing['error']}")
        for name in VARIANTS:
            m, wall, cpu = memory[name], timing.get("wall", {}).get(name), timing.get("cpu", {}).get(name)
            base_wall, base_cpu = timing.get("wall", {}).get("off"), timing.get("cpu", {}).get("off")
            peak, base_peak = m.get("peak_bytes"), memory["off"].get("peak_bytes")
            rows.append(
                f"| {what} | {name} | {mib(peak) if peak else '-'} | {peak / base_peak:.2f} | {mib(est[name])} | "
                f"{peak / est[name]:.2f} | {statistics.median(wall):.2f} | {statistics.median(wall) / statistics.median(base_wall):.2f} | "
                f"{statistics.median(cpu) / statistics.median(base_cpu):.2f} |"
                if peak and base_peak and wall and base_wall
                else f"| {what} | {name} | - | - | {mib(est[name])} | - | - | - | - |"
            )
    print("\n| student | checkpointing | peak MiB | vs off | estimate MiB | peak / estimate | fwd+bwd s | time vs off | CPU time vs off |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
