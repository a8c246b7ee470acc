"""Real runs: distill-prep (Beam) -> 2-process DeepSpeed (launcher, gloo) -> checkpoints -> resume -> export.

Nothing is mocked; the only stand-in is the CPU (gloo instead of NCCL, fp32 instead of bf16).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from support import BIN, metrics, run, train_args
from support import deepspeed_run as deepspeed
from support import safetensors_of as _safetensors

pytestmark = pytest.mark.timeout(900)


def common_args(teacher_dir, data_dir, out, zero):
    return train_args(
        teacher_dir,
        data_dir,
        out,
        "student.init=random",
        "student.init_layers=null",
        "train.global_batch=32",
        "train.micro_batch=8",
        "train.max_steps=8",
        "optim.lr=3e-3",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=0",
        "train.log_every=1",
        f"deepspeed.config=configs/deepspeed/zero{zero}.json",
    )


@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_run_checkpoints_resumes_identically_and_exports(tmp_path, teacher_dir, prepared_dir, zero):
    port = 29610 + zero
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    deepspeed(common_args(teacher_dir, prepared_dir, straight, zero), port)
    first = deepspeed(common_args(teacher_dir, prepared_dir, resumed, zero) + ["train.halt_at_step=4"], port)
    assert "halted at step 4" in first.stderr + first.stdout

    ckpt_root = os.path.join(resumed, "checkpoints")
    assert open(os.path.join(ckpt_root, "latest")).read() == "step_00000004"
    step4 = os.path.join(ckpt_root, "step_00000004")
    files = os.listdir(step4)
    assert {"COMPLETE", "trainer_state.json", "hf_config", "tokenizer"} <= set(files)
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(files), "one optimizer shard per rank"
    state = json.load(open(os.path.join(step4, "trainer_state.json")))
    assert state["step"] == 4 and state["samples_consumed"] == 4 * 32 and state["world_size"] == 2 and state["zero_stage"] == zero

    # the resumed half runs with the phase breakdown on: it must not change a single loss (checked below)
    second = deepspeed(common_args(teacher_dir, prepared_dir, resumed, zero) + ["train.profile_phases=true"], port)
    assert "resumed from" in second.stderr + second.stdout
    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in a] == list(range(1, 9)) and [m["step"] for m in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert x["data"] == y["data"], f"step {x['step']}: the resumed run trained on other samples"
        assert x["loss"] == y["loss"], f"step {x['step']}: {x['loss']} != {y['loss']}"
    # A random student against a random teacher: the distillation terms have far to fall (first 3 steps
    # ~16.2, last 3 ~15.8 here; step-to-step noise is ~0.05), whereas a teacher-initialised student starts at ~0.
    assert np.mean([m["loss"] for m in a[-3:]]) < np.mean([m["loss"] for m in a[:3]]) - 0.15, "loss goes down"
    assert a[-1]["loss_cos"] < 0.8 * a[0]["loss_cos"], "the student's hidden states move towards the teacher's"
    assert all(m["grad_norm"] is not None and m["grad_norm"] > 0 for m in a)
    assert all("phase_seconds" not in m for m in a + b[:4]) and all("phase_seconds" in m for m in b[4:])
    for m in b[4:]:
        phases, step_s = m["phase_seconds"], m["tokens"] / m["tokens_per_s"]
        assert all(phases[p] > 0 for p in ("teacher_forward", "student_forward", "loss", "backward", "optimizer")), phases
        assert phases["comm"] > 0, "2 ranks reduce gradients: DeepSpeed's comms logger saw collectives"
        assert 0.5 * step_s < sum(phases.values()) <= step_s * 1.01, (phases, step_s)

    exports = {}
    for name, run_dir in (("straight", straight), ("resumed", resumed)):
        exports[name] = str(tmp_path / f"export_{name}")
        run([os.path.join(BIN, "distill-export"), "--checkpoint", run_dir, "--output", exports[name]])
    wa, wb = _safetensors(exports["straight"]), _safetensors(exports["resumed"])
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed run's final weights equal the uninterrupted run's, bit for bit"

    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    model = AutoModelForMaskedLM.from_pretrained(exports["resumed"], local_files_only=True)
    assert type(model).__name__ == "DistilBertForMaskedLM" and model.config.n_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(exports["resumed"], local_files_only=True)
    guesses = pipeline("fill-mask", model=model, tokenizer=tokenizer)("the list is [MASK] in place.")
    assert len(guesses) == 5 and all("[MASK]" not in g["sequence"] for g in guesses)


def test_mlm_only_teacher_pretraining_single_process_and_eval(tmp_path, prepared_dir):
    """The demo's teacher step: no teacher, BERT student from random init, plain MLM, one process."""
    out = str(tmp_path / "teacher_run")
    run(
        [
            sys.executable,
            "-m",
            "distill",
            "--config",
            "configs/demo_teacher.yaml",
            f"data.path={prepared_dir}",
            f"output_dir={out}",
            "student.hidden_size=64",
            "student.intermediate_size=128",
            "student.num_layers=2",
            "train.max_steps=12",
            "train.global_batch=32",
            "train.micro_batch=16",
            "optim.lr=2e-3",
            "train.log_every=4",
        ]
    )
    m = metrics(out)
    assert set(m[0]) >= {"loss", "loss_mlm", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "samples_seen"}
    assert "loss_ce" not in m[0]
    assert m[-1]["loss"] < m[0]["loss"] - 0.3
    export = str(tmp_path / "teacher")
    run([os.path.join(BIN, "distill-export"), "--checkpoint", out, "--output", export])
    assert json.load(open(os.path.join(export, "config.json")))["architectures"] == ["BertForMaskedLM"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    assert {"loss/total", "loss/mlm", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_seen"} <= set(
        events.Tags()["scalars"]
    )
    assert "config/text_summary" in events.Tags()["tensors"]

    result_file = str(tmp_path / "eval.json")
    proc = run([os.path.join(BIN, "distill-eval"), "--model", export, "--teacher", export, "--data", prepared_dir, "--json", result_file])
    assert "top-1 agreement" in proc.stdout
    result = json.load(open(result_file))
    assert result["top1_agreement"] == 1.0  # a model agrees with itself
    _check_eval_independently(export, prepared_dir, result)


def _check_eval_independently(model_dir, data_dir, result):
    """Recompute masked accuracy and loss with the model's own full forward on the same masked batches."""
    from transformers import AutoModelForMaskedLM

    from distill.data.masking import MaskingCollator, MaskingPolicy
    from distill.data.reader import TokenSequences
    from distill.tools.evaluate import EVAL_SEED

    sequences = TokenSequences(data_dir, "validation")
    manifest = sequences.manifest
    model = AutoModelForMaskedLM.from_pretrained(model_dir, local_files_only=True).eval()
    ids = manifest.tokenizer.special_token_ids
    collator = MaskingCollator(
        MaskingPolicy(
            mask_id=ids["mask"], pad_id=ids["pad"], vocab_size=model.config.vocab_size, special_ids=manifest.tokenizer.all_special_ids
        ),
        EVAL_SEED,
    )
    correct = total = 0
    nll = 0.0
    for i in range(len(sequences)):  # one sequence at a time: no padding, no batching shortcuts
        batch = collator(sequences.rows(np.array([i])), [i])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
        labels = batch["labels"][0]
        sel = labels != -100
        correct += int((logits[sel].argmax(-1) == labels[sel]).sum())
        nll += float(torch.nn.functional.cross_entropy(logits[sel], labels[sel], reduction="sum"))
        total += int(sel.sum())
    assert total == result["masked_tokens"]
    assert result["models"]["student"]["accuracy"] == pytest.approx(correct / total, abs=1e-9)
    assert result["models"]["student"]["mlm_loss"] == pytest.approx(nll / total, rel=1e-4)
