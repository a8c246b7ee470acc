"""Any causal LM end to end (issue 25, points 1-4): tiny random Gemma 2, Gemma 3 (text), Phi-3, OLMo-2, Granite,
Qwen3-MoE and SmolLM3 teachers built here (nothing downloaded), each through distill-prep's causal data (one byte-level
BPE tokenizer and one dataset for all, the module's `assets`), a 2-process `llm_kd` run under the real DeepSpeed
engine, distill-export, `generate` and distill-eval; and a student of the user's own (student.path: another family,
its head padded to another size than the teacher's) distilled from a Llama teacher.

All the training runs share ONE deepspeed launch (tests/e2e/any_causal_lm_worker.py runs the real trainer once per
run), so the launch's start-up is paid once; what needs no process is checked in tests/unit/test_causal_families.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from support import BIN, LLM_TINY, REPO_ROOT, assert_falls, metrics, run, run_log, tiny_teacher

pytestmark = pytest.mark.timeout(1200)

FAMILIES = ["gemma2", "gemma3_text", "phi3", "olmo2", "granite", "qwen3_moe", "smollm3"]
ZERO3 = {"qwen3_moe"}  # its experts partitioned by ZeRO-3 (the others at ZeRO-2, the recipe's tiny settings)
STEPS = 12


@pytest.fixture(scope="module")
def runs(assets):
    """Every training run of this module in one 2-process deepspeed launch: each family's teacher into a 2-layer student
    of its family, and a Llama teacher into the user's own Qwen3 student (student.path)."""
    root, data, tokenizer = assets["root"], assets["data"], assets["tokenizer"]
    plan, out = [], {}
    common = [f"data.path={data}", f"train.max_steps={STEPS}", f"checkpoint.every_steps={STEPS}", "student.num_layers=2"]
    for family in FAMILIES:
        teacher = tiny_teacher(family, tokenizer, str(root / f"teacher_{family}"), vocab=len(tokenizer) + 8)
        out[family] = {"teacher": teacher, "run": str(root / f"run_{family}")}
        zero = ["deepspeed.config=configs/deepspeed/zero3.json"] if family in ZERO3 else []
        plan.append(
            ["--config", "configs/llm_kd.yaml", f"teacher.path={teacher}", f"output_dir={out[family]['run']}", *common, *LLM_TINY, *zero]
        )
    own = tiny_teacher("qwen3", tokenizer, str(root / "own_student"), layers=2, vocab=len(tokenizer) + 16)
    from transformers import GenerationConfig

    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, eos_token_id=tokenizer.eos_token_id).save_pretrained(own)
    out["own"] = {"teacher": assets["teacher"], "run": str(root / "run_own"), "student": own}
    plan.append(
        ["--config", "configs/llm_kd.yaml", f"teacher.path={assets['teacher']}", f"student.path={own}", f"output_dir={out['own']['run']}"]
        + [a for a in common if not a.startswith("student.")]
        + LLM_TINY[:-1]  # student.dropout: the checkpoint's own
    )
    plan_file = root / "plan.json"
    plan_file.write_text(json.dumps(plan))
    log = run_log(
        [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", "29847", "tests/e2e/any_causal_lm_worker.py", str(plan_file)]
    )
    return out, log


def generate(export: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(export, local_files_only=True)
    prompt = tokenizer("The list is", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6 and isinstance(tokenizer.decode(generated[0]), str)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_distils_exports_generates_and_evaluates(runs, assets, family):
    from distill.tools.evaluate import evaluate
    from distill.tools.export import export_checkpoint

    out, log = runs
    run_dir, teacher = out[family]["run"], out[family]["teacher"]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), f"{family} did not finish its {STEPS} steps:\n{log[-3000:]}"
    assert_falls([r["loss"] for r in rows], 0.98, f"{family} loss")
    if family == "qwen3_moe":  # the student's router loss, logged alone, is in the total with its config coefficient
        for r in rows:
            assert r["loss_router_aux"] > 0
            assert abs(r["loss"] - (r["loss_ce"] + r["loss_clm"] + 0.02 * r["loss_router_aux"])) <= 1e-5 * r["loss"]
    else:
        assert "loss_router_aux" not in rows[0]
    export = os.path.join(assets["root"], f"export_{family}")
    export_checkpoint(run_dir, export)
    with open(os.path.join(export, "config.json")) as handle:
        config = json.load(handle)
    with open(os.path.join(teacher, "config.json")) as handle:
        t_config = json.load(handle)
    assert config["model_type"] == family and config["num_hidden_layers"] == 2 and config["vocab_size"] == t_config["vocab_size"]
    for key in ("final_logit_softcapping", "logits_scaling", "num_experts", "router_aux_loss_coef"):
        assert config.get(key) == t_config.get(key), key  # the output transform and the experts go with the student
    if family == "gemma3_text":
        assert config["layer_types"] == ["sliding_attention", "full_attention"]  # those of teacher layers 0 and 3
    if family == "qwen3_moe":
        assert config["mlp_only_layers"] == [1]  # teacher layer 3 has a dense MLP: so has student layer 1
    generate(export)
    result = evaluate(export, assets["data"], teacher, max_sequences=8, device="cpu")
    student = result["models"]["student"]
    assert result["task"] == "causal_lm" and result["tokens"] > 0 and student["kl_from_teacher"] > 0
    assert student["perplexity"] < assets["vocab"], "better than a uniform guess over the vocabulary"


def test_distill_eval_reads_every_familys_export(runs, assets):
    """The distill-eval command (one process) on every exported student of this module at once."""
    exports = {f: os.path.join(assets["root"], f"export_{f}") for f in FAMILIES}
    missing = [f for f, path in exports.items() if not os.path.isdir(path)]
    if missing:
        pytest.skip(f"exports of {missing} were not made (their test failed)")
    first, *others = FAMILIES
    out = assets["root"] / "eval_all.json"
    cmd = [os.path.join(BIN, "distill-eval"), "--model", exports[first], "--name", first, "--data", assets["data"]]
    cmd += [a for f in others for a in ("--compare", f"{f}={exports[f]}")] + ["--max-sequences", "8", "--json", str(out), "--device", "cpu"]
    run(cmd)
    result = json.loads(out.read_text())
    assert set(result["models"]) == set(FAMILIES)
    for family, row in result["models"].items():
        assert 1 < row["perplexity"] < assets["vocab"], (family, row)


def test_your_own_student_of_another_family_and_head_size(runs, assets):
    """student.path: a Qwen3 checkpoint (2 layers, head padded to vocabulary + 16) distilled from a Llama teacher (head
    padded to + 8): its weights are the start, the heads line up on the tokenizer's vocabulary (said once), the loss
    falls, and the export keeps the student's own config."""
    from transformers import AutoConfig

    from distill.tools.export import export_checkpoint

    out, log = runs
    own, run_dir = out["own"]["student"], out["own"]["run"]
    vocab = assets["vocab"]
    assert (
        f"vocabulary: the tokenizer has {vocab} tokens; the student head {vocab + 16} rows, the teacher head {vocab + 8} rows: logits over the first {vocab} rows"
        in log
    )
    assert log.count("student initialised from teacher layers [0, 3]") == len(FAMILIES)  # every run but this one
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert_falls([r["loss"] for r in rows], 0.97, "own student's loss")
    export = os.path.join(assets["root"], "export_own")
    export_checkpoint(run_dir, export)
    exported, original = AutoConfig.from_pretrained(export), AutoConfig.from_pretrained(own)
    keep = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "head_dim", "rope_parameters", "tie_word_embeddings")
    assert {k: getattr(exported, k, None) for k in keep} == {k: getattr(original, k, None) for k in keep}
    with open(os.path.join(export, "generation_config.json")) as handle:
        generation = json.load(handle)
    assert (generation["do_sample"], generation["temperature"], generation["top_p"]) == (True, 0.6, 0.9)  # its own defaults too
    generate(export)


def test_student_path_check_refusals_and_memory_estimate(runs, assets, tmp_path):
    """distill-train's weight-free pass with student.path (in process): the plan's student config is the directory's, the
    memory estimate counts that student; a student whose tokenizer is not the dataset's is refused in one line."""
    from transformers import PreTrainedTokenizerFast

    from distill.config import load_config
    from distill.train.memory_estimate import estimate_from_preflight
    from distill.train.preflight import preflight

    out, _ = runs
    base = [f"teacher.path={assets['teacher']}", f"data.path={assets['data']}", f"output_dir={tmp_path / 'run'}"] + LLM_TINY
    cfg = load_config(os.path.join(REPO_ROOT, "configs/llm_kd.yaml"), base + [f"student.path={out['own']['student']}"])
    plan = preflight(cfg, 2, torch.device("cpu"))
    assert plan.problems == [] and plan.student_config.model_type == "qwen3" and plan.init_layers is None
    estimate = estimate_from_preflight(cfg, 2, torch.device("cpu"), plan)
    assert estimate is not None and estimate.total > 0
    other = tmp_path / "other_tokenizer"
    tiny_teacher("qwen3", None, str(other), layers=2, vocab=assets["vocab"] + 16)
    tok = assets["tokenizer"]
    changed = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    changed.add_tokens(["<extra>"])
    changed.save_pretrained(str(other))
    cfg = load_config(os.path.join(REPO_ROOT, "configs/llm_kd.yaml"), base + [f"student.path={other}"])
    problems = preflight(cfg, 2, torch.device("cpu")).problems
    assert any(p.startswith(f"the tokenizer of student {other} ") for p in problems), problems
    assert all("\n" not in p for p in problems)
