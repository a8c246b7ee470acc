"""The throughput benchmark's FLOP formula against an independent count, and the fast path against the
baseline path (same losses and gradients on the same batch; only speed and memory differ)."""
import os
import sys

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from flops import BERT_BASE, DISTILBERT_STUDENT, Shape, per_token_mflops, step_flops  # noqa: E402

from distill.config import LossConfig, StudentConfig
from distill.data import StepPlan
from distill.losses import Batch, select_logit_positions
from distill.models import StudentForDistillation, build_student, init_student_from_teacher, model_forward
from distill.objectives import Objective

V, H, F = 211, 32, 80


def _models(attn="eager", layers=4, student_layers=2):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=F,
                                         max_position_embeddings=64, pad_token_id=0, attn_implementation=attn,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    student = build_student(StudentConfig(num_layers=student_layers, dropout=0.0, attn_implementation=attn), teacher, V, 0, 64)
    init_student_from_teacher(student, teacher, [0, layers - 1], True)
    return teacher, student


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_formula_reproduces_the_issue_figures_for_bert_base():
    masked = per_token_mflops(BERT_BASE, DISTILBERT_STUDENT, 128, 0.15)
    everywhere = per_token_mflops(BERT_BASE, DISTILBERT_STUDENT, 128, 1.0)
    assert masked["teacher_fwd"] == pytest.approx(175, abs=1)
    assert masked["student_fwd_bwd"] == pytest.approx(262, abs=1)
    assert masked["teacher_head"] + masked["student_head_fwd_bwd"] == pytest.approx(29, abs=1)
    assert everywhere["teacher_head"] + everywhere["student_head_fwd_bwd"] == pytest.approx(193, abs=1)


