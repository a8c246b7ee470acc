"""The baseline of the HF-distiller comparison: Hugging Face's DistilBERT distiller, re-implemented in plain
PyTorch so that the benchmark measures the reference algorithm in the same run instead of quoting a constant.

What it follows, computation by computation (transformers `examples/research_projects/distillation`:
`train.py`, `distiller.py`, `lm_seqs_dataset.py`, `grouped_batch_sampler.py`; written here from scratch, not
copied; differences are listed at the end):

data     the sequences of a prepared dataset (ours: `distill-prep` output, [CLS] ... [SEP]) as a list of id
         arrays, filtered as `LmSeqsDataset` does (sequences longer than the model's 512 positions split into
         [CLS] chunk [SEP] pieces, sequences of <= 11 tokens dropped, sequences with >= 50% [UNK] dropped);
         batches of `--batch-size` from a seeded `RandomSampler` grouped by length (`GroupedBatchSampler` over
         bins 3, 7, 11, ... below 512: a batch only holds sequences of one 4-token bin); the collate function pads
         with [PAD] through Python lists and `torch.tensor` (`batch_sequences`); no loader workers.
         `--same-batches-as-plan` (what bench/train_throughput.py uses by default) replaces only the sampler: the
         batches are then the very rows distill-train puts in each micro batch (our StepPlan, lengths grouped over
         `--plan-group-steps` steps), so both sides train on identical sequences and identical token counts. The
         reference's own sampler fills its first batches from the most populated 4-token bins, i.e. shorter
         sequences than average (~40 instead of ~64 real tokens on the benchmark's corpus), which would compare
         steps of different work.
masking  per batch, on the device (`prepare_batch_mlm`): attention mask `arange(L) < lengths`; token
         probabilities `token_probs[ids]` with `token_probs = max(count, 1) ** -mlm_smoothing` (0.7) and 0 for the
         special tokens; `n = ceil(0.15 * lengths.sum())` positions drawn over the whole flattened batch by
         `torch.multinomial(p / p.sum(), n, replacement=False)`; padding unselected; of the selected tokens
         `multinomial(pred_probs=[0.8, 0.1, 0.1])` picks [MASK] / keep / a random id in [0, vocab) (specials
         included, as the reference); labels -100 elsewhere; the range assertion on the ids.
forward  student (`DistilBertForMaskedLM`, `output_hidden_states`) and, under `torch.no_grad`, teacher
         (`BertForMaskedLM`, `output_hidden_states`): full-vocabulary logits (B, L, V) at every position of both.
losses   ce: `masked_select` of both logits at the real tokens (`restrict_ce_to_mask` is off by default in
         `train.py`: a store_true flag; `--restrict-ce-to-mask` selects the masked tokens instead), then
         `KLDivLoss(reduction="batchmean")(log_softmax(s / T), softmax(t / T)) * T**2`;
         mlm: `CrossEntropyLoss(ignore_index=-100)` over the (B*L, V) student logits;
         cos: `masked_select` of the last hidden states at the real tokens, `CosineEmbeddingLoss(reduction="mean")`
         against a target of ones; loss = a_ce * ce + a_mlm * mlm + a_cos * cos (5 / 2 / 1 here).
         Then, per batch, the five `loss.item()`-style reads of the reference (loss twice, ce, mlm, cos) and its
         NaN check `(loss != loss).data.any()` as a Python `if`.
update   `loss / gradient_accumulation_steps` when accumulating, `loss.backward()`; every
         `gradient_accumulation_steps` batches `clip_grad_norm_(student.parameters(), 5.0)`, `AdamW.step()`
         (torch's, two groups: no weight decay for names containing "bias" or "LayerNorm.weight", eps 1e-6,
         betas (0.9, 0.98), lr 5e-4), `zero_grad()`, and the linear warmup/decay schedule
         (`get_linear_schedule_with_warmup`, warmup ceil(5% of int(batches per epoch / accumulation * 3) + 1)).
loop     per batch a tqdm bar update with its loss postfix, as the reference's `train()`; TensorBoard writer
         created at start with the config texts (scalars every 500 batches: not reached in a benchmark); at the
         end the student's `config.json` and `pytorch_model.bin` are saved (the reference's final checkpoint).

Differences, and why:
- the student starts from random weights (the reference loads `--student_pretrained_weights` when given):
  speed does not depend on the weights;
- `--steps` stops after that many optimizer steps (the reference runs whole epochs): fixed work for the
  comparison; `end_epoch()` (an extra checkpoint per epoch) is therefore never reached;
- no `git_log` (GitPython) of the experiment and no `--force` dump-path handling (bookkeeping only);
- model outputs read by attribute (current transformers returns `ModelOutput`s; the reference unpacks tuples:
  "patched only to run on current libraries");
- no apex/fp16, no DistributedDataParallel: the comparison is one process in fp32 (the reference's `--fp16`
  path and its batch rounding to multiples of 8 are fp16-only);
- attention kernel: the library default (SDPA in current transformers), as the patched reference runs it.

    python bench/reference_distiller.py --teacher DIR --data DIR --steps 81 --batch-size 32 --student-layers 2 \\
        --clock clock.json

`--clock FILE` writes the end time of every optimizer step (bench/step_probe.py's StepClock, the same hook that times
distill-train) and the real (attention-mask) and padded tokens of every batch, for bench/train_throughput.py.
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # noqa: E402  (before the heavy imports: start-up is part of the whole-process figure)

import argparse  # noqa: E402
import bisect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

IGNORE_INDEX = -100
MAX_MODEL_INPUT_SIZE = 512  # tokenizer.max_model_input_sizes["bert-base-uncased"], the reference's split / bin limit


# ----------------------------------------------------------------------------------------------
# Data: LmSeqsDataset, create_lengths_groups, GroupedBatchSampler


def read_sequences(data_dir: str, split: str = "train") -> list[np.ndarray]:
    """Every sequence of a prepared dataset's split, in row order (the reference loads a pickled list of arrays)."""
    import pyarrow.parquet as pq

    with open(os.path.join(data_dir, "manifest.json")) as handle:
        manifest = json.load(handle)
    out: list[np.ndarray] = []
    for shard in manifest["splits"][split]["shards"]:
        column = pq.read_table(os.path.join(data_dir, shard["path"]), columns=["input_ids"]).column("input_ids")
        for chunk in column.chunks:
            offsets = chunk.offsets.to_numpy()
            values = chunk.values.to_numpy()
            out.extend(values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1))
    return out


