"""The pruned student itself: its config (the teacher's, with the student's shape), the model built from it and filled
with the teacher's sliced tensors, and the checks that it is what was asked.

The config is the teacher's config.json with the shape's keys changed (by their standard names: a config's
`attribute_map` turns them into GPT-2's n_embd or DistilBERT's dim), head_dim set to the teacher's (heads are kept whole,
rotary dims with them), and the per-layer lists (`layer_types`, `mlp_only_layers`, ...) of the kept layers
(distill.models.families.per_layer_lists). Everything else — norms' epsilon, rope settings, tying, the output transform,
the special ids — is the teacher's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from distill.models.families import Family, per_layer_lists
from distill.prune.shape import Shape, Teacher, experts_key
from distill.prune.slice import Keep, PruneError, slice_state

INTERMEDIATE_KEYS = {"gpt2": "n_inner", "distilbert": "hidden_dim"}  # the MLP width's config key where it is not intermediate_size


def pruned_config(teacher_config: Any, family: Family, teacher: Teacher, shape: Shape, layers: list[int]) -> Any:
    """The student's config: the teacher's with `shape`, its per-layer lists following the kept `layers`."""
    values = teacher_config.to_dict()
    for key in ("_name_or_path", "transformers_version"):
        values.pop(key, None)
    if family.generic:
        values = per_layer_lists(values, teacher.shape.num_layers, layers)
    names = getattr(teacher_config, "attribute_map", {}) or {}
    values[names.get("hidden_size", "hidden_size")] = shape.hidden_size
    values[names.get("num_attention_heads", "num_attention_heads")] = shape.num_heads
    values[names.get("num_hidden_layers", "num_hidden_layers")] = shape.num_layers
    if family.generic:
        values["num_key_value_heads"] = shape.num_kv_heads
        values["head_dim"] = teacher.geometry.head_dim
    if shape.intermediate_size is not None:
        values[INTERMEDIATE_KEYS.get(teacher_config.model_type, "intermediate_size")] = shape.intermediate_size
    key = experts_key(teacher_config)
    if key is not None and shape.num_experts is not None:
        values[names.get(key, key)] = shape.num_experts
    config = type(teacher_config).from_dict(values)
    config._attn_implementation = getattr(teacher_config, "_attn_implementation", None) or "eager"
    return config


def build_student(teacher_model: nn.Module, family: Family, config: Any) -> nn.Module:
    """A model of the pruned config, in the teacher's dtype, its weights not yet set (filled by `fill`)."""
    import transformers  # transformers: not at start-up

    auto = getattr(transformers, family.auto_class)
    dtype = next(teacher_model.parameters()).dtype
    try:
        student = auto.from_config(config, dtype=dtype, attn_implementation=config._attn_implementation)
    except Exception as exc:  # transformers raises many types for configs it cannot build
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PruneError(f"transformers cannot build a {config.model_type} model of the pruned shape ({first})") from None
    return student.eval()


def fill(teacher_model: nn.Module, student: nn.Module, family: Family, teacher: Teacher, keep: Keep) -> dict[str, str]:
    """Every tensor of `student` set from the teacher's (distill/prune/slice.py); tied weights tied again."""
    made = slice_state(teacher_model, student, family, keep, teacher.geometry)
    student.tie_weights()
    return made


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
