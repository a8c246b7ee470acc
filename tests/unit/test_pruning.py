"""distill-prune in-process (distill/prune/): exactness of the slicing, the importance scores against an independent
computation, the shape and budget rules and their one-line refusals, and what training reads of a pruned student.

Exactness, as issue 26 asks: keeping everything reproduces the teacher's logits bit for bit; pruning heads or MLP neurons
equals the teacher with those units' outputs zeroed by forward hooks (1e-5); pruning hidden channels equals a slicing of
the teacher written here by hand, per family; the scores equal the same statistics computed here from the model's own
hidden states and weights (no hooks)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import tiny_teacher
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from distill.config import LossConfig
from distill.models.families import family_of, submodule
from distill.models.provenance import ProvenanceError, read_provenance
from distill.objective.losses import LossContext, ModelOutputs, cosine_hidden_loss
from distill.objective.objective import Objective
from distill.prune.importance import calibrate, load_scores, save_scores, summary
from distill.prune.shape import ParameterCount, budget_shape, choose_keep, choose_layers, describe_teacher, resolve_shape
from distill.prune.slice import PruneError, layouts
from distill.prune.student import build_student, count_parameters, fill, pruned_config
from kd_common.config import ConfigError


class Rows:
    """The TokenSequences interface over random rows of different lengths (so batches are padded)."""

    def __init__(self, count: int, vocab: int, seed: int = 0, shortest: int = 5, longest: int = 20):
        rng = np.random.default_rng(seed)
        self.data = [rng.integers(3, vocab, size=int(rng.integers(shortest, longest))) for _ in range(count)]
        self.lengths = np.array([len(d) for d in self.data], dtype=np.int32)

    def rows(self, indices):
        return [(self.data[i], None) for i in indices]


def masked_lm(model_type: str, **over):
    shapes = {
        "bert": dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=3),
        "roberta": dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=3, max_position_embeddings=66),
        "distilbert": dict(dim=64, n_heads=4, hidden_dim=128, n_layers=3),
    }
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(model_type, vocab_size=120, **{**shapes[model_type], **over}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms and biases away from 1 and 0: a wrong slice shows
    return model.eval()


def teacher_of(name: str):
    if name in ("bert", "roberta", "distilbert"):
        return masked_lm(name)
    model = tiny_teacher(name, layers=3, **({"mlp_only_layers": [2]} if name == "qwen3_moe" else {}))  # a dense layer among experts
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def prune(model, shape_keys: dict, scores=None, layers=None):
    """(student, keep, shape) for the asked shape, units chosen by `scores` (random ones by default)."""
    family = family_of(model)
    teacher = describe_teacher(model, family)
    shape = resolve_shape(teacher, shape_keys)
    if scores is None:
        g = torch.Generator().manual_seed(1)
        t = teacher.shape
        scores = {
            "layers": torch.rand(t.num_layers, generator=g, dtype=torch.float64),
            "hidden": torch.rand(t.hidden_size, generator=g, dtype=torch.float64),
            "heads": torch.rand(t.num_layers, t.num_heads, generator=g, dtype=torch.float64),
            "kv_groups": torch.rand(t.num_layers, t.num_kv_heads, generator=g, dtype=torch.float64),
            "neurons": torch.rand(t.num_layers, t.intermediate_size or 1, generator=g, dtype=torch.float64),
        }
        if t.num_experts:
            scores["experts"] = torch.rand(t.num_layers, t.num_experts, generator=g, dtype=torch.float64)
            for i, lay in enumerate(layouts(model, family)):
                scores["neurons" if lay.moe else "experts"][i] = float("nan")
    layers = layers if layers is not None else choose_layers(scores, shape.num_layers, "cosine")
    keep = choose_keep(scores, teacher, shape, layers)
    student = build_student(model, family, pruned_config(model.config, family, teacher, shape, layers))
    fill(model, student, family, teacher, keep)
    return student, keep, shape


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


IDS = torch.tensor([[5, 17, 33, 8, 91, 4, 60, 12, 7, 3], [9, 44, 2, 81, 16, 5, 70, 3, 3, 3]])
MASK = torch.tensor([[1] * 10, [1] * 7 + [0] * 3])
FAMILIES = [
    "bert",
    "roberta",
    "distilbert",
    "gpt2",
    "llama",
    "mistral",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "phi3",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "granite",
]


# ------------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("name", FAMILIES)
def test_keeping_everything_reproduces_the_teacher_bit_for_bit(name):
    teacher = teacher_of(name)
    student, keep, shape = prune(teacher, {})
    assert shape == describe_teacher(teacher, family_of(teacher)).shape and keep.layers == (0, 1, 2)
    assert count_parameters(student) == count_parameters(teacher)
    assert torch.equal(logits(student, IDS, MASK), logits(teacher, IDS, MASK))


# the modules whose input is the heads' outputs / the MLP neurons, named here per family (not through blocks.py)
GENERIC = ["llama", "mistral", "qwen3", "phi3", "gemma2", "gemma3_text", "granite"]
HEADS_OUT = {name: "self_attn.o_proj" for name in GENERIC}
NEURONS_IN = {
    "bert": "output.dense",
    "roberta": "output.dense",
    "distilbert": "ffn.lin2",
    "gpt2": "mlp.c_proj",
    **{name: "mlp.down_proj" for name in GENERIC},
}


def zeroing(teacher, keep, heads: bool):
    """Forward pre-hooks on the (unpruned) teacher zeroing the outputs of the heads / neurons `keep` drops."""
    family = family_of(teacher)
    name = family.name
    hd = (
        teacher.config.head_dim
        if getattr(teacher.config, "head_dim", None)
        else teacher.config.hidden_size // teacher.config.num_attention_heads
    )
    handles = []
    for i, block in enumerate(family.layer_list(teacher)):
        lk = keep.per_layer[i]

        def zero_heads(module, args, kept=lk.heads):
            x = args[0].clone()
            view = x.view(*x.shape[:-1], -1, hd)
            view[..., [h for h in range(view.shape[-2]) if h not in kept], :] = 0
            return (x,)

        def zero_neurons(module, args, kept=lk.neurons):
            x = args[0].clone()
            x[..., [n for n in range(x.shape[-1]) if n not in kept]] = 0
            return (x,)

        if heads:
            handles.append(submodule(block, HEADS_OUT[name]).register_forward_pre_hook(zero_heads))
        handles.append(submodule(block, NEURONS_IN[name]).register_forward_pre_hook(zero_neurons))
    return handles


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert", "gpt2", *GENERIC])
def test_pruning_heads_and_neurons_equals_the_teacher_with_them_zeroed(name):
    teacher = teacher_of(name)
    generic = name in HEADS_OUT
    asked = {"intermediate_size": 40} if not generic else {"intermediate_size": 40, "num_kv_heads": 1}  # one GQA group of two dropped
    student, keep, shape = prune(teacher, asked)
    assert shape.hidden_size == 64 and len(keep.per_layer[0].neurons) == 40
    if generic:
        assert shape.num_heads == 2 and len(keep.per_layer[0].heads) == 2
    handles = zeroing(teacher, keep, heads=generic)
    try:
        expected = logits(teacher, IDS, MASK)
    finally:
        for h in handles:
            h.remove()
    got = logits(student, IDS, MASK)
    assert not torch.allclose(expected, logits(teacher, IDS, MASK), atol=1e-3)  # the zeroed units mattered
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def by_hand(name: str, teacher, keep):
    """The pruned student's state dict, sliced here by hand per family (hidden channels C, heads' rows R, neurons N)."""
    C = torch.tensor(keep.hidden)
    cfg = teacher.config
    out = {}
    for key, v in teacher.state_dict().items():
        parts = key.split(".")
        layer = None
        for i, part in enumerate(parts):
            if part.isdigit():
                layer, parts = int(part), parts[:i] + ["{}"] + parts[i + 1 :]
                break
        if layer is not None and layer not in keep.layers:
            continue
        lk = keep.per_layer[keep.layers.index(layer)] if layer is not None else None
        if lk is not None:
            hd = 16
            R = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in lk.heads])
            RK = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in lk.kv_heads])
            N = torch.tensor(lk.neurons)
            key = key.replace(f".{layer}.", f".{keep.layers.index(layer)}.")
        name_ = ".".join(parts)
        if name == "llama":
            if key in ("model.embed_tokens.weight", "lm_head.weight"):
                v = v[:, C]
            elif name_.endswith("q_proj.weight"):
                v = v[R][:, C]
            elif name_.endswith(("k_proj.weight", "v_proj.weight")):
                v = v[RK][:, C]
            elif name_.endswith("o_proj.weight"):
                v = v[C][:, R]
            elif name_.endswith(("gate_proj.weight", "up_proj.weight")):
                v = v[N][:, C]
            elif name_.endswith("down_proj.weight"):
                v = v[C][:, N]
            elif "norm" in key:
                v = v[C]
        elif name == "bert":
            if "embeddings" in key and key.endswith("_embeddings.weight"):
                v = v[:, C]
            elif "LayerNorm" in key:
                v = v[C]
            elif name_.endswith(("query.weight", "key.weight", "value.weight")):
                v = v[R][:, C]
            elif name_.endswith(("query.bias", "key.bias", "value.bias")):
                v = v[R]
            elif name_.endswith("attention.output.dense.weight"):
                v = v[C][:, R]
            elif name_.endswith("intermediate.dense.weight"):
                v = v[N][:, C]
            elif name_.endswith("intermediate.dense.bias"):
                v = v[N]
            elif name_.endswith("output.dense.weight"):
                v = v[C][:, N]
            elif name_.endswith("output.dense.bias"):
                v = v[C]
            elif key == "cls.predictions.transform.dense.weight":
                v = v[C][:, C]
            elif key == "cls.predictions.transform.dense.bias":
                v = v[C]
            elif key == "cls.predictions.decoder.weight":
                v = v[:, C]
        elif name == "gpt2":
            H = cfg.n_embd
            if key in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"):
                v = v[:, C]
            elif ".ln_" in key or key.startswith("transformer.ln_f"):
                v = v[C]
            elif name_.endswith("attn.c_attn.weight"):
                v = v[C][:, torch.cat([R, H + R, 2 * H + R])]
            elif name_.endswith("attn.c_attn.bias"):
                v = v[torch.cat([R, H + R, 2 * H + R])]
            elif name_.endswith("attn.c_proj.weight"):
                v = v[R][:, C]
            elif name_.endswith(("attn.c_proj.bias", "mlp.c_proj.bias")):
                v = v[C]
            elif name_.endswith("mlp.c_fc.weight"):
                v = v[C][:, N]
            elif name_.endswith("mlp.c_fc.bias"):
                v = v[N]
            elif name_.endswith("mlp.c_proj.weight"):
                v = v[N][:, C]
        out[key] = v
    return out


@pytest.mark.parametrize(
    "name, asked",
    [
        ("llama", {"hidden_size": 40, "num_kv_heads": 1, "intermediate_size": 48, "num_layers": 2}),
        ("bert", {"num_heads": 3, "intermediate_size": 48, "num_layers": 2}),  # hidden 48 = 3 heads x 16
        ("gpt2", {"hidden_size": 32, "intermediate_size": 100, "num_layers": 2}),  # 2 heads
    ],
)
def test_pruning_hidden_channels_equals_a_slicing_by_hand(name, asked):
    teacher = teacher_of(name)
    student, keep, shape = prune(teacher, asked)
    assert len(keep.hidden) == shape.hidden_size < 64
    reference = build_student(teacher, family_of(teacher), student.config)
    missing, unexpected = reference.load_state_dict(by_hand(name, teacher, keep), strict=False)
    assert not unexpected and all("position_ids" in k or "token_type_ids" in k for k in missing)
    reference.tie_weights()
    assert torch.equal(logits(student, IDS, MASK), logits(reference, IDS, MASK))
    if name == "llama":  # the norms over the kept channels are a different function of them than over all: no zeroing equivalence
        assert student.config.head_dim == 16 and student.config.hidden_size == 40


# ------------------------------------------------------------------------------------------------
# Importance scores against an independent computation (BERT: every statistic from its hidden states and weights)


def masked_mean(values, mask):
    m = mask.to(values.dtype)
    while m.dim() < values.dim():
        m = m.unsqueeze(-1)
    return (values * m).sum(1) / m.sum(1)


def independent_bert_statistics(model, ids, mask):
    """Per-sequence statistics of issue 26 for a BERT, computed from output_hidden_states and the layers' weights."""
    cfg = model.config
    heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        states = model.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        stats = {"layers": [], "heads": [], "neurons": []}
        hidden = masked_mean(states[0].abs(), mask)  # the embeddings' LayerNorm
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for i, layer in enumerate(model.bert.encoder.layer):
            x, y = states[i], states[i + 1]
            stats["layers"].append(masked_mean(1 - F.cosine_similarity(x, y, dim=-1), mask))
            att = layer.attention

            def split(t):
                return t.view(*t.shape[:2], heads, hd).transpose(1, 2)

            q, k, v = split(att.self.query(x)), split(att.self.key(x)), split(att.self.value(x))
            probs = ((q @ k.transpose(-1, -2)) / math.sqrt(hd) + additive).softmax(-1)
            context = (probs @ v).transpose(1, 2)  # (B, T, heads, hd)
            stats["heads"].append(masked_mean(context.norm(dim=-1), mask))
            attended = att.output.LayerNorm(att.output.dense(context.reshape(*context.shape[:2], -1)) + x)
            inner = layer.intermediate(attended)
            stats["neurons"].append(masked_mean(inner.abs(), mask))
            hidden = hidden + masked_mean(attended.abs(), mask) + masked_mean(y.abs(), mask)
        stats = {k: torch.stack(v, 1) for k, v in stats.items()}
        stats["hidden"] = hidden
    return stats