def test_formula_matches_torch_flop_counter_on_a_tiny_model():
    teacher, student = _models("eager")
    student.train()
    lengths = [12, 7, 12, 3]
    batch, length = len(lengths), max(lengths)
    # the formula is per sequence (sum l, sum l^2): count each sequence alone, unpadded, as the formula assumes
    t_shape, s_shape = Shape(4, H, F, V), Shape(2, H, F, V)
    positions = [5, 2, 7, 1]
    counted = {"teacher_fwd": 0, "teacher_head": 0, "student": 0}
    for n, p in zip(lengths, positions):
        ids = torch.randint(5, V, (1, n))
        with torch.no_grad():
            counted["teacher_fwd"] += _count(lambda: teacher.bert(input_ids=ids))
            hidden = teacher.bert(input_ids=ids).last_hidden_state.reshape(-1, H)[:p]
            counted["teacher_head"] += _count(lambda: teacher.cls(hidden))

        def student_step():
            out = model_forward(student, ids, torch.ones_like(ids), torch.arange(p))
            (out.logits.sum() + out.hidden.sum()).backward()

        counted["student"] += _count(student_step)
    ls = np.array(lengths, dtype=float)
    expected = step_flops(t_shape, s_shape, ls.sum(), (ls**2).sum(), sum(positions))
    assert counted["teacher_fwd"] == expected["teacher_fwd"]
    assert counted["teacher_head"] == expected["teacher_head"]
    assert counted["student"] == expected["student_fwd_bwd"] + expected["student_head_fwd_bwd"]
    assert batch == 4 and length == 12


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [20, 9, 15, 4, 20, 11]
    ids = torch.zeros(len(lengths), 24, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, V, (n,), generator=g)
        mask[i, :n] = 1
        pick = torch.randperm(n, generator=g)[: max(1, n // 6)]
        labels[i, pick] = ids[i, pick]
        ids[i, pick] = 3
    return Batch(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("ce_positions", ["all", "masked"])
@pytest.mark.parametrize("weights", [{"ce": 5.0, "mlm": 2.0, "cos": 1.0}, {"ce": 1.0, "tinybert_hidden": 1.0, "tinybert_attn": 1.0}])
def test_fast_and_baseline_paths_give_the_same_loss_and_gradients(ce_positions, weights):
    results = []
    for attn, inference_mode, full_logits in [("sdpa", True, False), ("eager", False, True)]:
        teacher, student = _models(attn)
        cfg = LossConfig(weights=weights, ce_positions=ce_positions)
        objective = Objective(cfg, teacher, student)
        wrapper = StudentForDistillation(student, objective.student_needs, cfg.projection, objective.teacher_width, full_logits=full_logits)
        torch.manual_seed(1)
        for p in getattr(wrapper, "projections", []):
            p.reset_parameters()
        batch = select_logit_positions(_batch(), objective.logits_at)
        t_out = objective.teacher_forward(teacher, batch, inference_mode=inference_mode, full_logits=full_logits)
        s_out = wrapper.outputs(wrapper(batch.input_ids, batch.attention_mask, batch.logit_positions))
        loss, terms = objective.losses(t_out, s_out, batch)
        loss.backward()  # inference-mode teacher outputs must be usable as loss targets
        grads = torch.cat([p.grad.flatten() for p in wrapper.parameters() if p.grad is not None])
        results.append((loss.detach(), {k: v for k, v in terms.items()}, grads))
    (fast_loss, fast_terms, fast_grads), (base_loss, base_terms, base_grads) = results
    torch.testing.assert_close(fast_loss, base_loss, rtol=1e-5, atol=1e-6)
    for name in fast_terms:
        torch.testing.assert_close(fast_terms[name], base_terms[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grads, base_grads, rtol=1e-4, atol=1e-6)


def test_length_grouping_across_steps_is_a_partition_independent_of_ranks():
    lengths = np.random.default_rng(0).integers(10, 129, 1000)
    plans = {ws: StepPlan(1000, 32, 8, ws, 0, 56, lengths, group_steps=8) for ws in (1, 2, 4)}
    seen = []
    for step in range(16):
        rows = {ws: np.sort(p.step_samples(step)[1]) for ws, p in plans.items()}
        assert all(np.array_equal(rows[1], r) for r in rows.values())
        stream = plans[1].step_samples(step)[0]
        seen += list(stream)
        assert np.ptp(lengths[plans[1].step_samples(step)[1]]) < 40  # one length bucket per step
    assert sorted(seen) == list(range(16 * 32))
    # group_steps=1 keeps each step's own random set of samples
    single = StepPlan(1000, 32, 8, 1, 0, 56, lengths)
    assert np.array_equal(np.sort(single.step_samples(3)[0]), np.arange(96, 128))


def test_teacher_forward_is_skipped_when_no_loss_reads_it():
    teacher, student = _models()
    assert Objective(LossConfig(weights={"mlm": 1.0}), teacher, student).uses_teacher is False  # (c) of bench/quality.py
    assert Objective(LossConfig(weights={"mlm": 1.0, "cos": 1.0}), teacher, student).uses_teacher is True


def test_phase_timer_attributes_time_and_collectives_to_phases():
    import time

    from deepspeed.comm.comm import comms_logger

    from distill.profiling import PhaseTimer

    timer = PhaseTimer(torch.device("cpu"), enabled=True)
    with timer("teacher_forward"):
        time.sleep(0.05)
    with timer("backward"):
        time.sleep(0.03)
        # a 20 ms collective as DeepSpeed's comms logger records it: {name: {bytes: [count, latencies ms, algbw, busbw]}}
        comms_logger.comms_dict.setdefault("test_all_reduce", {})[1024] = [1, [20.0], [0.0], [0.0]]
    with timer("backward"):
        time.sleep(0.01)
    took = timer.take()
    assert took["teacher_forward"] >= 0.05
    assert took["comm"] == pytest.approx(0.02)
    assert took["backward"] >= 0.02  # 40 ms slept, 20 ms of it reported as comm (no upper bounds: a loaded machine sleeps longer)
    comms_logger.comms_dict.pop("test_all_reduce")
    assert timer.take()["backward"] == 0.0, "take() starts the counters again"
    off = PhaseTimer(torch.device("cpu"), enabled=False)
    with off("loss"):
        time.sleep(0.01)
    assert sum(off.take().values()) == 0.0
