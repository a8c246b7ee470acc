"""Student construction and initialisation from teacher layers; logits only where needed."""

import pytest
import torch

from distill.config import StudentConfig
from distill.models.build import (
    ModelError,
    apply_mlm_head,
    build_student,
    default_init_layers,
    init_student_from_teacher,
    load_teacher,
    mlm_forward,
)


def _bert_teacher(layers=12, hidden=32, heads=4, vocab=97, seed=0, kind="bert"):
    from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    if kind == "roberta":
        cfg = RobertaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=66,
            pad_token_id=1,
        )
        model = RobertaForMaskedLM(cfg)
    else:
        cfg = BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=64,
            pad_token_id=0,
        )
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
        for t_name, s_name in [
            ("attention.self.query", "attention.q_lin"),
            ("attention.self.key", "attention.k_lin"),
            ("attention.self.value", "attention.v_lin"),
            ("attention.output.dense", "attention.out_lin"),
            ("attention.output.LayerNorm", "sa_layer_norm"),
            ("intermediate.dense", "ffn.lin1"),
            ("output.dense", "ffn.lin2"),
            ("output.LayerNorm", "output_layer_norm"),
        ]:
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


# ----------------------------------------------------------------------------------------------
# Layer mapping, attention capture, projections, GPT-2 students

from distill.models.build import AttentionCapture, StudentForDistillation, model_forward  # noqa: E402
from distill.models.layer_map import LayerMapError, resolve_layers  # noqa: E402
from distill.objective.losses import Needs  # noqa: E402


def test_layer_mapping_strategies():
    assert resolve_layers("spread", 12, 6) == [0, 2, 4, 7, 9, 11]
    assert resolve_layers("every_other", 12, 6) == [0, 2, 4, 6, 8, 10]
    assert resolve_layers("first", 12, 6) == [0, 1, 2, 3, 4, 5]
    assert resolve_layers("last", 12, 6) == [6, 7, 8, 9, 10, 11]  # PKD-Last (1-based 7..12)
    assert resolve_layers("uniform", 12, 6) == [1, 3, 5, 7, 9, 11]  # PKD-Skip (1-based 2,4,..,12)
    assert resolve_layers("uniform", 12, 4) == [2, 5, 8, 11]  # TinyBERT g(m) = 3m
    assert resolve_layers("uniform", 24, 6) == [3, 7, 11, 15, 19, 23]
    assert resolve_layers("uniform", 4, 2, [3, 0]) == [3, 0]
    with pytest.raises(LayerMapError, match="lists 1 teacher layers for a 2-layer"):
        resolve_layers("uniform", 4, 2, [1])
    with pytest.raises(LayerMapError, match="out of range"):
        resolve_layers("uniform", 4, 2, [1, 4])
    with pytest.raises(LayerMapError, match="every_other needs a teacher with at least 7"):
        resolve_layers("every_other", 6, 4)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "gpt2"])
