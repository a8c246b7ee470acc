"""Checkpoint save/load time and size, through the real DeepSpeed engine and our checkpoint layout.

    python bench/checkpoint_io.py                       # demo student and a BERT-base-sized one, 1 process
    deepspeed --num_gpus 2 bench/checkpoint_io.py --sizes base --zero 3

For each student size (random weights: only the shapes matter) it builds the engine with the
trainer's optimizer (AdamW, fp32 master weights + two moments), runs one step so the optimizer
state exists, then times `save_checkpoint` (all ranks, until the COMPLETE marker and `latest` are
written), `load_checkpoint` into a fresh engine, and the conversion to a universal checkpoint
(what an elastic resume on another world size or ZeRO stage pays once). Prints one table row per size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STUDENTS = {  # DistilBERT students: layers, hidden, heads, intermediate, vocab
    "demo": (2, 256, 4, 1024, 8000),
    "distilbert-base": (6, 768, 12, 3072, 30522),
    "base": (12, 768, 12, 3072, 30522),  # BERT-base-sized
}


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def build_engine(size: str, zero: int):
    import deepspeed
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from distill.config import load_config
    from distill.models.build import StudentForDistillation
    from distill.train.engine import deepspeed_config, make_optimizer

    layers, hidden, heads, inter, vocab = STUDENTS[size]
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=inter))
    cfg = load_config(
        os.path.join(REPO, "configs", "demo.yaml"),
        ["output_dir=/tmp/unused", "data.path=/tmp/unused", "teacher.path=/tmp/unused", f"deepspeed.zero_stage={zero}"],
    )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.train.micro_batch, cfg.train.global_batch = 2, 2 * world
    wrapper = StudentForDistillation(model)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    optimizer = make_optimizer(wrapper, cfg, device)
    engine, *_ = deepspeed.initialize(
        model=wrapper, optimizer=optimizer, config=deepspeed_config(cfg, world, torch.float32), dist_init_required=False
    )
    ids = torch.randint(5, vocab, (2, 32), device=device)
    out = engine(ids, torch.ones_like(ids), None)
    engine.backward(out["hidden"].float().pow(2).mean())
    engine.step()
    return engine, sum(p.numel() for p in model.parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["demo", "base"], choices=sorted(STUDENTS))
    parser.add_argument("--zero", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument(
        "--dir", default=None, help="where to write (default: a temporary directory); use the cluster filesystem to measure it"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    from distill.checkpoints import layout as ckpt
    from distill.train.distributed import barrier, init_distributed, on_main_then_broadcast, setup_logging

    ctx = init_distributed(args.local_rank)
    setup_logging(ctx.rank, ctx.world_size)
    import logging

    logging.getLogger("distill").setLevel(logging.WARNING)
    base = on_main_then_broadcast(ctx, lambda: tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    rows = []
    for size in args.sizes:
        engine, params = build_engine(size, args.zero)
        root = os.path.join(base, size, ckpt.CHECKPOINTS)
        os.makedirs(root, exist_ok=True)
        tag = ckpt.tag_for(1)
        barrier()
        t0 = time.perf_counter()
        engine.save_checkpoint(root, tag=tag, client_state={"trainer_state": {"step": 1}}, save_latest=False)
        barrier()
        if ctx.is_main:
            from data_prep.manifest import write_json_atomically

            write_json_atomically(
                os.path.join(root, tag, ckpt.TRAINER_STATE), {"step": 1, "world_size": ctx.world_size, "zero_stage": args.zero}
            )
            ckpt.mark_complete(os.path.join(root, tag))
            ckpt.write_latest(root, tag)
        barrier()
        save_s = time.perf_counter() - t0
        size_mb = dir_size(os.path.join(root, tag)) / 2**20

        fresh, _ = build_engine(size, args.zero)
        barrier()
        t0 = time.perf_counter()
        path, _ = fresh.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        barrier()
        load_s = time.perf_counter() - t0
        assert path is not None, "checkpoint did not load"
        universal_s = float("nan")
        if ctx.is_main:
            t0 = time.perf_counter()
            ckpt.universal_checkpoint(root, tag)
            universal_s = time.perf_counter() - t0
        barrier()
        rows.append((size, params / 1e6, size_mb, save_s, load_s, universal_s))
        del engine, fresh
    if ctx.is_main:
        shutil.rmtree(base, ignore_errors=True)
        print(f"\nDeepSpeed ZeRO-{args.zero}, {ctx.world_size} rank(s), {'GPU' if ctx.device.type == 'cuda' else 'CPU'}, AdamW fp32 states")
        print(f"{'student':<16} {'params':>8} {'size':>10} {'save':>8} {'load':>8} {'->universal':>12} {'save MB/s':>10}")
        for size, params, size_mb, save_s, load_s, universal_s in rows:
            print(
                f"{size:<16} {params:>7.1f}M {size_mb:>8.0f}MB {save_s:>7.2f}s {load_s:>7.2f}s {universal_s:>11.2f}s {size_mb / save_s:>10.0f}"
            )
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
