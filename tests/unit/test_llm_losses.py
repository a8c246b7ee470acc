"""The logit losses as the trainer runs them: one chunked sweep from hidden states and LM heads (loss.chunked_logits)
equals the direct full-logits computation, loss and gradients, for every registered logit loss; padded head rows
never count; two soft-target losses at once are refused."""

from __future__ import annotations

import pytest
import torch
from support import tiny_teacher

from distill.config import ConfigError, LossConfig, StudentConfig
from distill.models.build import StudentForDistillation, build_student
from distill.objective.losses import Batch, logit_divergence
from distill.objective.objective import Objective


def causal_batch(vocab: int = 301, seed: int = 3) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[2, 6:] = 0
    labels = torch.full_like(ids, -100)
    for row in range(3):
        n = int(mask[row].sum())
        labels[row, : n - 1] = ids[row, 1:n]
    return Batch(input_ids=ids, attention_mask=mask, labels=labels)


def run_objective(teacher, student, weights, chunked, vocab=None, **loss_kw):
    cfg = LossConfig(weights=weights, **loss_kw)
    objective = Objective(cfg, teacher, student, vocab_size=vocab, chunked=chunked)
    wrapper = StudentForDistillation(student, objective.student_needs, logit_loss=objective.student_logit_loss(student))
    student.zero_grad(set_to_none=True)
    batch = objective.prepare(causal_batch(student.config.vocab_size if vocab is None else vocab))
    t_out = objective.teacher_forward(teacher, batch)
    s_out = wrapper.outputs(wrapper(batch.input_ids, batch.attention_mask, batch.logit_positions))
    assert (s_out.logits is None) == chunked and (t_out.logits is None) == (chunked and objective.teacher_logits)
    loss, terms = objective.losses(t_out, s_out, batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    return loss.detach(), terms, grads


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize(
    "weights, extra",
    [
        ({"ce": 5.0, "clm": 2.0, "cos": 1.0}, {"temperature": 2.0}),
        ({"reverse_kl": 1.0, "clm": 0.5}, {"temperature": 1.0}),
        ({"jsd": 1.0, "clm": 1.0}, {"temperature": 2.0, "jsd_beta": 0.3}),
        ({"ce": 1.0}, {"ce_positions": "masked"}),
    ],
)
def test_chunked_sweep_equals_the_full_logits_computation(family, weights, extra):
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        teacher = GPT2LMHeadModel(GPT2Config(vocab_size=301, n_embd=64, n_layer=4, n_head=4, n_positions=128)).eval()
    else:
        teacher = tiny_teacher(family)
    results = []
    for chunked in (False, True):
        torch.manual_seed(5)
        student = build_student(StudentConfig(architecture="same", init="random", num_layers=2, dropout=0.0), teacher, 301, 0, 128)
        results.append(run_objective(teacher, student, weights, chunked, chunk_positions=7, **extra))
    (loss_a, terms_a, grads_a), (loss_b, terms_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert terms_a.keys() == terms_b.keys()
    for name in terms_a:
        torch.testing.assert_close(terms_b[name], terms_a[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_b, grads_a, rtol=1e-4, atol=1e-6)


def test_jsd_limits_and_divergences_against_a_direct_formula():
    torch.manual_seed(0)
    s, t = torch.randn(9, 50, dtype=torch.float64), torch.randn(9, 50, dtype=torch.float64)
    fwd = logit_divergence(s, t, "forward_kl", 2.0)
    rev = logit_divergence(s, t, "reverse_kl", 2.0)
    ps, pt = torch.softmax(s / 2, -1), torch.softmax(t / 2, -1)
    torch.testing.assert_close(fwd, (pt * (pt.log() - ps.log())).sum(-1).mean() * 4)
    torch.testing.assert_close(rev, (ps * (ps.log() - pt.log())).sum(-1).mean() * 4)
    torch.testing.assert_close(logit_divergence(s, t, "jsd", 2.0, 0.0), fwd)
    torch.testing.assert_close(logit_divergence(s, t, "jsd", 2.0, 1.0), rev)
    m = 0.25 * pt + 0.75 * ps
    jsd = 0.25 * (pt * (pt.log() - m.log())).sum(-1) + 0.75 * (ps * (ps.log() - m.log())).sum(-1)
    torch.testing.assert_close(logit_divergence(s, t, "jsd", 2.0, 0.25), jsd.mean() * 4)


def test_padded_head_rows_never_count():
    """Teacher head padded to 320 rows and student to 310, tokenizer vocabulary 301: every loss equals the one on heads cut to 301."""
    teacher = tiny_teacher("llama", vocab=320)
    torch.manual_seed(5)
    student = build_student(StudentConfig(architecture="same", init="random", num_layers=2, dropout=0.0), teacher, 310, 0, 128)
    weights = {"jsd": 1.0, "clm": 1.0}
    padded = {chunked: run_objective(teacher, student, weights, chunked, vocab=301, temperature=2.0) for chunked in (False, True)}
    cut_teacher = tiny_teacher("llama", vocab=320)
    with torch.no_grad():
        cut_teacher.resize_token_embeddings(301)
    torch.manual_seed(5)
    cut_student = build_student(StudentConfig(architecture="same", init="random", num_layers=2, dropout=0.0), teacher, 310, 0, 128)
    with torch.no_grad():
        cut_student.resize_token_embeddings(301)
    exact = run_objective(cut_teacher, cut_student, weights, False, temperature=2.0)
    for chunked in (False, True):
        torch.testing.assert_close(padded[chunked][0], exact[0], rtol=1e-5, atol=1e-6)


def test_one_soft_target_loss_at_a_time_when_chunked():
    teacher = tiny_teacher("llama")
    student = build_student(StudentConfig(architecture="same", num_layers=2), teacher, 301, 0, 128)
    with pytest.raises(ConfigError, match=r"losses \['ce', 'jsd'\] are each a soft-target loss"):
        Objective(LossConfig(weights={"ce": 1.0, "jsd": 1.0}), teacher, student, chunked=True)
    Objective(LossConfig(weights={"ce": 1.0, "jsd": 1.0}), teacher, student, chunked=False)  # the direct path can sum both