class SequenceDataset(torch.utils.data.Dataset):
    """LmSeqsDataset: (ids, length) items after its three filters; `collate` is its `batch_sequences`."""

    def __init__(
        self, sequences: list[np.ndarray], cls_id: int, sep_id: int, pad_id: int, unk_id: int | None, max_len: int = MAX_MODEL_INPUT_SIZE
    ):
        self.pad_id = pad_id
        ids, lengths, rows = [], [], []
        for row, seq in enumerate(sequences):  # sequences longer than the model are cut into [CLS] chunk [SEP] pieces
            if len(seq) <= max_len:
                ids.append(seq)
                lengths.append(len(seq))
                rows.append(row)
                continue
            for start in range(0, len(seq), max_len - 2):
                piece = seq[start : start + max_len - 2]
                if piece[0] != cls_id:
                    piece = np.insert(piece, 0, cls_id)
                if piece[-1] != sep_id:
                    piece = np.insert(piece, len(piece), sep_id)
                ids.append(piece)
                lengths.append(len(piece))
                rows.append(row)
        keep = [i for i, n in enumerate(lengths) if n > 11]  # too short
        if unk_id is not None:
            keep = [i for i in keep if np.count_nonzero(ids[i] == unk_id) / lengths[i] < 0.5]  # mostly unknown
        self.removed = len(ids) - len(keep)
        self.token_ids = [ids[i] for i in keep]
        self.lengths = np.array([lengths[i] for i in keep])
        self.source_rows = [rows[i] for i in keep]  # row of the prepared dataset each item comes from

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int):
        return self.token_ids[index], self.lengths[index]

    def collate(self, items):
        """Pad to the longest sequence through Python lists, as `batch_sequences`."""
        token_ids = [t for t, _ in items]
        lengths = [n for _, n in items]
        longest = max(lengths)
        padded = [list(t.astype(int)) + [self.pad_id] * (longest - len(t)) for t in token_ids]
        return torch.tensor(padded), torch.tensor(lengths)


