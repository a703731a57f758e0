"""fp32 islands inside a bf16 step.

Under ``engine.precision=bf16`` the step runs in autocast (CUDA on a GPU, CPU autocast on the CPU), and the
engines may hand modules bf16 copies of their weights (DeepSpeed's bf16 mode, FSDP2's ``param_dtype``). Most
of the model is fine with that; a few places are not, and run in fp32 whatever the autocast and the engine:

- the NNA / NNCLR logits, softmax and cross-entropy (``objective/nna.py``): temperature-scaled cosine logits
  over thousands of negatives, where bf16's 8-bit mantissa moves a logit of 5 by up to 0.02;
- the nearest-neighbour search (``memory/queue.py``, ``memory/sharded_queue.py``): a top-k over cosine
  similarities that differ in the third decimal picks other neighbours in bf16;
- the heads' BatchNorm (all three variants, ``heads/``): statistics of sums and squares over a batch, and
  running statistics kept in fp32 buffers.

``fp32_island(x)`` is the one way to enter such a region: autocast off for the tensor's device type.
"""
from __future__ import annotations

import torch


def fp32_island(device: torch.device | str):
    """Autocast disabled on ``device``'s type: operations run in their inputs' dtype (cast them to fp32)."""
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return torch.autocast(device_type, enabled=False)


def as_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or fp64 left as it is (the reference tests run whole models in fp64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def to_device_async(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait: onto a CUDA device through pinned memory (a
    ``non_blocking`` copy from pageable memory is synchronous, and pinning through the caching host allocator
    keeps the block alive until the copy has run); elsewhere the tensor as it is, moved."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        # a non-contiguous source (a micro-batch's slice of the view-major crops) would be made contiguous in
        # pageable memory by the copy itself, which makes it synchronous: pin a contiguous copy instead
        if not (x.is_pinned() and x.is_contiguous()):
            x = x.contiguous().pin_memory()
        return x.to(device, non_blocking=True)
    return x.to(device)


def nonfinite_tensors(state) -> str:
    """The floating-point tensors of ``state`` (a mapping of names to tensors) that hold a NaN or an infinity,
    named for an error message: the first five and how many more; "" when every one is finite."""
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    return ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
