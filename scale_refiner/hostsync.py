"""Host synchronisations found without a GPU: the CPU twin of ``torch.cuda.set_sync_debug_mode``.

On a GPU a step that never waits for the device is one whose host code reads no device value. On the CPU
there is no device to wait for, so ``HostSyncWatch`` tells the two apart by bookkeeping: every tensor is
labelled *host* or *device* -- what it would be in a GPU run -- and each operation that on CUDA makes the
host wait for the device (or copies through pageable memory) is recorded when it touches a *device* tensor.

Labels (set on the tensor objects while the watch runs):
- a tensor made by a factory (``torch.arange``, ``torch.rand(generator=...)``, ``torch.tensor``, ...) without a
  ``device`` argument is *host* (so on a GPU it would be a CPU tensor); with one, *device*;
- an operation's outputs are *host* when every tensor it reads is *host*, else *device*;
- ``x.to(d)`` / ``x.to(device=d)`` with a ``torch.device`` makes *device* (the run's device is a
  ``torch.device``); ``x.cpu()``, and ``x.to("cpu")`` (a string) in this repository's code, make *host* (a
  third-party library may name the run's device by a string: DeepSpeed's CPU accelerator is ``"cpu"``);
- tensors made before the watch started are *device* (parameters, buffers), unless marked with ``mark_host``
  (a host batch); so the warm-up steps run under a watch that is not yet recording, and what they create
  (the optimiser's step counts, kept on the host by a non-fused optimiser) is labelled as it is made.

Recorded (each with the stack, attributed to the innermost frame of this repository or of a third-party
package; frames of torch itself and of the standard library are skipped, so a sync inside a torch function
counts against the line that called it, and one inside DeepSpeed against DeepSpeed):
- ``scalar read``: ``.item()``, ``int()``, ``float()``, ``bool()`` of a device tensor (``aten._local_scalar_dense``);
- ``to host``: ``.tolist()``, ``.numpy()``, ``.cpu()``, ``.to("cpu")``, ``copy_`` into a host tensor;
- ``data-dependent shape``: ``nonzero``, ``masked_select``, boolean-mask indexing and assignment, ``unique``,
  ``repeat_interleave`` without ``output_size``, ``bincount``, ``torch.equal``;
- ``blocking host-to-device copy``: ``copy_`` of a host tensor into a device one, ``host.to(device)`` (except
  through ``precision.to_device_async``, whose GPU branch copies from pinned memory, non-blocking),
  ``torch.tensor(..., device=...)``, a Python scalar written through a tensor index (``t[idx] = 3``: torch
  copies the scalar to the device first);
- ``host tensor in a device op``: a host tensor with elements fed to an operation on device tensors (an
  implicit copy on CUDA, or an error);
- ``cuda synchronize`` / ``object collective`` / ``barrier``: ``torch.cuda.synchronize``, stream and event
  ``synchronize``, ``dist.barrier`` and the ``*_object`` collectives.

What it cannot see, and ``set_sync_debug_mode`` would: syncs inside compiled C++/CUDA code that never
surfaces as an aten operation (a library's own ``cudaDeviceSynchronize``, an allocator's ``cudaFree``),
pinned-ness (a host tensor is assumed pageable unless it goes through ``to_device_async``),
``x.to(torch.device("cpu"))`` of a device tensor (indistinguishable from the run's CPU device; the same for a
``"cpu"`` string in a third-party library), and device
kernels that are themselves synchronous on CUDA without being listed above. It also sees only code that runs
on the CPU path: a branch taken only on CUDA (``if x.is_cuda``) is the GPU test's to check.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
_THIS = str(Path(__file__).resolve())
_TORCH = str(Path(torch.__file__).resolve().parent) + "/"
_STDLIB = str(Path(contextlib.__file__).resolve().parent) + "/"
_ATTR = "_hostsync_where"  # "host" | "device"; absent: device

_aten = torch.ops.aten
_SCALAR_READS = {_aten._local_scalar_dense.default}
_SHAPE_OPS = {_aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default,
              _aten.unique_dim.default, _aten.unique_consecutive.default, _aten.bincount.default,
              _aten.equal.default, _aten.repeat_interleave.Tensor, _aten.nonzero_numpy.default}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default,
              _aten._index_put_impl_.default}
_COPY_OPS = {_aten.copy_.default}
_FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.rand, torch.randn,
              torch.randint, torch.randperm, torch.linspace, torch.eye, torch.tensor, torch.as_tensor,
              torch.scalar_tensor, torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
              torch.rand_like, torch.randn_like, torch.randint_like, torch.from_numpy}
_FROM_DATA = {torch.tensor, torch.as_tensor}


def mark_host(tensors: Iterable[torch.Tensor]) -> None:
    """Label tensors made before the watch as host tensors (e.g. a batch a GPU run keeps in pinned memory)."""
    for t in tensors:
        setattr(t, _ATTR, "host")


def is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _ATTR, "device") == "host"


def _label(out, where: str) -> None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _ATTR, where)
            except (AttributeError, RuntimeError):  # a tensor type without a __dict__
                pass


@dataclass
class Sync:
    kind: str  # what synchronises ("scalar read", "to host", ...)
    what: str  # the operation
    owner: str  # "ours" (this repository), a package name ("deepspeed"), or "torch" (no other frame)
    where: str  # innermost attributed frames, "path:line code <- ..."

    def __str__(self) -> str:
        return f"[{self.owner}] {self.kind} ({self.what}) at {self.where}"


@dataclass
class Report:
    syncs: List[Sync] = field(default_factory=list)

    def counts(self, owner: Optional[str] = None) -> Counter:
        return Counter(str(s) for s in self.syncs if owner is None or s.owner == owner)

    @property
    def ours(self) -> List[Sync]:
        return [s for s in self.syncs if s.owner == "ours"]

    @property
    def theirs(self) -> List[Sync]:
        return [s for s in self.syncs if s.owner != "ours"]

    def format(self, owner: Optional[str] = None) -> str:
        return "\n".join(f"{n} x {line}" for line, n in sorted(self.counts(owner).items()))


@functools.lru_cache(maxsize=None)
def _resolved(filename: str) -> str:
    return filename if filename.startswith("<") else str(Path(filename).resolve())


def attribute(skip: int = 0) -> tuple:
    """(owner, where) of the caller's stack (less its ``skip`` innermost frames): the innermost frame that is
    neither torch, the standard library nor this module, then up to two more frames of the same owner. Owner
    "ours" for this repository, the package's name for a third-party one, "torch" when there is no other frame.
    Also what ``tests/test_gpu.py``'s recorder uses to list a library's own syncs apart."""
    frames = traceback.extract_stack()[:-(1 + skip)]
    chosen, owner = [], None
    for f in reversed(frames):
        name = _resolved(f.filename)
        stdlib = name.startswith(_STDLIB) and "site-packages" not in name
        if name == _THIS or name.startswith(_TORCH) or stdlib or name.startswith("<"):
            if not chosen:
                continue
            break
        if name.startswith(str(ROOT) + "/") and "site-packages" not in name:
            this_owner, shown = "ours", str(Path(name).relative_to(ROOT))
        else:
            parts = Path(name).parts
            pkg = parts[parts.index("site-packages") + 1] if "site-packages" in parts else Path(name).name
            this_owner, shown = pkg, name
        if owner is None:
            owner = this_owner
        elif this_owner != owner:
            break
        chosen.append(f"{shown}:{f.lineno} {f.line}")
        if len(chosen) == 3:
            break
    return (owner or "torch"), " <- ".join(chosen) or "(no frame outside torch)"


def _caller_is_ours() -> bool:
    """``attribute()[0] == "ours"``, without reading source lines (called on every "cpu" string)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith("<"):
            name = _resolved(name)
            stdlib = name.startswith(_STDLIB) and "site-packages" not in name
            if not (name == _THIS or name.startswith(_TORCH) or stdlib):
                return name.startswith(str(ROOT) + "/") and "site-packages" not in name
        frame = frame.f_back
    return False


