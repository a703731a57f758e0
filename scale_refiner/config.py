"""Typed configuration: a dataclass tree, loaded from a YAML recipe plus ``key=value`` overrides.

OmegaConf's structured configs reject unknown keys and wrong types; ``validate`` then rejects impossible
values (crop sizes that do not tile into patches, k larger than the queue, taps beyond the depth, ...).
Every failure is a ``ConfigError`` naming the key and what is allowed, raised before any work starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A recipe or override that cannot be run; the message names the key."""


@dataclass
class ModelConfig:
    # A registered size (see scale_refiner.models.vit.VIT_SIZES); the fields below override it when set.
    name: str = "vit_tiny_patch4"
    arch: str = "prenorm"  # prenorm (MAE) | postnorm (data2vec 2.0)
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    img_size: int = 224  # the resolution the position embedding grid is stored at
    in_chans: int = 3
    # Pre-trained weights: a local file; format auto-detected from its keys unless given.
    weights: Optional[str] = None
    weights_format: str = "auto"  # auto | mae | timm | maws | d2v2 | native
    # The first `freeze_blocks` blocks plus patch embedding, cls token and position embedding stay frozen.
    freeze_blocks: int = 0
    # Non-reentrant activation checkpointing of the trained blocks (models/vit.py): false; true (every trained
    # block); an integer N (the first N trained blocks, whose activations live longest); selective (every trained
    # block keeps its matmul and attention outputs and recomputes only the pointwise ops). Typed Any: OmegaConf's
    # structured configs have no bool-or-int-or-str union; validate() checks the value.
    checkpointing: Any = False
    # torch.compile each transformer block (frozen and trained; checkpointing stays as set). Off by default: the
    # first steps pay the compilation, and it needs a C++ compiler (inductor builds its CPU kernels, and Triton
    # its launchers, with one).
    compile: bool = False
    # dtype of the residual stream between blocks under bf16 autocast: compute (bf16: what DeepSpeed's and FSDP2's
    # bf16 parameters give anyway; on the single engine the fp32 position embedding would promote it to fp32) |
    # fp32 (single engine only: its LayerNorms hold fp32 weights; the sharded engines' bf16 LayerNorm weights take
    # no fp32 input, and FSDP2 casts each block's input to bf16). No effect in fp32.
    residual_dtype: str = "compute"
    # FP8 matmuls (torchao's float8 training) for the trained blocks' linears (attention qkv / proj, MLP fc1 / fc2
    # of the blocks from freeze_blocks on); never the frozen prefix, the patch embedding or the heads
    # (models/float8.py). Needs model.compile=true, a GPU of compute capability >= 8.9 and engine.kind single or
    # fsdp2; refused otherwise before any work.
    float8: bool = False


@dataclass
class HeadsConfig:
    # Blocks (0-indexed) whose raw CLS token feeds a head; one more head always reads the final norm output.
    blocks: List[int] = field(default_factory=list)
    proj_hidden_dim: int = 2048
    proj_out_dim: int = 256
    pred_hidden_dim: int = 4096
    norm: str = "bn"  # bn | syncbn (global batch) | async (previous steps' global statistics, 1 async reduce)
    temperature: float = 0.2
    objective: str = "nna"  # nna | nnclr (negatives swapped for their NN as well)
    # intended: each global view with the other and every local one, no self-pairs | official: the released
    # code's view indexing (a self-pair, the last two local views unused), for comparison with published numbers
    pairing: str = "intended"


@dataclass
class QueueConfig:
    size: int = 65536
    sharded: bool = False  # each rank stores 1/W of the FIFO (memory/sharded_queue.py); same neighbours
    search: str = "torch"  # sharded only: torch (matmul + topk) | faiss (flat, exact) | ivf (approximate)
    # empty: slots masked until written | random: every slot starts as a random unit vector (the released code)
    init: str = "empty"


