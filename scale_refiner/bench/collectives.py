"""Count the collectives a piece of code makes, and the bytes each rank puts into them.

    with CollectiveCounter() as counts:
        refiner(global_crops, local_crops, index, group=group)
    counts.calls   # {"all_gather": 1, "all_to_all_single": 3, ...}
    counts.total, counts.bytes_sent

It wraps the ``torch.distributed`` functions for the duration (the code under test calls them through the
module, ``dist.all_gather(...)``, so the wrappers see every call); a collective made inside another (e.g.
``all_gather_object``'s own all-gathers) counts once, as the outer call. Bytes are what this rank contributes
(the input tensors), not what the transport moves. Not thread-safe: for measurements, not for training.

It sees what calls ``torch.distributed``'s functions by name at call time: this project's queues, objective and
trainer. It does not see libraries that captured a function earlier or use other entry points: DeepSpeed's
communication layer (it keeps its own reference to the all-gather) and FSDP2's collectives (issued through
``torch.distributed``'s internal and functional APIs); ``tests/test_hybrid.py`` counts those with its own hooks.
"""
from __future__ import annotations

import functools
from collections import Counter

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "reduce_scatter", "reduce_scatter_tensor", "broadcast", "broadcast_object_list",
               "reduce", "gather", "scatter", "barrier")

# the argument holding what this rank sends, per collective (name: position)
_INPUT_ARG = {"all_gather": 1, "all_gather_into_tensor": 1, "all_to_all": 1, "all_to_all_single": 1,
              "reduce_scatter": 1, "reduce_scatter_tensor": 1}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CollectiveCounter:
    def __init__(self):
        self.calls: Counter = Counter()
        self.bytes_sent = 0
        self._saved = {}
        self._depth = 0

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.calls[name] += 1
                position = _INPUT_ARG.get(name, 0)
                value = args[position] if len(args) > position else next(
                    (kwargs[key] for key in ("tensor", "input", "input_tensor") if key in kwargs), None)
                self.bytes_sent += _nbytes(value)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def __enter__(self):
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        return False
