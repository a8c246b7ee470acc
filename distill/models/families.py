"""Model families: everything the job knows about one kind of Hugging Face model, in one registry entry.

An entry says how to load the family (which auto class), where its parts live (base model, layer list,
q/k/v projections, the head before the vocabulary projection and the projection itself), how to read
its shape from a config, how to build a student config of it, and how a student of it is initialised
from a teacher's layers. `models.py` (forward passes, building, init), `export.py` and `evaluate.py`
only ask the registry; a new family is one `register(Family(...))`.

Students: a family lists the teacher families it can be initialised from (`init_from`). A student of
the teacher's own family copies every weight, with the chosen teacher layers renumbered 0..k-1
(`copy_same_family`); DistilBERT and BERT students of BERT-family teachers use the BERT mapping below.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from distill.model_outputs import ModelShape
from kd_common.errors import UserError


class FamilyError(UserError, ValueError):
    """A model of a family this job does not know, or a teacher/student pairing it cannot build."""


@dataclass(frozen=True)
class Family:
    """One kind of model (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values of this family
    causal: bool  # causal LM (next-token labels, causal attention) or masked LM
    base: str  # attribute of the base model (encoder / decoder stack) inside the LM
    layers: str  # path of the layer list inside the base model
    qkv: tuple[str, ...]  # query/key/value projections inside one layer; one name = a fused qkv projection
    head_transform: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]]  # hidden -> input of the vocabulary projection
    projection: Callable[[nn.Module], nn.Module]  # the vocabulary projection (an nn.Linear: weight (V, H), optional bias)
    shape: Callable[[Any], dict]  # config -> hidden_size, num_heads, num_kv_heads, intermediate_size, num_layers, ...
    student_config: Callable[..., Any]  # (shape dict, vocab, pad id, dropout, teacher config or None) -> a config of this family
    init_from: tuple[str, ...] = ()  # teacher families a student of this family can copy layers from
    rotary: bool = False  # attention scores use rotary positions the captured q/k do not carry
    position_offset: Callable[[Any], int] = field(default=lambda config: 0)  # first usable position row (RoBERTa: pad + 1)

    @property
    def auto_class(self) -> str:
        return "AutoModelForCausalLM" if self.causal else "AutoModelForMaskedLM"

    def base_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base)

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return submodule(self.base_model(model), self.layers)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of `model` for hidden states of shape (..., H)."""
        if self.head_transform is not None:
            hidden = self.head_transform(model, hidden)
        return self.projection(model)(hidden)

    def model_shape(self, config: Any) -> ModelShape:
        s = self.shape(config)
        return ModelShape(hidden_size=s["hidden_size"], num_heads=s["num_heads"], num_layers=s["num_layers"], rotary=self.rotary)


FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    return family


def known_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_of(model_or_config: Any) -> Family:
    """The family of a model or config; a one-line FamilyError for any other model type."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise FamilyError(
            f"model type {model_type!r} is not supported here (supported: {', '.join(known_model_types())}); "
            f"use a checkpoint of one of these families"
        )
    return _BY_MODEL_TYPE[model_type]


def submodule(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


# ------------------------------------------------------------------------------------------------
# BERT family (BERT, RoBERTa, XLM-R, CamemBERT) and DistilBERT


def _bert_shape(c) -> dict:
    offset = _roberta_offset(c) if c.model_type in ROBERTA_TYPES else 0
    return {
        "hidden_size": c.hidden_size,
        "num_heads": c.num_attention_heads,
        "num_kv_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "num_layers": c.num_hidden_layers,
        "max_position_embeddings": c.max_position_embeddings - offset,
        "activation": c.hidden_act,
        "vocab_size": c.vocab_size,
    }


def _roberta_offset(c) -> int:
    return c.pad_token_id + 1


def _bert_student_config(shape: dict, vocab_size: int, pad_token_id: int, dropout: float, teacher_config: Any = None):
    from transformers import BertConfig  # transformers: not at start-up

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        intermediate_size=shape["intermediate_size"],
        max_position_embeddings=shape["max_position_embeddings"],
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        hidden_act=shape.get("activation", "gelu"),
        pad_token_id=pad_token_id,
    )


def _distilbert_shape(c) -> dict:
    return {
        "hidden_size": c.dim,
        "num_heads": c.n_heads,
        "num_kv_heads": c.n_heads,
        "intermediate_size": c.hidden_dim,
        "num_layers": c.n_layers,
        "max_position_embeddings": c.max_position_embeddings,
        "activation": c.activation,
        "vocab_size": c.vocab_size,
    }