@dataclass
class AugmentConfig:
    global_size: int = 224
    global_scale: List[float] = field(default_factory=lambda: [0.25, 1.0])
    local_size: int = 96
    local_scale: List[float] = field(default_factory=lambda: [0.05, 0.25])
    num_local: int = 10
    color: bool = True  # False: crop and flip only (the low-shot ablation)


@dataclass
class StageConfig:
    epochs: float = 20.0
    warmup_epochs: float = 4.0
    base_lr: float = 2e-4  # scaled by global batch / 256
    topk: int = 1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05  # encoder (refine stage only)
    head_weight_decay: float = 1e-5
    layer_decay: float = 0.65  # refine stage only
    ema: float = 0.9999  # refine stage only
    clip_grad: Optional[float] = None


def _heads_stage() -> StageConfig:
    return StageConfig(epochs=20, warmup_epochs=4, base_lr=2e-4, topk=1)


def _refine_stage() -> StageConfig:
    return StageConfig(epochs=30, warmup_epochs=4, base_lr=4e-4, topk=20)


@dataclass
class StagesConfig:
    heads: StageConfig = field(default_factory=_heads_stage)
    refine: StageConfig = field(default_factory=_refine_stage)
    run: List[str] = field(default_factory=lambda: ["heads", "refine"])


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # the embedded default; see docs/data.md
    train_shards: Optional[str] = None
    test_shards: Optional[str] = None
    # Where the embedded shards are written on first use and found (<shard_root>/fashion-mnist); None: the
    # environment variable SCALE_REFINER_SHARD_ROOT, else shards/ of a source checkout, else
    # ~/.cache/scale-refiner/shards (docs/data.md)
    shard_root: Optional[str] = None
    batch_size: int = 1024  # global, over all ranks: one optimiser step
    # Samples per rank in one forward/backward; 0 = batch_size / world (no accumulation). Smaller: the step
    # accumulates batch_size / (world * micro_batch_size) micro-batches. Negatives, BN statistics and the
    # queue's enqueue then come from each micro-batch x world (docs/training.md, "Gradient accumulation").
    micro_batch_size: int = 0
    num_workers: int = 2
    # Cap on samples per epoch (0 = the whole split); lets tiny CPU runs finish.
    samples_per_epoch: int = 0
    pipeline: str = "auto"  # auto (dali if installed, else wds) | dali | wds | memory (see data/loaders.py)
    dali_device: str = "auto"  # auto (mixed decoding + GPU ops where a GPU is) | cpu | gpu
    shuffle_buffer: int = 1024  # DALI initial_fill / webdataset shuffle buffer (about 16384 for ImageNet)
    verify_shards: str = "size"  # sha256 | size | none: what is checked against the manifest at start
    on_error: str = "raise"  # raise | skip (wds only: a bad sample is skipped and counted; DALI always raises)
    # under skip: the run stops with an error naming the damaged shards once more than this share of the samples
    # it tried to read was lost (checked at the logged steps): skipping is for a few bad files, not for a set
    # that erodes every epoch
    max_skipped_fraction: float = 0.01


