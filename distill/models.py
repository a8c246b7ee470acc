"""Teacher loading, student construction and initialisation from teacher layers.

Masked LMs of the BERT family (BERT, RoBERTa, XLM-R, CamemBERT), DistilBERT and the causal GPT-2 are
driven through one small interface: run the base model, then apply the vocabulary head only at chosen
positions. What a loss reads beyond that is collected only when asked for (`Needs`): hidden states of
every layer (`output_hidden_states`), and queries / keys / values of chosen layers, captured by forward
hooks on the attention's q/k/v projections (so any attention kernel works, sdpa included, and ZeRO-3's
own parameter hooks are untouched).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch
from torch import nn

from distill.layer_map import resolve_layers
from distill.losses import ModelOutputs, ModelShape, Needs

log = logging.getLogger(__name__)

# model_type -> (attribute of the encoder, attribute of the MLM head or None for DistilBERT's)
_MLM_LAYOUT = {
    "bert": ("bert", "cls"),
    "roberta": ("roberta", "lm_head"),
    "xlm-roberta": ("roberta", "lm_head"),
    "camembert": ("roberta", "lm_head"),
    "distilbert": ("distilbert", None),
    "gpt2": ("transformer", "lm_head"),
}
# model_type -> (path of the layer list inside the base model, q/k/v projections inside a layer (one name: fused qkv))
_LAYERS = {
    "bert": ("encoder.layer", ("attention.self.query", "attention.self.key", "attention.self.value")),
    "roberta": ("encoder.layer", ("attention.self.query", "attention.self.key", "attention.self.value")),
    "xlm-roberta": ("encoder.layer", ("attention.self.query", "attention.self.key", "attention.self.value")),
    "camembert": ("encoder.layer", ("attention.self.query", "attention.self.key", "attention.self.value")),
    "distilbert": ("transformer.layer", ("attention.q_lin", "attention.k_lin", "attention.v_lin")),
    "gpt2": ("h", ("attn.c_attn",)),
}
CAUSAL_TYPES = {"gpt2"}
_ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelError(ValueError):
    """A teacher that cannot be loaded or used, or a student that cannot be built as asked."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[name]


def _layout(model: nn.Module) -> tuple[str, Optional[str]]:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _MLM_LAYOUT:
        raise ModelError(
            f"model type {model_type!r} is not supported as a masked LM here (supported: {', '.join(sorted(_MLM_LAYOUT))}); "
            f"use a BERT-family masked-LM or a GPT-2 causal-LM checkpoint"
        )
    return _MLM_LAYOUT[model_type]


def apply_mlm_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of `model`'s MLM head for hidden states of shape (..., H)."""
    _, head = _layout(model)
    if head is None:  # DistilBertForMaskedLM keeps its head as loose modules
        x = model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
        return model.vocab_projector(x)
    return getattr(model, head)(hidden)


def model_shape(model: nn.Module) -> ModelShape:
    c = model.config
    return ModelShape(hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_layers=c.num_hidden_layers)


