"""The student's engine: DeepSpeed configuration, optimizer, schedule, and one training step's calls.

`deepspeed_config` merges the user's DeepSpeed JSON with what the recipe owns (batch sizes, clipping,
precision); `make_optimizer` and `warmup_linear_decay` are shared with distill-finetune. `StudentEngine`
wraps `deepspeed.initialize` and exposes what the loop calls: forward, backward + step, the numbers a
step reports, save and load.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import resource
import sys
from typing import Any, Optional

import torch

from distill.checkpoints import layout as ckpt
from distill.checkpoints import safe_load
from distill.config import RECIPE_OWNED_DS_KEYS, ConfigError, batch_problem, read_deepspeed_json
from distill.model_outputs import ModelOutputs
from distill.models.build import enable_activation_checkpointing
from distill.train.profiling import COMMS_LOGGER

log = logging.getLogger("distill.train.engine")


def deepspeed_config(cfg, world_size: int, precision: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed JSON plus what this recipe owns (batch sizes, clipping, precision); every problem in one ConfigError."""
    problems = [p for p in [batch_problem(cfg.train.global_batch, cfg.train.micro_batch, world_size)] if p]
    try:
        base = read_deepspeed_json(cfg.deepspeed.config)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems)
    per_step = cfg.train.micro_batch * world_size
    ds = {k: v for k, v in base.items() if k not in RECIPE_OWNED_DS_KEYS}
    ds.update(
        train_batch_size=cfg.train.global_batch,
        train_micro_batch_size_per_gpu=cfg.train.micro_batch,
        gradient_accumulation_steps=cfg.train.global_batch // per_step,
        gradient_clipping=cfg.optim.grad_clip,
    )
    ds.setdefault("steps_per_print", 10**9)
    # DeepSpeed's throughput timer synchronises the device twice per micro step to time it; the trainer times steps itself
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    if cfg.train.profile_phases:
        ds["comms_logger"] = dict(COMMS_LOGGER)  # collectives timed (and made blocking) for the phase breakdown
    zero = dict(ds.get("zero_optimization", {}))
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    zero.setdefault("stage", 2)
    ds["zero_optimization"] = zero
    if precision == torch.bfloat16:
        # skipping a non-finite step needs DeepSpeed's overflow check, which bf16 leaves off by default
        ds["bf16"] = {"enabled": True, "check_grad_overflow": cfg.train.max_nonfinite_steps > 0}
    elif precision == torch.float16:
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds


def lean_single_process_config(ds: dict[str, Any]) -> dict[str, Any]:
    """One process at ZeRO-1/2: ZeRO-1 with no overlap_comm, contiguous_gradients or reduce_scatter, so backward runs no
    per-parameter gradient hooks and buckets (ZeRO-2 registers them whatever the settings); the gradients are copied into the
    one fp32 partition once, at the step. With one rank ZeRO-1 and ZeRO-2 hold the same state and write the same
    checkpoint files (one partition: every parameter, its gradient and Adam moments), so resume, a later resume on more
    ranks and the universal conversion (elastic resume) see what the configured stage writes. Other stages: unchanged."""
    zero = dict(ds.get("zero_optimization", {}))
    if zero.get("stage") not in (1, 2):
        return ds
    zero.update(stage=1, overlap_comm=False, contiguous_gradients=False, reduce_scatter=False)
    return dict(ds, zero_optimization=zero)


class _Done:
    """The handle of a collective that had nothing to do."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _OneRankCollectives:
    """While active, `deepspeed.comm.all_reduce` returns at once: with a single rank a sum, max or mean over the ranks is
    the tensor itself (DeepSpeed still divides by the world size, 1). Used around the engine's backward and step only."""

    def __enter__(self):
        import deepspeed.comm as ds_comm  # deepspeed: not at start-up

        self._saved = ds_comm.all_reduce
        ds_comm.all_reduce = _identity_all_reduce
        return self

    def __exit__(self, *exc) -> None:
        import deepspeed.comm as ds_comm  # deepspeed: not at start-up

        ds_comm.all_reduce = self._saved


