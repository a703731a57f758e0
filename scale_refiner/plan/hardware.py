"""GPU specs the planner predicts for. Every number is a stated assumption, overridable on the command line.

- ``memory_gb``: what ``torch.cuda.get_device_properties().total_memory`` reports (GB = 1e9 bytes): an
  "80 GB" card is 80 GiB = 85.9 GB of HBM, of which the driver reports about 85.0 GB.
- ``peak_tflops``: dense bf16 tensor-core peak (the benchmark's table, bench/timers.py: A100 312, H100 / H200
  989; SXM parts).
- ``nvlink_gbps``: the bus bandwidth NCCL reaches for all-gather / reduce-scatter inside a node (GB/s per GPU),
  about 80 % of the per-direction NVLink rate: NVLink4 450 GB/s -> 360, NVLink3 300 GB/s -> 240.
- ``internode_gbps``: the same across nodes, one NIC per GPU: 400 Gb/s NDR InfiniBand = 50 GB/s -> 40;
  200 Gb/s HDR = 25 GB/s -> 20. A ring collective that spans nodes runs at this rate.
- ``hbm_gbps``: memory bandwidth, for the memory-bound optimiser step and EMA (H100 3350, H200 4800, A100 2039).
- ``pcie_gbps``: host-to-device copies of the batch, 80 % of PCIe Gen5 x16 (64 GB/s) or Gen4 (32 GB/s).
- ``arch``: the tensor-core generation; a compute efficiency measured on one card stands in for another of the
  same architecture and peak (``efficiency.py``). A custom card has none.
- ``DEVICE_NAMES``: what ``torch.cuda.get_device_name`` reports for each card, for reading benchmark rows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    peak_tflops: float
    nvlink_gbps: float
    internode_gbps: float
    hbm_gbps: float
    pcie_gbps: float
    gpus_per_node: int = 8
    arch: str = ""

    def as_dict(self) -> Dict:
        return asdict(self)


GPUS: Dict[str, GPU] = {
    "h100-80gb": GPU("h100-80gb", memory_gb=85.0, peak_tflops=989.0, nvlink_gbps=360.0, internode_gbps=40.0,
                     hbm_gbps=3350.0, pcie_gbps=51.0, arch="hopper"),
    "h200": GPU("h200", memory_gb=150.0, peak_tflops=989.0, nvlink_gbps=360.0, internode_gbps=40.0,
                hbm_gbps=4800.0, pcie_gbps=51.0, arch="hopper"),
    "a100-80gb": GPU("a100-80gb", memory_gb=85.0, peak_tflops=312.0, nvlink_gbps=240.0, internode_gbps=20.0,
                     hbm_gbps=2039.0, pcie_gbps=25.0, arch="ampere"),
}

# torch.cuda.get_device_name of each card, SXM parts only: a PCIe or NVL part has another peak and is refused
DEVICE_NAMES: Dict[str, str] = {
    "NVIDIA H100 80GB HBM3": "h100-80gb",
    "NVIDIA H200": "h200",
    "NVIDIA A100-SXM4-80GB": "a100-80gb",
}


def card_of_device(device_name: str) -> str:
    """The planner's card for a device name torch reports; ValueError naming it when the planner has none."""
    card = DEVICE_NAMES.get(device_name.strip())
    if card is None:
        raise ValueError(f"device {device_name!r} is not a card the planner knows (known: "
                         f"{', '.join(f'{d!r}' for d in DEVICE_NAMES)}); add it to plan/hardware.py")
    return card


def resolve_gpu(name: str, **overrides) -> GPU:
    """A registered GPU with any given (non-None) field replaced; ``custom`` needs memory and peak given and
    takes H100-like interconnects for what is not."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if name == "custom":
        missing = [k for k in ("memory_gb", "peak_tflops") if k not in given]
        if missing:
            raise ValueError(f"--gpu custom needs {', '.join('--' + m.replace('_', '-').replace('memory-gb', 'gpu-memory-gb') for m in missing)}")
        return replace(GPUS["h100-80gb"], name="custom", arch="", **given)
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}, custom")
    return replace(GPUS[name], **given)