def _submodule(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


class AttentionCapture:
    """Forward hooks on the q/k/v projections of chosen layers; `collect()` returns and forgets them.

    Outputs are captured as they leave the projection (so gradients flow through them for the student)
    and reshaped to (B, heads, L, head_dim); the attention scores are then q k^T / sqrt(head_dim), the
    pre-softmax scores of BERT, DistilBERT and GPT-2 alike.
    """

    def __init__(self, model: nn.Module, layers) -> None:
        model_type = model.config.model_type
        encoder_name, _ = _layout(model)
        layers_path, qkv_names = _LAYERS[model_type]
        blocks = _submodule(getattr(model, encoder_name), layers_path)
        n = len(blocks)
        self.layers = tuple(sorted({i % n for i in layers}))
        self.num_heads = model.config.num_attention_heads
        self.fused = len(qkv_names) == 1
        self._store: dict[tuple[int, int], torch.Tensor] = {}
        self._handles = []
        for layer in self.layers:
            for slot, name in enumerate(qkv_names):
                module = _submodule(blocks[layer], name)
                self._handles.append(module.register_forward_hook(self._hook(layer, slot)))

    def _hook(self, layer: int, slot: int):
        def hook(module, args, output):
            self._store[(layer, slot)] = output

        return hook

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        return x.view(b, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def collect(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        out = {}
        for layer in self.layers:
            if self.fused:
                q, k, v = self._store[(layer, 0)].chunk(3, dim=-1)
            else:
                q, k, v = (self._store[(layer, slot)] for slot in range(3))
            out[layer] = (self._heads(q), self._heads(k), self._heads(v))
        self._store.clear()  # never keep a step's graph alive past its loss
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def model_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logit_positions: Optional[torch.Tensor],
                  needs: Needs = Needs(), capture: Optional[AttentionCapture] = None, full_logits: bool = False) -> ModelOutputs:
    """Base-model forward; vocabulary logits only at the flat `logit_positions` (None: no logits); hidden
    states of every layer and q/k/v of the `capture`d layers only when `needs` says so.

    `full_logits` (the benchmark's baseline path, `train.logits_where_needed=false`): project every position
    of the padded batch to the vocabulary, then select `logit_positions` (same values, (B*L)/P times the
    head FLOPs and a (B, L, V) activation)."""
    encoder_name, _ = _layout(model)
    want_states = needs.hidden_states or needs.projected
    kwargs = {"output_hidden_states": True} if want_states else {}
    out = getattr(model, encoder_name)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state
    logits = None
    if logit_positions is not None and full_logits:
        every = apply_mlm_head(model, hidden)
        logits = every.reshape(-1, every.shape[-1]).index_select(0, logit_positions)
    elif logit_positions is not None:
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, logit_positions)
        logits = apply_mlm_head(model, selected)
    return ModelOutputs(
        hidden=hidden, logits=logits, hidden_states=tuple(out.hidden_states) if want_states else None,
        attention=capture.collect() if capture is not None else None, causal=model.config.model_type in CAUSAL_TYPES,
    )


def mlm_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logit_positions: Optional[torch.Tensor]) -> ModelOutputs:
    """Encoder forward; vocabulary logits only at the flat `logit_positions` (None: no logits)."""
    return model_forward(model, input_ids, attention_mask, logit_positions)


PROJECTION_PREFIX = "projections."


class StudentForDistillation(nn.Module):
    """The module DeepSpeed wraps: the student plus what only training needs (TinyBERT's projections).

    `forward` returns a dict of tensors (last hidden states, logits at the given positions, and what
    `needs` asks for); `outputs()` turns it into `ModelOutputs`. The projections W_e / W_h are submodules
    here, so DeepSpeed optimises, checkpoints and (ZeRO-3) partitions them with the student; export keeps
    only `model.*`.
    """

    def __init__(self, model: nn.Module, needs: Needs = Needs(), projection: str = "shared", target_width: Optional[int] = None,
                 full_logits: bool = False):
        super().__init__()
        self.model = model
        self.needs = needs
        self.full_logits = full_logits  # baseline path: vocabulary logits at every position (train.logits_where_needed=false)
        self.capture = AttentionCapture(model, needs.attention_layers) if needs.attention_layers else None
        if needs.projected:
            if target_width is None:
                raise ModelError("projected hidden states need the teacher's width")
            width, depth = model.config.hidden_size, model.config.num_hidden_layers
            count = {"shared": 1, "separate": 2, "per_layer": depth + 1}[projection]
            self.projections = nn.ModuleList([nn.Linear(width, target_width) for _ in range(count)])
            # hidden_states[i] (0 = embeddings) -> projection index
            self._projection_of = [min(i, count - 1) for i in range(depth + 1)]

    def forward(self, input_ids, attention_mask, logit_positions=None):
        out = model_forward(self.model, input_ids, attention_mask, logit_positions, self.needs, self.capture, self.full_logits)
        result = {"hidden": out.hidden, "logits": out.logits}
        if self.needs.hidden_states:
            result["hidden_states"] = out.hidden_states
        if self.needs.projected:
            result["projected"] = tuple(self.projections[self._projection_of[i]](h) for i, h in enumerate(out.hidden_states))
        if out.attention is not None:
            result["attention"] = tuple(t for layer in self.capture.layers for t in out.attention[layer])
        return result

    def outputs(self, result: dict) -> ModelOutputs:
        attention = None
        if "attention" in result:
            flat = result["attention"]
            attention = {layer: tuple(flat[3 * i : 3 * i + 3]) for i, layer in enumerate(self.capture.layers)}
        return ModelOutputs(hidden=result["hidden"], logits=result["logits"], hidden_states=result.get("hidden_states"),
                            projected=result.get("projected"), attention=attention, causal=self.model.config.model_type in CAUSAL_TYPES)


