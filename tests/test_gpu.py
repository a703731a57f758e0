"""GPU checks (``pytest tests/test_gpu.py -m gpu``, what launch/gpu_check.sh runs; they skip without CUDA): a bf16
refiner step is finite, timm's attention takes the fused SDPA path, and a steady-state training step makes no
host synchronisation, on the single engine (replicated queue; bn and async heads) and on FSDP2 over a 1-rank
NCCL group (sharded queue; SyncBN and async heads). One CPU twin runs the steady-state loop itself (FSDP2 on a
1-rank gloo group), so the GPU test's code is exercised wherever the suite runs; tests/test_hostsync.py is the
CPU twin of the sync check itself (single, FSDP2 and ZeRO-3 on 2 gloo ranks).

Collecting this file needs only torch, pytest, omegaconf and timm (scale_refiner.config, scale_refiner.models.vit);
the tests' own imports add the engine (tqdm, numpy), never deepspeed, faiss, webdataset or DALI, which a lent GPU
machine may lack.
"""
import contextlib
import warnings
from pathlib import Path

import pytest
import torch

from scale_refiner.config import load_config
from scale_refiner.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
with warnings.catch_warnings():  # registered in conftest; silenced for a run with another conftest
    warnings.simplefilter("ignore")
    gpu = pytest.mark.gpu


def _tiny_cfg(*extra):
    return load_config(ROOT / "configs/demo.yaml", ["model.name=vit_test_patch4", "heads.blocks=[1,2]",
                                                    "queue.size=256", "engine.kind=single",
                                                    "engine.precision=bf16", *extra])


@gpu
@cuda
def test_gpu_bf16_refiner_step_is_finite():
    from scale_refiner.bench.runner import synthetic_batch, build, run_steps
    from scale_refiner.bench.timers import StageTimer
    from scale_refiner.engine.distributed import DistContext
    cfg = _tiny_cfg()
    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cuda", 0))
    engine = build(cfg, ctx, "refine")
    assert engine.dtype == torch.bfloat16
    batch = synthetic_batch(cfg, 16, ctx.device)
    run_steps(engine, cfg, ctx, batch, 2, "refine", StageTimer(ctx.device, enabled=False))
    g = batch["global"].cuda()
    l = batch["local"].cuda()
    loss, _ = engine.forward(g, l, batch["index"].cuda(), batch["label"].cuda(), topk=20, step=3)
    assert torch.isfinite(loss)
    engine.backward(loss)
    norm = engine.step(None)
    assert norm == norm and norm < float("inf")
    for p in engine.model.parameters():
        assert torch.isfinite(p).all()


@gpu
@cuda
def test_gpu_sdpa_path_used():
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=256, depth=2, num_heads=4).cuda()
    for block in model.blocks:
        assert block.attn.fused_attn, "timm Attention is not on its F.scaled_dot_product_attention path"
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    F.scaled_dot_product_attention = counting
    try:
        x = torch.randn(8, 3, 224, 224, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16), profile(activities=[ProfilerActivity.CUDA]) as prof:
            model([x])[0]["final"].float().sum().backward()
            torch.cuda.synchronize()
    finally:
        F.scaled_dot_product_attention = original
    assert len(calls) == 2
    names = " ".join(e.key.lower() for e in prof.key_averages())
    assert any(k in names for k in ("flash", "efficient", "cudnn", "fmha")), names[:2000]


# ---------------------------------------------------------------------------- steady-state step, no host sync
FSDP2_SHARDED = ("engine.kind=fsdp2", "queue.sharded=true", "queue.search=torch")


@contextlib.contextmanager
def _process_group(device: torch.device, extra):
    """A 1-rank process group (NCCL on a GPU, gloo on the CPU) for the extras that name an engine needing one
    (FSDP2 shards over a device mesh); nothing otherwise. Destroyed on exit."""
    import torch.distributed as dist
    if "engine.kind=fsdp2" not in extra or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _queues_full(engine) -> bool:
    queues = engine.model.queues
    return all(q.num_filled == (q.n_slots if queues.sharded else q.size) for q in queues)


def _steady_state_setup(device: torch.device, *extra):
    """The tiny refiner on ``device`` (engine single unless ``extra`` names another), its EMA, and one host batch
    (pinned on a GPU)."""
    from scale_refiner.bench.runner import build, synthetic_batch
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.ema import EncoderEMA
    # a queue of 32: full after the two warm-up steps (16 entries each), so the timed steps run the steady state
    # (every slot valid, FIFO overwrite) rather than the filling phase; top-20 of the 30 not the query's own
    cfg = _tiny_cfg("queue.size=32", "data.batch_size=16", *extra)
    ctx = DistContext(rank=0, world=1, local_rank=0, device=device)
    engine = build(cfg, ctx, "refine")
    ema = EncoderEMA(engine, 0.99)
    batch = synthetic_batch(cfg, 16, torch.device("cpu"))  # host tensors
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return cfg, engine, ema, batch


def _train_steps(engine, ema, cfg, batch, device, steps: int, step0: int = 0):
    """What run_stage does per step: set_lr, per micro-batch (``engine.accumulation`` of them) refiner_inputs,
    forward, backward; then step (no clipping), EMA update. Returns the last loss (a device tensor, not read)."""
    from scale_refiner.engine.trainer import micro_batches
    from scale_refiner.refiner import refiner_inputs
    stage_cfg = cfg.stages.refine
    loss = None
    for step in range(step0, step0 + steps):
        engine.set_lr(1e-5)
        for index, micro in enumerate(micro_batches(batch, engine.accumulation)):
            args, kwargs = refiner_inputs(micro, device, stage_cfg, step, index)
            loss, _ = engine.forward(*args, **kwargs)
            engine.backward(loss)
        engine.step(None)
        ema.update()
    return loss