@pytest.mark.parametrize("aggregation", ["l2", "mean"])
def test_scores_equal_an_independent_computation(aggregation):
    model = masked_lm("bert")
    family = family_of(model)
    rows = Rows(11, 120)
    indices = np.arange(11)
    scores, timing = calibrate(model, family, describe_teacher(model, family).geometry, rows, indices, 4, 0, aggregation, progress=False)
    assert timing["sequences"] == 11 and timing["tokens"] == int(rows.lengths.sum())
    per_sequence = {k: [] for k in ("layers", "heads", "neurons", "hidden")}
    for i in indices:  # one sequence at a time: no padding here, so the padding of the calibration batches must not matter
        ids = torch.as_tensor(rows.data[i])[None]
        for k, v in independent_bert_statistics(model, ids, torch.ones_like(ids)).items():
            per_sequence[k].append(v[0].double())
    for name, values in per_sequence.items():
        stacked = torch.stack(values)
        expected = stacked.pow(2).sum(0).sqrt() if aggregation == "l2" else stacked.mean(0)
        torch.testing.assert_close(scores[name], expected, rtol=2e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(scores["kv_groups"], scores["heads"])  # multi-head attention: a group is a head


def test_router_usage_equals_the_models_own_router_logits():
    model = teacher_of("qwen3_moe")
    family = family_of(model)
    rows = Rows(6, 200, seed=3)
    scores, _ = calibrate(model, family, describe_teacher(model, family).geometry, rows, np.arange(6), 3, 0, "mean", progress=False)
    moe = [i for i, lay in enumerate(layouts(model, family)) if lay.moe]
    usage = []
    for seq in rows.data:
        ids = torch.as_tensor(seq)[None]
        with torch.no_grad():
            router = model(input_ids=ids, output_router_logits=True).router_logits
        per_layer = []
        for r in router:
            probs = r.float().softmax(-1)
            top, index = probs.topk(model.config.num_experts_per_tok, dim=-1)
            per_layer.append(torch.zeros_like(probs).scatter_(-1, index, top).mean(0))
        usage.append(torch.stack(per_layer).double())
    torch.testing.assert_close(scores["experts"][moe], torch.stack(usage).mean(0), rtol=1e-5, atol=1e-7)
    assert torch.isnan(scores["experts"][[i for i in range(3) if i not in moe]]).all()
    assert torch.isnan(scores["neurons"][moe]).all() and not torch.isnan(scores["neurons"][[i for i in range(3) if i not in moe]]).any()


def test_the_most_important_units_are_kept_and_experts_go_whole():
    model = teacher_of("qwen3_moe")
    family = family_of(model)
    scores, _ = calibrate(model, family, describe_teacher(model, family).geometry, Rows(6, 200), np.arange(6), 3, 0, progress=False)
    student, keep, shape = prune(model, {"num_experts": 2, "num_layers": 2, "hidden_size": 48}, scores=scores)
    assert student.config.num_experts == 2 and shape.num_layers == 2
    assert keep.layers == tuple(sorted(torch.argsort(scores["layers"], descending=True)[:2].tolist()))
    assert keep.hidden == tuple(sorted(torch.argsort(scores["hidden"], descending=True)[:48].tolist()))
    for layer, lk in zip(keep.layers, keep.per_layer):
        if lk.experts is not None:
            assert lk.experts == tuple(sorted(torch.argsort(scores["experts"][layer], descending=True)[:2].tolist()))
    assert logits(student, IDS, MASK).isfinite().all()


def test_layer_drop_kl_is_zero_for_a_block_that_changes_nothing():
    model = masked_lm("bert")
    family = family_of(model)
    with torch.no_grad():  # layer 1 adds nothing and its LayerNorms (plain) see layer 0's plainly normalised output: a no-op
        layer = model.bert.encoder.layer[1]
        for linear in (layer.attention.output.dense, layer.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
        for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm, model.bert.encoder.layer[0].output.LayerNorm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    rows = Rows(4, 120)
    geometry = describe_teacher(model, family).geometry
    scores, timing = calibrate(model, family, geometry, rows, np.arange(4), 2, 0, "mean", drop_kl=True, progress=False)
    assert float(scores["layer_drop_kl"][1]) < 1e-6 < float(scores["layer_drop_kl"][0])
    assert float(scores["layers"][1]) < 1e-5 and timing["layer_drop_kl"]
    assert choose_layers(scores, 2, "drop_kl") == sorted(torch.argsort(scores["layer_drop_kl"], descending=True)[:2].tolist())


def test_scores_file_round_trip_and_summary(tmp_path):
    model = teacher_of("llama")
    family = family_of(model)
    scores, timing = calibrate(model, family, describe_teacher(model, family).geometry, Rows(5, 200), np.arange(5), 5, 0, progress=False)
    path = str(tmp_path / "importance.safetensors")
    save_scores(path, scores, {"teacher_sha256": "abc", "aggregation": "l2", **timing})
    loaded, meta = load_scores(path)
    assert meta["teacher_sha256"] == "abc" and meta["seconds"] == timing["seconds"] and meta["sequences"] == 5
    assert all(torch.equal(loaded[k], scores[k]) for k in scores)
    text = summary(scores, {"teacher": "t", **timing})
    weakest = int(torch.argmin(scores["heads"][0]))
    assert "layer 0 (block importance" in text and f"heads: weakest h{weakest} " in text and "kv groups:" in text


# ------------------------------------------------------------------------------------------------
# Shapes, budgets and their refusals


def teacher_shape(name):
    model = teacher_of(name)
    return model, describe_teacher(model, family_of(model))


@pytest.mark.parametrize(
    "name, asked, message",
    [
        ("llama", {"num_heads": 3}, "num_heads=3 is not a whole number of the teacher's key/value groups (2 query heads each"),
        ("llama", {"num_heads": 4, "num_kv_heads": 1}, "num_heads must be num_kv_heads x 2 = 2"),
        ("bert", {"hidden_size": 40}, "hidden_size must be a multiple of 16"),
        ("gpt2", {"hidden_size": 48, "num_heads": 2}, "hidden_size must be num_heads x 16 = 32"),
        ("bert", {"num_kv_heads": 2, "num_heads": 3}, "one key/value head per query head"),
        ("qwen3_moe", {"num_experts": 1}, "fewer than the 2 experts the router picks per token"),
        ("mixtral", {"intermediate_size": 64}, "has no dense MLP (its MLPs are experts"),
        ("llama", {"num_experts": 2}, "has no mixture of experts"),
        ("llama", {"num_layers": 5}, "num_layers=5 is outside 1..3"),
    ],
)
def test_shapes_the_heads_groups_or_experts_cannot_make_are_refused_in_one_line(name, asked, message):
    _, teacher = teacher_shape(name)
    with pytest.raises(PruneError, match=None) as info:
        resolve_shape(teacher, asked)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_derived_shapes():
    _, llama = teacher_shape("llama")
    assert resolve_shape(llama, {"num_heads": 2}).num_kv_heads == 1 and resolve_shape(llama, {"num_kv_heads": 1}).num_heads == 2
    _, bert = teacher_shape("bert")
    assert resolve_shape(bert, {"hidden_size": 32}).num_heads == 2 and resolve_shape(bert, {"num_heads": 3}).hidden_size == 48


def test_a_budget_is_met_by_the_stated_rules_and_counted_exactly():
    model, teacher = teacher_shape("bert")
    family = family_of(model)
    count = ParameterCount(model, family, teacher.geometry)
    assert count.teacher == count_parameters(model)
    shape, params = budget_shape(teacher, count, lambda d: list(range(d)), 0.6, {}, multiple=64, tolerance=0.1)
    assert shape.num_layers == 3  # width first: depth is kept while the widths stay >= half the teacher's
    assert 0.9 * 0.6 * count.teacher <= params <= 0.6 * count.teacher
    student, _, _ = prune(model, {k: getattr(shape, k) for k in ("num_layers", "hidden_size", "intermediate_size")})
    assert count_parameters(student) == params
    deep, p_deep = budget_shape(teacher, count, lambda d: list(range(d)), 0.2, {}, multiple=64, tolerance=0.2)
    assert deep.num_layers < 3 and p_deep <= 0.2 * count.teacher  # a small budget: layers go once widths reach half
    fixed, _ = budget_shape(teacher, count, lambda d: list(range(d)), 0.5, {"num_layers": 2}, multiple=64, tolerance=0.2)
    assert fixed.num_layers == 2


def test_budget_refusals():
    model, teacher = teacher_shape("llama")
    count = ParameterCount(model, family_of(model), teacher.geometry)
    with pytest.raises(PruneError, match=r"below the smallest student this teacher makes \(1 layers") as small:
        budget_shape(teacher, count, lambda d: list(range(d)), 0.01, {})
    with pytest.raises(PruneError, match="no shape the teacher's heads and widths divide into comes within 5% of params=0.6") as gap:
        budget_shape(teacher, count, lambda d: list(range(d)), 0.6, {})
    assert "\n" not in str(small.value) + str(gap.value)


def test_a_family_the_pruner_cannot_slice_is_refused_in_one_line():
    model = tiny_teacher("deepseek_v3", layers=2)  # latent attention: no q/k/v projections to cut by heads
    with pytest.raises(PruneError, match="cannot prune a deepseek_v3 model: .* has no q/k/v projections"):
        layouts(model, family_of(model))


# ------------------------------------------------------------------------------------------------
# What training reads of a pruned student


def provenance_dir(tmp_path, layers, channels, teacher_shape, student_layers):
    record = {
        "format": "distill-prune",
        "version": 1,
        "teacher": {"path": "/t", "model_type": "bert", "content_sha256": "x", "files": {}},
        "shape": {"teacher": teacher_shape, "student": {"num_layers": student_layers}},
        "kept": {"layers": layers, "hidden_channels": channels, "per_layer": []},
    }
    (tmp_path / "prune.json").write_text(json.dumps(record))
    return read_provenance(str(tmp_path))


def test_layer_wise_losses_pair_student_layers_with_the_teacher_layers_they_were_cut_from(tmp_path):
    teacher = AutoConfig.for_model("bert", hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=6)
    student = AutoConfig.for_model("bert", hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=3)
    channels = list(range(1, 64, 2))
    prov = provenance_dir(tmp_path, [0, 3, 4], channels, {"num_layers": 6, "hidden_size": 64}, 3)
    weights = {"pkd": 1.0, "cos": 1.0, "tinybert_hidden": 1.0}
    objective = Objective(LossConfig(weights=weights, pkd_include_last=True), teacher, student, provenance=prov)
    assert objective.ctx.layer_map == (0, 3, 4) and objective.ctx.teacher_channels == tuple(channels)
    assert Objective(
        LossConfig(weights={"tinybert_hidden": 1.0}, layer_map="uniform"), teacher, student, provenance=prov
    ).ctx.layer_map == (
        1,
        3,
        5,
    )
    with pytest.raises(ConfigError, match="loss 'cos' compares hidden states directly and needs the teacher's width 64"):
        Objective(LossConfig(weights={"cos": 1.0}), teacher, student)  # the same student without its provenance
    with pytest.raises(ConfigError, match="loss.layer_map=pruned pairs each student layer with the teacher layer it was cut from"):
        Objective(LossConfig(weights={"tinybert_hidden": 1.0}, layer_map="pruned"), teacher, student)
    other = AutoConfig.for_model("bert", hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=8)
    assert Objective(LossConfig(weights={"tinybert_hidden": 1.0}), other, student, provenance=prov).ctx.layer_map == (
        2,
        4,
        7,
    )  # not its teacher's shape: uniform


def test_cos_of_a_width_pruned_student_compares_the_kept_channels():
    teacher_hidden = torch.randn(2, 5, 8)
    channels = (1, 4, 6)
    student_hidden = teacher_hidden[..., list(channels)] * 3.0  # the same direction on the kept channels
    ctx = LossContext(cfg=LossConfig(weights={"cos": 1.0}), teacher_channels=channels)
    batch = type("B", (), {"token_positions": None, "attention_mask": torch.ones(2, 5)})()
    loss = cosine_hidden_loss(ModelOutputs(hidden=teacher_hidden), ModelOutputs(hidden=student_hidden), batch, ctx)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_a_damaged_provenance_file_is_one_line(tmp_path):
    (tmp_path / "prune.json").write_text('{"format": "distill-prune", "version": 1, "kept": {"layers": [0, -1]}}')
    with pytest.raises(ProvenanceError, match="is not a readable distill-prune provenance file") as info:
        read_provenance(str(tmp_path))
    assert "\n" not in str(info.value)
    assert read_provenance(str(tmp_path / "nothing")) is None


def test_gqa_causal_student_keeps_head_dim_and_runs():
    teacher = teacher_of("qwen3")
    student, keep, shape = prune(teacher, {"num_kv_heads": 1, "hidden_size": 32, "intermediate_size": 56, "num_layers": 2})
    assert student.config.head_dim == 16 and student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 1
    assert student.model.layers[0].self_attn.q_norm.weight.shape == (16,)  # a norm over one head is the teacher's
    assert keep.per_layer[0].heads in ((0, 1), (2, 3))
    assert logits(student, IDS, MASK).shape == (2, 10, 301)


def test_pruned_config_keeps_the_teachers_settings():
    teacher = tiny_teacher("gemma3_text", layers=4)
    family = family_of(teacher)
    t = describe_teacher(teacher, family)
    config = pruned_config(teacher.config, family, t, resolve_shape(t, {"num_layers": 2}), [1, 2])
    assert config.layer_types == [teacher.config.layer_types[1], teacher.config.layer_types[2]]
    assert config.final_logit_softcapping == teacher.config.final_logit_softcapping and config.head_dim == 16
    assert isinstance(AutoModelForCausalLM.from_config(config), type(teacher))