def length_groups(lengths: np.ndarray, k: int = MAX_MODEL_INPUT_SIZE) -> list[int]:
    """create_lengths_groups: the index of each length among the bins 3, 7, 11, ... < k (bisect right)."""
    bins = sorted(np.arange(start=3, stop=k, step=4).tolist() if k > 0 else [10])
    return [bisect.bisect_right(bins, int(n)) for n in lengths]


class GroupedBatches(torch.utils.data.Sampler):
    """GroupedBatchSampler: follow the base sampler's order, emit a batch as soon as one length group holds
    `batch_size` indices; at the end, the leftovers in group order, cut into batches."""

    def __init__(self, sampler, group_ids: list[int], batch_size: int):
        self.sampler, self.group_ids, self.batch_size = sampler, group_ids, batch_size

    def __iter__(self):
        buffers: dict[int, list[int]] = defaultdict(list)
        emitted = 0
        for idx in self.sampler:
            group = self.group_ids[idx]
            buffers[group].append(idx)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
                emitted += 1
        remaining = len(self) - emitted
        if remaining > 0:
            pending: list[int] = []
            for _, idxs in sorted(buffers.items()):
                pending.extend(idxs)
                if len(pending) >= self.batch_size:
                    yield pending[: self.batch_size]
                    pending = pending[self.batch_size :]
            if pending:
                yield pending

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size


class PlanBatches(torch.utils.data.Sampler):
    """Not the reference's: the batches our trainer trains on (distill.data.reader.StepPlan: the same rows per micro batch
    and step, in the same order), so that both sides of the comparison process identical sequences. Rows the
    reference's filters removed are left out of their batch."""

    def __init__(
        self,
        dataset: SequenceDataset,
        num_rows: int,
        lengths: np.ndarray,
        global_batch: int,
        micro_batch: int,
        group_steps: int,
        seed: int,
        steps: int,
    ):
        from distill.data.reader import StepPlan

        self.plan = StepPlan(num_rows, global_batch, micro_batch, 1, 0, seed, lengths if group_steps > 0 else None, max(1, group_steps))
        self.steps = steps
        self.item_of_row: dict[int, int] = {}
        for item, row in enumerate(dataset.source_rows):
            self.item_of_row.setdefault(row, item)

    def __iter__(self):
        for step in range(self.steps):
            for micro in range(self.plan.accumulation):
                rows = self.plan.micro_batch_of(step, micro)[1]
                yield [self.item_of_row[int(r)] for r in rows if int(r) in self.item_of_row]

    def __len__(self) -> int:
        return self.steps * self.plan.accumulation


def token_probabilities(counts: np.ndarray, smoothing: float, special_ids, vocab_size: int) -> torch.Tensor:
    """max(count, 1) ** -smoothing, 0 for special tokens; float64 as the reference's numpy computation."""
    full = np.zeros(vocab_size, dtype=np.int64)
    full[: min(len(counts), vocab_size)] = counts[:vocab_size]
    probs = np.maximum(full, 1) ** -smoothing
    for idx in special_ids:
        probs[idx] = 0.0
    return torch.from_numpy(probs)


# ----------------------------------------------------------------------------------------------
# The step: prepare_batch_mlm, step, optimize


def prepare_batch_mlm(
    token_ids: torch.Tensor,
    lengths: torch.Tensor,
    token_probs: torch.Tensor,
    pred_probs: torch.Tensor,
    mlm_mask_prop: float,
    pad_id: int,
    mask_id: int,
    vocab_size: int,
):
    """(token ids after masking, boolean attention mask, labels with -100 where nothing is predicted)."""
    attn_mask = torch.arange(token_ids.size(1), dtype=torch.long, device=lengths.device) < lengths[:, None]
    bs, max_len = token_ids.size()
    labels = token_ids.new(token_ids.size()).copy_(token_ids)

    x_prob = token_probs[token_ids.flatten()]
    n_tgt = math.ceil(mlm_mask_prop * lengths.sum().item())
    tgt_ids = torch.multinomial(x_prob / x_prob.sum(), n_tgt, replacement=False)
    pred_mask = torch.zeros(bs * max_len, dtype=torch.bool, device=token_ids.device)
    pred_mask[tgt_ids] = 1
    pred_mask = pred_mask.view(bs, max_len)
    pred_mask[token_ids == pad_id] = 0

    real = token_ids[pred_mask]
    rand = real.clone().random_(vocab_size)
    masked = real.clone().fill_(mask_id)
    choice = torch.multinomial(pred_probs, len(real), replacement=True)  # 0 mask, 1 keep, 2 random
    new = masked * (choice == 0).long() + real * (choice == 1).long() + rand * (choice == 2).long()
    token_ids = token_ids.masked_scatter(pred_mask, new)
    labels[~pred_mask] = IGNORE_INDEX
    assert 0 <= token_ids.min() <= token_ids.max() < vocab_size
    return token_ids, attn_mask, labels


