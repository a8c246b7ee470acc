"""Student construction and initialisation from teacher layers; logits only where needed."""
import pytest
import torch

from distill.config import StudentConfig
from distill.models import (ModelError, apply_mlm_head, build_student, default_init_layers, init_student_from_teacher,
                            load_teacher, mlm_forward)


def _bert_teacher(layers=12, hidden=32, heads=4, vocab=97, seed=0, kind="bert"):
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    if kind == "roberta":
        cfg = RobertaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=4 * hidden, max_position_embeddings=66, pad_token_id=1)
        model = RobertaForMaskedLM(cfg)
    else:
        cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=4 * hidden, max_position_embeddings=64, pad_token_id=0)
        model = BertForMaskedLM(cfg)
    # make every parameter distinct (fresh inits leave biases at 0 and LayerNorms at 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def test_default_layers_match_the_distilbert_release():
    assert default_init_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert default_init_layers(24, 12)[0] == 0 and default_init_layers(24, 12)[-1] == 23
    assert default_init_layers(4, 2) == [0, 3]
    assert default_init_layers(6, 1) == [5]


@pytest.mark.parametrize("layers", [[0, 2, 4, 7, 9, 11], [1, 3, 5, 6, 8, 10]])
def test_distilbert_student_copies_the_chosen_teacher_layers(layers):
    teacher = _bert_teacher()
    student = build_student(StudentConfig(), teacher, vocab_size=97, pad_token_id=0, max_seq_len=64)
    assert type(student).__name__ == "DistilBertForMaskedLM"
    assert student.config.n_layers == 6 and student.config.dim == 32
    assert not any("token_type" in n or "pooler" in n for n, _ in student.named_parameters())
    init_student_from_teacher(student, teacher, layers, fold_token_type=True)
    t, s = teacher.state_dict(), student.state_dict()
    for s_idx, t_idx in enumerate(layers):
        tl, sl = f"bert.encoder.layer.{t_idx}.", f"distilbert.transformer.layer.{s_idx}."
        for t_name, s_name in [("attention.self.query", "attention.q_lin"), ("attention.self.key", "attention.k_lin"),
                               ("attention.self.value", "attention.v_lin"), ("attention.output.dense", "attention.out_lin"),
                               ("attention.output.LayerNorm", "sa_layer_norm"), ("intermediate.dense", "ffn.lin1"),
                               ("output.dense", "ffn.lin2"), ("output.LayerNorm", "output_layer_norm")]:
            for w in ("weight", "bias"):
                assert torch.equal(s[sl + s_name + "." + w], t[tl + t_name + "." + w]), (s_idx, t_idx, s_name)
    assert torch.equal(s["distilbert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(s["vocab_projector.weight"], t["bert.embeddings.word_embeddings.weight"])  # tied
    assert torch.equal(s["vocab_projector.bias"], t["cls.predictions.bias"])
    assert torch.equal(s["vocab_transform.weight"], t["cls.predictions.transform.dense.weight"])
    assert torch.equal(s["vocab_layer_norm.bias"], t["cls.predictions.transform.LayerNorm.bias"])
    expected_pos = t["bert.embeddings.position_embeddings.weight"] + t["bert.embeddings.token_type_embeddings.weight"][0]
    assert torch.allclose(s["distilbert.embeddings.position_embeddings.weight"], expected_pos)


def test_folded_embeddings_and_head_reproduce_the_teacher():
    """With token type 0 folded in, the student's embedding output and MLM head equal the teacher's."""
    teacher = _bert_teacher()
    student = build_student(StudentConfig(), teacher, 97, 0, 64).eval()
    init_student_from_teacher(student, teacher, default_init_layers(12, 6))
    ids = torch.randint(5, 97, (2, 10))
    assert torch.allclose(student.distilbert.embeddings(ids), teacher.bert.embeddings(input_ids=ids), atol=1e-6)
    h = torch.randn(4, 32)
    assert torch.allclose(apply_mlm_head(student, h), apply_mlm_head(teacher, h), atol=1e-5)
    # and a 1-layer-per-layer copy (student as deep as the teacher) reproduces the teacher's output
    twin = build_student(StudentConfig(num_layers=12), teacher, 97, 0, 64).eval()
    init_student_from_teacher(twin, teacher, list(range(12)))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    a = mlm_forward(teacher, ids, mask, None).hidden
    b = mlm_forward(twin, ids, mask, None).hidden
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-4)


def test_roberta_teacher_positions_are_offset():
    teacher = _bert_teacher(layers=4, kind="roberta")
    student = build_student(StudentConfig(), teacher, 97, 1, 64)
    assert student.config.max_position_embeddings == 64
    init_student_from_teacher(student, teacher, [0, 3])
    t = teacher.state_dict()
    expected = t["roberta.embeddings.position_embeddings.weight"][2:66] + t["roberta.embeddings.token_type_embeddings.weight"][0]
    assert torch.allclose(student.state_dict()["distilbert.embeddings.position_embeddings.weight"], expected)


def test_logits_only_at_requested_positions_equal_full_logits():
    teacher = _bert_teacher(layers=2)
    ids = torch.randint(5, 97, (3, 9))
    mask = torch.ones_like(ids)
    positions = torch.tensor([0, 4, 13, 26])
    out = mlm_forward(teacher, ids, mask, positions)
    full = teacher(input_ids=ids, attention_mask=mask).logits.reshape(-1, 97)
    assert out.logits.shape == (4, 97)
    assert torch.allclose(out.logits, full[positions], atol=1e-5)


def test_bad_student_requests_are_refused():
    teacher = _bert_teacher(layers=4)
    with pytest.raises(ModelError, match="width"):
        student = build_student(StudentConfig(hidden_size=16, num_heads=2, intermediate_size=32), teacher, 97, 0, 64)
        init_student_from_teacher(student, teacher, [0, 3])
    student = build_student(StudentConfig(), teacher, 97, 0, 64)
    with pytest.raises(ModelError, match="out of range"):
        init_student_from_teacher(student, teacher, [0, 9])
    with pytest.raises(ModelError, match="max_seq_len"):
        build_student(StudentConfig(), teacher, 97, 0, 512)


def test_teacher_loading_errors(tmp_path, teacher_dir):
    with pytest.raises(ModelError, match="not a local directory.*never downloads"):
        load_teacher("bert-base-uncased", torch.float32, "sdpa", torch.device("cpu"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="could not be loaded"):
        load_teacher(str(tmp_path), torch.float32, "sdpa", torch.device("cpu"))
    teacher = load_teacher(teacher_dir, torch.float32, "sdpa", torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
