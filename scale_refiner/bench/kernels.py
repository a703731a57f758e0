"""What the device itself reaches on a recipe's shapes: the ceiling a training step's MFU is read against.

For each recipe, the four matrix products of a transformer block (qkv, attention projection, MLP in, MLP out) at
the rows a micro-batch of global crops gives (samples x tokens), and scaled-dot-product attention (forward, and
forward + backward) at the global and the local crop's token counts, in the compute dtype. Each is run
``repeats`` times between two synchronisations (one timing per kernel, no timer inside the loop), best of
``rounds``. FLOPs: 2.m.n.k a product; attention 4.B.h.S^2.d_head forward and 3x that forward + backward (the
backward's four products against the forward's two: the model-FLOPs convention of the step's MFU, so a flash
kernel's recomputed scores count as time, not FLOPs).

A step whose MFU is far below these is losing time outside the products (pointwise work, recomputation,
communication, launches); a product far below the card's peak is a shape the library handles badly.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from scale_refiner.bench.timers import sync


@dataclass
class KernelResult:
    recipe: str
    kernel: str
    shape: str
    dtype: str
    flops: float
    seconds: float          # one call, best round
    tflops: float
    peak_fraction: Optional[float]

    def as_dict(self) -> Dict:
        return asdict(self)


def _best_time(fn: Callable[[], object], device: torch.device, repeats: int, rounds: int) -> float:
    fn()  # first call: library heuristics, workspace allocation, lazy init
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def block_shapes(dims: Dict, tokens: int, samples: int) -> List[tuple]:
    """(name, m, k, n) of the four products of one block for ``samples`` crops of ``tokens`` tokens."""
    d, hidden = dims["embed_dim"], int(dims["embed_dim"] * dims["mlp_ratio"])
    m = samples * tokens
    return [("qkv", m, d, 3 * d), ("attn.proj", m, d, d), ("mlp.fc1", m, d, hidden), ("mlp.fc2", m, hidden, d)]


def crop_tokens(size: int, patch: int) -> int:
    return (size // patch) ** 2 + 1  # patches + CLS


def measure_recipe(recipe: str, dims: Dict, global_size: int, local_size: int, samples: int,
                   device: torch.device, dtype: torch.dtype, peak_tflops: Optional[float], repeats: int = 20,
                   rounds: int = 3) -> List[KernelResult]:
    """The block's products at ``samples`` global crops and attention at both crop sizes."""
    out: List[KernelResult] = []
    label = str(dtype).replace("torch.", "")

    def record(kernel: str, shape: str, flops: float, fn) -> None:
        seconds = _best_time(fn, device, repeats, rounds)
        tflops = flops / seconds / 1e12
        out.append(KernelResult(recipe, kernel, shape, label, flops, seconds, tflops,
                                tflops / peak_tflops if peak_tflops else None))

    tokens = crop_tokens(global_size, dims["patch_size"])
    for name, m, k, n in block_shapes(dims, tokens, samples):
        a = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)  # nn.Linear's layout: x @ w.T
        record(f"matmul {name}", f"{m}x{k} @ {k}x{n}", 2.0 * m * k * n, lambda a=a, w=w: F.linear(a, w))
        del a, w
    heads = dims["num_heads"]
    head_dim = dims["embed_dim"] // heads
    for crop, size in (("global", global_size), ("local", local_size)):
        s = crop_tokens(size, dims["patch_size"])
        q, k, v = (torch.randn(samples, heads, s, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        forward = 4.0 * samples * heads * s * s * head_dim
        shape = f"{samples}x{heads}x{s}x{head_dim}"
        with torch.no_grad():
            record(f"attention fwd ({crop})", shape, forward,
                   lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        grad = torch.randn(samples, heads, s, head_dim, device=device, dtype=dtype)

        def fwd_bwd(q=q, k=k, v=v, grad=grad):
            F.scaled_dot_product_attention(q, k, v).backward(grad)
        record(f"attention fwd+bwd ({crop})", shape, 3.0 * forward, fwd_bwd)
        del q, k, v, grad
    return out


def markdown(results: List[KernelResult]) -> str:
    lines = ["| recipe | kernel | shape | dtype | ms | TFLOP/s | of peak |", "|---|---|---|---|---:|---:|---:|"]
    for r in results:
        share = f"{100 * r.peak_fraction:.1f} %" if r.peak_fraction is not None else "n/a"
        lines.append(f"| {r.recipe} | {r.kernel} | {r.shape} | {r.dtype} | {1000 * r.seconds:.3f} "
                     f"| {r.tflops:.3g} | {share} |")
    return "\n".join(lines)
