"""Expected peak memory per rank of a run, from shapes only (no weights): what `distill-train --check` prints.

The arithmetic of the README's "8B -> 4B on N nodes" table made a function. Parameters are counted on meta-device
models (exact, tied weights once); everything else is per-token arithmetic:

- student states, bytes per parameter: weights w, gradients g, fp32 master m and Adam m+v (8); bf16/fp16 w = g = 2,
  m = 4; fp32 w = g = 4 and DeepSpeed's ZeRO still keeps its own fp32 partition (m = 4). At the step DeepSpeed also
  holds the gradient partition in fp32 (4), and on a CPU torch's unfused AdamW two temporaries (8). Stage 1 divides m, Adam and the fp32 gradient by the ranks R, stage 2 also
  g, stage 3 everything (plus what is gathered at once: ZeRO-3 gathers one module at a time, the embedding, each
  layer, the head, so the largest of them; DeepSpeed's prefetch bucket, 50M elements in configs/deepspeed/zero3.json,
  may add up to one more bucket, not counted).
- teacher: its weights in its dtype, on every rank (replicated) or 1/R of them plus what is gathered at once
  (partitioned: the largest module, as for the student, plus the gathered copy of its head that the chunked losses
  receive for the micro batch); its forward runs without autograd, so only one layer's activations live at a time.
- student activations kept for backward: elements per token per layer (BERT/GPT-2: 8h + 2f, plus dropout masks and,
  where attention probabilities are materialised, the heads x seq probabilities, twice with dropout (before and after
  it, + the mask): eager attention, and SDPA with dropout on a CPU, where torch falls back to its math kernel (its
  flash kernel for CPUs has no dropout; the CUDA kernels have); gated MLPs (Llama, Mistral, Qwen): 6h + 2 kv + 4f)
  x micro batch x max_seq_len (full windows: an upper bound with padding) x layers. With activation checkpointing
  (train.activation_checkpointing = k: every k-th layer) a checkpointed layer keeps only its input, h per token, and
  backward recomputes one layer's full set at a time; q/k/v captured for the attention losses (tinybert_attn: every
  layer, minilm_*: one) stay alive until the loss's backward either way, so they are added when checkpointing. The
  other setting is printed beside the total for comparison. bench/activation_checkpointing.py measures both.
- logit buffers: chunked logit losses ~3.5 fp32 (chunk x vocab) buffers plus the fp32 head gradient; full logits
  4 fp32 (positions x vocab) tensors (teacher and student logits, a softmax, the gradient); with mixed precision
  the head gradient summed in fp32 too.
Not covered: the CUDA context, allocator slack and fragmentation, the libraries (on a CPU: the interpreter, torch,
DeepSpeed, transformers), the data loader. On a CPU the measured peak RSS of a small BERT run
(tests/e2e/test_memory_estimate.py: estimate 553 MiB, measured 687 MiB above the libraries; 563 MiB once SDPA's
probabilities under dropout on a CPU were counted, measured 720 MiB in that run) is ~130-160 MiB (~20%) above the
estimate, not located: neither the TensorBoard writer (+5 MiB) nor the gloo process group (+6 MiB); the likely rest
is host-side transients (the teacher's checkpoint read, DeepSpeed's flattening copies at engine start, the
allocator's unreturned pages), which are not device memory on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from distill.models.build import is_causal, make_student, resolve_dtype
from distill.objective.chunked_logits import CHUNK_ELEMENTS

GIB = 2**30
GATED_MLP = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral", "qwen2_moe", "olmo", "olmo2")


@dataclass
class MemoryEstimate:
    """Bytes per rank by component; `total` is the run as configured, `alternatives` other settings' totals."""

    world_size: int
    zero_stage: int
    parts: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    alternatives: dict[str, float] = field(default_factory=dict)
    total: float = 0.0

    def lines(self) -> list[str]:
        out = [f"expected peak memory per rank ({self.world_size} rank{'s' if self.world_size > 1 else ''}, ZeRO-{self.zero_stage}):"]
        for name, value in self.parts.items():
            out.append(f"  {name:<40} {value / GIB:>8.2f} GiB   {self.notes.get(name, '')}".rstrip())
        out.append(f"  {'total':<40} {self.total / GIB:>8.2f} GiB   (+ CUDA context, allocator slack, libraries, data loader)")
        for name, value in self.alternatives.items():
            out.append(f"  {name:<40} {value / GIB:>8.2f} GiB")
        return out


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_teacher(teacher_config) -> Optional[torch.nn.Module]:
    if teacher_config is None:
        return None
    with torch.device("meta"):  # the family's own auto class (Family.auto_class), shapes only
        return make_student(teacher_config, "sdpa")


def _shape(config) -> dict[str, int]:
    h = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    f = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or h // heads)
    return {"h": h, "heads": heads, "f": f, "layers": layers, "kv": kv, "vocab": config.vocab_size}


