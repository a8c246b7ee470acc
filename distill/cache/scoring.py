"""The frozen teacher on one worker or rank: rows of token ids in, sparse targets (top-k + tail, or samples) out.

Every number depends only on (settings, teacher, the rows), and a draw of sampled mode on (seed, shard, row, variant,
position): the output is the same whichever worker, rank or placement computes it. The teacher's forward is a
function handed to `TeacherScorer` (`replicated_forward`: the whole model on this device; the launcher's ranks can hand
a partitioned one, distill/cache/ranks.py), so both run the same projection and selection code.

Causal data is batched by the trainer's causal collator, so with `--document-attention` (the default, as the trainer's
data.document_attention) the teacher's positions and attention restart at each document of a row
(distill/data/documents.py); the manifest records the setting and a run with the other one refuses the cache.

Masked-LM data needs static masks (`--static-masks D`): `StaticMasker` builds each row's D masked inputs exactly as the
trainer's collator does (the same `collator_for`, seed and masking settings, keyed d * N + r: distill/data/masking.py).
"""

from __future__ import annotations

import dataclasses as dc
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np

from data_prep.cache_manifest import CacheError
from distill.cache.settings import CacheConfig
from kd_common.config import build, read_yaml

# (input ids (B, L), attention mask (B, L), flat positions (P,), the rows' documents or None) -> (head input (P, H), head
# weight (V', H), bias or None, the model's output transform or None)
Forward = Callable[..., tuple]


def row_uniforms(seed: int, shard: int, row: int, length: int, n: int, variant: int = 0) -> np.ndarray:
    """(length, n) uniforms of one row (of static-mask `variant`): a pure function of (seed, shard, row, variant), position-major."""
    return np.random.Generator(np.random.Philox(key=[seed, (variant << 56) | (shard << 40) | row])).random((length, n))


def train_mask_settings(path: Optional[str]) -> dict:
    """The seed and data.* masking settings of a training config YAML (the trainer's defaults where it says nothing), by
    their training-config keys (distill.data.masking.mask_settings)."""
    from distill.config import Config, DataConfig  # distill.config: not at start-up of distill-cache
    from distill.data.masking import mask_settings  # torch (via distill.data.masking): not at start-up

    raw = read_yaml(path) if path else {}
    data = build(DataConfig, dict(raw.get("data") or {}, path=None))
    default = next(f.default for f in dc.fields(Config) if f.name == "seed")
    seed = raw.get("seed", getattr(default, "default", default))  # a pydantic field's default sits in its FieldInfo
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CacheError(f"{path}: seed must be a non-negative integer, got {seed!r}")
    return mask_settings(SimpleNamespace(seed=seed, data=data))


def masking_for(cfg: CacheConfig, manifest) -> Optional[dict]:
    """The masking settings of a masked-LM dataset's static masks (training-config keys), None for causal data."""
    if manifest.packing == "causal":
        if cfg.static_masks:
            raise CacheError(f"--static-masks applies to masked-LM data, {cfg.data} is causal (nothing is masked); drop --static-masks")
        return None
    settings = train_mask_settings(cfg.train_config)
    from_config = settings["data.static_masks"]
    if cfg.static_masks and from_config and cfg.static_masks != from_config:
        raise CacheError(
            f"--static-masks {cfg.static_masks} but {cfg.train_config} has data.static_masks={from_config}; give one value (the run's)"
        )
    variants = cfg.static_masks or from_config
    if not variants:
        raise CacheError(
            f"{cfg.data} is {manifest.packing!r} (masked-LM) data: with dynamic masking the teacher's output depends on a mask drawn "
            f"anew every epoch, so it cannot be cached; cache D fixed masks per sequence with --static-masks D (and "
            f"--train-config YAML for the run's seed and masking settings), then train with data.static_masks=D"
        )
    settings["data.static_masks"] = variants
    return settings