class _KnownFiniteNorm:
    """While active, DeepSpeed's ZeRO-1/2 step takes `norm` (already computed, and read to be finite) as the global gradient norm
    and its validity checks answer 'valid' without reading the device."""

    def __init__(self, optimizer, norm: torch.Tensor):
        self.optimizer, self.norm = optimizer, norm

    def __enter__(self):
        from deepspeed.runtime.zero import stage_1_and_2  # deepspeed: not at start-up

        self._saved_check = stage_1_and_2.is_invalid_grad_norm
        stage_1_and_2.is_invalid_grad_norm = _finite
        self.optimizer.scaled_global_norm = lambda norm_type=2: self.norm  # instance attribute: shadows the method
        return self

    def __exit__(self, *exc) -> None:
        from deepspeed.runtime.zero import stage_1_and_2  # deepspeed: not at start-up

        stage_1_and_2.is_invalid_grad_norm = self._saved_check
        del self.optimizer.scaled_global_norm


def _finite(norm) -> bool:
    return False


def _identity_all_reduce(tensor, op=None, group=None, async_op=False, *args, **kwargs):
    return _Done() if async_op else None


def preload_muon_lazily() -> None:
    """DeepSpeed imports its Muon optimizer during set-up and in the first gradient reduction (to test `isinstance(optimizer,
    MuonWithAuxAdam)`), and that module decorates its kernels with torch.compile at import, which imports torch._dynamo
    and inductor: ~1.5 s of every start-up on an idle CPU, more under load, for an optimizer the recipe never uses
    (AdamW). Imported here first with the decoration deferred to the first call (a Muon run still gets its compiled
    kernels, compiled when first used)."""
    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    from deepspeed.runtime import compiler  # deepspeed: not at start-up

    def lazy_compile():
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = torch.compile(fn)
                return compiled(*args, **kwargs)

            return call

        return decorate

    original = compiler.compile
    compiler.compile = lazy_compile
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401  # torch: not at start-up
        import deepspeed.runtime.zero.muon.original_muon  # noqa: F401  # torch: not at start-up
    finally:
        compiler.compile = original


