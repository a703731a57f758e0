"""Asynchronous-statistics BatchNorm1d (``heads.norm=async``): global-batch BN without blocking collectives.

SyncBN (``GlobalBatchNorm1d``) blocks on two all-reduces per BN layer per step (forward statistics, backward
gradient sums): 8 heads x 5 layers = 80 blocking collectives per step on the critical path. This layer
normalises with the *global* statistics of the previous step instead, which arrive through ONE bucketed,
non-blocking all-reduce for every async-BN layer of the model (batch-renormalisation style, Ioffe 2017):

    forward value  y = gamma * (xhat_local * r + d) + beta
                   xhat_local = (x - mu_local) / sigma_local              (carries the gradient)
                   r = sg(sigma_local / sigma_prev)  clipped to [1/rmax, rmax]
                   d = sg((mu_local - mu_prev) / sigma_prev) clipped to [-dmax, dmax]

Unclipped, ``xhat_local * r + d == (x - mu_prev) / sigma_prev`` exactly: the value is normalisation by the
previous step's global statistics (mu_prev, sigma_prev), while the gradient keeps BN's in-batch coupling
through ``xhat_local`` (as in Batch Renormalization, Ioffe 2017). sigma includes eps. Defaults rmax = 3,
dmax = 5 (Batch Renorm's final values); here the reference statistics come from a global batch of the same
distribution one step earlier, so r, d stay near 1, 0 and the clip only guards against a sudden shift (a
learning-rate spike, a stage change) and a tiny per-rank batch.

Once per step (see "When the reduce runs"), every layer's local [sum x, sum x^2, n] since the last reduce is
concatenated into one flat tensor and all-reduced with ``async_op=True``; the handle is waited at the next
training forward of any layer of the model, which unpacks the sums into each layer's ``stats_global`` and
updates the running statistics (for eval) from them. All ranks receive the same reduced numbers, so every
rank holds bit-identical buffers.

Who shares a bucket: a ``AsyncBNCoordinator`` (plain Python object, not a module). A layer joins the
coordinator that is current when it is built: the innermost ``with async_bn_scope():`` block, else a
process-wide default. ``attach(model)`` rebinds every async-BN layer of ``model`` to one fresh coordinator
(what a model with several async-BN sets, or a process building several models, should call);
``coordinator_of(model)`` returns it. Copies (``copy.deepcopy``, pickling) get a fresh coordinator of their own.

When the reduce runs (the API):
- ``auto_flush=True`` (default): the reduce is launched as soon as every (live, training-mode) layer of the
  coordinator has run its forward since the last reduce, i.e. at the end of the heads' forward, so it overlaps
  the loss, the backward and the optimizer step. No caller change needed. With gradient accumulation this is
  one reduce per micro-step (each micro-step normalises with the previous micro-step's global statistics).
- ``auto_flush=False``: statistics accumulate (they are sums) over every forward until the caller invokes
  ``coordinator.flush()`` (or ``flush_async_bn(model)``) once per optimizer step, e.g. right after the last
  micro-step's forward or after ``optimizer.step()``. Use this for gradient accumulation with one reduce per
  optimizer step, or when the heads run more than once per step (e.g. global and local crops in two calls):
  in auto mode a second call in the same step finds the reduce of the first still in flight and waits on it.
- ``coordinator.sync()``: complete the reduce in flight now (wait, unpack, fold into running statistics).
  Call it on every rank before an evaluation if the running statistics must include the very last step.

Defined behaviour:
- Step 0 (no previous statistics): ``first_step="sync"`` (default) runs one blocking, forward-only all-reduce
  per layer, so step 0's value is exactly SyncBN's and its statistics are those every later step is
  compared to; ``first_step="local"`` uses local statistics (plain BN, no collective) and sends them in the
  first bucket. Resumed runs have statistics already, so this happens once per training run.
- Eval mode: plain BN with the running statistics; no collective, no wait, no state change.
- Activation-checkpoint recomputation (torch.utils.checkpoint, reentrant or not, i.e. any forward executed
  inside a backward pass): it neither waits, contributes to the bucket, nor updates statistics, and it uses
  the same ``stats_global`` as the original forward, so it recomputes the same values.
- state_dict / resume: everything is in buffers (``stats_global``: the reduced sums in use; ``stats_acc``:
  local sums not yet sent; ``stats_sent`` + ``pending``: the local sums of the reduce in flight). Saving needs
  no collective (so rank 0 alone may save); a fresh model loaded from the state redoes the in-flight reduce,
  blocking, from ``stats_sent`` at its first training forward and gets the same sums bit for bit (same world
  size). Copying the buffers directly (``b.copy_``, as the trainer's client state does) works the same way.
- Single process / world size 1: no collective; "global" statistics are the previous step's local ones.

Precision: inputs of any float dtype, statistics in fp32 (fp64 for fp64 inputs) as in ``GlobalBatchNorm1d``.
Assumes SPMD: every rank runs the same layers in the same order with at least one row each.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scale_refiner.heads.affine import affine_params
from scale_refiner.precision import as_fp32, fp32_island

log = logging.getLogger("scale_refiner")


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass: where checkpointed forwards are recomputed."""
    return torch._C._current_graph_task_id() != -1


