"""Activation checkpointing of the student (train.activation_checkpointing, distill/models/build.py
`enable_activation_checkpointing`): for every student family, with dropout on and the losses that read what forward hooks
capture inside a layer (q/k/v), hidden states, TinyBERT's projections and the chunked logit losses, one forward +
backward gives the same losses and gradients as without checkpointing, while the checkpointed layers really run twice
(once more in backward) and the hooks keep nothing of that second run."""

from __future__ import annotations

import pytest
import torch
from support import tiny_teacher

from distill.config import LossConfig, StudentConfig
from distill.models.build import ModelError, StudentForDistillation, build_student, enable_activation_checkpointing
from distill.models.families import family_of, submodule
from distill.objective.losses import Batch
from distill.objective.objective import Objective

VOCAB = 301
ENCODER_LOSSES = {"ce": 2.0, "mlm": 1.0, "cos": 1.0, "tinybert_emb": 1.0, "tinybert_hidden": 1.0, "tinybert_attn": 1.0}
# student family -> (teacher family, student.architecture, losses); the causal ones run the chunked logit sweep
CASES = {
    "bert": ("bert", "bert", ENCODER_LOSSES),
    "distilbert": ("bert", "distilbert", {"ce": 2.0, "mlm": 1.0, "cos": 1.0, "minilm_attn": 1.0, "minilm_value": 1.0}),
    "roberta": ("roberta", "same", ENCODER_LOSSES),
    "gpt2": ("gpt2", "same", {"ce": 2.0, "clm": 1.0, "cos": 1.0, "tinybert_hidden": 1.0, "tinybert_attn": 1.0}),
    "llama": ("llama", "same", {"jsd": 2.0, "clm": 1.0, "cos": 1.0, "pkd": 1.0}),  # rotary: no attention losses
}


def teacher_of(family: str):
    if family in ("bert", "llama"):
        return tiny_teacher(family, vocab=VOCAB, layers=4)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(0)
    if family == "roberta":
        config = AutoConfig.for_model(
            "roberta", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=130, pad_token_id=1,
        )  # fmt: skip
        return AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa").eval()
    config = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=128)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def batch_for(causal: bool) -> Batch:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 7:] = 0
    labels = torch.full_like(ids, -100)
    for row in range(3):
        n = int(mask[row].sum())
        if causal:
            labels[row, : n - 1] = ids[row, 1:n]
        else:
            labels[row, 1:n:3] = ids[row, 1:n:3]
    return Batch(input_ids=ids, attention_mask=mask, labels=labels)


def one_step(teacher, architecture: str, weights: dict, every: int, dropout_seed: int = 11):
    """One training forward + backward of a fresh 3-layer student (same weights every call): the loss, its terms, every
    parameter's gradient (TinyBERT's projections included), how often each layer's query projection ran, and what the
    student's q/k/v hooks still hold after backward."""
    causal = family_of(teacher).causal
    torch.manual_seed(5)
    student = build_student(StudentConfig(architecture=architecture, init="random", num_layers=3, dropout=0.1), teacher, VOCAB, 0, 128)
    student.train()
    if every:
        enable_activation_checkpointing(student, every)
    objective = Objective(LossConfig(weights=weights), teacher, student, vocab_size=VOCAB, chunked=causal)
    wrapper = StudentForDistillation(
        student, objective.student_needs, "shared", objective.teacher_width, logit_loss=objective.student_logit_loss(student)
    )
    family = family_of(student)
    calls = [0] * 3
    for index, block in enumerate(family.layer_list(student)):
        submodule(block, family.qkv[0]).register_forward_hook(lambda *a, i=index: calls.__setitem__(i, calls[i] + 1))
    batch = objective.prepare(batch_for(causal))
    t_out = objective.teacher_forward(teacher, batch)
    torch.manual_seed(dropout_seed)
    s_out = wrapper.outputs(wrapper(batch.input_ids, batch.attention_mask, batch.logit_positions))
    loss, terms = objective.losses(t_out, s_out, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in wrapper.named_parameters() if p.grad is not None}
    left = dict(wrapper.capture._store) if wrapper.capture is not None else {}
    return loss.detach(), {k: v.detach() for k, v in terms.items()}, grads, calls, left


@pytest.mark.parametrize("student_family", sorted(CASES))
def test_checkpointed_student_has_the_same_losses_and_gradients(student_family):
    teacher_family, architecture, weights = CASES[student_family]
    teacher = teacher_of(teacher_family)
    loss, terms, grads, calls, _ = one_step(teacher, architecture, weights, every=0)
    assert calls == [1, 1, 1]
    for every, recomputed in ((1, [2, 2, 2]), (2, [2, 1, 2])):
        c_loss, c_terms, c_grads, c_calls, left = one_step(teacher, architecture, weights, every=every)
        assert c_calls == recomputed, c_calls  # checkpointed layers ran again in backward, the others once
        assert left == {}, sorted(left)  # the recomputation's q/k/v are not captured (nothing stale kept)
        torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-7)
        assert c_terms.keys() == terms.keys()
        for name in terms:
            torch.testing.assert_close(c_terms[name], terms[name], rtol=1e-6, atol=1e-7)
        assert c_grads.keys() == grads.keys() and grads
        for name, grad in grads.items():
            torch.testing.assert_close(c_grads[name], grad, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    # dropout is on: other masks give another loss (so the recomputation above reproduced the forward's masks)
    other, *_ = one_step(teacher, architecture, weights, every=1, dropout_seed=12)
    assert (other - loss).abs() > 1e-4


def test_a_stride_below_one_is_refused():
    teacher = tiny_teacher("llama", vocab=VOCAB, layers=2)
    student = build_student(StudentConfig(architecture="same", init="random", num_layers=2), teacher, VOCAB, 0, 128)
    with pytest.raises(ModelError, match="stride of 1 or more"):
        enable_activation_checkpointing(student, 0)