class StaticMasker:
    """The trainer's masked inputs of a masked-LM split: variant d of split row r masked at key d * N + r by the collator
    the trainer builds (`collator_for` with the recorded seed and settings, the dataset's tokenizer and token counts, the
    teacher's vocabulary for random replacements). Picklable; the collator is built on the worker."""

    def __init__(self, data_dir: str, manifest, split: str, settings: dict, vocab_size: int, positions: str):
        self.data_dir, self.split, self.settings, self.vocab_size, self.positions = data_dir, split, settings, vocab_size, positions
        self.variants = int(settings["data.static_masks"])
        shards = manifest.splits[split].shards
        self.num_rows = manifest.splits[split].rows
        self.shard_offsets = [int(x) for x in np.cumsum([0] + [s.rows for s in shards])[:-1]]
        self.collator = None

    def _build(self):
        from data_prep.manifest import load_dataset_tokenizer, load_manifest  # data_prep.manifest: not at start-up of distill-cache
        from distill.data.masking import collator_for  # torch (via distill.data.masking): not at start-up
        from distill.data.reader import load_token_counts  # torch (via distill.data.reader): not at start-up

        manifest = load_manifest(self.data_dir)
        tokenizer = load_dataset_tokenizer(self.data_dir, manifest)
        data = SimpleNamespace(**{key[len("data.") :]: v for key, v in self.settings.items() if key.startswith("data.")})
        counts = load_token_counts(self.data_dir, manifest) if data.token_frequency_smoothing > 0 else np.zeros(0)
        special = manifest.tokenizer.all_special_ids
        return collator_for(data, self.settings["seed"], manifest.packing, tokenizer, self.vocab_size, special, counts, pad_multiple=1)

    def masked(self, rows: list[tuple], shard: int, first_row: int, variant: int) -> dict:
        """The collated micro batch (input_ids, attention_mask, labels) of variant `variant` of these consecutive rows."""
        if self.collator is None:
            self.collator = self._build()
        keys = variant * self.num_rows + self.shard_offsets[shard] + first_row + np.arange(len(rows), dtype=np.int64)
        return self.collator(rows, keys)


def sparse_targets(log_probs, cfg: CacheConfig, uniforms: Optional[np.ndarray] = None):
    """(indices (P, k) int32, values (P, k) fp32 log-probs, tail (P,) or None) from (P, V) log-probabilities at T."""
    import torch  # torch: not at start-up

    if cfg.mode == "topk":
        k = min(cfg.k, log_probs.shape[-1])
        values, indices = torch.topk(log_probs, k, dim=-1)
        indices, order = torch.sort(indices, dim=-1)
        values = values.gather(1, order)
        tail = (1.0 - values.double().exp().sum(-1)).clamp_(min=0.0).float()
        if k == log_probs.shape[-1]:
            tail.zero_()  # every id kept: nothing is outside them (not the rounding of 1 - sum)
        return indices.int(), values.float(), tail
    cdf = log_probs.double().exp().cumsum(-1)
    u = torch.from_numpy(uniforms).to(cdf.device) * cdf[:, -1:]
    indices = torch.searchsorted(cdf, u).clamp_(max=log_probs.shape[-1] - 1)
    indices = torch.sort(indices, dim=-1).values
    return indices.int(), log_probs.gather(1, indices).float(), None


def replicated_forward(model, device) -> Forward:
    """The whole teacher on `device`: the input of its vocabulary projection at the positions, and the projection."""
    import torch  # torch: not at start-up

    from distill.models.build import model_forward  # torch (via distill.models.build): not at start-up

    def forward(ids, mask, positions, documents=None):
        with torch.inference_mode():
            out = model_forward(model, ids.to(device), mask.to(device), positions.to(device), head_input=True, documents=documents)
        return out.head_input, out.head.weight, getattr(out.head, "bias", None), out.head_transform

    return forward


def load_replicated(cfg: CacheConfig, vocab_size: int, device) -> "TeacherScorer":
    """A scorer holding the whole teacher on `device` (each Beam worker; each rank with placement=replicated)."""
    import torch  # torch: not at start-up

    from distill.models.build import load_teacher, resolve_dtype  # torch (via distill.models.build): not at start-up

    device = torch.device(device)
    model = load_teacher(cfg.teacher, resolve_dtype(cfg.dtype, device), "sdpa", device)
    return TeacherScorer(cfg, vocab_size, device, replicated_forward(model, device), model.config.hidden_size)


