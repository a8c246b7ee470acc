"""Each loss against an independent hand computation (plain Python/numpy loops)."""

import math

import numpy as np
import pytest
import torch

from distill.config import LossConfig
from distill.objective.losses import LOSSES, Batch, ModelOutputs, compute_losses, logits_positions_needed, select_logit_positions


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _batch(seed=0, B=3, L=7, V=11, H=5):
    g = torch.Generator().manual_seed(seed)
    attention = torch.ones(B, L, dtype=torch.long)
    attention[0, 5:] = 0  # padding
    attention[2, 3:] = 0
    labels = torch.full((B, L), -100)
    labels[0, 1] = 4
    labels[1, 2] = 7
    labels[1, 6] = 1
    labels[2, 1] = 3
    ids = torch.randint(5, V, (B, L), generator=g)
    s_hidden = torch.randn(B, L, H, generator=g)
    t_hidden = torch.randn(B, L, H, generator=g)
    s_full = torch.randn(B, L, V, generator=g)
    t_full = torch.randn(B, L, V, generator=g)
    return Batch(ids, attention, labels), s_hidden, t_hidden, s_full, t_full


def _outputs(batch, hidden, full):
    flat = full.reshape(-1, full.shape[-1])
    return ModelOutputs(hidden=hidden, logits=flat[batch.logit_positions])


@pytest.mark.parametrize("positions", ["all", "masked"])
def test_soft_target_ce_matches_hand_computation(positions):
    cfg = LossConfig(temperature=2.0, ce_positions=positions)
    batch, sh, th, sf, tf = _batch()
    select_logit_positions(batch, logits_positions_needed({"ce": 5.0}, cfg))
    value = LOSSES["ce"].fn(_outputs(batch, th, tf), _outputs(batch, sh, sf), batch, cfg).item()

    T = 2.0
    terms = []
    for b in range(3):
        for i in range(7):
            if not batch.attention_mask[b, i]:
                continue
            if positions == "masked" and batch.labels[b, i] == -100:
                continue
            p = _softmax(tf[b, i].double().numpy() / T)
            q = _softmax(sf[b, i].double().numpy() / T)
            terms.append(sum(p[k] * (math.log(p[k]) - math.log(q[k])) for k in range(len(p))))
    expected = np.mean(terms) * T * T
    assert len(terms) == (15 if positions == "all" else 4)  # 5 + 7 + 3 real tokens
    assert value == pytest.approx(expected, rel=1e-5)


def test_mlm_loss_matches_hand_computation():
    cfg = LossConfig(ce_positions="all")
    batch, sh, th, sf, tf = _batch(1)
    select_logit_positions(batch, "tokens")  # logits at all tokens: the loss must pick the masked ones
    value = LOSSES["mlm"].fn(None, _outputs(batch, sh, sf), batch, cfg).item()
    nll = []
    for b, i in [(0, 1), (1, 2), (1, 6), (2, 1)]:
        logp = np.log(_softmax(sf[b, i].double().numpy()))
        nll.append(-logp[int(batch.labels[b, i])])
    assert value == pytest.approx(np.mean(nll), rel=1e-5)


def test_cosine_loss_matches_hand_computation():
    batch, sh, th, sf, tf = _batch(2)
    value = LOSSES["cos"].fn(ModelOutputs(th), ModelOutputs(sh), batch, LossConfig()).item()
    terms = []
    for b in range(3):
        for i in range(7):
            if batch.attention_mask[b, i]:
                s, t = sh[b, i].double().numpy(), th[b, i].double().numpy()
                terms.append(1 - s.dot(t) / (np.linalg.norm(s) * np.linalg.norm(t)))
    assert len(terms) == 15
    assert value == pytest.approx(np.mean(terms), rel=1e-5)