class DistillationLoss:
    """The reference's loss functions and weights (mlm objective; clm and mse off as in this configuration)."""

    def __init__(self, alpha_ce: float, alpha_mlm: float, alpha_cos: float, temperature: float, restrict_ce_to_mask: bool = False):
        self.alpha_ce, self.alpha_mlm, self.alpha_cos = alpha_ce, alpha_mlm, alpha_cos
        self.temperature = temperature
        self.restrict_ce_to_mask = restrict_ce_to_mask
        self.ce_loss_fct = nn.KLDivLoss(reduction="batchmean")
        self.lm_loss_fct = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        self.cosine_loss_fct = nn.CosineEmbeddingLoss(reduction="mean")

    def __call__(self, s_logits, s_hidden_states, t_logits, t_hidden_states, attention_mask, lm_labels):
        """(total loss, {term: loss}) from full (B, L, V) logits and the tuples of hidden states."""
        assert s_logits.size() == t_logits.size()
        if self.restrict_ce_to_mask:
            mask = (lm_labels > -1).unsqueeze(-1).expand_as(s_logits)
        else:
            mask = attention_mask.unsqueeze(-1).expand_as(s_logits)
        vocab = s_logits.size(-1)
        s_slct = torch.masked_select(s_logits, mask).view(-1, vocab)
        t_slct = torch.masked_select(t_logits, mask).view(-1, vocab)
        assert t_slct.size() == s_slct.size()
        temperature = self.temperature
        loss_ce = (
            self.ce_loss_fct(nn.functional.log_softmax(s_slct / temperature, dim=-1), nn.functional.softmax(t_slct / temperature, dim=-1))
            * temperature**2
        )
        loss = self.alpha_ce * loss_ce
        terms = {"ce": loss_ce}
        if self.alpha_mlm > 0.0:
            terms["mlm"] = self.lm_loss_fct(s_logits.view(-1, vocab), lm_labels.view(-1))
            loss = loss + self.alpha_mlm * terms["mlm"]
        if self.alpha_cos > 0.0:
            s_hidden, t_hidden = s_hidden_states[-1], t_hidden_states[-1]
            assert s_hidden.size() == t_hidden.size()
            mask = attention_mask.unsqueeze(-1).expand_as(s_hidden)
            dim = s_hidden.size(-1)
            s_sel = torch.masked_select(s_hidden, mask).view(-1, dim)
            t_sel = torch.masked_select(t_hidden, mask).view(-1, dim)
            target = s_sel.new(s_sel.size(0)).fill_(1)
            terms["cos"] = self.cosine_loss_fct(s_sel, t_sel, target)
            loss = loss + self.alpha_cos * terms["cos"]
        return loss, terms


