"""Timers, device peaks and memory for the benchmark (never used by the trainer).

On a GPU every timed region is bracketed by ``torch.cuda.synchronize()``, so a region's time is the device
work it launched; on the CPU it is wall time. The synchronisations cost a little overlap: the benchmark's
images/s is measured over the whole step and is the figure to quote, the breakdown tells where it goes.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections import defaultdict
from typing import Dict, Optional

import torch

# Dense bf16 peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def device_peak_tflops(device: torch.device, measure_cpu: bool = True) -> tuple[Optional[float], str]:
    """(peak TFLOP/s, where it came from). GPUs: the table above by name (None if unknown). CPU: a measured
    fp32 matmul rate on this process's threads (``measure_cpu``), else None."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_TFLOPS.items():
            if key in name:
                return peak, f"table: {key} dense bf16"
        return None, f"unknown device {name!r}: no peak in the table"
    if not measure_cpu:
        return None, "cpu: n/a"
    return measure_matmul_tflops(device), "cpu: measured fp32 matmul (1024^2, best of 5, this process's threads)"


def measure_matmul_tflops(device: torch.device, n: int = 1024, repeats: int = 5,
                          dtype: torch.dtype = torch.float32) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Accumulates seconds per named region: ``with timer("forward"): ...``. Nested regions are allowed
    (an inner region's time is also inside the outer one's)."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self.total: Dict[str, float] = defaultdict(float)
        self.count: Dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.total[name] += time.perf_counter() - start
            self.count[name] += 1

    def add(self, name: str, seconds: float) -> None:
        self.total[name] += seconds
        self.count[name] += 1

    def reset(self) -> None:
        self.total.clear()
        self.count.clear()

    def per_step_ms(self, steps: int) -> Dict[str, float]:
        return {k: 1000 * v / max(steps, 1) for k, v in self.total.items()}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def allocated_memory_gb(device: torch.device):
    """GiB allocated now (``torch.cuda.memory_allocated``) on a GPU; None on the CPU, which has no such counter."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 30
    return None


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what): ``torch.cuda.max_memory_allocated`` since the last reset on a GPU; on the CPU the
    process's peak resident set size over its lifetime (ru_maxrss: it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "cuda max_memory_allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        rss_kb /= 1024
    return rss_kb / 2 ** 20, "peak RSS (process lifetime)"


def current_rss_gb() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2 ** 30
    except ImportError:
        with open("/proc/self/statm") as handle:
            import os
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def available_memory_gb() -> float:
    try:
        import psutil
        return psutil.virtual_memory().available / 2 ** 30
    except ImportError:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2 ** 20
    return 4.0
