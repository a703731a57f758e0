"""Recipes load with the paper's values; bad keys, types and impossible values fail naming the key."""
from pathlib import Path

import pytest

from scale_refiner.config import ConfigError, load_config, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_recipes_hold_table_10():
    l16, h14, g14 = (load_config(CONFIGS / f"mae_{n}.yaml") for n in ("l16", "h14", "2b14"))
    assert (l16.heads.temperature, h14.heads.temperature, g14.heads.temperature) == (0.2, 0.3, 0.35)
    assert (l16.data.batch_size, h14.data.batch_size, g14.data.batch_size) == (1024, 512, 512)
    assert (l16.stages.refine.epochs, h14.stages.refine.epochs, g14.stages.refine.epochs) == (30, 30, 20)
    assert (l16.augment.local_size, h14.augment.local_size, g14.augment.local_size) == (96, 98, 98)
    assert (l16.model.freeze_blocks, g14.model.freeze_blocks) == (0, 6)
    assert len(l16.heads.blocks) + 1 == 8 and len(h14.heads.blocks) + 1 == 12 and len(g14.heads.blocks) + 1 == 8
    assert l16.heads.blocks == list(range(16, 23)) and h14.heads.blocks == list(range(20, 31))
    for cfg in (l16, h14, g14):
        r, h = cfg.stages.refine, cfg.stages.heads
        assert (r.base_lr, r.warmup_epochs, r.topk, r.weight_decay, r.head_weight_decay, r.layer_decay, r.ema) == \
            (4e-4, 4, 20, 0.05, 1e-5, 0.65, 0.9999)
        assert (h.base_lr, h.epochs, h.topk) == (2e-4, 20, 1)
        assert r.betas == [0.9, 0.95] and cfg.queue.size == 65536 and cfg.augment.num_local == 10
        assert cfg.augment.global_scale == [0.25, 1.0] and cfg.augment.local_scale == [0.05, 0.25]
    for name in ("d2v2_l16", "d2v2_h14"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.model.arch == "postnorm" and cfg.stages.refine.epochs == 20
    assert load_config(CONFIGS / "demo.yaml").data.dataset == "fashion-mnist"


def test_overrides_apply_with_types():
    cfg = load_config(CONFIGS / "demo.yaml", ["queue.size=4096", "heads.temperature=0.3", "heads.blocks=[1,2]"])
    assert cfg.queue.size == 4096 and cfg.heads.temperature == 0.3 and cfg.heads.blocks == [1, 2]


@pytest.mark.parametrize("override, key", [
    (["model.nonsense=1"], "model.nonsense"),
    (["queue.size=big"], "queue.size"),
    (["augment.local_size=97"], "augment.local_size"),
    (["augment.global_size=230"], "augment.global_size"),
    (["stages.refine.topk=70000"], "stages.refine.topk"),
    (["heads.blocks=[24]"], "heads.blocks"),
    (["model.freeze_blocks=25"], "model.freeze_blocks"),
    (["heads.norm=groupnorm"], "heads.norm"),
    (["heads.pairing=paper"], "heads.pairing"),
    (["heads.pairing=official", "augment.num_local=1"], "heads.pairing"),
    (["queue.init=zeros"], "queue.init"),
    (["engine.kind=horovod"], "engine.kind"),
    (["model.name=vit_giant"], "model.name"),
    (["stages.heads.warmup_epochs=50"], "stages.heads.warmup_epochs"),
    (["stages.run=[heads,pretrain]"], "stages.run"),
    (["queuesize"], "queuesize"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(CONFIGS / "mae_l16.yaml", override)


def test_unknown_key_in_file_names_file_and_allowed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("heads:\n  tempreature: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "heads.tempreature" in str(err.value) and str(bad) in str(err.value) and "temperature" in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_world_size_must_divide_batch():
    cfg = load_config(CONFIGS / "demo.yaml")
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="data.batch_size"):
        validate(cfg, world_size=3)


def test_micro_batch_and_accumulation_steps():
    from scale_refiner.config import accumulation_steps, micro_batch_for
    assert micro_batch_for(512, 8, 128) == (64, 1)  # fits whole: no accumulation
    assert micro_batch_for(512, 2, 100) == (64, 4)  # 256 per rank in 4 micro-batches of 64 (100 fits)
    assert micro_batch_for(96, 1, 40) == (32, 3)  # the largest divisor of 96 not above 40
    cfg = load_config(None, ["data.batch_size=512", "data.micro_batch_size=64"])
    assert accumulation_steps(cfg, 2) == 4 and accumulation_steps(cfg, 8) == 1
    validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match="data.micro_batch_size"):
        validate(load_config(None, ["data.batch_size=512", "data.micro_batch_size=48"]), world_size=2)
    with pytest.raises(ConfigError, match="data.micro_batch_size"):
        load_config(None, ["data.micro_batch_size=-1"])