def grouped_adamw(student: nn.Module, lr: float, weight_decay: float, eps: float, betas=(0.9, 0.98)) -> torch.optim.AdamW:
    """AdamW over two groups, by parameter name as the reference: no decay for 'bias' and 'LayerNorm.weight'."""
    no_decay = ["bias", "LayerNorm.weight"]
    groups = [
        {
            "params": [p for n, p in student.named_parameters() if not any(nd in n for nd in no_decay) and p.requires_grad],
            "weight_decay": weight_decay,
        },
        {"params": [p for n, p in student.named_parameters() if any(nd in n for nd in no_decay) and p.requires_grad], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, eps=eps, betas=betas)


class ReferenceDistiller:
    """Distiller.__init__/train/step/optimize for one process (no DDP, no apex)."""

    def __init__(
        self,
        args,
        dataset: SequenceDataset,
        token_probs: torch.Tensor,
        student: nn.Module,
        teacher: nn.Module,
        special: dict,
        device: torch.device,
        row_lengths: np.ndarray | None = None,
    ):
        self.args, self.dataset, self.device = args, dataset, device
        self.student, self.teacher = student, teacher
        self.vocab_size = student.config.vocab_size
        self.special = special
        generator = torch.Generator().manual_seed(args.seed)
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        if args.same_batches_as_plan:
            batches = PlanBatches(
                dataset,
                len(row_lengths),
                row_lengths,
                args.plan_global_batch,
                args.batch_size,
                args.plan_group_steps,
                args.seed,
                args.steps,
            )
        elif args.group_by_size:
            batches = GroupedBatches(sampler, length_groups(dataset.lengths, MAX_MODEL_INPUT_SIZE), args.batch_size)
        else:
            batches = torch.utils.data.BatchSampler(sampler, batch_size=args.batch_size, drop_last=False)
        self.dataloader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=dataset.collate)
        self.pred_probs = torch.tensor([args.word_mask, args.word_keep, args.word_rand], dtype=torch.float32, device=device)
        self.token_probs = token_probs.to(device)
        self.loss = DistillationLoss(args.alpha_ce, args.alpha_mlm, args.alpha_cos, args.temperature, args.restrict_ce_to_mask)
        self.n_iter = self.n_total_iter = self.n_sequences_epoch = 0
        self.total_loss_epoch = self.last_loss = 0.0
        self.last_terms: dict[str, float] = {}
        # batches per epoch, for the schedule's length (with --same-batches-as-plan: the reference's own count)
        self.num_steps_epoch = math.ceil(len(dataset) / args.batch_size)
        optimization_steps = int(self.num_steps_epoch / args.gradient_accumulation_steps * args.n_epoch) + 1
        self.optimizer = grouped_adamw(student, args.learning_rate, args.weight_decay, args.adam_epsilon)
        from transformers import get_linear_schedule_with_warmup

        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, num_warmup_steps=math.ceil(optimization_steps * args.warmup_prop), num_training_steps=optimization_steps
        )
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(log_dir=os.path.join(args.dump_path, "log", "train"))
        self.tensorboard.add_text(tag="config/training", text_string=str(vars(args)), global_step=0)
        self.tensorboard.add_text(tag="config/student", text_string=str(student.config), global_step=0)

    def step(self, input_ids, attention_mask, lm_labels) -> None:
        s_out = self.student(input_ids=input_ids, attention_mask=attention_mask)
        with torch.no_grad():
            t_out = self.teacher(input_ids=input_ids, attention_mask=attention_mask)
        loss, terms = self.loss(s_out.logits, s_out.hidden_states, t_out.logits, t_out.hidden_states, attention_mask, lm_labels)
        self.total_loss_epoch += loss.item()
        self.last_loss = loss.item()
        self.last_terms = {name: value.item() for name, value in terms.items()}
        self.optimize(loss)
        self.n_sequences_epoch += input_ids.size(0)

    def optimize(self, loss) -> None:
        if (loss != loss).data.any():
            raise SystemExit("NaN detected")
        if self.args.gradient_accumulation_steps > 1:
            loss = loss / self.args.gradient_accumulation_steps
        loss.backward()
        self.n_iter += 1
        self.n_total_iter += 1
        if self.n_total_iter % self.args.log_interval == 0:
            self.log_tensorboard()
        if self.n_iter % self.args.gradient_accumulation_steps == 0:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.scheduler.step()

    def log_tensorboard(self) -> None:
        for name, param in self.student.named_parameters():
            self.tensorboard.add_scalar("parameter_mean/" + name, param.data.mean(), self.n_total_iter)
            self.tensorboard.add_scalar("parameter_std/" + name, param.data.std(), self.n_total_iter)
            if param.grad is not None:
                self.tensorboard.add_scalar("grad_mean/" + name, param.grad.data.mean(), self.n_total_iter)
                self.tensorboard.add_scalar("grad_std/" + name, param.grad.data.std(), self.n_total_iter)
        self.tensorboard.add_scalar("losses/loss", self.last_loss, self.n_total_iter)
        for name, value in self.last_terms.items():
            self.tensorboard.add_scalar(f"losses/loss_{name}", value, self.n_total_iter)
        self.tensorboard.add_scalar("learning_rate/lr", self.scheduler.get_last_lr()[0], self.n_total_iter)

    def train(self, max_steps: int, clock: dict | None = None) -> None:
        """Batches until `max_steps` optimizer steps are done; `clock` gets the real and padded tokens and the
        sequences of every batch (the end of every optimizer step is timed by step_probe.StepClock's hook)."""
        from tqdm import tqdm

        self.student.train()
        self.teacher.eval()
        batches_needed = max_steps * self.args.gradient_accumulation_steps
        done = 0
        while done < batches_needed:  # epochs (a benchmark stops inside the first)
            iterator = iter(self.dataloader)
            bar = tqdm(total=self.num_steps_epoch, desc="-Iter")
            while done < batches_needed:
                try:
                    token_ids, lengths = next(iterator)
                except StopIteration:
                    break
                if clock is not None:
                    clock["tokens"].append(int(lengths.sum()))  # = attention_mask.sum(), read on the host before the transfer
                    clock["padded_tokens"].append(token_ids.numel())
                    clock["batch_sequences"].append(token_ids.size(0))
                token_ids, lengths = token_ids.to(self.device), lengths.to(self.device)
                token_ids, attn_mask, labels = prepare_batch_mlm(
                    token_ids,
                    lengths,
                    self.token_probs,
                    self.pred_probs,
                    self.args.mlm_mask_prop,
                    self.special["pad"],
                    self.special["mask"],
                    self.vocab_size,
                )
                self.step(token_ids, attn_mask, labels)
                bar.update()
                bar.set_postfix({"Last_loss": f"{self.last_loss:.2f}", "Avg_cum_loss": f"{self.total_loss_epoch / self.n_iter:.2f}"})
                done += 1
            bar.close()

    def save_checkpoint(self, name: str = "pytorch_model.bin") -> None:
        self.student.config.save_pretrained(self.args.dump_path)
        torch.save(self.student.state_dict(), os.path.join(self.args.dump_path, name))


