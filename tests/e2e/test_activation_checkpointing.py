"""train.activation_checkpointing under the real DeepSpeed engine in 2 processes (gloo on CPU): a run that recomputes every
student layer in backward has the losses, gradient norms and final weights of the same run without it (1e-6), at ZeRO-2
(a BERT student with dropout and TinyBERT's losses: attention q/k/v captured by hooks, projected hidden states, plus the
soft cross-entropy) and at ZeRO-3 (the llm_kd recipe: a Llama student with attention dropout, chunked logit losses).

One launch of the deepspeed launcher runs the four trainings one after the other in each process
(tests/e2e/activation_checkpointing_worker.py calls the trainer that distill-train calls), sparing three launches."""

from __future__ import annotations

import json
import os

import pytest
from support import BIN, LLM_TINY, latest, metrics, run_log, save_teacher, train_args

pytestmark = pytest.mark.timeout(900)
STEPS = 4
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "activation_checkpointing_worker.py")
LOGGED = "activation checkpointing: student layers [0, 1] recomputed in backward"


def _weights(run_dir):
    from distill.tools.export import consolidated_state_dict

    return consolidated_state_dict(os.path.join(run_dir, "checkpoints"), latest(run_dir))


def _assert_same_runs(plain, checkpointed, terms):
    a, b = metrics(plain), metrics(checkpointed)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, STEPS + 1))
    for key in ["loss", "grad_norm"] + [f"loss_{t}" for t in terms]:
        x, y = [m[key] for m in a], [m[key] for m in b]
        assert all(abs(p - q) <= 1e-6 * max(1.0, abs(p)) for p, q in zip(x, y)), (key, x, y)
    assert a[0]["loss"] != a[-1]["loss"]  # the weights moved
    wa, wb = _weights(plain), _weights(checkpointed)
    assert wa.keys() == wb.keys() and len(wa) > 10
    for name, tensor in wa.items():
        assert (wb[name] - tensor).abs().max().item() <= 1e-6, name


def test_checkpointed_runs_match_plain_runs_at_zero2_and_zero3(tmp_path, teacher_dir, prepared_dir, bpe_data):
    tokenizer, causal_data = bpe_data
    llama = save_teacher("llama", tokenizer, str(tmp_path / "llama"), vocab_rows=len(tokenizer) + 24)
    common = [f"train.max_steps={STEPS}", "train.log_every=1", f"checkpoint.every_steps={STEPS}"]
    bert = [
        "student.num_layers=2", "student.hidden_size=32", "student.num_heads=4",
        "student.intermediate_size=64", "student.dropout=0.1",
        "loss.weights={ce: 1.0, tinybert_emb: 1.0, tinybert_hidden: 1.0, tinybert_attn: 1.0}", "train.global_batch=16",
        "train.micro_batch=4", "train.precision=fp32", "optim.lr=1e-3", "optim.warmup_fraction=0.0",
        "deepspeed.config=configs/deepspeed/zero2.json", *common,
    ]  # fmt: skip
    decoder = [*LLM_TINY, "deepspeed.config=configs/deepspeed/zero3.json", "student.dropout=0.1", *common]
    cases = {
        "zero2_bert": (teacher_dir, prepared_dir, "configs/tinybert.yaml", bert),
        "zero3_llama": (llama, causal_data, "configs/llm_kd.yaml", decoder),
    }
    runs, argvs = {}, []
    for name, (teacher, data, recipe, settings) in cases.items():
        for every in (0, 1):
            runs[name, every] = str(tmp_path / f"{name}_every{every}")
            argvs.append(train_args(teacher, data, runs[name, every], *settings, f"train.activation_checkpointing={every}", config=recipe))
    with open(tmp_path / "runs.json", "w") as handle:
        json.dump(argvs, handle)
    log = run_log([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29781", WORKER, str(tmp_path / "runs.json")])
    for (name, every), out in runs.items():
        own = log.split(f"=== run {out}\n", 1)[1].split("=== run ", 1)[0]
        assert (LOGGED in own) == bool(every), own[-3000:]
    _assert_same_runs(runs["zero2_bert", 0], runs["zero2_bert", 1], ["ce", "tinybert_emb", "tinybert_hidden", "tinybert_attn"])
    _assert_same_runs(runs["zero3_llama", 0], runs["zero3_llama", 1], ["ce", "clm"])
