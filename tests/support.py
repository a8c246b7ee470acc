"""Plain helpers shared by test modules (not a test module; tests import it, never each other).

tests/ is on sys.path because tests/conftest.py lives there (pytest's default `prepend` import mode).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def train_args(teacher, data, out, *settings, config="configs/distilbert.yaml") -> list[str]:
    """The one builder of distill-train arguments: `--config` (none with config=None, where a helper adds it), the
    teacher, data and output paths, then `key=value` settings in order."""
    recipe = ["--config", config] if config is not None else []
    return [*recipe, f"teacher.path={teacher}", f"data.path={data}", f"output_dir={out}", *settings]


def run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    """Run a command from the repository root with the test environment; fail with its output unless it exits 0."""
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[:6]} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


def run_log(cmd) -> str:
    """`run`, returning stdout + stderr."""
    proc = run(cmd)
    return proc.stdout + proc.stderr


def launcher(args, port) -> list[str]:
    """The deepspeed launcher starting `python -m distill` in 2 local processes."""
    return [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "distill"] + args


def deepspeed_run(args, port, check=True) -> subprocess.CompletedProcess:
    return run(launcher(args, port), check=check)


def deepspeed_recipe(recipe, args, port) -> str:
    """A 2-process run of configs/<recipe>.yaml with `args`; returns its log."""
    return run_log(launcher(["--config", f"configs/{recipe}.yaml"] + args, port))


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def losses(run_dir, key="loss") -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line)[key] for line in handle]


def assert_falls(values, factor, what):
    """The mean of the last 5 steps is below `factor` x the mean of the first 5 (far beyond step-to-step noise)."""
    first, last = float(np.mean(values[:5])), float(np.mean(values[-5:]))
    assert last < factor * first, f"{what} did not fall enough: first 5 steps {first:.4f}, last 5 {last:.4f} ({values})"


def safetensors_of(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def assert_one_line_error(code, lines, *fragments):
    """Exit 2, exactly one `distill-...` error line holding every fragment, no traceback."""
    assert code == 2, lines
    errors = [line for line in lines if line.startswith("distill-")]
    assert len(errors) == 1, lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not any("Traceback" in line for line in lines), lines


def assert_one_line_error_of(code, lines, prog, *fragments):
    """Exit 2, exactly one `<prog>: error` line holding every fragment, no traceback."""
    assert code == 2, lines
    errors = [line for line in lines if line.startswith(f"{prog}: error")]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def wait_for(predicate, proc, timeout=600, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def steps_logged(out) -> int:
    path = os.path.join(out, "metrics.jsonl")
    return len(metrics(out)) if os.path.exists(path) else 0


def worker(proc, local_rank):
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        if f"--local_rank={local_rank}" in child.cmdline():
            return child
    raise AssertionError(f"no worker with local rank {local_rank} under the launcher")


def latest(out) -> str:
    return open(os.path.join(out, "checkpoints", "latest")).read()


# What a tiny random model of each causal family needs beyond the common shape (hidden 64, 4 heads, 2 KV heads, FFN 112,
# 4 layers): head sizes, experts, and output transforms small enough to matter on random logits (a softcap of 2, a
# logits scaling of 4) so that a dropped transform shows.
LLM_FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 2.0, "sliding_window": 16},
    "gemma3_text": {
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "final_logit_softcapping": 2.0,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],  # repeated to the model's depth
    },
    "phi3": {},
    "olmo2": {},
    "granite": {"logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.5},
    "smollm3": {},
    "glm4": {},
    "ernie4_5": {},
    "qwen3_moe": {
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "router_aux_loss_coef": 0.02,
        "mlp_only_layers": [3],
    },
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "logits_scaling": 4.0},
    "deepseek_v3": {
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
    },
}


def tiny_teacher(family: str, tokenizer=None, path: str | None = None, *, layers=4, vocab=None, tie=False, positions=None, **over):
    """The one tiny random teacher factory: a masked (`bert`) or causal (gpt2, or a family of LLM_FAMILIES) model.

    With `path` the model is saved there (with `tokenizer`, when given) and the path is returned; without, the
    model is returned in eval mode. Causal teachers: hidden 64, 4 heads, 2 KV heads, intermediate 112. With a
    tokenizer the special ids are its EOS (the head may be padded past it via `vocab`); without, ids 0/1/2 and
    every weight is nudged so that no two are equal (norms start at 1).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    if family == "bert":
        config = AutoConfig.for_model(
            "bert",
            vocab_size=vocab or len(tokenizer),
            hidden_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=positions or 128,
            pad_token_id=tokenizer.pad_token_id if tokenizer is not None else 0,
            **over,
        )
    else:
        eos = tokenizer.eos_token_id if tokenizer is not None else None
        ids = (
            dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
            if tokenizer is not None
            else dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
        )
        shape = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
        extras = dict(LLM_FAMILIES.get(family, {}))
        if "layer_types" in extras:
            extras["layer_types"] = (extras["layer_types"] * layers)[:layers]
        if tokenizer is None:
            shape["tie_word_embeddings"] = tie
        config = AutoConfig.for_model(
            family,
            vocab_size=vocab if vocab is not None else 301,
            **shape,
            max_position_embeddings=positions or (64 if tokenizer is not None else 128),
            **ids,
            **{**extras, **over},
        )
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    if path is not None:
        auto.from_config(config).save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path
    try:
        model = auto.from_config(config, attn_implementation="sdpa")
    except ValueError:  # a family without an SDPA kernel (Gemma 2)
        model = auto.from_config(config, attn_implementation="eager")
    if tokenizer is None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