class _State(threading.local):
    def __init__(self):
        self.factory_where: List[str] = []
        self.trusted_copy = 0


class _Dispatch(TorchDispatchMode):
    def __init__(self, watch: "HostSyncWatch"):
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device_in = [t for t in flat if not is_host(t)]
        watch = self.watch
        if func in _SCALAR_READS and device_in:
            watch.record("scalar read", "item / int / float / bool of a device tensor")
        elif func in _SHAPE_OPS and device_in:
            watch.record("data-dependent shape", func.__name__)
        elif func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            masks = [i for i in indices if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
            if masks and (device_in or not is_host(args[0])):
                what = "assignment" if "put" in func.__name__ else "indexing"
                watch.record("data-dependent shape", f"boolean-mask {what}")
            elif device_in and any(is_host(i) and i.numel() > 1 for i in indices if isinstance(i, torch.Tensor)):
                watch.record("host tensor in a device op", f"{func.__name__} with host indices")
        elif func in _COPY_OPS:
            dst, src = args[0], args[1]
            if is_host(dst) and not is_host(src):
                watch.record("to host", "copy_ into a host tensor")
            elif not is_host(dst) and is_host(src) and not kwargs.get("non_blocking", args[2] if len(args) > 2
                                                                      else False) and not watch.state.trusted_copy:
                watch.record("blocking host-to-device copy", "copy_ from a host tensor")
        elif device_in and func not in (_aten._to_copy.default, _aten.lift_fresh.default,
                                        _aten.lift_fresh_copy.default, _aten.detach.default, _aten.alias.default):
            hosts = [t for t in flat if is_host(t) and t.dim() > 0 and t.numel() > 0]
            if hosts:
                watch.record("host tensor in a device op", func.__name__)
        out = func(*args, **kwargs)
        if flat:
            where = "device" if device_in else "host"
        else:  # a factory: what the Python call asked for (no device argument: the host)
            where = watch.state.factory_where[-1] if watch.state.factory_where else "device"
        _label(out, where)
        return out


def _device_arg(args, kwargs):
    """The target of ``Tensor.to``: "host" for a "cpu" string, "device" for a torch.device, None for no move."""
    target = kwargs.get("device")
    if target is None:
        for a in args:
            if isinstance(a, (str, torch.device)):
                target = a
                break
            if isinstance(a, torch.Tensor):  # to(other): other's side
                return "host" if is_host(a) else "device"
    if target is None:
        return None
    if isinstance(target, str):
        # "cpu" in our code is the host (we name the run's device by a torch.device); a third-party library
        # may name the run's device by a string (DeepSpeed's CPU accelerator calls itself "cpu"): the device
        return "host" if target.split(":")[0] == "cpu" and _caller_is_ours() else "device"
    return "device"


class _Function(TorchFunctionMode):
    def __init__(self, watch: "HostSyncWatch"):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        watch, state = self.watch, self.watch.state
        name = getattr(func, "__name__", "")
        self_ = args[0] if args and isinstance(args[0], torch.Tensor) else None
        on_device = self_ is not None and not is_host(self_)
        # Python-level reads the dispatcher does not show
        if name in ("tolist", "numpy", "__array__") and on_device:
            watch.record("to host", f"Tensor.{name}")
        elif name == "cpu" and on_device:
            watch.record("to host", "Tensor.cpu")
        elif name == "__setitem__" and on_device and len(args) == 3:
            key, value = args[1], args[2]
            keys = key if isinstance(key, tuple) else (key,)
            if isinstance(value, (int, float, bool)) and any(isinstance(k, torch.Tensor) for k in keys):
                watch.record("blocking host-to-device copy", "a Python scalar written through a tensor index")
        elif func in _FROM_DATA and kwargs.get("device") is not None and _device_arg((), kwargs) == "device":
            watch.record("blocking host-to-device copy", f"torch.{name}(data, device=...)")
        target = None
        if name == "to":
            target = _device_arg(args[1:], kwargs)
            if target == "host" and on_device:
                watch.record("to host", "Tensor.to('cpu')")
            elif target == "device" and self_ is not None and is_host(self_) and not state.trusted_copy \
                    and not kwargs.get("non_blocking", False):
                watch.record("blocking host-to-device copy", "Tensor.to(device) from a host tensor")
        factory = func in _FACTORIES and not (func.__name__.endswith("_like") and "device" not in kwargs)
        if factory:
            state_where = ("device" if func is not torch.from_numpy and kwargs.get("device") is not None
                           and _device_arg((), kwargs) == "device" else "host")
            state.factory_where.append(state_where)
        try:
            out = func(*args, **kwargs)
        finally:
            if factory:
                state.factory_where.pop()
        if factory:  # what the call asked for, whatever the inputs (full_like(host, v, device=d) is on d)
            _label(out, state_where)
        if name == "cpu" or (name == "to" and target == "host"):
            _label(out, "host")
        elif name == "to" and target == "device" and self_ is not None:
            if out is self_ and is_host(self_):  # a no-op move on the CPU: an alias, so the host one stays host
                with torch._C.DisableTorchFunction():
                    out = self_.view_as(self_)
            _label(out, "device")
        return out


class HostSyncWatch:
    """``with HostSyncWatch() as watch: ...`` then ``watch.report`` (a ``Report``). Not re-entrant.

    ``recording=False`` labels tensors without recording (until ``watch.recording = True``): run the warm-up
    steps so, and the state they create (optimiser step counts, queue contents) carries the label a GPU run
    would give it instead of the default ``device``."""

    def __init__(self, recording: bool = True):
        self.recording = recording
        self.report = Report()
        self.state = _State()
        self._patched = []

    def record(self, kind: str, what: str) -> None:
        if not self.recording:
            return
        owner, where = attribute()
        self.report.syncs.append(Sync(kind, what, owner, where))

    @contextlib.contextmanager
    def trusted_copies(self):
        self.state.trusted_copy += 1
        try:
            yield
        finally:
            self.state.trusted_copy -= 1

    def _patch(self, obj, attr, kind, what, call_through=True):
        original = getattr(obj, attr, None)
        if original is None:
            return
        watch = self

        def wrapper(*args, **kwargs):
            watch.record(kind, what)
            return original(*args, **kwargs) if call_through else None
        setattr(obj, attr, wrapper)
        self._patched.append((obj, attr, original))

    def _patch_trusted(self, module, attr):
        original = getattr(module, attr)
        watch = self

        def wrapper(*args, **kwargs):
            with watch.trusted_copies():
                return original(*args, **kwargs)
        setattr(module, attr, wrapper)
        self._patched.append((module, attr, original))

    def __enter__(self):
        import torch.distributed as dist
        import scale_refiner.precision as precision
        cuda = torch.cuda.is_available()
        self._patch(torch.cuda, "synchronize", "cuda synchronize", "torch.cuda.synchronize", call_through=cuda)
        self._patch(torch.cuda.Stream, "synchronize", "cuda synchronize", "Stream.synchronize", call_through=cuda)
        self._patch(torch.cuda.Event, "synchronize", "cuda synchronize", "Event.synchronize", call_through=cuda)
        self._patch(dist, "barrier", "barrier", "dist.barrier")
        for name in ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                     "all_reduce_object"):
            self._patch(dist, name, "object collective", f"dist.{name}")
        # to_device_async: its GPU branch copies from pinned memory, non-blocking (the GPU test checks it)
        self._patch_trusted(precision, "to_device_async")
        for mod in list(sys.modules.values()):  # the modules that imported it by name
            if mod is not None and getattr(mod, "to_device_async", None) is self._patched[-1][2]:
                self._patch_trusted(mod, "to_device_async")
        self._function, self._dispatch = _Function(self), _Dispatch(self)
        self._function.__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self._dispatch.__exit__(*exc)
        self._function.__exit__(*exc)
        for obj, attr, original in reversed(self._patched):
            setattr(obj, attr, original)
        self._patched = []
        return False
