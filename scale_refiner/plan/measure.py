"""Measured peak memory of real training steps on the CPU: the planner's check against reality.

``LiveStorage`` is the CPU twin of ``torch.cuda.max_memory_allocated``: a ``TorchDispatchMode`` that sees every
tensor an operator returns, counts the bytes of each storage that is new (not one of the operator's inputs: a
view or an in-place result is no allocation) and follows the storage to its end with ``weakref.finalize``, so
``live`` is the bytes of tensor storage alive now and ``peak`` the most alive at once since ``reset_peak``. It
counts what operators allocate and return; scratch space a kernel allocates and frees inside itself is not seen
(the CUDA counter would see it), and a storage resized in place afterwards keeps the size it was created with
(FSDP2 frees its gathered parameters that way, so FSDP2 is not measured with it).
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage_key(value) -> Optional[int]:
    try:
        storage = value.untyped_storage() if isinstance(value, torch.Tensor) else value
        return storage.data_ptr() if storage.nbytes() else None
    except (RuntimeError, NotImplementedError):  # meta tensors, tensor subclasses without storage
        return None


class LiveStorage(TorchDispatchMode):
    """Bytes of tensor storage alive (``live``) and the most alive at once (``peak``) while the mode is on."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: Dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_storage_key(v) for v in tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)}
        for value in tree_leaves(out):
            if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
                continue
            key = _storage_key(value)
            if key is None or key in inputs or key in self._sizes:
                continue
            storage = value.untyped_storage()
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)
        return out
