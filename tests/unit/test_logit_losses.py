"""distill.objective.chunked_logits: the chunked logit losses equal the direct full-logits computation (values and gradients),
in every kind, temperature, beta, chunking, padded vocabulary and ignored position; (their 2-process DeepSpeed
ZeRO-2 / ZeRO-3 run is tests/e2e/test_logit_losses_zero.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support import assert_close

from distill.model_outputs import LogitTransform
from distill.objective.chunked_logits import chunked_logit_loss, naive_logit_loss
from distill.objective.sparse_logits import SparseTargets, sparse_logit_loss

N, H_S, H_T, ROWS_S, ROWS_T, VOCAB = 24, 8, 12, 40, 38, 36  # two heads padded differently; the first 36 rows count


def make_case(dtype=torch.float32, seed=0, ignored=True, bias=True):
    """Student hidden / head (bias) with gradients, a frozen teacher of another width, labels with ignored positions."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    case = SimpleNamespace(
        s_hidden=r(N, H_S).requires_grad_(),
        s_weight=r(ROWS_S, H_S).requires_grad_(),
        s_bias=r(ROWS_S).requires_grad_() if bias else None,
        t_hidden=r(N, H_T),
        t_weight=r(ROWS_T, H_T),
        t_bias=r(ROWS_T),
        labels=torch.randint(0, VOCAB, (N,), generator=g),
    )
    if ignored:
        case.labels[::4] = -100
    return case


def run(fn, case, kind, **kw):
    """Loss, detached parts and the student's gradients of 1.7 * loss (so backward's scaling is exercised)."""
    params = [p for p in (case.s_hidden, case.s_weight, case.s_bias) if p is not None]
    for p in params:
        p.grad = None
    out = fn(case.s_hidden, (case.s_weight, case.s_bias), case.t_hidden, (case.t_weight, case.t_bias), kind, **kw)
    (1.7 * out.loss).backward()
    return out, [p.grad.clone() for p in params]


def assert_same(case, kind, naive_kw, chunked_kw, rtol=1e-5):
    ref, ref_grads = run(naive_logit_loss, case, kind, **naive_kw)
    out, grads = run(chunked_logit_loss, case, kind, **naive_kw, **chunked_kw)
    assert_close(out.loss, ref.loss, rtol)
    for a, b in zip((out.kd, out.ce), (ref.kd, ref.ce)):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, rtol)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        assert b.abs().max() > 0
        assert_close(a, b, rtol)
    return out, grads


KIND_BETA = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("jsd", 0.2)]


@pytest.mark.parametrize("kind,beta", KIND_BETA)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 5, 6, 18, None])  # 18 labelled positions of 24: 5 does not divide, 6 does, 18 is one chunk
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_equals_full_logits_fp32(kind, beta, temperature, chunk_size, grad_in_forward):
    case = make_case()
    common = dict(temperature=temperature, beta=beta, vocab_size=VOCAB, labels=case.labels, ce_weight=0.3)
    assert_same(case, kind, common, dict(chunk_size=chunk_size, grad_in_forward=grad_in_forward))


@pytest.mark.parametrize("kind,beta", KIND_BETA)
def test_equals_full_logits_fp64_to_rounding(kind, beta):
    case = make_case(torch.float64)
    assert_same(
        case, kind, dict(temperature=2.0, beta=beta, vocab_size=VOCAB, labels=case.labels, ce_weight=0.3), dict(chunk_size=5), rtol=1e-12
    )


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_without_labels_every_position_counts_and_no_bias(kind):
    case = make_case(bias=False)
    out, _ = assert_same(case, kind, dict(temperature=2.0, vocab_size=VOCAB), dict(chunk_size=6))
    assert out.ce is None


def test_kd_mask_and_labels_select_different_positions():
    case = make_case()
    kd_mask = torch.arange(N) % 3 != 0  # KD at its own positions, CE at the labelled ones
    assert_same(case, "jsd", dict(vocab_size=VOCAB, labels=case.labels, kd_mask=kd_mask, ce_weight=0.5, kd_weight=0.7), dict(chunk_size=4))


def test_cross_entropy_alone():
    case = make_case()
    out, _ = assert_same(case, None, dict(vocab_size=VOCAB, labels=case.labels, ce_weight=1.0), dict(chunk_size=4))
    assert out.kd is None
    expected = torch.nn.functional.cross_entropy(case.s_hidden @ case.s_weight[:VOCAB].T + case.s_bias[:VOCAB], case.labels)
    assert_close(out.ce, expected.detach())


