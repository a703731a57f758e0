"""The CPU host-sync detector (``scale_refiner.hostsync``): each known synchronising pattern, planted on a tensor
a GPU run would hold on the device, is caught and named with its line; the sync-free forms of the same work and
the same calls on host tensors are not."""
import pytest
import torch

from scale_refiner.hostsync import HostSyncWatch, mark_host
from scale_refiner.precision import to_device_async

DEV = torch.device("cpu")  # the run's device, as the engines pass it


def _device_tensors():
    # made before the watch: device tensors, as parameters and buffers are
    return torch.arange(8), torch.zeros(8), torch.zeros((), dtype=torch.long)


PLANTED = {
    "item": lambda d, f, p: d.sum().item(),
    "int": lambda d, f, p: int(p),
    "float": lambda d, f, p: float(f.sum()),
    "bool": lambda d, f, p: bool((d < 0).any()),
    "if-tensor": lambda d, f, p: 1 if (d > 3).any() else 0,
    "tolist": lambda d, f, p: d.tolist(),
    "numpy": lambda d, f, p: f.numpy(),
    "cpu": lambda d, f, p: f.cpu(),
    "to-cpu-string": lambda d, f, p: f.to("cpu"),
    "nonzero": lambda d, f, p: d.nonzero(),
    "where-one-arg": lambda d, f, p: torch.where(d > 3),
    "masked_select": lambda d, f, p: d.masked_select(d > 3),
    "bool-mask-index": lambda d, f, p: d[d > 3],
    "bool-mask-assign": lambda d, f, p: d.__setitem__(d > 3, 0),
    "unique": lambda d, f, p: torch.unique(d),
    "repeat_interleave": lambda d, f, p: torch.repeat_interleave(d, d.clamp(max=2)),
    "equal": lambda d, f, p: torch.equal(d, d),
    "scalar-through-index": lambda d, f, p: d.__setitem__(torch.arange(2, device=DEV), 5),
    "tensor-from-list-on-device": lambda d, f, p: torch.tensor([1, 2], device=DEV),
    "blocking-h2d-to": lambda d, f, p: torch.arange(4).to(DEV),
    "blocking-h2d-copy_": lambda d, f, p: f[:4].copy_(torch.ones(4)),
    "host-tensor-in-device-op": lambda d, f, p: d + torch.arange(8),
    "host-index-of-device-tensor": lambda d, f, p: f[torch.arange(3)],
    "cuda-synchronize": lambda d, f, p: torch.cuda.synchronize(),
    "dist-barrier": lambda d, f, p: torch.distributed.barrier(),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_sync_is_caught_and_located(name):
    d, f, p = _device_tensors()
    with HostSyncWatch() as watch:
        try:
            PLANTED[name](d, f, p)
        except (RuntimeError, ValueError, AssertionError, AttributeError):
            pass  # torch.cuda / dist without CUDA or a group: the call was recorded before it failed
    ours = watch.report.ours
    assert ours, f"{name}: not detected"
    assert all("tests/test_hostsync.py:" in s.where for s in ours), watch.report.format()


def test_sync_free_forms_are_not_flagged():
    """What the step does instead: device-side arithmetic, fixed shapes, device indices, index_fill_ with a
    Python scalar, host-side work on host tensors, copies through to_device_async; none is recorded."""
    d, f, p = _device_tensors()
    batch = torch.randn(4, 3)
    mark_host([batch])
    with HostSyncWatch() as watch:
        slots = (p + torch.arange(4, device=DEV)) % 8  # the pointer on the device
        f.index_fill_(0, slots, 7.0)
        f.index_copy_(0, slots, torch.ones(4, device=DEV))
        d[slots] = torch.full_like(slots, 3)
        f.masked_fill_(d > 3, 0.0)
        torch.where(d > 3, d, 0).sum()
        f.topk(3)
        torch.nonzero_static(d > 3, size=8)
        p.fill_(5)
        host = torch.arange(8)  # host side: reading it is free
        int(host[3]), host.tolist(), bool((host > 2).any()), host[host > 2]
        u = torch.rand(4, generator=torch.Generator().manual_seed(0))
        moved = to_device_async(u, DEV)
        gpu_batch = to_device_async(batch, DEV)
        (moved * gpu_batch.sum(1)).sum()
        torch.full_like(host, 2, device=DEV) + d[:8]
    assert not watch.report.syncs, watch.report.format()
    assert not hasattr(batch, "_hostsync_where") or batch._hostsync_where == "host"  # still a host batch


def test_labels_follow_the_data():
    with HostSyncWatch() as watch:
        h = torch.arange(4)
        dv = torch.arange(4, device=DEV)
        int((h + 1)[0])  # host
        moved = h.to(DEV)  # recorded: a blocking copy
        int(moved[0])  # recorded: a device value read
        back = dv.cpu()  # recorded
        int(back[0])  # host again: not recorded
    kinds = [s.kind for s in watch.report.syncs]
    assert kinds == ["blocking host-to-device copy", "scalar read", "to host"], watch.report.format()


def test_third_party_frames_are_listed_apart(tmp_path, monkeypatch):
    """A sync inside another package is attributed to it (the DeepSpeed case), not to our line that called it."""
    pkg = tmp_path / "site-packages" / "otherlib"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("def read(t):\n    return t.sum().item()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    import otherlib
    d, _, _ = _device_tensors()
    with HostSyncWatch() as watch:
        otherlib.read(d)
    (sync,) = watch.report.syncs
    assert sync.owner == "otherlib" and not watch.report.ours, str(sync)


# ----------------------------------------------------------------------------- the steady-state step, on the CPU
def _steady_state_syncs(rank, world, kind, extra, warm=2, steps=2):
    """Build the tiny refiner on ``kind`` (fp32, CPU), run ``warm`` steps under a watch that only labels, then
    ``steps`` recorded steps as run_stage runs an unlogged step (inputs to the device, forward with the queue
    lookup and enqueue, backward, metrics summed on the device, step, EMA, the non-finite guard's fold). Returns
    (our syncs, third-party syncs, every queue full)."""
    from pathlib import Path
    from scale_refiner.bench.runner import build, synthetic_batch
    from scale_refiner.config import load_config
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.divergence import NonFiniteGuard
    from scale_refiner.engine.ema import EncoderEMA
    from scale_refiner.engine.trainer import micro_batches
    from scale_refiner.refiner import refiner_inputs
    root = Path(__file__).resolve().parents[1]
    # a queue of 32 and a global batch of 16: full after the two warm-up steps, so the recorded steps run the
    # steady state (every slot valid, FIFO overwrite), not the filling phase
    cfg = load_config(root / "configs/demo.yaml", ["model.name=vit_test_patch4", "heads.blocks=[1,2]",
                                                   "queue.size=32", "data.batch_size=16", f"engine.kind={kind}",
                                                   "engine.precision=fp32", *extra])
    device = torch.device("cpu")
    ctx = DistContext(rank=rank, world=world, local_rank=rank, device=device)
    engine = build(cfg, ctx, "refine")
    ema = EncoderEMA(engine, 0.99)
    batch = synthetic_batch(cfg, 16 // world, device, rank)
    mark_host(batch.values())  # a GPU run keeps it in pinned host memory
    guard = NonFiniteGuard(ctx, "refine")
    with HostSyncWatch(recording=False) as watch:
        for step in range(warm + steps):  # run_stage's step, on a step it does not log
            watch.recording = step >= warm
            engine.set_lr(1e-5)
            metrics = {}
            for index, micro in enumerate(micro_batches(batch, engine.accumulation)):
                args, kwargs = refiner_inputs(micro, device, cfg.stages.refine, step, index)
                loss, micro_metrics = engine.forward(*args, **kwargs)
                engine.backward(loss)
                for key, value in micro_metrics.items():
                    metrics[key] = metrics[key] + value if key in metrics else value
            if engine.accumulation > 1:
                metrics = {key: value / engine.accumulation for key, value in metrics.items()}
            grad_norm = engine.step(None)
            ema.update()
            guard.observe(step + 1, dict(metrics, grad_norm=grad_norm))
    queues = engine.model.queues
    full = all(q.num_filled == (q.n_slots if queues.sharded else q.size) for q in queues)
    assert torch.isfinite(loss)
    return [str(s) for s in watch.report.ours], [str(s) for s in watch.report.theirs], full


def _check(ours, theirs, full, what):
    assert full, f"{what}: the queues are not full after the warm-up: not the steady state"
    assert not ours, f"{what}: host synchronisations in the steady-state step:\n" + "\n".join(ours)


@pytest.mark.parametrize("extra", [["heads.norm=bn"], ["heads.norm=syncbn"], ["heads.norm=async"],
                                   ["heads.norm=async", "data.micro_batch_size=8"],
                                   ["heads.norm=bn", "queue.sharded=true"]],
                         ids=["bn", "syncbn", "async", "async-two-micro-batches", "sharded-queue"])
def test_single_engine_steady_state_has_no_host_sync(extra):
    ours, theirs, full = _steady_state_syncs(0, 1, "single", extra)
    _check(ours, theirs, full, f"single {extra}")
    assert not theirs, theirs  # nothing but torch and this repository runs here


def _two_rank_cases(rank, world, kind, cases):
    return [(extra, _steady_state_syncs(rank, world, kind, extra)) for extra in cases]


def test_fsdp2_sharded_queue_steady_state_has_no_host_sync(gloo):
    """FSDP2 on 2 gloo ranks with the sharded queue (torch search: lookup in four collectives, local enqueue),
    SyncBN heads and async-statistics BN heads; and a queue of 24, which 2 x 8 rows do not tile, so rows change
    owner and the enqueue goes through its all_to_all (split sizes from the host's pointer). One spawn for all."""
    cases = [["heads.norm=syncbn", "queue.sharded=true", "queue.search=torch"],
             ["heads.norm=async", "queue.sharded=true", "queue.search=torch"],
             ["heads.norm=syncbn", "queue.sharded=true", "queue.search=torch", "queue.size=24"]]
    for extra, (ours, theirs, full) in gloo(_two_rank_cases, 2, "fsdp2", cases):
        _check(ours, theirs, full, f"fsdp2 {extra}")
        assert not theirs, theirs


def test_zero3_steady_state_has_no_host_sync_of_ours(gloo):
    """ZeRO-3 on 2 gloo ranks with the replicated queue (its all-gathered enqueue) and SyncBN heads: no sync in
    this repository's code. DeepSpeed's own (its grad-norm checks, ``torch.tensor(..., device=)``) are listed
    apart and do not fail the test (``-s`` prints them)."""
    ((extra, (ours, theirs, full)),) = gloo(_two_rank_cases, 2, "deepspeed", [["heads.norm=syncbn"]])
    _check(ours, theirs, full, f"zero3 {extra}")
    print("DeepSpeed's own host synchronisations in a steady-state step (2 steps):\n" + "\n".join(
        f"  {line}" for line in sorted(set(theirs))))
