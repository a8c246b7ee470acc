"""Decoder-LLM distillation end to end, on real components: a byte-level BPE tokenizer trained here, causal data
prepared by distill-prep, tiny random Llama / Mistral / Qwen2 / Qwen3 teachers saved with save_pretrained, the
configs/llm_kd.yaml recipe (forward KL + causal LM, chunked logit losses) in 2 DeepSpeed processes, each document of a
packed row attending only within itself (data.document_attention, the default): losses fall, the student exports,
reloads with AutoModelForCausalLM and generates; at ZeRO-3 a halted run resumes bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from support import LLM_TINY as TINY
from support import assert_falls, losses, save_teacher, train_args
from support import deepspeed_recipe as deepspeed

pytestmark = pytest.mark.timeout(900)


def generate_from_export(export: str, model_type: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(export, local_files_only=True)
    assert model.config.model_type == model_type and model.config.num_hidden_layers == 2
    prompt = tokenizer("The list is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6 and isinstance(tokenizer.decode(out[0]), str)


@pytest.mark.parametrize("model_type, port", [("llama", 29761), ("mistral", 29762), ("qwen2", 29763), ("qwen3", 29764)])
def test_each_family_distils_at_zero2_exports_and_generates(tmp_path, bpe_data, model_type, port):
    from distill.tools.export import export_checkpoint

    tokenizer, data = bpe_data
    teacher = save_teacher(model_type, tokenizer, str(tmp_path / "teacher"), vocab_rows=len(tokenizer) + 24)
    out = str(tmp_path / "run")
    log = deepspeed(
        "llm_kd",
        [*train_args(teacher, data, out, config=None), "train.max_steps=20", "checkpoint.every_steps=20"] + TINY,
        port,
    )
    assert "student initialised from teacher layers [0, 3]" in log
    assert "attention and position ids restart at each document (the doc_start flags distill-prep recorded)" in log
    assert_falls(losses(out, "loss_clm"), 0.95, "causal LM loss")
    export = str(tmp_path / "export")
    export_checkpoint(out, export)
    generate_from_export(export, model_type)
    from distill.tools.evaluate import evaluate

    result = evaluate(export, data, teacher, max_sequences=8, device="cpu")  # the exported student through distill-eval
    student = result["models"]["student"]
    assert result["task"] == "causal_lm" and result["tokens"] > 0 and student["kl_from_teacher"] > 0
    assert student["perplexity"] < len(tokenizer), "better than a uniform guess over the vocabulary"


def test_llama_at_zero3_halts_and_resumes_bit_for_bit(tmp_path, bpe_data):
    from safetensors.torch import load_file

    from distill.tools.export import export_checkpoint

    tokenizer, data = bpe_data
    teacher = save_teacher("llama", tokenizer, str(tmp_path / "teacher"), vocab_rows=len(tokenizer))
    args = (
        [f"teacher.path={teacher}", f"data.path={data}", "train.max_steps=12", "checkpoint.every_steps=6"]
        + TINY
        + ["deepspeed.config=configs/deepspeed/zero3.json", "loss.weights={jsd: 1.0, clm: 1.0}", "loss.temperature=2.0"]
    )
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    deepspeed("llm_kd", args + [f"output_dir={straight}"], 29765)
    first = deepspeed("llm_kd", args + [f"output_dir={resumed}", "train.halt_at_step=6"], 29765)
    assert "halted at step 6" in first
    deepspeed("llm_kd", args + [f"output_dir={resumed}"], 29765)
    a = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    b = [json.loads(line) for line in open(os.path.join(resumed, "metrics.jsonl"))]
    assert [r["loss"] for r in a] == [r["loss"] for r in b], "resumed losses differ"
    assert_falls([r["loss_clm"] for r in a], 0.97, "causal LM loss at ZeRO-3")
    for run_dir, export in ((straight, tmp_path / "e1"), (resumed, tmp_path / "e2")):
        export_checkpoint(run_dir, str(export))
    w1, w2 = load_file(str(tmp_path / "e1" / "model.safetensors")), load_file(str(tmp_path / "e2" / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    generate_from_export(str(tmp_path / "e1"), "llama")
