"""Typed run configuration of distill-train: sections loaded from YAML, overridable with `key.sub=value`.

Built on the one config mechanism every command shares (kd_common/config.py): each field has a doc (shown
by `distill-train --help` and `--help-config`) and its bounds; loading checks names, types, finiteness and
ranges of every key, then every cross-field rule (`Config.problems`), and reports all problems at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import Field

from kd_common.config import Bool, ConfigError, Float, Int, Str, build, describe, load, parse_overrides, section, setting
from kd_common.output_rule import OutputError, check_no_overlap

PARTITION_DEPRECATED = "teacher.partition is deprecated: use teacher.source=partitioned"

__all__ = ["Config", "ConfigError", "batch_problem", "load_config", "config_from_dict", "describe_fields", "parse_overrides", "validate"]


# the student settings that build a student of their own: student.path (the user's checkpoint) excludes them
STUDENT_SHAPE_KEYS = (
    "architecture",
    "num_layers",
    "init_layers",
    "hidden_size",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "max_position_embeddings",
)

# logit kinds a teacher-logit cache can feed (ce: the student's own cross-entropy)
CACHEABLE_KINDS = ("forward_kl", "reverse_kl", "jsd", "ce")


@section
class TeacherConfig:
    path: Optional[Str] = setting(
        None,
        "local Hugging Face masked-LM directory (config.json + weights); null = no teacher (plain MLM pretraining), or with teacher.source=cache the teacher the cache records",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = setting("auto", "teacher weights dtype; auto = bf16 on GPU, fp32 on CPU")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = setting("sdpa", "attention kernel of the teacher")
    inference_mode: Bool = setting(
        True,
        "run the teacher's forward under torch.inference_mode (no autograd bookkeeping at all); false = torch.no_grad (the benchmark's baseline path). Same values either way",
    )
    source: Literal["online", "partitioned", "cache"] = setting(
        "online",
        "where the teacher's outputs come from: online = the model replicated on every rank; partitioned = the model's parameters split across the data-parallel ranks, ZeRO-3 style (each rank loads and holds about 1/N, never the whole teacher, host or device; each module's parameters gathered just before it runs, never in an optimizer: for a teacher too big to replicate on every GPU; needs 2 or more ranks and safetensors weights, costs an all-gather per teacher module per micro batch; distill/teachers/partitioned.py); cache = a sparse cache of its distribution written once by distill-cache (teacher.cache; logit losses only; teacher.path is optional: the cache records the teacher's config, tokenizer and identity, a teacher.path given is checked against it, and its weights are read only for student.init=teacher)",
    )
    partition: Bool = setting(False, "deprecated: true is teacher.source=partitioned (say that instead)")
    cache: Optional[Str] = setting(None, "with teacher.source=cache: the directory distill-cache wrote (for this dataset and teacher)")
    cache_verify: Bool = setting(True, "with teacher.source=cache: re-hash every cache part against its sha256 at start")

    def __post_init__(self) -> None:
        """The deprecated `teacher.partition: true` read as `teacher.source: partitioned` (once, here; `problems` refuses it beside cache)."""
        if self.partition and self.source != "cache":
            if self.source == "online":
                logging.getLogger("distill.config").warning(PARTITION_DEPRECATED)
            self.source, self.partition = "partitioned", False

    def problems(self) -> list[str]:
        if self.partition:  # left only beside source=cache
            return [f"{PARTITION_DEPRECATED}; it excludes teacher.source={self.source}: drop teacher.partition"]
        return []


@section
class StudentConfig:
    path: Optional[Str] = setting(
        None,
        "your own student: a local Hugging Face directory (any family and size the teacher's tokenizer serves; its config.json is the student's, kept at export; its head may be padded to another size than the teacher's). Excludes student.init, architecture and the shape keys; dropout, init_mapping and fold_token_type_embeddings do not apply (docs/decoder-llms.md)",
    )
    architecture: Optional[Str] = setting(
        None,
        "student model family (distill/models/families.py): distilbert or bert for BERT-family teachers; for a causal teacher any causal model type transformers builds (llama, gemma2, qwen3_moe, ...); same = the teacher's; null = the teacher's for a causal teacher, else distilbert",
    )
    init: Optional[Literal["teacher", "random"]] = setting(
        None,
        "copy embeddings, chosen layers and the LM head from the teacher, or random init; null = teacher when there is a teacher (and no student.path), else random",
    )
    num_layers: Optional[Int] = setting(None, "student depth; null = half the teacher's layers", ge=1)
    init_layers: Optional[list[Annotated[Int, Field(ge=0)]]] = setting(
        None, "teacher layers copied into the student, in order (0-based); null = chosen by student.init_mapping"
    )
    init_mapping: Literal["spread", "every_other", "first", "last", "uniform"] = setting(
        "spread",
        "which teacher layers initialise the student when init_layers is null: spread = evenly spaced incl. first and last (12->6: 0,2,4,7,9,11, the DistilBERT release), every_other = 0,2,4,..., first = the first k (Patient-KD), last = the last k, uniform = every (N/M)-th ending at the last",
    )
    hidden_size: Optional[Int] = setting(None, "student width; null = the teacher's (required without a teacher)", ge=1)
    num_heads: Optional[Int] = setting(None, "attention heads; null = the teacher's", ge=1)
    num_kv_heads: Optional[Int] = setting(
        None, "key/value heads of decoder families (grouped-query attention); null = the teacher's, or num_heads when that is set", ge=1
    )
    intermediate_size: Optional[Int] = setting(None, "feed-forward width; null = the teacher's", ge=1)
    max_position_embeddings: Optional[Int] = setting(None, "null = the teacher's, or the dataset's max_seq_len without a teacher", ge=1)
    dropout: Float = setting(0.1, "dropout of hidden states and attention probabilities", ge=0, lt=1)
    fold_token_type_embeddings: Bool = setting(
        True,
        "add the teacher's token-type-0 embedding to the student's position embeddings, so the student's embedding output equals the teacher's (DistilBERT dropped it)",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = setting("sdpa", "attention kernel of the student")


@section
class DataConfig:
    path: Optional[Str] = setting(None, "prepared dataset directory written by distill-prep (required)")
    split: Str = setting("train", "split to train on")
    verify_checksums: Bool = setting(False, "re-hash every shard against the manifest at start (slow on large corpora)")
    mlm_probability: Float = setting(0.15, "fraction of each sequence's maskable tokens selected for prediction", gt=0, lt=1)
    mask_token_fraction: Float = setting(0.8, "of the selected tokens: fraction replaced by [MASK]", ge=0, le=1)
    random_token_fraction: Float = setting(
        0.1, "of the selected tokens: fraction replaced by a random token (the rest stay unchanged)", ge=0, le=1
    )
    token_frequency_smoothing: Float = setting(0.7, "select tokens with probability ~ count^-s (DistilBERT: 0.7); 0 = uniform", ge=0)
    whole_word_masking: Bool = setting(False, "select whole words (all their sub-tokens) instead of single tokens")
    masking: Literal["batched", "per_sequence"] = setting(
        "batched",
        "how the masks are drawn: batched = the whole micro batch in array operations from counter-based random numbers (a hash of seed, sample and position); per_sequence = one generator per sequence (before issue 16, and distill-eval's masks). Same statistics, different masks: a run resumed across the change draws the new masks from then on",
    )
    static_masks: Int = setting(
        0,
        "masked-LM data: 0 = dynamic masking (a fresh mask every time a sequence is seen; the default, as RoBERTa); D > 0 = static masks, BERT's dupe factor: each sequence has D fixed masks and the sample of row r seen in epoch e uses variant d = e mod D, drawn by the same function as the dynamic masks at key d * N + r (N = rows of the split), so the same statistics. Needed by teacher.source=cache on masked-LM data (equal to the cache's distill-cache --static-masks); also allowed with an online teacher",
        ge=0,
        le=255,
    )
    group_by_length: Bool = setting(
        True,
        "within each global batch, give micro batches sequences of similar length (less padding; the set of samples per step is unchanged)",
    )
    length_group_steps: Int = setting(
        1,
        "with group_by_length: pool the samples of this many consecutive steps, sort them by length and give each step one length bucket (steps in a seeded order), so micro batches have nearly equal lengths even with a small global batch (Hugging Face's length-grouped sampler); 1 = group only within each step. Changes which samples share a step",
        ge=1,
    )
    pad_to_multiple_of: Optional[Int] = setting(
        None,
        "pad each micro batch to a multiple of this length; null = 8 on GPU (tensor-core shapes), 1 on CPU (no padding beyond the longest sequence)",
        ge=1,
    )
    num_workers: Optional[Int] = setting(None, "data-loader worker processes per rank; null = 2 on GPU, 0 on CPU", ge=0)
    pin_memory: Optional[Bool] = setting(
        None, "page-locked host batches so host-to-GPU copies run asynchronously; null = on with a GPU, off on CPU"
    )
    prefetch_factor: Int = setting(4, "micro batches each data-loader worker prepares ahead (only with num_workers > 0)", ge=1)
    cache_dir: Optional[Str] = setting(None, "where the Arrow cache of the shards goes; null = the Hugging Face datasets cache")
    document_attention: Bool = setting(
        True,
        "causal data: keep the documents packed into a row apart: position ids restart at each document and attention never "
        "crosses one (student and teacher; flash attention's varlen kernel on GPU, a block-diagonal mask with sdpa/eager), and a "
        "document's last token predicts nothing. false = each row is one sequence (before issue 25). A teacher cache must "
        "have been written with the same setting (distill-cache --document-attention / --no-document-attention)",
    )


@section
class LossConfig:
    weights: dict[str, Annotated[Float, Field(ge=0)]] = setting(
        {"ce": 5.0, "mlm": 2.0, "cos": 1.0},
        "loss name -> weight; registered losses: see distill/objective/losses.py (DistilBERT: ce 5, mlm 2, cos 1)",
    )
    temperature: Float = setting(2.0, "softmax temperature of the soft-target loss (scaled by T^2)", gt=0)
    ce_positions: Literal["all", "masked"] = setting(
        "all", "positions of the soft-target loss: all non-padding tokens (the DistilBERT release) or masked tokens only"
    )
    layer_map: Optional[Literal["spread", "every_other", "first", "last", "uniform", "pruned"]] = setting(
        None,
        "teacher layer distilled into each student layer by the layer-wise losses (pkd, tinybert_*): uniform = TinyBERT's g(m)=m*N/M and PKD-Skip, last = PKD-Last, first, every_other, spread (see distill/models/layer_map.py); pruned = the teacher layer each layer of a pruned student was cut from (student.path written by distill-prune: its prune.json); null = pruned for a pruned student, else uniform",
    )
    layer_map_layers: Optional[list[Annotated[Int, Field(ge=0)]]] = setting(
        None, "explicit teacher layers (0-based), one per student layer; overrides loss.layer_map"
    )
    pkd_include_last: Bool = setting(
        False,
        "pkd: also pair the student's last layer (Sun et al. leave it to the output losses: PKD-Skip 12->6 uses teacher layers 2,4,6,8,10)",
    )
    projection: Literal["shared", "separate", "per_layer"] = setting(
        "shared",
        "tinybert_*: trainable maps of student hidden states to the teacher's width; shared = one matrix for embeddings and every layer (TinyBERT's released code), separate = W_e plus one W_h (the paper), per_layer = W_e plus one per layer. Dropped at export",
    )
    chunked_logits: Bool = setting(
        True,
        "compute the logit losses (ce, reverse_kl, jsd, mlm, clm) from the hidden states and the LM-head weights, a chunk of positions at a time, fused into one sweep: no (positions x vocabulary) tensor of the micro batch is ever alive whole (same values; distill/objective/chunked_logits.py). false = materialise the logits",
    )
    chunk_positions: Optional[Int] = setting(
        None,
        "positions per chunk of the chunked logit losses; null = about 2^26 logits per chunk (512 positions at a 128k vocabulary)",
        ge=1,
    )
    jsd_beta: Float = setting(
        0.5, "jsd: the generalized Jensen-Shannon divergence's beta (TRL / Liger convention): 0 = forward KL, 1 = reverse KL", ge=0, le=1
    )
    attention_teacher_layer: Int = setting(
        -1,
        "minilm_*: teacher layer (0-based; negative counts from the end) whose self-attention the student's last layer mimics; -1 = last (MiniLM v1)",
    )


@section
class OptimConfig:
    lr: Float = setting(5e-4, "peak learning rate (DistilBERT: 5e-4)", gt=0, le=1)
    weight_decay: Float = setting(0.0, "AdamW weight decay (not applied to biases and LayerNorm)", ge=0, le=1)
    betas: list[Annotated[Float, Field(ge=0, lt=1)]] = setting([0.9, 0.98], "AdamW betas")
    eps: Float = setting(1e-6, "AdamW epsilon", gt=0)
    warmup_fraction: Float = setting(0.05, "fraction of the steps with linear warmup, then linear decay to 0", ge=0, lt=1)
    grad_clip: Float = setting(5.0, "gradient clipping (global norm); 0 = off", ge=0)


@section
class TrainConfig:
    global_batch: Int = setting(4096, "sequences per optimizer step over all ranks (DistilBERT: ~4k)", ge=1)
    micro_batch: Int = setting(16, "sequences per rank per forward pass; gradient accumulation = global / (micro x ranks)", ge=1)
    max_steps: Optional[Int] = setting(None, "optimizer steps; null = derived from epochs", ge=1)
    epochs: Float = setting(3.0, "passes over the training split when max_steps is null", gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto", "student precision; auto = bf16 on GPUs that support it, fp32 on CPU"
    )
    log_every: Int = setting(10, "steps between log lines / TensorBoard points", ge=1)
    halt_at_step: Optional[Int] = setting(
        None, "checkpoint and exit once this step is reached; the same command later resumes (time-sliced clusters, tests)", ge=1
    )
    logits_where_needed: Bool = setting(
        True,
        "apply the vocabulary projection only to the hidden states at the positions some loss reads (gathered first); false = full-vocabulary logits at every position of the padded micro batch, then selected (the benchmark's baseline path: same values, far more FLOPs and memory)",
    )
    profile_phases: Bool = setting(
        False,
        "record this rank's seconds per step phase (data, teacher forward, student forward, loss, backward, optimizer, comm) in metrics.jsonl, synchronising the device at each phase boundary and making collectives blocking: a diagnosis that slows the step (bench/train_throughput.py --profile)",
    )
    max_nonfinite_steps: Int = setting(
        0,
        "steps whose loss or gradient norm is not finite that may be skipped (no update, counted as train/skipped_steps) before the run stops; 0 = stop at the first, before any checkpoint is written. Skipping relies on DeepSpeed's overflow check (on with ZeRO >= 1 in fp32, turned on here for bf16); a non-finite update that was applied anyway always stops the run",
        ge=0,
    )
    lean_startup: Bool = setting(
        True,
        "start-up without work the run does not need: DeepSpeed's optimizer check answered without importing its Muon optimizer (whose import compiles kernels), the teacher's config and weights read by its family's class instead of the auto classes. false = as before (bench/train_throughput.py --ablate)",
    )
    collective_timeout_s: Optional[Float] = setting(
        None,
        "seconds a collective (all-reduce, broadcast, barrier) waits for the other ranks before the run ends (init_process_group's timeout); a rank whose heartbeat (OUTPUT/heartbeat/) is silent for half of it (stopped by SIGSTOP, frozen, its node gone) is named by the others, which end the run with exit code 3 (distill/train/heartbeat.py). null = 1800 with GPUs (a save of a large ZeRO-3 checkpoint or rank 0's universal-checkpoint conversion keeps the others waiting at a collective for minutes; torch's NCCL default is 600), 600 on CPU (gloo: small models and saves of seconds; a stopped rank is named after 300 s, where gloo's own default would wait 1800). Must exceed the longest wait of a healthy run",
        ge=10,
    )
    compile: Bool = setting(
        False,
        "torch.compile the teacher's and the student's transformer (in place: parameter names and checkpoints are unchanged); costs compile time at start and for new sequence lengths",
    )
    activation_checkpointing: Int = setting(
        0,
        "recompute the student's layer activations in backward instead of keeping them from the forward (transformers' activation checkpointing, non-reentrant torch.utils.checkpoint): 0 = off; k = every k-th transformer layer (layers 0, k, 2k, ...). 1 = every layer: a layer then keeps only its input (a Llama layer of width 4096: ~8 KB per token instead of ~170 KB in bf16) for about one more student forward per step; 2 = every other layer: about half the saving for half the recomputation. Same losses and gradients (dropout masks are drawn again identically). distill-train --check prints the activations with and without it; bench/activation_checkpointing.py measures both",
        ge=0,
    )


@section
class CheckpointConfig:
    every_steps: Int = setting(500, "steps between checkpoints (one is always written at the end)", ge=1)
    keep_last: Int = setting(3, "complete checkpoints kept; older ones are deleted (0 = keep all)", ge=0)


@section
class DeepSpeedConfig:
    config: Optional[Str] = setting(
        None,
        "DeepSpeed JSON (ZeRO and communication settings); batch sizes, optimizer, scheduler, precision and clipping are filled in from this file",
    )
    zero_stage: Optional[Int] = setting(None, "ZeRO stage 0-3; overrides the JSON's zero_optimization.stage (default 2)", ge=0, le=3)
    lean_single_process: Bool = setting(
        True,
        "with one process at ZeRO-1/2: DeepSpeed runs ZeRO-1 without overlap_comm, contiguous_gradients and reduce_scatter (no per-parameter gradient hooks or buckets in backward); checkpoints keep the configured stage in their state and DeepSpeed's layout, so resume and the universal conversion are unchanged. false = the JSON as written (bench/train_throughput.py --ablate)",
    )


@section
class Config:
    output_dir: Optional[Str] = setting(
        None, "run directory: checkpoints, TensorBoard logs, resolved config; rerunning the same command resumes"
    )
    seed: Int = setting(56, "seed of data order, masking and dropout (DistilBERT: 56)", ge=0, le=2**63 - 1)
    teacher: TeacherConfig = setting(TeacherConfig, "teacher settings")
    student: StudentConfig = setting(StudentConfig, "student settings")
    data: DataConfig = setting(DataConfig, "data settings")
    loss: LossConfig = setting(LossConfig, "loss settings")
    optim: OptimConfig = setting(OptimConfig, "optim settings")
    train: TrainConfig = setting(TrainConfig, "train settings")
    checkpoint: CheckpointConfig = setting(CheckpointConfig, "checkpoint settings")
    deepspeed: DeepSpeedConfig = setting(DeepSpeedConfig, "deepspeed settings")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def cache_problems(self) -> list[str]:
        """The rules of `teacher.source: cache` that need only the config."""
        # torch (via distill.objective.losses): not at start-up
        from distill.objective.losses import LOSSES  # torch: imported when a config is checked, not when this module is

        p = []
        if not self.teacher.cache:
            p.append("teacher.source=cache needs teacher.cache (the directory distill-cache wrote)")
        # teacher.path is optional here: the cache's manifest records the teacher's config, tokenizer and identity; when given,
        # the teacher there is checked against it. Only reading the teacher's weights needs it (`reads_teacher_weights`).
        live = sorted(
            n
            for n, w in self.loss.weights.items()
            if w > 0 and n in LOSSES and LOSSES[n].needs_teacher and LOSSES[n].logit_kind not in CACHEABLE_KINDS
        )
        if live:
            p.append(
                f"losses {live} need the live teacher's hidden states or attention, which a cache does not hold; with teacher.source=cache use "
                f"the logit losses (ce, reverse_kl, jsd, clm) or set teacher.source=online"
            )
        if not (self.loss.chunked_logits and self.train.logits_where_needed):
            p.append(
                "teacher.source=cache computes its losses in the chunked sweep: keep loss.chunked_logits=true and train.logits_where_needed=true"
            )
        return p

    @property
    def teacher_from_cache(self) -> bool:
        """teacher.source=cache with a cache: the cache stands for the teacher (its outputs, config, tokenizer, identity)."""
        return self.teacher.source == "cache" and bool(self.teacher.cache)

    def reads_teacher_weights(self) -> bool:
        """Whether the run reads the teacher's weights for more than its outputs: student.init=teacher copies its layers. (A
        student from its own checkpoint, student.path, reads none.) With teacher.source=cache, nothing else
        needs the teacher's files, so teacher.path is required only when this is true."""
        return self.student_init() == "teacher"

    def problems(self) -> list[str]:
        """Every cross-field rule of a run, each written once (field bounds are checked by the loader)."""
        from distill.objective.losses import LOSSES  # torch (via distill.objective.losses): not at start-up

        p: list[str] = []
        if not self.output_dir:
            p.append("output_dir is required (where checkpoints and logs go)")
        if not self.data.path:
            p.append("data.path is required (a directory written by distill-prep)")
        unknown = sorted(set(self.loss.weights) - set(LOSSES))
        if unknown:
            p.append(f"loss.weights names unknown losses {unknown} (registered: {sorted(LOSSES)})")
        if not any(w > 0 for w in self.loss.weights.values()):
            p.append("loss.weights must give at least one loss a positive weight")
        needs_teacher = sorted(n for n, w in self.loss.weights.items() if w > 0 and n in LOSSES and LOSSES[n].needs_teacher)
        has_teacher = bool(self.teacher.path) or self.teacher_from_cache  # a cache records the teacher's config
        if needs_teacher and not has_teacher:
            p.append(f"losses {needs_teacher} need a teacher: set teacher.path or set their weights to 0")
        if self.reads_teacher_weights() and not self.teacher.path:
            p.append(
                "student.init=teacher needs teacher.path (or use student.init=random)"
                + ("; a teacher cache holds no weights" if self.teacher_from_cache else "")
            )
        if not has_teacher and not self.student.path and not self.student.hidden_size:
            p.append("without a teacher, give the student's shape: student.hidden_size, num_heads, intermediate_size, num_layers")
        if not has_teacher and not self.student.path and not self.student.num_layers:
            p.append("without a teacher, student.num_layers is required")
        p += self.student_path_problems()
        if self.data.mask_token_fraction + self.data.random_token_fraction > 1:
            p.append("data.mask_token_fraction + data.random_token_fraction must be within [0, 1]")
        problem = batch_problem(self.train.global_batch, self.train.micro_batch)
        if problem:
            p.append(problem)
        if len(self.optim.betas) != 2:
            p.append("optim.betas must have two values")
        if self.teacher.source == "cache":
            p += self.cache_problems()
        if self.student.init_layers is not None and self.student_init() != "teacher" and not self.student.path:
            p.append("student.init_layers only applies with student.init=teacher")
        if self.output_dir:
            p += output_overlap_problems(
                self.output_dir,
                [
                    ("data.path", self.data.path),
                    ("teacher.path", self.teacher.path),
                    ("teacher.cache", self.teacher.cache),
                    ("student.path", self.student.path),
                ],
            )
        return p

    def student_init(self) -> str:
        """How the student's weights start: "teacher" (layers copied), "random", or "path" (student.path's checkpoint)."""
        if self.student.path:
            return "path"
        if self.student.init is not None:
            return self.student.init
        return "teacher" if self.teacher.path else "random"

    def student_path_problems(self) -> list[str]:
        """student.path is the student, weights and config: the keys that would build or fill another one are refused."""
        s = self.student
        if not s.path:
            return []
        p = []
        if s.init is not None:
            p.append(
                f"student.path and student.init={s.init} exclude each other: the student's weights are student.path's; drop student.init"
            )
        shaped = [k for k in STUDENT_SHAPE_KEYS if getattr(s, k) is not None]
        if shaped:
            p.append(
                f"student.path and {', '.join('student.' + k for k in shaped)} exclude each other: the student's family and shape are "
                f"its config.json's; drop {'them' if len(shaped) > 1 else 'it'}"
            )
        return p


