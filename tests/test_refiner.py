"""The refiner step and the stage loop: what must not change stays bit-identical, EMA is exact."""
import subprocess
import sys
import json
from pathlib import Path

import pytest
import torch

from scale_refiner.config import load_config
from scale_refiner.data.loaders import TrainStream
from scale_refiner.engine.distributed import DistContext
from scale_refiner.engine.ema import EncoderEMA
from scale_refiner.engine.trainer import build_engine, run_stage
from scale_refiner.refiner import build_refiner, refiner_inputs, refiner_signature

CTX = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def CONTRACT(cfg):  # what run_stage needs from what it trains
    return dict(inputs=refiner_inputs, signature=refiner_signature(cfg))

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=vit_test_patch4", "heads.blocks=[1,2]", "heads.proj_hidden_dim=64", "heads.proj_out_dim=16",
        "heads.pred_hidden_dim=64", "queue.size=256", "augment.num_local=2", "data.batch_size=8",
        "data.samples_per_epoch=32", "run.log_every=1", "stages.heads.epochs=1"]  # not the demo recipe's 0.5


class SyntheticStream(TrainStream):
    """4 batches of 8 random crops an epoch."""
    samples_per_epoch = 32

    def batches(self, epoch, start_batch=0):
        g = torch.Generator().manual_seed(epoch)
        for i in range(start_batch, 4):
            yield {"global": torch.randn(2, 8, 3, 32, 32, generator=g),
                   "local": torch.randn(2, 8, 3, 16, 16, generator=g),
                   "index": torch.arange(8) + 8 * i, "label": torch.arange(8) % 3}


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_heads_stage_leaves_encoder_bit_identical_and_trains_heads():
    cfg = load_config(ROOT / "configs/demo.yaml", TINY)
    torch.manual_seed(0)
    refiner = build_refiner(cfg)
    enc_before, heads_before = snapshot(refiner.encoder), snapshot(refiner.heads)
    bn_before = refiner.encoder.state_dict()
    run_stage(build_engine(refiner, cfg, "heads", CTX), cfg, "heads", SyntheticStream(), CTX, **CONTRACT(cfg))
    assert all(torch.equal(p, enc_before[n]) for n, p in refiner.encoder.named_parameters())
    assert all(torch.equal(v, bn_before[k]) for k, v in refiner.encoder.state_dict().items())
    assert not refiner.encoder.training  # frozen encoder stays in eval mode during the heads stage
    changed = [n for n, p in refiner.heads.named_parameters() if not torch.equal(p, heads_before[n])]
    assert len(changed) == len(heads_before)
    assert refiner.queues[0].num_filled == 32  # 4 steps x 8 g1 projections


def test_released_code_options_pairing_and_random_queue():
    """heads.pairing=official sums the released code's pairs (a self-pair, the last local views unused);
    queue.init=random starts every slot filled, so the first step already finds neighbours."""
    crops = SyntheticStream().batches(0)
    batch = next(crops)
    results = {}
    for overrides in ([], ["heads.pairing=official"], ["queue.init=random"]):
        cfg = load_config(ROOT / "configs/demo.yaml", TINY + overrides)
        torch.manual_seed(0)
        refiner = build_refiner(cfg, load_weights=False)
        refiner.train()
        assert all(q.num_filled == (256 if "queue.init=random" in overrides else 0) for q in refiner.queues)
        local = batch["local"].clone().requires_grad_(True)
        loss, metrics = refiner(batch["global"], local, batch["index"], batch["label"], topk=5, step=0)
        loss.backward()
        results[tuple(overrides)] = (float(loss), float(metrics["final/nn_similarity"]), local.grad)
    base, official, random_init = results[()], results[("heads.pairing=official",)], results[("queue.init=random",)]
    # the local crops' gradient changes (with 2 local views official predicts neither; some gradient still
    # reaches them through the heads' BatchNorm, whose statistics mix all crops: tests/test_objective.py shows
    # the unused predictions get none)
    assert not torch.allclose(official[2], base[2])
    assert official[0] != base[0]
    assert base[1] == 1.0  # empty queue: each query is its own neighbour
    assert random_init[1] < 0.9 and random_init[0] != base[0]  # random neighbours from the first step


@pytest.mark.parametrize("checkpointing", [False, True])
def test_refine_stage_keeps_frozen_prefix_and_trains_the_rest(checkpointing):
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + ["model.freeze_blocks=2",
                                                         f"model.checkpointing={checkpointing}"])
    torch.manual_seed(0)
    refiner = build_refiner(cfg)
    before = snapshot(refiner.encoder)
    engine = build_engine(refiner, cfg, "refine", CTX)
    result = run_stage(engine, cfg, "refine", SyntheticStream(), CTX, **CONTRACT(cfg))
    for name, p in refiner.encoder.named_parameters():
        frozen = name.startswith(("patch_embed", "cls_token", "pos_embed", "blocks.0.", "blocks.1."))
        assert torch.equal(p, before[name]) == frozen, name
    assert result.ema is not None and set(result.ema.shadow) == {
        n for n, p in refiner.encoder.named_parameters() if p.requires_grad}


