"""Predicted peak memory per GPU of one training step, broken down.

Everything is bytes on one rank, in the steady state (after the first step: the optimiser's moments exist).
``peak_allocated`` is the twin of ``torch.cuda.max_memory_allocated`` (what torch's allocator hands out, the
number ``measure`` checks on the CPU); ``total`` adds what the allocator does not count or cannot use (the
allowances) and is what must fit in the GPU.

State, by engine (P all parameters, T trainable, E the trainable encoder, W ranks, c the compute dtype's bytes:
2 for bf16, 4 for fp32):

- single process: the model stays fp32 (4 P); under bf16 autocast keeps a bf16 copy of every trainable weight from
  its first use in the forward to the end of the backward (2 T, an upper bound: norms and biases are not cast);
  gradients fp32 (4 T), created during the backward; AdamW moments 8 T (fused on a GPU: no temporaries).
- ZeRO-3 (DeepSpeed): c-byte partitions of every parameter, frozen ones too (c P / W; a parameter under
  ``stage3_param_persistence_threshold`` elements is held whole on every rank); fp32 master 4 T / W; moments
  8 T / W; the gradient partitions in the compute dtype, allocated at start (c T / W); one fp32 buffer of the
  largest optimiser group's partition for the step; at the step, the foreach AdamW's square-root temporary
  (4 T / W) on a GPU; the contiguous-gradient bucket of ``reduce_bucket_size``
  elements in the reduce dtype; the gathered parameters of the running block plus what the prefetch bucket
  holds; a block's full gradients (compute dtype) while they wait in the bucket. The frozen parameters' fp32
  values live on the host (engine/zero.py), not on the GPU.
- ZeRO-2: full c-byte parameters (c P); master 4 T / W; moments 8 T / W; gradient partitions c T / W plus their
  fp32 copy at the step (4 T / W); two reduce buckets (``overlap_comm``) of ``reduce_bucket_size`` in the
  compute dtype; the gather bucket at the step.
- FSDP2: fp32 shards of every parameter (4 P / W) and of the gradients (4 T / W); moments 8 T / W; on a GPU the
  foreach AdamW's square-root temporary (4 T / W); gathered: the running block and the one prefetched (c each),
  in the backward also the block's unsharded gradients (c) and their cast to the reduce dtype.
- EMA: fp32 copy of the trainable encoder's local storage (4 E, / W when sharded); refine stage only.
- queues and head-norm statistics: the buffers' bytes as built (replicated; a sharded queue 1 / W).

Activations, per micro-batch of B samples of S tokens (all crops; d width, h attention heads, r MLP ratio):

- the residual stream (a block's input and output, the mid-block residual) is ``a`` bytes a value: fp32 (4) on
  the single engine under autocast, whose parameters stay fp32 (the fp32 position embedding promotes the patch
  embedding's bf16 output, and each residual add keeps fp32); the compute dtype (``a = c``) on DeepSpeed and FSDP2,
  which hand the model compute-dtype parameters (bf16 mode, ``param_dtype``), so the position embedding and
  every add are bf16 (checked per engine by tests/test_planner.py; a ViT-2B/14 FSDP2 prediction that took
  fp32 was 22 % over on an H200, 11 GiB of checkpointed block inputs).
- a trained block saves, per token: its input and the mid-block residual (``a`` each), the two LayerNorm outputs
  cast for the next matmul, q/k/v, the attention output (SDPA writes it token-major, so the projection's input
  is a view of it, no copy), the MLP's fc1 output and GELU output: ``d (2 a + (5 + 2 r) c) + 4 h`` bytes (the last
  term the attention's log-sum-exp). bf16 on the single engine: 36 d; bf16 sharded: 32 d; fp32: 64 d.
- with non-reentrant checkpointing a trained block saves only its input (a d per token), and its backward
  recomputes the block: its activations but the input (already saved), one block at a time, on top.
  ``model.checkpointing=N`` checkpoints the first N trained blocks, the rest save everything; the backward
  reaches the checkpointed ones last, when the others' activations are freed.
- selective checkpointing (``model.checkpointing=selective``): a trained block saves its input (a d) and the
  outputs of its matmuls and attention: q/k/v (3 c d), the attention output (c d) and log-sum-exp (4 h), the
  projection's output (c d), fc1's (r c d) and fc2's (c d): ``d (a + (6 + r) c) + 4 h`` per token (bf16 single
  24 d, fp32 44 d). Its backward recomputes the pointwise outputs it needs: both LayerNorm outputs (c d each), the
  mid-block residual (a d) and GELU's output (r c d), ``d (a + (2 + r) c)``, one block at a time.
- frozen blocks run under no_grad and save nothing; the last block's output stays alive until the loss; a tapped
  block that is frozen keeps its whole output alive (the tap is a view of it), so the heads stage keeps every
  tapped block's output.
- the backward of one block adds about one hidden-width gradient, r c d per token (the saved tensors it consumes
  are freed as it goes).
- ID heads: per crop and head, each linear's input (c), each BatchNorm's fp32 input and each GELU's input (fp32,
  the norms are fp32 islands), the outputs z and p.
- the NNA loss keeps its fp32 logits and softmax per head: 2 x (2 + L) B x W B; a queue lookup's similarity
  matrix (2 B x queue size, fp32) is alive during the forward.
- the micro-batch's crops (fp32) on the device (the trainer copies one micro-batch at a time).

Allowances (GPU only, in ``total``): the data pipeline (DALI's prefetched output batches on the GPU: 2 batches
of the rank's crops, fp32, plus 0.5 GB of decoder scratch), the CUDA context and NCCL buffers (1.0 GB) and a
fragmentation margin of the caching allocator (10 % of the allocated peak).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

from scale_refiner.engine.optim import resolve_optimizer_impl
from scale_refiner.models.vit import checkpointing_plan
from scale_refiner.plan.counts import ModelCounts
from scale_refiner.plan.settings import Setting

GB = 1e9
FRAGMENTATION = 0.10        # caching allocator: reserved over allocated at the peak
RUNTIME_BYTES = 1.0 * GB    # CUDA context, cuBLAS workspaces, NCCL's buffers: outside torch's allocator
DALI_PREFETCH = 2           # data.dali_pipeline's prefetch_queue_depth
DALI_SCRATCH = 0.5 * GB     # nvJPEG / resize scratch of the mixed decoder


@dataclass
class Crops:
    """Crop sizes of one sample: [(size, count, tokens)], from the recipe's augment section."""
    specs: List[Tuple[int, int, int]]
    in_chans: int = 3

    @classmethod
    def of(cls, cfg, patch: int) -> "Crops":
        a = cfg.augment
        specs = [(a.global_size, 2, (a.global_size // patch) ** 2 + 1)]
        if a.num_local:
            specs.append((a.local_size, a.num_local, (a.local_size // patch) ** 2 + 1))
        return cls(specs, cfg.model.in_chans)

    @property
    def tokens(self) -> int:
        return sum(count * tokens for _, count, tokens in self.specs)

    @property
    def count(self) -> int:
        return sum(count for _, count, _ in self.specs)

    @property
    def pixel_bytes(self) -> int:
        """One sample's crops as fp32 tensors."""
        return 4 * self.in_chans * sum(count * size * size for size, count, _ in self.specs)


def _saved_by_kind(blocks: List[Tuple[str, float, float]], alive: int) -> Dict[str, float]:
    """The saved tensors of the first ``alive`` trained blocks, summed by kind, labelled for the breakdown."""
    names = {"saved": "saved activations", "checkpointed": "checkpointed block inputs",
             "selective": "selective blocks' saved matmul and attention outputs"}
    out: Dict[str, float] = {}
    for kind in ("saved", "checkpointed", "selective"):
        mine = [b for b in blocks[:alive] if b[0] == kind]
        if mine:
            total = sum(1 for b in blocks if b[0] == kind)
            of = f"{len(mine)} of {total} blocks alive" if alive < len(blocks) else f"{total} blocks"
            out[f"{names[kind]} ({of})"] = sum(b[1] for b in mine)
    return out


def residual_bytes(c: int, residual_dtype: str = "compute") -> int:
    """Bytes of one residual-stream value on every engine: the compute dtype's (``model.residual_dtype=compute``,
    the model casts the stream after the position embedding) or fp32's."""
    return 4 if residual_dtype == "fp32" else c


def block_saved_per_token(c: int, d: int, h: int, r: float, a: int) -> float:
    """Bytes one trained (not checkpointed) block saves for its backward, per token (see the module's text);
    ``a``: the residual stream's bytes (``residual_bytes``)."""
    return d * (a + c + 3 * c + c + a + c + 2 * r * c) + 4 * h


def block_selective_saved_per_token(c: int, d: int, h: int, r: float, a: int) -> float:
    """Bytes a selectively checkpointed block saves per token: its input (the residual), the matmul outputs
    (q/k/v, projection, fc1, fc2) and the attention's output and log-sum-exp (see the module's text)."""
    return d * (a + (3 + 1 + 1 + r + 1) * c) + 4 * h


def block_selective_recomputed_per_token(c: int, d: int, r: float, a: int) -> float:
    """What a selective block's backward recomputes and holds, per token: both LayerNorm outputs, the
    mid-block residual and GELU's output."""
    return d * (a + (2 + r) * c)


def block_backward_per_token(c: int, d: int, r: float) -> float:
    """What one block's backward adds at its worst, per token: a hidden-width (r d) gradient in the compute
    dtype; the saved tensors it consumes are freed as it goes, which offsets the gradients of the input and the
    output (measured on the CPU: 14 d for fp32, where this gives 16 d)."""
    return d * r * c


def head_saved_per_crop(c: int, in_dim: int, hidden: int, out: int, pred_hidden: int) -> float:
    """One ID head, one crop: the projector (in -> H -> H -> o) and predictor (o -> H' -> o), see heads/id_head."""
    def layer(d_in, d_out, gelu):
        return c * d_in + 4 * d_out + (4 * d_out if gelu else 0)
    return (layer(in_dim, hidden, True) + layer(hidden, hidden, True) + layer(hidden, out, False)
            + layer(out, pred_hidden, True) + layer(pred_hidden, out, False) + 4 * out)


@dataclass
class MemoryPrediction:
    setting: str
    stage: str
    world: int
    micro_batch: int
    per_rank_batch: int
    compute_bytes: int
    state: Dict[str, float] = field(default_factory=dict)        # alive the whole step
    activations: Dict[str, float] = field(default_factory=dict)  # at the peak
    per_sample: Dict[str, float] = field(default_factory=dict)   # activation bytes per sample, for reference
    peak_phase: str = ""
    peak_allocated: float = 0.0
    allowances: Dict[str, float] = field(default_factory=dict)
    total: float = 0.0

    def as_dict(self) -> Dict:
        return asdict(self)


def predict_memory(cfg, counts: ModelCounts, setting: Setting, world: int, micro_batch: int,
                   compute_bytes: int = 2, on_gpu: bool = True) -> MemoryPrediction:
    """Peak memory of one rank running ``counts.stage`` with ``setting`` at ``micro_batch`` samples."""
    c = compute_bytes
    W = world
    d, h, r = counts.dim, counts.num_heads, counts.mlp_ratio
    P, T, E = counts.total_params, counts.trainable, counts.trainable_encoder
    kind = setting.kind
    zero = setting.zero
    per_rank = cfg.data.batch_size // W
    B = micro_batch
    refine = counts.stage == "refine"
    crops = Crops.of(cfg, counts.patch)
    S = crops.tokens
    trained_blocks = counts.depth - counts.frozen_blocks if refine else 0
    policy, checkpointed = checkpointing_plan(setting.checkpointing, trained_blocks)
    reduce_bytes = 4 if (c == 4 or cfg.engine.reduce_dtype == "fp32") else 2
    block = counts.block_params
    kernel = resolve_optimizer_impl(setting.optimizer_impl, on_gpu)  # as the engines resolve it

    def step_temporaries(moments: float, largest: float) -> float:
        """What AdamW allocates for itself: nothing fused; foreach, a square-root temporary of every moment
        (``moments`` bytes of this rank's second moments); the per-tensor loop (``loop``, or torch's default on
        the CPU), about two temporaries of the largest tensor it steps (``largest`` bytes)."""
        return {"fused": 0.0, "foreach": moments}.get(kernel, 2 * largest)

    st: Dict[str, float] = {}
    shard_world = W  # the ranks a parameter is sharded over (FSDP2 HSDP: a node's)
    grads_total = 0.0            # gradients alive after the backward
    grads_grow = False           # True: created block by block in the backward (single, FSDP2)
    block_grad_transient = 0.0   # a block's full gradients before they are reduced (sharded engines)
    gathered = 0.0               # full parameters gathered for the running block(s)
    step_transient = 0.0         # what the optimiser step allocates for itself
    if kind == "single":
        st["weights (fp32)"] = 4 * P
        if c < 4:
            st["autocast bf16 copies of trainable weights"] = 2 * T
        st["Adam moments (fp32)"] = 8 * T
        grads_total, grads_grow = 4 * T, True
        step_transient = step_temporaries(4 * T, 4 * counts.largest_param)
    elif kind == "zero3":
        persist = sum(counts.persistent(zero.persistence_threshold))
        st[f"weights ({'bf16' if c == 2 else 'fp32'} partitions)"] = c * ((P - persist) / W + persist)
        st["fp32 master (partitions)"] = 4 * T / W
        st["Adam moments (partitions)"] = 8 * T / W
        st["gradient partitions"] = c * T / W
        st["fp32 gradient buffer (largest group)"] = 4 * math.ceil(counts.largest_group / W)
        if zero.contiguous_gradients:
            st["reduce bucket"] = reduce_bytes * min(zero.reduce_bucket_size, max(T, 1))
        # the engine raises a bucket smaller than one block (engine/zero.py ensure_prefetch_bucket)
        prefetch = min(max(zero.prefetch_bucket_size, block), zero.max_live_parameters)
        gathered = c * min(P, block + prefetch)
        block_grad_transient = c * block
        # torch's AdamW over DeepSpeed's flat fp32 groups (the loop's largest tensor: the largest group's partition)
        step_transient = step_temporaries(4 * T / W, 4 * math.ceil(counts.largest_group / W))
        if zero.hpz > 1:
            # ZeRO++ hpZ: a second, intra-node partition of every parameter (frozen ones too) in the compute dtype,
            # cut at its first release and kept (the trained ones' recut after each step)
            st["hpZ secondary partitions (1 / ranks a node)"] = c * P / min(zero.hpz, W)
    elif kind == "zero2":
        st[f"weights ({'bf16' if c == 2 else 'fp32'})"] = c * P
        st["fp32 master (partitions)"] = 4 * T / W
        st["Adam moments (partitions)"] = 8 * T / W
        st["gradient partitions"] = c * T / W
        st["reduce buckets"] = (2 if zero.overlap_comm else 1) * c * min(zero.reduce_bucket_size, max(T, 1))
        block_grad_transient = c * block
        # ZeRO-2's step: a gradient-sized temporary of its partitions (but for the fused kernel's), then the
        # all-gather of the updated partitions in buckets
        step_transient = (0.0 if kernel == "fused" else 4 * T / W) + c * min(zero.allgather_bucket_size, max(T, 1))
    elif kind == "fsdp2":
        # HSDP (engine.fsdp_replicate R): sharded over the W / R ranks of a node, replicated over the R nodes;
        # a replicated frozen prefix (engine.replicate_frozen) is whole on every rank in the compute dtype (its
        # fp32 rows stay on the host) and out of the shards
        shard_world = max(W // max(setting.replicate, 1), 1)
        whole = counts.frozen if setting.replicate_frozen else 0
        if whole:
            st[f"frozen prefix, whole ({'bf16' if c == 2 else 'fp32'})"] = c * whole
        st["weights (fp32 shards)"] = 4 * (P - whole) / shard_world
        st["Adam moments (shards)"] = 8 * T / shard_world
        grads_total, grads_grow = 4 * T / shard_world, True
        gathered = 2 * c * block  # the running block and the one prefetched
        block_grad_transient = (c + reduce_bytes) * block
        step_transient = step_temporaries(4 * T / shard_world, 4 * counts.largest_param)
    else:
        raise ValueError(f"unknown engine kind {kind!r}")
    sharded_ema = kind in ("zero3", "zero2", "fsdp2") and W > 1
    if refine and E:
        st["EMA (fp32)"] = 4 * E / (shard_world if sharded_ema else 1)
    queue_bytes = counts.buffer_bytes.get("queues", 0)
    st["queues"] = queue_bytes / W if cfg.queue.sharded else queue_bytes
    st["ID-head norm statistics"] = counts.buffer_bytes.get("head_norms", 0)
    if not grads_grow and grads_total:
        st["gradients"] = grads_total
    # the trainer copies one micro-batch of the host stream's batch to the device at a time (refiner_inputs)
    st["input micro-batch (fp32 crops)"] = B * crops.pixel_bytes

    # ------------------------------------------------------------------------------------ activations
    a = residual_bytes(c, cfg.model.residual_dtype)
    saved_block = B * S * block_saved_per_token(c, d, h, r, a)
    residual = B * S * a * d
    selective_saved = B * S * block_selective_saved_per_token(c, d, h, r, a)
    selective_recomputed = B * S * block_selective_recomputed_per_token(c, d, r, a)
    per_sample = {"trained block, saved": saved_block / B, "checkpointed block, saved": residual / B,
                  "selective block, saved": selective_saved / B}
    # every trained block, first to last: (kind, bytes it saves, bytes its backward adds by recomputing)
    blocks: List[Tuple[str, float, float]] = []
    for j in range(trained_blocks):
        if j < checkpointed and policy == "full":
            # the recomputed forward saves the very input the checkpoint kept: not allocated twice
            blocks.append(("checkpointed", residual, saved_block - residual))
        elif j < checkpointed and policy == "selective":
            blocks.append(("selective", selective_saved, selective_recomputed))
        else:
            blocks.append(("saved", saved_block, 0.0))
    n_heads = len(cfg.heads.blocks) + 1
    heads_act = B * crops.count * n_heads * head_saved_per_crop(
        c, d, cfg.heads.proj_hidden_dim, cfg.heads.proj_out_dim, cfg.heads.pred_hidden_dim)
    loss_act = n_heads * 2 * 2 * crops.count * B * W * B * 4
    lookup = 2 * B * cfg.queue.size * 4 * (1 if not cfg.queue.sharded else 1)
    frozen_taps = sum(1 for b in cfg.heads.blocks if b < counts.frozen_blocks)
    act: Dict[str, float] = dict(_saved_by_kind(blocks, len(blocks)))
    act["last block output"] = residual
    if frozen_taps:
        act[f"tapped frozen block outputs ({frozen_taps})"] = frozen_taps * residual
    if counts.heads_params:
        act["ID heads"] = heads_act
        act["NNA loss logits"] = loss_act

    # ------------------------------------------------------------------------- the peak, phase by phase
    # Autograd runs the heads' and the loss's backward first (they were recorded last): by the encoder's backward
    # their activations, the last block's output and the frozen taps are freed.
    static = sum(st.values())
    head_grads = (4 * counts.heads_params / (shard_world if kind == "fsdp2" else 1)) if grads_grow else 0.0
    phases: Dict[str, Dict[str, float]] = {}
    fwd = dict(act, **{"queue lookup similarities": lookup})
    if gathered:
        fwd["gathered parameters"] = gathered
    phases["forward (queue lookup)"] = fwd
    bwd_heads = {k: v for k, v in act.items() if not k.startswith("tapped")}
    if head_grads:
        bwd_heads["head gradients"] = head_grads
    phases["backward of the heads"] = bwd_heads
    per_block_grad = grads_total / max(T, 1) * block if grads_grow else 0.0
    for k in range(1, trained_blocks + 1):  # the backward of the k-th trained block from the end
        this_kind, _, recomputed = blocks[-k]
        a = dict(_saved_by_kind(blocks, trained_blocks - k + 1))  # this block's saved tensors still alive
        if this_kind == "checkpointed":
            a["recomputed block (checkpointing)"] = recomputed
        elif this_kind == "selective":
            a["recomputed pointwise outputs (selective checkpointing)"] = recomputed
        a["block backward gradients"] = B * S * block_backward_per_token(c, d, r)
        if grads_grow:
            a["gradients created so far"] = head_grads + k * per_block_grad
        if gathered:
            a["gathered parameters"] = gathered
        if block_grad_transient:
            a["block gradients before reduce"] = block_grad_transient
        phases[f"backward, block {k} from the end"] = a
    phases["optimizer step"] = {"gradients": grads_total, "optimizer temporaries": step_transient}
    totals = {name: static + sum(a.values()) for name, a in phases.items()}
    peak_phase = max(totals, key=totals.get)
    peak = totals[peak_phase]
    act = phases[peak_phase]

    allow: Dict[str, float] = {}
    if on_gpu:
        allow["data pipeline (DALI prefetch + scratch)"] = DALI_PREFETCH * per_rank * crops.pixel_bytes + DALI_SCRATCH
        allow["CUDA context, NCCL buffers"] = RUNTIME_BYTES
        allow["fragmentation margin (10 % of the peak)"] = FRAGMENTATION * peak
    return MemoryPrediction(setting=setting.label, stage=counts.stage, world=W, micro_batch=B,
                            per_rank_batch=per_rank, compute_bytes=c, state=st, activations=act,
                            per_sample=per_sample, peak_phase=peak_phase, peak_allocated=peak,
                            allowances=allow, total=peak + sum(allow.values()))
