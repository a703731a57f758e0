"""Big models built without a full copy per rank. ZeRO-3: the refiner is constructed under deepspeed.zero.Init,
the weights file is read partition by partition from its memory map, and the next stage takes its weights from
the previous engine's partitions. FSDP2: the encoder is built on the meta device and each rank fills its shards.

- the partitions after loading are the file's tensors' slices, bit for bit (torch ``.pth`` in the MAE layout,
  and a safetensors file whose position embedding is resampled, a value the mapping computes), and the heads
  are the plain build's;
- a wrong file is refused with ``load_pretrained``'s message, checked against a meta-built twin;
- an allocation tracker sees no rank create a full-size copy of a large parameter while loading, at the stage
  hand-off or in rank 1's share of the stage-end gather, and at most one alive at a time while building (the
  plain build, tracked the same way, holds all of them at once: the check can fail);
- bf16: the fp32 masters are the loaded values exactly, the frozen parameters keep them, and the export is
  the gathered fp32 state bit for bit;
- through the real ``deepspeed`` launcher on 2 CPU ranks, with a weights file and both stages: the losses and
  the end state are the 1-process run's, the heads stage leaves the loaded encoder unchanged, the starting
  k-NN is the 1-process value exactly, and a finished heads stage resumed into the refine stage (loaded from
  ``model_state.pt`` partition by partition) trains the same refine stage;
- FSDP2: the encoder built on the meta device (with the plain build's random draws: same heads), each rank's
  shards read from the mapped file (its rows, bit for bit) with no full tensor, the stage end gathered to rank 0
  only, the next engine given the shards handed on; through torchrun, the 1-process losses and end state.
"""
import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scale_refiner.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2", "data.batch_size=16",
        "heads.norm=syncbn", "model.freeze_blocks=1", "engine.zero_config=ds_configs/cpu_demo.json",
        "stages.refine.topk=4"]


def write_mae_weights(path, overrides=(), seed=7, img_size=None):
    """A random encoder (another seed than the runs': loading changes the weights) in the official MAE layout,
    with decoder keys that the loader must drop."""
    from scale_refiner.models.vit import build_vit
    cfg = load_config(ROOT / "configs/demo.yaml", list(TINY) + list(overrides))
    if img_size is not None:
        cfg.model.img_size = img_size
    torch.manual_seed(seed)
    state = {k: v.clone() for k, v in build_vit(cfg.model).state_dict().items()}
    state["decoder_embed.weight"] = torch.zeros(8, cfg.model.embed_dim or state["cls_token"].shape[-1])
    state["mask_token"] = torch.zeros(1, 1, state["cls_token"].shape[-1])
    torch.save({"model": state}, path)
    return {k: v for k, v in state.items() if not k.startswith(("decoder", "mask"))}


def _config(extra):
    return load_config(ROOT / "configs/demo.yaml", TINY + ["engine.kind=deepspeed"] + list(extra))


