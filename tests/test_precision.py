"""The GPU precision path, on the CPU: bf16 autocast (CPU autocast) and bf16 engine copies of the weights.

- the fp32 islands (NNA loss, queue search, the heads' three BN variants) give exactly the fp32 result under
  bf16 autocast and with bf16 affine parameters, and their outputs are fp32;
- a dtype audit walks a real bf16 step on every engine (single; ZeRO-3, ZeRO-2 and FSDP2 on 2 gloo ranks) and
  fails on any bf16 tensor where fp32 is required, while checking that the encoder really ran in bf16;
- under ZeRO-3 bf16 the full state (what the stage hand-off, ``model_state.pt`` and the exports are made of)
  is the fp32 master for trainable parameters and the loaded fp32 values for frozen ones, bit for bit, and an
  export read back from disk equals it bit for bit;
- gradient accumulation: the accumulated gradient is the mean of the micro-batches' gradients computed by
  hand, exactly in one process and on 2 FSDP2 ranks.
"""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from scale_refiner.config import load_config
from scale_refiner.heads.async_bn import AsyncBatchNorm1d
from scale_refiner.heads.norms import FP32BatchNorm1d, GlobalBatchNorm1d
from scale_refiner.memory.queue import NNQueue
from scale_refiner.objective.nna import nna_loss

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16
TINY = ["model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2", "data.batch_size=16",
        "model.freeze_blocks=1", "engine.zero_config=ds_configs/cpu_demo.json", "stages.refine.topk=4"]


def cpu_autocast():
    return torch.autocast("cpu", dtype=BF16)


# ------------------------------------------------------------------------------------------- fp32 islands
def test_nna_loss_is_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    # bf16-representable values, so that the fp32 reference sees exactly what the bf16 call is given
    z, nn_z = (torch.randn(2, 8, 16, generator=g).to(BF16).float() for _ in range(2))
    p = torch.randn(4, 8, 16, generator=g).to(BF16).requires_grad_(True)  # what bf16 heads hand over
    want, _ = nna_loss(z, nn_z, p.float(), 0.2)
    with cpu_autocast():
        got, extra = nna_loss(z.to(BF16), nn_z.to(BF16), p, 0.2)
    assert got.dtype == torch.float32 and extra["positive_prob"].dtype == torch.float32
    assert torch.equal(got, want)  # the bf16 inputs are exactly representable: same fp32 computation
    got.backward()
    assert p.grad.dtype == BF16 and torch.isfinite(p.grad.float()).all()


def test_queue_search_is_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    queue = NNQueue(64, 16, seed=3)
    queue.enqueue(torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=-1), torch.arange(64))
    query = torch.nn.functional.normalize(torch.randn(2, 8, 16, generator=g), dim=-1)
    reference = copy.deepcopy(queue)
    want, want_info = reference.lookup(query, torch.arange(100, 108), 5)
    with cpu_autocast():
        got, info = queue.lookup(query, torch.arange(100, 108), 5)
    assert got.dtype == torch.float32 and info["similarity"].dtype == torch.float32
    assert torch.equal(got, want) and torch.equal(info["similarity"], want_info["similarity"])


@pytest.mark.parametrize("kind", [FP32BatchNorm1d, GlobalBatchNorm1d, AsyncBatchNorm1d])
def test_head_norms_run_in_fp32_with_bf16_weights(kind):
    """An engine's bf16 copy of the affine parameters and a bf16 input under autocast: the norm computes what
    fp32 computes on the same values, returns fp32 and keeps fp32 running statistics."""
    torch.manual_seed(0)
    norm = kind(6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6) + 0.5)
        norm.bias.copy_(torch.randn(6))
    reference = copy.deepcopy(norm)
    norm.weight.data, norm.bias.data = norm.weight.data.to(BF16), norm.bias.data.to(BF16)  # the engine's cast
    with torch.no_grad():
        reference.weight.copy_(norm.weight.float())
        reference.bias.copy_(norm.bias.float())
    for step in range(3):
        x = (torch.randn(10, 6) * 3 + step).to(BF16)
        want = reference(x.float())
        with cpu_autocast():
            got = norm(x.requires_grad_(True))
        assert got.dtype == torch.float32
        assert torch.equal(got, want), (kind.__name__, step, (got - want).abs().max())
        got.sum().backward()
        assert x.grad.dtype == BF16 and norm.weight.grad.dtype == BF16
    assert norm.running_mean.dtype == norm.running_var.dtype == torch.float32
    assert torch.equal(norm.running_mean, reference.running_mean)
    norm.eval(), reference.eval()
    with cpu_autocast():
        assert torch.equal(norm(x.detach()), reference(x.detach().float()))


