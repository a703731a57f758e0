"""Hybrid sharding and the replicated frozen prefix, on real gloo CPU ranks.

- FSDP2 on a 2-D mesh (``engine.fsdp_replicate=2``, 4 ranks as 2 "nodes" x 2): each rank holds 1/2 of every
  parameter, gathers only within its node, trains like one process, resumes bit for bit;
- DeepSpeed ZeRO++ hierarchical partitioning (``zero_hpz_partition_size=2`` on 4 ranks): the secondary partition
  holds 1/2 of every parameter, the forward's gathers stay in the node, the losses are plain ZeRO-3's;
- the frozen prefix held whole in the compute dtype (``engine.replicate_frozen``, 2 ranks): same losses as the
  sharded run, frozen weights unchanged, fewer bytes all-gathered, checkpoints restore it;
- the config refuses what cannot work, naming the key.

Each scenario is one launch of its ranks (starting 4 ranks costs ~20 s here); the launcher-level runs (torchrun,
deepspeed) are in tests/test_hybrid_launchers.py.
"""
import functools
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from scale_refiner.config import ConfigError, load_config, validate
from scale_refiner.engine.distributed import DistContext
from scale_refiner.engine.fsdp import FSDPEngine
from scale_refiner.engine.optim import param_groups
from scale_refiner.engine.single import SingleEngine
from scale_refiner.refiner import build_refiner
from test_fsdp import CPU, EQUIV_EPS, RTOL, TINY, batches, compare_states, make_engine, train_step

ROOT = Path(__file__).resolve().parents[1]


def build(cls, rank, world, dtype=torch.float32, seed=0, overrides=()):
    """test_fsdp's ``make_engine`` (the tiny refiner, refine stage, 1 frozen block, Adam eps ``EQUIV_EPS``) with
    a compute dtype."""
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + list(overrides))
    torch.manual_seed(seed)
    refiner = build_refiner(cfg)
    refiner.set_stage("refine", 1)
    refiner.train()
    stage = cfg.stages.refine
    groups = param_groups(refiner.encoder, refiner.heads, refiner.encoder.depth, stage.weight_decay,
                          stage.head_weight_decay, stage.layer_decay)
    for group in groups:
        group["eps"] = EQUIV_EPS
    return cls(refiner, groups, stage.betas, DistContext(rank, world, 0, CPU), dtype)