def test_beta_limits_are_forward_and_reverse_kl():
    case = make_case()
    kw = dict(temperature=2.0, vocab_size=VOCAB, labels=case.labels, chunk_size=5)
    fwd, rev = run(chunked_logit_loss, case, "forward_kl", **kw), run(chunked_logit_loss, case, "reverse_kl", **kw)
    for beta, (ref, ref_grads) in ((0.0, fwd), (1.0, rev)):
        out, grads = run(chunked_logit_loss, case, "jsd", beta=beta, **kw)
        assert torch.equal(out.loss, ref.loss) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    # the continuous limits (fp64; the error shrinks linearly with eps): JSD_beta / beta -> KL(P_T || P_S) as beta -> 0,
    # JSD_beta / (1 - beta) -> KL(P_S || P_T) as beta -> 1
    case, eps = make_case(torch.float64), 1e-7
    heads = (case.s_hidden, (case.s_weight, case.s_bias), case.t_hidden, (case.t_weight, case.t_bias))
    fwd, rev = (chunked_logit_loss(*heads, kind, **kw).kd.item() for kind in ("forward_kl", "reverse_kl"))
    near0, near1 = (chunked_logit_loss(*heads, "jsd", beta=beta, **kw).kd.item() for beta in (eps, 1 - eps))
    assert abs(near0 / eps / fwd - 1) < 1e-4 and abs(near1 / eps / rev - 1) < 1e-4
    assert near0 < 1e-5 * fwd  # the formula itself tends to 0: the endpoints are defined as the KLs, not reached as limits


def test_forward_kl_is_todays_ce_loss():
    """forward_kl on the full logits equals distill.objective.losses' `ce` (soft-target loss) at every non-padding token."""
    from distill.objective.losses import ModelOutputs, soft_target_loss

    case = make_case()
    out = chunked_logit_loss(
        case.s_hidden,
        (case.s_weight, case.s_bias),
        case.t_hidden,
        (case.t_weight, case.t_bias),
        "forward_kl",
        temperature=2.0,
        vocab_size=VOCAB,
        chunk_size=5,
    )
    s_logits = case.s_hidden @ case.s_weight[:VOCAB].T + case.s_bias[:VOCAB]
    t_logits = case.t_hidden @ case.t_weight[:VOCAB].T + case.t_bias[:VOCAB]
    expected = soft_target_loss(
        ModelOutputs(hidden=None, logits=t_logits),
        ModelOutputs(hidden=None, logits=s_logits),
        None,
        SimpleNamespace(ce_positions="all", temperature=2.0, jsd_beta=0.5),
    )
    assert_close(out.loss, expected.detach())


def test_padded_rows_never_count():
    """Rows past vocab_size (different in the two heads) change nothing and get zero gradient."""
    case = make_case()
    kw = dict(temperature=2.0, beta=0.3, vocab_size=VOCAB, labels=case.labels, ce_weight=0.5, chunk_size=4)
    out, grads = run(chunked_logit_loss, case, "jsd", **kw)
    with torch.no_grad():
        case.s_weight[VOCAB:] = 1e4
        case.t_weight[VOCAB:] = -1e4
        case.s_bias[VOCAB:] = 1e4
    out2, grads2 = run(chunked_logit_loss, case, "jsd", **kw)
    assert torch.equal(out.loss, out2.loss) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    assert grads[1][VOCAB:].abs().max() == 0 and grads[2][VOCAB:].abs().max() == 0
    assert grads[1][:VOCAB].abs().max() > 0
    with pytest.raises(ValueError, match="pass vocab_size"):
        chunked_logit_loss(case.s_hidden, case.s_weight, case.t_hidden, case.t_weight, "forward_kl")
    with pytest.raises(ValueError, match="vocab_size=39"):
        chunked_logit_loss(case.s_hidden, case.s_weight, case.t_hidden, case.t_weight, "forward_kl", vocab_size=39)


def test_all_positions_ignored_gives_zero_not_nan():
    case = make_case()
    labels = torch.full((N,), -100)
    out, grads = run(chunked_logit_loss, case, "reverse_kl", vocab_size=VOCAB, labels=labels, ce_weight=1.0, chunk_size=4)
    assert out.loss.item() == 0.0 and out.kd.item() == 0.0 and out.ce.item() == 0.0
    assert all(g.abs().max() == 0 for g in grads)


