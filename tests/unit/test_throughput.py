"""The throughput benchmark's FLOP formula against an independent count, the fast path against the
baseline path (same losses and gradients on the same batch; only speed and memory differ), and the HF-distiller
reference baseline against the reference's computation and our objective."""

import math
import os
import sys

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench"))
from flops import BERT_BASE, DISTILBERT_STUDENT, Shape, per_token_mflops, step_flops  # noqa: E402

from distill.config import LossConfig, StudentConfig
from distill.data.reader import StepPlan
from distill.models.build import StudentForDistillation, build_student, init_student_from_teacher, model_forward
from distill.objective.losses import Batch, select_logit_positions
from distill.objective.objective import Objective

V, H, F = 211, 32, 80


def _models(attn="eager", layers=4, student_layers=2):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    teacher = BertForMaskedLM(
        BertConfig(
            vocab_size=V,
            hidden_size=H,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=F,
            max_position_embeddings=64,
            pad_token_id=0,
            attn_implementation=attn,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ).eval()
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

    from distill.train.profiling import PhaseTimer

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


# ----------------------------------------------------------------------------------------------
# The reference baseline of the HF-distiller comparison (bench/reference_distiller.py)


def _reference():
    import reference_distiller

    return reference_distiller


@pytest.mark.parametrize("restrict_ce_to_mask", [False, True])
def test_reference_baseline_losses_equal_our_objective_on_the_same_batch(restrict_ce_to_mask):
    """Same models, same masked batch: the reference's full-logit, masked_select'ed losses equal our objective's
    (soft targets at every real token by default, at the masked ones with restrict_ce_to_mask = ce_positions masked)."""
    ref = _reference()
    teacher, student = _models("sdpa")
    weights = {"ce": 5.0, "mlm": 2.0, "cos": 1.0}
    batch = _batch()
    cfg = LossConfig(weights=weights, ce_positions="masked" if restrict_ce_to_mask else "all", temperature=2.0)
    objective = Objective(cfg, teacher, student)
    wrapper = StudentForDistillation(student, objective.student_needs, cfg.projection, objective.teacher_width)
    ours_batch = select_logit_positions(_batch(), objective.logits_at)
    t_out = objective.teacher_forward(teacher, ours_batch)
    ours, ours_terms = objective.losses(
        t_out, wrapper.outputs(wrapper(ours_batch.input_ids, ours_batch.attention_mask, ours_batch.logit_positions)), ours_batch
    )

    attention = batch.attention_mask.bool()  # the reference's mask is boolean (arange < lengths)
    s = student(input_ids=batch.input_ids, attention_mask=attention, output_hidden_states=True)
    with torch.no_grad():
        t = teacher(input_ids=batch.input_ids, attention_mask=attention, output_hidden_states=True)
    loss_fn = ref.DistillationLoss(5.0, 2.0, 1.0, 2.0, restrict_ce_to_mask)
    theirs, terms = loss_fn(s.logits, s.hidden_states, t.logits, t.hidden_states, attention, batch.labels)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    for name in weights:
        torch.testing.assert_close(terms[name], ours_terms[name], rtol=1e-5, atol=1e-6)


def test_reference_masking_selects_ceil_15_percent_of_real_tokens_with_80_10_10():
    ref = _reference()
    g = torch.Generator().manual_seed(0)
    vocab, pad, mask, specials = 300, 0, 4, [0, 1, 2, 3, 4]
    lengths = torch.randint(20, 100, (64,), generator=g)
    ids = torch.full((64, 100), pad)
    for i, n in enumerate(lengths.tolist()):
        ids[i, :n] = torch.randint(5, vocab, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 2, 3  # [CLS] ... [SEP]
    counts = np.random.default_rng(0).integers(1, 1000, vocab)
    probs = ref.token_probabilities(counts, 0.7, specials, vocab)
    assert probs.dtype == torch.float64 and probs[specials].eq(0).all()
    torch.manual_seed(0)
    out, attention, labels = ref.prepare_batch_mlm(ids, lengths, probs, torch.tensor([0.8, 0.1, 0.1]), 0.15, pad, mask, vocab)
    selected = labels != -100
    assert int(selected.sum()) == math.ceil(0.15 * int(lengths.sum()))
    assert attention.dtype == torch.bool and torch.equal(attention.sum(1), lengths)
    assert not selected[~attention].any() and not torch.isin(ids[selected], torch.tensor(specials)).any()
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(out[~selected], ids[~selected])
    masked = (out[selected] == mask).float().mean().item()
    kept = (out[selected] == ids[selected]).float().mean().item()
    assert abs(masked - 0.8) < 0.04 and 0.07 < kept < 0.15  # keep = 10% + random draws of the same id


def test_reference_sampler_batches_one_length_bin_and_plan_batches_are_the_trainers():
    ref = _reference()
    rng = np.random.default_rng(0)
    sequences = [np.concatenate([[2], rng.integers(5, 300, n - 2), [3]]) for n in rng.integers(5, 129, 500)]
    dataset = ref.SequenceDataset(sequences, cls_id=2, sep_id=3, pad_id=0, unk_id=1)
    assert dataset.removed == sum(len(s) <= 11 for s in sequences) and all(n > 11 for n in dataset.lengths)
    groups = ref.length_groups(dataset.lengths)
    sampler = ref.GroupedBatches(torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0)), groups, 8)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(dataset)))
    full = [b for b in batches if len(b) == 8]
    assert sum(len({groups[i] for i in b}) == 1 for b in full) >= len(full) - len(set(groups))  # only the leftovers mix bins
    ids, lengths = dataset.collate([dataset[i] for i in full[0]])
    assert ids.shape == (8, int(lengths.max())) and ids.dtype == torch.int64
    # --same-batches-as-plan: the very rows distill-train's StepPlan puts in each micro batch
    row_lengths = np.array([len(s) for s in sequences])
    plan_batches = ref.PlanBatches(dataset, len(sequences), row_lengths, 16, 8, 4, 56, 3)
    plan = StepPlan(len(sequences), 16, 8, 1, 0, 56, row_lengths, group_steps=4)
    expected = [[int(r) for r in plan.micro_batch_of(s, m)[1] if row_lengths[r] > 11] for s in range(3) for m in range(2)]
    assert [[dataset.source_rows[i] for i in b] for b in plan_batches] == expected
