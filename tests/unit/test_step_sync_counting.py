"""The host-device sync counter itself, in process: reads of device values counted, host batches not; unfused optimizers'
step counters are host values; implicit and explicit syncs counted; the padded encoder forward reads nothing (the
per-step count of a real run is tests/e2e/test_step_overhead.py)."""

import os
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "bench"))
from step_probe import SyncCounter  # noqa: E402


def test_reads_of_device_values_are_counted_and_reads_of_host_batches_are_not():
    counter = SyncCounter("cpu")
    batch = {"attention_mask": torch.ones(2, 5, dtype=torch.long), "input_ids": torch.arange(10).view(2, 5)}
    weight = torch.ones(5)  # created before counting: lives on the device
    with counter:
        SyncCounter.mark_host(batch)  # what the step clock does with every fetched batch
        lengths = batch["attention_mask"].sum(1)
        assert int(lengths.sum()) == 10 and lengths.tolist() == [5, 5]  # host: no sync on a GPU either
        ids = batch["input_ids"].to(torch.device("cpu"), non_blocking=True)  # host -> device copy
        assert ids is not batch["input_ids"]
        total = (ids.float() * weight).sum()
        assert total.item() == 45.0  # device read
        assert float(total) == 45.0  # device read
        if total > 0:  # bool() of a device tensor
            pass
        device_sums = torch.zeros(3, dtype=torch.float64, device=torch.device("cpu"))
        assert device_sums.tolist() == [0.0, 0.0, 0.0]  # device read
        host_list = torch.tensor([1.0, 2.0])  # a factory without a device: host
        assert host_list.tolist() == [1.0, 2.0]
        loaded = next(iter(torch.utils.data.DataLoader([{"mask": np.ones(3, dtype=np.int64)}], batch_size=None)))
        assert int(loaded["mask"].sum()) == 3  # what a data loader yields is host data
        assert int(torch.from_numpy(np.ones(2)).sum()) == 2  # so is torch.from_numpy's
        counter.mark_step()
    assert counter.per_step == [{"read": 4}]
    whats = sorted(e["what"] for e in counter.sites.values())
    assert whats == ["__bool__", "__float__", "item", "tolist"]
    assert all(site.startswith(os.path.join("tests", "unit", "test_step_sync_counting.py") + ":") for site in counter.sites)


def test_step_counters_of_unfused_optimizers_are_host_values():
    from step_probe import StepClock

    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    clock = StepClock(count_syncs=True, total_steps=4).install()
    try:
        for _ in range(4):
            loss = (params[0] * 2).sum()
            loss.backward()  # tells the clock a new step began
            optimizer.step()  # AdamW reads its (host) step count with .item(): no sync on any device
            optimizer.zero_grad()
            loss.item()  # one device read per step
    finally:
        clock.remove()
    assert len(clock.step_times) == 4
    assert clock.counter.per_step == [{"read": 1}, {"read": 1}]  # counted from the end of step 2 to the end of step 4


def test_implicit_and_explicit_syncs_are_counted():
    from deepspeed.accelerator import get_accelerator

    counter = SyncCounter("cpu")
    x = torch.arange(6.0)
    original = get_accelerator().synchronize
    with counter:
        keep = x > 2
        x[keep]  # boolean-mask indexing: output size depends on device values
        torch.nonzero(x)
        torch.masked_select(x, keep)
        x.index_select(0, torch.tensor([0, 1]))  # no sync
        get_accelerator().synchronize()
        counter.mark_step()
        with_paused = counter.paused
        counter.paused += 1
        x.sum().item()  # paused (the data loader's time): not counted
        counter.paused = with_paused
        counter.mark_step()
    assert get_accelerator().synchronize == original, "the accelerator's synchronize is restored"
    assert counter.per_step == [{"implicit": 3, "explicit": 1}, {}]


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_padded_encoder_forward_reads_nothing_and_attends_as_with_the_2d_mask(family):
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, RobertaConfig, RobertaForMaskedLM

    from distill.models.build import model_forward

    torch.manual_seed(0)
    shape = dict(vocab_size=100, num_attention_heads=2, attn_implementation="sdpa")
    model = {
        "bert": lambda: BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, **shape)),
        "roberta": lambda: RobertaForMaskedLM(
            RobertaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, pad_token_id=1, **shape)
        ),
        "distilbert": lambda: DistilBertForMaskedLM(
            DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, attn_implementation="sdpa")
        ),
    }[family]().eval()
    ids = torch.randint(5, 100, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    positions = torch.tensor([1, 2, 9, 15])
    counter = SyncCounter("cpu")
    with torch.no_grad(), counter:
        SyncCounter.mark_host({"ids": ids, "mask": mask, "positions": positions})
        ours = model_forward(model, ids.to("cpu"), mask.to("cpu"), positions.to("cpu"))
        counter.mark_step()
    assert counter.per_step == [{}], counter.sites
    with torch.no_grad():  # transformers given the 2-d mask (what it reads back to the host)
        base = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.equal(ours.hidden[real], base[real])