def _distilbert_student_config(shape: dict, vocab_size: int, pad_token_id: int, dropout: float, teacher_config: Any = None):
    from transformers import DistilBertConfig  # transformers: not at start-up

    activation = shape.get("activation", "gelu")
    if activation not in ("gelu", "relu"):
        raise FamilyError(f"DistilBERT supports gelu/relu activations, the teacher uses {activation!r}; use student.architecture=bert")
    return DistilBertConfig(
        vocab_size=vocab_size,
        dim=shape["hidden_size"],
        n_layers=shape["num_layers"],
        n_heads=shape["num_heads"],
        hidden_dim=shape["intermediate_size"],
        max_position_embeddings=shape["max_position_embeddings"],
        dropout=dropout,
        attention_dropout=dropout,
        activation=activation,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
    )


def _distilbert_transform(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))


ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
_BERT_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")

BERT = register(
    Family(
        name="bert",
        model_types=("bert",),
        causal=False,
        base="bert",
        layers="encoder.layer",
        qkv=_BERT_QKV,
        head_transform=lambda m, h: m.cls.predictions.transform(h),
        projection=lambda m: m.cls.predictions.decoder,
        shape=_bert_shape,
        student_config=_bert_student_config,
        init_from=("bert", "roberta"),
    )
)
ROBERTA = register(
    Family(
        name="roberta",
        model_types=ROBERTA_TYPES,
        causal=False,
        base="roberta",
        layers="encoder.layer",
        qkv=_BERT_QKV,
        head_transform=lambda m, h: m.lm_head.layer_norm(torch.nn.functional.gelu(m.lm_head.dense(h))),
        projection=lambda m: m.lm_head.decoder,
        shape=_bert_shape,
        student_config=_bert_student_config,
        position_offset=_roberta_offset,
    )
)
DISTILBERT = register(
    Family(
        name="distilbert",
        model_types=("distilbert",),
        causal=False,
        base="distilbert",
        layers="transformer.layer",
        qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        head_transform=_distilbert_transform,
        projection=lambda m: m.vocab_projector,
        shape=_distilbert_shape,
        student_config=_distilbert_student_config,
        init_from=("bert", "roberta"),
    )
)


# ------------------------------------------------------------------------------------------------
# GPT-2


def _gpt2_shape(c) -> dict:
    return {
        "hidden_size": c.n_embd,
        "num_heads": c.n_head,
        "num_kv_heads": c.n_head,
        "intermediate_size": c.n_inner or 4 * c.n_embd,
        "num_layers": c.n_layer,
        "max_position_embeddings": c.n_positions,
        "activation": c.activation_function,
        "vocab_size": c.vocab_size,
    }


def _gpt2_student_config(shape: dict, vocab_size: int, pad_token_id: int, dropout: float, teacher_config: Any = None):
    from transformers import GPT2Config  # transformers: not at start-up

    t = teacher_config
    return GPT2Config(
        vocab_size=vocab_size,
        n_embd=shape["hidden_size"],
        n_layer=shape["num_layers"],
        n_head=shape["num_heads"],
        n_inner=shape["intermediate_size"],
        n_positions=shape["max_position_embeddings"],
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        activation_function=shape.get("activation", "gelu_new") if t is not None else "gelu_new",
        bos_token_id=t.bos_token_id if t is not None else pad_token_id,
        eos_token_id=t.eos_token_id if t is not None else pad_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
    )


GPT2 = register(
    Family(
        name="gpt2",
        model_types=("gpt2",),
        causal=True,
        base="transformer",
        layers="h",
        qkv=("attn.c_attn",),
        head_transform=None,
        projection=lambda m: m.lm_head,
        shape=_gpt2_shape,
        student_config=_gpt2_student_config,
        init_from=("gpt2",),
    )
)


# ------------------------------------------------------------------------------------------------
# Decoder LLMs: Llama, Mistral, Qwen2, Qwen3 (one layout: model.layers[i].self_attn.{q,k,v}_proj, lm_head)


def _decoder_shape(c) -> dict:
    return {
        "hidden_size": c.hidden_size,
        "num_heads": c.num_attention_heads,
        "num_kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "num_layers": c.num_hidden_layers,
        "max_position_embeddings": c.max_position_embeddings,
        "activation": c.hidden_act,
        "vocab_size": c.vocab_size,
        "head_dim": getattr(c, "head_dim", None),
    }


