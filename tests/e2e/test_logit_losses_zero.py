"""distill.objective.chunked_logits under a real 2-process DeepSpeed ZeRO-2 / ZeRO-3 run (gloo on CPU) against one
plain process (this file is also the workers' script: `python tests/e2e/test_logit_losses_zero.py`).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from distill.objective.chunked_logits import chunked_logit_loss, naive_logit_loss
from distill.objective.head_loss import ChunkedLogitLoss

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H_S, H_T, ROWS_S, ROWS_T, VOCAB = 8, 12, 40, 38, 36  # as in tests/unit/test_logit_losses.py: two heads padded differently


BATCH, LENGTH, LR, STEPS = 4, 6, 0.5, 2
LOSS_OPTIONS = dict(beta=0.5, temperature=2.0, chunk_size=4, vocab_size=VOCAB, ce_weight=0.5)


class TinyStudent(nn.Module):
    """Embedding -> linear -> tanh -> padded LM head (with bias), whose logits only ChunkedLogitLoss computes."""

    def __init__(self, grad_in_forward=True):
        super().__init__()
        self.embed = nn.Embedding(ROWS_S, H_S)
        self.body = nn.Linear(H_S, H_S)
        self.lm_head = nn.Linear(H_S, ROWS_S)
        self.logit_loss = ChunkedLogitLoss(self.lm_head, "jsd", grad_in_forward=grad_in_forward, **LOSS_OPTIONS)

    def hidden(self, ids):
        return torch.tanh(self.body(self.embed(ids)))

    def forward(self, ids, teacher_hidden=None, teacher_weight=None, labels=None):
        """The loss (computed inside this forward), or only the hidden states when no teacher is given."""
        if teacher_hidden is None:
            return self.hidden(ids)
        return self.logit_loss(self.hidden(ids), teacher_hidden, teacher_weight, labels=labels)


def zero_data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
    labels[:, -1] = -100  # the same count of labelled positions in every sequence, so the mean of rank means is the global mean
    return ids, labels, torch.randn(BATCH, LENGTH, H_T, generator=g), torch.randn(ROWS_T, H_T, generator=g)


def zero_reference():
    """One plain process, the whole batch, the direct full-logits loss, plain SGD."""
    torch.manual_seed(0)
    model = TinyStudent()
    ids, labels, t_hidden, t_weight = zero_data()
    losses = []
    for _ in range(STEPS):
        out = naive_logit_loss(
            model.hidden(ids),
            model.lm_head,
            t_hidden,
            t_weight,
            "jsd",
            labels=labels,
            **{k: v for k, v in LOSS_OPTIONS.items() if k != "chunk_size"},
        )
        model.zero_grad()
        out.loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
        losses.append(out.loss.item())
    return losses, model.lm_head.weight.detach().clone(), model.lm_head.bias.detach().clone()


def zero_worker(out_path):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import unregister_external_parameter

    from distill.train.distributed import init_distributed

    ctx = init_distributed()
    ids, labels, t_hidden, t_weight = zero_data()
    mine = slice(ctx.rank * BATCH // ctx.world_size, (ctx.rank + 1) * BATCH // ctx.world_size)
    results = {}
    # "unregistered": the control, ZeRO-3 without ChunkedLogitLoss's registration of the head as its external parameter
    for stage, where in ((2, "inside"), (3, "inside"), (3, "after"), (3, "unregistered")):
        torch.manual_seed(0)
        model = TinyStudent(grad_in_forward=where != "after")  # "after" also recomputes the chunks in backward
        if where == "unregistered":
            for param in (model.lm_head.weight, model.lm_head.bias):
                unregister_external_parameter(model.logit_loss, param)
        config = {
            "train_micro_batch_size_per_gpu": BATCH // ctx.world_size,
            "gradient_accumulation_steps": 1,
            "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        }  # partition even tiny params
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
        head = engine.module.lm_head
        found = {"weight_numel_outside_forward": head.weight.numel()}
        try:  # the plain function outside any module forward: under ZeRO-3 the weight is empty here
            chunked_logit_loss(torch.randn(3, H_S), head, torch.randn(3, H_T), t_weight, "jsd", vocab_size=VOCAB)
            found["outside_forward_error"] = ""
        except ValueError as exc:
            found["outside_forward_error"] = str(exc)
        if where == "unregistered":
            try:
                engine.module.logit_loss(engine(ids[mine]), t_hidden[mine], t_weight, labels=labels[mine])
                found["unregistered_error"] = ""
            except ValueError as exc:
                found["unregistered_error"] = str(exc)
            results[(stage, where)] = found
            break  # the last case: DeepSpeed's module stack is left as the exception left it
        losses = []
        for _ in range(STEPS):
            if where == "inside":  # the engine's forward computes the loss
                out = engine(ids[mine], t_hidden[mine], t_weight, labels[mine])
            else:  # the engine's forward returns hidden states; the loss module is called after it, as the trainer's objective would
                out = engine.module.logit_loss(engine(ids[mine]), t_hidden[mine], t_weight, labels=labels[mine])
            engine.backward(out.loss)
            engine.step()
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            losses.append(loss.item() / ctx.world_size)
        with deepspeed.zero.GatheredParameters([head.weight, head.bias]):
            found.update(losses=losses, weight=head.weight.detach().clone(), bias=head.bias.detach().clone())
        results[(stage, where)] = found
    if ctx.rank == 0:
        torch.save(results, out_path)
    dist.barrier()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(600)
def test_zero2_and_zero3_two_processes_match_one_process(tmp_path):
    from support import assert_close  # tests/ is on sys.path under pytest, not in the workers

    out_path = tmp_path / "zero.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        os.path.abspath(__file__),
        "--zero-worker",
        str(out_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    results = torch.load(out_path, weights_only=True)
    ref_losses, ref_weight, ref_bias = zero_reference()
    torch.manual_seed(0)
    initial = TinyStudent().lm_head.weight.detach()
    assert ref_losses[1] < ref_losses[0]
    control = results.pop((3, "unregistered"))
    assert "ZeRO-3" in control["unregistered_error"]  # without the registration the head is empty in the loss module's forward
    for key, got in results.items():
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5), key
        assert_close(got["weight"], ref_weight)
        assert_close(got["bias"], ref_bias)
        assert (got["weight"] - initial).abs().max() > 1e-3  # it moved
    # ZeRO-2 keeps whole parameters; ZeRO-3 partitions the head, so only a module forward that registered it can use it
    assert results[(2, "inside")]["weight_numel_outside_forward"] == ROWS_S * H_S and results[(2, "inside")]["outside_forward_error"] == ""
    assert results[(3, "after")]["weight_numel_outside_forward"] == 0 and "ZeRO-3" in results[(3, "after")]["outside_forward_error"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero-worker", required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    zero_worker(parser.parse_args().zero_worker)
