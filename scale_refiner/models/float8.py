"""``model.float8``: FP8 matmuls for the trained blocks' linears (torchao's float8 training).

What is converted: the ``nn.Linear`` layers of the blocks from ``model.freeze_blocks`` on (attention ``qkv`` and
``proj``, MLP ``fc1`` and ``fc2``) become torchao ``Float8Linear``s: dynamic tensorwise scaling, the input and the
weight cast to float8 e4m3 for the forward matmul, the output gradient to e5m2 for the two backward matmuls,
which run as scaled FP8 matmuls with higher-precision accumulation and output. The weights themselves stay as
they are (fp32 masters, bf16 compute copies under the engines' mixed precision): ``Float8Linear`` keeps the very
``weight`` and ``bias`` parameters of the layer it replaces, so parameter names, state dicts, checkpoints and
exports are those of the plain model. Nothing else is converted: not the frozen prefix (patch embedding and the
first ``model.freeze_blocks`` blocks, which keep running in bf16 / fp32 under ``no_grad`` as before), not the ID
heads (whose BatchNorms and projections are outside the encoder), not the MAE decoder.

Requirements, checked by ``config.validate`` before any work (``float8_problem``):
- a GPU with FP8 tensor cores: CUDA compute capability 8.9 (Ada) or higher (Hopper is 9.0); the CPU and older
  GPUs are refused naming ``model.float8`` and the device found;
- ``model.compile=true``: torchao's float8 casts (an absolute-max reduction, a scale and a saturating cast per
  operand, for the input, the weight and the output gradient of every linear) are separate kernels in eager
  mode, whose memory traffic is expected to cost more than the FP8 matmuls save (not measured here); compiled,
  they fuse with the neighbouring ops. Refused naming both keys rather than switched on silently: compiling has
  its own needs (a C++ compiler) and start-up cost;
- ``engine.kind`` single or fsdp2. FSDP2 shards a ``Float8Linear`` as any linear (its parameters are plain
  parameters; tests/test_float8.py runs it on 2 ranks) and gathers them in bf16. DeepSpeed ZeRO-3 is refused
  naming ``model.float8`` and ``engine.kind``: ZeRO-3 releases a layer's gathered weight after its forward and
  gathers it again for the backward, which is why it runs its linears through its own autograd function that
  saves the weight parameter, not a view of it; ``Float8Linear``'s matmul saves ``weight.t()``, a view of the
  gathered full weight, so every trained linear's full weight would stay alive from its forward to its backward
  (ZeRO-3's parameter partitioning lost for the trained blocks; tests/test_float8.py measures it on 2 ranks:
  float8 runs, and after the forward its saved tensors hold every trained weight in full, the plain path's
  none). ZeRO-2 (the same ``engine.kind``) would not have
  that problem but is not tested with float8, so the whole engine is refused.

Emulation (``float8_emulation``, for the tests only): torchao's ``Float8LinearConfig(emulate=True)`` quantises and
dequantises exactly as on the GPU (the same scales, the same e4m3 / e5m2 rounding) and runs the matmul in fp32
instead of the FP8 tensor-core kernel, so the CPU tests check the real FP8 numerics against the plain path.
Under it the device check passes (emulation runs anywhere); no configuration key reaches it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

MIN_CAPABILITY: Tuple[int, int] = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later
ENGINES = ("single", "fsdp2")  # where model.float8 runs; deepspeed (ZeRO-3) is refused, see the module docstring
LINEAR_NAMES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # the linears of one block

_emulate = False  # float8_emulation(): the tests' switch, never a configuration key


@contextlib.contextmanager
def float8_emulation() -> Iterator[None]:
    """Within it: conversions use torchao's emulated FP8 matmuls (fp32 matmul of the float8-rounded operands) and
    the device check passes. For the CPU tests only."""
    global _emulate
    before, _emulate = _emulate, True
    try:
        yield
    finally:
        _emulate = before


def emulating() -> bool:
    return _emulate


def float8_device_problem(device: Optional[torch.device] = None) -> Optional[str]:
    """Why ``device`` (default: the GPU this process will take, ``cuda:LOCAL_RANK``, else the CPU) cannot run
    FP8 matmuls, or None. Reads the capability only (no CUDA context is created on the device)."""
    if _emulate:
        return None
    if device is None:
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % max(torch.cuda.device_count(), 1))
                  if torch.cuda.is_available() else torch.device("cpu"))
    device = torch.device(device)
    if device.type != "cuda":
        return f"the device found is the {device.type.upper()} ({device}), which has no FP8 matmuls"
    index = device.index if device.index is not None else 0
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        return (f"the device found is {name} (cuda:{index}, compute capability {major}.{minor}); FP8 matmuls need "
                f"compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or higher (Ada, Hopper and later)")
    return None


def torchao_problem() -> Optional[str]:
    """Why torchao's float8 training cannot be imported here, or None."""
    try:
        import torchao.float8  # noqa: F401
    except Exception as err:  # ImportError, or torchao refusing this torch
        return f"needs torchao (pinned in requirements.txt) and importing torchao.float8 failed: {err}"
    return None


