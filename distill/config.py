"""Typed run configuration: dataclasses loaded from YAML, overridable with `key.sub=value`.

Every field has a `help` string (shown by `distill-train --help-config`). Loading checks names and
types of every key and reports all problems at once; `validate()` then checks values.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """The configuration names an unknown key, has a wrong type or an invalid value."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field (and of each element of a list / each value of a mapping)."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, key: str, value: Any) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # type errors are reported by the loader
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key}={value!r} is not a finite number"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            return f"{key}={value!r} is out of range: it must be {self.describe()}"
        return None

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts) or "finite"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)  # [0, 1]
OPEN_FRACTION = Range(0, 1, low_open=True, high_open=True)  # (0, 1)
BELOW_1 = Range(0, 1, high_open=True)  # [0, 1)


def _f(default: Any = dataclasses.MISSING, help: str = "", range: Optional[Range] = None, **kw: Any) -> Any:
    metadata = {"help": help, "range": range}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class TeacherConfig:
    path: Optional[str] = _f(None, "local Hugging Face masked-LM directory (config.json + weights); null = no teacher (plain MLM pretraining)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "teacher weights dtype; auto = bf16 on GPU, fp32 on CPU")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _f("sdpa", "attention kernel of the teacher")
    inference_mode: bool = _f(True, "run the teacher's forward under torch.inference_mode (no autograd bookkeeping at all); false = torch.no_grad (the benchmark's baseline path). Same values either way")


@dataclass
class StudentConfig:
    architecture: Literal["distilbert", "bert", "gpt2"] = _f("distilbert", "student model class: DistilBertForMaskedLM, BertForMaskedLM or GPT2LMHeadModel (GPT-2 teachers)")
    init: Literal["teacher", "random"] = _f("teacher", "copy embeddings, chosen layers and MLM head from the teacher, or random init")
    num_layers: Optional[int] = _f(None, "student depth; null = half the teacher's layers", range=AT_LEAST_1)
    init_layers: Optional[list[int]] = _f(None, "teacher layers copied into the student, in order (0-based); null = chosen by student.init_mapping", range=NON_NEGATIVE)
    init_mapping: Literal["spread", "every_other", "first", "last", "uniform"] = _f("spread", "which teacher layers initialise the student when init_layers is null: spread = evenly spaced incl. first and last (12->6: 0,2,4,7,9,11, the DistilBERT release), every_other = 0,2,4,..., first = the first k (Patient-KD), last = the last k, uniform = every (N/M)-th ending at the last")
    hidden_size: Optional[int] = _f(None, "student width; null = the teacher's (required without a teacher)", range=AT_LEAST_1)
    num_heads: Optional[int] = _f(None, "attention heads; null = the teacher's", range=AT_LEAST_1)
    intermediate_size: Optional[int] = _f(None, "feed-forward width; null = the teacher's", range=AT_LEAST_1)
    max_position_embeddings: Optional[int] = _f(None, "null = the teacher's, or the dataset's max_seq_len without a teacher", range=AT_LEAST_1)
    dropout: float = _f(0.1, "dropout of hidden states and attention probabilities", range=BELOW_1)
    fold_token_type_embeddings: bool = _f(True, "add the teacher's token-type-0 embedding to the student's position embeddings, so the student's embedding output equals the teacher's (DistilBERT dropped it)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _f("sdpa", "attention kernel of the student")


@dataclass
class DataConfig:
    path: Optional[str] = _f(None, "prepared dataset directory written by distill-prep (required)")
    split: str = _f("train", "split to train on")
    verify_checksums: bool = _f(False, "re-hash every shard against the manifest at start (slow on large corpora)")
    mlm_probability: float = _f(0.15, "fraction of each sequence's maskable tokens selected for prediction", range=OPEN_FRACTION)
    mask_token_fraction: float = _f(0.8, "of the selected tokens: fraction replaced by [MASK]", range=FRACTION)
    random_token_fraction: float = _f(0.1, "of the selected tokens: fraction replaced by a random token (the rest stay unchanged)", range=FRACTION)
    token_frequency_smoothing: float = _f(0.7, "select tokens with probability ~ count^-s (DistilBERT: 0.7); 0 = uniform", range=NON_NEGATIVE)
    whole_word_masking: bool = _f(False, "select whole words (all their sub-tokens) instead of single tokens")
    group_by_length: bool = _f(True, "within each global batch, give micro batches sequences of similar length (less padding; the set of samples per step is unchanged)")
    length_group_steps: int = _f(1, "with group_by_length: pool the samples of this many consecutive steps, sort them by length and give each step one length bucket (steps in a seeded order), so micro batches have nearly equal lengths even with a small global batch (Hugging Face's length-grouped sampler); 1 = group only within each step. Changes which samples share a step", range=AT_LEAST_1)
    pad_to_multiple_of: int = _f(8, "pad each micro batch to a multiple of this length", range=AT_LEAST_1)
    num_workers: Optional[int] = _f(None, "data-loader worker processes per rank; null = 2 on GPU, 0 on CPU", range=NON_NEGATIVE)
    pin_memory: Optional[bool] = _f(None, "page-locked host batches so host-to-GPU copies run asynchronously; null = on with a GPU, off on CPU")
    prefetch_factor: int = _f(4, "micro batches each data-loader worker prepares ahead (only with num_workers > 0)", range=AT_LEAST_1)
    cache_dir: Optional[str] = _f(None, "where the Arrow cache of the shards goes; null = the Hugging Face datasets cache")


@dataclass
class LossConfig:
    weights: dict[str, float] = _f({"ce": 5.0, "mlm": 2.0, "cos": 1.0}, "loss name -> weight; registered losses: see distill/losses.py (DistilBERT: ce 5, mlm 2, cos 1)", range=NON_NEGATIVE)
    temperature: float = _f(2.0, "softmax temperature of the soft-target loss (scaled by T^2)", range=POSITIVE)
    ce_positions: Literal["all", "masked"] = _f("all", "positions of the soft-target loss: all non-padding tokens (the DistilBERT release) or masked tokens only")
    layer_map: Literal["spread", "every_other", "first", "last", "uniform"] = _f("uniform", "teacher layer distilled into each student layer by the layer-wise losses (pkd, tinybert_*): uniform = TinyBERT's g(m)=m*N/M and PKD-Skip, last = PKD-Last, first, every_other, spread (see distill/layer_map.py)")
    layer_map_layers: Optional[list[int]] = _f(None, "explicit teacher layers (0-based), one per student layer; overrides loss.layer_map", range=NON_NEGATIVE)
    pkd_include_last: bool = _f(False, "pkd: also pair the student's last layer (Sun et al. leave it to the output losses: PKD-Skip 12->6 uses teacher layers 2,4,6,8,10)")
    projection: Literal["shared", "separate", "per_layer"] = _f("shared", "tinybert_*: trainable maps of student hidden states to the teacher's width; shared = one matrix for embeddings and every layer (TinyBERT's released code), separate = W_e plus one W_h (the paper), per_layer = W_e plus one per layer. Dropped at export")
    attention_teacher_layer: int = _f(-1, "minilm_*: teacher layer (0-based; negative counts from the end) whose self-attention the student's last layer mimics; -1 = last (MiniLM v1)")


@dataclass
class OptimConfig:
    lr: float = _f(5e-4, "peak learning rate (DistilBERT: 5e-4)", range=Range(0, 1, low_open=True))
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and LayerNorm)", range=FRACTION)
    betas: list[float] = _f([0.9, 0.98], "AdamW betas", range=BELOW_1)
    eps: float = _f(1e-6, "AdamW epsilon", range=POSITIVE)
    warmup_fraction: float = _f(0.05, "fraction of the steps with linear warmup, then linear decay to 0", range=BELOW_1)
    grad_clip: float = _f(5.0, "gradient clipping (global norm); 0 = off", range=NON_NEGATIVE)


@dataclass
class TrainConfig:
    global_batch: int = _f(4096, "sequences per optimizer step over all ranks (DistilBERT: ~4k)", range=AT_LEAST_1)
    micro_batch: int = _f(16, "sequences per rank per forward pass; gradient accumulation = global / (micro x ranks)", range=AT_LEAST_1)
    max_steps: Optional[int] = _f(None, "optimizer steps; null = derived from epochs", range=AT_LEAST_1)
    epochs: float = _f(3.0, "passes over the training split when max_steps is null", range=POSITIVE)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f("auto", "student precision; auto = bf16 on GPUs that support it, fp32 on CPU")
    log_every: int = _f(10, "steps between log lines / TensorBoard points", range=AT_LEAST_1)
    halt_at_step: Optional[int] = _f(None, "checkpoint and exit once this step is reached; the same command later resumes (time-sliced clusters, tests)", range=AT_LEAST_1)
    logits_where_needed: bool = _f(True, "apply the vocabulary projection only to the hidden states at the positions some loss reads (gathered first); false = full-vocabulary logits at every position of the padded micro batch, then selected (the benchmark's baseline path: same values, far more FLOPs and memory)")
    profile_phases: bool = _f(False, "record this rank's seconds per step phase (data, teacher forward, student forward, loss, backward, optimizer, comm) in metrics.jsonl, synchronising the device at each phase boundary and making collectives blocking: a diagnosis that slows the step (bench/train_throughput.py --profile)")
    max_nonfinite_steps: int = _f(0, "steps whose loss or gradient norm is not finite that may be skipped (no update, counted as train/skipped_steps) before the run stops; 0 = stop at the first, before any checkpoint is written. Skipping relies on DeepSpeed's overflow check (on with ZeRO >= 1 in fp32, turned on here for bf16); a non-finite update that was applied anyway always stops the run", range=NON_NEGATIVE)
    compile: bool = _f(False, "torch.compile the teacher's and the student's transformer (in place: parameter names and checkpoints are unchanged); costs compile time at start and for new sequence lengths")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(500, "steps between checkpoints (one is always written at the end)", range=AT_LEAST_1)
    keep_last: int = _f(3, "complete checkpoints kept; older ones are deleted (0 = keep all)", range=NON_NEGATIVE)


@dataclass
class DeepSpeedConfig:
    config: Optional[str] = _f(None, "DeepSpeed JSON (ZeRO and communication settings); batch sizes, optimizer, scheduler, precision and clipping are filled in from this file")
    zero_stage: Optional[int] = _f(None, "ZeRO stage 0-3; overrides the JSON's zero_optimization.stage (default 2)", range=Range(0, 3))


@dataclass
class Config:
    output_dir: Optional[str] = _f(None, "run directory: checkpoints, TensorBoard logs, resolved config; rerunning the same command resumes")
    seed: int = _f(56, "seed of data order, masking and dropout (DistilBERT: 56)", range=Range(0, 2**63 - 1))
    teacher: TeacherConfig = _f(default_factory=TeacherConfig)
    student: StudentConfig = _f(default_factory=StudentConfig)
    data: DataConfig = _f(default_factory=DataConfig)
    loss: LossConfig = _f(default_factory=LossConfig)
    optim: OptimConfig = _f(default_factory=OptimConfig)
    train: TrainConfig = _f(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = _f(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = _f(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks that name the key.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
            return tp()
        return _build(tp, value, key + ".", problems)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key} must be a list, got {value!r}")
            return value
        return [_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key} must be a mapping, got {value!r}")
            return value
        return {str(k): _coerce(v, args[1], f"{key}.{k}", problems) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "5e-4" as a string
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        problems.append(f"{key} must be {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            problems.append(f"unknown config key {prefix}{key}{hint}")
            continue
        kwargs[key] = _coerce(value, hints[key], prefix + key, problems)
    return cls(**kwargs)


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn `["train.max_steps=10", "loss.weights={mlm: 1}"]` into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        _set_path(nested, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "weights":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Optional[str], overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe, apply `key.sub=value` overrides, check keys and types and values."""
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path) as handle:
                data = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist; pass an existing recipe, e.g. configs/distilbert.yaml") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides or []))
    problems: list[str] = []
    config = _build(Config, data, "", problems)
    if problems:
        raise ConfigError("; ".join(problems))
    validate(config)
    return config


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `to_dict()` (checkpoints store it)."""
    problems: list[str] = []
    config = _build(Config, data, "", problems)
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def validate(config: Config) -> None:
    """Check values that types alone cannot; raise one ConfigError listing every problem."""
    from distill.losses import LOSSES

    p: list[str] = range_problems(config)
    if not config.output_dir:
        p.append("output_dir is required (where checkpoints and logs go)")
    if not config.data.path:
        p.append("data.path is required (a directory written by distill-prep)")
    unknown = sorted(set(config.loss.weights) - set(LOSSES))
    if unknown:
        p.append(f"loss.weights names unknown losses {unknown} (registered: {sorted(LOSSES)})")
    if not any(w > 0 for w in config.loss.weights.values()):
        p.append("loss.weights must give at least one loss a positive weight")
    needs_teacher = sorted(n for n, w in config.loss.weights.items() if w > 0 and n in LOSSES and LOSSES[n].needs_teacher)
    if needs_teacher and not config.teacher.path:
        p.append(f"losses {needs_teacher} need a teacher: set teacher.path or set their weights to 0")
    if config.student.init == "teacher" and not config.teacher.path:
        p.append("student.init=teacher needs teacher.path (or use student.init=random)")
    if not config.teacher.path and not config.student.hidden_size:
        p.append("without a teacher, give the student's shape: student.hidden_size, num_heads, intermediate_size, num_layers")
    if not config.teacher.path and not config.student.num_layers:
        p.append("without a teacher, student.num_layers is required")
    if config.data.mask_token_fraction < 0 or config.data.random_token_fraction < 0 or config.data.mask_token_fraction + config.data.random_token_fraction > 1:
        p.append("data.mask_token_fraction + data.random_token_fraction must be within [0, 1]")
    if config.train.global_batch % max(config.train.micro_batch, 1):
        p.append(f"train.global_batch={config.train.global_batch} is not a multiple of train.micro_batch={config.train.micro_batch}")
    if len(config.optim.betas) != 2:
        p.append("optim.betas must have two values")
    if config.student.init_layers is not None and config.student.init != "teacher":
        p.append("student.init_layers only applies with student.init=teacher")
    if p:
        raise ConfigError("; ".join(p))


def range_problems(config: Any, prefix: str = "") -> list[str]:
    """Every numeric value of `config` that is not finite or outside its field's declared range."""
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            problems += range_problems(value, key + ".")
            continue
        allowed = f.metadata.get("range") or Range()  # every float must at least be finite
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else [(None, value)]
        for sub, item in items:
            problem = allowed.problem(key if sub is None else f"{key}.{sub}" if isinstance(value, dict) else f"{key}[{sub}]", item)
            if problem:
                problems.append(problem)
    return problems


def describe_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per config key with its default and help (for `distill-train --help-config`)."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe_fields(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{prefix}{f.name} = {default!r}  # {f.metadata.get('help', '')}")
    return lines