def output_overlap_problems(output_dir: str, inputs: list[tuple[str, Optional[str]]]) -> list[str]:
    """The output rule every command holds (kd_common/output_rule.py): output_dir is not an input, not inside one, and holds none."""
    try:
        check_no_overlap(output_dir, [(name, path) for name, path in inputs if path], "output_dir")
    except OutputError as exc:
        return [str(exc)]
    return []


def batch_problem(global_batch: int, micro_batch: int, world_size: Optional[int] = None) -> Optional[str]:
    """The one rule of batch sizes: global batch = micro batch x ranks x accumulation (ranks unknown: x 1 at least)."""
    per_step = micro_batch * (world_size or 1)
    if per_step < 1 or global_batch % per_step == 0:
        return None
    if world_size is None:
        return f"train.global_batch={global_batch} is not a multiple of train.micro_batch={micro_batch}"
    return (
        f"train.global_batch={global_batch} is not divisible by train.micro_batch={micro_batch} x {world_size} ranks = {per_step}; "
        f"use a global batch that is a multiple of {per_step}, or another micro batch"
    )


def load_config(path: Optional[str], overrides: list[str] | None = None, values: Optional[dict[str, Any]] = None) -> Config:
    """Load a YAML recipe, apply `key.sub=value` overrides (and `values`, e.g. from flags); check everything at once."""
    return load(Config, path, overrides, values, replace=("weights",))  # a weights override replaces the whole mapping


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `to_dict()` (checkpoints store it)."""
    return build(Config, data)


def validate(config: Config) -> None:
    """Check a Config built in code against every rule (loading does this already)."""
    build(Config, config.to_dict())


def describe_fields() -> list[str]:
    """One line per config key with its default, help and bounds (for `distill-train --help-config`)."""
    return describe(Config)


# The DeepSpeed JSON the recipe points at (deepspeed.config): the settings the recipe owns must not be in it.
RECIPE_OWNED_DS_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "gradient_clipping",
    "bf16",
    "fp16",
)


def read_deepspeed_json(path: Optional[str]) -> dict[str, Any]:
    """The user's DeepSpeed JSON ({} without one); its problems as ConfigError."""
    if not path:
        return {}
    try:
        with open(path) as handle:
            base = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config {path!r} does not exist (relative paths are resolved from the current directory)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config {path!r} is not valid JSON ({exc})") from None
    if not isinstance(base, dict):
        raise ConfigError(f"deepspeed.config {path!r} must hold a JSON object")
    clashes = [k for k in RECIPE_OWNED_DS_KEYS if k in base and base[k] != "auto"]
    if clashes:
        raise ConfigError(
            f'deepspeed.config sets {clashes}; these come from the recipe (train.*, optim.*): remove them or set them to "auto"'
        )
    return base
