"""Teacher loading, student construction and initialisation from teacher layers, forward passes.

Every model is driven through one small interface whatever its family (distill/models/families.py knows where each
family keeps its parts): run the base model, then apply the vocabulary head only at chosen positions. What
a loss reads beyond that is collected only when asked for (`Needs`): hidden states of every layer
(`output_hidden_states`), and queries / keys / values of chosen layers, captured by forward hooks on the
attention's q/k/v projections (so any attention kernel works, sdpa included, and ZeRO-3's own parameter
hooks are untouched).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Mapping, Optional

import torch
from torch import nn

from distill.model_outputs import Documents, ModelOutputs, ModelShape, Needs
from distill.models.blocks import block_layout
from distill.models.families import (
    Family,
    FamilyError,
    family_named,
    family_of,
    init_from_teacher,
    student_config_for,
    student_shape,
    submodule,
)
from distill.models.layer_map import resolve_layers
from kd_common.errors import UserError, first_line
from kd_common.hf_dirs import LOCAL_ONLY, refuse_remote_code

log = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelError(UserError, ValueError):
    """A teacher that cannot be loaded or used, or a student that cannot be built as asked."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX-BF16; Linux /proc/cpuinfo flags).
    Without them oneDNN emulates bf16 through fp32, slower than fp32 itself."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[name]


def _config(model_or_config):
    """A model's config, or the config itself: shape decisions need no weights."""
    return getattr(model_or_config, "config", model_or_config)


def _family(model: nn.Module):
    try:
        return family_of(model)
    except FamilyError as exc:
        raise ModelError(str(exc)) from None


def is_causal(model: nn.Module) -> bool:
    return _family(model).causal


def apply_mlm_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of `model`'s LM head for hidden states of shape (..., H)."""
    return _family(model).logits(model, hidden)


def model_shape(model: nn.Module) -> ModelShape:
    return _family(model).model_shape(model.config)