@dataclass
class EngineConfig:
    kind: str = "deepspeed"  # deepspeed | fsdp2 | single
    zero_config: str = "ds_configs/zero3.json"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    reduce_dtype: str = "fp32"  # dtype of the gradient reduction under bf16: fp32 | bf16 (half the bytes)
    # FSDP2 hybrid sharding (HSDP): parameters sharded over world / fsdp_replicate consecutive ranks (a node) and
    # replicated over fsdp_replicate such groups, gradients all-reduced across them; 1 = plain FSDP2 (fsdp2 only)
    fsdp_replicate: int = 1
    # The frozen prefix (patch embed, cls, pos, the first model.freeze_blocks blocks; the whole encoder in the heads
    # stage) held whole on every rank in the compute dtype instead of sharded: never gathered (fsdp2 only)
    replicate_frozen: bool = False
    # AdamW's kernel (engine/optim.py ``adamw``): auto (fused on a GPU, torch's default on the CPU, whose numbers
    # the CPU recipes were measured with) | fused (one kernel over all of a group's tensors) | foreach | loop.
    # ZeRO's CPU offload always steps with DeepSpeed's CPU Adam and takes auto only.
    optimizer_impl: str = "auto"


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # steps; 0 = only at the end of a stage
    resume: str = "none"  # none | auto | PATH
    max_steps: int = 0  # caps each stage's length, schedule included; 0 = no cap (smoke tests)
    stop_after: int = 0  # stop after this many steps of a stage, saving a checkpoint to resume from; 0 = never
    keep_checkpoints: int = 2  # periodic checkpoints kept (stage ends are always kept)
    knn_every: int = 0  # steps between k-NN evaluations of the online encoder on held-out data; 0 = off
    # Resume only from a checkpoint whose files match the SHA-256 its save recorded (engine/checkpoint.py);
    # false trusts the files as they are (e.g. a checkpoint written before hashes were recorded).
    verify_checkpoint: bool = True
    # Preemption (engine/run_control.py): these signals make every rank finish its step, write a checkpoint and
    # exit with status 75; checked every control_every steps (one small host-side all-reduce)
    stop_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    control_every: int = 1
    save_every_minutes: float = 0.0  # also checkpoint when this many minutes passed since the last one; 0 = off
    # A collective that waits longer for a peer fails, and a rank that makes no step for this long dumps its
    # stacks and exits (engine/watchdog.py); 0 = the backend's default and no watchdog
    timeout_minutes: float = 30.0
    # Resume despite a changed data.batch_size / schedule / engine.kind (keys listed here); empty = refuse
    resume_allow_changes: List[str] = field(default_factory=list)
    # One run per out_dir: rank 0 holds an exclusive lock on <out_dir>/.run.lock (engine/run_lock.py) and a second
    # run into the directory exits 73; false runs without it (a file system that cannot lock)
    lock: bool = True


@dataclass
class RefineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class MAEConfig:
    """The MAE decoder and masking (He et al., 2022): the pre-training that MIM-Refiner starts from."""
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # per-patch normalised pixel targets: MAE's better-representation setting


def _mae_stage() -> StageConfig:
    # MAE's recipe: lr 1.5e-4 x batch / 256, AdamW (0.9, 0.95), weight decay 0.05, no layer decay.
    return StageConfig(epochs=800, warmup_epochs=40, base_lr=1.5e-4, weight_decay=0.05, head_weight_decay=0.05,
                       layer_decay=1.0)


@dataclass
class PretrainStagesConfig:
    mae: StageConfig = field(default_factory=_mae_stage)


def _mae_augment() -> AugmentConfig:
    # MAE's augmentation: random resized crop (0.2, 1) and flip, no colour; both "global" crops of a stream
    # batch are used as two pre-training samples, no local crops.
    return AugmentConfig(global_scale=[0.2, 1.0], num_local=0, color=False)


