"""Document-aware packing of causal data (issue 25): a packed micro batch gives, position by position, the logits its
documents give run one at a time (student and teacher paths; Llama's rotary and GPT-2's learned positions; sdpa, eager,
and the varlen kwargs flash attention reads); the collator's position ids, segments and labels; the switch off is the
batch of before; the attention-relation losses never compare keys across documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import tiny_teacher

from distill.config import LossConfig
from distill.data.documents import batch_documents
from distill.data.masking import CausalLMCollator
from distill.models.build import StudentForDistillation, model_forward
from distill.objective.losses import Batch
from distill.objective.objective import Objective

EOS = 2
# three rows: the first starts inside a document (no flag at its first token), the others at documents' starts; the
# micro batch pads rows 1 and 2 (different lengths), row 2 holds a single document
DOCUMENTS = [[[11, 12, EOS], [20, 21, 22, 23, EOS], [30, 31]], [[40, 41, 42, EOS], [50, EOS], [60, 61, 62, 63]], [[70, 71, 72, 73, 74]]]
ROW_STARTS_INSIDE = [True, False, False]


def rows():
    out = []
    for docs, inside in zip(DOCUMENTS, ROW_STARTS_INSIDE):
        ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
        flags = np.concatenate([np.eye(1, len(d), 0, dtype=bool)[0] for d in docs])
        flags[0] = not inside
        out.append((ids, flags))
    return out


def test_the_collator_restarts_positions_at_each_document_and_drops_labels_across_them():
    batch = CausalLMCollator(pad_id=0, pad_to_multiple_of=4, eos_id=EOS)(rows(), [5, 6, 7])
    assert batch["input_ids"].shape == (3, 12)
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 1],  # two padding tokens: a segment of their own
        [0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1],
        [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6],
    ]
    assert batch["cu_seqlens"].tolist() == [0, 3, 8, 10, 12, 16, 18, 22, 24, 29, 36] and int(batch["max_document"]) == 7
    # a document's last token (its EOS) predicts nothing; the row's last token and padding neither
    assert batch["labels"].tolist() == [
        [12, EOS, -100, 21, 22, 23, EOS, -100, 31, -100, -100, -100],
        [41, 42, EOS, -100, EOS, -100, 61, 62, 63, -100, -100, -100],
        [71, 72, 73, 74, -100] + [-100] * 7,
    ]
    # a format-1 dataset (no flags): documents begin after each EOS, the same layout here
    derived = CausalLMCollator(pad_id=0, pad_to_multiple_of=4, eos_id=EOS)([(ids, None) for ids, _ in rows()], [5, 6, 7])
    for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
        assert torch.equal(derived[key], batch[key]), key


def test_the_switch_off_is_the_batch_of_before_bit_for_bit():
    plain = [(np.array([7, 3, 9, 2, 5]), np.array([True, False, False, False, True])), (np.array([4, 8, 6]), None)]
    out = CausalLMCollator(pad_id=0, pad_to_multiple_of=4, documents=False)(plain, [10, 11])
    assert sorted(out) == ["attention_mask", "input_ids", "labels", "stream_indices"]  # no position ids: the models see rows whole
    assert out["input_ids"].tolist() == [[7, 3, 9, 2, 5, 0, 0, 0], [4, 8, 6, 0, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[3, 9, 2, 5, -100, -100, -100, -100], [8, 6, -100, -100, -100, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
    assert batch_documents(out, torch.device("cpu")) is None


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A CPU stand-in for flash attention's varlen kernel (no GPU here): causal attention inside each segment that
    `cu_seq_lens_q` marks in the flattened batch, from the very kwargs transformers hands flash_attention_2; the mask
    transformers builds for it is None, as for flash attention."""
    b, heads, length, dim = query.shape
    if "cu_seq_lens_q" not in kwargs:  # no segments given: each row is one sequence, as flash attention's plain kernel
        kwargs.update(cu_seq_lens_q=torch.arange(0, b * length + 1, length), max_length_q=length)
    assert attention_mask is None and kwargs["max_length_q"] == max(np.diff(kwargs["cu_seq_lens_q"].tolist()))
    cu = kwargs["cu_seq_lens_q"].tolist()
    key = key.repeat_interleave(heads // key.shape[1], 1)
    value = value.repeat_interleave(heads // value.shape[1], 1)
    q, k, v = (x.transpose(1, 2).reshape(b * length, heads, dim).transpose(0, 1) for x in (query, key, value))
    out = torch.cat(
        [F.scaled_dot_product_attention(q[:, a:e], k[:, a:e], v[:, a:e], is_causal=True, scale=scaling) for a, e in zip(cu, cu[1:])], 1
    )
    return out.transpose(0, 1).reshape(b, length, heads, dim), None


def model(family: str, implementation: str):
    from transformers import AttentionInterface

    AttentionInterface.register("varlen_reference", varlen_attention)
    torch.manual_seed(0)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        net = GPT2LMHeadModel(
            GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=EOS, eos_token_id=EOS)
        )
    elif family == "mistral":  # a sliding window shorter than the documents: transformers' second (sliding) mask
        net = tiny_teacher(family, layers=2, vocab=101, positions=32, sliding_window=3)
    else:
        net = tiny_teacher(family, layers=2, vocab=101, positions=32)
    net.set_attn_implementation(implementation)
    return net.eval()


def one_at_a_time(net) -> torch.Tensor:
    """Logits of every real token of the batch, each document (or a row's leading piece of one) run alone, in batch order."""
    with torch.no_grad():
        return torch.cat([net(input_ids=torch.tensor(d)[None]).logits[0] for docs in DOCUMENTS for d in docs])


@pytest.mark.parametrize(
    "family, implementation",
    [(f, i) for f in ("llama", "gpt2") for i in ("sdpa", "eager", "varlen_reference")] + [("mistral", "sdpa"), ("mistral", "eager")],
)
def test_a_packed_batch_gives_the_logits_of_its_documents_run_one_at_a_time(family, implementation):
    net = model(family, implementation)
    raw = CausalLMCollator(pad_id=0, pad_to_multiple_of=4, eos_id=EOS)(rows(), [0, 1, 2])
    batch = Batch(raw["input_ids"], raw["attention_mask"], raw["labels"], documents=batch_documents(raw, torch.device("cpu")))
    real = batch.attention_mask.reshape(-1).nonzero(as_tuple=True)[0]
    want = one_at_a_time(model(family, "sdpa"))
    # the student's path: the wrapper DeepSpeed runs, logits at every real token
    student = StudentForDistillation(net)
    with torch.no_grad():
        got = student.outputs(student(batch.input_ids, batch.attention_mask, real, batch.documents)).logits
    # the teacher's path (online and partitioned teachers, and distill-cache's, call it): Objective.teacher_forward
    objective = Objective(LossConfig(weights={"ce": 1.0}, ce_positions="all"), net, net)
    teacher = objective.teacher_forward(net, objective.prepare(batch)).logits
    worst = max(float((got - want).abs().max()), float((teacher - want).abs().max()))
    print(f"{family} {implementation}: packed vs one document at a time, max |logit difference| {worst:.2e}")
    assert worst < 1e-5
    # and the same rows read as one sequence each (the switch off) do differ: the test can fail
    with torch.no_grad():
        whole = model_forward(net, batch.input_ids, batch.attention_mask, real).logits
    assert float((whole - want).abs().max()) > 1e-2


def test_attention_relation_losses_never_compare_keys_across_documents():
    from distill.objective.losses import _key_mask

    raw = CausalLMCollator(pad_id=0, pad_to_multiple_of=4, eos_id=EOS)(rows(), [0, 1, 2])
    documents = batch_documents(raw, torch.device("cpu"))
    allowed = _key_mask(raw["attention_mask"], True, documents)[:, 0]
    segment = documents.segment_ids()
    real = raw["attention_mask"].bool()
    for b in range(3):
        for i in range(12):
            for j in range(12):
                want = bool(real[b, i] and real[b, j] and j <= i and segment[b, i] == segment[b, j])
                assert bool(allowed[b, i, j]) == want
    assert _key_mask(raw["attention_mask"], True)[0, 0, 4, 1], "without documents the second document sees the first"


def test_a_cache_written_with_the_other_setting_is_refused():
    from types import SimpleNamespace

    from data_prep.cache_manifest import CacheError
    from distill.teachers.cache import _check_masking

    run = SimpleNamespace(data=SimpleNamespace(document_attention=True))
    for recorded in (None, False):
        with pytest.raises(
            CacheError,
            match="data.document_attention=true; set data.document_attention=false or re-run distill-cache --document-attention$",
        ):
            _check_masking(run, SimpleNamespace(document_attention=recorded), "cache/manifest.json", "causal")
    _check_masking(run, SimpleNamespace(document_attention=True), "cache/manifest.json", "causal")
    run.data.document_attention = False
    with pytest.raises(CacheError, match="--no-document-attention$"):
        _check_masking(run, SimpleNamespace(document_attention=True), "cache/manifest.json", "causal")