def _modules(config, params: int) -> tuple[float, float, float]:
    """Parameters of (the token embedding, one layer, the untied head: 0 when tied) of a model of `params` parameters."""
    s = _shape(config)
    embedding = s["vocab"] * s["h"]
    head = 0 if getattr(config, "tie_word_embeddings", True) else embedding
    return embedding, (params - embedding - head) / max(1, s["layers"]), head


def materialises_probabilities(attn_implementation: str, dropout: float, device_type: str) -> bool:
    """Whether a training forward keeps the (heads x seq x seq) attention probabilities: eager attention, or SDPA with
    dropout on a CPU (torch's math fallback: its CPU flash kernel takes no dropout)."""
    return attn_implementation == "eager" or (attn_implementation == "sdpa" and dropout > 0 and device_type == "cpu")


def activation_elements_per_token_layer(config, seq: int, eager: bool, dropout: float) -> tuple[float, float]:
    """(elements kept for backward per token per layer in the activation dtype, one-byte dropout-mask elements)."""
    s = _shape(config)
    h, f, heads = s["h"], s["f"], s["heads"]
    if getattr(config, "model_type", "") in GATED_MLP:
        elements = 6 * h + 2 * s["kv"] + 4 * f  # norms in/out, q, k, v, attention out, gate, up, act(gate), product
        masks = 0.0
    else:
        elements = 8 * h + 2 * f  # qkv input, q, k, v, attention out, two layer norms' inputs, fc1 input, fc1 out, act out
        masks = 2 * h if dropout > 0 else 0.0
    if eager:  # attention probabilities, and with dropout the dropped copy the product with v keeps + the mask
        elements += heads * seq * (2 if dropout > 0 else 1)
        masks += heads * seq if dropout > 0 else 0.0
    return elements, masks


def captured_layers(weights: dict[str, float], student_layers: int) -> int:
    """Student layers whose q/k/v the attention losses hold until their backward (tinybert_attn: all; minilm_*: the last)."""
    if weights.get("tinybert_attn", 0) > 0:
        return student_layers
    return 1 if any(weights.get(name, 0) > 0 for name in ("minilm_attn", "minilm_value")) else 0


def student_activation_bytes(
    config, tokens: int, seq: int, act_bytes: int, eager: bool, dropout: float, every: int = 0, captured: int = 0
) -> tuple[float, str]:
    """(bytes the student keeps for backward, how): per layer, or with checkpointing of every `every`-th layer (0: none)
    its input only plus one layer recomputed at a time and the q/k/v of `captured` layers; plus the embeddings' output and
    the final hidden states."""
    s = _shape(config)
    elem, masks = activation_elements_per_token_layer(config, seq, eager, dropout)
    per_token_layer = elem * act_bytes + masks
    per_layer = tokens * per_token_layer
    ends = tokens * 2 * s["h"] * act_bytes
    if not every:
        return per_layer * s["layers"] + ends, f"{per_token_layer:,.0f} B/token/layer x {tokens:,} tokens x {s['layers']} layers"
    checkpointed = len(range(0, s["layers"], every))
    kept = s["layers"] - checkpointed
    qkv = captured * tokens * (s["h"] + 2 * s["kv"]) * act_bytes
    total = checkpointed * tokens * s["h"] * act_bytes + (kept + 1) * per_layer + qkv + ends
    how = (
        f"checkpointed every {every}: {checkpointed} layers x {s['h'] * act_bytes:,} B/token (their input)"
        + (f" + {kept} x {per_token_layer:,.0f}" if kept else "")
        + f" + one recomputed ({per_token_layer:,.0f}), {tokens:,} tokens"
        + (f" + q/k/v of {captured} layers" if captured else "")
    )
    return total, how


