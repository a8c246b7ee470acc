"""What both orchestrators (the Beam pipeline, the launcher's ranks) share around the parts: the input checks, the work
directory a cache is written in and resumed from, and the end (every part re-opened and hashed, the manifest written
last, the cache moved into place).

The work directory is `.NAME.partial` beside `--output` (same filesystem: the move into place is a rename). Its
`.progress/run.json`, written before any part, says what is being written: the settings that fix a part's bytes, the
teacher's content sha256, the dataset manifest's sha256, the part list. A rerun of the same command finds it, keeps every
part whose file and record are complete (distill/cache/parts.py) and writes only the rest, whatever the number of
workers or ranks now; a rerun with another teacher, dataset or settings is refused in one line (`--overwrite` discards
those parts). `--output` never holds half a cache: the manifest is written into the work directory after every part
was verified, then the directory is renamed to `--output`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Optional

from data_prep.cache_manifest import (
    CacheError,
    CacheManifest,
    CachePart,
    is_cache_dir,
    load_cache_manifest,
    support_label,
    write_cache_manifest,
)
from distill.cache.parts import PROGRESS, TMP_MARK, is_complete, part_name, parts_of
from distill.cache.scoring import StaticMasker, masking_for
from distill.cache.settings import BYTE_SETTINGS, CacheConfig
from kd_common.files import sha256_file, write_json_atomically
from kd_common.output_rule import check_no_overlap, check_replaceable, publish

log = logging.getLogger("distill-cache")
RUN_RECORD = "run.json"


def work_dir_for(output: str) -> str:
    """The work directory of `output`: `.NAME.partial` beside it (a fixed name: a rerun finds and resumes it)."""
    path = os.path.abspath(output.rstrip(os.sep) or output)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")


def check_inputs(cfg: CacheConfig):
    """The dataset (manifest, causal packing, split), the teacher's config, vocabulary and tokenizer: every problem before any work."""
    # data_prep.manifest: not at start-up of distill-cache
    from data_prep.manifest import check_tokenizer_matches, load_dataset_tokenizer, load_manifest, tokenizer_identity, verify_shards
    from data_prep.tokenizer_base import has_tokenizer_files  # transformers (via data_prep.tokenizer_base): not at start-up
    from distill.models.build import check_positions, load_teacher_config  # torch (via distill.models.build): not at start-up
    from kd_common.hf_dirs import LOCAL_ONLY, refuse_remote_code  # transformers: not at start-up

    manifest = load_manifest(cfg.data)
    masking_for(cfg, manifest)  # masked-LM data without static masks: refused here, before any work
    verify_shards(cfg.data, manifest, cfg.split, checksums=True)
    load_dataset_tokenizer(cfg.data, manifest)  # its tokenizer/ folder is the one the manifest records
    config = load_teacher_config(cfg.teacher)
    check_positions(config, manifest.max_seq_len, f"--teacher {cfg.teacher}", f"--data {cfg.data}")
    vocab = manifest.tokenizer.vocab_size
    if config.vocab_size < vocab:
        raise CacheError(
            f"the teacher's vocabulary ({config.vocab_size}) is smaller than the dataset tokenizer's ({vocab}); it is not this data's teacher"
        )
    if has_tokenizer_files(cfg.teacher):  # the check training makes (distill/train/preflight.py), before any work
        from transformers import AutoTokenizer  # transformers: not at start-up

        refuse_remote_code(cfg.teacher, "--teacher")
        found = tokenizer_identity(AutoTokenizer.from_pretrained(cfg.teacher, **LOCAL_ONLY), cfg.teacher)
        check_tokenizer_matches(manifest, found, f"teacher {cfg.teacher}")
    else:
        log.warning("teacher %s has no tokenizer files; checking only its vocabulary size against the dataset", cfg.teacher)
    return manifest, config


