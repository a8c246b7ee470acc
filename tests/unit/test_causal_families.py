"""Any causal LM through the one generic path (distill/models/families.py, blocks.py), on tiny random configs built
here (nothing downloaded): the layers and block parts are found, the chunked path's logits are the model's own
`model(...).logits` (output transforms included: Granite's scaling, Gemma's final softcap, Cohere's scale), a student
copies the chosen layers (experts and routers too) with its per-layer config lists, an MoE student's router loss
joins the objective, and what the path cannot drive is refused in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from support import LLM_FAMILIES, tiny_teacher
from torch import nn

from distill.config import Config, LossConfig, StudentConfig, config_from_dict
from distill.model_outputs import LogitTransform
from distill.models import families
from distill.models.blocks import block_layout
from distill.models.build import (
    ModelError,
    StudentForDistillation,
    build_student,
    check_layout,
    check_logits,
    init_student_from_teacher,
    make_student,
    model_forward,
    path_student_config,
)
from distill.models.families import FamilyError, family_of, vocab_logits
from distill.objective.chunked_logits import chunked_logit_loss
from distill.objective.objective import Objective

FAMILIES = sorted(set(LLM_FAMILIES) - {"deepseek_v3"})  # DeepSeek-V3's tiny MLA fails inside transformers on padded batches
TRANSFORMED = {"gemma2": "softcap", "gemma3_text": "softcap", "granite": "scale", "granitemoe": "scale", "cohere": "scale"}
MOE = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "granitemoe")


def batch(vocab=301, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask, torch.tensor([0, 5, 11, 14, 20])  # flat positions of real tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_layers_blocks_logits_and_layer_copy(family):
    """The generic path finds the layers, each block's parts and the head; the head input and head the chunked sweep
    reads, through the family's output transform, give `model(...).logits` (1e-5); the chunked losses on them equal the
    losses computed from the two models' `.logits` directly (and without the transform would not, for the families that
    have one); a student copies the chosen teacher layers (experts and routers included) and a full-depth copy is the
    teacher."""
    teacher = tiny_teacher(family)
    fam = family_of(teacher)
    assert fam.generic and fam.name == family and fam.causal and family not in families.FAMILIES
    assert check_layout(teacher.config, family)
    blocks = fam.layer_list(teacher)
    prefix = fam.layer_prefix(teacher)
    assert len(blocks) == 4 and any(k.startswith(prefix + "3.") for k in teacher.state_dict())
    layout = block_layout(blocks[0])
    assert layout.mlp and layout.norms and layout.qkv_names() and layout.module(blocks[0], "o").weight.shape[0] == 64
    assert layout.moe == (family in MOE)
    if layout.moe:
        assert layout.router and layout.module(blocks[0], "router").weight.shape == (4, 64)
    else:
        assert layout.module(blocks[0], "down").weight.shape[0] == 64
    if family == "phi3":
        assert layout.qkv == "self_attn.qkv_proj" and layout.gate_up == "mlp.gate_up_proj"
    assert fam.vocab_projection(teacher) is teacher.get_output_embeddings()

    # a student of two teacher layers: every layer weight copied, experts and routers included
    student = build_student(StudentConfig(architecture="same", num_layers=2, dropout=0.0), teacher, 301, 0, 128).eval()
    assert student.config.model_type == family and student.config.num_hidden_layers == 2
    applied = init_student_from_teacher(student, teacher, [0, 3])
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    assert {k for k in s_sd if k.startswith(prefix)} <= set(applied)
    for key in applied:
        assert torch.equal(s_sd[key], t_sd[key.replace(f"{prefix}1.", f"{prefix}3.")]), key

    # the chunked path's logits and losses are the models' own
    ids, mask, positions = batch()
    models = {"t": teacher, "s": student}
    hf = {name: m(input_ids=ids, attention_mask=mask).logits.reshape(-1, 301)[positions] for name, m in models.items()}
    outs = {name: model_forward(m, ids, mask, positions, head_input=True) for name, m in models.items()}
    for name, out in outs.items():
        ours = vocab_logits(out.head, out.head_transform, out.head_input)
        assert (ours - hf[name]).abs().max() <= 1e-5, f"{family}: max logit difference {(ours - hf[name]).abs().max():.2e}"
    assert (outs["t"].head_transform is not None) == (family in TRANSFORMED)
    labels = ids.reshape(-1)[positions].roll(1)

    def chunked(s_transform, t_transform):
        heads = (outs["s"].head_input, outs["s"].head, outs["t"].head_input, outs["t"].head)
        return chunked_logit_loss(
            *heads,
            "forward_kl",
            temperature=2.0,
            labels=labels,
            ce_weight=1.0,
            chunk_size=2,
            student_transform=s_transform,
            teacher_transform=t_transform,
        )

    got = chunked(outs["s"].head_transform, outs["t"].head_transform)
    s64, t64 = hf["s"].detach().double(), hf["t"].detach().double()  # the direct computation, in fp64 on the models' fp32 logits
    kl = F.kl_div(F.log_softmax(s64 / 2, -1), F.log_softmax(t64 / 2, -1), reduction="batchmean", log_target=True) * 4
    ce = F.cross_entropy(s64, labels)
    assert abs(got.kd.item() - kl.item()) <= 1e-5 * kl.item() and abs(got.ce.item() - ce.item()) <= 1e-5 * ce.item()
    if family in TRANSFORMED:  # the comparisons can fail: without the transform, logits and losses are off by far more
        raw = outs["t"].head_input @ outs["t"].head.weight.T
        assert (raw - hf["t"]).abs().max() > 1e-2 and abs(chunked(None, None).kd - kl) > 1e-3 * kl

    # a full-depth copy is the teacher
    twin = build_student(StudentConfig(architecture="same", num_layers=4, dropout=0.0), teacher, 301, 0, 128).eval()
    init_student_from_teacher(twin, teacher, [0, 1, 2, 3])
    torch.testing.assert_close(model_forward(twin, ids, mask, positions).logits, hf["t"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite", "qwen3_moe", "phi3"])
def test_check_logits_refuses_a_forward_the_family_does_not_reproduce(family, monkeypatch):
    """The probe every loaded model passes (teacher, student, eval) fails when `.logits` are not the family's head and
    output transform: a forward that scales its logits, or a family whose transform was forgotten."""
    model = tiny_teacher(family)
    assert check_logits(model, "teacher") <= 1e-5

    def scaled(module, args, out):
        out["logits"] = out.logits * 1.5
        return out

    handle = model.register_forward_hook(scaled)
    with pytest.raises(ModelError, match=rf"teacher: a {family} model's logits are not what this job computes.*register a Family"):
        check_logits(model, "teacher")
    handle.remove()
    if family in TRANSFORMED:
        forgot = dataclasses.replace(family_of(model), output_transform=lambda config: LogitTransform())
        monkeypatch.setitem(families._GENERIC, family, forgot)
        with pytest.raises(ModelError, match="changes the projection's logits"):
            check_logits(model, "teacher")


def test_per_layer_config_lists_follow_the_copied_layers():
    gemma = tiny_teacher("gemma3_text", layer_types=["sliding_attention", "sliding_attention", "full_attention", "full_attention"])
    student = build_student(StudentConfig(architecture="same", init_layers=[1, 2]), gemma, 301, 0, 128)
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    moe = tiny_teacher("qwen3_moe")  # teacher layer 3 has a dense MLP (mlp_only_layers=[3])
    student = build_student(StudentConfig(architecture="same", num_layers=2), moe, 301, 0, 128)
    assert student.config.mlp_only_layers == [1]
    layers = family_of(student).layer_list(student)
    assert block_layout(layers[0]).moe and not block_layout(layers[1]).moe
    init_student_from_teacher(student, moe, [0, 3])
    t_layer, s_layer = family_of(moe).layer_list(moe)[0], layers[0]
    assert torch.equal(s_layer.mlp.experts.gate_up_proj, t_layer.mlp.experts.gate_up_proj)
    assert torch.equal(s_layer.mlp.gate.weight, t_layer.mlp.gate.weight)
    assert torch.equal(layers[1].mlp.down_proj.weight, family_of(moe).layer_list(moe)[3].mlp.down_proj.weight)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_an_moe_students_router_loss_joins_the_objective_and_a_teacher_has_none(family):
    teacher = tiny_teacher(family, output_router_logits=True)  # a checkpoint that asks for router logits: the frozen teacher ignores it
    student = build_student(StudentConfig(architecture="same", num_layers=2, dropout=0.0), teacher, 301, 0, 128)
    init_student_from_teacher(student, teacher, [0, 3])
    objective = Objective(LossConfig(weights={"ce": 1.0, "clm": 1.0}), teacher.config, student.config, vocab_size=301, chunked=True)
    assert objective.router_aux_coef == 0.02 and objective.term_names == ["ce", "clm", "router_aux"]
    wrapper = StudentForDistillation(student, objective.student_needs, logit_loss=objective.student_logit_loss(student))
    ids, mask, _ = batch()
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[mask == 0] = -100
    from distill.objective.losses import Batch

    b = objective.prepare(Batch(ids, mask, labels))
    t_out = objective.teacher_forward(teacher, b)
    assert t_out.aux_loss is None
    s_out = wrapper.outputs(wrapper(b.input_ids, b.attention_mask, b.logit_positions))
    hf = student(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(s_out.aux_loss, hf, rtol=1e-6, atol=1e-8)
    total, terms = objective.losses(t_out, s_out, b)
    torch.testing.assert_close(total, terms["ce"] + terms["clm"] + 0.02 * hf, rtol=1e-6, atol=1e-8)
    total.backward()
    assert student.model.layers[0].mlp.gate.weight.grad.abs().max() > 0
    dense = Objective(LossConfig(weights={"ce": 1.0}), teacher.config, tiny_teacher("llama").config, chunked=True)
    assert dense.router_aux_coef == 0 and dense.term_names == ["ce"]


def test_another_causal_family_as_student_takes_only_the_shape():
    gemma = tiny_teacher("gemma2")
    llama = build_student(StudentConfig(architecture="llama", init="random", num_layers=2), gemma, 301, 0, 128)
    assert llama.config.model_type == "llama" and llama.config.hidden_size == 64 and llama.config.vocab_size == 301
    assert getattr(llama.config, "final_logit_softcapping", None) is None  # nothing of Gemma's config leaks in
    with pytest.raises(ModelError, match="a llama student cannot be initialised from a gemma2 teacher"):
        init_student_from_teacher(llama, gemma, [0, 3])


class _NoMLPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.o_proj = nn.Linear(4, 4)
        self.input_layernorm = nn.LayerNorm(4)


def test_what_the_generic_path_cannot_drive_is_refused_in_one_line():
    from transformers import AutoConfig

    with pytest.raises(FamilyError, match=r"model type 't5' is not a causal LM .* and not one of the masked-LM families here \(bert"):
        family_of(AutoConfig.for_model("t5"))
    with pytest.raises(FamilyError, match="decoder block _NoMLPBlock has no MLP"):
        block_layout(_NoMLPBlock())
    with pytest.raises(FamilyError, match="has no attention module"):
        block_layout(nn.Linear(2, 2))
    model = tiny_teacher("llama")
    model.config.num_hidden_layers = 5
    with pytest.raises(FamilyError, match=r"no list of its 5 decoder layers .* in LlamaModel \(module lists: layers \(4\)\)"):
        family_of(model).layer_list(model)
    llava = AutoConfig.for_model("llava")
    with pytest.raises(ModelError, match="model type 'llava' is not a causal LM|has no hidden_size"):
        check_layout(llava, "teacher.path /x")


def test_student_path_rules_and_config(tmp_path):
    """student.path: its config is the student's (kept as it is), its kind must be the teacher's, its head must hold the
    tokenizer's tokens; it excludes student.init and the shape keys (one line each)."""
    base = {"output_dir": str(tmp_path / "out"), "data": {"path": str(tmp_path / "data")}, "teacher": {"path": str(tmp_path / "t")}}
    ok = config_from_dict({**base, "student": {"path": str(tmp_path / "s")}})
    assert ok.student_init() == "path"
    with pytest.raises(Exception) as caught:
        config_from_dict({**base, "student": {"path": str(tmp_path / "s"), "init": "teacher", "num_layers": 2, "hidden_size": 8}})
    text = str(caught.value)
    assert "student.path and student.init=teacher exclude each other" in text
    assert "student.path and student.num_layers, student.hidden_size exclude each other" in text
    assert Config().student_init() == "random" and config_from_dict(base).student_init() == "teacher"

    teacher = tiny_teacher("llama", vocab=320)
    own = tiny_teacher("qwen3", layers=2, vocab=310)  # another family, another depth, its head padded differently
    own.save_pretrained(tmp_path / "own")
    config = path_student_config(str(tmp_path / "own"), teacher.config, 48, tokenizer_vocab=301)
    assert config.model_type == "qwen3" and config.num_hidden_layers == 2 and config.vocab_size == 310
    student = make_student(config, "sdpa", str(tmp_path / "own"))
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), own.state_dict().values()))
    with pytest.raises(ModelError, match=r"has 310 vocabulary rows .* the dataset's tokenizer has 400 tokens"):
        path_student_config(str(tmp_path / "own"), teacher.config, 48, tokenizer_vocab=400)
    bert = tiny_teacher("bert", vocab=301)
    with pytest.raises(ModelError, match="is a causal LM \\(qwen3\\) but the teacher \\(bert\\) is not"):
        path_student_config(str(tmp_path / "own"), bert.config, 48, tokenizer_vocab=301)
    with pytest.raises(ModelError, match="student.path '/nowhere' is not a local directory"):
        path_student_config("/nowhere", teacher.config, 48, tokenizer_vocab=301)