class AttentionCapture:
    """Forward hooks on the q/k/v projections of chosen layers; `collect()` returns and forgets them.

    Outputs are captured as they leave the projection (so gradients flow through them for the student)
    and reshaped to (B, heads, L, head_dim); the attention scores are then q k^T / sqrt(head_dim), the
    pre-softmax scores of BERT, DistilBERT and GPT-2 alike.
    """

    def __init__(self, model: nn.Module, layers) -> None:
        family = _family(model)
        blocks = family.layer_list(model)
        n = len(blocks)
        self.layers = tuple(sorted({i % n for i in layers}))
        self.num_heads = model.config.num_attention_heads
        self._store: dict[tuple[int, int], torch.Tensor] = {}
        self._recording = False
        self._handles = []
        for layer in self.layers:
            try:
                qkv_names = family.qkv or block_layout(blocks[layer]).qkv_names()
            except FamilyError as exc:
                raise ModelError(str(exc)) from None
            self.fused = len(qkv_names) == 1
            for slot, name in enumerate(qkv_names):
                module = submodule(blocks[layer], name)
                self._handles.append(module.register_forward_hook(self._hook(layer, slot)))

    def _hook(self, layer: int, slot: int):
        def hook(module, args, output):
            if self._recording:  # not when activation checkpointing recomputes the layer in backward (after `collect`)
                self._store[(layer, slot)] = output

        return hook

    def start(self) -> None:
        """Record the q/k/v of the forward that follows, until `collect`."""
        self._store.clear()
        self._recording = True

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
        self._recording = False
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def sdpa_key_mask(model: nn.Module, family, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An encoder's (B, L) padding mask as the (B, 1, 1, L) boolean key mask SDPA broadcasts (same attention). Given the 2-d mask,
    transformers first reads it back to the host (`mask.all()`, to drop a mask without padding): a host-device sync in
    every forward; a 4-d mask is used as it is. The trainer passes no mask at all for micro batches without padding."""
    if attention_mask is None or attention_mask.dim() != 2 or family.causal:
        return attention_mask
    if getattr(_config(model), "_attn_implementation", None) != "sdpa":
        return attention_mask  # eager wants an additive float mask, flash attention the 2-d one
    return attention_mask[:, None, None, :].bool()


def model_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logit_positions: Optional[torch.Tensor],
    needs: Needs = Needs(),
    capture: Optional[AttentionCapture] = None,
    full_logits: bool = False,
    head_input: bool = False,
    documents: Optional[Documents] = None,
    router_aux: bool = False,
) -> ModelOutputs:
    """Base-model forward; vocabulary logits only at the flat `logit_positions` (None: no logits); hidden
    states of every layer and q/k/v of the `capture`d layers only when `needs` says so. `documents` (packed causal
    data, distill/data/documents.py): position ids and attention restart at each document; the padding mask is not needed.

    `full_logits` (the benchmark's baseline path, `train.logits_where_needed=false`): project every position
    of the padded batch to the vocabulary, then select `logit_positions` (same values, (B*L)/P times the
    head FLOPs and a (B, L, V) activation). `head_input` (chunked logit losses): no logits; the input of the vocabulary
    projection at `logit_positions` instead, with the projection (the teacher's, for the loss to read its weights) and
    the model's output transform. `router_aux` (an MoE student): its load-balancing loss from the router logits of
    this forward (`aux_loss`, unweighted); an MoE model's router logits are otherwise never collected."""
    family = _family(model)
    want_states = needs.hidden_states or needs.projected
    kwargs = {"output_hidden_states": True} if want_states else {}
    if family.causal:
        kwargs["use_cache"] = False  # no key/value cache in a training or scoring forward (nor beside checkpointed layers)
    if router_aux:
        kwargs["output_router_logits"] = True
    elif getattr(_config(model), "output_router_logits", False):
        kwargs["output_router_logits"] = False  # a frozen teacher's routers need no loss
    attention_mask = sdpa_key_mask(model, family, attention_mask)
    if documents is not None:
        kwargs.update(documents.forward_kwargs(getattr(_config(model), "_attn_implementation", None)))
        attention_mask = None
    if capture is not None:
        capture.start()
    out = family.base_model(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state
    logits = projected_input = head = transform = None
    if logit_positions is not None and head_input:
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, logit_positions)
        projected_input = family.head_transform(model, selected) if family.head_transform is not None else selected
        head, transform = family.vocab_projection(model), family.output_transform(model.config)
    elif logit_positions is not None and full_logits:
        every = apply_mlm_head(model, hidden)
        logits = every.reshape(-1, every.shape[-1]).index_select(0, logit_positions)
    elif logit_positions is not None:
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, logit_positions)
        logits = apply_mlm_head(model, selected)
    return ModelOutputs(
        hidden=hidden,
        logits=logits,
        hidden_states=tuple(out.hidden_states) if want_states else None,
        attention=capture.collect() if capture is not None else None,
        causal=family.causal,
        head_input=projected_input,
        head=head,
        head_transform=transform if transform is not None and not transform.identity else None,
        aux_loss=router_aux_loss(model, out.router_logits, attention_mask) if router_aux else None,
    )


def _balancing_loss(model_class: type):
    """The load-balancing loss function of an MoE family (`load_balancing_loss_func` in its modeling module), or None."""
    return getattr(sys.modules.get(model_class.__module__), "load_balancing_loss_func", None)


def router_aux_coefficient(model_or_config) -> float:
    """An MoE causal LM's load-balancing loss coefficient (its config's `router_aux_loss_coef`; 0 for a model that has no
    such loss or routers). From a config alone, the class AutoModelForCausalLM would build for it says."""
    config = _config(model_or_config)
    coef = getattr(config, "router_aux_loss_coef", None)
    if not coef or not _family(config).causal:
        return 0.0
    if isinstance(model_or_config, nn.Module):
        model_class = type(model_or_config)
    else:
        from transformers import AutoModelForCausalLM  # transformers: not at start-up

        model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
        if model_class is None:
            return 0.0
    return float(coef) if _balancing_loss(model_class) is not None else 0.0


def router_aux_loss(model: nn.Module, router_logits, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The family's own load-balancing loss (Switch Transformer's, as transformers computes it for `.aux_loss`), unweighted."""
    config = model.config
    experts = getattr(model, "num_experts", None) or getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None) or getattr(config, "num_experts_per_tok", None)
    mask = attention_mask if attention_mask is None or attention_mask.dim() == 2 else None
    return _balancing_loss(type(model))(router_logits, experts, top_k, mask)


def mlm_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logit_positions: Optional[torch.Tensor]
) -> ModelOutputs:
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

    def __init__(
        self,
        model: nn.Module,
        needs: Needs = Needs(),
        projection: str = "shared",
        target_width: Optional[int] = None,
        full_logits: bool = False,
        logit_loss: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.model = model
        self.needs = needs
        self.logit_loss = logit_loss  # chunked logit losses: the ChunkedLogitLoss over the student's head (ZeRO-3 gathers it)
        self.full_logits = full_logits  # baseline path: vocabulary logits at every position (train.logits_where_needed=false)
        self.router_aux = router_aux_coefficient(model) > 0  # an MoE student: its load-balancing loss from each forward
        self.capture = AttentionCapture(model, needs.attention_layers) if needs.attention_layers else None
        if needs.projected:
            if target_width is None:
                raise ModelError("projected hidden states need the teacher's width")
            width, depth = model.config.hidden_size, model.config.num_hidden_layers
            count = {"shared": 1, "separate": 2, "per_layer": depth + 1}[projection]
            self.projections = nn.ModuleList([nn.Linear(width, target_width) for _ in range(count)])
            # hidden_states[i] (0 = embeddings) -> projection index
            self._projection_of = [min(i, count - 1) for i in range(depth + 1)]

    def forward(self, input_ids, attention_mask, logit_positions=None, documents=None):
        out = model_forward(
            self.model,
            input_ids,
            attention_mask,
            logit_positions,
            self.needs,
            self.capture,
            self.full_logits,
            head_input=self.logit_loss is not None,
            documents=documents,
            router_aux=self.router_aux,
        )
        result = {"hidden": out.hidden, "logits": out.logits, "head_input": out.head_input, "aux_loss": out.aux_loss}
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
        return ModelOutputs(
            hidden=result["hidden"],
            logits=result["logits"],
            hidden_states=result.get("hidden_states"),
            projected=result.get("projected"),
            attention=attention,
            causal=is_causal(self.model),
            head_input=result.get("head_input"),
            head=self.logit_loss,
            aux_loss=result.get("aux_loss"),
        )


# ----------------------------------------------------------------------------------------------
# Teacher


def load_teacher_config(path: str):
    """The teacher's Hugging Face config (config.json only: no weights), of a family this job knows (any causal LM)."""
    return load_model_config(path, "teacher.path")


def load_model_config(path: str, key: str):
    """The config (config.json only) of the model directory that setting `key` names: a local directory, no remote code,
    a masked LM of a known family or any causal LM whose decoder layers can be found; one-line ModelErrors otherwise."""
    from transformers import AutoConfig  # transformers: not at start-up

    if not os.path.isdir(path):
        raise ModelError(
            f"{key} {path!r} is not a local directory; this job never downloads. On a machine with internet run "
            f"`hf download {path} --local-dir DIR` (or save_pretrained) and set {key}=DIR"
        )
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ModelError(f"{key} {path!r} has no config.json; point it at a directory written by save_pretrained")
    try:
        with open(os.path.join(path, "config.json")) as handle:
            json.load(handle)
    except Exception as exc:
        first = first_line(exc)
        raise ModelError(
            f"{key} {path!r} could not be loaded as a masked or causal LM (config.json: {first}); check the directory holds a "
            f"complete Hugging Face checkpoint"
        ) from None
    refuse_remote_code(path, key)
    try:
        config = AutoConfig.from_pretrained(path, **LOCAL_ONLY)
    except Exception as exc:  # transformers raises many types for unreadable configs
        first = first_line(exc)
        raise ModelError(
            f"{key} {path!r} could not be loaded as a masked or causal LM (config.json: {first}); check the directory holds a "
            f"complete Hugging Face checkpoint"
        ) from None
    check_layout(config, f"{key} {path}")
    return config


def check_layout(config, label: str) -> bool:
    """A model of `config` is one this job can drive: a known family, and (a causal LM on the generic path) its shape in
    config.json, its decoder layers and their attention and MLP found, by building it on the meta device (no memory, no
    weights). True, or a one-line ModelError naming `label` and what is missing."""
    family = _family(config)
    try:
        family.shape(config)
        if family.generic:
            from transformers import AutoModelForCausalLM  # transformers: not at start-up
            from transformers.initialization import no_init_weights  # transformers: not at start-up

            with torch.device("meta"), no_init_weights():  # a 70B config in a fraction of a second
                model = AutoModelForCausalLM.from_config(config)
            blocks = family.layer_list(model)
            for block in {type(b): b for b in blocks}.values():  # one of each kind of block
                block_layout(block)
            if not isinstance(getattr(family.vocab_projection(model), "weight", None), torch.Tensor):
                raise FamilyError(f"a {config.model_type} model's output embeddings have no weight: no vocabulary projection to distil")
    except FamilyError as exc:
        raise ModelError(f"{label}: {exc}") from None
    except Exception as exc:  # transformers raises many types for configs it cannot build
        first = first_line(exc)
        raise ModelError(f"{label}: transformers cannot build a {config.model_type} causal LM from its config.json ({first})") from None
    return True


def check_positions(config, max_seq_len: int, label: str, data: str) -> bool:
    """A model of `config` takes sequences of the dataset's max_seq_len (its position table is long enough): True, else a ModelError."""
    positions = _family(config).shape(config).get("max_position_embeddings")
    if positions and positions < max_seq_len:
        raise ModelError(
            f"{label} has {positions} positions (config.json max_position_embeddings) but {data} holds sequences of up to {max_seq_len} "
            f"tokens (its max_seq_len); prepare the data again with distill-prep --max-seq-len {positions} (or less), or use a model "
            f"with at least {max_seq_len} positions"
        )
    return True


def attention_kernel(config, wanted: str) -> str:
    """`wanted`, or eager where the family has no SDPA kernel (Gemma 2: its attention softcap) and sdpa was asked for."""
    if wanted != "sdpa":
        return wanted
    import transformers  # transformers: not at start-up

    model_class = getattr(transformers, _family(config).auto_class)._model_mapping.get(type(config), None)
    if model_class is not None and not getattr(model_class, "_supports_sdpa", True):
        log.info("%s has no SDPA attention kernel: using eager attention", model_class.__name__)
        return "eager"
    return wanted


def load_teacher(path: str, dtype: torch.dtype, attn_implementation: str, device: torch.device) -> nn.Module:
    """Load a local masked-LM or causal-LM checkpoint of a known family with `from_pretrained`, frozen: eval mode, no
    gradients; its logits checked against what this job computes from its hidden states (`check_logits`)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM  # transformers: not at start-up

    config = load_teacher_config(path)
    auto = AutoModelForCausalLM if _family(config).causal else AutoModelForMaskedLM
    try:
        teacher = auto.from_pretrained(
            path, config=config, **LOCAL_ONLY, dtype=dtype, attn_implementation=attention_kernel(config, attn_implementation)
        )
    except Exception as exc:  # transformers raises many types for unreadable checkpoints
        first = first_line(exc)
        raise ModelError(
            f"teacher {path!r} could not be loaded as a masked or causal LM ({first}); check the directory holds a complete Hugging Face checkpoint"
        ) from None
    teacher.eval()
    teacher.requires_grad_(False)
    teacher = teacher.to(device)
    check_logits(teacher, f"teacher {path}")
    return teacher


PROBE_TOKENS = 4


@torch.no_grad()
def check_logits(model: nn.Module, label: str) -> float:
    """Prove that `model(...).logits` are what this job computes from its last hidden states — the family's head (and
    head transform), then its output transform (`Family.logits`) — so that no loss, eval or cache drops a transform the
    model's forward makes (a scaling, a softcap, anything between the head and `.logits`).

    One forward of the whole model over PROBE_TOKENS tokens, with two values injected by forward hooks (so the model's
    weights do not matter): the decoder's output is replaced by large random hidden states, and the vocabulary
    projection's output by large random logits (a softcap of 30 changes logits of +-60 by half). The projection's
    input must then be the family's head transform of the injected states, and `.logits` the output transform of the
    injected logits. Returns the largest difference; a one-line ModelError naming `label` when it is not small."""
    family = _family(model)
    base, head = family.base_model(model), family.vocab_projection(model)
    param = next(model.parameters())
    if param.is_meta:
        return 0.0  # shapes only (the memory estimate): nothing to run
    generator = torch.Generator().manual_seed(0)
    width, rows = model.config.hidden_size, head.weight.shape[0]
    hidden = (torch.randn(1, PROBE_TOKENS, width, generator=generator) * 3).to(param.device, param.dtype)
    raw = (torch.randn(1, PROBE_TOKENS, rows, generator=generator) * 30).to(param.device, param.dtype)
    seen = {}

    def replace_hidden(module, args, output):
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        output["last_hidden_state"] = hidden
        return output

    def record_input(module, args):
        seen["input"] = args[0]

    def replace_logits(module, args, output):
        return raw.to(output.dtype)

    handles = [
        base.register_forward_hook(replace_hidden),
        head.register_forward_pre_hook(record_input),
        head.register_forward_hook(replace_logits),
    ]
    was_training = model.training
    model.eval()
    try:
        ids = torch.arange(PROBE_TOKENS, device=param.device)[None] % rows
        logits = model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    expected_input = family.head_transform(model, hidden) if family.head_transform is not None else hidden
    transform = family.output_transform(model.config)
    expected = transform(raw.float()) if transform is not None else raw.float()
    tolerance = 1e-4 if param.dtype in (torch.float32, torch.float64) else 3e-2
    problems = []
    got_input = seen.get("input")
    if got_input is None or got_input.shape != expected_input.shape:
        problems.append("its vocabulary projection does not read the decoder's output")
        worst = float("inf")
    else:
        worst = float((got_input.float() - expected_input.float()).abs().max() / expected_input.float().abs().max().clamp(min=1))
        if worst > tolerance:
            problems.append(f"the input of its vocabulary projection is not the decoder's output (relative difference {worst:.3g})")
    if logits.shape[-1] != rows:
        problems.append(f"its logits have {logits.shape[-1]} columns, its vocabulary projection {rows} rows")
    else:
        diff = float((logits.float() - expected).abs().max() / expected.abs().max().clamp(min=1))
        worst = max(worst, diff)
        if diff > tolerance:
            problems.append(
                f"its forward changes the projection's logits in a way this job does not reproduce (relative difference {diff:.3g} "
                f"after {transform})"
            )
    if problems:
        raise ModelError(
            f"{label}: a {model.config.model_type} model's logits are not what this job computes from its hidden states: "
            f"{'; '.join(problems)}; register a Family with its head and output transform (docs/decoder-llms.md, adding a family)"
        )
    return worst


# ----------------------------------------------------------------------------------------------
# Student


def default_init_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers including the first and last (12 -> 6 gives 0,2,4,7,9,11)."""
    if student_layers == 1:
        return [teacher_layers - 1]
    return [int(i * (teacher_layers - 1) / (student_layers - 1) + 0.5) for i in range(student_layers)]


def _teacher_num_layers(teacher) -> int:
    return _family(teacher).shape(_config(teacher))["num_layers"]


def student_depth(cfg, teacher: Optional[nn.Module]) -> Optional[int]:
    """student.num_layers, else the length of student.init_layers, else half the teacher's layers."""
    if cfg.num_layers:
        return cfg.num_layers
    if cfg.init_layers:
        return len(cfg.init_layers)
    return _teacher_num_layers(teacher) // 2 if teacher is not None else None


def init_layers_for(cfg, teacher: nn.Module, student_layers: int) -> list[int]:
    """Teacher layers copied into the student: student.init_layers, else the student.init_mapping strategy."""
    try:
        return resolve_layers(
            cfg.init_mapping,
            _teacher_num_layers(teacher),
            student_layers,
            cfg.init_layers,
            key="student.init_layers" if cfg.init_layers else "student.init_mapping",
        )
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def build_student(
    cfg, teacher: Optional[nn.Module], vocab_size: int, pad_token_id: int, max_seq_len: int, tokenizer_vocab: Optional[int] = None
) -> nn.Module:
    """Create the student model of section `student` against the teacher (a model or only its config): random weights
    shaped like the teacher unless the student's settings say otherwise (`init_student_from_teacher` copies weights
    after), or the checkpoint at student.path."""
    return make_student(
        student_config(cfg, teacher, vocab_size, pad_token_id, max_seq_len, tokenizer_vocab), cfg.attn_implementation, cfg.path
    )


def make_student(config, attn_implementation: str, path: Optional[str] = None) -> nn.Module:
    """The student model of a config decided by `student_config` (the run's plan holds it): random weights, or the
    checkpoint at `path` (student.path, in fp32 like a fresh student); its logits checked (`check_logits`)."""
    import transformers  # transformers: not at start-up

    auto = getattr(transformers, _family(config).auto_class)
    kernel = attention_kernel(config, attn_implementation)
    if path is None:
        model = auto.from_config(config, attn_implementation=kernel)
    else:
        try:
            model = auto.from_pretrained(path, config=config, **LOCAL_ONLY, dtype=torch.float32, attn_implementation=kernel)
        except Exception as exc:  # transformers raises many types for unreadable checkpoints
            first = first_line(exc)
            raise ModelError(
                f"student.path {path!r} could not be loaded as a {config.model_type} model ({first}); check the directory holds a "
                f"complete Hugging Face checkpoint"
            ) from None
        model.train()
    check_logits(model, f"student.path {path}" if path else f"the {config.model_type} student")
    return model


def student_family(cfg, teacher: Optional[Any]) -> Family:
    """The student's family: student.architecture (a masked-LM family, or any causal model type), `same` = the teacher's;
    null = the teacher's for a causal teacher, distilbert for a masked-LM teacher or none."""
    t_family = _family(teacher) if teacher is not None else None
    name = cfg.architecture
    if name == "same" and t_family is None:
        raise ModelError("student.architecture=same needs a teacher (same = the teacher's family); name a family, e.g. bert or llama")
    if name in (None, "same"):
        name = t_family.name if t_family is not None and (t_family.causal or name == "same") else "distilbert"
    family = family_named(name)
    if family is None:
        raise ModelError(
            f"student.architecture={name!r} is neither a masked-LM family here (bert, distilbert, roberta) nor a causal model type "
            f"transformers builds; use same (the teacher's), one of those, or a causal model type such as llama"
        )
    if t_family is not None and t_family.causal != family.causal:
        raise ModelError(
            f"a {t_family.name} ({'causal' if t_family.causal else 'masked'}) teacher needs a student of the same kind; "
            f"student.architecture={name} is {'causal' if family.causal else 'masked'}"
        )
    return family


def student_config(
    cfg, teacher: Optional[Any], vocab_size: int, pad_token_id: int, max_seq_len: int, tokenizer_vocab: Optional[int] = None
):
    """The student's Hugging Face config (section `student` against the teacher's model or config): every shape rule, no
    weights. With student.path, the checkpoint's own config (`path_student_config`)."""
    if cfg.path:
        return path_student_config(cfg.path, teacher, max_seq_len, tokenizer_vocab)
    family = student_family(cfg, teacher)
    teacher_config = _config(teacher) if teacher is not None else None
    shape = student_shape(
        teacher_config,
        {
            "hidden_size": cfg.hidden_size,
            "num_heads": cfg.num_heads,
            "intermediate_size": cfg.intermediate_size,
            "num_layers": student_depth(cfg, teacher),
            "max_position_embeddings": cfg.max_position_embeddings,
        },
    )
    if cfg.num_kv_heads:
        shape["num_kv_heads"] = cfg.num_kv_heads
    elif cfg.num_heads:
        shape["num_kv_heads"] = cfg.num_heads  # a student with its own head count: as many key/value heads unless told
    shape.setdefault("max_position_embeddings", max_seq_len)
    needed = ("hidden_size", "num_heads", "num_layers") + (("intermediate_size",) if not family.generic else ())
    if not all(shape.get(k) for k in needed):
        raise ModelError("student shape incomplete: set student.hidden_size, num_heads, intermediate_size and num_layers")
    if shape["hidden_size"] % shape["num_heads"]:
        raise ModelError(f"student.hidden_size={shape['hidden_size']} is not divisible by student.num_heads={shape['num_heads']}")
    if shape["max_position_embeddings"] < max_seq_len:
        raise ModelError(
            f"student has {shape['max_position_embeddings']} positions but the dataset's max_seq_len is {max_seq_len}; "
            f"raise student.max_position_embeddings"
        )
    layers = None  # the teacher layer each student layer stands for: its per-layer config lists (layer_types, ...) follow them
    if family.generic and teacher_config is not None and _family(teacher_config) is family:
        layers = init_layers_for(cfg, teacher_config, shape["num_layers"])
    try:
        config = student_config_for(
            family.name, teacher_config, shape, vocab_size, pad_token_id, cfg.dropout, cfg.attn_implementation, layers=layers
        )
    except FamilyError as exc:
        raise ModelError(str(exc)) from None
    return config


def path_student_config(path: str, teacher: Optional[Any], max_seq_len: int, tokenizer_vocab: Optional[int]):
    """The config of the user's own student (student.path): a local directory, no remote code, a model of the teacher's
    kind (causal or masked, any family and size), a vocabulary projection with at least the tokenizer's tokens, positions
    for the dataset's sequences. Its config is kept as it is (and so exported)."""
    config = load_model_config(path, "student.path")
    family = _family(config)
    if teacher is not None and _family(teacher).causal != family.causal:
        kind = "causal" if family.causal else "masked"
        raise ModelError(
            f"student.path {path!r} is a {kind} LM ({config.model_type}) but the teacher ({_config(teacher).model_type}) is not; "
            f"distil into a student of the teacher's kind"
        )
    rows = family.shape(config)["vocab_size"]
    if tokenizer_vocab is not None and rows < tokenizer_vocab:
        raise ModelError(
            f"student.path {path!r} has {rows} vocabulary rows (config.json vocab_size) but the dataset's tokenizer has {tokenizer_vocab} "
            f"tokens; it was not made for this tokenizer: use a student of the teacher's tokenizer"
        )
    check_positions(config, max_seq_len, f"student.path {path}", "the dataset")
    return config


@torch.no_grad()
def init_student_from_teacher(
    student: nn.Module,
    teacher: nn.Module,
    layers: list[int],
    fold_token_type: bool = True,
    weights: Optional[Mapping[str, torch.Tensor]] = None,
) -> dict[str, str]:
    """Copy embeddings, teacher layers `layers` (in order) and the LM head into the student (distill/models/families.py says how).

    `weights`: the teacher's tensors by state-dict name, read one at a time (a partitioned teacher gathers each on access);
    None = `teacher.state_dict()`. Returns the student-key -> teacher-key map that was applied (used by tests and logged).
    """
    check_init(student, teacher, layers)
    try:
        return init_from_teacher(student, teacher, layers, fold_token_type, weights)
    except FamilyError as exc:
        raise ModelError(str(exc)) from None


def check_init(student, teacher, layers: list[int]) -> None:
    """Copying `layers` of the teacher into the student needs its width and one layer per student layer (models or configs)."""
    t_family, s_family = _family(teacher), _family(student)
    if t_family.name not in s_family.init_from:
        raise ModelError(
            f"a {s_family.name} student cannot be initialised from a {t_family.name} teacher (it can from: "
            f"{', '.join(s_family.init_from) or 'none'}); use student.init=random"
        )
    t_shape = t_family.shape(_config(teacher))
    s_shape = s_family.shape(_config(student))
    if s_shape["hidden_size"] != t_shape["hidden_size"]:
        raise ModelError(
            f"student.init=teacher needs the teacher's width {t_shape['hidden_size']}, the student has {s_shape['hidden_size']}; "
            f"use student.init=random"
        )
    if len(layers) != s_shape["num_layers"]:
        raise ModelError(f"student.init_layers has {len(layers)} entries for a {s_shape['num_layers']}-layer student")
    bad = [i for i in layers if not 0 <= i < t_shape["num_layers"]]
    if bad:
        raise ModelError(f"student.init_layers {bad} out of range for a {t_shape['num_layers']}-layer teacher")


def check_data_fits(model, packing: str) -> None:
    """A causal model trains on causally packed data (`distill-prep --packing causal`), a masked LM on the others."""
    model_type = _config(model).model_type
    causal = _family(model).causal
    if causal and packing != "causal":
        raise ModelError(
            f"a {model_type} (causal) model needs a dataset prepared with `distill-prep --packing causal`; this one is packed {packing!r}"
        )
    if not causal and packing == "causal":
        raise ModelError(
            f"the dataset is packed for causal LMs (--packing causal) but the model is a masked LM ({model_type}); "
            f"re-run distill-prep with --packing document"
        )


def check_teacher_fits(path: str, teacher, packing: str) -> bool:
    """The teacher (a model or its config) is the kind of LM the dataset was packed for; a one-line ModelError naming it otherwise."""
    family = _family(teacher)
    if family.causal and packing != "causal":
        raise ModelError(
            f"teacher {path!r} is a causal LM ({family.name}) but the dataset is packed {packing!r} for masked LMs; prepare the "
            f"data with `distill-prep --packing causal --tokenizer {path}`"
        )
    if not family.causal and packing == "causal":
        raise ModelError(
            f"teacher {path!r} is a masked LM ({family.name}), not a causal LM, but the dataset is packed for causal LMs; use a "
            f"causal-LM teacher (any model AutoModelForCausalLM builds) or prepare the data with --packing document"
        )
    return True


def enable_activation_checkpointing(model: nn.Module, every: int = 1) -> list[int]:
    """Recompute the activations of every `every`-th transformer layer of `model` (layers 0, every, 2 every, ...) in
    backward instead of keeping them: transformers' own activation checkpointing (GradientCheckpointingLayer), non-reentrant
    (torch.utils.checkpoint, use_reentrant=False). Non-reentrant because the forward then builds the usual autograd
    graph (only the saved tensors are dropped and recomputed): what forward hooks capture inside a layer (AttentionCapture's
    q/k/v) and the hidden states keep their gradients, and dropout draws the same masks again (the RNG state is restored
    for the recomputation). Returns the checkpointed layers."""
    family = _family(model)
    if every < 1:
        raise ModelError(f"activation checkpointing every {every} layers: give a stride of 1 or more")
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(
            f"{type(model).__name__} does not support activation checkpointing in transformers; set train.activation_checkpointing=0"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.2x (gradient_checkpointing_enable before)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    blocks = family.layer_list(model)
    if not all(hasattr(block, "gradient_checkpointing") for block in blocks):
        raise ModelError(
            f"the layers of {type(model).__name__} cannot be checkpointed one by one here; set train.activation_checkpointing=0"
        )
    for index, block in enumerate(blocks):
        block.gradient_checkpointing = index % every == 0
    return [index for index in range(len(blocks)) if index % every == 0]


def compile_encoder(model: nn.Module) -> None:
    """`torch.compile` the transformer body of `model` in place (`nn.Module.compile`: parameter names, and so
    checkpoints and ZeRO's hooks on the module tree, stay as they are); the vocabulary head stays eager
    because the number of logit positions changes every micro batch."""
    _family(model).base_model(model).compile(dynamic=True)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