LLM_TINY = [
    "train.global_batch=16",
    "train.micro_batch=8",
    "train.log_every=5",
    "optim.warmup_fraction=0.0",
    "optim.lr=3e-3",
    "deepspeed.config=configs/deepspeed/zero2.json",
    "student.dropout=0.0",
]  # the small decoder-LLM run settings


def save_teacher(model_type: str, tokenizer, path: str, vocab_rows: int) -> str:
    """A tiny random causal teacher saved with `tokenizer`, its head padded to `vocab_rows` (as real checkpoints are)."""
    return tiny_teacher(model_type, tokenizer, path, vocab=vocab_rows)


SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


def shared_data_path(*parts: str) -> str:
    """Path under ../shared/data, or skip the test (a user's fresh clone has no shared folder)."""
    import pytest

    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (../shared/data only exists beside the team's checkout)")
    return path


def blow_up_weights(out: str, tag: str) -> None:
    """Make a saved checkpoint's weights huge (as a run that diverged would leave them): the next forward is inf/NaN."""
    import glob

    import torch

    for path in glob.glob(os.path.join(out, "checkpoints", tag, "*optim_states.pt")):  # ZeRO-2: the fp32 master partitions
        state = torch.load(path, map_location="cpu", weights_only=False)
        for flat in state["optimizer_state_dict"]["single_partition_of_fp32_groups"]:
            flat.data.mul_(1e30)
        torch.save(state, path)
    for path in glob.glob(os.path.join(out, "checkpoints", tag, "*model_states.pt")):  # and the module's copy
        state = torch.load(path, map_location="cpu", weights_only=False)
        for tensor in state["module"].values():
            if tensor.is_floating_point():
                tensor.mul_(1e30)
        torch.save(state, path)


def assert_close(actual, expected, rtol=1e-5):
    """Max |difference| at most rtol times the reference's largest magnitude (and not all zero by accident)."""
    scale = expected.abs().max().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= rtol * max(scale, 1e-12), f"max abs diff {diff:.3e} vs scale {scale:.3e}"


def private_tmpdir(tmp_path, monkeypatch) -> str:
    """A fresh TMPDIR for this process and the processes it starts."""
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return str(scratch)


def trainer_samples(seqs, plan, collator, steps):
    """(stream index, row, masked ids, labels) of every sample of `steps` optimizer steps, as the trainer's loader gives them."""
    from distill.data.reader import MicroBatches

    items = MicroBatches(seqs, plan, collator, 0, steps)
    out = []
    for i in range(len(items)):
        batch = items[i]
        for b in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][b].sum())
            out.append(
                (
                    int(batch["stream_indices"][b]),
                    int(batch["rows"][b]),
                    batch["input_ids"][b, :n].numpy(),
                    batch["labels"][b, :n].numpy(),
                    int(batch["mask_variants"][b]) if "mask_variants" in batch else None,
                )
            )
    return out