def test_weighted_total_and_positions_union():
    cfg = LossConfig(temperature=2.0, ce_positions="masked")
    weights = {"ce": 5.0, "mlm": 2.0, "cos": 1.0}
    assert logits_positions_needed(weights, cfg) == "masked"
    assert logits_positions_needed(weights, LossConfig(ce_positions="all")) == "tokens"
    assert logits_positions_needed({"cos": 1.0}, cfg) is None
    batch, sh, th, sf, tf = _batch(3)
    select_logit_positions(batch, "masked")
    assert batch.logit_positions.tolist() == [1, 7 + 2, 7 + 6, 14 + 1]
    total, terms = compute_losses(weights, _outputs(batch, th, tf), _outputs(batch, sh, sf), batch, cfg)
    assert set(terms) == {"ce", "mlm", "cos"}
    assert total.item() == pytest.approx(5 * terms["ce"].item() + 2 * terms["mlm"].item() + terms["cos"].item(), rel=1e-6)
    assert compute_losses({"ce": 0.0, "mlm": 1.0}, None, _outputs(batch, sh, sf), batch, cfg)[1].keys() == {"mlm"}


# ----------------------------------------------------------------------------------------------
# Intermediate-layer losses (Patient-KD, TinyBERT, MiniLM): plain loops over batch / heads / tokens.

from distill.objective.losses import LossContext, ModelShape, needs_of  # noqa: E402


def _np(x):
    return x.double().numpy()


