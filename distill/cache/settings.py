"""The settings of `distill-cache` (both orchestrators: the Beam pipeline and the launcher's ranks), and which of them
fix a part's bytes (a resumed cache must be written with the same ones)."""

from __future__ import annotations

from typing import Literal, Optional

from kd_common.config import Bool, Float, Int, Str, section, setting

# the settings every number of a part depends on (with the teacher's and the dataset's content): a cache is resumed
# only with the same values; `entries` stands for k (top-k) or n (sampled)
BYTE_SETTINGS = (
    "mode",
    "entries",
    "temperature",
    "seed",
    "value_bits",
    "split",
    "batch_size",
    "rows_per_part",
    "dtype",
    "static_masks",
    "positions",
)


@section
class CacheConfig:
    data: Str = setting(help="prepared dataset directory (distill-prep output; causal data)")
    teacher: Str = setting(help="the teacher: a local Hugging Face directory (config.json + weights)")
    output: Str = setting(
        help="new directory for the cache (built in .NAME.partial beside it, moved into place when complete; the same command "
        "rerun resumes an unfinished one)"
    )
    mode: Literal["topk", "sampled"] = setting(
        "topk",
        "topk: the k most likely ids per position + the remaining mass; sampled: n ids drawn "
        "from the teacher's distribution (weight 1/n each)",
    )
    k: Int = setting(64, "topk: ids kept per position", ge=1)
    n: Int = setting(64, "sampled: draws per position", ge=1)
    temperature: Float = setting(1.0, "the distribution cached is softmax(logits / T); training must use the same loss.temperature", gt=0)
    seed: Int = setting(0, "sampled: draws are a pure function of (seed, shard, row, position)", ge=0)
    value_bits: Literal[16, 32] = setting(16, "bits of each stored log-probability (16 = float16; 32 for exact reproduction)")
    split: Str = setting("train", "split of the dataset to cache")
    batch_size: Int = setting(16, "rows per teacher forward", ge=1)
    rows_per_part: Int = setting(
        4096, "rows per part file (the unit of parallelism and of resuming; fixed by this setting, not by the workers)", ge=1
    )
    workers: Int = setting(1, "Beam: local runner worker processes (1 = in-process)", ge=1)
    ranks: Bool = setting(
        False,
        "run as one rank of a process group a launcher started (deepspeed --module distill.cache, torchrun -m distill.cache, "
        "launch/slurm.sbatch with DISTILL_MODULE=distill.cache) instead of a Beam pipeline: every rank writes its share of the "
        "parts; `python -m distill.cache` sets it",
    )
    placement: Literal["auto", "replicated", "partitioned"] = setting(
        "auto",
        "ranks: the teacher whole on every rank's device (replicated), or its parameters split across the ranks ZeRO-3 style, "
        "gathered layer by layer (partitioned: a teacher bigger than one device); auto = replicated when its weights take at "
        "most 70% of one device's memory (on CPU: of the host memory, once per rank of the node), else partitioned",
    )
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto",
        "where each worker or rank runs the teacher; auto = a GPU when there is one: rank LOCAL_RANK takes GPU LOCAL_RANK (one "
        "rank per GPU), local Beam worker i takes GPU i mod the GPU count",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto", "teacher weights dtype; auto = bf16 on GPU, fp32 on CPU (scores are fp32 either way)"
    )
    threads: Int = setting(
        1, "torch CPU threads per worker (0 = torch's default); fixed so results do not depend on the machine's load", ge=0
    )
    collective_timeout_s: Optional[Float] = setting(
        None, "ranks: how long a rank waits for the others (at most about one part's time, at the end); null = 2 hours", gt=0
    )
    overwrite: Bool = setting(
        False,
        "replace --output if it holds a teacher cache, once the new one is complete; also discards the parts of an "
        "unfinished cache of other settings or another teacher beside it",
    )
    static_masks: Int = setting(
        0,
        "masked-LM data: D fixed masks per sequence (BERT's dupe factor; train with data.static_masks=D): the teacher is cached "
        "on each row's D masked inputs, built as the trainer builds them; storage grows D-fold. 0 = the training config's "
        "data.static_masks (masked-LM data needs D > 0; causal data 0)",
        ge=0,
        le=255,
    )
    train_config: Optional[Str] = setting(
        None,
        "masked-LM data: the training config (the distill-train --config YAML) whose seed and data.* masking settings "
        "(mlm_probability, mask/random fractions, token_frequency_smoothing, whole_word_masking, masking, static_masks) draw "
        "the masks: one source of truth with the run, which must match them; null = the trainer's defaults",
    )
    document_attention: Bool = setting(
        True,
        "causal data: the teacher sees each document of a row alone (position ids and attention restart at each document), as "
        "training with data.document_attention=true, the default; false = each row as one sequence. A run needs the same setting",
    )
    positions: Literal["all", "masked"] = setting(
        "all",
        "masked-LM data: store the teacher at every real position (serves loss.ce_positions all and masked) or at the masked "
        "positions only (about 15% of the bytes; only loss.ce_positions=masked)",
    )

    @property
    def entries(self) -> int:
        return self.k if self.mode == "topk" else self.n

    def problems(self) -> list[str]:
        p = []
        if self.placement == "partitioned" and not self.ranks:
            p.append(
                "placement=partitioned splits the teacher across the ranks of a launcher: run `deepspeed --num_gpus N --module "
                "distill.cache ...` (or torchrun -m distill.cache); a Beam worker holds the whole teacher"
            )
        if self.ranks and self.workers > 1:
            p.append(
                f"--workers {self.workers} sets Beam's local worker processes; with --ranks the launcher starts the processes "
                f"(deepspeed --num_gpus N): drop --workers"
            )
        return p
