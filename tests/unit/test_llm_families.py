"""Decoder-LLM families (Llama, Mistral, Qwen2, Qwen3 through the generic causal path, GPT-2 registered): students of the
teacher's family, initialised from chosen teacher layers, shapes of their own, logits only where needed — on tiny
random configs (every other family: tests/unit/test_causal_families.py)."""

from __future__ import annotations

import pytest
import torch
from support import tiny_teacher

from distill.config import StudentConfig
from distill.models.build import ModelError, build_student, init_student_from_teacher, model_forward
from distill.models.families import FAMILIES, family_of

DECODERS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("model_type", DECODERS)
@pytest.mark.parametrize("tie", [False, True])
def test_student_of_the_teachers_family_copies_the_chosen_layers(model_type, tie):
    teacher = tiny_teacher(model_type, tie=tie)
    assert family_of(teacher).causal and family_of(teacher).name == model_type
    student = build_student(StudentConfig(architecture="same", num_layers=2), teacher, 301, 0, 128)
    assert student.config.model_type == model_type and student.config.num_hidden_layers == 2
    assert student.config.num_key_value_heads == 2 and student.config.tie_word_embeddings == tie
    init_student_from_teacher(student, teacher, [0, 3])
    t, s = teacher.state_dict(), student.state_dict()
    for key, value in s.items():
        source = key.replace("model.layers.1.", "model.layers.3.")
        assert torch.equal(value, t[source]), key
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"])


@pytest.mark.parametrize("model_type", DECODERS + ["gpt2"])
def test_a_full_depth_copy_reproduces_the_teachers_logits_at_the_chosen_positions(model_type):
    if model_type == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        teacher = GPT2LMHeadModel(GPT2Config(vocab_size=301, n_embd=64, n_layer=4, n_head=4, n_positions=128)).eval()
    else:
        teacher = tiny_teacher(model_type)
    twin = build_student(StudentConfig(architecture="same", num_layers=4, dropout=0.0), teacher, 301, 0, 128).eval()
    init_student_from_teacher(twin, teacher, [0, 1, 2, 3])
    ids = torch.randint(3, 301, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    positions = torch.tensor([0, 5, 11, 14, 20])
    full = teacher(input_ids=ids, attention_mask=mask).logits.reshape(-1, 301)[positions]
    got = model_forward(twin, ids, mask, positions).logits
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_a_student_of_its_own_width_and_the_refusals():
    teacher = tiny_teacher("llama")
    narrow = build_student(
        StudentConfig(architecture="llama", init="random", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=1, intermediate_size=64),
        teacher,
        301,
        0,
        128,
    )
    assert (narrow.config.hidden_size, narrow.config.num_key_value_heads, narrow.config.head_dim) == (32, 1, 8)
    with pytest.raises(ModelError, match="needs the teacher's width"):
        init_student_from_teacher(narrow, teacher, [0, 3])
    with pytest.raises(ModelError, match="causal.*teacher needs a student of the same kind"):
        build_student(StudentConfig(architecture="distilbert", num_layers=2), teacher, 301, 0, 128)
    other = build_student(StudentConfig(architecture="gpt2", init="random", num_layers=2), teacher, 301, 0, 128)  # another family: random
    assert other.config.model_type == "gpt2" and other.config.n_embd == 64 and other.config.vocab_size == 301
    with pytest.raises(ModelError, match="a gpt2 student cannot be initialised from a llama teacher"):
        init_student_from_teacher(other, teacher, [0, 3])
    with pytest.raises(ModelError, match="student.architecture='bort' is neither"):
        build_student(StudentConfig(architecture="bort", num_layers=2), teacher, 301, 0, 128)
    with pytest.raises(ModelError, match="multiple of the key/value heads"):
        build_student(StudentConfig(architecture="same", init="random", num_layers=2, num_heads=4, num_kv_heads=3), teacher, 301, 0, 128)
    assert not set(DECODERS) & set(FAMILIES), "llama, mistral and qwen go through the generic causal path, not a registry entry"
