"""Model families: everything the job knows about one kind of Hugging Face model.

Any causal LM that transformers ships (`AutoModelForCausalLM` knows its model type) works through ONE generic path
built from what every `PreTrainedModel` exposes: the decoder stack is `model.get_decoder()`, its layers the one
`nn.ModuleList` of `config.num_hidden_layers` blocks in it, the vocabulary projection `model.get_output_embeddings()`,
the shape the config's `hidden_size`, `num_attention_heads`, `num_key_value_heads`, `head_dim`, `intermediate_size`,
`num_hidden_layers`; a student config is the teacher's with the student's depth and widths (per-layer lists such as
`layer_types` follow the teacher layers the student stands for); the logits' output transform comes from the config
(`LogitTransform`: Granite's `logits_scaling`, Cohere's `logit_scale`, Gemma's `final_logit_softcapping`), and
`distill.models.build.check_logits` proves on every loaded model that its forward does nothing else. A decoder block's
parts (attention projections, MLP or experts, norms) are found by `distill/models/blocks.py`.

The registry (`register(Family(...))`) keeps entries only where a family needs what the generic path cannot know: the
masked LMs (BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT: their MLM heads, token types, position offsets, the
BERT -> DistilBERT layer map) and GPT-2 (its own config keys). `family_of(config)` returns the entry, else the generic
family of a causal model type, else a one-line FamilyError saying the model is neither.

Students: a family lists the teacher families it can be initialised from (`init_from`). A student of the teacher's
own family copies every weight, with the chosen teacher layers renumbered 0..k-1 (`copy_same_family`; a mixture of
experts' experts and router are weights like any other); DistilBERT and BERT students of BERT-family teachers use the
BERT mapping below.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from distill.model_outputs import LogitTransform, ModelShape
from kd_common.errors import UserError


class FamilyError(UserError, ValueError):
    """A model of a family this job does not know, or a teacher/student pairing it cannot build."""


def config_output_transform(config: Any) -> LogitTransform:
    """What a causal LM's forward does to `lm_head(h)`, read from its config: divided by `logits_scaling` (Granite,
    GraniteMoE; MiniCPM3 divides the head's input, the same for a head without bias), times `logit_scale` (Cohere),
    then capped by `final_logit_softcapping` (Gemma 2, Gemma 3). `check_logits` holds every loaded model to it."""
    scale = 1.0
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None):
        scale *= float(config.logit_scale)
    cap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(cap) if cap else None)


def _identity_transform(config: Any) -> LogitTransform:
    return LogitTransform()


@dataclass(frozen=True)
class Family:
    """One kind of model (see the module docstring). `base`, `layers`, `qkv` and `projection` None: found generically."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values of this family
    causal: bool  # causal LM (next-token labels, causal attention) or masked LM
    base: Optional[str]  # attribute of the base model (encoder / decoder stack) inside the LM; None = model.get_decoder()
    layers: Optional[str]  # path of the layer list inside the base model; None = its one ModuleList of num_hidden_layers blocks
    qkv: Optional[tuple[str, ...]]  # q/k/v projections inside one layer (one name = fused); None = by the block layout (blocks.py)
    head_transform: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]]  # hidden -> input of the vocabulary projection
    projection: Optional[
        Callable[[nn.Module], nn.Module]
    ]  # the vocabulary projection (weight (V, H), optional bias); None = get_output_embeddings()
    shape: Callable[[Any], dict]  # config -> hidden_size, num_heads, num_kv_heads, intermediate_size, num_layers, ...
    student_config: Callable[..., Any]  # (shape, vocab, pad id, dropout, teacher config or None, layers=...) -> a config of this family
    init_from: tuple[str, ...] = ()  # teacher families a student of this family can copy layers from
    rotary: bool = False  # attention scores use rotary positions the captured q/k do not carry
    position_offset: Callable[[Any], int] = field(default=lambda config: 0)  # first usable position row (RoBERTa: pad + 1)
    output_transform: Callable[[Any], LogitTransform] = _identity_transform  # config -> what follows the projection in forward
    generic: bool = False  # built by the generic causal path, not registered
    # a block's parts by name (blocks.BlockLayout fields) where the standard names miss them (BERT's attention.self.query ...)
    block_parts: Optional[dict] = field(default=None, hash=False, compare=False)

    @property
    def auto_class(self) -> str:
        return "AutoModelForCausalLM" if self.causal else "AutoModelForMaskedLM"

    def base_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base) if self.base is not None else model.get_decoder()

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        base = self.base_model(model)
        if self.layers is not None:
            return submodule(base, self.layers)
        return submodule(base, decoder_layers_name(base, model.config))

    def layer_prefix(self, model: nn.Module) -> str:
        """The state-dict prefix of the layer list, e.g. "model.layers." (layer i's keys start with prefix + "i.")."""
        if self.base is not None and self.layers is not None:
            return f"{self.base}.{self.layers}."
        return f"{module_name(model, self.layer_list(model))}."

    def vocab_projection(self, model: nn.Module) -> nn.Module:
        if self.projection is not None:
            return self.projection(model)
        head = model.get_output_embeddings()  # its weight is not read here: under ZeRO-3 a read inside a forward gathers it
        if head is None:
            raise FamilyError(
                f"a {model.config.model_type} model has no output embeddings (get_output_embeddings()); it is not a language model"
            )
        return head

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of `model` for hidden states of shape (..., H), as its forward makes them."""
        if self.head_transform is not None:
            hidden = self.head_transform(model, hidden)
        return vocab_logits(self.vocab_projection(model), self.output_transform(model.config), hidden)

    def model_shape(self, config: Any) -> ModelShape:
        s = self.shape(config)
        return ModelShape(hidden_size=s["hidden_size"], num_heads=s["num_heads"], num_layers=s["num_layers"], rotary=self.rotary)


def vocab_logits(head: Any, transform: Optional[LogitTransform], hidden: torch.Tensor, vocab: Optional[int] = None) -> torch.Tensor:
    """The one function that makes vocabulary logits from the input of a model's projection: `head` (an nn.Linear, or
    anything with .weight / .bias) over its first `vocab` rows (None: all), then the model's output `transform`. The
    full-logit losses, distill-eval and the teacher-logit cache all call it; the chunked losses do the same chunk by chunk."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab is not None:
        weight, bias = weight[:vocab], (bias[:vocab] if bias is not None else None)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return transform(logits) if transform is not None and not transform.identity else logits


FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}
_GENERIC: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    return family


def known_model_types() -> list[str]:
    """The registered model types (the masked LMs and GPT-2); every other causal LM goes through the generic path."""
    return sorted(_BY_MODEL_TYPE)


def masked_model_types() -> list[str]:
    return sorted(t for t, f in _BY_MODEL_TYPE.items() if not f.causal)


def causal_lm_types() -> set[str]:
    """Every model type transformers' AutoModelForCausalLM builds."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # transformers: not at start-up

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def family_named(name: str) -> Optional[Family]:
    """The family called `name`: a registered one, or the generic family of a causal model type; None if neither."""
    if name in FAMILIES:
        return FAMILIES[name]
    if name in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[name]
    if name in _GENERIC:
        return _GENERIC[name]
    if name in causal_lm_types():
        _GENERIC[name] = generic_causal_family(name)
        return _GENERIC[name]
    return None


def family_of(model_or_config: Any) -> Family:
    """The family of a model or config: its registry entry, else the generic causal family of its model type; a one-line
    FamilyError for a model that is neither a causal LM nor one of the masked-LM families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    family = _BY_MODEL_TYPE.get(model_type) or (family_named(model_type) if isinstance(model_type, str) else None)
    if family is None:
        raise FamilyError(
            f"model type {model_type!r} is not a causal LM (transformers' AutoModelForCausalLM does not build it) and not one of "
            f"the masked-LM families here ({', '.join(masked_model_types())}); use a causal-LM checkpoint or one of those"
        )
    return family