def estimate_memory(
    cfg,
    world_size: int,
    student: torch.nn.Module,
    teacher_config: Any,
    zero_stage: int,
    precision: torch.dtype,
    teacher_dtype: torch.dtype,
    max_seq_len: int,
    vocab_size: int,
    causal: bool,
    device_type: str = "cuda",
) -> MemoryEstimate:
    """Expected peak bytes per rank of `cfg` on `world_size` ranks; `student` may live on the meta device."""
    R = max(1, world_size)
    est = MemoryEstimate(world_size=R, zero_stage=zero_stage)
    mixed = precision in (torch.bfloat16, torch.float16)
    act_b = 2 if mixed else 4
    w, g, m, adam, g32 = (2, 2, 4, 8, 4) if mixed else (4, 4, 4, 8, 4)
    P_s = _count(student)
    if zero_stage == 0:
        per_param = w + g + m + adam + g32
    elif zero_stage == 1:
        per_param = w + g + (m + adam + g32) / R
    elif zero_stage == 2:
        per_param = w + (g + m + adam + g32) / R
    else:
        per_param = (w + g + m + adam + g32) / R
    s = _shape(student.config)
    est.parts["student states"] = P_s * per_param
    est.notes["student states"] = f"{P_s / 1e6:,.1f}M params x {per_param:.1f} B (w {w} g {g} master {m} Adam {adam} fp32 grad {g32})"
    if device_type == "cpu":  # torch's unfused AdamW (fused on CUDA) allocates sqrt(v) and its quotient at the step
        est.parts["optimizer step temporaries"] = P_s * 8 / (1 if zero_stage == 0 else R)
        est.notes["optimizer step temporaries"] = "CPU: unfused AdamW, 8 B/param of the partition"
    if zero_stage == 3:
        est.parts["student gathered (ZeRO-3)"] = max(_modules(student.config, P_s)) * w
        est.notes["student gathered (ZeRO-3)"] = "the largest module (embedding, a layer, the head): one at a time"

    tokens = cfg.train.micro_batch * max_seq_len
    chunked = cfg.loss.chunked_logits and cfg.train.logits_where_needed and causal
    teacher = _meta_teacher(teacher_config)
    t_bytes = torch.finfo(teacher_dtype).bits // 8
    teacher_extra = 0.0
    if teacher is not None:
        P_t = _count(teacher)
        t = _shape(teacher_config)
        replicated = P_t * t_bytes
        embedding, layer, head = _modules(teacher_config, P_t)
        head_copy = (head or embedding) if chunked else 0  # the chunked losses read the teacher's projection outside its forward
        gathered = (max(embedding, layer, head) + head_copy) * t_bytes
        partitioned = P_t * t_bytes / R + gathered
        use_partition = cfg.teacher.source == "partitioned" and R > 1
        est.parts["teacher weights"] = partitioned if use_partition else replicated
        est.notes["teacher weights"] = f"{P_t / 1e6:,.1f}M params x {t_bytes} B " + (
            f"/ {R} + gathered {gathered / GIB:.2f} GiB" if use_partition else "(replicated)"
        )
        t_eager = cfg.teacher.attn_implementation == "eager"
        t_elem, _ = activation_elements_per_token_layer(teacher_config, max_seq_len, t_eager, 0.0)
        teacher_extra = tokens * (t_elem + 2 * t["h"]) * t_bytes  # one layer's transient + hidden states handed to the losses
        est.parts["teacher activations"] = teacher_extra
        est.notes["teacher activations"] = "one layer at a time (no autograd) + its outputs"
        other_teacher = replicated if use_partition else partitioned

    dropout = float(getattr(cfg.student, "dropout", 0.0) or 0.0)
    eager = materialises_probabilities(cfg.student.attn_implementation, dropout, device_type)
    every = cfg.train.activation_checkpointing
    captured = captured_layers(cfg.loss.weights, s["layers"])
    args = (student.config, tokens, max_seq_len, act_b, eager, dropout)
    full_act, full_how = student_activation_bytes(*args)
    ckpt_act, ckpt_how = student_activation_bytes(*args, every=every or 1, captured=captured)
    est.parts["student activations"] = ckpt_act if every else full_act
    est.notes["student activations"] = ckpt_how if every else full_how

    V = max(vocab_size, s["vocab"])
    if causal or cfg.loss.ce_positions == "all" or not cfg.train.logits_where_needed:
        positions = tokens
    else:
        positions = tokens * cfg.data.mlm_probability
    if chunked:
        chunk = min(positions, max(1, CHUNK_ELEMENTS // V))
        head_sum = V * s["h"] * 4 if mixed else 0  # the head gradient summed in fp32 (in fp32: the gradient itself, counted above)
        logits = 3.5 * chunk * V * 4 + head_sum
        est.notes["logit buffers"] = f"chunked: ~3.5 fp32 buffers of {chunk:,.0f} x {V:,}" + (" + fp32 head gradient" if mixed else "")
    else:
        logits = 4 * positions * V * 4
        est.notes["logit buffers"] = f"full logits: 4 fp32 tensors of {positions:,.0f} positions x {V:,}"
    est.parts["logit buffers"] = logits
    est.total = sum(est.parts.values())
    est.alternatives = {
        **(
            {"total without activation checkpointing": est.total - ckpt_act + full_act}
            if every
            else {"total with activation checkpointing": est.total - full_act + ckpt_act}
        ),
        **(
            {
                "total, teacher " + ("replicated" if use_partition else "partitioned"): est.total
                - est.parts["teacher weights"]
                + other_teacher
            }
            if teacher is not None
            else {}
        ),
    }
    return est


def estimate_from_preflight(cfg, world_size: int, device: torch.device, pf) -> Optional[MemoryEstimate]:
    """The estimate for what `distill.train.preflight.preflight` read (None when it could not build the student)."""
    if pf.student_config is None or pf.manifest is None or pf.ds_config is None:
        return None
    with torch.device("meta"):  # shapes only: no weights, no memory
        student = make_student(pf.student_config, cfg.student.attn_implementation)
    return estimate_memory(
        cfg,
        world_size,
        student,
        pf.teacher_config,
        int(pf.ds_config.get("zero_optimization", {}).get("stage", 0)),
        resolve_dtype(cfg.train.precision, device),
        resolve_dtype(cfg.teacher.dtype, device),
        pf.manifest.max_seq_len,
        pf.vocab_size or student.config.vocab_size,
        is_causal(student),
        device.type,
    )