# ----------------------------------------------------------------------------------------------
# Teacher


def load_teacher(path: str, dtype: torch.dtype, attn_implementation: str, device: torch.device) -> nn.Module:
    """Load a local masked-LM (or GPT-2 causal-LM) checkpoint with `from_pretrained`, frozen: eval mode, no gradients."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if not os.path.isdir(path):
        raise ModelError(
            f"teacher.path {path!r} is not a local directory; this job never downloads. On a machine with internet run "
            f"`hf download {path} --local-dir DIR` (or save_pretrained) and set teacher.path=DIR"
        )
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ModelError(f"teacher.path {path!r} has no config.json; point it at a directory written by save_pretrained")
    try:
        with open(os.path.join(path, "config.json")) as handle:
            causal = json.load(handle).get("model_type") in CAUSAL_TYPES
        auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
        teacher = auto.from_pretrained(path, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation)
    except Exception as exc:  # transformers raises many types for unreadable checkpoints
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"teacher {path!r} could not be loaded as a masked or causal LM ({first}); check the directory holds a complete Hugging Face checkpoint") from None
    _layout(teacher)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher.to(device)


# ----------------------------------------------------------------------------------------------
# Student


def default_init_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers including the first and last (12 -> 6 gives 0,2,4,7,9,11)."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [int(i * (teacher_layers - 1) / (student_layers - 1) + 0.5) for i in range(student_layers)]


def _teacher_shape(teacher: nn.Module) -> dict:
    c = teacher.config
    offset = (c.pad_token_id + 1) if c.model_type in _ROBERTA_LIKE else 0
    if c.model_type == "gpt2":
        return {"hidden_size": c.n_embd, "num_heads": c.n_head, "intermediate_size": c.n_inner or 4 * c.n_embd, "num_layers": c.n_layer,
                "max_position_embeddings": c.n_positions, "activation": c.activation_function, "position_offset": 0}
    return {
        "hidden_size": c.hidden_size,
        "num_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "num_layers": c.num_hidden_layers,
        "max_position_embeddings": c.max_position_embeddings - offset,
        "activation": c.hidden_act,
        "position_offset": offset,
    }


def student_depth(cfg, teacher: Optional[nn.Module]) -> Optional[int]:
    """student.num_layers, else the length of student.init_layers, else half the teacher's layers."""
    if cfg.num_layers:
        return cfg.num_layers
    if cfg.init_layers:
        return len(cfg.init_layers)
    return _teacher_shape(teacher)["num_layers"] // 2 if teacher is not None else None


def init_layers_for(cfg, teacher: nn.Module, student_layers: int) -> list[int]:
    """Teacher layers copied into the student: student.init_layers, else the student.init_mapping strategy."""
    try:
        return resolve_layers(cfg.init_mapping, _teacher_shape(teacher)["num_layers"], student_layers, cfg.init_layers,
                              key="student.init_layers" if cfg.init_layers else "student.init_mapping")
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def build_student(cfg, teacher: Optional[nn.Module], vocab_size: int, pad_token_id: int, max_seq_len: int) -> nn.Module:
    """Create the student model (random weights); `init_student_from_teacher` copies weights after."""
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    shape = _teacher_shape(teacher) if teacher is not None else {}
    hidden = cfg.hidden_size or shape.get("hidden_size")
    heads = cfg.num_heads or shape.get("num_heads")
    inter = cfg.intermediate_size or shape.get("intermediate_size")
    layers = student_depth(cfg, teacher)
    positions = cfg.max_position_embeddings or shape.get("max_position_embeddings") or max_seq_len
    activation = shape.get("activation", "gelu")
    if not (hidden and heads and inter and layers):
        raise ModelError("student shape incomplete: set student.hidden_size, num_heads, intermediate_size and num_layers")
    if hidden % heads:
        raise ModelError(f"student.hidden_size={hidden} is not divisible by student.num_heads={heads}")
    if positions < max_seq_len:
        raise ModelError(f"student has {positions} positions but the dataset's max_seq_len is {max_seq_len}; raise student.max_position_embeddings")
    if cfg.architecture == "gpt2" or (teacher is not None and teacher.config.model_type == "gpt2"):
        from transformers import GPT2Config, GPT2LMHeadModel

        if cfg.architecture != "gpt2" or (teacher is not None and teacher.config.model_type != "gpt2"):
            raise ModelError("a GPT-2 teacher needs student.architecture=gpt2 and a gpt2 student needs a GPT-2 teacher (or none)")
        t = teacher.config if teacher is not None else None
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inter, n_positions=positions,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            activation_function=activation if teacher is not None else "gelu_new",
            bos_token_id=t.bos_token_id if t is not None else pad_token_id, eos_token_id=t.eos_token_id if t is not None else pad_token_id,
            pad_token_id=pad_token_id, tie_word_embeddings=True,
        )
        config._attn_implementation = cfg.attn_implementation
        return GPT2LMHeadModel(config)
    if cfg.architecture == "distilbert":
        if activation not in ("gelu", "relu"):
            raise ModelError(f"DistilBERT supports gelu/relu activations, the teacher uses {activation!r}; use student.architecture=bert")
        config = DistilBertConfig(
            vocab_size=vocab_size, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=inter,
            max_position_embeddings=positions, dropout=cfg.dropout, attention_dropout=cfg.dropout,
            activation=activation, pad_token_id=pad_token_id, tie_word_embeddings=True,
        )
        config._attn_implementation = cfg.attn_implementation
        return DistilBertForMaskedLM(config)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, max_position_embeddings=positions, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout, hidden_act=activation, pad_token_id=pad_token_id,
    )
    config._attn_implementation = cfg.attn_implementation
    return BertForMaskedLM(config)