def test_no_grad_gives_same_values_and_no_graph():
    case = make_case()
    kw = dict(temperature=2.0, vocab_size=VOCAB, labels=case.labels, ce_weight=0.3, chunk_size=4)
    ref, _ = run(chunked_logit_loss, case, "jsd", **kw)
    with torch.no_grad():
        out = chunked_logit_loss(case.s_hidden, (case.s_weight, case.s_bias), case.t_hidden, (case.t_weight, case.t_bias), "jsd", **kw)
    assert not out.loss.requires_grad and torch.equal(out.loss, ref.loss.detach())


def test_second_backward_is_refused_when_gradients_were_precomputed():
    case = make_case()
    out = chunked_logit_loss(case.s_hidden, case.s_weight[:VOCAB], case.t_hidden, case.t_weight[:VOCAB], "forward_kl")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()
    again = chunked_logit_loss(
        case.s_hidden, case.s_weight[:VOCAB], case.t_hidden, case.t_weight[:VOCAB], "forward_kl", grad_in_forward=False
    )
    case.s_hidden.grad = None
    again.loss.backward(retain_graph=True)
    first = case.s_hidden.grad.clone()
    again.loss.backward()
    assert_close(case.s_hidden.grad, 2 * first)


@pytest.mark.parametrize("grad_block", [None, 5 * H_S])  # None: one block; 5 rows: 8 blocks, the last one partial
def test_bf16_close_to_fp32(grad_block, monkeypatch):
    if grad_block:
        monkeypatch.setattr("distill.objective.chunked_logits.GRAD_BLOCK_ELEMENTS", grad_block)
    ref_case, case = make_case(torch.float32), make_case(torch.bfloat16)
    kw = dict(temperature=2.0, beta=0.5, vocab_size=VOCAB, labels=ref_case.labels, ce_weight=0.3)
    # the same bf16 inputs, upcast: only the bf16 arithmetic differs
    for name in ("s_hidden", "s_weight", "s_bias", "t_hidden", "t_weight", "t_bias"):
        setattr(ref_case, name, getattr(case, name).detach().float().requires_grad_(getattr(case, name).requires_grad))
    ref, ref_grads = run(naive_logit_loss, ref_case, "jsd", **kw)
    out, grads = run(chunked_logit_loss, case, "jsd", chunk_size=5, **kw)
    assert out.loss.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    assert_close(out.loss, ref.loss, 2e-2)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, 3e-2)


def test_bf16_as_accurate_as_the_direct_bf16_computation(monkeypatch):
    """Against an fp64 truth, chunked bf16 (32 chunks, head gradient summed in fp32 over 8 blocks) errs no more than
    the direct bf16 computation: rounding each chunk's bf16 product before the fp32 sum costs nothing visible."""
    monkeypatch.setattr("distill.objective.chunked_logits.GRAD_BLOCK_ELEMENTS", 64 * 32)
    g = torch.Generator().manual_seed(3)
    n, h, v = 512, 32, 512
    tensors = [
        torch.randn(*shape, generator=g).mul_(scale).bfloat16()
        for shape, scale in (((n, h), 1.0), ((v, h), h**-0.5), ((n, h), 1.0), ((v, h), h**-0.5))
    ]

    def grads(fn, dtype, **kw):
        s_hidden, s_weight = (t.to(dtype).clone().requires_grad_() for t in tensors[:2])
        out = fn(s_hidden, s_weight, tensors[2].to(dtype), tensors[3].to(dtype), "jsd", temperature=2.0, **kw)
        out.loss.backward()
        return [out.loss.double(), s_hidden.grad.double(), s_weight.grad.double()]

    truth = grads(naive_logit_loss, torch.float64)
    error = lambda got: [((a - b).norm() / b.norm()).item() for a, b in zip(got, truth)]  # noqa: E731
    direct, chunked = error(grads(naive_logit_loss, torch.bfloat16)), error(grads(chunked_logit_loss, torch.bfloat16, chunk_size=16))
    assert all(c <= 1.5 * d + 1e-6 for c, d in zip(chunked, direct)), (chunked, direct)
    assert max(chunked) < 1e-2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_fp32_is_within_2e_6_of_an_fp64_reference_at_t1(kind):
    """Regression: a fused row-dot (`einsum`) over fp32 log-probabilities left the fp32 loss 1.3-3.3e-5 (relative) off the
    fp64 computation of the same inputs where student and teacher are close (KL ~ 1e-3 per token, vocabulary 32k); the
    sweep now works in fp64 for fp32 models (measured ~5e-7)."""
    g = torch.Generator().manual_seed(1)
    n, h, vocab = 256, 64, 32000
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    s_hidden, s_weight = r(n, h), r(vocab, h) * 0.5
    t_hidden, t_weight = s_hidden + 0.01 * r(n, h), s_weight + 0.005 * r(vocab, h)
    inputs = [x.float() for x in (s_hidden, s_weight, t_hidden, t_weight)]
    truth = naive_logit_loss(*[x.double() for x in inputs], kind).loss.item()  # F.kl_div in fp64 on the same fp32 inputs
    got = chunked_logit_loss(*inputs, kind).loss
    assert got.dtype == torch.float32
    assert abs(got.item() - truth) / truth < 2e-6, (got.item(), truth)