def _synchronising_calls(fn):
    """Run ``fn()`` under ``torch.cuda.set_sync_debug_mode("warn")`` and return every synchronising call it made,
    each as the innermost frames that led to it (with its count): this repository's lines, or, for a sync
    inside a third-party package (DeepSpeed), that package's, the key then starting with ``[package]`` so that
    a test can list those apart. Warn mode rather than "error": one run names every sync, not only the first,
    which matters on a GPU lent for minutes."""
    from scale_refiner.hostsync import attribute
    sites = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing" not in str(message):  # not the mode switch's own "prototype" warning
            return
        owner, where = attribute(skip=1)  # the innermost frame outside torch and the standard library
        if owner not in ("ours", "torch"):
            where = f"[{owner}] {where}"
        sites[where] = sites.get(where, 0) + 1
    cuda_ = torch.cuda.is_available()  # without CUDA only the recording runs (its CPU test below)
    previous = torch.cuda.get_sync_debug_mode() if cuda_ else None
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # catch_warnings restores it
        if cuda_:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            if cuda_:
                torch.cuda.set_sync_debug_mode(previous)
    return result, sites


@gpu
@cuda
@pytest.mark.parametrize("extra", [(), ("data.micro_batch_size=8",), ("heads.norm=async",),
                                   FSDP2_SHARDED + ("heads.norm=syncbn",), FSDP2_SHARDED + ("heads.norm=async",)],
                         ids=["one-batch", "two-micro-batches", "async-bn", "fsdp2-sharded-syncbn",
                              "fsdp2-sharded-async-bn"])
def test_gpu_steady_state_step_has_no_host_sync(extra):
    """After warm-up, a whole training step (inputs to the device, forward with the queue lookup and enqueue,
    backward, optimiser step, EMA) queues its work without the host once waiting for the GPU: under
    ``torch.cuda.set_sync_debug_mode`` no synchronising call (``.item()``, a blocking copy, a ``nonzero``, a
    data-dependent shape, a Python scalar written into an indexed tensor) is made. Also with two micro-batches
    (non-contiguous slices of the pinned batch), with the async-statistics BatchNorm heads, and on FSDP2 (a
    1-rank NCCL group: DTensor parameters, its gradient norm and optimiser) with the sharded queue (its masked
    torch search, device-side enqueue) under SyncBN and async heads. One rank takes the 1-rank branches (no
    queue collective, SyncBN with local statistics); the 2-rank branches are the CPU twins' (test_hostsync.py)."""
    device = torch.device("cuda", 0)
    with _process_group(device, extra):
        cfg, engine, ema, batch = _steady_state_setup(device, *extra)
        assert engine.dtype == torch.bfloat16
        _train_steps(engine, ema, cfg, batch, device, 2)  # warm-up: lazy CUDA / cuBLAS / allocator set-up
        torch.cuda.synchronize()
        assert _queues_full(engine)  # the steady state, not the filling phase
        loss, sites = _synchronising_calls(lambda: _train_steps(engine, ema, cfg, batch, device, 3, step0=2))
        ours = {where: n for where, n in sites.items() if not where.startswith("[")}
        assert not ours, "host synchronisations in the steady-state step:\n" + "\n".join(
            f"{n} x {where}" for where, n in sites.items())
        torch.cuda.synchronize()
        assert torch.isfinite(loss)
        for p in engine.model.parameters():
            assert torch.isfinite(p).all()


def test_sync_recorder_names_each_synchronising_call():
    """The GPU test's recorder: a sync warning (what torch's warn mode issues) is reported with the line that
    caused it and its count; other warnings are not."""
    def two_syncs():
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
        return 7
    result, sites = _synchronising_calls(two_syncs)
    assert result == 7
    assert len(sites) == 1
    (where, count), = sites.items()
    assert count == 2 and where.startswith("tests/test_gpu.py:") and "synchronizing" in where


def test_sync_recorder_lists_a_third_party_sync_apart(tmp_path, monkeypatch):
    """A sync warning raised inside another package (DeepSpeed's case) is keyed ``[package] ...``: the GPU test
    lists it without failing on it."""
    pkg = tmp_path / "site-packages" / "otherlib_gpu"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import warnings\n\ndef sync():\n"
                                     "    warnings.warn('called a synchronizing CUDA operation')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    import otherlib_gpu
    _, sites = _synchronising_calls(otherlib_gpu.sync)
    (where, count), = sites.items()
    assert count == 1 and where.startswith("[otherlib_gpu] "), where


@pytest.mark.parametrize("extra", [("heads.norm=bn",), ("heads.norm=async",), FSDP2_SHARDED + ("heads.norm=syncbn",)],
                         ids=["bn", "async", "fsdp2-sharded-syncbn"])
def test_steady_state_step_loop_runs_on_cpu(extra):
    """The loop of the test above, on the CPU in fp32 (FSDP2 on a 1-rank gloo group): keeps that GPU-only test's
    calls in step with the code."""
    device = torch.device("cpu")
    with _process_group(device, extra):
        cfg, engine, ema, batch = _steady_state_setup(device, "engine.precision=fp32", "data.micro_batch_size=8",
                                                      *extra)
        assert engine.accumulation == 2
        before = {n: t.clone() for n, t in ema.shadow.items()}
        loss = _train_steps(engine, ema, cfg, batch, device, 5)
        assert torch.isfinite(loss)
        assert _queues_full(engine)  # the steady state the GPU test times
        assert any(not torch.equal(before[n], ema.shadow[n]) for n in before)  # the EMA moved