def test_ema_matches_a_naive_full_parameter_ema():
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/demo.yaml", TINY + ["model.freeze_blocks=1"])
    refiner = build_refiner(cfg)
    encoder = refiner.encoder
    engine = build_engine(refiner, cfg, "refine", CTX)
    ema = EncoderEMA(engine, decay=0.9)
    naive = {n: p.detach().double().clone() for n, p in encoder.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in encoder.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        ema.update()
        for n, p in encoder.named_parameters():
            naive[n] = 0.9 * naive[n] + 0.1 * p.detach().double()
    full = ema.encoder_state()
    for n in naive:
        assert torch.allclose(full[n].double(), naive[n], atol=1e-6), n
    assert "blocks.0.attn.qkv.weight" not in ema.shadow  # frozen: its EMA is the parameter itself
    assert torch.equal(full["blocks.0.attn.qkv.weight"], encoder.blocks[0].attn.qkv.weight)


def test_main_job_runs_end_to_end_and_exports_load_in_timm(tmp_path):
    """launch/refine.py on the embedded Fashion-MNIST, a few steps: artefacts exist and the export loads."""
    from scale_refiner.models.weights import load_timm_export
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch/refine.py"), "--config", str(ROOT / "configs/demo.yaml"),
           "--eval-samples", "200", f"run.out_dir={out}", "data.num_workers=0"] + TINY + ["data.batch_size=16",
                                                                                    "data.pipeline=memory",
                                                                                    "run.knn_every=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| ema |" in proc.stdout
    assert "refine, global step 6: k-NN {'10':" in proc.stderr  # refine step 4 of 6 after 2 heads steps
    results = json.loads((out / "results.json").read_text())
    assert {"before", "online", "ema"} <= set(results)
    assert all(0 <= results["ema"][k] <= 1 for k in ("10", "20"))
    assert (out / "checkpoints/heads-end/state.json").is_file()
    assert (out / "checkpoints/latest").read_text() == "refine-end"
    assert any((out / "tensorboard").iterdir())
    # Both exports are timm hub-layout directories that timm's own factory loads: the end checkpoint's encoders
    # bit for bit, the trained preprocessing (32 px RGB, ImageNet mean/std, bicubic), a card with this run's k-NN
    import timm
    from timm.data import resolve_data_config
    from scale_refiner.eval.loading import load_from_run, load_from_weights
    end = {k[len("encoder."):]: v for k, v in
           torch.load(out / "checkpoints/refine-end/model_state.pt", weights_only=True).items()
           if k.startswith("encoder.")}
    ema = torch.load(out / "checkpoints/refine-end/ema.pt", weights_only=True)
    x = torch.randn(2, 3, 32, 32)
    for name, expected in (("online", end), ("ema", {**end, **ema})):
        export = out / "export" / name
        assert sorted(p.name for p in export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        created = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
        state = created.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())
        data = resolve_data_config({}, model=created)
        assert (data["input_size"], data["interpolation"], data["crop_pct"]) == ((3, 32, 32), "bicubic", 1.0)
        assert tuple(data["mean"]) == (0.485, 0.456, 0.406) and tuple(data["std"]) == (0.229, 0.224, 0.225)
        ours, _, _ = load_from_weights(None, export)  # evaluate --weights <export dir>
        with torch.no_grad():
            assert torch.equal(created(x), ours.forward_tokens(x)[:, 0])
            assert torch.equal(created.forward_features(x), load_timm_export(export).eval().forward_features(x))
        card = (export / "README.md").read_text()
        label = "EMA" if name == "ema" else "online"
        for needle in (f"the {label} encoder of the run", "| data set | fashion-mnist |", "| train images | 60000 |",
                       "| batch size | 16 |", "| model | vit_test_patch4 (prenorm), 32 px |",
                       f"| {label} | {100 * results[name]['10']:.1f} % | {100 * results[name]['20']:.1f} % |",
                       f"| before refinement | {100 * results['before']['10']:.1f} % |",
                       "200 train images are the bank, 200 test images are scored",
                       'timm.create_model("local-dir:PATH/TO/THIS/DIRECTORY", pretrained=True)'):
            assert needle in card, (name, needle)
    # a run directory whose checkpoints are gone still loads from its exports
    import shutil
    shutil.rmtree(out / "checkpoints")
    model, _, source = load_from_run(out, "ema")
    assert source["kind"] == "export" and all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["stage"] == "refine"


def test_bad_config_fails_before_work(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch/refine.py"), "--config", str(ROOT / "configs/demo.yaml"),
           "augment.local_size=15", f"run.out_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "augment.local_size" in proc.stderr