@dataclasses.dataclass
class CacheJob:
    """A cache being written: the checked inputs, the parts, those still to write, and the work directory."""

    cfg: CacheConfig
    output: str
    work: str
    manifest: Any  # the dataset's
    teacher_config: Any
    teacher_content: dict
    record: dict  # .progress/run.json
    identity: str  # sha256 of the record's identity fields: what a part record must name
    units: list
    pending: list
    masker: Optional[StaticMasker]
    started: float
    finished: Optional[CacheManifest] = None  # a complete cache of these settings already at --output: nothing to do

    @property
    def variants(self) -> int:
        return self.masker.variants if self.masker is not None else 0

    @property
    def vocab(self) -> int:
        return self.manifest.tokenizer.vocab_size

    @classmethod
    def start(cls, cfg: CacheConfig, writers: str) -> "CacheJob":
        """Check the inputs and the output, then find or make the work directory; `writers` says who writes (for the log)."""
        from data_prep.manifest import MANIFEST_FILE  # data_prep.manifest: not at start-up of distill-cache
        from distill.models.fingerprint import content_identity  # distill.models: not at start-up of distill-cache

        t0 = time.time()
        check_no_overlap(cfg.output, [("--data", cfg.data), ("--teacher", cfg.teacher)])
        output = os.path.realpath(cfg.output) if os.path.islink(cfg.output.rstrip(os.sep) or cfg.output) else cfg.output
        manifest, config = check_inputs(cfg)
        masking = masking_for(cfg, manifest)
        masker = StaticMasker(cfg.data, manifest, cfg.split, masking, config.vocab_size, cfg.positions) if masking else None
        units = parts_of(manifest, cfg.split, cfg.rows_per_part)
        content = content_identity(cfg.teacher)  # the teacher the writers read, by content (checked again at the end)
        fields = {
            "format": "distill-teacher-cache-work/1",
            "settings": {key: getattr(cfg, key) for key in BYTE_SETTINGS},
            "masking": masking or {},
            "teacher_content_sha256": content["sha256"],
            "dataset_manifest_sha256": sha256_file(os.path.join(cfg.data, MANIFEST_FILE)),
            "parts": [part_name(cfg.split, u[0], u[2]) for u in units],
        }
        identity = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        job = cls(cfg, output, work_dir_for(output), manifest, config, content, fields, identity, units, [], masker, t0)
        done = job._finished_output()
        if done is not None:
            job.finished = done
            return job
        check_replaceable(output, cfg.overwrite, is_cache_dir, "teacher cache")
        if job._publish_finished_work():
            return job
        job._open_work_dir(writers)
        job.pending = [u for u in units if not is_complete(job.work, part_name(cfg.split, u[0], u[2]), identity)]
        kept = len(units) - len(job.pending)
        log.info(
            "caching %d rows (%d parts%s) of %s with teacher %s: %s per position, T=%g, %d-bit values; %s%s",
            manifest.splits[cfg.split].rows,
            len(units),
            f", {job.variants} static masks each, {cfg.positions} positions" if job.variants else "",
            cfg.data,
            cfg.teacher,
            support_label(cfg.mode, cfg.entries),
            cfg.temperature,
            cfg.value_bits,
            writers,
            f"; {kept} of {len(units)} parts already complete in {job.work}, writing {len(job.pending)}" if kept else "",
        )
        return job

    def _finished_output(self) -> Optional[CacheManifest]:
        """The manifest at --output when it is a complete cache of exactly this job (and --overwrite is not set), else None."""
        if self.cfg.overwrite or not os.path.isfile(os.path.join(self.output, "manifest.json")):
            return None
        try:
            existing = load_cache_manifest(self.output)
        except CacheError:
            return None
        if existing.identity != self.identity:
            return None
        log.info(
            "%s already holds this cache (same teacher, dataset and settings): nothing to do (--overwrite writes it again)", self.output
        )
        return existing

    def _publish_finished_work(self) -> bool:
        """A run killed between writing the manifest into the work directory and moving it into place: move it now."""
        try:
            found = load_cache_manifest(self.work) if os.path.isfile(os.path.join(self.work, "manifest.json")) else None
        except CacheError:
            found = None
        if found is None or found.identity != self.identity:
            return False
        shutil.rmtree(os.path.join(self.work, PROGRESS), ignore_errors=True)  # the manifest is written after every part was verified
        publish(self.work, self.output)
        log.info("%s held this cache complete (a run stopped just before moving it into place): moved it to %s", self.work, self.output)
        self.finished = found
        return True

    def _open_work_dir(self, writers: str) -> None:
        """Make the work directory with its run record, or resume the one there: the same teacher, dataset and settings."""
        record_file = os.path.join(self.work, PROGRESS, RUN_RECORD)
        if os.path.lexists(self.work):
            try:
                with open(record_file) as handle:
                    found = json.load(handle)
            except (OSError, ValueError):
                found = None
            found = found if isinstance(found, dict) else None
            if found is None and any(files for _, _, files in os.walk(self.work)):
                raise CacheError(
                    f"{self.work} (the work directory of --output {self.cfg.output}) holds files but no {PROGRESS}/{RUN_RECORD}: "
                    f"distill-cache did not write them; move that directory away and rerun"
                )
            differs = _differences(found.get("identity") or {}, self.record) if found else []
            if differs and not self.cfg.overwrite:
                raise CacheError(
                    f"{self.work} holds the parts of an unfinished cache of {', '.join(differs)}: rerun it with that, or pass "
                    f"--overwrite to discard those parts and write this cache"
                )
            if differs:
                log.warning("discarding the parts of an unfinished cache of %s in %s (--overwrite)", ", ".join(differs), self.work)
                shutil.rmtree(self.work)
            elif found:
                log.info(
                    "resuming the unfinished cache in %s (begun %s by %s; now %s)",
                    self.work,
                    found.get("begun"),
                    found.get("writers"),
                    writers,
                )
        os.makedirs(os.path.join(self.work, PROGRESS), exist_ok=True)
        if not os.path.exists(record_file):
            begun = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            write_json_atomically(record_file, {"identity": self.record, "digest": self.identity, "begun": begun, "writers": writers})
        for here, _, files in os.walk(self.work):  # temp files of writers that were killed (none is writing now)
            for name in files:
                if TMP_MARK in name:
                    os.remove(os.path.join(here, name))

    def finish(self, parts: list[CachePart], writers: int, seconds: Optional[float] = None) -> CacheManifest:
        """Every part re-opened and hashed (`parts`, in part-list order): check the teacher did not change, write the manifest
        last, move the cache into place."""
        from data_prep.manifest import MANIFEST_FILE  # data_prep.manifest: not at start-up of distill-cache
        from distill.models.fingerprint import content_identity, shape_fingerprint  # distill.models: not at start-up

        elapsed = time.time() - self.started if seconds is None else seconds
        written = {part_name(self.cfg.split, u[0], u[2]) for u in self.pending}
        tokens = sum(p.tokens for p in parts)
        size = sum(p.bytes for p in parts)
        cached = sum(p.tokens for p in parts if p.path in written) * max(1, self.variants)  # tokens the teacher ran on now
        if content_identity(self.cfg.teacher, self.teacher_content["files"])["sha256"] != self.teacher_content["sha256"]:
            raise CacheError(
                f"the teacher's files in {self.cfg.teacher} changed while the cache was written; its parts are unusable: rerun "
                f"distill-cache with --overwrite"
            )
        cfg = self.cfg
        result = CacheManifest(
            mode=cfg.mode,
            k=cfg.entries,
            temperature=cfg.temperature,
            value_dtype=f"float{cfg.value_bits}",
            vocab_size=self.vocab,
            split=cfg.split,
            seed=cfg.seed,
            parts=parts,
            static_masks=self.variants,
            document_attention=cfg.document_attention if self.manifest.packing == "causal" else None,
            positions=cfg.positions if self.variants else "all",
            masking=self.record["masking"],
            teacher={
                "path": os.path.abspath(cfg.teacher),
                "fingerprint": shape_fingerprint(cfg.teacher),
                "config": self.teacher_config.to_dict(),
                "content_sha256": self.teacher_content["sha256"],  # distill/models/fingerprint.py; "files": its per-file record
                "files": self.teacher_content["files"],
            },
            dataset={
                "path": os.path.abspath(cfg.data),
                "manifest_sha256": sha256_file(os.path.join(cfg.data, MANIFEST_FILE)),
                "rows": self.manifest.splits[cfg.split].rows,
                "tokens": self.manifest.splits[cfg.split].tokens,
            },
            tokenizer=dataclasses.asdict(self.manifest.tokenizer),
            identity=self.identity,
            stats={
                "bytes": size,
                "bytes_per_token": size / max(tokens, 1),  # per token of the dataset (all D masks of it, with static masks)
                "bytes_per_masked_copy_token": size / max(tokens * max(1, self.variants), 1),  # = bytes_per_token when causal
                "seconds": elapsed,
                "tokens_written": cached,  # by this run (a resumed run: only the parts it wrote)
                "tokens_per_second": cached / max(elapsed, 1e-9),
                "workers": writers,
                "settings": dataclasses.asdict(cfg),
            },
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        write_cache_manifest(self.work, result)
        shutil.rmtree(os.path.join(self.work, PROGRESS))
        check_replaceable(self.output, cfg.overwrite, is_cache_dir, "teacher cache")  # nothing appeared there meanwhile
        publish(self.work, self.output)
        log.info(
            "wrote %s: %d tokens, %.1f bytes per token%s, %.0f tokens/s",
            self.output,
            tokens,
            result.stats["bytes_per_token"],
            f" ({result.stats['bytes_per_masked_copy_token']:.1f} per token of each of the {self.variants} masked copies)"
            if self.variants
            else "",
            result.stats["tokens_per_second"],
        )
        return result


def _differences(before: dict, now: dict) -> list[str]:
    """What another cache's run record differs in, as words for the error message."""
    out = []
    if before.get("teacher_content_sha256") != now["teacher_content_sha256"]:
        out.append(
            f"another teacher (content sha256 {str(before.get('teacher_content_sha256'))[:12]}, this one "
            f"{now['teacher_content_sha256'][:12]})"
        )
    if before.get("dataset_manifest_sha256") != now["dataset_manifest_sha256"]:
        out.append("another dataset")
    settings = before.get("settings") or {}
    changed = [f"{k}={settings.get(k)!r} (now {v!r})" for k, v in now["settings"].items() if settings.get(k) != v]
    if changed:
        out.append("other settings: " + ", ".join(changed))
    if before.get("masking") != now["masking"]:
        out.append("other masking settings")
    if not out and before != now:
        out.append(f"another format or part list ({before.get('format')})")
    return out
