"""Does pruning pay for a causal LM? (issue 26, the causal counterpart of bench/quality.py's (e)/(f)/(g))

    python bench/prune_causal.py                  # the default scale: a tiny Llama teacher on WikiText-2, CPU (hours on a busy 2-core machine)
    python bench/prune_causal.py --smoke          # minutes: checks the script end to end (numbers meaningless)

Protocol, on WikiText-2 from ../shared/data/ (valid.txt to train, test.txt held out):
  1. a byte-level BPE tokenizer trained on valid.txt; `distill-prep --packing causal` of both files.
  2. Teacher: a Llama (grouped-query attention) pretrained from random init by our trainer (causal LM loss only).
  3. Students, all trained with the llm_kd objective (forward KL to the teacher + next-token loss) for the same steps:
       narrow pruned   half the teacher's hidden size, key/value groups (with their heads), MLP and layers, cut by distill-prune
       narrow random   the same shape at random init
       depth pruned    half the layers (the most important), the teacher's width, cut by distill-prune
       depth copy      half the layers evenly spaced (student.init=teacher, init_mapping spread: the usual layer copy)
     distill-prune scores the teacher once (its scores are reused for the second cut).
  4. `distill-eval` of every model on test.txt: perplexity, KL(teacher || student), top-1 agreement with the teacher.
Every stage whose result exists is skipped on a rerun with the same --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
SCALES = {
    "smoke": dict(vocab=512, seq=64, teacher=(2, 64, 4, 2, 128), teacher_steps=6, student_steps=4, batch=8, sequences=32),
    "cpu": dict(vocab=4096, seq=128, teacher=(4, 128, 4, 2, 384), teacher_steps=800, student_steps=300, batch=32, sequences=1024),
}
STUDENTS = {
    "narrow_pruned": "half width+depth, pruned",
    "narrow_random": "half width+depth, random init",
    "depth_pruned": "half depth, pruned",
    "depth_copy": "half depth, spread layer copy",
}


def log(msg: str) -> None:
    print(f"[prune_causal {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, args):
        self.args, self.scale = args, SCALES[args.scale]
        self.out = os.path.abspath(args.out)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.env.setdefault("OMP_NUM_THREADS", str(args.threads))
        self.timings: dict[str, float] = {}
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def sh(self, cmd: list[str], name: str) -> None:
        log_path = self.path("logs", name + ".log")
        t0 = time.time()
        with open(log_path, "a") as handle:
            handle.write("$ " + " ".join(cmd) + "\n")
            handle.flush()
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        self.timings[name.split("_")[0]] = self.timings.get(name.split("_")[0], 0.0) + time.time() - t0
        if proc.returncode:
            tail = open(log_path).read().strip().splitlines()[-5:]
            raise SystemExit(f"prune_causal: {' '.join(cmd[:3])} failed (exit {proc.returncode}); log {log_path}:\n  " + "\n  ".join(tail))

    def prepare(self) -> None:
        tok = self.path("tokenizer")
        if not os.path.exists(os.path.join(tok, "tokenizer.json")):
            log("tokenizer: byte-level BPE on valid.txt")
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
            from transformers import PreTrainedTokenizerFast

            bpe = Tokenizer(models.BPE())
            bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            bpe.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=self.scale["vocab"], special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
            )
            bpe.train([self.args.valid], trainer)
            PreTrainedTokenizerFast(
                tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
            ).save_pretrained(tok)
        for name, src, fraction in (("data", self.args.valid, "0.1"), ("test_data", self.args.test, "0")):
            if not os.path.exists(self.path(name, "manifest.json")):
                log(f"distill-prep --packing causal {os.path.basename(src)} -> {name}")
                self.sh(
                    [
                        os.path.join(BIN, "distill-prep"),
                        "--input",
                        src,
                        "--tokenizer",
                        tok,
                        "--output",
                        self.path(name),
                        "--packing",
                        "causal",
                    ]
                    + ["--max-seq-len", str(self.scale["seq"]), "--validation-fraction", fraction, "--workers", "1", "--overwrite"],
                    f"prep_{name}",
                )

    def train(self, name: str, steps: int, settings: list[str]) -> str:
        run_dir, model_dir = self.path("runs", name), self.path("models", name)
        if os.path.exists(os.path.join(model_dir, "config.json")):
            return model_dir
        log(f"train {name} ({steps} steps)")
        s = self.scale
        common = [
            "--config",
            "configs/llm_kd.yaml",
            f"data.path={self.path('data')}",
            f"output_dir={run_dir}",
            f"train.max_steps={steps}",
            f"train.global_batch={s['batch']}",
            f"train.micro_batch={s['batch']}",
            f"checkpoint.every_steps={steps}",
            "checkpoint.keep_last=1",
            "train.log_every=25",
            "optim.lr=1e-3",
            "optim.warmup_fraction=0.05",
            "deepspeed.config=configs/deepspeed/zero2.json",
            f"seed={self.args.seed}",
        ]
        self.sh([os.path.join(BIN, "distill-train"), *common, *settings], f"train_{name}")
        self.sh([os.path.join(BIN, "distill-export"), "--checkpoint", run_dir, "--output", model_dir, "--overwrite"], f"export_{name}")
        return model_dir

    def prune(self, name: str, teacher: str, shape: list[str]) -> str:
        out = self.path("models", "cut_" + name)
        if os.path.exists(os.path.join(out, "prune.json")):
            return out
        earlier = [
            self.path("models", "cut_" + n) for n in ("narrow", "depth") if os.path.exists(self.path("models", "cut_" + n, "prune.json"))
        ]
        source = ["--scores", earlier[0]] if earlier else ["--data", self.path("data"), "--sequences", str(self.scale["sequences"])]
        log(f"distill-prune {name}: {' '.join(shape)}")
        self.sh(
            [sys.executable, "-m", "distill.prune", "--teacher", teacher, *source, "--output", out, *shape]
            + ["--batch-size", "16", "--threads", str(self.args.threads), "--overwrite"],
            f"prune_{name}",
        )
        return out

    def evaluate(self, name: str, model: str, teacher: str | None) -> dict:
        out_json = self.path("eval", name + ".json")
        if not os.path.exists(out_json):
            os.makedirs(os.path.dirname(out_json), exist_ok=True)
            cmd = [sys.executable, "-m", "distill.tools.evaluate", "--model", model, "--data", self.path("test_data"), "--split", "train"]
            cmd += ["--json", out_json, "--max-sequences", str(self.args.max_eval_sequences)]
            if teacher:
                cmd += ["--teacher", teacher]
            self.sh(cmd, f"eval_{name}")
        return json.load(open(out_json))

    def run(self) -> dict:
        s = self.scale
        self.prepare()
        layers, hidden, heads, kv, inner = s["teacher"]
        teacher = self.train(
            "teacher",
            s["teacher_steps"],
            ["loss.weights={clm: 1.0}", "student.architecture=llama", f"student.num_layers={layers}", f"student.hidden_size={hidden}"]
            + [f"student.num_heads={heads}", f"student.num_kv_heads={kv}", f"student.intermediate_size={inner}"],
        )
        narrow = ["--num-layers", str(layers // 2), "--hidden-size", str(hidden // 2), "--num-kv-heads", str(kv // 2)]
        narrow += ["--intermediate-size", str(inner // 2)]
        cuts = {"narrow": self.prune("narrow", teacher, narrow), "depth": self.prune("depth", teacher, ["--num-layers", str(layers // 2)])}
        kd = [f"teacher.path={teacher}", "loss.weights={ce: 1.0, clm: 1.0}"]
        steps = s["student_steps"]
        models = {
            "narrow_pruned": self.train("narrow_pruned", steps, kd + [f"student.path={cuts['narrow']}"]),
            "narrow_random": self.train(
                "narrow_random",
                steps,
                kd
                + ["student.init=random", f"student.num_layers={layers // 2}", f"student.hidden_size={hidden // 2}"]
                + [f"student.num_heads={heads // 2}", f"student.num_kv_heads={kv // 2}", f"student.intermediate_size={inner // 2}"],
            ),
            "depth_pruned": self.train("depth_pruned", steps, kd + [f"student.path={cuts['depth']}"]),
            "depth_copy": self.train(
                "depth_copy", steps, kd + ["student.init=teacher", "student.init_mapping=spread", f"student.num_layers={layers // 2}"]
            ),
        }
        rows = {"teacher": self.evaluate("teacher", teacher, None)["models"]["student"]}
        for name, model in models.items():
            result = self.evaluate(name, model, teacher)
            rows[name] = dict(result["models"]["student"], kl=result.get("kl_from_teacher"), agree=result.get("top1_agreement"))
        at_start = {}  # the same students before training: what the initialisation alone is worth
        for name, path in (("narrow_pruned", cuts["narrow"]), ("depth_pruned", cuts["depth"])):
            result = self.evaluate(name + "_untrained", path, teacher)
            at_start[name] = dict(result["models"]["student"], kl=result.get("kl_from_teacher"), agree=result.get("top1_agreement"))
        cut = {n: json.load(open(os.path.join(p, "prune.json"))) for n, p in cuts.items()}
        return {"scale": self.args.scale, "sizes": s, "rows": rows, "untrained": at_start, "timings": self.timings, "pruning": cut}


def render(result: dict) -> str:
    lines = [f"{'model':<48} {'params':>9} {'ppl (test)':>11} {'KL(T||S)':>9} {'top-1 agree':>12}"]
    for name, r in result["rows"].items():
        label = "teacher" if name == "teacher" else f"{name} ({STUDENTS[name]})"
        kl = "-" if r.get("kl") is None else f"{r['kl']:.4f}"
        agree = "-" if r.get("agree") is None else f"{100 * r['agree']:.2f}%"
        lines.append(f"{label:<48} {r['parameters'] / 1e6:>8.2f}M {r['perplexity']:>11.2f} {kl:>9} {agree:>12}")
    for name, r in result["untrained"].items():
        lines.append(f"  {name} before training: ppl {r['perplexity']:.1f}, KL {r['kl']:.3f}")
    for name, record in result["pruning"].items():
        sc = record["scores"]
        lines.append(
            f"cut {name}: teacher layers {record['kept']['layers']}, {record['params']['student']:,} parameters; calibration "
            f"{sc.get('sequences')} sequences, {sc.get('tokens')} tokens, {sc.get('seconds')} s ({sc.get('tokens_per_second')} tokens/s, {sc.get('device')})"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--valid", default=os.path.join(SHARED, "wikitext-2", "valid.txt"))
    p.add_argument("--test", default=os.path.join(SHARED, "wikitext-2", "test.txt"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-eval-sequences", type=int, default=500)
    args = p.parse_args()
    if args.smoke:
        args.scale = "smoke"
    args.out = args.out or os.path.join(REPO, "runs", f"prune-causal-{args.scale}")
    t0 = time.time()
    result = Bench(args).run()
    result["wall_seconds"] = time.time() - t0
    with open(os.path.join(args.out, "prune_causal.json"), "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    print(render(result))
    print(f"JSON: {os.path.join(args.out, 'prune_causal.json')}; wall time {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