class TeacherScorer:
    """Sparse targets of rows, from a teacher forward (`Forward`); `forwards` counts the forwards it ran."""

    def __init__(self, cfg: CacheConfig, vocab_size: int, device, forward: Forward, width: int):
        import torch  # torch: not at start-up

        from data_prep.manifest import load_manifest  # data_prep.manifest: not at start-up of distill-cache

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.vocab, self.device, self.forward = cfg, vocab_size, torch.device(device), forward
        self.eos = load_manifest(cfg.data).tokenizer.special_token_ids.get("eos")  # documents of format-1 rows begin after EOS
        self.chunk = max(1, (1 << 24) // max(vocab_size, width))  # positions projected to the vocabulary at once
        self.forwards = 0

    def score(self, rows: list[tuple], shard: int, first_row: int, masker: Optional[StaticMasker] = None) -> list[tuple]:
        """Sparse targets of rows of (token ids, word-start flags): one per row at every position (causal data), or with a
        `masker` one per (row, variant), row-major, on the trainer's masked inputs at the positions it stores."""
        if masker is None:  # causal data, batched as the trainer batches it (its documents kept apart or not, as it will be)
            from distill.data.documents import batch_documents  # torch (via distill.data): not at start-up
            from distill.data.masking import CausalLMCollator  # torch (via distill.data.masking): not at start-up

            batch = CausalLMCollator(0, 1, self.cfg.document_attention, self.eos)(rows, np.arange(len(rows)))
            mask = batch["attention_mask"]
            keys = [(shard, first_row + i, 0) for i in range(len(rows))]
            return self._score(batch["input_ids"], mask, mask.bool(), keys, batch_documents(batch, self.device))
        per_variant = []
        for d in range(masker.variants):
            batch = masker.masked(rows, shard, first_row, d)
            keep = batch["attention_mask"].bool() if masker.positions == "all" else batch["labels"] != -100
            keys = [(shard, first_row + i, d) for i in range(len(rows))]
            per_variant.append(self._score(batch["input_ids"], batch["attention_mask"], keep, keys))
        return [per_variant[d][i] for i in range(len(rows)) for d in range(masker.variants)]

    def idle_forward(self) -> None:
        """One forward of one token whose result is dropped: a partitioned teacher's ranks must all run as many forwards
        (each gathers every layer's parameters from every rank), so a rank with less work runs these."""
        import torch  # torch: not at start-up

        one = torch.zeros(1, 1, dtype=torch.long)
        self.forward(one, torch.ones_like(one), torch.zeros(1, dtype=torch.long))
        self.forwards += 1

    def _score(self, ids, mask, keep, keys: list[tuple[int, int, int]], documents=None) -> list[tuple]:
        """The teacher on (B, L) `ids` with attention `mask` (and the rows' `documents` kept apart when given): per row, the
        targets at its `keep` positions, ascending; sampled draws keyed by `keys` (shard, row, variant)."""
        import torch  # torch: not at start-up
        import torch.nn.functional as F  # torch: not at start-up

        lengths = keep.sum(1).tolist()
        positions = keep.reshape(-1).nonzero().squeeze(1)
        from distill.models.families import vocab_logits  # torch (via distill.models.families): not at start-up

        head_input, weight, bias, transform = self.forward(ids, mask, positions, documents)  # always: a partitioned teacher counts forwards
        self.forwards += 1
        if len(positions) == 0:  # nothing to store (e.g. masked positions of rows with nothing maskable)
            none = np.zeros(0, dtype=np.float32)
            return [(none.astype(np.int32), none, none if self.cfg.mode == "topk" else None) for _ in lengths]
        with torch.inference_mode():
            head = SimpleNamespace(weight=weight, bias=bias)
            uniforms = None
            if self.cfg.mode == "sampled":
                uniforms = np.concatenate(
                    [row_uniforms(self.cfg.seed, shard, row, n, self.cfg.n, d) for (shard, row, d), n in zip(keys, lengths)]
                )
            parts = []
            for start in range(0, len(positions), self.chunk):
                sl = slice(start, start + self.chunk)
                # the logits as the teacher's forward makes them (its output transform: scaling, final softcap)
                logits = vocab_logits(head, transform, head_input[sl], self.vocab).float()
                log_probs = F.log_softmax(logits / self.cfg.temperature, dim=-1)
                parts.append(sparse_targets(log_probs, self.cfg, uniforms[sl] if uniforms is not None else None))
        indices = torch.cat([p[0] for p in parts]).cpu().numpy()
        values = torch.cat([p[1] for p in parts]).cpu().numpy()
        tail = torch.cat([p[2] for p in parts]).cpu().numpy() if parts[0][2] is not None else None
        result, at = [], 0
        for n in lengths:
            result.append(
                (indices[at : at + n].reshape(-1), values[at : at + n].reshape(-1), tail[at : at + n] if tail is not None else None)
            )
            at += n
        return result