def read_split(out, manifest, split):
    """(input_ids, word_start) of every row of a prepared split, shard by shard."""
    import pyarrow.parquet as pq

    rows = []
    for shard in manifest.splits[split].shards:
        table = pq.read_table(os.path.join(out, shard.path))
        rows += list(zip(table.column("input_ids").to_pylist(), table.column("word_start").to_pylist()))
    return rows


POSITIVE = ["good", "great", "fine", "nice", "happy", "love"]
NEGATIVE = ["bad", "poor", "awful", "sad", "hate", "wrong"]
FILLER = ["the", "list", "is", "a", "module", "function", "value", "object", "file", "name"]


def synthetic_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """A learnable task: label 1 iff the sentence holds a word from POSITIVE (else one from NEGATIVE)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path: str, rows, header: bool = True, extra_lines: tuple[str, ...] = ()) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        if header:
            handle.write("sentence\tlabel\n")
        for sentence, label in rows:
            handle.write(f"{sentence}\t{label}\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return path


def cli(name, *args):
    """(exit code, stderr lines) of a console script run from the repository."""
    proc = subprocess.run([os.path.join(BIN, name), *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr.strip().splitlines()


def start(args, port, env=None):
    """A 2-process deepspeed run of distill-train in its own session (so a test can signal it), output piped."""
    return subprocess.Popen(
        launcher(args, port),
        cwd=REPO_ROOT,
        env=env or ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


FAULT_STEPS = 12


def fault_job_args(teacher_dir, data_dir, out, zero=2):
    """The fault tests' run: 12 steps, a checkpoint every 4; dropout 0 so a 1-rank elastic resume compares numerically."""
    return train_args(
        teacher_dir,
        data_dir,
        out,
        "student.init=random",
        "student.init_layers=null",
        "student.dropout=0.0",
        "train.global_batch=32",
        "train.micro_batch=8",
        f"train.max_steps={FAULT_STEPS}",
        "optim.lr=3e-3",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=0",
        "train.log_every=1",
        f"deepspeed.config=configs/deepspeed/zero{zero}.json",
    )


def cache(assets, out, *extra, check=True):
    """distill-cache of the `cache_assets` fixture's data and teacher into `out` (parts of 16 rows)."""
    cmd = [os.path.join(BIN, "distill-cache"), "--data", assets["data"], "--teacher", assets["teacher"], "--output", str(out)]
    proc = subprocess.run(cmd + ["--rows-per-part", "16", *extra], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"distill-cache exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def cache_teacher(cfg):
    """The run's teacher cache opened as distill-train opens it: the weight-free pass (preflight, which checks the cache
    against the run and raises its problems as one ConfigError), then `CacheTeacher.load` on one CPU rank."""
    import torch

    from distill.teachers.cache import CacheTeacher
    from distill.train.distributed import DistContext
    from distill.train.preflight import preflight

    plan = preflight(cfg, 1, torch.device("cpu"))
    plan.raise_if_any()
    return CacheTeacher.load(
        cfg.teacher, plan, DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
    )


def byte_level_bpe(corpus_dir: str, root, lines: int, vocab: int = 320):
    """The first `lines` lines of each file of `corpus_dir` copied to ROOT/corpus, and a byte-level BPE tokenizer
    (`<|endoftext|>` as bos, eos and pad) trained on them and saved in ROOT/tokenizer; returns (corpus dir, tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = root / "corpus"
    corpus.mkdir()
    for name in sorted(os.listdir(corpus_dir)):
        with open(os.path.join(corpus_dir, name)) as handle:
            (corpus / name).write_text("\n".join(handle.read().splitlines()[:lines]) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(
        sorted(str(corpus / f) for f in os.listdir(corpus)),
        trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(str(root / "tokenizer"))
    return corpus, tokenizer
