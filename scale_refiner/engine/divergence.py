"""Divergence: a non-finite loss, metric or gradient norm stops the run, naming the step and the metrics.

The check must not read the device every step (a host sync per step), so the step's values are only folded
into device tensors: the first step at which any of them was non-finite, and which of them were. The host reads
them where it synchronises anyway -- the logged steps -- and before every checkpoint, so a checkpoint (and with
it ``checkpoints/latest`` and the exports) never holds weights updated by a non-finite step. The ranks agree
through one all-reduce (the first bad step over all ranks), so every rank stops at the same point and none waits
in a collective for a rank that has left.

Why stop rather than skip the step: in bf16 there is no loss scale to lower, so a non-finite value does not
come from a transient overflow that skipping would ride out; it means diverged weights, a bad sample or a bug,
and each further step only moves the weights further. The run stops with the last good checkpoint as it was.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from scale_refiner.precision import nonfinite_tensors

_NEVER = 2 ** 62


class DivergenceError(RuntimeError):
    """A non-finite loss, metric or gradient norm; the message names the stage, step and values."""


class NonFiniteGuard:
    def __init__(self, ctx, stage: str):
        self.ctx, self.stage = ctx, stage
        self.first_bad: Optional[torch.Tensor] = None  # the global step of the first non-finite value (device)
        self.bad_keys: Optional[torch.Tensor] = None  # which values were non-finite at that step
        self.keys: List[str] = []

    def observe(self, step: int, values: Dict[str, torch.Tensor]) -> None:
        """Fold one step's values in (device operations only)."""
        device = next((v.device for v in values.values() if torch.is_tensor(v) and not hasattr(v, "to_local")),
                      torch.device("cpu"))
        names = sorted(values)

        def non_finite(value):
            if hasattr(value, "to_local"):  # FSDP2's gradient norm: a replicated DTensor, whole on every rank
                value = value.to_local()
            if torch.is_tensor(value):
                return (~torch.isfinite(value.detach().float().reshape(()))).to(device)
            # a host number (or None: no norm this step): a device fill, not a host-to-device copy, so that the
            # step stays free of syncs (torch.cuda.set_sync_debug_mode in tests/test_gpu.py)
            bad = value is not None and not math.isfinite(float(value))
            return torch.full((), bad, dtype=torch.bool, device=device)

        flags = torch.stack([non_finite(values[n]) for n in names])
        if self.first_bad is None:  # the step's values have the same keys every step
            self.keys = names
            self.first_bad = torch.full((), _NEVER, dtype=torch.int64, device=flags.device)
            self.bad_keys = torch.zeros_like(flags)
        fresh = flags.any() & (self.first_bad == _NEVER)  # the first bad step is kept, later ones not
        self.first_bad = torch.where(fresh, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_keys = torch.where(fresh, flags, self.bad_keys)

    def check(self) -> None:
        """Collective. Raise ``DivergenceError`` on every rank if any rank saw a non-finite value."""
        if self.first_bad is None:
            return
        agreed = self.first_bad.clone()
        if self.ctx.world > 1:
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        step = int(agreed)
        if step == _NEVER:
            return
        if int(self.first_bad) == step:
            which = [n for n, bad in zip(self.keys, self.bad_keys.tolist()) if bad]
            seen = f"non-finite {', '.join(which)} on rank {self.ctx.rank}"
        else:
            seen = "non-finite values on another rank"
        raise DivergenceError(f"stage {self.stage}, step {step}: {seen}; the run stops (the last checkpoint "
                              f"is the last good state: lower the learning rate or check the data, then "
                              f"resume from it)")


def check_finite(state: Dict[str, torch.Tensor], what: str) -> None:
    """Refuse a state with a non-finite floating-point tensor (before it is written as a result)."""
    bad = nonfinite_tensors(state)
    if bad:
        raise DivergenceError(f"{what}: non-finite values in {bad}; not written")