def submodule(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def module_name(root: nn.Module, module: nn.Module) -> str:
    """The dotted name of `module` inside `root` ("\0" when it is not there)."""
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    return "\0"


def decoder_layers_name(base: nn.Module, config: Any) -> str:
    """The name of the decoder's layer list: its one child ModuleList of `config.num_hidden_layers` blocks; a one-line
    FamilyError when there is none (or several and none is called layers / h / blocks)."""
    depth = getattr(config, "num_hidden_layers", None)
    lists = [name for name, child in base.named_children() if isinstance(child, nn.ModuleList) and len(child) == depth]
    if len(lists) > 1:
        lists = [name for name in lists if name in ("layers", "h", "blocks")] or lists
    if len(lists) != 1:
        found = [f"{name} ({len(child)})" for name, child in base.named_children() if isinstance(child, nn.ModuleList)]
        raise FamilyError(
            f"a {getattr(config, 'model_type', '?')} model: no list of its {depth} decoder layers (config num_hidden_layers) in "
            f"{type(base).__name__} (module lists: {', '.join(found) or 'none'}); register a Family that names it "
            f"(docs/decoder-llms.md, adding a family)"
        )
    return lists[0]


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
_BERT_BLOCK = {
    "attention": "attention",
    "q": _BERT_QKV[0],
    "k": _BERT_QKV[1],
    "v": _BERT_QKV[2],
    "o": "attention.output.dense",
    "mlp": "intermediate",
    "up": "intermediate.dense",
    "down": "output.dense",
    "norms": ("attention.output.LayerNorm", "output.LayerNorm"),
}

BERT = register(
    Family(
        name="bert",
        model_types=("bert",),
        causal=False,
        base="bert",
        layers="encoder.layer",
        qkv=_BERT_QKV,
        block_parts=_BERT_BLOCK,
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
        block_parts=_BERT_BLOCK,
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
# Every other causal LM: the generic path (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo-2, Granite, SmolLM3, GLM-4,
# Cohere, Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ERNIE 4.5, ...: whatever AutoModelForCausalLM builds)

_SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
PER_LAYER_INDEX_LISTS = ("mlp_only_layers",)  # config lists of layer indices (Qwen2/3-MoE: the layers with a dense MLP)
_NOT_COPIED = ("architectures", "_name_or_path", "transformers_version", "model_type", "dtype", "torch_dtype", "auto_map")


def _decoder_shape(c) -> dict:
    missing = [key for key in _SHAPE_KEYS if getattr(c, key, None) is None]
    if missing:
        raise FamilyError(
            f"a {c.model_type} config has no {', '.join(missing)}: the generic causal-LM path reads the shape from config.json "
            f"(a multimodal checkpoint keeps it in a sub-config); use a text-only causal-LM checkpoint or register a Family for it"
        )
    return {
        "hidden_size": c.hidden_size,
        "num_heads": c.num_attention_heads,
        "num_kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        "intermediate_size": getattr(c, "intermediate_size", None),
        "num_layers": c.num_hidden_layers,
        "max_position_embeddings": getattr(c, "max_position_embeddings", None),
        "activation": getattr(c, "hidden_act", None) or getattr(c, "hidden_activation", None),
        "vocab_size": c.vocab_size,
        "head_dim": getattr(c, "head_dim", None),
    }


def per_layer_lists(values: dict, teacher_depth: int, layers: Optional[list[int]]) -> dict:
    """A config's per-layer settings for a student whose layer i stands for teacher layer layers[i]: every list with one
    entry per teacher layer (`layer_types`, `no_rope_layers`, ...) takes those layers' entries, and index lists
    (`mlp_only_layers`) are renumbered; without `layers` they are dropped (the family's defaults rebuild them)."""
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, list) and len(value) == teacher_depth and not key.endswith("token_id") and key not in _NOT_COPIED:
            if layers is None:
                out.pop(key)
            else:
                out[key] = [value[i] for i in layers]
    for key in PER_LAYER_INDEX_LISTS:
        if isinstance(values.get(key), list) and values[key]:
            if layers is None:
                out.pop(key)
            else:
                out[key] = [s for s, t in enumerate(layers) if t in set(values[key])]
    return out


def _decoder_student_config(model_type: str):
    """A student config of a causal family: the teacher's config (positions, rope, norms, vocabulary, tying, experts, the
    output transform) with the student's depth and widths and its per-layer lists; a teacher of another family (or none)
    gives only the shape, the vocabulary and the special ids, the rest is the family's defaults."""

    def build(
        shape: dict, vocab_size: int, pad_token_id: int, dropout: float, teacher_config: Any = None, layers: Optional[list[int]] = None
    ):
        from transformers import AutoConfig  # transformers: not at start-up

        same = teacher_config is not None and teacher_config.model_type == model_type
        values = teacher_config.to_dict() if same else {}
        for key in _NOT_COPIED:
            values.pop(key, None)
        if same:
            values = per_layer_lists(values, teacher_config.num_hidden_layers, layers)
        t_heads, t_hidden = values.get("num_attention_heads"), values.get("hidden_size")
        derived_head_dim = t_heads and t_hidden and values.get("head_dim") in (None, t_hidden // t_heads)
        values.update(
            vocab_size=vocab_size,
            hidden_size=shape["hidden_size"],
            num_hidden_layers=shape["num_layers"],
            num_attention_heads=shape["num_heads"],
            num_key_value_heads=shape.get("num_kv_heads") or shape["num_heads"],
            max_position_embeddings=shape["max_position_embeddings"],
            attention_dropout=dropout,
        )
        if shape.get("intermediate_size"):
            values["intermediate_size"] = shape["intermediate_size"]
        if not same or derived_head_dim:
            values["head_dim"] = shape["hidden_size"] // shape["num_heads"]
        if not same:
            ids = {k: getattr(teacher_config, k, None) for k in ("bos_token_id", "eos_token_id")} if teacher_config is not None else {}
            values.update({k: v for k, v in ids.items() if v is not None}, pad_token_id=pad_token_id)
            values["tie_word_embeddings"] = (
                bool(getattr(teacher_config, "tie_word_embeddings", True)) if teacher_config is not None else True
            )
        if values["num_attention_heads"] % values["num_key_value_heads"]:
            raise FamilyError(
                f"student has {values['num_attention_heads']} attention heads and {values['num_key_value_heads']} key/value "
                f"heads; the heads must be a multiple of the key/value heads (set student.num_kv_heads)"
            )
        return AutoConfig.for_model(model_type, **values)

    return build


def generic_causal_family(model_type: str) -> Family:
    """The family of a causal model type the registry does not name: everything from what every PreTrainedModel exposes."""
    return Family(
        name=model_type,
        model_types=(model_type,),
        causal=True,
        base=None,
        layers=None,
        qkv=None,
        head_transform=None,
        projection=None,
        shape=_decoder_shape,
        student_config=_decoder_student_config(model_type),
        init_from=(model_type,),
        rotary=True,
        output_transform=config_output_transform,
        generic=True,
    )


# ------------------------------------------------------------------------------------------------
# Initialising a student from teacher layers


def copy_same_family(student: nn.Module, teacher: nn.Module, layers: list[int], weights: Optional[Mapping] = None) -> dict[str, str]:
    """Copy every weight of a same-family teacher into the student; student layer i takes teacher layer layers[i];
    tables longer in the teacher (positions) are cut to the student's size. Returns the student -> teacher key map.
    `weights`: the teacher's tensors by name (None: its state dict)."""
    family = family_of(teacher)
    prefix = family.layer_prefix(teacher)
    if family_of(student).layer_prefix(student) != prefix:
        raise FamilyError(f"the student's layers are not where the teacher's are ({prefix}); the two are not of one family")
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
        and key.startswith(module_name(model, out))
    )


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
    architecture: str,
    teacher_config: Any,
    shape: dict,
    vocab_size: int,
    pad_token_id: int,
    dropout: float,
    attn_implementation: str,
    layers: Optional[list[int]] = None,
) -> Any:
    """A config of `architecture` (a family name or a causal model type) with `shape`, its attention kernel set to
    `attn_implementation`; `layers`: the teacher layer each student layer stands for (its per-layer config lists)."""
    family = family_named(architecture)
    if family is None:
        raise FamilyError(
            f"student.architecture={architecture!r} is neither a masked-LM family here ({', '.join(masked_model_types())}) nor a causal "
            f"model type transformers builds; use same (the teacher's), one of those, or e.g. llama"
        )
    teacher_config = copy.deepcopy(teacher_config)
    if family.generic:
        config = family.student_config(shape, vocab_size, pad_token_id, dropout, teacher_config, layers=layers)
    else:
        config = family.student_config(shape, vocab_size, pad_token_id, dropout, teacher_config)
    config._attn_implementation = attn_implementation
    return config