def warmup_linear_decay(total_steps: int, warmup_steps: int):
    """LambdaLR factor: linear warmup over `warmup_steps`, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def make_optimizer(model: torch.nn.Module, optim, device: torch.device) -> torch.optim.Optimizer:
    """AdamW from an `optim` section (lr, weight_decay, betas, eps); no weight decay on biases and LayerNorm weights (1-d parameters)."""
    optim = getattr(optim, "optim", optim)  # a whole run config is accepted too
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **extra)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by this rank, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class StudentEngine:
    """The DeepSpeed engine around the student wrapper (distill.models.build.StudentForDistillation)."""

    def __init__(
        self,
        wrapper: torch.nn.Module,
        optim_cfg,
        ds_config: dict[str, Any],
        total_steps: int,
        warmup_steps: int,
        device: torch.device,
        world_size: int = 1,
        lean_single_process: bool = False,
        lean_startup: bool = False,
        activation_checkpointing: int = 0,
    ):
        import deepspeed  # deepspeed: not at start-up

        if activation_checkpointing:  # before DeepSpeed wraps the module; recomputation runs inside the layers, under its hooks
            layers = enable_activation_checkpointing(wrapper.model, activation_checkpointing)
            log.info("activation checkpointing: student layers %s recomputed in backward", layers)
        optimizer = make_optimizer(wrapper, optim_cfg, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps, warmup_steps))
        configured = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        if lean_single_process and world_size == 1:
            ds_config = lean_single_process_config(ds_config)
        if lean_startup:
            preload_muon_lazily()
        self.engine, _, _, _ = deepspeed.initialize(
            model=wrapper, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        # one rank: DeepSpeed's all-reduces (gradient bucket, grad norm, overflow flag) are the identity; skip them (gloo's cost)
        lean = lean_single_process and world_size == 1
        self._collectives = _OneRankCollectives() if lean else contextlib.nullcontext()
        # one rank at ZeRO-1/2: the update's gradient norm is computed before the step and read with the step's sums, so the
        # step itself needs no host read (see boundary_grad_norm)
        self.defers_update = lean and self.engine.zero_optimization_stage() == 1 and hasattr(self.engine.optimizer, "scaled_global_norm")
        self._pending_norm: Optional[torch.Tensor] = None
        # the stage the run is configured with (what its checkpoints record and a resume compares), whatever runs underneath
        self.zero_stage = (
            configured
            if self.engine.zero_optimization_stage() in (1, 2) and configured in (1, 2)
            else self.engine.zero_optimization_stage()
        )

    @classmethod
    def build(
        cls, optim_cfg, deepspeed_cfg, plan, ctx, wrapper: torch.nn.Module, lean_startup: bool = False, activation_checkpointing: int = 0
    ) -> "StudentEngine":
        """The engine from sections `optim` and `deepspeed` and the run's plan (its DeepSpeed config and step counts);
        `activation_checkpointing` (train.activation_checkpointing): checkpoint every k-th layer of the student, 0 = none."""
        return cls(
            wrapper,
            optim_cfg,
            plan.ds_config,
            plan.total_steps,
            plan.warmup_steps,
            ctx.device,
            ctx.world_size,
            deepspeed_cfg.lean_single_process,
            lean_startup=lean_startup,
            activation_checkpointing=activation_checkpointing,
        )

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def train(self) -> None:
        self.engine.train()

    def forward(self, batch) -> ModelOutputs:
        # no attention mask without padding (decided on the host): transformers would read the mask back to drop it
        return self.engine.module.outputs(
            self.engine(batch.input_ids, batch.attention_mask if batch.padded else None, batch.logit_positions, batch.documents)
        )

    def backward(self, loss: torch.Tensor) -> None:
        with self._collectives:
            self.engine.backward(loss)

    def step(self) -> None:
        """DeepSpeed's step: it updates the weights only at the end of the gradient accumulation."""
        with self._collectives:
            self.engine.step()

    def boundary_grad_norm(self) -> torch.Tensor:
        """With `defers_update`, after the last micro batch's backward and before `update`: the global gradient norm the update
        will clip with, as DeepSpeed computes it (inf when not finite), on the device; no host read."""
        with self._collectives:
            self._pending_norm = self.engine.optimizer.scaled_global_norm()
        return self._pending_norm

    def update(self, norm_is_finite: bool) -> None:
        """With `defers_update`: the last micro batch's step, which updates the weights. DeepSpeed's checks of the norm read it
        back to the host (three times); the caller has read it already (with the step's sums), so when it is finite the step
        runs with that norm and without the reads. A non-finite norm goes through DeepSpeed's own check, which skips the update."""
        norm, self._pending_norm = self._pending_norm, None
        if not norm_is_finite:
            return self.step()
        with self._collectives, _KnownFiniteNorm(self.engine.optimizer, norm):
            self.engine.step()

    @property
    def skipped_steps(self) -> int:
        """Updates DeepSpeed skipped (its overflow check found a non-finite gradient)."""
        return self.engine.skipped_steps

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def grad_norm_tensor(self) -> Optional[torch.Tensor]:
        """The last update's global gradient norm as a tensor on the device (no host read), or None."""
        norm = self.engine.get_global_grad_norm()
        if norm is None or torch.is_tensor(norm):
            return norm
        return torch.tensor(float(norm), dtype=torch.float64).to(self.engine.device)  # a Python float (DeepSpeed's inf on overflow)

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, root: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)

    def load(self, load_root: str, tag: str, universal: bool) -> None:
        """Weights, optimizer and schedule of checkpoint `tag`, every file read under the weights-only guard."""
        hyper = [{k: g[k] for k in ("weight_decay", "betas", "eps") if k in g} for g in self.engine.optimizer.param_groups]
        try:
            with safe_load.guard():  # DeepSpeed's torch.load calls unpickle tensors only, never code
                path, _ = self.engine.load_checkpoint(load_root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        except pickle.UnpicklingError as exc:
            raise ckpt.CheckpointError(safe_load.describe(os.path.join(load_root, tag), exc)) from None
        if path is None:
            raise ckpt.CheckpointError(
                f"DeepSpeed could not load checkpoint {os.path.join(load_root, tag)}; it is damaged: move it away to "
                f"resume from an earlier one"
            )
        for group, saved in zip(self.engine.optimizer.param_groups, hyper):
            group.update(saved)  # recipe hyperparameters per group (a universal ZeRO-3 load copies group 0's to all)
        if universal:
            _unshare_adam_steps(self.engine.optimizer)


def _unshare_adam_steps(optimizer) -> None:
    """A universal ZeRO-3 load gives every parameter group the *same* `step` tensor; torch's Adam increments
    it in place once per group, so later groups would use a step count too high (wrong bias correction)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
