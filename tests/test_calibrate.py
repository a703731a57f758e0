"""The planner's compute efficiency learnt from measurement (scale_refiner/plan/efficiency.py, calibrate.py):
benchmark rows fitted back to the efficiency they were made at, the two H200 rows, the fallback rule, the rows
that are skipped or refused, and ``launch/plan.py --calibrate`` end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
H200_ROWS = ROOT / "docs/measurements/h200_2026-11-30.jsonl"


def _row(config="mae_l16", engine="single", world=1, batch=64, checkpointing=True, freeze=0, device="NVIDIA H200",
         step=1.0, **extra):
    """A benchmark row as bench/runner.py writes one (the keys calibration reads, and a few it does not)."""
    row = {"config": config, "engine": engine, "stage": "refine", "variant": "", "world": world, "device": "cuda",
           "device_name": device, "dtype": "bfloat16", "per_rank_batch": batch, "global_batch": batch * world,
           "step_time_s": step, "images_per_s_per_rank": batch / step, "checkpointing": checkpointing,
           "heads_norm": "syncbn", "freeze_blocks": freeze, "torch": "2.11.0+cu130", "time": "2026-12-01T10:00:00Z"}
    row.update(extra)
    return row


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _synthesised(rows_at, tmp_path):
    """Rows whose step time is the planner's own prediction at a known efficiency: (row, efficiency) pairs in,
    the jsonl path out."""
    from scale_refiner.plan.calibrate import MeasuredRow, match
    from scale_refiner.plan.hardware import card_of_device
    rows = []
    for row, efficiency in rows_at:
        matched = match(MeasuredRow("synthesised", row, card_of_device(row["device_name"])))
        rows.append({**row, "step_time_s": matched.predict(efficiency).step_s})
    return _write(tmp_path / "synthesised.jsonl", rows)


def test_rows_made_at_a_known_efficiency_are_fitted_back_exactly(tmp_path):
    """One rank (compute, optimiser and data only), FSDP2 on 2 ranks and ZeRO-3 on 8 (collectives exposed beside
    the compute), a compiled row and an H100 row: each key comes back at the efficiency its row was made at, and
    the calibrated prediction of every row is its measured step time."""
    from scale_refiner.plan.calibrate import calibrate
    made = [
        (_row(batch=64, checkpointing=True), 0.31),                                         # one rank
        (_row(engine="fsdp2", world=2, batch=32, checkpointing=False), 0.44),               # collectives
        (_row(engine="deepspeed-zero3", world=8, batch=4, checkpointing=3), 0.27),          # ZeRO-3, N blocks
        (_row(batch=64, checkpointing="selective", compile=True), 0.55),                    # compiled
        (_row(batch=64, checkpointing=True, device="NVIDIA H100 80GB HBM3"), 0.36),         # another card
    ]
    cal = calibrate([str(_synthesised(made, tmp_path))])
    assert [r.matched.mode for r in cal.results] == ["every", "off", "blocks", "selective", "every"]
    for (row, efficiency), r in zip(made, cal.results):
        assert r.fitted == pytest.approx(efficiency, rel=1e-9), row
        assert r.after.step_s == pytest.approx(r.matched.measured.step_s, rel=1e-9)
        assert r.after.efficiency == pytest.approx(efficiency, rel=1e-9)
    # the ZeRO-3 row has communication the compute does not hide: the fit is not the compute-only one
    zero3 = cal.results[2]
    assert zero3.after.exposed_comm_s > 0
    keys = {k: e.efficiency for k, e in cal.table.entries.items()}
    assert keys == pytest.approx({("h200", "vit_large_patch16", "every", False): 0.31,
                                  ("h200", "vit_large_patch16", "off", False): 0.44,
                                  ("h200", "vit_large_patch16", "blocks", False): 0.27,
                                  ("h200", "vit_large_patch16", "selective", True): 0.55,
                                  ("h100-80gb", "vit_large_patch16", "every", False): 0.36}, rel=1e-9)


def test_a_key_measured_twice_takes_the_median_and_an_impossible_row_is_not_fitted(tmp_path):
    from scale_refiner.plan.calibrate import calibrate
    path = _synthesised([(_row(batch=64), 0.30), (_row(batch=32), 0.50), (_row(batch=16), 1.0)], tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["step_time_s"] *= 0.5  # twice as fast as the model allows at 100 % of peak
    cal = calibrate([str(_write(path, rows))])
    assert [r.fitted is None for r in cal.results] == [False, False, True]
    assert "faster than the model predicts" in cal.results[2].why_not
    (entry,) = cal.table.entries.values()
    assert entry.efficiency == pytest.approx(0.40, rel=1e-9) and len(entry.rows) == 2


def test_the_h200_rows_give_0_38_and_0_52_and_are_the_planners_defaults():
    """The two rows of the 2026-11-30 H200 run: ViT-L/16 single and ViT-2B/14 FSDP2, every trained block
    checkpointed. Before calibration, at 0.4, they were predicted 6 % fast and 30 % slow."""
    from scale_refiner.plan.calibrate import calibrate
    from scale_refiner.plan.efficiency import default_table
    cal = calibrate([str(H200_ROWS)], before=0.4)
    fitted = {k: e.efficiency for k, e in cal.table.entries.items()}
    assert fitted[("h200", "vit_large_patch16", "every", False)] == pytest.approx(0.38, abs=0.005)
    assert fitted[("h200", "vit_2b_patch14", "every", False)] == pytest.approx(0.52, abs=0.005)
    before = [r.before.step_s / r.matched.measured.step_s for r in cal.results]
    assert before == pytest.approx([0.946, 1.296], abs=0.002)
    for r in cal.results:
        assert r.after.step_s == pytest.approx(r.matched.measured.step_s, rel=1e-9)
        assert r.after.images_per_s_per_gpu == pytest.approx(r.matched.measured.row["images_per_s_per_rank"])
    # the planner's defaults hold these, named with the card and date
    defaults = default_table().entries
    for key, value in fitted.items():
        entry = defaults[key]
        assert entry.efficiency == pytest.approx(value, rel=1e-9)
        assert (entry.device, entry.date, entry.torch) == ("NVIDIA H200", "2026-11-30", "2.11.0+cu130")


def test_the_defaults_are_the_calibration_of_the_measurements_folder(monkeypatch):
    """efficiency_defaults.json is what --calibrate writes for docs/measurements/ (docs/planner.md says how to
    add a measurement): no value in it was typed by hand."""
    from scale_refiner.plan.calibrate import calibrate
    from scale_refiner.plan.efficiency import default_table
    monkeypatch.chdir(ROOT)  # the entries name their rows by the path given, relative to the repository
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs/measurements").glob("*.jsonl"))
    rounded = lambda table: [{**e, "efficiency": round(e["efficiency"], 12)}  # noqa: E731
                             for e in table.as_dict()["entries"]]
    assert rounded(calibrate(files).table) == rounded(default_table())


def test_the_fallback_rule():
    """Measured only for ViT-L under every-block checkpointing, eager, on the H200: another mode takes it, a
    compiled step takes the eager value, an H100 the H200's, an eager step never a compiled value, and a card of
    another architecture, a custom card or another model the assumed 0.4."""
    from scale_refiner.plan.efficiency import ASSUMED, Efficiency, EfficiencyTable
    from scale_refiner.plan.hardware import resolve_gpu
    table = EfficiencyTable.of([
        Efficiency("h200", "vit_large_patch16", "every", False, 0.38, "NVIDIA H200", "2026-11-30"),
        Efficiency("h200", "vit_large_patch16", "off", False, 0.41, "NVIDIA H200", "2026-11-30"),
        Efficiency("h200", "vit_huge_patch14", "every", True, 0.47, "NVIDIA H200", "2026-12-01")])
    h200, h100 = resolve_gpu("h200"), resolve_gpu("h100-80gb")
    exact = table.lookup(h200, "vit_large_patch16", "off", False)
    assert exact.value == 0.41 and "fallback" not in exact.source and "NVIDIA H200 2026-11-30" in exact.source
    assert table.lookup(h200, "vit_large_patch16", "selective", False).value == 0.38  # "every" comes first
    other = table.lookup(h200, "vit_large_patch16", "blocks", True)
    assert other.value == 0.38 and "eager taken for compiled" in other.source
    kin = table.lookup(h100, "vit_large_patch16", "off", False)
    assert kin.value == 0.41 and "h200 taken for h100-80gb" in kin.source
    assert table.lookup(h200, "vit_huge_patch14", "every", False).value == ASSUMED   # no compiled value for eager
    assert table.lookup(h200, "vit_huge_patch14", "every", True).value == 0.47
    for gpu in (resolve_gpu("a100-80gb"), resolve_gpu("custom", memory_gb=80, peak_tflops=989)):
        assumed = table.lookup(gpu, "vit_large_patch16", "every", False)
        assert assumed.value == ASSUMED and "assumed" in assumed.source and assumed.entry is None
    assert table.lookup(h200, "vit_2b_patch14", "every", False).value == ASSUMED


def test_cpu_rows_and_rows_without_a_device_name_are_skipped_and_named(tmp_path):
    from scale_refiner.plan.calibrate import read_rows
    path = _write(tmp_path / "rows.jsonl", [
        {**_row(), "device": "cpu", "device_name": "cpu"},
        {**_row(), "device_name": ""},
        _row(),
        {**_row(), "dtype": "float32"},
        {**_row(), "stage": "heads"}])
    rows, notes = read_rows([str(path)])
    assert [m.where for m in rows] == [f"{path} line 3"]
    assert len(notes) == 4
    assert notes[0].startswith(f"skipped {path} line 1: a CPU row")
    assert notes[1].startswith(f"skipped {path} line 2: no GPU device name")
    assert "line 4: dtype float32" in notes[2] and "line 5: stage heads" in notes[3]


@pytest.mark.parametrize("row, named", [
    (_row(device="NVIDIA L40S"), "'NVIDIA L40S'"),
    ({k: v for k, v in _row().items() if k != "step_time_s"}, "'step_time_s'"),
    (_row(config="mae_nonexistent"), "'mae_nonexistent'"),
    (_row(engine="megatron"), "'megatron'"),
    ({**_row(), "step_time_s": 0}, "'step_time_s' is 0"),
])
def test_a_row_the_planner_cannot_match_is_refused_naming_it(tmp_path, row, named):
    from scale_refiner.plan.calibrate import CalibrationError, calibrate
    path = _write(tmp_path / "rows.jsonl", [_row(), row])
    with pytest.raises(CalibrationError) as err:
        calibrate([str(path)])
    message = str(err.value)
    assert f"{path} line 2" in message and named in message and "\n" not in message


def test_predictions_name_their_efficiency():
    """The default is the measured table, a number given is used as it is, and each says so."""
    from scale_refiner.config import load_config
    from scale_refiner.plan.counts import model_counts
    from scale_refiner.plan.hardware import resolve_gpu
    from scale_refiner.plan.settings import Setting
    from scale_refiner.plan.timing import predict_time
    cfg = load_config(ROOT / "configs/mae_l16.yaml")
    counts = model_counts(cfg, "refine")
    default = predict_time(cfg, counts, Setting("fsdp2", True), resolve_gpu("h200"), 8, 16)
    assert default.efficiency == pytest.approx(0.378, abs=0.001)
    assert default.efficiency_source.startswith("0.378 measured on NVIDIA H200 2026-11-30")
    given = predict_time(cfg, counts, Setting("fsdp2", True), resolve_gpu("h200"), 8, 16, 0.4)
    assert given.efficiency == 0.4 and given.efficiency_source == "0.400 given"
    assert given.compute_s == pytest.approx(default.compute_s * default.efficiency / 0.4)


def test_cli_calibrates_and_the_next_plan_uses_the_measurement(tmp_path):
    """``plan --calibrate`` on a jsonl with a CPU row and a ViT-L row measured at 150 img/s on the H200 (slower
    than the 195.8 of the defaults): the table shows the row before (at the default) and after (matching), the
    written table makes the next plan of the same recipe predict 150 img/s and name its source."""
    rows = _write(tmp_path / "benchmarks.jsonl", [
        {**_row(), "device": "cpu", "device_name": "cpu"},
        _row(batch=512, checkpointing=True, step=512 / 150.0, time="2026-12-07T01:00:00Z")])
    table = tmp_path / "efficiency.json"
    out = subprocess.run([sys.executable, str(ROOT / "launch/plan.py"), "--calibrate", str(rows), "--write",
                          str(table)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"skipped {rows} line 1: a CPU row" in text
    line = next(l for l in text.splitlines() if l.startswith(f"| {rows} line 2"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # measured img/s, before: the default 0.378 at 195.8 img/s; after: 150.0, predicted / measured 1.000
    assert cells[3] == "150.0" and cells[5] == "0.378 measured" and cells[6] == "195.8"
    assert cells[10:] == ["150.0", cells[4], "1.000"]
    assert float(cells[9]) == pytest.approx(0.378 * 150 / 195.8, abs=0.003)
    assert "Fitted terms:" in text and f"--efficiency {table}" in text
    saved = json.loads(table.read_text())["entries"]
    assert [(e["card"], e["model"], e["checkpointing"], e["compile"], e["date"]) for e in saved] == \
        [("h200", "vit_large_patch16", "every", False, "2026-12-07")]
    plan = subprocess.run([sys.executable, str(ROOT / "launch/plan.py"), "--config", "configs/mae_l16.yaml",
                           "--gpus", "1", "--gpu", "h200", "--efficiency", str(table), "--json",
                           "data.batch_size=512"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    plans = json.loads(plan.stdout)["plans"]
    single = next(p for p in plans if p["setting"]["kind"] == "single" and p["setting"]["checkpointing"] is True)
    assert single["micro_batch"] == 512
    refine = single["time"]["refine"]
    assert refine["images_per_s_per_gpu"] == pytest.approx(150.0, rel=1e-6)
    assert "measured on NVIDIA H200 2026-12-07" in refine["efficiency_source"]
    # a mode the row did not measure takes it by the fallback rule, and says so
    off = next(p for p in plans if p["setting"]["kind"] == "single" and p["setting"]["checkpointing"] is False)
    assert off["time"]["refine"]["efficiency"] == pytest.approx(float(cells[9]), abs=0.001)
    assert "checkpointing every taken for off" in off["time"]["refine"]["efficiency_source"]


def test_cli_refuses_an_unknown_card_naming_it(tmp_path):
    rows = _write(tmp_path / "rows.jsonl", [_row(device="NVIDIA H100 PCIe")])
    out = subprocess.run([sys.executable, str(ROOT / "launch/plan.py"), "--calibrate", str(rows)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "'NVIDIA H100 PCIe'" in out.stderr and "line 1" in out.stderr
