"""Peak memory and time of the logit KD loss (forward + backward): the direct computation (full tokens x vocab
logits of teacher and student, then the loss) against `distill.objective.chunked_logits.chunked_logit_loss`.

    python bench/kd_loss_memory.py --tokens 1024 --threads 1         # CPU: vocab 32k / 128k / 256k, bf16
    python bench/kd_loss_memory.py --device cuda --tokens 8192 --student-hidden 2048 --teacher-hidden 4096

Methods: `naive` (naive_logit_loss: full logits, PyTorch ops, autograd), `chunked` (gradients computed in the
forward sweep, backward scales them) and `recompute` (chunked, logits recomputed in backward).

Memory: every (method, vocab) runs in a fresh process that builds the inputs, warms up on a tiny case, then
measures one forward + backward: on CPU the peak resident set size above the resident size just before the call
(the kernel's high-water mark VmHWM, reset through /proc/self/clear_refs), on CUDA torch.cuda.max_memory_allocated
above memory_allocated. The peak counts everything the loss allocates, the gradients it leaves included
(d hidden: tokens x H, d head: vocab x H); not the inputs.
Time: one more fresh process per vocabulary runs the methods interleaved, `--rounds` times, rotating the order,
and records wall time and the process's CPU time (on a shared CPU, CPU time with `--threads 1` is the steadier
measure: wall time there mostly measures waiting for a core). Ratios are of medians.
A vocabulary whose runs would not fit in the memory available now is skipped (the machine may be shared).
The loss and gradients of each method are compared with the naive ones (max |diff|, relative to the largest
magnitude; bf16 gradients differ by about one bf16 rounding step: the logits' fp32 gradient comes from other
formulas and the head gradient is summed chunk by chunk; in fp32 they agree to ~1e-6).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

METHODS = ("naive", "chunked", "recompute")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def inputs(args, vocab, tokens=None, device=None):
    """Student hidden states and head (with gradients), teacher hidden states and head; logits of std about 1."""
    import torch

    tokens = tokens or args.tokens
    device = device or args.device
    dtype = getattr(torch, DTYPES[args.dtype])
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype) * scale

    hs, ht = args.student_hidden, args.teacher_hidden
    return dict(
        student_hidden=randn(tokens, hs).requires_grad_(),
        student_head=randn(vocab, hs, scale=hs**-0.5).requires_grad_(),
        teacher_hidden=randn(tokens, ht),
        teacher_head=randn(vocab, ht, scale=ht**-0.5),
    )


def run_once(args, method, tensors):
    """One forward + backward; returns the loss."""
    from distill.objective.chunked_logits import chunked_logit_loss, naive_logit_loss

    tensors["student_hidden"].grad = tensors["student_head"].grad = None
    kw = dict(kind=args.kind, temperature=args.temperature, beta=args.beta)
    if method == "naive":
        out = naive_logit_loss(**tensors, **kw)
    else:
        out = chunked_logit_loss(**tensors, **kw, chunk_size=args.chunk_size, grad_in_forward=method == "chunked")
    out.loss.backward()
    return out.loss.detach()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(args, method, vocab) -> dict:
    import torch

    warm = inputs(args, 256, tokens=64)
    run_once(args, method, warm)  # thread pools, allocator, kernels
    tensors = inputs(args, vocab)
    del warm
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        run_once(args, method, tensors)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "seconds": seconds, "how": "torch.cuda.max_memory_allocated"}
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak resident set size (VmHWM) to the current one
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    run_once(args, method, tensors)
    seconds = time.perf_counter() - start
    return {"peak_bytes": (_status_kib("VmHWM") - base) * 1024, "seconds": seconds, "how": "peak RSS (VmHWM) in a fresh process"}


def measure_time(args, vocab) -> dict:
    import torch

    tensors = inputs(args, vocab)
    warm = inputs(args, 256, tokens=64)
    for method in args.methods:
        run_once(args, method, warm)
    del warm
    times = {m: [] for m in args.methods}
    cpu = {m: [] for m in args.methods}
    losses, diffs, ref = {}, {}, None
    for r in range(args.rounds):  # round 0 runs the methods in the given order: naive first, the reference
        order = args.methods[r % len(args.methods) :] + args.methods[: r % len(args.methods)]
        for method in order:
            if args.device == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = run_once(args, method, tensors)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[method].append(time.perf_counter() - start)
            cpu[method].append(time.process_time() - start_cpu)
            if r == 0:
                got = (loss, tensors["student_hidden"].grad, tensors["student_head"].grad)
                losses[method] = got[0].item()
                if method == "naive":
                    ref = got
                elif ref is not None:
                    diffs[method] = {
                        name: (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-30)
                        for name, a, b in zip(("loss", "d_hidden", "d_head"), got, ref)
                    }
                    diffs[method]["loss_abs"] = (got[0] - ref[0]).abs().item()
                del got
            tensors["student_hidden"].grad = tensors["student_head"].grad = None
    return {"times": times, "cpu": cpu, "diffs": diffs, "loss": losses}


def too_big(args, vocab) -> str:
    """A reason to skip this vocabulary on a CPU without the memory it needs (the machine is shared), or ''."""
    if args.device != "cpu":
        return ""
    import psutil

    from distill.objective.chunked_logits import CHUNK_ELEMENTS

    elem = 2 if args.dtype == "bf16" else 4
    inputs_and_grads = vocab * (args.student_hidden + args.teacher_hidden) * elem + 2 * vocab * args.student_hidden * elem
    if "naive" in args.methods:  # measured: the naive peak is 7 fp32 (tokens x vocab) buffers
        need = 7.5 * args.tokens * vocab * 4 + inputs_and_grads
    else:  # ~3.5 fp32 (chunk x vocab) buffers and the fp32 head gradient
        chunk = min(args.tokens, args.chunk_size or max(1, CHUNK_ELEMENTS // vocab))
        need = 4 * chunk * vocab * 4 + 4 * vocab * args.student_hidden + inputs_and_grads
    free = psutil.virtual_memory().available
    return f"needs about {gib(need)} GiB, {gib(free)} GiB available" if need > 0.8 * free else ""


def child(args, what: list) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:] + ["--child"] + what
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(n) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072, 262144])
    parser.add_argument("--tokens", type=int, default=2048, help="positions per micro batch (tokens x vocab logits)")
    parser.add_argument("--student-hidden", type=int, default=1024)
    parser.add_argument("--teacher-hidden", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--kind", default="forward_kl")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--chunk-size", type=int, default=None, help="positions per chunk (default: the module's choice)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        if args.child[0] == "memory":
            print(json.dumps(measure_memory(args, args.child[1], int(args.child[2]))))
        else:
            print(json.dumps(measure_time(args, int(args.child[1]))))
        return

    from distill.objective.chunked_logits import CHUNK_ELEMENTS

    print(
        f"{args.device}, {args.dtype}, {args.tokens} tokens, student hidden {args.student_hidden}, teacher hidden {args.teacher_hidden}, "
        f"{args.kind} at T={args.temperature}, forward + backward, {args.rounds} interleaved rounds, torch threads "
        f"{args.threads or 'default'}, chunk "
        f"{args.chunk_size or f'auto ({CHUNK_ELEMENTS} logits / vocab)'}; cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for vocab in args.vocab:
        reason = too_big(args, vocab)
        if reason:
            print(f"vocab {vocab}: skipped, {reason}", flush=True)
            continue
        memory = {m: child(args, ["memory", m, str(vocab)]) for m in args.methods}
        timing = child(args, ["time", str(vocab)])
        rows.append((vocab, memory, timing))
        how = next((m["how"] for m in memory.values() if "how" in m), "?")
        print(f"vocab {vocab}: memory by {how}", flush=True)
        for m in args.methods:
            mem = memory[m]
            times, cpu = timing.get("times", {}).get(m, []), timing.get("cpu", {}).get(m, [])
            line = f"  {m:9s} peak {gib(mem['peak_bytes']) if 'peak_bytes' in mem else mem.get('error')} GiB"
            if times:
                line += (
                    f"  wall median {statistics.median(times):.2f} s fastest {min(times):.2f} s (all: {', '.join(f'{t:.2f}' for t in times)})"
                    f"  cpu median {statistics.median(cpu):.2f} s"
                )
            elif "error" in timing:
                line += f"  time: {timing['error']}"
            print(line, flush=True)
        for m, d in timing.get("diffs", {}).items():
            print(
                f"  {m:9s} vs naive: loss |diff| {d['loss_abs']:.2e} (rel {d['loss']:.1e}), max |diff| / max: d_hidden {d['d_hidden']:.1e}, "
                f"d_head {d['d_head']:.1e}",
                flush=True,
            )

    print(
        "\n| vocab | naive peak GiB | chunked peak GiB | chunked / naive | recompute peak GiB | naive s | chunked s | chunked / naive "
        "| recompute s | recompute / naive | CPU-time chunked / naive | CPU-time recompute / naive |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for vocab, memory, timing in rows:

        def peak(m):
            return memory.get(m, {}).get("peak_bytes")

        def med(m, key="times"):
            times = timing.get(key, {}).get(m)
            return statistics.median(times) if times else None

        def ratio(a, b):
            return f"{a / b:.2f}" if a is not None and b else "-"

        def fmt(x, f):
            return f(x) if x is not None else "-"

        seconds = lambda x: f"{x:.2f}"  # noqa: E731
        print(
            f"| {vocab} | {fmt(peak('naive'), gib)} | {fmt(peak('chunked'), gib)} | {ratio(peak('chunked'), peak('naive'))} | "
            f"{fmt(peak('recompute'), gib)} | {fmt(med('naive'), seconds)} | {fmt(med('chunked'), seconds)} | "
            f"{ratio(med('chunked'), med('naive'))} | {fmt(med('recompute'), seconds)} | {ratio(med('recompute'), med('naive'))} | "
            f"{ratio(med('chunked', 'cpu'), med('naive', 'cpu'))} | {ratio(med('recompute', 'cpu'), med('naive', 'cpu'))} |"
        )


if __name__ == "__main__":
    main()
