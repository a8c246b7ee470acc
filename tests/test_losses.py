"""Each loss against an independent hand computation (plain Python/numpy loops)."""
import math

import numpy as np
import pytest
import torch

from distill.config import LossConfig
from distill.losses import LOSSES, Batch, ModelOutputs, compute_losses, logits_positions_needed, select_logit_positions


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