# ------------------------------------------------------------------------------ partitions after loading
def _partitions_are_file_slices(rank, world, weights, extra, reference_weights):
    import deepspeed
    from scale_refiner.engine.zero import partition_range
    from scale_refiner.models.weights import load_pretrained
    from scale_refiner.refiner import build_refiner
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = _config([f"model.weights={weights}", *extra])
    torch.manual_seed(0)
    refiner = build_refiner(cfg, partitioned=True)
    # the plain build of the same config, loaded the plain way: what every partition must be a slice of
    torch.manual_seed(0)
    plain = build_refiner(load_config(ROOT / "configs/demo.yaml", TINY + [f"model.weights={weights}", *extra]))
    expected = plain.state_dict()
    if reference_weights is not None:  # the file's own tensors, read independently of the loader
        file = torch.load(reference_weights, weights_only=True)
        assert all(torch.equal(expected[f"encoder.{k}"], v) for k, v in file.items())
    checked = 0
    for name, param in refiner.named_parameters():
        assert param.numel() == 0  # nothing but the partition
        start, stop, size = partition_range(param)
        assert param.ds_tensor.numel() == size == -(-param.ds_numel // world)
        assert torch.equal(param.ds_tensor[: stop - start], expected[name].reshape(-1)[start:stop]), name
        assert not param.ds_tensor[stop - start:].any()  # zero padding
        checked += 1
    assert checked == len(expected) - sum(1 for k in expected if k not in dict(plain.named_parameters()))
    for name, buffer in refiner.named_buffers():  # BN statistics, queues: as built, the same on every rank
        assert torch.equal(buffer, expected[name]), name
    return True


def test_partitions_after_loading_are_the_files_slices(gloo, tmp_path):
    """MAE .pth (decoder dropped): every partition is its slice of the file's tensor, bit for bit."""
    weights = tmp_path / "mae.pth"
    encoder = write_mae_weights(weights)
    torch.save(encoder, tmp_path / "encoder.pt")
    assert gloo(_partitions_are_file_slices, 2, str(weights), [], str(tmp_path / "encoder.pt"))


def test_partitions_of_a_resampled_safetensors_file(gloo, tmp_path):
    """timm safetensors at another resolution: the position embedding is computed (resampled) from the whole
    source tensor, everything else read as slices; the partitions equal the plain load's tensors."""
    from safetensors.torch import save_file
    state = write_mae_weights(tmp_path / "unused.pth", img_size=48)
    state["head.weight"] = torch.zeros(10, state["cls_token"].shape[-1])  # dropped by the timm table
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "vit.safetensors"))
    assert gloo(_partitions_are_file_slices, 2, str(tmp_path / "vit.safetensors"), [], None)


def test_wrong_file_is_refused_with_load_pretrained_s_message(tmp_path):
    """The partitioned build checks the file against a meta-built twin: same WeightsError as the plain load."""
    from scale_refiner.models.vit import build_vit
    from scale_refiner.models.weights import WeightsError, load_pretrained, plan_pretrained
    write_mae_weights(tmp_path / "mini.pth", ["model.name=vit_mini_patch4"])
    cfg = _config([])
    with pytest.raises(WeightsError) as plain:
        load_pretrained(build_vit(cfg.model), tmp_path / "mini.pth")
    with pytest.raises(WeightsError) as planned:
        plan_pretrained(build_vit(cfg.model, device="meta"), tmp_path / "mini.pth")
    assert str(planned.value) == str(plain.value)
    assert "shape mismatch" in str(planned.value) and "mini.pth" in str(planned.value)


# --------------------------------------------------------------------------- no full copy of a large tensor
def _storage_ptr(value):
    """The data pointer of a tensor's (or storage's) memory; None for what has none here (meta tensors, tensor
    subclasses such as DTensor, whose local tensors the tracker sees on their own)."""
    if isinstance(value, torch.UntypedStorage):
        return value.data_ptr()
    if value.is_meta or type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
        return None
    try:
        return value.untyped_storage().data_ptr()
    except RuntimeError:
        return None


class LargeAllocations(TorchDispatchMode):
    """Every storage of at least ``min_bytes`` that an operator allocates (a view of, or an op writing into, an
    existing storage is not an allocation), with how many of them were alive at once (storages are followed to
    their end with ``weakref.finalize``)."""

    def __init__(self, min_bytes):
        super().__init__()
        self.min_bytes = min_bytes
        self.created, self.live, self.peak = [], 0, 0

    def _freed(self):
        self.live -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = set()
        for value in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(value, (torch.Tensor, torch.UntypedStorage)):
                inputs.add(_storage_ptr(value))
        out = func(*args, **kwargs)
        for value in torch.utils._pytree.tree_leaves(out):
            if not isinstance(value, torch.Tensor) or _storage_ptr(value) is None:
                continue
            storage = value.untyped_storage()
            if storage.nbytes() >= self.min_bytes and storage.data_ptr() not in inputs:
                # a storage held only by a reference cycle is dead but freed whenever the cyclic collector next
                # runs, which depends on how many objects the process made before (a clean clone that compiles
                # DeepSpeed's op first counted 2): collect, so ``live`` is what the code really keeps
                gc.collect()
                self.created.append((str(func), tuple(value.shape)))
                self.live += 1
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed)
        return out