@dataclass
class PretrainConfig:
    """MAE pre-training (launch/pretrain_mae.py) on the same engines, data streams and run options."""
    model: ModelConfig = field(default_factory=ModelConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    augment: AugmentConfig = field(default_factory=_mae_augment)
    stages: PretrainStagesConfig = field(default_factory=PretrainStagesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)


CHOICES = {
    "model.arch": ("prenorm", "postnorm"),
    "model.weights_format": ("auto", "mae", "timm", "maws", "d2v2", "native"),
    "model.residual_dtype": ("compute", "fp32"),
    "heads.norm": ("bn", "syncbn", "async"),
    "heads.objective": ("nna", "nnclr"),
    "heads.pairing": ("intended", "official"),
    "queue.init": ("empty", "random"),
    "engine.kind": ("deepspeed", "fsdp2", "single"),
    "data.pipeline": ("auto", "dali", "wds", "memory"),
    "data.dali_device": ("auto", "cpu", "gpu"),
    "data.verify_shards": ("sha256", "size", "none"),
    "data.on_error": ("raise", "skip"),
    "engine.precision": ("auto", "bf16", "fp32"),
    "engine.reduce_dtype": ("fp32", "bf16"),
    "engine.optimizer_impl": ("auto", "fused", "foreach", "loop"),
}
CHOICES_SHARED = tuple(k for k in CHOICES if not k.startswith(("heads.", "queue.")))


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None,
                schema_class=None) -> RefineConfig:
    """Recipe file (optional) + ``key=value`` overrides -> validated ``RefineConfig`` (or ``schema_class``,
    e.g. ``PretrainConfig``)."""
    schema_class = schema_class or RefineConfig
    schema = OmegaConf.structured(schema_class)
    OmegaConf.set_struct(schema, True)
    merged = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise ConfigError(_describe(err, f"in {path}", schema_class)) from None
        except yaml.YAMLError as err:  # a syntax error, or a tag with no constructor (e.g. !!python/object)
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} cannot be read: {err}") from None
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise ConfigError(_describe(err, f"in override {item!r}", schema_class)) from None
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _describe(err: OmegaConfBaseException, where: str, schema_class=None) -> str:
    key = getattr(err, "full_key", None) or "?"
    where = f" {where}"
    msg = str(err).splitlines()[0]
    if "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = _node_at(parent, schema_class or RefineConfig)
        allowed = ", ".join(f.name for f in dataclasses.fields(node)) if node else ""
        return f"unknown config key '{key}'{where}; allowed keys here: {allowed}"
    return f"bad value for config key '{key}'{where}: {msg}"


def _node_at(dotted: str, root):
    node = root
    for part in filter(None, dotted.split(".")):
        default = {f.name: f for f in dataclasses.fields(node)}[part].default_factory()
        node = type(default)
        if not dataclasses.is_dataclass(node):
            return None
    return node


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _fail(key, msg):
    raise ConfigError(f"config key '{key}': {msg}")


def validate(cfg, world_size: Optional[int] = None) -> None:
    """Reject impossible values with a message naming the key; ``world_size`` adds the batch check.
    Takes a ``RefineConfig`` or a ``PretrainConfig``."""
    if isinstance(cfg, PretrainConfig):
        _validate_pretrain(cfg, world_size)
        return
    _validate_refine(cfg, world_size)


