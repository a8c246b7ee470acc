"""Teacher once, students many (issue 18): the teacher-logit cache against the online teacher, in one run.

    OMP_NUM_THREADS=1 python bench/teacher_cache.py [--out DIR] [--steps 150]      # ~10 min on one CPU thread

1. Data: WikiText-2 from ../shared/data (valid.txt, first --train-chars, to train; test.txt, first --eval-chars,
   held out), or the demo corpus when that folder is absent; a byte-level BPE tokenizer (vocab 2048) trained on
   the training text; `distill-prep --packing causal --max-seq-len 64`.
2. Teacher: a 4-layer Llama (128 wide) trained here with next-token cross-entropy (plain PyTorch loop), saved.
3. Caches (`distill-cache`, Beam local runner, in-process): top-k k=8 and k=64, sampled n=64; bytes per token and
   cache-writing tokens/s (end to end, pipeline start included).
4. Students (2 layers, teacher-layer init, configs/llm_kd.yaml: forward KL at T=1 + causal LM, `python -m distill`,
   one process): online teacher, and each cache, the same steps and data order; student steps/s (median step) and the
   median milliseconds per step of the teacher phase (the online forward, or the cache lookup; train.profile_phases).
5. `distill-eval` on the held-out text: perplexity and KL(teacher || student) per token, as a table.
Every stage whose output exists is reused on a rerun with the same --out.

    OMP_NUM_THREADS=1 python bench/teacher_cache.py --mlm [--mlm-chars 100000]     # ~3 min: static masks only

    OMP_NUM_THREADS=1 python bench/teacher_cache.py --writers [--teacher-steps 0]    # ~5 min (+4 to train the teacher): the writers

Masked-LM data with static masks (`--mlm`, instead of the above): a WordPiece tokenizer (vocab 2048) and
`distill-prep --max-seq-len 64` (document packing) on the first --mlm-chars of the training text, a random 4-layer BERT
teacher (128 wide), and `distill-cache --static-masks D` for D = 1, 2, 4 at k = 64 (16-bit values), storing every
position or the masked ones: bytes per dataset token (all D masked copies), per token of one copy, tokens/s.

The cache writers (`--writers`, instead of the above; issue 27): the same data and teacher (step 1 and 2; `--teacher-steps
0` keeps the teacher random, which changes nothing here but the values), top-k 64 with 16-bit values, parts of
--writer-rows rows, written by each orchestrator in turn in this one run: Beam with 1 and 2 local worker processes, the
launcher's ranks (`python -m distill.cache`, `deepspeed --num_gpus 2 --module distill.cache`) replicated and partitioned.
Per writer: tokens/s of the writing (the writer's own figure: from its inputs checked to the manifest written) and of the
whole command (process start-up included), bytes per token, and whether its parts are byte-identical to the first's.
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
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2")
BIN = os.path.dirname(sys.executable)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
CACHES = {
    "top-k 8": ["--mode", "topk", "--k", "8"],
    "top-k 64": ["--mode", "topk", "--k", "64"],
    "sampled 64": ["--mode", "sampled", "--n", "64"],
}


def sh(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def text_files(out: str, train_chars: int, eval_chars: int) -> tuple[str, str]:
    train, held = os.path.join(out, "text", "train"), os.path.join(out, "text", "held")
    if os.path.isdir(held):
        return train, held
    os.makedirs(train)
    os.makedirs(held)
    if os.path.isdir(SHARED):
        sources = [(os.path.join(SHARED, "valid.txt"), train, train_chars), (os.path.join(SHARED, "test.txt"), held, eval_chars)]
    else:  # a fresh clone: the demo corpus (text shipped with CPython), split in two
        from distill.tools.demo_assets import write_corpus

        corpus = os.path.join(out, "text", "demo")
        write_corpus(corpus)
        files = sorted(os.path.join(corpus, f) for f in os.listdir(corpus))
        sources = [(files[0], train, train_chars), (files[-1], held, eval_chars)]
    for path, where, chars in sources:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(chars)
        with open(os.path.join(where, "text.txt"), "w", encoding="utf-8") as handle:
            handle.write(text[: text.rfind("\n") + 1])
    return train, held


def tokenizer_dir(out: str, train: str) -> str:
    path = os.path.join(out, "tokenizer")
    if os.path.isdir(path):
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(
        [os.path.join(train, "text.txt")],
        trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    ).save_pretrained(path)
    return path


def prepare(out: str, name: str, text: str, tokenizer: str, validation: float) -> str:
    path = os.path.join(out, name)
    if not os.path.exists(os.path.join(path, "manifest.json")):
        sh(
            [
                os.path.join(BIN, "distill-prep"),
                "--input",
                text,
                "--tokenizer",
                tokenizer,
                "--output",
                path,
                "--max-seq-len",
                "64",
                "--min-seq-len",
                "16",
                "--packing",
                "causal",
                "--validation-fraction",
                str(validation),
                "--workers",
                "1",
            ]
        )
    return path


def train_teacher(out: str, data: str, tokenizer: str, steps: int) -> str:
    """A small Llama trained with next-token cross-entropy, so its distribution has something to distil."""
    path = os.path.join(out, "teacher")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True, trust_remote_code=False)
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    rows = sum(
        (pq.read_table(os.path.join(data, s["path"])).column("input_ids").to_pylist() for s in manifest["splits"]["train"]["shards"]), []
    )
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    t0 = time.time()
    for step in range(steps):
        batch = [rows[i] for i in rng.integers(0, len(rows), 16)]
        length = max(len(r) for r in batch)
        ids = torch.full((16, length), tok.eos_token_id)
        labels = torch.full((16, length), -100)
        mask = torch.zeros((16, length), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)], labels[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(r), 1
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (1 - step / steps)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  teacher step {step + 1}/{steps}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_cache(out: str, name: str, data: str, teacher: str, args: list[str]) -> dict:
    path = os.path.join(out, "caches", name.replace(" ", "-"))
    if not os.path.exists(os.path.join(path, "manifest.json")):
        sh(
            [
                os.path.join(BIN, "distill-cache"),
                "--data",
                data,
                "--teacher",
                teacher,
                "--output",
                path,
                "--workers",
                "1",
                "--batch-size",
                "32",
                *args,
            ]
        )
    return {"path": path, **json.load(open(os.path.join(path, "manifest.json")))}


def train_student(out: str, name: str, data: str, teacher: str, steps: int, cache: str | None) -> dict:
    run_dir = os.path.join(out, "students", name.replace(" ", "-"))
    export = run_dir + "-export"
    if not os.path.exists(os.path.join(export, "config.json")):
        args = [
            sys.executable,
            "-m",
            "distill",
            "--config",
            "configs/llm_kd.yaml",
            f"teacher.path={teacher}",
            f"data.path={data}",
            f"output_dir={run_dir}",
            f"train.max_steps={steps}",
            "train.global_batch=16",
            "train.micro_batch=16",
            "train.log_every=25",
            f"checkpoint.every_steps={steps}",
            "optim.lr=2e-3",
            "optim.warmup_fraction=0.05",
            "deepspeed.config=configs/deepspeed/zero2.json",
            "student.num_layers=2",
            "train.profile_phases=true",
        ]
        if cache:
            args += ["teacher.source=cache", f"teacher.cache={cache}"]
        sh(args)
        from distill.tools.export import export_checkpoint

        export_checkpoint(run_dir, export)
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steady = [m["samples_per_s"] / 16 for m in metrics[3:]] or [m["samples_per_s"] / 16 for m in metrics]
    teacher_ms = statistics.median(m["phase_seconds"]["teacher_forward"] * 1000 for m in metrics[3:])
    return {"export": export, "steps_per_s": statistics.median(steady), "teacher_ms": teacher_ms, "final_loss": metrics[-1]["loss"]}


def synthetic_bytes_per_token(vocab: int = 128_256, k: int = 64, positions: int = 12_800) -> dict:
    """Bytes per token of a top-k part at an LLM's vocabulary, the pessimistic case: the k ids of each position drawn
    uniformly from the whole vocabulary (real teachers favour frequent, low ids: smaller deltas), Zipf-like log-probs."""
    import tempfile

    import numpy as np

    from distill.cache.parts import write_part

    rng = np.random.default_rng(0)
    profile = -1.1 * np.log(np.arange(1, k + 1)) - 2.0
    rows = []
    for _ in range(positions // 64):
        idx = np.sort(np.stack([rng.choice(vocab, k, replace=False) for _ in range(64)]), 1).astype(np.int32)
        vals = rng.permuted(np.tile(profile, (64, 1)), axis=1) + rng.normal(0, 0.3, (64, k))
        rows.append((idx.reshape(-1), vals.reshape(-1).astype(np.float32), np.full(64, 0.3, dtype=np.float32)))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (16, 32):
            path = os.path.join(tmp, f"part{bits}.parquet")
            write_part(path, rows, bits)
            out[bits] = os.path.getsize(path) / positions
    return out


def static_mask_sizes(out: str, train: str, chars: int) -> list[dict]:
    """distill-cache on masked-LM data for D = 1, 2, 4 static masks, every position and masked positions: stats per cache."""
    from distill.tools.demo_assets import save_random_bert_teacher, train_wordpiece_tokenizer

    root = os.path.join(out, "mlm")
    text = os.path.join(root, "text")
    if not os.path.isdir(text):
        os.makedirs(text)
        with open(os.path.join(train, "text.txt"), encoding="utf-8") as handle:
            body = handle.read(chars)
        with open(os.path.join(text, "text.txt"), "w", encoding="utf-8") as handle:
            handle.write(body[: body.rfind("\n") + 1])
    tok = os.path.join(root, "tokenizer")
    if not os.path.isdir(tok):
        train_wordpiece_tokenizer([os.path.join(text, "text.txt")], tok, vocab_size=2048)
    data = os.path.join(root, "data")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        sh(
            [os.path.join(BIN, "distill-prep"), "--input", text, "--tokenizer", tok, "--output", data, "--max-seq-len", "64"]
            + ["--validation-fraction", "0.0", "--workers", "1"]
        )
    teacher = os.path.join(root, "teacher")
    if not os.path.isdir(teacher):
        save_random_bert_teacher(tok, teacher, layers=4, hidden=128, heads=4, intermediate=512, max_positions=128)
    results = []
    for variants in (1, 2, 4):
        for positions in ("all", "masked"):
            name = f"mlm-d{variants}-{positions}"
            args = ["--mode", "topk", "--k", "64", "--static-masks", str(variants), "--positions", positions]
            stats = write_cache(root, name, data, teacher, args)["stats"]
            results.append({"static_masks": variants, "positions": positions, **stats})
    return results


def print_static_mask_sizes(results: list[dict]) -> None:
    print(f"{'D':>2} {'positions':>9} {'bytes/data token':>16} {'bytes/copy token':>16} {'cache tok/s':>11}")
    for r in results:
        print(
            f"{r['static_masks']:>2} {r['positions']:>9} {r['bytes_per_token']:>16.1f} {r['bytes_per_masked_copy_token']:>16.1f} "
            f"{r['tokens_per_second']:>11,.0f}"
        )


WRITERS = {
    "Beam, 1 worker": (["distill-cache"], ["--workers", "1"]),
    "Beam, 2 workers": (["distill-cache"], ["--workers", "2"]),
    "ranks, 1": (["python", "-m", "distill.cache"], []),
    "ranks, 2": (["deepspeed", "--num_gpus", "2", "--master_port", "29591", "--module", "distill.cache"], []),
    "ranks, 2, partitioned": (
        ["deepspeed", "--num_gpus", "2", "--master_port", "29592", "--module", "distill.cache"],
        ["--placement", "partitioned"],
    ),
}


def writer_throughput(out: str, data: str, teacher: str, rows_per_part: int) -> list[dict]:
    """Each writer of WRITERS over the same data and teacher, one after the other, into a fresh directory."""
    import shutil

    results, first = [], None
    for name, (command, extra) in WRITERS.items():
        path = os.path.join(out, "writers", name.replace(" ", "").replace(",", "-"))
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.time()
        settings = ["--data", data, "--teacher", teacher, "--output", path, "--rows-per-part", str(rows_per_part), "--k", "64"]
        sh([os.path.join(BIN, command[0]), *command[1:], *settings, *extra])
        wall = time.time() - t0
        manifest = json.load(open(os.path.join(path, "manifest.json")))
        parts = [p["sha256"] for p in manifest["parts"]]
        first = first or parts
        stats = manifest["stats"]
        results.append(
            {
                "writer": name,
                "tokens": sum(p["tokens"] for p in manifest["parts"]),
                "parts": len(parts),
                "tokens_per_s": stats["tokens_per_second"],
                "tokens_per_s_wall": sum(p["tokens"] for p in manifest["parts"]) / wall,
                "wall_s": wall,
                "bytes_per_token": stats["bytes_per_token"],
                "same_bytes": parts == first,
            }
        )
        print(f"  {name}: {wall:.0f}s", flush=True)
    return results


def print_writers(results: list[dict]) -> None:
    base = results[0]["tokens_per_s"]
    print(f"{'writer':<22} {'tok/s writing':>13} {'vs first':>8} {'tok/s wall':>10} {'wall s':>7} {'bytes/token':>11} {'same bytes':>10}")
    for r in results:
        print(
            f"{r['writer']:<22} {r['tokens_per_s']:>13,.0f} {r['tokens_per_s'] / base:>7.2f}x {r['tokens_per_s_wall']:>10,.0f} "
            f"{r['wall_s']:>7.0f} {r['bytes_per_token']:>11.1f} {str(r['same_bytes']):>10}"
        )
    print(f"{results[0]['tokens']:,} tokens in {results[0]['parts']} parts, top-k 64, 16-bit values")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "bench_teacher_cache"), help="work directory (reused on a rerun)")
    p.add_argument("--steps", type=int, default=150, help="student steps (every student the same)")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--train-chars", type=int, default=400_000)
    p.add_argument("--eval-chars", type=int, default=60_000)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--mlm", action="store_true", help="only the masked-LM static-mask cache sizes (see above)")
    p.add_argument("--mlm-chars", type=int, default=100_000, help="--mlm: characters of the training text to prepare")
    p.add_argument("--writers", action="store_true", help="only the cache writers side by side (see above)")
    p.add_argument("--writer-rows", type=int, default=128, help="--writers: rows per part")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    train, held = text_files(a.out, a.train_chars, a.eval_chars)
    if a.mlm:
        results = static_mask_sizes(a.out, train, a.mlm_chars)
        print_static_mask_sizes(results)
        print(f"total {time.time() - t0:.0f}s")
        if a.json:
            with open(a.json, "w") as handle:
                json.dump({"static_masks": results}, handle, indent=2)
        return
    tok = tokenizer_dir(a.out, train)
    data = prepare(a.out, "data", train, tok, 0.0)
    held_data = prepare(a.out, "held", held, tok, 0.0)
    print(f"[{time.time() - t0:.0f}s] data ready; training the teacher", flush=True)
    teacher = train_teacher(a.out, data, tok, a.teacher_steps)
    if a.writers:
        results = writer_throughput(a.out, data, teacher, a.writer_rows)
        print_writers(results)
        print(f"total {time.time() - t0:.0f}s")
        if a.json:
            with open(a.json, "w") as handle:
                json.dump({"writers": results}, handle, indent=2)
        return
    caches = {}
    for name, args in CACHES.items():
        print(f"[{time.time() - t0:.0f}s] cache {name}", flush=True)
        caches[name] = write_cache(a.out, name, data, teacher, args)
    students = {}
    for name in ["online"] + list(CACHES):
        print(f"[{time.time() - t0:.0f}s] student from {name}", flush=True)
        students[name] = train_student(a.out, name, data, teacher, a.steps, caches[name]["path"] if name in caches else None)
    print(f"[{time.time() - t0:.0f}s] evaluating on held-out text", flush=True)
    from distill.tools.evaluate import evaluate

    result = evaluate(
        students["online"]["export"],
        held_data,
        teacher,
        split="train",
        name="online",
        device="cpu",
        compare=[(n, students[n]["export"]) for n in CACHES],
    )
    models = result["models"]
    online_sps = students["online"]["steps_per_s"]
    lines = [
        f"{'teacher source':<14} {'bytes/token':>11} {'cache tok/s':>11} {'teacher ms':>10} {'steps/s':>8} {'vs online':>9} "
        f"{'held-out ppl':>12} {'KL(t||s)':>9}",
        f"{'teacher':<14} {'-':>11} {'-':>11} {'-':>10} {'-':>8} {'-':>9} {models['teacher']['perplexity']:>12.2f} {'-':>9}",
    ]
    for name in ["online"] + list(CACHES):
        c = caches.get(name, {}).get("stats", {})
        s = students[name]
        size = f"{c['bytes_per_token']:>11.1f} {c['tokens_per_second']:>11,.0f}" if c else f"{'-':>11} {'-':>11}"
        lines.append(
            f"{name:<14} {size} {s['teacher_ms']:>10.1f} {s['steps_per_s']:>8.2f} {s['steps_per_s'] / online_sps:>8.2f}x "
            f"{models[name]['perplexity']:>12.2f} {models[name]['kl_from_teacher']:>9.4f}"
        )
    print("\n".join(lines))
    synthetic = synthetic_bytes_per_token()
    print(
        f"top-k 64 at a 128,256-token vocabulary (synthetic, ids uniform over the vocabulary): {synthetic[16]:.1f} bytes per token with "
        f"16-bit values, {synthetic[32]:.1f} with 32-bit"
    )
    print(
        f"{result['sequences']} held-out sequences, {result['tokens']} next-token positions, vocabulary {result['vocab_size']}; "
        f"{sum(p['rows'] for p in caches['top-k 64']['parts'])} cached rows, "
        f"{sum(p['tokens'] for p in caches['top-k 64']['parts'])} tokens; {a.steps} student steps of 16 sequences; total {time.time() - t0:.0f}s"
    )
    if a.json:
        with open(a.json, "w") as handle:
            json.dump(
                {
                    "caches": {n: c["stats"] for n, c in caches.items()},
                    "students": students,
                    "eval": result,
                    "synthetic_128k_bytes_per_token": synthetic,
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