# --------------------------------------------------------------------------------------- the dtype audit
def audit_bf16_step(engine, cfg, steps: int = 2):
    """Run ``steps`` bf16 steps of ``engine`` on a synthetic batch, recording the dtype of every tensor that must
    be fp32; returns the list of violations and the number of bf16 encoder matmul outputs seen."""
    from scale_refiner.bench.runner import synthetic_batch
    from scale_refiner.engine.ema import EncoderEMA
    from scale_refiner.refiner import refiner_inputs
    import scale_refiner.objective.nna as nna

    model, bad, bf16_linears = engine.model, [], []

    def need_fp32(what, t):
        if torch.is_tensor(t) and t.is_floating_point() and t.dtype != torch.float32:
            bad.append(f"{what}: {t.dtype}")

    def norm_hook(module, inputs, out, name):  # returns None: the output is left as it is
        need_fp32(f"{name} output", out)
        need_fp32(f"{name}.running_mean", module.running_mean)
        need_fp32(f"{name}.running_var", module.running_var)

    def linear_hook(module, inputs, out):
        bf16_linears.append(out.dtype == BF16)

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm1d):
            hooks.append(module.register_forward_hook(lambda m, i, o, name=name: norm_hook(m, i, o, name)))
        elif isinstance(module, nn.Linear) and name.startswith("encoder.blocks."):
            hooks.append(module.register_forward_hook(linear_hook))
    original_loss, original_lookups = nna._nna_loss_fp32, {}

    def checked_loss(z, nn_z, p, *args):
        for what, t in (("loss z", z), ("loss nn_z", nn_z), ("loss p", p)):
            need_fp32(what, t)
        loss, extra = original_loss(z, nn_z, p, *args)
        need_fp32("loss", loss)
        return loss, extra

    nna._nna_loss_fp32 = checked_loss
    for h, queue in enumerate(model.queues):
        original_lookups[h] = queue.lookup

        def lookup(*args, _orig=queue.lookup, _h=h, **kwargs):
            neighbours, info = _orig(*args, **kwargs)
            need_fp32(f"queue {_h} neighbours", neighbours)
            need_fp32(f"queue {_h} similarity", info["similarity"])
            need_fp32(f"queue {_h} storage", model.queues[_h].vectors)
            return neighbours, info
        queue.lookup = lookup
    try:
        ema = EncoderEMA(engine, 0.9)
        stage = cfg.stages.refine
        batch = synthetic_batch(cfg, cfg.data.batch_size // engine.ctx.world, engine.ctx.device, engine.ctx.rank)
        for step in range(steps):
            args, kwargs = refiner_inputs(batch, engine.ctx.device, stage, step)
            loss, _ = engine.forward(*args, **kwargs)
            need_fp32("step loss", loss)
            engine.backward(loss)
            engine.step(None)
            ema.update()
    finally:
        nna._nna_loss_fp32 = original_loss
        for h, queue in enumerate(model.queues):
            del queue.lookup
        for hook in hooks:
            hook.remove()
    for name, view in engine.local_views().items():
        need_fp32(f"master {name}", view)
    for name, shadow in ema.shadow.items():
        need_fp32(f"ema {name}", shadow)
    for name, value in engine.full_state().items():  # what the hand-off, model_state.pt and exports hold
        need_fp32(f"full state {name}", value)
    for name, buffer in model.named_buffers():
        need_fp32(f"buffer {name}", buffer)
    return bad, sum(bf16_linears), len(bf16_linears)


def _bf16_engine(kind, rank, world, extra=()):
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.trainer import build_engine
    from scale_refiner.refiner import build_refiner
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + [f"engine.kind={kind}", "engine.precision=bf16", *extra])
    torch.manual_seed(0)
    refiner = build_refiner(cfg)
    ctx = DistContext(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"))
    return build_engine(refiner, cfg, "refine", ctx), cfg


def test_dtype_audit_single_engine():
    engine, cfg = _bf16_engine("single", 0, 1, ["heads.norm=bn"])
    bad, bf16_matmuls, matmuls = audit_bf16_step(engine, cfg)
    assert not bad, bad
    assert matmuls and bf16_matmuls == matmuls  # the encoder did run in bf16: the audit is not vacuous


def _audit_rank(rank, world, kind, extra):
    engine, cfg = _bf16_engine(kind, rank, world, extra)
    bad, bf16_matmuls, matmuls = audit_bf16_step(engine, cfg)
    assert not bad, bad
    assert matmuls and bf16_matmuls == matmuls
    if kind == "deepspeed":
        assert engine.engine.communication_data_type == torch.float32  # gradients reduced in fp32
        # DeepSpeed's bf16 mode casts the parameters (the compute copies) to bf16: the audit saw through them
        assert all(p.dtype == BF16 for p in engine.model.parameters())
    return True


@pytest.mark.parametrize("kind, extra", [
    ("deepspeed", ["heads.norm=syncbn"]),
    ("deepspeed", ["heads.norm=async", "engine.zero_config=ds_configs/zero2.json"]),
    ("fsdp2", ["heads.norm=bn"]),
])
def test_dtype_audit_on_two_ranks(gloo, kind, extra):
    assert gloo(_audit_rank, 2, kind, extra)


# ------------------------------------------------------------------- fp32 master: hand-off and exports
def _export_equals_master(rank, world, out_dir):
    from deepspeed.utils import safe_get_full_fp32_param
    from scale_refiner.models.vit import vit_from_state
    from scale_refiner.models.weights import export_timm
    from scale_refiner.refiner import build_refiner
    engine, cfg = _bf16_engine("deepspeed", rank, world, ["heads.norm=syncbn"])
    torch.manual_seed(0)
    loaded = build_refiner(cfg).state_dict()  # the weights the run started from, fp32
    audit_bf16_step(engine, cfg, steps=3)
    state = engine.full_state()
    params = dict(engine.model.named_parameters())
    for name, param in params.items():
        if param.requires_grad:
            master = safe_get_full_fp32_param(param).view(state[name].shape).cpu()
            assert torch.equal(state[name], master), name
        else:  # frozen: the loaded fp32 values
            assert torch.equal(state[name], loaded[name]), name
    frozen = [n for n, p in params.items() if not p.requires_grad]
    trainable = [n for n, p in params.items() if p.requires_grad and n.startswith("encoder.")]
    assert frozen and trainable
    # ... which are not their bf16 rounding (LayerNorm's ones are bf16 values; the random weights are not)
    assert not all(torch.equal(loaded[n], loaded[n].to(BF16).float()) for n in frozen)
    # the masters are no bf16 values: the bf16 compute copy would not have given them
    assert not all(torch.equal(state[n], state[n].to(BF16).float()) for n in trainable)
    if rank == 0:
        encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        weights, _ = export_timm(vit_from_state(cfg.model, encoder), Path(out_dir), "online")
        from safetensors.torch import load_file
        exported = load_file(str(weights))
        assert exported.keys() == encoder.keys()
        assert all(torch.equal(exported[k], encoder[k]) for k in encoder)
    return True


def test_zero3_bf16_export_is_the_fp32_master_bit_for_bit(gloo, tmp_path):
    assert gloo(_export_equals_master, 2, str(tmp_path))


# ----------------------------------------------------------------------------------- gradient accumulation
def _micro_grads_by_hand(engine, cfg, batch, parts):
    """Each micro-batch's gradient, one at a time (backward, read, zero), averaged: the reference."""
    from scale_refiner.engine.trainer import micro_batches
    from scale_refiner.refiner import refiner_inputs
    total = None
    for index, micro in enumerate(micro_batches(batch, parts)):
        args, kwargs = refiner_inputs(micro, engine.ctx.device, cfg.stages.refine, 0, index)
        loss, _ = engine.forward(*args, **kwargs)
        engine.backward(loss)
        grads = {n: _full_grad(p) for n, p in engine.model.named_parameters() if p.grad is not None}
        engine.model.zero_grad(set_to_none=True)
        total = grads if total is None else {n: total[n] + grads[n] for n in total}
    return {n: g / parts for n, g in total.items()}


def _full_grad(p):
    g = p.grad
    return (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()


def _accumulated(engine, cfg, batch):
    from scale_refiner.engine.trainer import micro_batches
    from scale_refiner.refiner import refiner_inputs
    for index, micro in enumerate(micro_batches(batch, engine.accumulation)):
        args, kwargs = refiner_inputs(micro, engine.ctx.device, cfg.stages.refine, 0, index)
        loss, _ = engine.forward(*args, **kwargs)
        engine.backward(loss)
    return {n: _full_grad(p) for n, p in engine.model.named_parameters() if p.grad is not None}


def _accumulation_case(rank, world, kind, parts):
    from scale_refiner.bench.runner import synthetic_batch
    from scale_refiner.engine.distributed import DistContext
    from scale_refiner.engine.trainer import build_engine
    from scale_refiner.refiner import build_refiner
    per_rank = 16 // world
    base = TINY + [f"engine.kind={kind}", "heads.norm=bn", "engine.precision=fp32"]
    ctx = DistContext(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"))
    engines = []
    for micro in (per_rank, per_rank // parts):  # the hand reference (no accumulation), then accumulation
        cfg = load_config(ROOT / "configs/demo.yaml", base + [f"data.micro_batch_size={micro}"])
        torch.manual_seed(0)
        engines.append((build_engine(build_refiner(cfg), cfg, "refine", ctx), cfg))
    (reference, cfg_ref), (accumulating, cfg_acc) = engines
    assert reference.accumulation == 1 and accumulating.accumulation == parts
    batch = synthetic_batch(cfg_acc, per_rank, ctx.device, rank)
    want = _micro_grads_by_hand(reference, cfg_ref, batch, parts)
    got = _accumulated(accumulating, cfg_acc, batch)
    assert want.keys() == got.keys() and len(got) > 10
    for name in want:
        # a power-of-two number of micro-batches: scaling by 1/parts is exact, so the sums agree exactly
        assert torch.equal(got[name], want[name]), (name, (got[name] - want[name]).abs().max())
    # the queues took every micro-batch in turn, in both
    assert torch.equal(reference.model.queues[0].vectors, accumulating.model.queues[0].vectors)
    return True


def test_accumulated_gradient_is_the_mean_of_micro_batch_gradients():
    assert _accumulation_case(0, 1, "single", 4)


def test_accumulated_gradient_on_two_fsdp2_ranks(gloo):
    assert gloo(_accumulation_case, 2, "fsdp2", 2)