def _no_full_copies(rank, world, weights):
    import deepspeed
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.trainer import build_engine
    from scale_refiner.engine.zero import load_state_partitioned, zero3_config
    from scale_refiner.models.vit import build_vit
    from scale_refiner.models.weights import load_pretrained, plan_pretrained
    from scale_refiner.refiner import build_refiner
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = _config([f"model.weights={weights}", "model.name=vit_mini_patch4", "engine.precision=fp32"])
    # the large parameters: qkv (49152 elements), fc1, fc2 (65536) of each block; a partition (<= 32768) is not one
    meta = build_vit(cfg.model, device="meta")
    large = {n: p.numel() for n, p in meta.named_parameters() if p.numel() >= 49152}
    assert len(large) == 3 * meta.depth == 18 and max(large.values()) // world < min(large.values())
    min_bytes = 4 * min(large.values())
    report = {}

    # control: the plain build (full model, then the file loaded into it) holds every large tensor at once
    with LargeAllocations(min_bytes) as plain:
        torch.manual_seed(0)
        encoder = build_vit(cfg.model)
        load_pretrained(encoder, weights)
    report["plain"] = plain.peak
    del encoder

    # the partitioned build, step by step: layers one at a time, then the file partition by partition
    with LargeAllocations(min_bytes) as building:
        torch.manual_seed(0)
        encoder = build_vit(cfg.model, zero_init_config=zero3_config(cfg))
    plan = plan_pretrained(meta, weights)
    with LargeAllocations(min_bytes) as loading:
        load_state_partitioned(encoder, plan.tensors)
    with LargeAllocations(min_bytes) as whole:  # the refiner the launcher builds, end to end
        torch.manual_seed(0)
        refiner = build_refiner(cfg, partitioned=True)
    report.update(build=building.peak, load=len(loading.created), whole=whole.peak)

    ctx = DistContext(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"))
    engine = build_engine(refiner, cfg, "heads", ctx)
    with LargeAllocations(min_bytes) as ending:  # rank 0 receives one tensor at a time; the others only send
        end_state = engine.stage_end_state()
    with LargeAllocations(min_bytes) as rebuilding:
        following = build_refiner(cfg, load_weights=False, partitioned=True)
    with LargeAllocations(min_bytes) as handing:
        engine.hand_off(following)
    report.update(end=len(ending.created), rebuild=rebuilding.peak, hand_off=len(handing.created))

    assert report["plain"] >= 18, report  # the control: the check can fail
    assert report["build"] == 1 and report["whole"] == 1 and report["rebuild"] == 1, report
    assert report["load"] == 0 and report["hand_off"] == 0, report
    file = torch.load(weights, weights_only=True)["model"]
    if rank == 0:  # model_state.pt: each large tensor received whole, once
        assert report["end"] == 18, report
        assert all(torch.equal(end_state[f"encoder.{k}"], file[k]) for k in large)
    else:
        assert report["end"] == 0 and end_state is None, report
    from scale_refiner.engine.zero import partition_range
    for name, param in following.encoder.named_parameters():  # handed on: the loaded partitions
        start, stop, _ = partition_range(param)
        assert torch.equal(param.ds_tensor[: stop - start], file[name].reshape(-1)[start:stop]), name
    return report


def test_no_rank_allocates_a_full_copy_of_a_large_parameter(gloo, tmp_path):
    """Tracked on both ranks (each asserts its own): building holds one large tensor at a time (the layer being
    built, or the one being initialised) where the plain build holds all 18 at once; loading, the hand-off to
    the next stage and rank 1's side of the stage-end gather allocate none."""
    weights = tmp_path / "mini.pth"
    write_mae_weights(weights, ["model.name=vit_mini_patch4"])
    report = gloo(_no_full_copies, 2, str(weights))
    assert report["plain"] >= 18 and report["build"] == 1 and report["load"] == 0, report


# ---------------------------------------------------------------------------------- bf16: exact masters
def _bf16_masters(rank, world, weights, out_dir):
    import deepspeed
    from deepspeed.utils import safe_get_local_fp32_param
    from scale_refiner.bench.runner import synthetic_batch
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.trainer import build_engine
    from scale_refiner.refiner import refiner_inputs
    from scale_refiner.engine.zero import partition_range
    from scale_refiner.models.vit import vit_from_state
    from scale_refiner.models.weights import export_timm
    from scale_refiner.refiner import build_refiner
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = _config([f"model.weights={weights}", "engine.precision=bf16"])
    torch.manual_seed(0)
    refiner = build_refiner(cfg, partitioned=True)
    ctx = DistContext(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"))
    engine = build_engine(refiner, cfg, "refine", ctx)
    file = {f"encoder.{k}": v for k, v in torch.load(weights, weights_only=True)["model"].items()
            if not k.startswith(("decoder", "mask"))}
    params = dict(engine.model.named_parameters())
    trainable = [n for n in file if params[n].requires_grad]
    frozen = [n for n in file if not params[n].requires_grad]
    assert trainable and frozen
    for name in file:  # before any step: the fp32 values are the file's, the compute copies its bf16 rounding
        param = params[name]
        start, stop, _ = partition_range(param)
        want = file[name].reshape(-1)[start:stop]
        local = (safe_get_local_fp32_param(param) if param.requires_grad else engine._frozen_fp32[name]).reshape(-1)
        assert local.dtype == torch.float32 and torch.equal(local[: stop - start], want), name
        assert param.ds_tensor.dtype == torch.bfloat16
        assert torch.equal(param.ds_tensor[: stop - start], want.to(torch.bfloat16)), name
    assert not all(torch.equal(file[n], file[n].to(torch.bfloat16).float()) for n in trainable)
    batch = synthetic_batch(cfg, cfg.data.batch_size // world, ctx.device, rank)
    for step in range(3):
        engine.set_lr(1e-3)
        args, kwargs = refiner_inputs(batch, ctx.device, cfg.stages.refine, step)
        loss, _ = engine.forward(*args, **kwargs)
        engine.backward(loss)
        engine.step(None)
    state = engine.stage_end_state()  # rank 0 only
    full = engine.full_state()  # every rank: the masters gathered
    if rank == 0:
        assert state.keys() == full.keys()
        assert all(torch.equal(state[k], full[k]) for k in state if torch.is_tensor(state[k]))
        for name in frozen:
            assert torch.equal(state[name], file[name]), name
        moved = [n for n in trainable if not torch.equal(state[n], file[n])]
        assert moved and not all(torch.equal(state[n], state[n].to(torch.bfloat16).float()) for n in moved)
        encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        path, _ = export_timm(vit_from_state(cfg.model, encoder), Path(out_dir), "online")
        from safetensors.torch import load_file
        exported = load_file(str(path))
        assert exported.keys() == encoder.keys() and all(torch.equal(exported[k], encoder[k]) for k in encoder)
    else:
        assert state is None
    return True


def test_zero_init_bf16_masters_are_the_loaded_values_and_the_export_is_fp32(gloo, tmp_path):
    weights = tmp_path / "mae.pth"
    write_mae_weights(weights)
    assert gloo(_bf16_masters, 2, str(weights), str(tmp_path))


# --------------------------------------------------------------------------------- through the launcher
BOTH = ["stages.run=[heads,refine]", "data.samples_per_epoch=48", "stages.heads.epochs=1",
        "stages.heads.warmup_epochs=0", "stages.refine.epochs=1", "stages.refine.warmup_epochs=0.5",
        "stages.refine.ema=0.9", "heads.norm=syncbn", "run.log_every=1"]


def launch(kind, out, extra, eval_samples=0, ranks=2):
    """The main job through its launcher: 1 process, ``deepspeed --num_gpus 2`` or ``torchrun --nproc_per_node 2``
    (FSDP2); CPU ranks, gloo."""
    import os
    import subprocess
    import sys
    from scale_refiner.engine.distributed import free_port
    args = [str(ROOT / "launch/refine.py"), "--config", "configs/demo.yaml", "--eval-samples", str(eval_samples),
            f"run.out_dir={out}", "data.num_workers=0", "data.pipeline=memory"] + TINY + list(extra)
    if kind == "single":
        cmd = [sys.executable] + args + ["engine.kind=single"]
    elif kind == "fsdp2":
        cmd = [sys.executable, str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks),
               "--master_port", str(free_port())] + args + ["engine.kind=fsdp2"]
    else:
        cmd = [sys.executable, str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(free_port())] + args + ["engine.kind=deepspeed"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{kind} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def model_state(out, stage):
    return torch.load(Path(out) / f"checkpoints/{stage}-end/model_state.pt", weights_only=True)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "mae.pth"
    write_mae_weights(path)
    return path


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, weights_file):
    out = tmp_path_factory.mktemp("single")
    launch("single", out, BOTH + [f"model.weights={weights_file}"], eval_samples=300)
    return out


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, weights_file):
    out = tmp_path_factory.mktemp("zero3")
    launch("deepspeed", out, BOTH + [f"model.weights={weights_file}"], eval_samples=300)
    return out


def assert_same_weights(state_a, state_b, lr_sum):
    """To float noise; a parameter whose true gradient is 0 (a bias right before a BN) may drift by up to the
    summed learning rate (Adam normalises its rounding-noise gradient), as in tests/test_launchers.py."""
    diffs = []
    for key in state_a:
        if key.startswith(("encoder.", "heads.")) and state_a[key].is_floating_point():
            diff = (state_a[key] - state_b[key]).abs()
            assert diff.max() <= 2 * lr_sum, (key, diff.max(), lr_sum)
            diffs.append(diff.flatten())
    assert torch.cat(diffs).median() < 1e-7


def test_zero3_partitioned_build_equals_one_process(single_run, zero3_run, weights_file):
    one, two = metrics(single_run), metrics(zero3_run)
    assert [m["stage"] for m in one] == [m["stage"] for m in two] == ["heads"] * 3 + ["refine"] * 3
    a, b = torch.tensor([m["loss"] for m in one]), torch.tensor([m["loss"] for m in two])
    assert torch.allclose(a, b, rtol=1e-4), (a, b)
    file = {k: v for k, v in torch.load(weights_file, weights_only=True)["model"].items()
            if not k.startswith(("decoder", "mask"))}
    for run in (single_run, zero3_run):  # the heads stage leaves the loaded (frozen) encoder as it is
        heads_end = model_state(run, "heads")
        assert all(torch.equal(heads_end[f"encoder.{k}"], v) for k, v in file.items())
    lr_sum = sum(m["lr"] for m in one)
    assert_same_weights(model_state(single_run, "refine"), model_state(zero3_run, "refine"), lr_sum)
    # the k-NN of the starting encoder: read from the mapped file on both ranks, the 1-process value exactly
    before = [json.loads((run / "results.json").read_text())["before"] for run in (single_run, zero3_run)]
    assert before[0] == before[1]


def test_zero3_exports_are_the_end_checkpoint(zero3_run):
    """Rank 0 writes the exports from the refine stage's end checkpoint: online and EMA, fp32, bit for bit."""
    from safetensors.torch import load_file
    end = model_state(zero3_run, "refine")
    ema = torch.load(zero3_run / "checkpoints/refine-end/ema.pt", weights_only=True)
    online = load_file(str(zero3_run / "export/online/model.safetensors"))
    assert online.keys() == {k[len("encoder."):] for k in end if k.startswith("encoder.")}
    assert all(torch.equal(v, end[f"encoder.{k}"]) for k, v in online.items())
    exported_ema = load_file(str(zero3_run / "export/ema/model.safetensors"))
    assert ema and all(torch.equal(exported_ema[k], v) for k, v in ema.items())
    assert all(torch.equal(exported_ema[k], online[k]) for k in online if k not in ema)  # frozen: as loaded


def test_finished_heads_stage_resumes_into_refine_partition_by_partition(zero3_run, weights_file, tmp_path):
    """heads only, then heads+refine with run.resume=auto: the refine stage starts from model_state.pt, read
    partition by partition, and trains exactly like the run that handed its partitions on in memory."""
    launch("deepspeed", tmp_path, BOTH[1:] + ["stages.run=[heads]", f"model.weights={weights_file}"])
    assert (tmp_path / "checkpoints/latest").read_text() == "heads-end"
    launch("deepspeed", tmp_path, BOTH + [f"model.weights={weights_file}", "run.resume=auto"])
    straight, resumed = metrics(zero3_run), metrics(tmp_path)
    assert [m["loss"] for m in straight] == [m["loss"] for m in resumed]
    a, b = model_state(zero3_run, "refine"), model_state(tmp_path, "refine")
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------- FSDP2
def _fsdp2_shards_are_file_rows(rank, world, weights):
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.trainer import build_engine
    from scale_refiner.models.vit import build_vit
    from scale_refiner.refiner import build_refiner
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + ["engine.kind=fsdp2", f"model.weights={weights}",
                                                          "model.name=vit_mini_patch4"])
    file = torch.load(weights, weights_only=True)["model"]
    meta = build_vit(cfg.model, device="meta")
    large = {n: p.numel() for n, p in meta.named_parameters() if p.numel() >= 49152}
    min_bytes = 4 * min(large.values())
    with LargeAllocations(min_bytes) as building:
        torch.manual_seed(0)
        refiner = build_refiner(cfg, partitioned=True)
    torch.manual_seed(0)  # the plain build: the same heads (the meta build made the plain build's draws)
    plain = build_refiner(load_config(ROOT / "configs/demo.yaml", TINY + [f"model.weights={weights}",
                                                                          "model.name=vit_mini_patch4"]))
    assert all(p.is_meta for p in refiner.encoder.parameters())
    assert all(torch.equal(a, b) for a, b in zip(refiner.heads.state_dict().values(),
                                                 plain.heads.state_dict().values()))
    ctx = DistContext(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"))
    with LargeAllocations(min_bytes) as sharding:
        engine = build_engine(refiner, cfg, "heads", ctx)

    def check(encoder):
        for name, param in encoder.named_parameters():
            local = param.to_local().detach()
            start, stop = engine._shard_rows(param)
            assert torch.equal(local, file[name][start:stop]), name

    check(engine.model.encoder)
    with LargeAllocations(min_bytes) as ending:
        end_state = engine.stage_end_state()
    following = build_refiner(cfg, load_weights=False, partitioned=True)
    with LargeAllocations(min_bytes) as handing:
        engine.hand_off(following)
        second = build_engine(following, cfg, "refine", ctx)
    check(second.model.encoder)
    assert building.peak == 1 and sharding.peak == 0 and handing.peak == 0, (building.peak, sharding.peak,
                                                                               handing.peak)
    if rank == 0:
        assert len(ending.created) == len(large)
        assert all(torch.equal(end_state[f"encoder.{k}"], file[k]) for k in meta.state_dict())
    else:
        assert end_state is None and not ending.created
    return True


def test_fsdp2_meta_build_fills_each_shard_from_the_file(gloo, tmp_path):
    """FSDP2: the encoder built on the meta device (with the plain build's random draws, so the heads are the
    plain build's), sharded, then each rank's shards read from the mapped file (its rows, bit for bit) with no
    full tensor; the stage end gathers to rank 0 only, and the next stage's engine gets the shards handed on."""
    weights = tmp_path / "mini.pth"
    write_mae_weights(weights, ["model.name=vit_mini_patch4"])
    assert gloo(_fsdp2_shards_are_file_rows, 2, str(weights))


def test_fsdp2_meta_build_equals_one_process(single_run, weights_file, tmp_path):
    """Through torchrun, both stages from the weights file: the meta-built, shard-filled FSDP2 run gives the
    1-process losses and end state, the heads stage leaves the loaded encoder unchanged, and the next stage
    starts from the handed-on shards."""
    launch("fsdp2", tmp_path, BOTH + [f"model.weights={weights_file}"], eval_samples=300)
    one, two = metrics(single_run), metrics(tmp_path)
    assert [m["stage"] for m in two] == ["heads"] * 3 + ["refine"] * 3
    a, b = torch.tensor([m["loss"] for m in one]), torch.tensor([m["loss"] for m in two])
    assert torch.allclose(a, b, rtol=1e-4), (a, b)
    file = {k: v for k, v in torch.load(weights_file, weights_only=True)["model"].items()
            if not k.startswith(("decoder", "mask"))}
    heads_end = model_state(tmp_path, "heads")
    assert all(torch.equal(heads_end[f"encoder.{k}"], v) for k, v in file.items())
    assert_same_weights(model_state(single_run, "refine"), model_state(tmp_path, "refine"),
                        sum(m["lr"] for m in one))
    before = [json.loads((run / "results.json").read_text())["before"] for run in (single_run, tmp_path)]
    assert before[0] == before[1]