# ----------------------------------------------------------------------------------------------
# Command line (train.py)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="BertForMaskedLM directory (save_pretrained)")
    parser.add_argument("--data", required=True, help="distill-prep output: sequences, token_counts.npy, tokenizer/")
    parser.add_argument("--dump-path", dest="dump_path", help="output directory (default: a temporary one, removed)")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps, then stop")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    parser.add_argument(
        "--gradient-accumulation-steps",
        dest="gradient_accumulation_steps",
        type=int,
        default=1,
        help="the reference's default is 50; the comparison uses the same accumulation as our run",
    )
    parser.add_argument("--student-layers", dest="student_layers", type=int, default=2)
    parser.add_argument("--student-dropout", dest="student_dropout", type=float, default=0.1, help="distilbert-base-uncased.json: 0.1")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha-ce", dest="alpha_ce", type=float, default=5.0)
    parser.add_argument("--alpha-mlm", dest="alpha_mlm", type=float, default=2.0)
    parser.add_argument("--alpha-cos", dest="alpha_cos", type=float, default=1.0)
    parser.add_argument("--mlm-mask-prop", dest="mlm_mask_prop", type=float, default=0.15)
    parser.add_argument("--word-mask", dest="word_mask", type=float, default=0.8)
    parser.add_argument("--word-keep", dest="word_keep", type=float, default=0.1)
    parser.add_argument("--word-rand", dest="word_rand", type=float, default=0.1)
    parser.add_argument("--mlm-smoothing", dest="mlm_smoothing", type=float, default=0.7)
    parser.add_argument("--restrict-ce-to-mask", dest="restrict_ce_to_mask", action="store_true")
    parser.add_argument("--no-group-by-size", dest="group_by_size", action="store_false")
    parser.add_argument("--n-epoch", dest="n_epoch", type=int, default=3, help="only sets the schedule's length")
    parser.add_argument("--warmup-prop", dest="warmup_prop", type=float, default=0.05)
    parser.add_argument("--weight-decay", dest="weight_decay", type=float, default=0.0)
    parser.add_argument("--learning-rate", dest="learning_rate", type=float, default=5e-4)
    parser.add_argument("--adam-epsilon", dest="adam_epsilon", type=float, default=1e-6)
    parser.add_argument("--max-grad-norm", dest="max_grad_norm", type=float, default=5.0)
    parser.add_argument("--log-interval", dest="log_interval", type=int, default=500)
    parser.add_argument("--seed", type=int, default=56)
    parser.add_argument("--clock", help="write the step clock (JSON) here")
    parser.add_argument(
        "--same-batches-as-plan",
        dest="same_batches_as_plan",
        action="store_true",
        help="train on the batches distill-train would (distill.data.reader.StepPlan) instead of the reference's sampler",
    )
    parser.add_argument("--plan-global-batch", dest="plan_global_batch", type=int, help="with --same-batches-as-plan: train.global_batch")
    parser.add_argument(
        "--plan-group-steps",
        dest="plan_group_steps",
        type=int,
        default=1,
        help="with --same-batches-as-plan: data.length_group_steps (0 = data.group_by_length=false)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.same_batches_as_plan:
        args.plan_global_batch = args.plan_global_batch or args.batch_size * args.gradient_accumulation_steps
        if args.plan_global_batch != args.batch_size * args.gradient_accumulation_steps:
            raise SystemExit("--plan-global-batch must equal --batch-size x --gradient-accumulation-steps (one process)")
    import shutil
    import tempfile

    from transformers import AutoTokenizer, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    temporary = args.dump_path is None
    args.dump_path = args.dump_path or tempfile.mkdtemp(prefix="reference_distiller_")
    os.makedirs(args.dump_path, exist_ok=True)
    with open(os.path.join(args.dump_path, "parameters.json"), "w") as handle:
        json.dump(vars(args), handle, indent=4)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.data, "tokenizer"), local_files_only=True, trust_remote_code=False)
        special = {
            "pad": tokenizer.pad_token_id,
            "mask": tokenizer.mask_token_id,
            "cls": tokenizer.cls_token_id,
            "sep": tokenizer.sep_token_id,
            "unk": tokenizer.unk_token_id,
        }
        counts = np.load(os.path.join(args.data, "token_counts.npy"))
        token_probs = token_probabilities(counts, args.mlm_smoothing, tokenizer.all_special_ids, len(tokenizer))
        sequences = read_sequences(args.data)
        dataset = SequenceDataset(sequences, special["cls"], special["sep"], special["pad"], special["unk"])
        row_lengths = np.array([len(seq) for seq in sequences], dtype=np.int32)
        del sequences

        teacher = BertForMaskedLM.from_pretrained(
            args.teacher, output_hidden_states=True, local_files_only=True, trust_remote_code=False
        ).to(device)
        t = teacher.config
        student_config = DistilBertConfig(
            vocab_size=t.vocab_size,
            dim=t.hidden_size,
            n_layers=args.student_layers,
            n_heads=t.num_attention_heads,
            hidden_dim=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings,
            dropout=args.student_dropout,
            attention_dropout=args.student_dropout,
            activation=t.hidden_act,
            pad_token_id=t.pad_token_id,
            output_hidden_states=True,
        )
        student = DistilBertForMaskedLM(student_config).to(device)
        assert student.config.vocab_size == teacher.config.vocab_size and token_probs.size(0) == student.config.vocab_size

        distiller = ReferenceDistiller(args, dataset, token_probs, student, teacher, special, device, row_lengths)
        from step_probe import StepClock

        steps = StepClock().install()  # the end of every optimizer step, timed as in distill-train's runs
        clock = {
            "process_start": PROCESS_START,
            "tokens": [],
            "padded_tokens": [],
            "batch_sequences": [],
            "step_times": steps.step_times,
            "accumulation": args.gradient_accumulation_steps,
            "dataset_sequences": len(dataset),
            "removed_sequences": dataset.removed,
        }
        distiller.train(args.steps, clock)
        steps.remove()
        distiller.save_checkpoint()
        distiller.tensorboard.close()
        clock["exit_time"] = time.time()
        clock["last_loss"] = distiller.last_loss
        clock["last_terms"] = distiller.last_terms
        if args.clock:
            with open(args.clock, "w") as handle:
                json.dump(clock, handle)
    finally:
        if temporary:
            shutil.rmtree(args.dump_path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
