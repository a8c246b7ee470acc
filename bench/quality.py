"""Quality benchmark (issue 7): does the distilled student keep the teacher's quality, and does
distillation beat training the same small model without it?

    python bench/quality.py                        # cpu scale (default): ~70 min per seed on 2 CPU cores, 6 min on one H100 (--jobs 9)
    python bench/quality.py --smoke                # tiny sizes, a few minutes: checks the script end to end
    python bench/quality.py --scale gpu --jobs 8   # a 6 x 256 teacher, 3-layer students: minutes on one GPU
    python bench/quality.py --scale bert-base      # the same protocol at BERT-base size (GPUs)
    python bench/quality.py --scale gpu --prepare-only --out DIR   # tokenizer + prepared data only (CPU machine),
                                                   # then train elsewhere with the same --out

Protocol, on WikiText-2 from ../shared/data/ (valid.txt to train, test.txt held out for the final numbers):
  1. `distill-demo-assets tokenizer`: a WordPiece tokenizer trained on valid.txt.
  2. `distill-prep` valid.txt (10% of its paragraphs held out by hash: the *choice split*, used for the
     held-out loss curves and for every choice made) and test.txt (evaluation only).
  3. Teacher: a BERT pretrained with our trainer in MLM-only mode (`configs/quality/teacher.yaml`),
     `deepspeed --module distill`, then `distill-export`. Its held-out loss curve shows whether it flattened.
  4. Half-depth DistilBERT students, same token budget, each with every seed in --seeds:
     (a) DistilBERT objective (ce 5 / mlm 2 / cos 1, T=2, ce over all tokens), teacher-layer init
     (b) MLM only, random init          (c) MLM only, teacher-layer init
     (d) as (a) with the soft-target loss at masked positions only
     and students cut from the teacher by importance (issue 26; `distill-prune`, 1,024 calibration sequences of the
     training split, scored once and reused):
     (e) as (a), the teacher pruned in depth only (half its layers, the most important; (a)'s shape)
     (f) half the teacher's hidden size (so heads), MLP and layers, pruned; soft targets + MLM
     (g) (f)'s shape and objective at random init
  5. Every checkpoint of every run is exported and scored on the choice split (masked-LM loss): the
     held-out loss curves (PNG). The final models go through `distill-eval` on test.txt (masked-token
     accuracy, perplexity, top-1 agreement with the teacher).
  6. `distill-finetune` on SST-2 train.tsv (last 10% held out) for the teacher and every student.
  7. Table (stdout + JSON) with mean and seed spread per variant, and the issue's checks.

Every stage whose result exists is skipped on a rerun with the same --out, so an interrupted run continues.
`--jobs N` trains, scores and fine-tunes N students at once (they share the visible GPUs or cores): on a
GPU the small runs are bound by Python and launch overheads, so running them side by side pays.
`--variants` with no names trains, scores and fine-tunes the teacher only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
# run as modules, not through their console scripts (a stale editable install's scripts name pre-move modules)
TOOLS = {
    "distill-demo-assets": "distill.tools.demo_assets",
    "distill-eval": "distill.tools.evaluate",
    "distill-finetune": "distill.tools.finetune",
    "distill-prune": "distill.prune",
}


def tool(name: str) -> list[str]:
    return [sys.executable, "-m", TOOLS[name]]


SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
VARIANTS = {
    "a": ("student_a.yaml", "DistilBERT loss, teacher init"),
    "b": ("student_b.yaml", "MLM only, random init"),
    "c": ("student_c.yaml", "MLM only, teacher init"),
    "d": ("student_d.yaml", "as (a), ce at masked only"),
    "e": ("student_e.yaml", "as (a), depth-pruned teacher"),
    "f": ("student_f.yaml", "half width+depth, pruned"),
    "g": ("student_g.yaml", "half width+depth, random init"),
}
PRUNED = {"e": "pruned_depth", "f": "pruned_narrow"}  # the students distill-prune cuts (models/<name>), once for every seed


@dataclass
class Scale:
    """Sizes of one scale of the protocol; everything else comes from configs/quality/*.yaml."""

    vocab: int
    max_seq_len: int
    teacher: dict  # layers, hidden, heads, intermediate
    teacher_steps: int
    student_steps: int
    global_batch: int
    micro_batch: int
    eval_every: int  # teacher checkpoint interval = points of its held-out loss curve
    student_eval_every: int  # the same for the students
    ft_examples: int | None  # SST-2 training rows used (first N of the 90%); None = all
    ft_epochs: float
    ft_lr: float
    ft_batch: int = 32
    test_max_sequences: int | None = None  # distill-eval on the first N test sequences (None = all)
    curve_max_sequences: int | None = None
    teacher_lr: float | None = None
    student_lr: float | None = None
    extra: list[str] = field(default_factory=list)
    teacher_extra: list[str] = field(default_factory=list)


SCALES = {
    # a few minutes: validates the script end to end, numbers are meaningless
    "smoke": Scale(
        vocab=2000,
        max_seq_len=64,
        teacher=dict(layers=2, hidden=64, heads=2, intermediate=128),
        teacher_steps=6,
        student_steps=4,
        global_batch=16,
        micro_batch=8,
        eval_every=2,
        student_eval_every=2,
        ft_examples=256,
        ft_epochs=1,
        ft_lr=1e-3,
        test_max_sequences=64,
        curve_max_sequences=32,
    ),
    # sized for about an hour on 2 idle CPU cores: a 4 x 128 teacher (2-layer students) on ~5.6M tokens
    # (20 passes over the 245k training tokens of valid.txt), students on ~2.2M tokens each; one process,
    # 2 threads. The teacher's learning rate decides whether it leaves the unigram plateau at all: at 2e-3
    # (and 800 steps) it stayed there (held-out loss 6.38, accuracy of always predicting "the"); at 1e-3 it
    # leaves it within ~300 steps (14% masked-token accuracy at step 700), and so does 5e-4, more slowly.
    "cpu": Scale(
        vocab=6000,
        max_seq_len=128,
        teacher=dict(layers=4, hidden=128, heads=4, intermediate=512),
        teacher_steps=2000,
        student_steps=800,
        global_batch=32,
        micro_batch=32,
        eval_every=250,
        student_eval_every=100,
        ft_examples=12000,
        ft_epochs=1,
        ft_lr=5e-4,
        test_max_sequences=500,
        curve_max_sequences=128,
        teacher_lr=1e-3,
        student_lr=1e-3,
        teacher_extra=["student.dropout=0.0"],
    ),
    # the example teacher size on one GPU: a 6 x 256 teacher (3-layer students) on ~17M tokens (about
    # 75 passes over valid.txt's training split, dropout 0.1 against over-fitting), students on half that.
    # 5e-4: the deeper post-LN model is given a smaller step than the cpu scale's 1e-3 (see its plateau note).
    "gpu": Scale(
        vocab=6000,
        max_seq_len=128,
        teacher=dict(layers=6, hidden=256, heads=4, intermediate=1024),
        teacher_steps=3000,
        student_steps=1500,
        global_batch=64,
        micro_batch=64,
        eval_every=250,
        student_eval_every=250,
        ft_examples=20000,
        ft_epochs=1,
        ft_lr=2e-4,
        curve_max_sequences=256,
        teacher_lr=5e-4,
        student_lr=5e-4,
        teacher_extra=["student.dropout=0.1"],
    ),
    # the same protocol at BERT-base size: 12 x 768 teacher, 6-layer students (GPU)
    "bert-base": Scale(
        vocab=16000,
        max_seq_len=128,
        teacher=dict(layers=12, hidden=768, heads=12, intermediate=3072),
        teacher_steps=4000,
        student_steps=4000,
        global_batch=256,
        micro_batch=64,
        eval_every=500,
        student_eval_every=500,
        ft_examples=None,
        ft_epochs=2,
        ft_lr=3e-5,
        teacher_lr=5e-4,
        student_lr=5e-4,
    ),
}


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.scale: Scale = SCALES[args.scale]
        self.env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
        )
        self.env.setdefault("OMP_NUM_THREADS", str(args.threads))
        # DeepSpeed JIT-builds its CPU communication op into ~/.cache/torch_extensions; checkouts with other
        # virtualenvs rebuild it there in turn (minutes each). A cache of our own is built once.
        import hashlib
        import tempfile

        self.env.setdefault(
            "TORCH_EXTENSIONS_DIR",
            os.path.join(tempfile.gettempdir(), "distill-quality-torch-ext-" + hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]),
        )
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # from_pretrained in one process is not thread-safe (meta-device init)
        os.makedirs(self.out, exist_ok=True)

    def _add_time(self, stage: str, seconds: float) -> None:
        with self._lock:  # students may run in threads (--jobs)
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    # ------------------------------------------------------------------------------------------
    def sh(self, cmd: list[str], log_name: str, stage: str) -> None:
        """Run one CLI, its output to OUT/logs/<log_name>.log; stop the benchmark if it fails."""
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        path = os.path.join(self.out, "logs", log_name + ".log")
        t0 = time.time()
        with open(path, "a") as handle:
            handle.write("$ " + " ".join(cmd) + "\n")
            handle.flush()
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        self._add_time(stage, time.time() - t0)
        if proc.returncode:
            tail = open(path).read().strip().splitlines()[-5:]
            raise SystemExit(f"quality: {os.path.basename(cmd[0])} failed (exit {proc.returncode}); log {path}:\n  " + "\n  ".join(tail))

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    # ------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        s = self.scale
        tok = self.path("tokenizer")
        if not os.path.exists(os.path.join(tok, "tokenizer.json")):
            log("tokenizer: WordPiece on valid.txt")
            self.sh(
                [*tool("distill-demo-assets"), "tokenizer", self.args.valid, "--output", tok, "--vocab-size", str(s.vocab)],
                "tokenizer",
                "prep",
            )
        for name, src, frac in (("data", self.args.valid, "0.1"), ("test_data", self.args.test, "0")):
            if not os.path.exists(self.path(name, "manifest.json")):
                log(f"distill-prep {os.path.basename(src)} -> {name}")
                self.sh(
                    [
                        os.path.join(BIN, "distill-prep"),
                        "--input",
                        src,
                        "--tokenizer",
                        tok,
                        "--output",
                        self.path(name),
                        "--max-seq-len",
                        str(s.max_seq_len),
                        "--validation-fraction",
                        frac,
                        "--workers",
                        "1",
                        "--overwrite",
                    ],
                    f"prep_{name}",
                    "prep",
                )

    def train(self, name: str, recipe: str, overrides: list[str], port_offset: int = 0) -> str:
        """deepspeed --module distill (or one process), then distill-export of the final checkpoint."""
        run_dir, model_dir = self.path("runs", name), self.path("models", name)
        if os.path.exists(os.path.join(model_dir, "config.json")):
            return model_dir
        log(f"train {name} ({self.args.procs} process{'es' if self.args.procs > 1 else ''})")
        conf = [
            "--config",
            os.path.join("configs", "quality", recipe),
            f"data.path={self.path('data')}",
            f"output_dir={run_dir}",
        ] + overrides
        if self.args.procs > 1 or self.args.launcher == "deepspeed":  # "auto"/"direct" with one process: distill-train
            port = str(self.args.master_port + port_offset)  # side-by-side jobs (--jobs) each have their own
            launcher = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(self.args.procs), "--master_port", port, "--module", "distill"]
        else:
            launcher = [os.path.join(BIN, "distill-train")]
        nice = ["nice", "-n", str(self.args.nice)] if self.args.nice else []
        self.sh(nice + launcher + conf, f"train_{name}", "train")
        self.sh(
            [os.path.join(BIN, "distill-export"), "--checkpoint", run_dir, "--output", model_dir, "--overwrite"], f"export_{name}", "export"
        )
        return model_dir

    def pruned_shape(self, v: str) -> list[str]:
        """distill-prune's shape for student (e) (half the layers, the teacher's width) or (f)/(g) (half of every width and the layers)."""
        t = self.scale.teacher
        shape = ["--num-layers", str(t["layers"] // 2)]
        if v in ("f", "g"):
            shape += ["--hidden-size", str(t["hidden"] // 2), "--intermediate-size", str(t["intermediate"] // 2)]
        return shape

    def prune(self, v: str, teacher: str) -> str:
        """The student (e) or (f) cut from the teacher (models/pruned_*); the scores of the first one cut are reused for the other."""
        out = self.path("models", PRUNED[v])
        if os.path.exists(os.path.join(out, "prune.json")):
            return out
        others = [
            self.path("models", name) for name in PRUNED.values() if os.path.exists(self.path("models", name, "importance.safetensors"))
        ]
        source = ["--scores", others[0]] if others else ["--data", self.path("data"), "--sequences", "1024", "--batch-size", "16"]
        log(f"distill-prune ({v}): {' '.join(self.pruned_shape(v))}" + (" (scores reused)" if others else ", calibration pass"))
        threads = ["--threads", str(self.args.threads)] if self.args.threads else []
        device = ["--device", "cuda" if self.args.device and self.args.device.startswith("cuda") else "cpu"] if self.args.device else []
        self.sh(
            [
                *tool("distill-prune"),
                "--teacher",
                teacher,
                *source,
                "--output",
                out,
                *self.pruned_shape(v),
                *threads,
                *device,
                "--overwrite",
            ],
            f"prune_{v}",
            "prune",
        )
        return out

    def pruning_record(self) -> dict:
        """Each pruned student's shape, parameters and calibration pass (from its prune.json)."""
        found = {}
        for v, name in PRUNED.items():
            path = self.path("models", name, "prune.json")
            if os.path.exists(path):
                record = json.load(open(path))
                scores = record["scores"]
                found[v] = {
                    "shape": record["shape"]["student"],
                    "params": record["params"],
                    "layers": record["kept"]["layers"],
                    "calibration": {
                        k: scores.get(k) for k in ("sequences", "tokens", "seconds", "tokens_per_second", "device", "processes")
                    },
                }
        return found

    def curve(self, name: str) -> list[dict]:
        """Held-out (choice split) masked-LM loss of every checkpoint of a run."""
        out_json = self.path("curves", name + ".json")
        if os.path.exists(out_json):
            return json.load(open(out_json))
        from distill.checkpoints.layout import checkpoints_root, list_checkpoints
        from distill.tools.evaluate import evaluate
        from distill.tools.export import export_checkpoint

        t0 = time.time()
        root = checkpoints_root(self.path("runs", name))
        points = []
        tmp = self.path("curves", "_export_" + name)
        for step, tag, complete in list_checkpoints(root):
            if not complete:
                continue
            with self._load_lock:
                export_checkpoint(os.path.join(root, tag), tmp, overwrite=True)
                r = evaluate(
                    tmp, self.path("data"), split="validation", max_sequences=self.scale.curve_max_sequences, device=self.args.device
                )
                m = r["models"]["student"]
            points.append({"step": step, "tokens": None, "mlm_loss": m["mlm_loss"], "accuracy": m["accuracy"]})
        # tokens seen, from the run's metrics (non-padding tokens per step)
        tokens_per_step = self._tokens_per_step(name)
        for p in points:
            p["tokens"] = p["step"] * tokens_per_step if tokens_per_step else None
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.dirname(out_json), exist_ok=True)
        json.dump(points, open(out_json, "w"), indent=1)
        self._add_time("curves", time.time() - t0)
        if not self.args.keep_checkpoints:
            shutil.rmtree(root, ignore_errors=True)  # the exported final model is kept
        return points

    def _tokens_per_step(self, name: str) -> float | None:
        return self.scale.global_batch * self._mean_seq_len()

    def _mean_seq_len(self) -> float:
        manifest = json.load(open(self.path("data", "manifest.json")))
        train = manifest["splits"]["train"]
        return train["tokens"] / max(train["rows"], 1)

    def mlm_eval(self, name: str, model: str, teacher: str | None) -> dict:
        out_json = self.path("eval", name + ".json")
        if not os.path.exists(out_json):
            os.makedirs(os.path.dirname(out_json), exist_ok=True)
            cmd = [
                *tool("distill-eval"),
                "--model",
                model,
                "--data",
                self.path("test_data"),
                "--split",
                "train",
                "--json",
                out_json,
            ]
            if teacher:
                cmd += ["--teacher", teacher]
            if self.scale.test_max_sequences:
                cmd += ["--max-sequences", str(self.scale.test_max_sequences)]
            if self.args.device:
                cmd += ["--device", self.args.device]
            self.sh(cmd, f"eval_{name}", "eval")
        return json.load(open(out_json))

    def finetune(self, name: str, model: str) -> dict | None:
        if self.args.skip_finetune:
            return None
        out_json = self.path("sst2", name + ".json")
        if not os.path.exists(out_json):
            s = self.scale
            cmd = [
                *tool("distill-finetune"),
                "--model",
                model,
                "--train",
                self.args.sst2,
                "--holdout-fraction",
                "0.1",
                "--output",
                self.path("sst2", name),
                "--overwrite",
                "--no-save-model",
                "--json",
                out_json,
                "--epochs",
                str(s.ft_epochs),
                "--lr",
                str(s.ft_lr),
                "--batch-size",
                str(s.ft_batch),
                "--seed",
                "0",
            ]
            if s.ft_examples:
                cmd += ["--max-train-examples", str(s.ft_examples)]
            if self.args.device:
                cmd += ["--device", self.args.device]
            log(f"distill-finetune {name} on SST-2")
            nice = ["nice", "-n", str(self.args.nice)] if self.args.nice else []
            self.sh(nice + cmd, f"sst2_{name}", "finetune")
        return json.load(open(out_json))

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        s, a = self.scale, self.args
        t_start = time.time()
        if a.reuse_from:
            self.link_shared(os.path.abspath(a.reuse_from))
        self.prepare()
        common = [f"train.global_batch={s.global_batch}", f"train.micro_batch={s.micro_batch}", "checkpoint.keep_last=0"] + s.extra
        t = s.teacher
        teacher_over = common + [
            f"train.max_steps={s.teacher_steps}",
            f"checkpoint.every_steps={s.eval_every}",
            f"student.num_layers={t['layers']}",
            f"student.hidden_size={t['hidden']}",
            f"student.num_heads={t['heads']}",
            f"student.intermediate_size={t['intermediate']}",
        ]
        if s.teacher_lr:
            teacher_over.append(f"optim.lr={s.teacher_lr}")
        teacher = self.train("teacher", "teacher.yaml", teacher_over + s.teacher_extra + a.teacher_overrides)
        runs = {"teacher": {"variant": "teacher", "seed": None, "model": teacher, "curve": self.curve("teacher")}}
        student_layers = t["layers"] // 2
        plan = []  # every variant once before the second seed: a cut-short run still compares them
        for seed in a.seeds:
            for v in a.variants:
                name = f"{v}_seed{seed}"
                if a.only_finished and not os.path.exists(self.path("models", name, "config.json")):
                    log(f"{name}: not trained yet, left out (--only-finished)")
                    continue
                plan.append((v, seed, name))

        pruned = {v: self.prune(v, teacher) for v in PRUNED if v in a.variants}  # before the jobs: (f) reuses (e)'s scores

        def student(job: int, v: str, seed: int, name: str) -> dict:
            recipe, _ = VARIANTS[v]
            over = common + [f"train.max_steps={s.student_steps}", f"checkpoint.every_steps={s.student_eval_every}", f"seed={seed}"]
            if v == "b":  # no teacher: give the half-depth shape explicitly
                over += [
                    f"student.num_layers={student_layers}",
                    f"student.hidden_size={t['hidden']}",
                    f"student.num_heads={t['heads']}",
                    f"student.intermediate_size={t['intermediate']}",
                ]
            else:
                over += [f"teacher.path={teacher}"]
            if v in pruned:
                over += [f"student.path={pruned[v]}"]
            if v == "g":  # (f)'s shape: half the teacher's widths (heads of the teacher's head width) and layers
                over += [
                    f"student.num_layers={student_layers}",
                    f"student.hidden_size={t['hidden'] // 2}",
                    f"student.num_heads={t['heads'] // 2}",
                    f"student.intermediate_size={t['intermediate'] // 2}",
                ]
            if s.student_lr:
                over.append(f"optim.lr={s.student_lr}")
            model = self.train(name, recipe, over + a.student_overrides, port_offset=job + 1)
            run = {"variant": v, "seed": seed, "model": model, "curve": self.curve(name)}
            if not a.choice_only:  # each job scores and fine-tunes its own student
                run["test"] = self.mlm_eval(name, model, teacher)
                run["sst2"] = self.finetune(name, model)
            return run

        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            futures = [(name, pool.submit(student, i, v, seed, name)) for i, (v, seed, name) in enumerate(plan)]
            if not a.choice_only and a.jobs > 1:  # the teacher's scores beside the students
                futures.append(("", pool.submit(lambda: (self.mlm_eval("teacher", teacher, None), self.finetune("teacher", teacher)))))
            for name, fut in futures:
                result = fut.result()  # re-raises a job's failure (its log path is in the message)
                if name:
                    runs[name] = result
        if a.choice_only:
            return self.choice_summary(runs)
        runs["teacher"]["test"] = self.mlm_eval("teacher", teacher, None)
        runs["teacher"]["sst2"] = self.finetune("teacher", teacher)
        result = self.summarise(runs)
        result["pruning"] = self.pruning_record()
        result["wall_seconds_this_invocation"] = time.time() - t_start
        result["stage_seconds_this_invocation"] = self.timings
        return result

    def link_shared(self, src: str) -> None:
        """Reuse another --out's tokenizer, prepared data and teacher (investigations of student settings)."""
        for rel in (
            "tokenizer",
            "data",
            "test_data",
            os.path.join("models", "teacher"),
            os.path.join("curves", "teacher.json"),
            os.path.join("eval", "teacher.json"),
            os.path.join("sst2", "teacher.json"),
        ):
            there, here = os.path.join(src, rel), self.path(rel)
            if os.path.exists(there) and not os.path.exists(here):
                os.makedirs(os.path.dirname(here), exist_ok=True)
                os.symlink(there, here)
        if not os.path.exists(self.path("models", "teacher", "config.json")):
            raise SystemExit(f"quality: --reuse-from {src} holds no exported teacher (models/teacher)")

    def choice_summary(self, runs: dict) -> dict:
        """Choice-split (held-out part of valid.txt) metrics at the end of every run: for choosing settings
        without looking at test.txt."""
        rows = {}
        for name, r in runs.items():
            last = r["curve"][-1] if r["curve"] else {}
            rows[name] = {"choice_mlm_loss": last.get("mlm_loss"), "choice_accuracy": last.get("accuracy")}
        return {"scale": self.args.scale, "choice_only": True, "rows": rows, "runs": runs, "student_overrides": self.args.student_overrides}

    def unigram_baseline(self) -> float | None:
        """Masked-token accuracy of always predicting the test text's most frequent (non-special) token."""
        import numpy as np

        try:
            manifest = json.load(open(self.path("test_data", "manifest.json")))
            counts = np.load(self.path("test_data", manifest["token_counts"]["path"])).astype(np.float64)
            counts[manifest["tokenizer"]["all_special_ids"]] = 0
            return float(counts.max() / counts.sum())
        except (OSError, KeyError, ValueError, IndexError):
            return None

    def summarise(self, runs: dict) -> dict:
        teacher = runs["teacher"]
        t_acc = teacher["test"]["models"]["student"]["accuracy"]
        t_sst = teacher["sst2"]["accuracy"] if teacher["sst2"] else None
        rows = {
            "teacher": {
                "label": "teacher (MLM pretraining)",
                "n": 1,
                "mask_acc": [t_acc],
                "ppl": [teacher["test"]["models"]["student"]["perplexity"]],
                "agree": [1.0],
                "sst2": [t_sst] if t_sst is not None else [],
                "params": teacher["test"]["models"]["student"]["parameters"],
            }
        }
        for name, r in runs.items():
            if name == "teacher":
                continue
            row = rows.setdefault(
                r["variant"],
                {
                    "label": f"({r['variant']}) {VARIANTS[r['variant']][1]}",
                    "n": 0,
                    "mask_acc": [],
                    "ppl": [],
                    "agree": [],
                    "sst2": [],
                    "params": r["test"]["models"]["student"]["parameters"],
                },
            )
            row["n"] += 1
            row["mask_acc"].append(r["test"]["models"]["student"]["accuracy"])
            row["ppl"].append(r["test"]["models"]["student"]["perplexity"])
            row["agree"].append(r["test"]["top1_agreement"])
            if r["sst2"]:
                row["sst2"].append(r["sst2"]["accuracy"])
        for row in rows.values():
            for key in ("mask_acc", "ppl", "agree", "sst2"):
                vals = row[key]
                row[key + "_mean"] = statistics.fmean(vals) if vals else None
                row[key + "_spread"] = (max(vals) - min(vals)) if len(vals) > 1 else 0.0  # max - min over seeds
            row["mask_acc_retained"] = row["mask_acc_mean"] / t_acc if t_acc else None
            row["sst2_retained"] = row["sst2_mean"] / t_sst if (t_sst and row["sst2_mean"] is not None) else None
        checks = {}
        baseline = self.unigram_baseline()
        if baseline is not None:
            # a teacher that predicts the most frequent token everywhere makes every other check vacuous
            checks["teacher_beats_most_frequent_token_baseline"] = t_acc > baseline + 0.02
        if "a" in rows:
            a = rows["a"]
            if a["mask_acc_retained"] is not None:  # None: a teacher with zero accuracy (smoke sizes)
                checks["a_keeps_97pct_mask_acc"] = a["mask_acc_retained"] >= 0.97
            if a["sst2_retained"] is not None:
                checks["a_keeps_97pct_sst2"] = a["sst2_retained"] >= 0.97
            for other in ("b", "c"):
                if other in rows:
                    o = rows[other]
                    spread = max(a["mask_acc_spread"], o["mask_acc_spread"])
                    checks[f"a_beats_{other}_mask_acc_by_more_than_seed_spread"] = (a["mask_acc_mean"] - o["mask_acc_mean"]) > spread
                    if a["sst2_mean"] is not None and o["sst2_mean"] is not None:
                        checks[f"a_beats_{other}_sst2_by_more_than_seed_spread"] = (a["sst2_mean"] - o["sst2_mean"]) > max(
                            a["sst2_spread"], o["sst2_spread"]
                        )
        for cut, same_shape in (("e", "a"), ("f", "g")):  # issue 26: does pruning beat its baseline of the same shape?
            if cut in rows and same_shape in rows:
                c_row, s_row = rows[cut], rows[same_shape]
                spread = max(c_row["mask_acc_spread"], s_row["mask_acc_spread"])
                checks[f"{cut}_beats_{same_shape}_mask_acc_by_more_than_seed_spread"] = (
                    c_row["mask_acc_mean"] - s_row["mask_acc_mean"]
                ) > spread
        curve = teacher["curve"]
        flat = None
        if len(curve) >= 4:
            q = curve[-max(2, len(curve) // 4) :]
            flat = {"last_quarter_relative_drop": (q[0]["mlm_loss"] - q[-1]["mlm_loss"]) / q[0]["mlm_loss"]}
            flat["flattened"] = flat["last_quarter_relative_drop"] < 0.02
        return {
            "scale": self.args.scale,
            "scale_sizes": self.scale.__dict__,
            "seeds": self.args.seeds,
            "rows": rows,
            "checks": checks,
            "most_frequent_token_mask_acc_baseline": baseline,
            "teacher_curve_flatness": flat,
            "runs": {n: {k: v for k, v in r.items() if k != "test"} | {"test": r["test"]} for n, r in runs.items()},
        }


def render_table(result: dict) -> str:
    if result.get("choice_only"):
        lines = [
            f"{'run':<14} {'choice-split mlm loss':>22} {'choice-split mask acc':>22}   (overrides: {' '.join(result['student_overrides']) or 'none'})"
        ]
        for name, r in result["rows"].items():
            loss, acc = r["choice_mlm_loss"], r["choice_accuracy"]
            lines.append(f"{name:<14} {loss if loss is None else round(loss, 4)!s:>22} {'-' if acc is None else f'{acc:.2%}':>22}")
        return "\n".join(lines)

    def pm(mean, spread, fmt):
        if mean is None:
            return "-"
        return fmt.format(mean) + (f" ±{fmt.format(spread / 2).strip()}" if spread else "")

    lines = [
        f"{'model':<34} {'params':>7} {'seeds':>5} {'mask acc (test)':>17} {'retained':>8} {'ppl (test)':>15} {'top-1 agree':>15} {'SST-2 acc':>15} {'retained':>8}"
    ]
    for key, r in result["rows"].items():
        lines.append(
            f"{r['label']:<34} {r['params'] / 1e6:>6.1f}M {r['n']:>5} {pm(r['mask_acc_mean'] and 100 * r['mask_acc_mean'], 100 * r['mask_acc_spread'], '{:.2f}'):>17} "
            f"{(r['mask_acc_retained'] or 0):>8.1%} {pm(r['ppl_mean'], r['ppl_spread'], '{:.1f}'):>15} "
            f"{pm(r['agree_mean'] and 100 * r['agree_mean'], 100 * r['agree_spread'], '{:.2f}'):>15} "
            f"{pm(r['sst2_mean'] and 100 * r['sst2_mean'], 100 * r['sst2_spread'], '{:.2f}'):>15} "
            f"{(r['sst2_retained'] or 0):>8.1%}"
        )
    lines.append("accuracies in %; ± is half the max-min range over seeds")
    if result.get("most_frequent_token_mask_acc_baseline") is not None:
        lines.append(
            f"always predicting the most frequent token: {result['most_frequent_token_mask_acc_baseline']:.2%} masked-token accuracy"
        )
    flat = result.get("teacher_curve_flatness")
    if flat:
        lines.append(
            f"teacher held-out loss over its last quarter of training: {flat['last_quarter_relative_drop']:+.1%} "
            f"({'flattened' if flat['flattened'] else 'still falling'})"
        )
    for name, ok in result["checks"].items():
        lines.append(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    for v, p in (result.get("pruning") or {}).items():
        c = p["calibration"]
        lines.append(
            f"({v}) cut by distill-prune: {p['params']['student']:,} parameters ({p['params']['fraction']:.1%} of the teacher), teacher layers "
            f"{p['layers']}; calibration {c['sequences']} sequences, {c['tokens']:,} tokens in {c['seconds']} s ({c['tokens_per_second']} tokens/s, {c['device']})"
        )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    colors = {
        "teacher": "black",
        "a": "tab:blue",
        "b": "tab:red",
        "c": "tab:orange",
        "d": "tab:green",
        "e": "tab:purple",
        "f": "tab:brown",
        "g": "tab:gray",
    }
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in result["runs"].items():
        pts = r["curve"]
        if not pts:
            continue
        xs = [p["tokens"] / 1e6 if p["tokens"] else p["step"] for p in pts]
        label = "teacher" if name == "teacher" else result["rows"][r["variant"]]["label"] + f", seed {r['seed']}"
        style = "-" if (r["seed"] in (None, result["seeds"][0])) else "--"
        ax.plot(xs, [p["mlm_loss"] for p in pts], style, marker="o", ms=3, color=colors.get(r["variant"], None), label=label)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("held-out masked-LM loss (choice split of valid.txt)")
    ax.set_title(f"WikiText-2 quality benchmark, scale {result['scale']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--smoke", action="store_true", help="same as --scale smoke")
    p.add_argument("--out", default=None, help="working directory (default runs/quality-<scale>)")
    p.add_argument("--valid", default=os.path.join(SHARED, "wikitext-2", "valid.txt"))
    p.add_argument("--test", default=os.path.join(SHARED, "wikitext-2", "test.txt"))
    p.add_argument("--sst2", default=os.path.join(SHARED, "sst-2", "train.tsv"))
    p.add_argument(
        "--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), help="students to train (none: the teacher only)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--procs", type=int, default=None, help="training processes (default: 1 on CPU, every GPU otherwise)")
    p.add_argument(
        "--launcher",
        choices=["auto", "deepspeed", "direct"],
        default="auto",
        help="deepspeed launcher, or distill-train as one process (the same DeepSpeed engine, one launcher less); auto: direct when --procs 1",
    )
    p.add_argument("--master-port", type=int, default=29800, help="first port of the deepspeed launcher; job i of --jobs uses port + i + 1")
    p.add_argument(
        "--jobs", type=int, default=1, help="students trained, scored and fine-tuned side by side (share the GPUs/cores; see --threads)"
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="tokenizer and prepared data only, then stop (prepare on a CPU machine, train on a GPU one)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of every process unless set in the environment (default: cores / --procs)",
    )
    p.add_argument("--nice", type=int, default=0, help="run training and fine-tuning under nice -n N (shared machines)")
    p.add_argument("--device", default=None)
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument(
        "--choice-only",
        action="store_true",
        help="train and score on the choice split of valid.txt only (no test.txt, no SST-2): for choosing settings",
    )
    p.add_argument("--only-finished", action="store_true", help="train nothing new: evaluate and tabulate the students already trained")
    p.add_argument("--reuse-from", default=None, help="another --out whose tokenizer, prepared data and teacher are reused")
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep every DeepSpeed checkpoint (default: deleted once its curve point is measured)",
    )
    p.add_argument("--teacher-overrides", nargs="*", default=[], help="extra key=value overrides of the teacher recipe")
    p.add_argument("--student-overrides", nargs="*", default=[], help="extra key=value overrides of every student recipe")
    p.add_argument("--json", default=None, help="result JSON (default OUT/quality.json)")
    p.add_argument("--plot", default=None, help="PNG of the held-out loss curves (default OUT/quality_curves.png)")
    args = p.parse_args()
    if args.smoke:
        args.scale = "smoke"
    args.out = args.out or os.path.join(REPO, "runs", f"quality-{args.scale}")
    for f in (args.valid, args.test) + (() if args.skip_finetune else (args.sst2,)):
        if not os.path.exists(f):
            print(
                f"quality: {f} does not exist (WikiText-2 and SST-2 are read from ../shared/data/; pass --valid/--test/--sst2)",
                file=sys.stderr,
            )
            return 2
    if args.procs is None:
        import torch

        args.procs = torch.cuda.device_count() if torch.cuda.is_available() else 1
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // max(args.procs, 1))
    t0 = time.time()
    runner = Runner(args)
    if args.prepare_only:
        runner.prepare()
        print(f"prepared: {runner.out} (tokenizer, data, test_data)")
        return 0
    result = runner.run()
    result["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
    result["procs"] = args.procs
    result["hardware"] = hardware()
    json_path = args.json or os.path.join(runner.out, "quality.json")
    png_path = args.plot or os.path.join(runner.out, "quality_curves.png")
    with open(json_path, "w") as handle:
        json.dump(result, handle, indent=2, default=str)
    if not result.get("choice_only"):
        plot(result, png_path)
    print(render_table(result))
    print(
        f"JSON: {json_path}\n{'' if result.get('choice_only') else f'plot: {png_path}' + chr(10)}wall time of this invocation: {(time.time() - t0) / 60:.1f} min "
        f"(stages: {', '.join(f'{k} {v / 60:.1f} min' for k, v in runner.timings.items())})"
    )
    return 0


def hardware() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
