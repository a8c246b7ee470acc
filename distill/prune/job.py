"""distill-prune: the job. Settings, the checks that need no weights, the calibration pass (or earlier scores), the shape,
the slicing, and the output directory.

Order (every problem a user can act on is found before any heavy work, and nothing is written then):
1. the output rule (kd_common/output_rule.py): --output is no input, holds nothing (or --overwrite and a distill-prune
   output); the teacher is a local model of a family the pruner can slice (built on the meta device, its blocks read);
   an asked shape fits the teacher's heads, groups and experts; a budget is above the smallest student;
2. the calibration data: a prepared dataset (distill-prep) of the teacher's tokenizer and kind (masked or causal);
3. the teacher loaded (frozen; its logits checked as every loaded model's), the scores computed (distill/prune/importance.py)
   or read from an earlier output (--scores: bound to the teacher by its content fingerprint);
4. the shape (asked, or for --params), the kept units, the student built and filled (distill/prune/slice.py), written
   into a staging directory beside --output: save_pretrained (safetensors), the teacher's tokenizer, the scores and their
   summary, prune.json (distill/models/provenance.py); the written directory is loaded back with from_pretrained and
   must give the same logits as the student in memory; then it is moved into place.

Several processes (`deepspeed --num_gpus N --module distill.prune ...`, or torchrun) share the calibration: each scores
every N-th batch, the sums are all-reduced, and rank 0 alone slices and writes.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Literal, Optional

import numpy as np

from data_prep.manifest import (
    MANIFEST_FILE,
    TOKENIZER_DIR,
    check_tokenizer_matches,
    load_dataset_tokenizer,
    load_manifest,
    tokenizer_identity,
)
from data_prep.tokenizer_base import has_tokenizer_files
from distill.models.fingerprint import content_identity
from distill.models.provenance import FORMAT, PROVENANCE_FILE, VERSION
from kd_common.config import Bool, Float, Int, Str, section, setting
from kd_common.errors import UserError
from kd_common.files import sha256_file, write_json_atomically
from kd_common.hf_dirs import LOCAL_ONLY, refuse_remote_code
from kd_common.output_rule import check_no_overlap, check_replaceable, record_files, replace_when_complete, written_by

log = logging.getLogger("distill.prune")
COMMAND = "distill-prune"
SHAPE_SETTINGS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "num_experts")


@section
class PruneConfig:
    teacher: Str = setting(help="the teacher: a local Hugging Face directory (config.json + weights); any family distill-train takes")
    output: Str = setting(help="new directory for the pruned student (a Hugging Face model directory + prune.json + the scores)")
    data: Optional[Str] = setting(
        None,
        "prepared dataset (distill-prep output, the teacher's tokenizer) whose sequences are the calibration data; not needed with --scores",
    )
    split: Str = setting("train", "split of the dataset the calibration sequences come from")
    sequences: Int = setting(1024, "calibration sequences (Minitron: 1,024), drawn by --seed from the split", ge=1)
    batch_size: Int = setting(8, "sequences per teacher forward in the calibration pass", ge=1)
    seed: Int = setting(0, "which sequences are drawn", ge=0)
    aggregation: Literal["l2", "mean"] = setting(
        "l2",
        "how per-sequence scores (each the mean over its tokens) are combined over the sequences: l2 = sqrt of the sum of squares, mean",
    )
    layer_metric: Literal["cosine", "drop_kl"] = setting(
        "cosine",
        "how layers are ranked for depth pruning: cosine = 1 - cos(block input, block output) (one forward per batch); drop_kl = "
        "KL(teacher || teacher without the block) (one more forward per layer per batch)",
    )
    scores: Optional[Str] = setting(
        None,
        "importance scores of an earlier distill-prune run of this teacher (its output directory or its importance.safetensors): no calibration pass",
    )
    num_layers: Optional[Int] = setting(
        None, "student depth (the most important layers are kept); null = the teacher's, or chosen by --params", ge=1
    )
    hidden_size: Optional[Int] = setting(None, "student width (hidden / embedding channels kept)", ge=1)
    num_heads: Optional[Int] = setting(
        None, "attention heads (whole heads are kept; with grouped-query attention a multiple of the heads per group)", ge=1
    )
    num_kv_heads: Optional[Int] = setting(
        None, "key/value heads (grouped-query attention: whole groups are kept with their query heads)", ge=1
    )
    intermediate_size: Optional[Int] = setting(None, "MLP neurons kept per layer (dense MLPs)", ge=1)
    num_experts: Optional[Int] = setting(None, "mixture of experts: experts kept per layer, by router usage", ge=1)
    params: Optional[Float] = setting(
        None,
        "a parameter budget instead of (or beside) the shape: this fraction of the teacher's parameters (embeddings included); the shape is chosen by the rules of docs/pruning.md",
        gt=0,
        le=1,
    )
    params_tolerance: Float = setting(0.05, "with --params: the chosen shape must have at least (1 - this) x the budget", gt=0, lt=1)
    min_width: Float = setting(
        0.5, "with --params: widths are not scaled below this fraction of the teacher's before layers are removed (depth last)", gt=0, le=1
    )
    width_multiple: Int = setting(64, "with --params: hidden and MLP widths are multiples of this (smaller for small teachers)", ge=1)
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto", "where the teacher runs the calibration pass; auto = the GPU when there is one"
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto",
        "teacher dtype of the calibration pass; auto = bf16 on GPU, fp32 on CPU (scores are kept in fp64; the student is cut from the weights in the dtype they are stored in)",
    )
    partition: Bool = setting(
        False,
        "in a launch of several processes (deepspeed --num_gpus N --module distill.prune): split the teacher's parameters across "
        "them, ZeRO-3 style (each holds about 1/N; each module gathered just before it runs), for a teacher bigger than one "
        "device; without it every process holds the whole teacher and scores its share of the batches",
    )
    threads: Int = setting(0, "torch CPU threads (0 = torch's default)", ge=0)
    attn_implementation: Literal["sdpa", "eager"] = setting("sdpa", "attention kernel of the teacher in the calibration pass")
    overwrite: Bool = setting(False, "replace --output if it holds a distill-prune output, once the new one is complete")

    def asked_shape(self) -> dict:
        return {k: getattr(self, k) for k in SHAPE_SETTINGS if getattr(self, k) is not None}

    def problems(self) -> list[str]:
        p = []
        if not self.data and not self.scores:
            p.append("give --data (a prepared dataset for the calibration pass) or --scores (the scores of an earlier distill-prune run)")
        if self.params is None and not self.asked_shape():
            p.append(
                "give the student's shape (--num-layers, --hidden-size, --num-heads, --num-kv-heads, --intermediate-size, --num-experts) "
                "or a budget (--params 0.5)"
            )
        return p


class PruneRunError(UserError, ValueError):
    """Calibration data or scores that do not fit the teacher."""


def scores_file(path: str) -> str:
    from distill.prune.importance import SCORES_FILE  # torch (via distill.prune.importance): not at start-up

    return os.path.join(path, SCORES_FILE) if os.path.isdir(path) else path


def check_output(cfg: PruneConfig) -> None:
    inputs = [("--teacher", cfg.teacher), ("--data", cfg.data), ("--scores", cfg.scores)]
    check_no_overlap(cfg.output, [(n, p) for n, p in inputs if p])
    check_replaceable(cfg.output, cfg.overwrite, lambda path: written_by(path, COMMAND), "distill-prune output")


def teacher_on_meta(path: str):
    """The teacher's config and a model of it on the meta device (shapes, no weights): a one-line error for a directory that is no
    model this job knows, or a family the pruner cannot slice."""
    import torch  # torch: not at start-up
    import transformers  # transformers: not at start-up

    from distill.models.build import load_model_config  # torch (via distill.models.build): not at start-up
    from distill.models.families import family_of  # torch (via distill.models.families): not at start-up

    config = load_model_config(path, "--teacher")
    family = family_of(config)
    with torch.device("meta"):
        model = getattr(transformers, family.auto_class).from_config(config)
    return config, family, model


def calibration_data(cfg: PruneConfig, teacher_config, family):
    """The dataset's sequences (distill.data.reader.TokenSequences), the rows drawn, the pad id, and the manifest's record; one-line
    errors for data of another tokenizer or kind."""
    from distill.data.reader import TokenSequences  # torch (via distill.data.reader): not at start-up
    from distill.models.build import check_positions, check_teacher_fits  # torch: not at start-up

    manifest = load_manifest(cfg.data)
    tokenizer = load_dataset_tokenizer(cfg.data, manifest)
    if has_tokenizer_files(cfg.teacher):
        from transformers import AutoTokenizer  # transformers: not at start-up

        refuse_remote_code(cfg.teacher, "--teacher")
        own = AutoTokenizer.from_pretrained(cfg.teacher, **LOCAL_ONLY)
        check_tokenizer_matches(manifest, tokenizer_identity(own, cfg.teacher), f"teacher {cfg.teacher}")
    vocab = family.shape(teacher_config)["vocab_size"]
    if vocab < manifest.tokenizer.vocab_size:
        raise PruneRunError(
            f"--data {cfg.data} was prepared with a tokenizer of {manifest.tokenizer.vocab_size} tokens, the teacher has {vocab} vocabulary "
            f"rows: it is data of another tokenizer; prepare the calibration data with distill-prep --tokenizer {cfg.teacher}"
        )
    check_teacher_fits(cfg.teacher, teacher_config, manifest.packing)
    check_positions(teacher_config, manifest.max_seq_len, f"--teacher {cfg.teacher}", f"--data {cfg.data}")
    sequences = TokenSequences(cfg.data, cfg.split, manifest)
    sequences.id_limit = vocab
    rows = len(sequences)
    if cfg.sequences > rows:
        log.warning("--sequences %d: the %s split has %d rows; calibrating on all of them", cfg.sequences, cfg.split, rows)
    indices = np.sort(np.random.default_rng(cfg.seed).permutation(rows)[: cfg.sequences])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    record = {
        "data": os.path.abspath(cfg.data),
        "manifest_sha256": sha256_file(os.path.join(cfg.data, MANIFEST_FILE)),
        "split": cfg.split,
        "seed": cfg.seed,
        "packing": manifest.packing,
    }
    return sequences, indices, pad, record


def read_scores(cfg: PruneConfig, teacher_sha: str):
    """Scores of an earlier run (--scores), bound to this teacher by its content fingerprint."""
    from distill.prune.importance import load_scores  # torch: not at start-up

    path = scores_file(cfg.scores)
    if not os.path.isfile(path):
        raise PruneRunError(
            f"--scores {cfg.scores!r} holds no importance.safetensors; give a distill-prune output directory or its scores file"
        )
    try:
        scores, meta = load_scores(path)
    except Exception as exc:  # safetensors raises several types for a file that is not one
        raise PruneRunError(f"--scores {path} is not a distill-prune scores file ({' '.join(str(exc).split())[:160]})") from None
    if meta.get("teacher_sha256") != teacher_sha:
        raise PruneRunError(
            f"--scores {path} were computed for another teacher (content sha256 {str(meta.get('teacher_sha256'))[:12]}, --teacher has "
            f"{teacher_sha[:12]}); score this teacher (--data) instead"
        )
    if cfg.layer_metric == "drop_kl" and "layer_drop_kl" not in scores:
        raise PruneRunError(
            f"--scores {path} hold no layer_drop_kl scores; use --layer-metric cosine or score again with --layer-metric drop_kl"
        )
    return scores, meta


def _budget(cfg, teacher, counter, layers_for):
    from distill.prune.shape import budget_shape  # torch: not at start-up

    fixed = cfg.asked_shape()
    return budget_shape(teacher, counter, layers_for, cfg.params, fixed, cfg.width_multiple, cfg.min_width, cfg.params_tolerance)


def run_prune(cfg: PruneConfig) -> dict:
    """The whole job (see the module docstring); returns the provenance record written."""
    import torch  # torch: not at start-up

    from distill.models.build import load_teacher, resolve_dtype  # torch: not at start-up
    from distill.prune.importance import calibrate, partitioned  # torch: not at start-up
    from distill.prune.shape import ParameterCount, choose_keep, choose_layers, describe_teacher, resolve_shape  # torch: not at start-up
    from distill.teachers.partitioned import (  # deepspeed: not at start-up
        full_parameter_bytes,
        load_partitioned,
        local_parameter_bytes,
        zero3_inference_config,
    )

    ctx = _distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    main = ctx is None or ctx.rank == 0
    check_output(cfg)
    teacher_config, family, meta_model = teacher_on_meta(cfg.teacher)
    teacher = describe_teacher(meta_model, family)
    counter = ParameterCount(meta_model, family, teacher.geometry)
    asked = cfg.asked_shape()
    if cfg.params is None:
        resolve_shape(teacher, asked)  # the shape's problems before any work
    else:
        _budget(cfg, teacher, counter, lambda depth: list(range(depth)))  # a budget no shape meets, before any work
    world = ctx.world_size if ctx else 1
    if cfg.partition and world < 2:
        raise PruneRunError(
            "--partition splits the teacher across the processes of a launch, but this is 1 process: start 2 or more "
            "(deepspeed --num_gpus N --module distill.prune ...), or drop --partition"
        )
    identity = content_identity(cfg.teacher)
    stored = stored_dtype(teacher_config)
    model = None
    if cfg.scores:
        scores, scores_meta = read_scores(cfg, identity["sha256"])
    else:
        sequences, indices, pad, calibration = calibration_data(cfg, teacher_config, family)
        if -(-len(indices) // cfg.batch_size) < world:
            raise PruneRunError(
                f"--sequences {len(indices)} in batches of {cfg.batch_size} make fewer batches than the {world} processes; "
                f"give more sequences or a smaller --batch-size"
            )
        device = _device(cfg, ctx)
        dtype = resolve_dtype(cfg.dtype, device)
        forward = None
        if cfg.partition:
            ds_config = zero3_inference_config({"stage3_param_persistence_threshold": 0}, 1, dtype)
            model = load_partitioned(cfg.teacher, dtype, cfg.attn_implementation, ds_config)  # this process's partition only
            forward = partitioned(model, family, ds_config)
            log.info(
                "teacher partitioned across the %d processes (ZeRO-3, no optimizer): this process holds %.1f of %.1f MB",
                world,
                local_parameter_bytes(model) / 2**20,
                full_parameter_bytes(model) / 2**20,
            )
        else:
            model = load_teacher(cfg.teacher, dtype, cfg.attn_implementation, device)
        log.info("calibration: %d sequences of %s (%s) on %s, %s", len(indices), cfg.data, cfg.split, device, dtype)
        scores, timing = calibrate(
            model,
            family,
            teacher.geometry,
            sequences,
            indices,
            cfg.batch_size,
            pad,
            cfg.aggregation,
            drop_kl=cfg.layer_metric == "drop_kl",
            rank=ctx.rank if ctx else 0,
            world=world,
            forward=forward,
            device=device,
        )
        timing["partitioned"] = forward is not None
        scores_meta = {
            "teacher": os.path.abspath(cfg.teacher),
            "teacher_sha256": identity["sha256"],
            "model_type": teacher_config.model_type,
            "aggregation": cfg.aggregation,
            **calibration,
            **timing,
        }
        log.info("calibration pass: %s s, %s tokens/s", timing["seconds"], timing["tokens_per_second"])
        if forward is not None or device.type != "cpu" or next(model.parameters()).dtype != stored:
            model = None  # the student is cut from the weights as stored, on the host
    if not main:
        return {}
    if model is None:
        model = load_teacher(cfg.teacher, stored, cfg.attn_implementation, torch.device("cpu"))

    def layers_for(depth: int) -> list[int]:
        return choose_layers(scores, depth, cfg.layer_metric)

    if cfg.params is None:
        shape = resolve_shape(teacher, asked)
    else:
        shape, _ = _budget(cfg, teacher, counter, layers_for)
    layers = layers_for(shape.num_layers)
    keep = choose_keep(scores, teacher, shape, layers)
    with replace_when_complete(cfg.output, cfg.overwrite, lambda p: written_by(p, COMMAND) is True, "distill-prune output") as staging:
        record = write_student(cfg, staging, model, family, teacher, shape, keep, scores, scores_meta, identity, counter)
        record_files(staging, COMMAND)
    return record


def write_student(cfg, staging, model, family, teacher, shape, keep, scores, scores_meta, identity, counter) -> dict:
    """Build, fill, save and check the student in `staging`; its provenance record."""
    from distill.prune.importance import SCORES_FILE, SUMMARY_FILE, save_scores, summary  # torch: not at start-up
    from distill.prune.student import build_student, count_parameters, fill, pruned_config  # torch: not at start-up

    config = pruned_config(model.config, family, teacher, shape, list(keep.layers))
    student = build_student(model, family, config)
    fill(model, student, family, teacher, keep)
    student.save_pretrained(staging, safe_serialization=True)
    copy_tokenizer(cfg, staging)
    if cfg.scores:
        shutil.copyfile(scores_file(cfg.scores), os.path.join(staging, SCORES_FILE))
    else:
        save_scores(os.path.join(staging, SCORES_FILE), scores, scores_meta)
    with open(os.path.join(staging, SUMMARY_FILE), "w") as handle:
        handle.write(summary(scores, scores_meta))
    params = count_parameters(student)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "written_by": COMMAND,
        "teacher": {
            "path": os.path.abspath(cfg.teacher),
            "model_type": model.config.model_type,
            "content_sha256": identity["sha256"],
            "files": identity["files"],
        },
        "scores": {
            "file": SCORES_FILE,
            "sha256": sha256_file(os.path.join(staging, SCORES_FILE)),
            "summary": SUMMARY_FILE,
            **{k: v for k, v in scores_meta.items() if k not in ("teacher", "teacher_sha256", "format", "version")},
        },
        "shape": {"teacher": vars_of(teacher.shape), "student": vars_of(shape), "head_dim": teacher.geometry.head_dim},
        "params": {"teacher": counter.teacher, "student": params, "fraction": round(params / counter.teacher, 4), "budget": cfg.params},
        "rules": {
            "layer_metric": cfg.layer_metric,
            "norms": "norm weights of the kept hidden channels; a LayerNorm/RMSNorm then normalises over the kept channels only",
            "heads": "whole heads (key/value groups with their query heads), head_dim and rotary dims kept",
            "experts": "whole experts by router usage; neurons inside experts and shared experts kept",
        },
        "kept": {
            "layers": list(keep.layers),
            "hidden_channels": None if len(keep.hidden) == teacher.geometry.hidden else list(keep.hidden),
            "per_layer": [
                {
                    "teacher_layer": t,
                    "heads": list(lk.heads),
                    "kv_heads": list(lk.kv_heads),
                    "neurons": list(lk.neurons) if lk.neurons is not None else None,
                    "experts": list(lk.experts) if lk.experts is not None else None,
                }
                for t, lk in zip(keep.layers, keep.per_layer)
            ],
        },
    }
    write_json_atomically(os.path.join(staging, PROVENANCE_FILE), record)
    check_written(staging, student, family)
    log.info(
        "student: %s, %s parameters (%.1f%% of the teacher's %s)",
        shape.text(),
        f"{params:,}",
        100 * params / counter.teacher,
        f"{counter.teacher:,}",
    )
    return record


def stored_dtype(config):
    """The dtype the teacher's weights are stored in (config.json's dtype; float32 when it says none)."""
    import torch  # torch: not at start-up

    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def vars_of(shape) -> dict:
    return {k: getattr(shape, k) for k in SHAPE_SETTINGS}


def copy_tokenizer(cfg: PruneConfig, staging: str) -> None:
    """The teacher's tokenizer files beside the student (else the calibration data's tokenizer folder), so that the directory is a
    complete model for distill-train (student.path), distill-eval and from_pretrained."""
    from transformers import AutoTokenizer  # transformers: not at start-up

    source = cfg.teacher if has_tokenizer_files(cfg.teacher) else None
    if source is None and cfg.data:
        folder = os.path.join(cfg.data, TOKENIZER_DIR)
        source = folder if has_tokenizer_files(folder) else None
    if source is None:
        log.warning("the teacher has no tokenizer files (and no calibration data gave one): the student directory has none")
        return
    AutoTokenizer.from_pretrained(source, **LOCAL_ONLY).save_pretrained(staging)


def check_written(staging: str, student, family) -> None:
    """The written directory loads with from_pretrained and gives the logits of the student in memory (bit for bit)."""
    import torch  # torch: not at start-up
    import transformers  # transformers: not at start-up

    loaded = getattr(transformers, family.auto_class).from_pretrained(staging, **LOCAL_ONLY, dtype=next(student.parameters()).dtype)
    loaded.eval()
    ids = torch.arange(8)[None] % student.config.vocab_size
    with torch.no_grad():
        same = torch.equal(loaded(input_ids=ids).logits, student(input_ids=ids).logits)
    if not same:
        raise PruneRunError(f"the written student in {staging} does not reload to the same logits; this is a bug: please report it")


def _device(cfg: PruneConfig, ctx):
    import torch  # torch: not at start-up

    if ctx is not None:
        return ctx.device
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise PruneRunError("--device cuda: no GPU is visible to this process; use --device cpu (or auto)")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _distributed():
    """The process group of a launch of several processes (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from distill.train.distributed import init_distributed, setup_logging  # torch: not at start-up

    ctx = init_distributed()
    setup_logging(ctx.rank, ctx.world_size)
    return ctx


def describe_result(record: dict) -> str:
    params = record["params"]
    student = record["shape"]["student"]
    return (
        f"{student['num_layers']} layers, hidden {student['hidden_size']}, {student['num_heads']} heads "
        f"({student['num_kv_heads']} kv), MLP {student['intermediate_size']}: {params['student']:,} parameters, "
        f"{100 * params['fraction']:.1f}% of the teacher's {params['teacher']:,}"
    )