_BERT_LAYER_TO_DISTILBERT = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def _head_pairs(teacher_type: str, student_type: str) -> list[tuple[str, str]]:
    """(student key prefix, teacher key prefix) for the MLM head's transform and output bias."""
    if teacher_type in _ROBERTA_LIKE:
        t_dense, t_norm, t_bias = "lm_head.dense", "lm_head.layer_norm", "lm_head.bias"
    else:
        t_dense, t_norm, t_bias = "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias"
    if student_type == "distilbert":
        return [("vocab_transform", t_dense), ("vocab_layer_norm", t_norm), ("vocab_projector.bias", t_bias)]
    return [("cls.predictions.transform.dense", t_dense), ("cls.predictions.transform.LayerNorm", t_norm), ("cls.predictions.bias", t_bias)]


@torch.no_grad()
def init_student_from_teacher(student: nn.Module, teacher: nn.Module, layers: list[int], fold_token_type: bool = True) -> dict[str, str]:
    """Copy embeddings, teacher layers `layers` (in order) and the MLM head into the student.

    Returns the student-key -> teacher-key map that was applied (used by tests and logged).
    """
    t_type, s_type = teacher.config.model_type, student.config.model_type
    if t_type == "gpt2":
        return _init_gpt2_from_teacher(student, teacher, layers)
    if t_type not in ("bert",) + tuple(_ROBERTA_LIKE):
        raise ModelError(f"student.init=teacher supports BERT/RoBERTa-family teachers, not {t_type!r}; use student.init=random")
    shape = _teacher_shape(teacher)
    _check_init(student, teacher, layers)  # DistilBertConfig maps hidden_size/num_hidden_layers to dim/n_layers

    t_sd = teacher.state_dict()
    s_params = dict(student.state_dict(keep_vars=True))
    tp = teacher.base_model_prefix
    sp = "distilbert" if s_type == "distilbert" else "bert"
    pairs: list[tuple[str, str]] = []
    for name in ("word_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        pairs.append((f"{sp}.embeddings.{name}", f"{tp}.embeddings.{name}"))
    for s_idx, t_idx in enumerate(layers):
        t_layer = f"{tp}.encoder.layer.{t_idx}"
        if s_type == "distilbert":
            s_layer = f"distilbert.transformer.layer.{s_idx}"
            mapping = _BERT_LAYER_TO_DISTILBERT
        else:
            s_layer = f"bert.encoder.layer.{s_idx}"
            mapping = {k: k for k in _BERT_LAYER_TO_DISTILBERT}
        for t_name, s_name in mapping.items():
            for w in ("weight", "bias"):
                pairs.append((f"{s_layer}.{s_name}.{w}", f"{t_layer}.{t_name}.{w}"))
    for s_name, t_name in _head_pairs(t_type, s_type):
        if s_name.endswith(".bias"):
            pairs.append((s_name, t_name))
        else:
            pairs += [(f"{s_name}.weight", f"{t_name}.weight"), (f"{s_name}.bias", f"{t_name}.bias")]

    applied = {}
    for s_key, t_key in pairs:
        s_params[s_key].copy_(t_sd[t_key].to(s_params[s_key].dtype))
        applied[s_key] = t_key

    # Position embeddings: RoBERTa-family rows start after padding_idx; optionally fold token type 0 in.
    s_pos = s_params[f"{sp}.embeddings.position_embeddings.weight"]
    offset = shape["position_offset"]
    t_pos = t_sd[f"{tp}.embeddings.position_embeddings.weight"][offset : offset + s_pos.shape[0]].clone()
    t_type_key = f"{tp}.embeddings.token_type_embeddings.weight"
    if s_type == "bert" and t_type_key in t_sd:
        s_params["bert.embeddings.token_type_embeddings.weight"].copy_(t_sd[t_type_key][: s_params["bert.embeddings.token_type_embeddings.weight"].shape[0]])
        applied["bert.embeddings.token_type_embeddings.weight"] = t_type_key
    elif fold_token_type and t_type_key in t_sd:
        t_pos += t_sd[t_type_key][0]
    s_pos.copy_(t_pos.to(s_pos.dtype))
    applied[f"{sp}.embeddings.position_embeddings.weight"] = f"{tp}.embeddings.position_embeddings.weight" + (
        f"[{offset}:] + token_type[0]" if fold_token_type and s_type != "bert" and t_type_key in t_sd else ""
    )
    return applied


def _check_init(student: nn.Module, teacher: nn.Module, layers: list[int]) -> None:
    shape = _teacher_shape(teacher)
    s_hidden, s_layers = student.config.hidden_size, student.config.num_hidden_layers
    if s_hidden != shape["hidden_size"]:
        raise ModelError(f"student.init=teacher needs the teacher's width {shape['hidden_size']}, the student has {s_hidden}; use student.init=random")
    if len(layers) != s_layers:
        raise ModelError(f"student.init_layers has {len(layers)} entries for a {s_layers}-layer student")
    bad = [i for i in layers if not 0 <= i < shape["num_layers"]]
    if bad:
        raise ModelError(f"student.init_layers {bad} out of range for a {shape['num_layers']}-layer teacher")


def _init_gpt2_from_teacher(student: nn.Module, teacher: nn.Module, layers: list[int]) -> dict[str, str]:
    """GPT-2: token and position embeddings, the chosen blocks (all their weights) and the final LayerNorm
    (the LM head is tied to the token embeddings)."""
    _check_init(student, teacher, layers)
    t_sd = teacher.state_dict()
    s_params = dict(student.state_dict(keep_vars=True))
    applied = {}
    for s_key, param in s_params.items():
        if s_key == "lm_head.weight":
            continue
        t_key = s_key
        if s_key.startswith("transformer.h."):
            s_idx, rest = s_key[len("transformer.h."):].split(".", 1)
            t_key = f"transformer.h.{layers[int(s_idx)]}.{rest}"
        if t_key not in t_sd:
            continue  # non-persistent buffers
        source = t_sd[t_key]
        if s_key == "transformer.wpe.weight":
            source = source[: param.shape[0]]
        param.data.copy_(source.to(param.dtype))
        applied[s_key] = t_key
    return applied


def check_data_fits(model: nn.Module, packing: str) -> None:
    """A causal model trains on causally packed data (`distill-prep --packing causal`), a masked LM on the others."""
    causal = model.config.model_type in CAUSAL_TYPES
    if causal and packing != "causal":
        raise ModelError(f"a {model.config.model_type} (causal) model needs a dataset prepared with `distill-prep --packing causal`; this one is packed {packing!r}")
    if not causal and packing == "causal":
        raise ModelError(f"the dataset is packed for causal LMs (--packing causal) but the model is a masked LM ({model.config.model_type}); "
                         f"re-run distill-prep with --packing document")


def compile_encoder(model: nn.Module) -> None:
    """`torch.compile` the transformer body of `model` in place (`nn.Module.compile`: parameter names, and so
    checkpoints and ZeRO's hooks on the module tree, stay as they are); the vocabulary head stays eager
    because the number of logit positions changes every micro batch."""
    encoder_name, _ = _layout(model)
    getattr(model, encoder_name).compile(dynamic=True)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
