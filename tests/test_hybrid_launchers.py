"""Hybrid sharding through the launchers users run, 4 CPU ranks as 2 "nodes" x 2 (gloo).

- FSDP2 on the 2 x 2 mesh (``engine.fsdp_replicate=2``, torchrun): both stages (heads, refine) give the plain
  4-rank FSDP2 run's losses and end state; stop + resume under the 2 x 2 mesh is bit-identical;
- ZeRO++ hpZ (``zero_hpz_partition_size=2``, deepspeed): the plain ZeRO-3 run's losses and end state.
"""
import json

import pytest
import torch

from test_bf16_launchers import BOTH
from test_launchers import assert_same_weights, end_state, launch, losses

HSDP = ["engine.fsdp_replicate=2"]


@pytest.fixture(scope="module")
def fsdp2_4(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2x4")
    launch("fsdp2", out, BOTH, ranks=4)
    return out


@pytest.fixture(scope="module")
def hsdp_2x2(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp2x2")
    launch("fsdp2", out, BOTH + HSDP, ranks=4)
    return out


def test_hsdp_both_stages_equal_plain_fsdp2(fsdp2_4, hsdp_2x2):
    a, b = losses(fsdp2_4), losses(hsdp_2x2)
    assert len(a) == len(b) == 6
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4), (a, b)
    assert_same_weights(fsdp2_4, hsdp_2x2)
    heads_a, heads_b = end_state(fsdp2_4, "heads"), end_state(hsdp_2x2, "heads")
    assert all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a if k.startswith("encoder."))  # frozen whole


def test_hsdp_resume_is_bit_identical(hsdp_2x2, tmp_path):
    launch("fsdp2", tmp_path, BOTH + HSDP + ["run.stop_after=2"], ranks=4)  # stops inside the heads stage
    assert (tmp_path / "checkpoints/latest").read_text() == "heads-0000002"
    launch("fsdp2", tmp_path, BOTH + HSDP + ["run.resume=auto"], ranks=4)
    straight, resumed = end_state(hsdp_2x2), end_state(tmp_path)
    assert straight.keys() == resumed.keys()
    for key in straight:
        a, b = straight[key], resumed[key]
        if isinstance(a, dict):  # a queue's extra state: its pick generator
            a, b = a["generator"], b["generator"]
        assert torch.equal(a, b), key
    assert losses(hsdp_2x2)[-1] == losses(tmp_path)[-1]


def test_zero3_hpz_equals_plain_zero3(tmp_path):
    config = json.loads(open("ds_configs/cpu_demo.json").read())
    config["zero_optimization"]["zero_hpz_partition_size"] = 2
    (tmp_path / "hpz.json").write_text(json.dumps(config))
    launch("deepspeed", tmp_path / "plain", BOTH, ranks=4)
    launch("deepspeed", tmp_path / "hpz", BOTH + [f"engine.zero_config={tmp_path / 'hpz.json'}"], ranks=4)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "hpz")
    assert len(a) == len(b) == 6
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4), (a, b)
    assert_same_weights(tmp_path / "plain", tmp_path / "hpz")


def test_hsdp_with_the_frozen_prefix_replicated_equals_plain_fsdp2(fsdp2_4, tmp_path):
    """Both stages: the heads stage holds the whole encoder replicated, hands it to the refine stage (built on the
    meta device, its frozen prefix filled whole, the rest shard by shard), whose first block is replicated."""
    launch("fsdp2", tmp_path, BOTH + HSDP + ["engine.replicate_frozen=true"], ranks=4)
    a, b = losses(fsdp2_4), losses(tmp_path)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4), (a, b)
    assert_same_weights(fsdp2_4, tmp_path)
    assert (tmp_path / "checkpoints/refine-end/frozen_params.pt").is_file()
    start, end = end_state(tmp_path, "heads"), end_state(tmp_path)
    frozen = [k for k in start if k.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed",
                                                "encoder.blocks.0."))]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)