# --------------------------------------------------------------------------------------- counting collectives
class Collectives:
    """Every collective made through ``torch.distributed`` (and DeepSpeed's captured all-gather) while active:
    per name, the calls and the bytes this rank put in, and the size of the group each went over.

    bench/collectives.py's ``CollectiveCounter`` wraps a fixed list that lacks ``all_gather_single`` and
    ``reduce_scatter_single``, which FSDP2 calls on torch 2.14; and DeepSpeed calls the all-gather function it
    captured from torch when it started, which no wrapper of the module sees: both are wrapped here."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_single",
             "reduce_scatter_tensor", "all_reduce", "broadcast")

    def __init__(self):
        self.calls, self.bytes, self.groups = defaultdict(int), defaultdict(int), defaultdict(set)
        self._saved = []

    def _wrap(self, name, fn):
        sends_first = name in ("all_reduce", "broadcast")  # the others: (output, input, ...)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            position, keys = (0, ("tensor",)) if sends_first else (1, ("input_tensor", "input", "tensor"))
            tensor = args[position] if len(args) > position else next((kwargs[k] for k in keys if k in kwargs), None)
            group = kwargs.get("group", next((a for a in args if isinstance(a, dist.ProcessGroup)), None))
            self.calls[name] += 1
            self.bytes[name] += tensor.numel() * tensor.element_size() if torch.is_tensor(tensor) else 0
            self.groups[name].add(dist.get_world_size(group))
            return fn(*args, **kwargs)
        return counted

    def __enter__(self):
        for name in self.NAMES:
            if hasattr(dist, name):
                self._saved.append((dist, name, getattr(dist, name)))
                setattr(dist, name, self._wrap(name, getattr(dist, name)))
        try:  # DeepSpeed's backend holds torch's all-gather as it found it at start
            from deepspeed.comm import comm as ds_comm
            if ds_comm.cdb is not None and getattr(ds_comm.cdb, "all_gather_function", None) is not None:
                self._saved.append((ds_comm.cdb, "all_gather_function", ds_comm.cdb.all_gather_function))
                ds_comm.cdb.all_gather_function = self._wrap("all_gather_into_tensor",
                                                             ds_comm.cdb.all_gather_function)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        return False

    @property
    def gathered_bytes(self) -> int:
        return sum(v for k, v in self.bytes.items() if k.startswith("all_gather"))

    @property
    def gathers(self) -> int:
        return sum(v for k, v in self.calls.items() if k.startswith("all_gather"))


# bf16: the replicated prefix holds the same bf16 values FSDP2's bf16 all-gather delivers, so the losses agree to
# the run-to-run noise of the CPU kernels; measured here (2 gloo ranks, 3 steps): bit-identical losses (gap 0).
BF16_REPLICATED_RTOL = 1e-5


def counted_step(engine, batch, step, rank, world):
    with Collectives() as counts:
        loss, _ = train_step(engine, batch, step, rank, world)
    return loss, counts


def engine_kind(replicate=1, replicate_frozen=False):
    """FSDPEngine with the hybrid options, in the shape ``make_engine`` builds engines."""
    return functools.partial(FSDPEngine, replicate=replicate, replicate_frozen=replicate_frozen)


# ------------------------------------------------------------------------- 1. FSDP2 on a 2 x 2 mesh (HSDP)
def _hsdp(rank, world, expected_losses, expected_state, directory):
    engine = make_engine(engine_kind(replicate=2), rank, world, eps=EQUIV_EPS)
    assert tuple(engine.mesh.shape) == (2, 2) and engine.mesh.mesh_dim_names == ("dp_replicate", "dp_shard")
    assert engine.shard_size == 2 and engine.shard_rank == rank % 2  # ranks 0,1 one "node", 2,3 the other
    # each rank holds its node's half of every parameter (rows ceil(n / 2)), not a quarter
    held = total = 0
    for name, param in engine.model.named_parameters():
        assert isinstance(param, DTensor) and tuple(param.placements) == (Replicate(), Shard(0)), name
        rows = param.shape[0]
        expected_rows = min(-(-rows // 2), rows - min(rank % 2 * -(-rows // 2), rows))
        assert param.to_local().shape[0] == expected_rows, (name, param.to_local().shape, param.shape)
        held += param.to_local().numel()
        total += param.numel()
    # the two ranks of a node hold the model once between them, the four ranks twice
    in_node, in_world = torch.tensor([held]), torch.tensor([held])
    dist.all_reduce(in_node, group=engine.shard_group)
    dist.all_reduce(in_world)
    assert in_node.item() == total and in_world.item() == 2 * total, (held, total)
    qkv = engine.model.encoder.blocks[1].attn.qkv.weight
    assert tuple(qkv.to_local().shape) == (qkv.shape[0] // 2, qkv.shape[1])

    data = batches(3)
    losses = []
    for step, batch in enumerate(data):
        if step == 1:
            loss, counts = counted_step(engine, batch, step, rank, world)
            # parameters gathered and gradients reduce-scattered within the node (groups of 2); only the
            # gradients' all-reduce over the 2 replicas (and the method's own collectives) cross it
            assert counts.groups["all_gather_single"] == {2}, dict(counts.groups)
            assert counts.groups["reduce_scatter_single"] == {2}, dict(counts.groups)
            assert counts.calls["all_reduce"] > 0
        else:
            loss = train_step(engine, batch, step, rank, world)[0]
        losses.append(loss)
        if step == 1:
            engine.save(directory)
    for step, (got, want) in enumerate(zip(losses, expected_losses)):
        assert abs(got - want) <= RTOL * abs(want), (step, losses, expected_losses)
    compare_states(engine.full_state(), expected_state)

    # resume under the same mesh: bit-identical (weights, optimiser, queues)
    resumed = make_engine(engine_kind(replicate=2), rank, world, seed=1, overrides=["run.seed=7"], eps=EQUIV_EPS)
    resumed.load(directory)
    assert train_step(resumed, data[2], 2, rank, world)[0] == losses[2]
    compare_states(resumed.full_state(), engine.full_state(), exact=True)
    # and, DCP resharding the 2 x 2 checkpoint, under the plain 1-D mesh of 4 (1/4 each): the same step
    plain = make_engine(FSDPEngine, rank, world, seed=1, overrides=["run.seed=7"], eps=EQUIV_EPS)
    plain.load(directory)
    assert plain.param_groups[0]["params"][0].to_local().numel() * 4 >= \
        plain.param_groups[0]["params"][0].numel()
    assert abs(train_step(plain, data[2], 2, rank, world)[0] - losses[2]) <= RTOL * abs(losses[2])
    compare_states(plain.full_state(), engine.full_state())
    return losses


def test_fsdp2_on_a_2x2_mesh_shards_in_the_node_and_equals_one_process(gloo, tmp_path):
    engine = make_engine(SingleEngine, eps=EQUIV_EPS)
    losses = [train_step(engine, b, s)[0] for s, b in enumerate(batches(3))]
    got = gloo(_hsdp, 4, losses, engine.full_state(), str(tmp_path / "ckpt"))
    assert len(got) == 3
    assert (tmp_path / "ckpt/.metadata").is_file()


# ---------------------------------------------------------------- 2. the frozen prefix replicated under FSDP2
def _replicated_prefix(rank, world, directory, precision):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    data = batches(3)
    runs = {}
    for replicate_frozen in (False, True):
        engine = build(engine_kind(replicate_frozen=replicate_frozen), rank, world, dtype)
        before = engine.full_state()
        losses, counts = [], None
        for step, batch in enumerate(data):
            if step == 1:
                loss, counts = counted_step(engine, batch, step, rank, world)
            else:
                loss = train_step(engine, batch, step, rank, world)[0]
            losses.append(loss)
        after = engine.full_state()
        runs[replicate_frozen] = dict(losses=losses, counts=counts, before=before, after=after, engine=engine)
    sharded, replicated = runs[False], runs[True]
    engine = replicated["engine"]
    frozen = [k for k in replicated["before"] if k.startswith(("encoder.patch_embed", "encoder.cls_token",
                                                               "encoder.pos_embed", "encoder.blocks.0."))]
    assert frozen and set(engine._replicated) == set(frozen)
    # held whole, in the compute dtype, not sharded and not in the optimiser
    for key in frozen:
        param = engine._replicated[key]
        assert not isinstance(param, DTensor) and param.dtype == dtype, key
    assert not {id(p) for p in engine._replicated.values()} & {id(p) for p in engine.trainable}
    # frozen values unchanged by training, exact fp32 (also under bf16: from the fp32 rows kept on the host)
    for key in frozen:
        assert replicated["after"][key].dtype == torch.float32
        assert torch.equal(replicated["after"][key], replicated["before"][key]), key
        assert torch.equal(replicated["after"][key], sharded["before"][key]), key
    out = dict(sharded=sharded["losses"], replicated=replicated["losses"],
               gathered=(sharded["counts"].gathered_bytes, replicated["counts"].gathered_bytes),
               gathers=(sharded["counts"].gathers, replicated["counts"].gathers))
    if dtype == torch.float32:
        for a, b in zip(sharded["losses"], replicated["losses"]):
            assert abs(a - b) <= 1e-5 * abs(a), (sharded["losses"], replicated["losses"])
        compare_states(replicated["after"], sharded["after"])
    # checkpoint: frozen_params.pt (fp32) beside DCP's files; a fresh engine (other seed) resumes bit for bit
    engine.save(directory)
    fresh = build(engine_kind(replicate_frozen=True), rank, world, dtype, seed=1, overrides=["run.seed=7"])
    fresh.load(directory)
    compare_states(fresh.full_state(), engine.full_state(), exact=True)
    for key in frozen:
        assert torch.equal(fresh._replicated[key], engine._replicated[key]), key
    assert train_step(fresh, data[0], 3, rank, world)[0] == train_step(engine, data[0], 3, rank, world)[0]
    # a checkpoint written with the option on is refused with it off, naming the key
    other = build(FSDPEngine, rank, world, dtype)
    with pytest.raises(Exception, match="engine.replicate_frozen"):
        other.load(directory)
    return out


def test_replicated_frozen_prefix_fsdp2_fp32(gloo, tmp_path):
    out = gloo(_replicated_prefix, 2, str(tmp_path / "ckpt"), "fp32")
    assert (tmp_path / "ckpt/frozen_params.pt").is_file()
    sharded, replicated = out["gathered"]
    # fewer all-gathers (block 0 is no FSDP unit any more) and fewer bytes: the frozen prefix's shards
    assert out["gathers"][1] < out["gathers"][0] and replicated < sharded, out
    print("fsdp2 fp32 replicate_frozen:", out)


def test_replicated_frozen_prefix_fsdp2_bf16(gloo, tmp_path):
    out = gloo(_replicated_prefix, 2, str(tmp_path / "ckpt"), "bf16")
    print("fsdp2 bf16 replicate_frozen:", out)
    # Sharded, FSDP2 gathers the frozen prefix in bf16 (MixedPrecisionPolicy(param_dtype)) on every step; replicated,
    # it was cast to bf16 once: the same rounding of the same fp32 values, so the same products.
    gaps = [abs(a - b) / abs(a) for a, b in zip(out["sharded"], out["replicated"])]
    assert max(gaps) <= BF16_REPLICATED_RTOL, (gaps, out)
    assert out["gathered"][1] < out["gathered"][0], out


# ------------------------------------------------------------------------------------------ 3. the config
@pytest.mark.parametrize("overrides, world, message", [
    (["engine.kind=fsdp2", "engine.fsdp_replicate=3"], 4, "3 replica groups do not divide the world size 4"),
    (["engine.kind=fsdp2", "engine.fsdp_replicate=0"], 4, "must be >= 1"),
    (["engine.kind=deepspeed", "engine.fsdp_replicate=2"], 4, "needs engine.kind=fsdp2"),
    (["engine.kind=single", "engine.replicate_frozen=true"], 1, "needs engine.kind=fsdp2"),
    (["engine.kind=deepspeed", "engine.replicate_frozen=true"], 2, "ZeRO-3 cannot leave the frozen prefix out"),
])
def test_hybrid_keys_are_validated_naming_the_key(overrides, world, message):
    key = overrides[-1].split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}'.*{message}"):  # at load, or with the world size at start
        validate(load_config(ROOT / "configs/demo.yaml", TINY + ["data.batch_size=16"] + overrides), world_size=world)


def test_hybrid_keys_accept_a_divisor_of_the_world():
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + ["data.batch_size=16", "engine.kind=fsdp2",
                                                          "engine.fsdp_replicate=2", "engine.replicate_frozen=true"])
    validate(cfg, world_size=4)


# -------------------------------------------------------------------- 4. DeepSpeed ZeRO++ hierarchical partitions
ZERO_TINY = TINY + ["data.batch_size=16", "model.freeze_blocks=1", "engine.kind=deepspeed"]


def _zero_run(rank, world, ds_json, overrides=(), steps=3, count_step=1, dtype_name="fp32"):
    """The tiny refiner built partitioned under ZeRO-3 (as the main job builds it) from ``ds_json``, ``steps``
    steps of 16 samples; returns the engine, the mean losses and the collectives of step ``count_step``."""
    from scale_refiner.engine.trainer import build_engine
    cfg = load_config(ROOT / "configs/demo.yaml", ZERO_TINY + [f"engine.zero_config={ds_json}",
                                                               f"engine.precision={dtype_name}"] + list(overrides))
    torch.manual_seed(0)
    refiner = build_refiner(cfg, partitioned=True)
    engine = build_engine(refiner, cfg, "refine", DistContext(rank, world, rank, CPU))
    g = torch.Generator().manual_seed(1)
    n = 16 // world
    losses, counts = [], None
    for step in range(steps):
        crops = torch.randn(2, 16, 3, 32, 32, generator=g), torch.randn(2, 16, 3, 16, 16, generator=g)
        part = slice(n * rank, n * rank + n)
        with Collectives() as counted:
            engine.set_lr(1e-3)
            loss, _ = engine.forward(crops[0][:, part], crops[1][:, part], torch.arange(n) + n * rank + 16 * step,
                                     torch.zeros(n, dtype=torch.long), topk=4, step=step)
            engine.backward(loss)
            if step == count_step:  # after the backward: the step's update invalidates hpZ's secondary copies
                qkv = engine._params["encoder.blocks.1.attn.qkv.weight"]
                secondary = getattr(qkv, "ds_secondary_tensor", None)
                engine.secondary_numel = None if secondary is None else secondary.numel()
            engine.step(None)
        if step == count_step:
            counts = counted
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    return engine, losses, counts


def _hpz(rank, world, plain_json, hpz_json):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    plain, plain_losses, plain_counts = _zero_run(rank, world, plain_json)
    plain_state = plain.full_state()
    plain.close()
    engine, losses, counts = _zero_run(rank, world, hpz_json)
    qkv = engine._params["encoder.blocks.1.attn.qkv.weight"]
    # primary partition 1/4 (over the world), secondary 1/2 (over the node's 2 ranks)
    assert qkv.ds_tensor.numel() * 4 == qkv.ds_numel
    assert engine.secondary_numel is not None and engine.secondary_numel * 2 == qkv.ds_numel
    assert plain.secondary_numel is None
    for a, b in zip(plain_losses, losses):
        assert abs(a - b) <= 1e-4 * abs(a), (plain_losses, losses)
    state = engine.full_state()
    for key, value in plain_state.items():
        if torch.is_tensor(value) and value.is_floating_point():
            assert torch.allclose(state[key], value, rtol=1e-5, atol=5e-6), key
    return dict(plain=plain_losses, hpz=losses,
                groups=(sorted(plain_counts.groups["all_gather_into_tensor"]),
                        sorted(counts.groups["all_gather_into_tensor"])),
                gathered=(plain_counts.gathered_bytes, counts.gathered_bytes))


def test_zero3_hpz_on_a_2x2_layout_keeps_the_losses_and_gathers_in_the_node(gloo, tmp_path):
    import json
    config = json.loads((ROOT / "ds_configs/cpu_demo.json").read_text())
    (tmp_path / "plain.json").write_text(json.dumps(config))
    config["zero_optimization"]["zero_hpz_partition_size"] = 2  # 2 "nodes" of 2 ranks
    (tmp_path / "hpz.json").write_text(json.dumps(config))
    out = gloo(_hpz, 4, str(tmp_path / "plain.json"), str(tmp_path / "hpz.json"))
    print("zero3 hpz:", out)
    plain_groups, hpz_groups = out["groups"]
    assert plain_groups == [4]  # plain ZeRO-3 gathers over all 4 ranks
    assert hpz_groups == [2, 4]  # hpZ: the backward's re-gathers within the node (its secondary partitions)


# ----------------------------------------------------------------------------------------------- 5. the planner
def test_planner_enumerates_and_models_the_hybrid_settings():
    from dataclasses import replace
    from scale_refiner.plan.counts import meta_refiner, model_counts
    from scale_refiner.plan.memory import predict_memory
    from scale_refiner.plan.settings import Setting, ZeroOptions, all_settings
    from scale_refiner.plan.timing import collectives

    one_node = {s.label for s in all_settings(8, ROOT, gpus_per_node=8)}
    two_nodes = {s.label for s in all_settings(16, ROOT, gpus_per_node=8)}
    assert not any("HSDP" in s or "hpz" in s for s in one_node)  # inside one node: nothing to be hybrid over
    assert "fsdp2 HSDP 2x, checkpointing on" in two_nodes
    assert "fsdp2 HSDP 2x, frozen prefix replicated, checkpointing on" in two_nodes
    assert "zero3 (zero3_hpz.json), checkpointing on" in two_nodes
    assert "fsdp2, frozen prefix replicated, checkpointing on" in one_node

    cfg = load_config(ROOT / "configs/mae_l16.yaml", ["model.freeze_blocks=6", "data.batch_size=256"])
    counts = model_counts(cfg, "refine", meta_refiner(cfg))
    P, T, F, W, c = counts.total_params, counts.trainable, counts.frozen, 16, 2
    assert F > 0

    def memory(setting):
        return predict_memory(cfg, counts, setting, W, 16, c).state

    fsdp2 = Setting("fsdp2", True)
    assert memory(fsdp2)["weights (fp32 shards)"] == 4 * P / 16
    assert memory(replace(fsdp2, replicate=2))["weights (fp32 shards)"] == 4 * P / 8  # a node's 8 ranks
    whole = memory(replace(fsdp2, replicate_frozen=True))
    assert whole["frozen prefix, whole (bf16)"] == 2 * F and whole["weights (fp32 shards)"] == 4 * (P - F) / 16
    hpz = ZeroOptions.from_json(str(ROOT / "ds_configs/zero3_hpz.json"))
    assert hpz.hpz == 8
    assert memory(Setting("deepspeed", True, hpz))["hpZ secondary partitions (1 / ranks a node)"] == 2 * P / 8

    def colls(setting):
        return collectives(cfg, counts, setting, W, 16, c)

    plain = colls(fsdp2)
    assert "all-gather, forward: frozen parameters (every micro-batch)" in plain
    assert all(col.intra_node is None for col in plain.values())  # the world's ring, across nodes
    frozen_whole = colls(replace(fsdp2, replicate_frozen=True))
    assert "all-gather, forward: frozen parameters (every micro-batch)" not in frozen_whole
    hsdp = colls(replace(fsdp2, replicate=2))
    gathers = [col for name, col in hsdp.items() if name.startswith(("all-gather", "reduce-scatter"))]
    assert gathers and all(col.intra_node for col in gathers)  # NVLink
    across = hsdp["all-reduce across nodes: gradient shards (HSDP)"]
    assert across.intra_node is False and across.full_bytes == 4 * T / 8  # fp32 gradient shards of a node rank
    zero_hpz = colls(Setting("deepspeed", True, hpz))
    assert zero_hpz["all-gather, backward: trained parameters"].intra_node is True
    assert zero_hpz["all-gather, forward: trained parameters"].intra_node is None