def float8_problem(model_cfg, engine_kind: str, device: Optional[torch.device] = None) -> Optional[Tuple[str, str]]:
    """What ``config.validate`` refuses for ``model.float8=true``: (key, message), or None. The cheap checks
    first; the device last."""
    if not getattr(model_cfg, "float8", False):
        return None
    if engine_kind not in ENGINES:
        return ("model.float8", f"is not available with engine.kind={engine_kind}: DeepSpeed ZeRO-3 frees each "
                                f"layer's gathered weight after its forward, but torchao's Float8Linear saves a view "
                                f"of it for the backward, which would keep every trained linear's full weight alive "
                                f"(ZeRO-2 is refused too: untested with it); use engine.kind=fsdp2 (or single), or "
                                f"set model.float8=false")
    if not model_cfg.compile:
        return ("model.float8", "needs model.compile=true: torchao's float8 casts are separate kernels in eager mode "
                                "and fuse with their neighbours only when compiled; set model.compile=true or "
                                "model.float8=false")
    problem = torchao_problem()
    if problem:
        return ("model.float8", problem)
    problem = float8_device_problem(device)
    if problem:
        return ("model.float8", f"FP8 matmuls need a GPU with FP8 tensor cores, and {problem}; "
                                f"set model.float8=false")
    return None


def trained_linear_filter(first_trained: int) -> Callable[[nn.Module, str], bool]:
    """torchao's ``module_filter_fn`` for an encoder: the linears of ``blocks.N`` with N >= ``first_trained``.
    Names are relative to the encoder (``blocks.3.attn.qkv``)."""
    def keep(module: nn.Module, fqn: str) -> bool:
        parts = fqn.split(".")
        if not isinstance(module, nn.Linear) or len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
            return False
        return int(parts[1]) >= first_trained and ".".join(parts[2:]) in LINEAR_NAMES
    return keep


def float8_linear_config(emulate: bool = False):
    """torchao's default recipe (tensorwise dynamic scaling), ``emulate`` for the tests, and ``pad_inner_dim``.

    The GPU's FP8 matmul (``torch._scaled_mm``) needs its inner dimension, and both of the second operand's, to be
    multiples of 16. The widths are (every registered ViT's width and MLP width), but the weight gradient's matmul
    runs over the tokens: its inner dimension is (crops of a resolution) x (micro-batch) x (1 + patches), and
    1 + patches is odd (197 at 224 px and patch 16, 37 at 96 px), so any micro-batch whose crops x samples is not a
    multiple of 16 (e.g. 2 global crops of 4 samples) would fail in the first backward. ``pad_inner_dim`` pads
    the FP8 operands with zeros up to the next multiple of 16 (a copy of 1-byte operands, fused into the cast when
    compiled; zeros add nothing to the sums). The emulated matmul ignores it."""
    from torchao.float8 import Float8LinearConfig
    return Float8LinearConfig(emulate=emulate, pad_inner_dim=True)


def convert_trained_linears(encoder: nn.Module, first_trained: int, emulate: Optional[bool] = None) -> List[str]:
    """Swap, in place, the ``nn.Linear``s of the encoder's blocks ``first_trained`` .. depth - 1 for torchao
    ``Float8Linear``s (the same parameters, see the module docstring). Returns the converted names, relative to
    the encoder. ``emulate``: None = as ``float8_emulation`` says (off outside the tests).

    Device-independent (a module swap): works on a meta-built, a ``deepspeed.zero.Init``-built or a plain
    encoder, before sharding and before ``torch.compile`` (which must trace the ``Float8Linear``s). The device
    and engine checks are ``float8_problem``'s, in ``config.validate``."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear
    keep = trained_linear_filter(first_trained)
    names = [n for n, m in encoder.named_modules() if keep(m, n) and not isinstance(m, Float8Linear)]
    if names:
        convert_to_float8_training(encoder, module_filter_fn=lambda m, n: n in names and keep(m, n),
                                   config=float8_linear_config(_emulate if emulate is None else emulate))
    return names


def float8_linear_names(module: nn.Module) -> List[str]:
    """The names of the module's torchao ``Float8Linear`` layers (for the tests and the logs)."""
    try:
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:
        return []
    return [n for n, m in module.named_modules() if isinstance(m, Float8Linear)]