TRANSFORMS = {
    "granite scaling": LogitTransform(scale=0.25),
    "gemma softcap": LogitTransform(softcap=2.0),
    "both": LogitTransform(scale=3.0, softcap=1.5),
}


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), (None, 0.5)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_output_transforms_equal_the_full_logits_computation(name, kind, beta, temperature):
    """Each model's output transform (a scale, a final softcap) applied chunk by chunk, its gradient back through it:
    the same loss and gradients as transforming the full logits (teacher and student with different transforms)."""
    case = make_case()
    transforms = dict(student_transform=TRANSFORMS[name], teacher_transform=LogitTransform(softcap=3.0) if kind else None)
    common = dict(temperature=temperature, beta=beta, vocab_size=VOCAB, labels=case.labels, ce_weight=0.3, **transforms)
    out, _ = assert_same(case, kind, common, dict(chunk_size=5))
    without = chunked_logit_loss(
        case.s_hidden,
        (case.s_weight, case.s_bias),
        case.t_hidden,
        (case.t_weight, case.t_bias),
        kind,
        chunk_size=5,
        **{**common, "student_transform": None, "teacher_transform": None},
    )
    assert abs(without.loss.item() - out.loss.item()) > 1e-3 * abs(out.loss.item()), "the transforms change the loss"


def test_the_cached_teachers_student_side_applies_the_students_transform():
    """teacher.source=cache: the sparse loss's student logits go through the student's output transform too."""
    case = make_case()
    transform = LogitTransform(softcap=2.0)
    t_logits = (case.t_hidden @ case.t_weight[:VOCAB].T).log_softmax(-1)
    values, indices = t_logits.topk(8, -1)
    tail = (1 - values.exp().sum(-1)).clamp(min=0)
    targets = SparseTargets(indices, values, tail, "topk", 1.0)
    kw = dict(vocab_size=VOCAB, labels=case.labels, ce_weight=1.0, kd_weight=0.0)
    with_transform = sparse_logit_loss(
        case.s_hidden, (case.s_weight, case.s_bias), targets, "forward_kl", student_transform=transform, **kw
    )
    direct = naive_logit_loss(case.s_hidden, (case.s_weight, case.s_bias), None, None, None, student_transform=transform, **kw)
    assert_close(with_transform.ce, direct.ce)
    plain = sparse_logit_loss(case.s_hidden, (case.s_weight, case.s_bias), targets, "forward_kl", **kw)
    assert abs(plain.ce.item() - with_transform.ce.item()) > 1e-3


def test_rejects_what_it_cannot_compute():
    case = make_case()
    empty = torch.empty(0)  # what a ZeRO-3 partitioned weight looks like outside a module's forward
    with pytest.raises(ValueError, match="ZeRO-3"):
        chunked_logit_loss(case.s_hidden, empty, case.t_hidden, case.t_weight, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="beta"):
        chunked_logit_loss(case.s_hidden, case.s_weight, case.t_hidden, case.t_weight, "jsd", beta=1.5, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="kind"):
        chunked_logit_loss(case.s_hidden, case.s_weight, case.t_hidden, case.t_weight, "kl", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="labels must be in"):
        chunked_logit_loss(case.s_hidden, case.s_weight, case.t_hidden, case.t_weight, vocab_size=VOCAB, labels=torch.full((N,), VOCAB))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind,beta", KIND_BETA)
def test_equals_full_logits_cuda(kind, beta):
    case = make_case()
    for name, value in vars(case).items():
        if value is not None:
            setattr(case, name, value.detach().cuda().requires_grad_(value.requires_grad))
    torch.backends.cuda.matmul.allow_tf32 = False
    assert_same(case, kind, dict(temperature=2.0, beta=beta, vocab_size=VOCAB, labels=case.labels, ce_weight=0.3), dict(chunk_size=5))