def _validate_pretrain(cfg: PretrainConfig, world_size: Optional[int]) -> None:
    from scale_refiner.models.vit import resolve_model_dims
    fail = _fail
    _validate_shared(cfg, world_size, list(CHOICES_SHARED))
    dims = resolve_model_dims(cfg.model)
    if cfg.augment.num_local:
        fail("augment.num_local", "MAE pre-training uses the two global crops only; set it to 0")
    if cfg.augment.global_size != cfg.model.img_size:
        fail("augment.global_size", f"{cfg.augment.global_size} must equal model.img_size ({cfg.model.img_size}): "
                                    f"MAE reconstructs every patch of the stored position grid")
    if not 0 < cfg.mae.mask_ratio < 1:
        fail("mae.mask_ratio", f"{cfg.mae.mask_ratio} must be in (0, 1)")
    if int((cfg.model.img_size // dims["patch_size"]) ** 2 * (1 - cfg.mae.mask_ratio)) < 1:
        fail("mae.mask_ratio", f"{cfg.mae.mask_ratio} leaves no visible patch")
    for key in ("mae.decoder_dim", "mae.decoder_depth", "mae.decoder_heads"):
        if _get(cfg, key) <= 0:
            fail(key, "must be > 0")
    if cfg.mae.decoder_dim % cfg.mae.decoder_heads:
        fail("mae.decoder_heads", f"{cfg.mae.decoder_heads} does not divide mae.decoder_dim {cfg.mae.decoder_dim}")
    if cfg.mae.decoder_dim % 4:
        fail("mae.decoder_dim", f"{cfg.mae.decoder_dim} must be divisible by 4 (2-D sin-cos position embedding)")
    if cfg.model.freeze_blocks:
        fail("model.freeze_blocks", "MAE pre-training trains every block; set it to 0")
    if cfg.model.weights:
        fail("model.weights", "MAE pre-training starts from a random encoder and does not load weights; unset it")
    _validate_stage(cfg.stages.mae, "stages.mae", topk_max=None)


def _validate_refine(cfg: RefineConfig, world_size: Optional[int]) -> None:
    from scale_refiner.models.vit import resolve_model_dims  # models depend on config, not the reverse
    fail = _fail
    _validate_shared(cfg, world_size, list(CHOICES))
    depth = resolve_model_dims(cfg.model)["depth"]
    if not 0 <= cfg.model.freeze_blocks <= depth:
        fail("model.freeze_blocks", f"{cfg.model.freeze_blocks} is outside 0..{depth} (the model has {depth} blocks)")
    for idx in cfg.heads.blocks:
        if not 0 <= idx < depth:
            fail("heads.blocks", f"block {idx} is outside 0..{depth - 1} (the model has {depth} blocks)")
    if len(set(cfg.heads.blocks)) != len(cfg.heads.blocks):
        fail("heads.blocks", f"{list(cfg.heads.blocks)} lists a block twice")
    if cfg.heads.temperature <= 0:
        fail("heads.temperature", "must be > 0")
    if cfg.heads.pairing == "official" and cfg.augment.num_local < 2:
        fail("heads.pairing", f"'official' pairs each anchor with views 0 .. augment.num_local - 1, so it needs "
                              f"augment.num_local >= 2 (got {cfg.augment.num_local})")
    for key in ("heads.proj_hidden_dim", "heads.proj_out_dim", "heads.pred_hidden_dim", "queue.size"):
        if _get(cfg, key) <= 0:
            fail(key, "must be > 0")
    if cfg.queue.search not in ("torch", "faiss", "ivf"):
        fail("queue.search", f"{cfg.queue.search!r} is not one of torch, faiss, ivf")
    if cfg.queue.search != "torch" and not cfg.queue.sharded:
        fail("queue.search", f"{cfg.queue.search!r} needs queue.sharded=true (the replicated queue searches with a matmul)")
    for name in cfg.stages.run:
        if name not in ("heads", "refine"):
            fail("stages.run", f"{name!r} is not one of heads, refine")
    for name in ("heads", "refine"):
        _validate_stage(getattr(cfg.stages, name), f"stages.{name}", topk_max=cfg.queue.size)


def _validate_stage(stage: StageConfig, prefix: str, topk_max: Optional[int]) -> None:
    fail = _fail
    if topk_max is not None and not 1 <= stage.topk <= topk_max:
        fail(f"{prefix}.topk", f"{stage.topk} must be in 1..queue.size ({topk_max})")
    if stage.epochs <= 0:
        fail(f"{prefix}.epochs", "must be > 0")
    if not 0 <= stage.warmup_epochs <= stage.epochs:
        fail(f"{prefix}.warmup_epochs", f"{stage.warmup_epochs} must be in 0..epochs ({stage.epochs})")
    if stage.base_lr < 0:
        fail(f"{prefix}.base_lr", "must be >= 0")
    if len(stage.betas) != 2 or not all(0 <= b < 1 for b in stage.betas):
        fail(f"{prefix}.betas", f"{list(stage.betas)} must be two values in [0, 1)")
    if not 0 < stage.layer_decay <= 1:
        fail(f"{prefix}.layer_decay", "must be in (0, 1]")
    if not 0 <= stage.ema < 1:
        fail(f"{prefix}.ema", "must be in [0, 1)")
    if stage.clip_grad is not None and stage.clip_grad <= 0:
        fail(f"{prefix}.clip_grad", "must be > 0 or null")


def _validate_shared(cfg, world_size: Optional[int], choices) -> None:
    """What refinement and pre-training configs have in common: model, augment, data, engine, run."""
    from scale_refiner.models.vit import resolve_model_dims
    fail = _fail
    for key in choices:
        allowed = CHOICES[key]
        if _get(cfg, key) not in allowed:
            fail(key, f"{_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    try:
        dims = resolve_model_dims(cfg.model)
    except KeyError as err:
        fail("model.name", str(err.args[0]))
    patch = dims["patch_size"]
    _validate_checkpointing(cfg.model.checkpointing, dims["depth"], cfg.model.freeze_blocks)
    if cfg.model.compile:
        _validate_compile()
    if cfg.model.float8:
        from scale_refiner.models.float8 import float8_problem
        problem = float8_problem(cfg.model, cfg.engine.kind)
        if problem:
            fail(*problem)
    if dims["embed_dim"] % dims["num_heads"]:
        fail("model.num_heads", f"{dims['num_heads']} does not divide embed_dim {dims['embed_dim']}")
    if cfg.model.img_size % patch:
        fail("model.img_size", f"{cfg.model.img_size} is not a multiple of the patch size {patch}")
    for key in ("augment.global_size", "augment.local_size"):
        if _get(cfg, key) <= 0 or _get(cfg, key) % patch:
            fail(key, f"{_get(cfg, key)} must be a positive multiple of the patch size {patch}")
    for key in ("augment.global_scale", "augment.local_scale"):
        lo_hi = _get(cfg, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            fail(key, f"{list(lo_hi)} must be [low, high] with 0 < low <= high <= 1")
    if cfg.augment.num_local < 0:
        fail("augment.num_local", "must be >= 0")
    if cfg.data.batch_size <= 0:
        fail("data.batch_size", "must be > 0")
    if world_size is not None and cfg.data.batch_size % world_size:
        fail("data.batch_size", f"{cfg.data.batch_size} is not divisible by the world size {world_size}")
    if cfg.data.micro_batch_size < 0:
        fail("data.micro_batch_size", "must be >= 0 (0: the whole per-rank batch)")
    if world_size is not None and cfg.data.micro_batch_size:
        per_rank = cfg.data.batch_size // world_size
        if per_rank % cfg.data.micro_batch_size:
            fail("data.micro_batch_size", f"{cfg.data.micro_batch_size} does not divide the per-rank batch "
                                          f"{per_rank} (data.batch_size {cfg.data.batch_size} / {world_size} ranks)")
    for key in ("run.max_steps", "run.stop_after", "run.save_every", "run.log_every", "run.keep_checkpoints",
                "run.knn_every"):
        if _get(cfg, key) < 0 or (key == "run.log_every" and _get(cfg, key) == 0):
            fail(key, "must be >= 0" if key != "run.log_every" else "must be > 0")
    for key in ("run.save_every_minutes", "run.timeout_minutes"):
        if _get(cfg, key) < 0:
            fail(key, "must be >= 0 (0: off)")
    if cfg.run.control_every < 1:
        fail("run.control_every", "must be >= 1")
    import signal
    for name in cfg.run.stop_signals:
        if name not in signal.Signals.__members__:
            fail("run.stop_signals", f"unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)")
    allowed = ("data.batch_size", "schedule", "engine.kind")
    for key in cfg.run.resume_allow_changes:
        if key not in allowed:
            fail("run.resume_allow_changes", f"{key!r} is not one of {list(allowed)}")
    _validate_hybrid(cfg, world_size)
    if cfg.data.shuffle_buffer < 1:
        fail("data.shuffle_buffer", "must be >= 1")
    if not 0 <= cfg.data.max_skipped_fraction <= 1:
        fail("data.max_skipped_fraction", f"{cfg.data.max_skipped_fraction} must be in [0, 1]")
    if cfg.data.samples_per_epoch < 0:
        fail("data.samples_per_epoch", "must be >= 0")


def _validate_hybrid(cfg, world_size: Optional[int]) -> None:
    """engine.fsdp_replicate: FSDP2 only, >= 1, and (once the world size is known) a divisor of it that leaves
    at least one rank per shard group."""
    replicate = cfg.engine.fsdp_replicate
    if replicate < 1:
        _fail("engine.fsdp_replicate", f"{replicate} must be >= 1 (1: plain FSDP2)")
    if replicate > 1 and cfg.engine.kind != "fsdp2":
        _fail("engine.fsdp_replicate", f"{replicate} needs engine.kind=fsdp2 (engine.kind is {cfg.engine.kind}; "
                                       f"DeepSpeed's hierarchical partitioning is ds_configs/zero3_hpz.json)")
    if world_size is not None and world_size % replicate:
        _fail("engine.fsdp_replicate", f"{replicate} replica groups do not divide the world size {world_size}: "
                                       f"use the number of nodes, each with the same number of ranks")
    if cfg.model.residual_dtype == "fp32" and cfg.engine.kind != "single":
        _fail("model.residual_dtype", f"fp32 needs engine.kind=single (engine.kind is {cfg.engine.kind}: its bf16 "
                                      f"parameters keep the stream in bf16; their LayerNorms take no fp32 input)")
    if cfg.engine.replicate_frozen and cfg.engine.kind == "single":
        _fail("engine.replicate_frozen", "needs engine.kind=fsdp2 (one process holds everything whole already)")
    if cfg.engine.replicate_frozen and cfg.engine.kind == "deepspeed":
        # DeepSpeed ZeRO-3 partitions every parameter of the model it wraps and has no option to leave one out;
        # the nearest, a persistent parameter (stage3_param_persistence_threshold), is still released by every
        # optimiser step (stage3's step -> _partition_all_parameters) and gathered again by the next forward,
        # which for a frozen block is as often as now. Under ZeRO-2 parameters are whole on every rank anyway.
        _fail("engine.replicate_frozen", "is not available with engine.kind=deepspeed: ZeRO-3 cannot leave the "
                                         "frozen prefix out of its partitioning (even its persistent parameters are "
                                         "re-partitioned at every step), and ZeRO-2 holds it whole already; use "
                                         "engine.kind=fsdp2")


def _validate_checkpointing(value, depth: int, freeze_blocks: int) -> None:
    trained = depth - freeze_blocks
    allowed = f"false, true, selective, or the number of trained blocks to checkpoint (0..{trained})"
    if isinstance(value, bool) or value == "selective":
        return
    if isinstance(value, int):
        if not 0 <= value <= trained:
            _fail("model.checkpointing", f"{value} is outside 0..{trained} (the model trains {trained} blocks: "
                                         f"{depth} minus model.freeze_blocks {freeze_blocks}); allowed: {allowed}")
        return
    _fail("model.checkpointing", f"{value!r} is not one of: {allowed}")


def _validate_compile() -> None:
    """torch.compile's inductor compiles C++ (CPU kernels; on a GPU, Triton's launcher stubs) with the compiler
    in $CXX, else g++: without one the first step would fail deep inside inductor, so fail here instead."""
    import os
    import shutil
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        named = f"$CXX={compiler}" if os.environ.get("CXX") else "g++"
        _fail("model.compile", f"torch.compile needs a C++ compiler ({named}) and none is on the PATH; install one "
                               f"(apt-get install g++) or set model.compile=false")


def to_yaml(cfg: RefineConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RefineConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def accumulation_steps(cfg, world_size: int) -> int:
    """Micro-batches per optimiser step: ``data.batch_size / (world * data.micro_batch_size)``."""
    per_rank = cfg.data.batch_size // world_size
    micro = cfg.data.micro_batch_size or per_rank
    return per_rank // micro


def micro_batch_for(global_batch: int, world_size: int, fits: int) -> tuple:
    """The largest ``data.micro_batch_size`` not above ``fits`` (what a rank can hold) that divides the
    per-rank share of ``global_batch``, and the accumulation steps it gives: (micro, steps)."""
    per_rank = max(global_batch // world_size, 1)
    micro = max(d for d in range(1, min(fits, per_rank) + 1) if per_rank % d == 0)
    return micro, per_rank // micro