def _decoder_student_config(model_type: str):
    """A student config of a decoder family: the teacher's config (positions, rope, norms, vocabulary, tying) with the
    student's depth and widths; without a teacher, the family's defaults with the student's shape."""

    def build(shape: dict, vocab_size: int, pad_token_id: int, dropout: float, teacher_config: Any = None):
        from transformers import AutoConfig  # transformers: not at start-up

        values = teacher_config.to_dict() if teacher_config is not None else {}
        for key in ("layer_types", "architectures", "_name_or_path", "transformers_version", "model_type", "dtype", "torch_dtype"):
            values.pop(key, None)  # per-layer lists are rebuilt for the student's depth
        t_heads, t_hidden = values.get("num_attention_heads"), values.get("hidden_size")
        derived_head_dim = t_heads and t_hidden and values.get("head_dim") in (None, t_hidden // t_heads)
        values.update(
            vocab_size=vocab_size,
            hidden_size=shape["hidden_size"],
            num_hidden_layers=shape["num_layers"],
            num_attention_heads=shape["num_heads"],
            num_key_value_heads=shape.get("num_kv_heads") or shape["num_heads"],
            intermediate_size=shape["intermediate_size"],
            max_position_embeddings=shape["max_position_embeddings"],
            attention_dropout=dropout,
        )
        if teacher_config is None or derived_head_dim:
            values["head_dim"] = shape["hidden_size"] // shape["num_heads"]
        if teacher_config is None:
            values.update(pad_token_id=pad_token_id, tie_word_embeddings=True)
        if values["num_attention_heads"] % values["num_key_value_heads"]:
            raise FamilyError(
                f"student has {values['num_attention_heads']} attention heads and {values['num_key_value_heads']} key/value "
                f"heads; the heads must be a multiple of the key/value heads (set student.num_kv_heads)"
            )
        return AutoConfig.for_model(model_type, **values)

    return build


def _decoder(name: str) -> Family:
    return register(
        Family(
            name=name,
            model_types=(name,),
            causal=True,
            base="model",
            layers="layers",
            qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            head_transform=None,
            projection=lambda m: m.lm_head,
            shape=_decoder_shape,
            student_config=_decoder_student_config(name),
            init_from=(name,),
            rotary=True,
        )
    )


LLAMA, MISTRAL, QWEN2, QWEN3 = (_decoder(name) for name in ("llama", "mistral", "qwen2", "qwen3"))


# ------------------------------------------------------------------------------------------------
# Initialising a student from teacher layers


def copy_same_family(student: nn.Module, teacher: nn.Module, layers: list[int], weights: Optional[Mapping] = None) -> dict[str, str]:
    """Copy every weight of a same-family teacher into the student; student layer i takes teacher layer layers[i];
    tables longer in the teacher (positions) are cut to the student's size. Returns the student -> teacher key map.
    `weights`: the teacher's tensors by name (None: its state dict)."""
    family = family_of(teacher)
    prefix = f"{family.base}.{family.layers}."
    t_sd = teacher.state_dict() if weights is None else weights
    applied = {}
    with torch.no_grad():
        for s_key, param in student.state_dict(keep_vars=True).items():
            t_key = s_key
            if s_key.startswith(prefix):
                index, rest = s_key[len(prefix) :].split(".", 1)
                t_key = f"{prefix}{layers[int(index)]}.{rest}"
            if t_key not in t_sd or _tied_to_input(student, s_key):
                continue  # non-persistent buffers; a tied output projection follows its embedding
            source = t_sd[t_key]
            if source.shape != param.shape:
                if (
                    source.dim() == param.dim()
                    and all(t >= s for t, s in zip(source.shape, param.shape))
                    and source.shape[1:] == param.shape[1:]
                ):
                    source = source[: param.shape[0]]  # e.g. position embeddings for a shorter context
                else:
                    raise FamilyError(
                        f"student weight {s_key} has shape {tuple(param.shape)}, the teacher's {t_key} {tuple(source.shape)}; "
                        f"init from the teacher needs the teacher's widths (or use student.init=random)"
                    )
            param.data.copy_(source.to(param.dtype))
            applied[s_key] = t_key
    return applied


def _tied_to_input(model: nn.Module, key: str) -> bool:
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return (
        out is not None
        and key.endswith("weight")
        and out.weight is model.get_input_embeddings().weight
        and key.startswith(_module_name(model, out))
    )


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return "\0"


BERT_LAYER_TO_DISTILBERT = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def _bert_head_pairs(teacher_family: Family, student_family: Family) -> list[tuple[str, str]]:
    """(student key prefix, teacher key prefix) for the MLM head's transform and output bias."""
    if teacher_family is ROBERTA:
        t_dense, t_norm, t_bias = "lm_head.dense", "lm_head.layer_norm", "lm_head.bias"
    else:
        t_dense, t_norm, t_bias = "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias"
    if student_family is DISTILBERT:
        return [("vocab_transform", t_dense), ("vocab_layer_norm", t_norm), ("vocab_projector.bias", t_bias)]
    return [("cls.predictions.transform.dense", t_dense), ("cls.predictions.transform.LayerNorm", t_norm), ("cls.predictions.bias", t_bias)]


def copy_bert_to_encoder(
    student: nn.Module, teacher: nn.Module, layers: list[int], fold_token_type: bool = True, weights: Optional[Mapping] = None
) -> dict[str, str]:
    """BERT-family teacher -> DistilBERT or BERT student: embeddings, layers `layers` (in order) and the MLM head.

    RoBERTa-family position rows start after the padding index; with `fold_token_type`, a DistilBERT student (which has
    no token types) gets the teacher's token-type-0 embedding added to its positions, so its embedding output equals the teacher's."""
    t_family, s_family = family_of(teacher), family_of(student)
    t_sd = teacher.state_dict() if weights is None else weights
    s_params = dict(student.state_dict(keep_vars=True))
    tp, sp = t_family.base, s_family.base
    pairs: list[tuple[str, str]] = [
        (f"{sp}.embeddings.{n}", f"{tp}.embeddings.{n}") for n in ("word_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")
    ]
    mapping = BERT_LAYER_TO_DISTILBERT if s_family is DISTILBERT else {k: k for k in BERT_LAYER_TO_DISTILBERT}
    for s_idx, t_idx in enumerate(layers):
        for t_name, s_name in mapping.items():
            for w in ("weight", "bias"):
                pairs.append((f"{sp}.{s_family.layers}.{s_idx}.{s_name}.{w}", f"{tp}.{t_family.layers}.{t_idx}.{t_name}.{w}"))
    for s_name, t_name in _bert_head_pairs(t_family, s_family):
        if s_name.endswith(".bias"):
            pairs.append((s_name, t_name))
        else:
            pairs += [(f"{s_name}.weight", f"{t_name}.weight"), (f"{s_name}.bias", f"{t_name}.bias")]
    applied = {}
    with torch.no_grad():
        for s_key, t_key in pairs:
            s_params[s_key].copy_(t_sd[t_key].to(s_params[s_key].dtype))
            applied[s_key] = t_key
        s_pos = s_params[f"{sp}.embeddings.position_embeddings.weight"]
        offset = t_family.position_offset(teacher.config)
        t_pos = t_sd[f"{tp}.embeddings.position_embeddings.weight"][offset : offset + s_pos.shape[0]].clone()
        t_type_key = f"{tp}.embeddings.token_type_embeddings.weight"
        if s_family is BERT and t_type_key in t_sd:
            s_types = s_params["bert.embeddings.token_type_embeddings.weight"]
            s_types.copy_(t_sd[t_type_key][: s_types.shape[0]])
            applied["bert.embeddings.token_type_embeddings.weight"] = t_type_key
        elif fold_token_type and t_type_key in t_sd:
            t_pos += t_sd[t_type_key][0]
        s_pos.copy_(t_pos.to(s_pos.dtype))
    applied[f"{sp}.embeddings.position_embeddings.weight"] = f"{tp}.embeddings.position_embeddings.weight" + (
        f"[{offset}:] + token_type[0]" if fold_token_type and s_family is not BERT and t_type_key in t_sd else ""
    )
    return applied


def init_from_teacher(
    student: nn.Module, teacher: nn.Module, layers: list[int], fold_token_type: bool = True, weights: Optional[Mapping] = None
) -> dict[str, str]:
    """Copy the teacher's weights into the student as the student's family says (see the module docstring); `weights`: the
    teacher's tensors by state-dict name (None: `teacher.state_dict()`)."""
    t_family, s_family = family_of(teacher), family_of(student)
    if t_family.name not in s_family.init_from:
        raise FamilyError(
            f"a {s_family.name} student cannot be initialised from a {t_family.name} teacher "
            f"(it can from: {', '.join(s_family.init_from) or 'none'}); use student.init=random"
        )
    if s_family is t_family:
        return copy_same_family(student, teacher, layers, weights)
    return copy_bert_to_encoder(student, teacher, layers, fold_token_type, weights)


def student_shape(teacher_config: Any, overrides: dict) -> dict:
    """The teacher's shape (if any) with the student's explicit settings (non-None values) on top."""
    shape = dict(family_of(teacher_config).shape(teacher_config)) if teacher_config is not None else {}
    shape.update({k: v for k, v in overrides.items() if v is not None})
    return shape


def student_config_for(
    architecture: str, teacher_config: Any, shape: dict, vocab_size: int, pad_token_id: int, dropout: float, attn_implementation: str
) -> Any:
    """A config of `architecture` (a family name) with `shape`; its attention kernel set to `attn_implementation`."""
    if architecture not in FAMILIES:
        raise FamilyError(f"student.architecture={architecture!r} is not a known family ({', '.join(sorted(FAMILIES))})")
    config = FAMILIES[architecture].student_config(shape, vocab_size, pad_token_id, dropout, copy.deepcopy(teacher_config))
    config._attn_implementation = attn_implementation
    return config