class AsyncBNCoordinator:
    """One bucket for all async-BN layers of a model: one non-blocking all-reduce per step, waited lazily."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, auto_flush: bool = True):
        self.group = group
        self.auto_flush = auto_flush
        self._refs: List[weakref.ref] = []
        self._seen: set = set()  # ids of layers that ran a training forward since the last flush
        self._work = None  # the in-flight all-reduce, or None
        self._flat: Optional[torch.Tensor] = None  # its buffer (the reduced sums once waited)
        self._members: List[weakref.ref] = []  # the layers in the bucket, in order
        self._sent_keys: list = []  # (id, version) of each member's stats_sent when launched
        self._warned = False
        self.launched = 0  # counters for tests and benchmarks
        self.blocking = 0

    # membership -----------------------------------------------------------------------------------------
    def register(self, layer: "AsyncBatchNorm1d") -> None:
        if all(r() is not layer for r in self._refs):
            self._refs.append(weakref.ref(layer))

    def unregister(self, layer: "AsyncBatchNorm1d") -> None:
        self._refs = [r for r in self._refs if r() is not None and r() is not layer]

    def layers(self) -> List["AsyncBatchNorm1d"]:
        self._refs = [r for r in self._refs if r() is not None]
        return [r() for r in self._refs]

    def __deepcopy__(self, memo):  # a copied model gets its own, empty coordinator; its layers re-register
        return AsyncBNCoordinator(self.group, self.auto_flush)

    def __getstate__(self):
        return {"group": None, "auto_flush": self.auto_flush}

    def __setstate__(self, state):
        self.__init__(state["group"], state["auto_flush"])

    # the step protocol ----------------------------------------------------------------------------------
    def before_forward(self, layer: "AsyncBatchNorm1d") -> None:
        """Called by a layer's (non-recomputed) training forward before it normalises."""
        if self.auto_flush and id(layer) in self._seen:
            # a second forward of this layer before the bucket filled: some registered layer is not run
            # (or the heads run twice per step): reduce now, blocking, and say so once
            if not self._warned:
                log.warning("async BN: a layer ran twice before every layer of its coordinator ran once; "
                            "reducing now (blocking). Use attach(model) per model, or auto_flush=False and "
                            "flush() once per step when the heads run more than once per step.")
                self._warned = True
            self.flush()
        # the first forward of a step (nothing seen since the last flush) completes the reduce in flight
        if not self._seen and (self._work is not None or any(l._flag_pending() for l in self.layers())):
            self.sync()

    def after_forward(self, layer: "AsyncBatchNorm1d") -> None:
        self._seen.add(id(layer))
        if self.auto_flush:
            live = [l for l in self.layers() if l.training]
            if all(id(l) in self._seen for l in live):
                self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Launch the one non-blocking all-reduce of every layer's statistics gathered since the last flush.
        Call on every rank (SPMD), once per step, when ``auto_flush`` is off. A no-op when nothing was gathered."""
        self._seen = set()
        if self._work is not None or any(l._flag_pending() for l in self.layers()):
            self.sync()  # two flushes without a training forward in between: finish the first one
        members = [l for l in self.layers() if l._flag_acc()]
        if not members:
            return
        flat = torch.cat([l.stats_acc.to(torch.float64 if l.stats_acc.dtype == torch.float64 else torch.float32)
                          for l in members])
        for l in members:
            l.stats_sent.copy_(l.stats_acc)
            l.stats_acc.zero_()
            l.pending.fill_(1)
            l._remember_flags(pending=True, acc=False)
        if _distributed(self.group):
            self._work = dist.all_reduce(flat, group=self.group, async_op=True)
        else:
            self._work = None
        self.launched += 1
        self._flat = flat
        self._members = [weakref.ref(l) for l in members]
        self._sent_keys = [(id(l.stats_sent), l.stats_sent._version) for l in members]

    @torch.no_grad()
    def sync(self) -> None:
        """Complete the reduce in flight: wait on it (or, after a resume / a buffer overwrite, redo it blocking
        from the saved ``stats_sent``), then unpack into ``stats_global`` and the running statistics."""
        pending = [l for l in self.layers() if l._flag_pending()]
        mine = [r() for r in self._members]
        trusted = (self._flat is not None and len(mine) == len(pending)
                   and all(a is b for a, b in zip(mine, pending))
                   and [(id(l.stats_sent), l.stats_sent._version) for l in pending] == self._sent_keys)
        if trusted:
            if self._work is not None:
                self._work.wait()
            flat = self._flat
        elif pending:  # resumed (or the buffers were replaced): the same reduce again, now, blocking
            if self._work is not None:
                self._work.wait()  # the stale one still has to complete on every rank
            flat = torch.cat([l.stats_sent.to(torch.float64 if l.stats_sent.dtype == torch.float64
                                              else torch.float32) for l in pending])
            if _distributed(self.group):
                dist.all_reduce(flat, group=self.group)
                self.blocking += 1
        else:
            flat = None
        self._work, self._flat, self._members, self._sent_keys = None, None, [], []
        offset = 0
        for l in pending:
            size = l.stats_sent.numel()
            l._receive(flat[offset:offset + size])
            offset += size


_DEFAULT = AsyncBNCoordinator()
_SCOPES: List[AsyncBNCoordinator] = []


def current_coordinator() -> AsyncBNCoordinator:
    return _SCOPES[-1] if _SCOPES else _DEFAULT


@contextlib.contextmanager
def async_bn_scope(group: Optional[dist.ProcessGroup] = None, auto_flush: bool = True
                   ) -> Iterator[AsyncBNCoordinator]:
    """Async-BN layers built inside the block share the yielded (fresh) coordinator."""
    coordinator = AsyncBNCoordinator(group, auto_flush)
    _SCOPES.append(coordinator)
    try:
        yield coordinator
    finally:
        _SCOPES.pop()


def attach(model: nn.Module, group: Optional[dist.ProcessGroup] = None, auto_flush: Optional[bool] = None
           ) -> Optional[AsyncBNCoordinator]:
    """Bind every async-BN layer of ``model`` to one fresh coordinator (in module order); None if it has none.
    ``auto_flush`` defaults to the layers' current coordinator's setting."""
    layers = [m for m in model.modules() if isinstance(m, AsyncBatchNorm1d)]
    if not layers:
        return None
    old = layers[0]._coordinator
    coordinator = AsyncBNCoordinator(group if group is not None else old.group,
                                     old.auto_flush if auto_flush is None else auto_flush)
    for layer in layers:
        layer._coordinator.unregister(layer)
        layer._coordinator = coordinator
        coordinator.register(layer)
    return coordinator


def coordinator_of(model: nn.Module) -> Optional[AsyncBNCoordinator]:
    found = {id(m._coordinator): m._coordinator for m in model.modules() if isinstance(m, AsyncBatchNorm1d)}
    if len(found) > 1:
        raise ValueError("the model's async-BN layers belong to several coordinators; call attach(model)")
    return next(iter(found.values()), None)


def flush_async_bn(model: nn.Module) -> None:
    """The once-per-step trigger for ``auto_flush=False``: launch the model's bucketed reduce."""
    coordinator = coordinator_of(model)
    if coordinator is not None:
        coordinator.flush()


class AsyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d for (N, C) inputs normalised with the previous step's global statistics (module docstring)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, rmax: float = 3.0,
                 dmax: float = 5.0, first_step: str = "sync",
                 coordinator: Optional[AsyncBNCoordinator] = None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)
        if first_step not in ("sync", "local"):
            raise ValueError(f"first_step {first_step!r} is not one of sync, local")
        if rmax < 1 or dmax < 0:
            raise ValueError(f"need rmax >= 1 and dmax >= 0, got {rmax}, {dmax}")
        self.rmax, self.dmax, self.first_step = rmax, dmax, first_step
        size = 2 * num_features + 1  # [sum x (C), sum x^2 (C), n]
        self.register_buffer("stats_global", torch.zeros(size))  # reduced sums in use; n == 0: none yet
        self.register_buffer("stats_acc", torch.zeros(size))  # local sums not yet sent
        self.register_buffer("stats_sent", torch.zeros(size))  # local sums of the reduce in flight
        self.register_buffer("pending", torch.zeros((), dtype=torch.long))  # 1: a reduce is in flight
        self._flags_key = None
        self._flags = (False, False, False)  # pending, has acc, has global
        object.__setattr__(self, "_coordinator", coordinator or current_coordinator())
        self._coordinator.register(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._flags_key = None
        self._coordinator.register(self)

    @property
    def coordinator(self) -> AsyncBNCoordinator:
        return self._coordinator

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, first_step={self.first_step}"

    # host-side mirrors of the flag buffers, so the step protocol never syncs a GPU; they are re-read from the
    # buffers only when something else (load_state_dict, copy_, .to()) touched them
    def _key(self):
        return tuple((id(b), b._version) for b in (self.pending, self.stats_acc, self.stats_global))

    def _read_flags(self):
        if self._flags_key != self._key():
            self._flags = (bool(self.pending.item()), bool(self.stats_acc[-1].item() > 0),
                           bool(self.stats_global[-1].item() > 0))
            self._flags_key = self._key()
        return self._flags

    def _remember_flags(self, pending=None, acc=None, global_=None):
        """After our own writes; the mirrors were refreshed (``_read_flags``) before those writes."""
        old = self._flags
        self._flags = tuple(o if n is None else n for o, n in zip(old, (pending, acc, global_)))
        self._flags_key = self._key()

    def _flag_pending(self) -> bool:
        return self._read_flags()[0]

    def _flag_acc(self) -> bool:
        return self._read_flags()[1]

    @torch.no_grad()
    def _receive(self, total: torch.Tensor) -> None:
        """Reduced [sum, sum sq, n] arrive: they become the statistics in use and feed the running ones."""
        old = self._flags  # refreshed by the caller (sync)
        self.stats_global.copy_(total)
        self.pending.zero_()
        self._update_running(total)
        self._flags = (False, old[1], True)
        self._flags_key = self._key()

    @torch.no_grad()
    def _update_running(self, total: torch.Tensor) -> None:
        mean, var, count = _moments(total, self.num_features)
        self.num_batches_tracked.add_(1)
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 whatever the autocast and the engine's parameter dtype; fp32 out (heads/norms.py)
        with fp32_island(x.device):
            return self._forward_fp32(as_fp32(x))

    def _forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            weight, bias = affine_params(self, x.dtype)
            return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)
        if x.ndim != 2:
            raise ValueError(f"AsyncBatchNorm1d expects (N, C) inputs, got {tuple(x.shape)}")
        coordinator = self._coordinator
        recompute = _in_backward()
        if not recompute:
            coordinator.before_forward(self)
        x32 = x
        channels, rows = x.shape[1], x.shape[0]
        have_global = self._read_flags()[2]
        with torch.no_grad():
            # local moments from sums (a dim-0 var_mean is ~20x slower on CPU), shifted by the previous global
            # mean when there is one so that E[x^2] - E[x]^2 does not cancel
            shift = _moments(self.stats_global.to(x32.dtype), channels)[0] if have_global else None
            xs = x32 - shift if have_global else x32
            s1, s2 = xs.sum(0), (xs * xs).sum(0)
            mu_shifted = s1 / rows
            var_local = (s2 / rows - mu_shifted * mu_shifted).clamp(min=0)
            mu_local = mu_shifted + shift if have_global else mu_shifted
            sum_x = mu_local * rows
            # the row count as a device fill: no host-to-device copy in the step
            local = torch.cat([sum_x, (var_local + mu_local * mu_local) * rows,
                               torch.full((1,), rows, dtype=x32.dtype, device=x32.device)])
        if not have_global and self.first_step == "sync" and not recompute:
            # step 0: one blocking forward-only reduce, so the statistics are global from the first step
            with torch.no_grad():
                total = local.clone()
                if _distributed(coordinator.group):
                    dist.all_reduce(total, group=coordinator.group)
                    coordinator.blocking += 1
                self.stats_global.copy_(total)
                self._update_running(total)
                self._remember_flags(global_=True)
            have_global = True
        elif not recompute:
            with torch.no_grad():
                self.stats_acc.add_(local.to(self.stats_acc.dtype))
            self._remember_flags(acc=True)
        weight, bias = affine_params(self, x32.dtype)
        if have_global:
            with torch.no_grad():
                mu_prev, var_prev, _ = _moments(self.stats_global.to(x32.dtype), channels)
                sigma_prev = torch.sqrt(var_prev + self.eps)
                sigma_local = torch.sqrt(var_local + self.eps)
                r = (sigma_local / sigma_prev).clamp(1.0 / self.rmax, self.rmax)
                d = ((mu_local - mu_prev) / sigma_prev).clamp(-self.dmax, self.dmax)
            # gamma * (xhat * r + d) + beta as one fused BN with local statistics: weight gamma*r, bias gamma*d+beta
            weight, bias = weight * r, torch.addcmul(bias, weight, d)
        # else: first_step="local" at step 0 (or its recomputation): plain BN with local statistics
        y = F.batch_norm(x32, None, None, weight, bias, True, 0.0, self.eps)
        if not recompute:
            coordinator.after_forward(self)
        return y


def _moments(total: torch.Tensor, channels: int):
    count = total[-1].clamp(min=1)
    mean = total[:channels] / count
    var = (total[channels:2 * channels] / count - mean * mean).clamp(min=0)
    return mean, var, count