def _layered(seed=0, B=3, L=6, t_layers=4, s_layers=2, t_width=12, s_width=8, heads=2):
    """Random teacher/student internals of different widths (head dims 6 vs 4), with padding."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.ones(B, L, dtype=torch.long)
    attention[0, 4:] = 0
    attention[2, 2:] = 0
    ids = torch.randint(5, 11, (B, L), generator=g)
    batch = Batch(ids, attention, torch.full((B, L), -100))

    def side(layers, width):
        states = tuple(torch.randn(B, L, width, generator=g) * 2 for _ in range(layers + 1))
        qkv = {i: tuple(torch.randn(B, heads, L, width // heads, generator=g) * 2 for _ in range(3)) for i in range(layers)}
        return states, qkv

    t_states, t_qkv = side(t_layers, t_width)
    s_states, s_qkv = side(s_layers, s_width)
    projected = tuple(torch.randn(B, L, t_width, generator=g) for _ in range(s_layers + 1))
    teacher = ModelOutputs(hidden=t_states[-1], hidden_states=t_states, attention=t_qkv)
    student = ModelOutputs(hidden=s_states[-1], hidden_states=s_states, attention=s_qkv, projected=projected)
    return batch, teacher, student


def _ctx(layer_map, **cfg):
    return LossContext(
        cfg=LossConfig(**cfg),
        teacher=ModelShape(12, 2, 4),
        student=ModelShape(8, 2, len(layer_map)),
        layer_map=tuple(layer_map),
        attention_teacher_layer=cfg.get("attention_teacher_layer", -1) % 4,
    )


def _real(batch, b):
    return [i for i in range(batch.attention_mask.shape[1]) if batch.attention_mask[b, i]]


@pytest.mark.parametrize("include_last", [False, True])
def test_patient_loss_matches_hand_computation(include_last):
    batch, teacher, student = _layered(4, s_width=12)
    ctx = _ctx([1, 3], pkd_include_last=include_last)
    value = LOSSES["pkd"].fn(teacher, student, batch, ctx).item()
    pairs = [(0, 1), (1, 3)] if include_last else [(0, 1)]
    terms = []
    for b in range(3):
        for j, t in pairs:
            s = _np(student.hidden_states[j + 1][b, 0])
            u = _np(teacher.hidden_states[t + 1][b, 0])
            d = s / np.linalg.norm(s) - u / np.linalg.norm(u)
            terms.extend(d * d)  # released code: mean over (batch, layers, features)
    assert value == pytest.approx(np.mean(terms), rel=1e-5)


def test_tinybert_embedding_and_hidden_losses_match_hand_computation():
    batch, teacher, student = _layered(5)
    ctx = _ctx([1, 3])
    emb = LOSSES["tinybert_emb"].fn(teacher, student, batch, ctx).item()
    hid = LOSSES["tinybert_hidden"].fn(teacher, student, batch, ctx).item()

    def mse(s_idx, t_idx):
        errs = []
        for b in range(3):
            for i in _real(batch, b):
                d = _np(student.projected[s_idx][b, i]) - _np(teacher.hidden_states[t_idx][b, i])
                errs.append(np.mean(d * d))  # every token weighs the same, padding not at all
        return np.mean(errs)

    assert emb == pytest.approx(mse(0, 0), rel=1e-5)
    assert hid == pytest.approx(mse(1, 2) + mse(2, 4), rel=1e-5)  # student layer m -> teacher layer g(m): 0->1, 1->3


def test_tinybert_attention_loss_excludes_padding_through_the_mask():
    batch, teacher, student = _layered(6)
    ctx = _ctx([1, 3])
    value = LOSSES["tinybert_attn"].fn(teacher, student, batch, ctx).item()
    total = 0.0
    for m, t in enumerate([1, 3]):
        errs = []
        sq, sk, _ = (_np(x) for x in student.attention[m])
        tq, tk, _ = (_np(x) for x in teacher.attention[t])
        for b in range(3):
            real = _real(batch, b)
            for h in range(2):
                for i in real:
                    for j in real:
                        s = sq[b, h, i] @ sk[b, h, j] / math.sqrt(4)
                        u = tq[b, h, i] @ tk[b, h, j] / math.sqrt(6)
                        errs.append((s - u) ** 2)
        assert len(errs) == 2 * (16 + 36 + 4)
        total += np.mean(errs)
    assert value == pytest.approx(total, rel=1e-5)


def _kl_rows(t_rel, s_rel, batch, causal, heads=2):
    terms = []
    for b in range(3):
        real = _real(batch, b)
        for h in range(heads):
            for i in real:
                keys = [j for j in real if j <= i] if causal else real
                p = _softmax(np.array([t_rel[b, h, i, j] for j in keys]))
                q = _softmax(np.array([s_rel[b, h, i, j] for j in keys]))
                terms.append(float(np.sum(p * (np.log(p) - np.log(q)))))
    return np.mean(terms)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("teacher_layer", [-1, 2])
def test_minilm_losses_match_hand_computation(causal, teacher_layer):
    batch, teacher, student = _layered(7)
    teacher.causal = student.causal = causal
    ctx = _ctx([1, 3], attention_teacher_layer=teacher_layer)
    t_layer = teacher_layer % 4
    attn = LOSSES["minilm_attn"].fn(teacher, student, batch, ctx).item()
    value = LOSSES["minilm_value"].fn(teacher, student, batch, ctx).item()
    sq, sk, sv = (_np(x) for x in student.attention[1])  # the student's last layer
    tq, tk, tv = (_np(x) for x in teacher.attention[t_layer])
    rel = lambda a, b, d: np.einsum("bhid,bhjd->bhij", a, b) / math.sqrt(d)  # noqa: E731
    assert attn == pytest.approx(_kl_rows(rel(tq, tk, 6), rel(sq, sk, 4), batch, causal), rel=1e-5)
    assert value == pytest.approx(_kl_rows(rel(tv, tv, 6), rel(sv, sv, 4), batch, causal), rel=1e-5)
    assert attn > 0 and value > 0


def test_losses_declare_what_they_read():
    ctx = _ctx([1, 3])
    t, s = needs_of({"tinybert_emb": 1, "tinybert_hidden": 1, "tinybert_attn": 1}, ctx)
    assert t.hidden_states and not t.projected and t.attention_layers == (1, 3)
    assert s.projected and s.attention_layers == (0, 1)
    t, s = needs_of({"minilm_attn": 1, "minilm_value": 1}, ctx)
    assert t == type(t)(attention_layers=(3,)) and s == type(s)(attention_layers=(1,))
    t, s = needs_of({"ce": 1.0, "mlm": 1.0}, ctx)
    assert not (t.hidden_states or s.hidden_states or t.attention_layers or s.attention_layers)
    t, s = needs_of({"pkd": 1.0}, ctx)
    assert t.hidden_states and s.hidden_states and not s.attention_layers