def test_captured_qkv_give_the_models_own_attention_probabilities(kind):
    """softmax(q k^T / sqrt(d) + mask) from the hooks == the eager kernel's attention probabilities."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if kind == "bert":
        model = _bert_teacher(layers=3)
    elif kind == "distilbert":
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, hidden_dim=64))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64))
    model.config._attn_implementation = "eager"
    model.eval()
    ids = torch.randint(5, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    capture = AttentionCapture(model, [1, -1])
    out = model_forward(model, ids, mask, None, Needs(attention_layers=(1, 2)), capture)
    reference = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    for layer in (1, 2):
        q, k, v = out.attention[layer]
        assert q.shape == (2, 4, 9, 8) and v.shape == (2, 4, 9, 8)
        scores = q @ k.transpose(-1, -2) / 8**0.5
        allowed = mask.bool()[:, None, None, :]
        if kind == "gpt2":
            allowed = allowed & torch.ones(9, 9, dtype=torch.bool).tril()
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        real = mask.bool()
        assert torch.allclose(probs.transpose(1, 2)[real], reference[layer].transpose(1, 2)[real], atol=1e-5)
    assert out.causal == (kind == "gpt2")
    capture.remove()


@pytest.mark.parametrize("projection,count", [("shared", 1), ("separate", 2), ("per_layer", 3)])
def test_projections_live_in_the_training_wrapper(projection, count):
    teacher = _bert_teacher(layers=4)
    student = build_student(
        StudentConfig(architecture="bert", init="random", hidden_size=16, num_heads=4, intermediate_size=32, num_layers=2),
        teacher,
        97,
        0,
        64,
    )
    wrapper = StudentForDistillation(student, Needs(projected=True, attention_layers=(0, 1)), projection, target_width=32).eval()
    assert len(wrapper.projections) == count
    names = [n for n, _ in wrapper.named_parameters()]
    assert sum(n.startswith("projections.") for n in names) == 2 * count and all(n.startswith(("model.", "projections.")) for n in names)
    ids = torch.randint(5, 97, (2, 7))
    out = wrapper.outputs(wrapper(ids, torch.ones_like(ids)))
    assert len(out.projected) == 3 and all(p.shape == (2, 7, 32) for p in out.projected)
    states = model_forward(student, ids, torch.ones_like(ids), None, Needs(hidden_states=True)).hidden_states
    w = wrapper.projections[count - 1]
    assert torch.allclose(out.projected[2], w(states[2]), atol=1e-6)
    assert set(out.attention) == {0, 1}


def test_gpt2_student_from_every_other_teacher_layer():
    from transformers import GPT2Config, GPT2LMHeadModel

    from distill.models.build import init_layers_for

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=4, n_positions=64)).eval()
    cfg = StudentConfig(architecture="gpt2", init_mapping="every_other")
    student = build_student(cfg, teacher, 97, 0, 32)
    assert type(student).__name__ == "GPT2LMHeadModel" and student.config.n_layer == 2 and student.config.n_positions == 64
    layers = init_layers_for(cfg, teacher, 2)
    assert layers == [0, 2]
    init_student_from_teacher(student, teacher, layers)
    t, s = teacher.state_dict(), student.state_dict()
    for s_idx, t_idx in enumerate(layers):
        for name in ("attn.c_attn.weight", "attn.c_proj.bias", "mlp.c_fc.weight", "ln_1.weight", "ln_2.bias"):
            assert torch.equal(s[f"transformer.h.{s_idx}.{name}"], t[f"transformer.h.{t_idx}.{name}"])
    assert torch.equal(s["transformer.wte.weight"], t["transformer.wte.weight"]) and torch.equal(
        s["lm_head.weight"], t["transformer.wte.weight"]
    )
    assert torch.equal(s["transformer.ln_f.weight"], t["transformer.ln_f.weight"])
    ids = torch.randint(5, 97, (2, 8))
    student.eval()
    out = model_forward(student, ids, torch.ones_like(ids), torch.tensor([0, 9]))
    assert torch.allclose(out.logits, student(input_ids=ids).logits.reshape(-1, 97)[[0, 9]], atol=1e-5)


def test_init_mapping_first_and_depth_from_init_layers():
    from distill.models.build import init_layers_for

    teacher = _bert_teacher(layers=6)
    cfg = StudentConfig(init_mapping="first", num_layers=3)
    assert init_layers_for(cfg, teacher, 3) == [0, 1, 2]
    student = build_student(StudentConfig(init_layers=[1, 5]), teacher, 97, 0, 64)
    assert student.config.n_layers == 2


def test_objective_reports_shape_problems_and_skips_logits_nobody_needs():
    from distill.config import ConfigError, LossConfig
    from distill.objective.objective import Objective

    teacher = _bert_teacher(layers=4)
    narrow = build_student(
        StudentConfig(architecture="bert", init="random", hidden_size=16, num_heads=2, intermediate_size=32, num_layers=2),
        teacher,
        97,
        0,
        64,
    )
    with pytest.raises(
        ConfigError,
        match=r"loss 'pkd' compares hidden states directly .* width 32, the student has 16.*"
        r"loss 'tinybert_attn' compares attention head by head .* student.num_heads=4",
    ):
        Objective(LossConfig(weights={"pkd": 1.0, "tinybert_attn": 1.0}), teacher, narrow)
    with pytest.raises(ConfigError, match="loss.layer_map_layers lists 3 teacher layers for a 2-layer student"):
        Objective(LossConfig(weights={"tinybert_hidden": 1.0}, layer_map_layers=[0, 1, 2]), teacher, narrow)
    with pytest.raises(ConfigError, match="attention_teacher_layer=7 is out of range"):
        Objective(LossConfig(weights={"minilm_value": 1.0}, attention_teacher_layer=7), teacher, narrow)
    objective = Objective(LossConfig(weights={"tinybert_emb": 1.0, "tinybert_hidden": 1.0, "ce": 0.0}, layer_map="last"), teacher, narrow)
    assert objective.logits_at is None and not objective.teacher_logits  # no vocabulary projection at all
    assert objective.ctx.layer_map == (2, 3) and objective.capture is None
    assert objective.student_needs.projected and not objective.student_needs.attention_layers
