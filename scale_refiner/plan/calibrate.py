"""Calibration: from benchmark rows (the JSON lines ``bench/runner.py`` writes, e.g. ``benchmarks.jsonl`` of
``launch/gpu_check.sh``), the compute efficiency that makes the planner's predicted step time equal the measured
one, per efficiency key (card, model, checkpointing mode, compile: ``efficiency.py``), as a table the planner loads.

Each row is matched to the prediction for the same recipe as it ran: ``configs/<config>.yaml`` with the row's
engine (``deepspeed-zeroN`` as ``ds_configs/zeroN.json``: the row does not name its JSON), bf16, the row's
``checkpointing``, ``freeze_blocks`` and ``compile`` (missing: false), ``world`` ranks of ``per_rank_batch``
samples in one micro-batch (as the benchmark runs them), on the planner's card for the row's ``device_name``.
The fit solves ``predict_time(..., efficiency).step_s == step_time_s`` for the efficiency by bisection (the step
time falls as the efficiency rises), so it holds for whatever the time model puts beside the compute: one rank
has no collectives, and the optimiser/EMA and data terms are subtracted as predicted. A key measured by several
rows takes the median of their fitted values.

Rows that cannot calibrate the planner are skipped with a note saying which and why (CPU rows, no GPU device
name, not bf16, not the refine stage); a row the planner cannot be matched to (an unknown card, a config that
is not in the repository, a missing or impossible key) is an error naming the file, line and key.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from scale_refiner.plan.efficiency import Efficiency, EfficiencyArg, EfficiencyTable, default_table, mode_of
from scale_refiner.plan.hardware import GPUS, card_of_device

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("config", "engine", "world", "per_rank_batch", "step_time_s", "dtype", "stage")
# the bounds of the search: beyond 1 the model counts more FLOPs than a GPU can run; under 0.001 the row is no
# training step the model describes
LOWEST, HIGHEST = 1e-3, 1.0


class CalibrationError(ValueError):
    """A row the planner cannot be matched to, named by file, line and key."""


@dataclass
class MeasuredRow:
    where: str            # "FILE line N"
    row: Dict
    card: str             # the planner's card for row["device_name"]

    @property
    def step_s(self) -> float:
        return float(self.row["step_time_s"])

    @property
    def per_rank(self) -> int:
        return int(self.row["per_rank_batch"])

    @property
    def compiled(self) -> bool:
        return bool(self.row.get("compile", False))  # rows written before the key existed ran eager

    @property
    def label(self) -> str:
        r = self.row
        ckpt = r.get("checkpointing", "?")
        ckpt = ("every" if ckpt else "off") if isinstance(ckpt, bool) else ckpt
        return (f"{r['config']} {r['engine']} x{r['world']} b{self.per_rank} ckpt {ckpt}"
                f"{' compiled' if self.compiled else ''}")


def read_rows(paths: Sequence[str]) -> Tuple[List[MeasuredRow], List[str]]:
    """The GPU rows of every file (JSON lines), and a note for each row skipped."""
    rows, notes = [], []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"benchmark rows {path} do not exist")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(f"{where}: not a JSON line ({err.msg})") from None
            if not isinstance(row, dict):
                raise CalibrationError(f"{where}: not a JSON object")
            device, name = row.get("device"), (row.get("device_name") or "").strip()
            if device == "cpu" or name.lower() == "cpu":
                notes.append(f"skipped {where}: a CPU row ({row.get('config', '?')}); the planner predicts GPUs")
                continue
            if not name:
                notes.append(f"skipped {where}: no GPU device name (key 'device_name'), so no card to calibrate")
                continue
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise CalibrationError(f"{where}: key {missing[0]!r} is missing (a benchmark row has "
                                       f"{', '.join(REQUIRED)})")
            if row["dtype"] != "bfloat16" and row["dtype"] != "bf16":
                notes.append(f"skipped {where}: dtype {row['dtype']}; the planner's peak is dense bf16")
                continue
            if row["stage"] != "refine":
                notes.append(f"skipped {where}: stage {row['stage']}; the table holds refine-stage efficiencies")
                continue
            for key in ("step_time_s", "per_rank_batch", "world"):
                if not isinstance(row[key], (int, float)) or isinstance(row[key], bool) or row[key] <= 0:
                    raise CalibrationError(f"{where}: key {key!r} is {row[key]!r}, not a positive number")
            try:
                card = card_of_device(name)
            except ValueError as err:
                raise CalibrationError(f"{where}: {err}") from None
            rows.append(MeasuredRow(where, row, card))
    return rows, notes


def _overrides(m: MeasuredRow) -> List[str]:
    r = m.row
    engine = r["engine"]
    if engine in ("single", "fsdp2"):
        out = [f"engine.kind={engine}"]
    elif engine.startswith("deepspeed-zero"):
        json_path = f"ds_configs/zero{engine[len('deepspeed-zero'):]}.json"
        if not (ROOT / json_path).is_file():
            raise CalibrationError(f"{m.where}: key 'engine' is {engine!r}, and {json_path} does not exist")
        out = ["engine.kind=deepspeed", f"engine.zero_config={json_path}"]
    else:
        raise CalibrationError(f"{m.where}: key 'engine' is {engine!r}, not single, fsdp2 or deepspeed-zeroN")
    out.append("engine.precision=bf16")
    if "checkpointing" in r:
        value = r["checkpointing"]
        out.append(f"model.checkpointing={str(value).lower() if isinstance(value, bool) else value}")
    if "freeze_blocks" in r:
        out.append(f"model.freeze_blocks={int(r['freeze_blocks'])}")
    return out


@dataclass
class Matched:
    """A row and the planner's recipe for it: everything ``predict_time`` takes but the efficiency."""
    measured: MeasuredRow
    cfg: object
    counts: object
    setting: object
    model: str
    mode: str

    @property
    def key(self):
        return (self.measured.card, self.model, self.mode, self.measured.compiled)

    def predict(self, efficiency: EfficiencyArg):
        from scale_refiner.plan.search import compute_bytes_of
        from scale_refiner.plan.timing import predict_time
        m = self.measured
        return predict_time(self.cfg, self.counts, self.setting, GPUS[m.card], int(m.row["world"]), m.per_rank,
                            efficiency, compute_bytes_of(self.cfg))


def match(m: MeasuredRow, root: Path = ROOT) -> Matched:
    """The planner's recipe for a row, as it ran."""
    from scale_refiner.config import ConfigError, load_config
    from scale_refiner.plan.counts import meta_refiner, model_counts
    from scale_refiner.plan.settings import setting_of_config
    name = str(m.row["config"])
    path = Path(name) if name.endswith((".yaml", ".yml")) else Path("configs") / f"{name}.yaml"
    path = path if path.is_absolute() else Path(root) / path
    if not path.is_file():
        raise CalibrationError(f"{m.where}: key 'config' is {name!r}, and {path} does not exist")
    try:
        cfg = load_config(path, _overrides(m))
    except ConfigError as err:
        raise CalibrationError(f"{m.where}: {err}") from None
    world = int(m.row["world"])
    cfg.data.batch_size = m.per_rank * world
    # set after loading: the validation of model.compile wants a C++ compiler, which a prediction does not
    cfg.model.compile = m.compiled
    counts = model_counts(cfg, "refine", meta_refiner(cfg))
    setting = setting_of_config(cfg, root)
    mode = mode_of(setting.checkpointing, counts.depth - cfg.model.freeze_blocks)
    return Matched(m, cfg, counts, setting, cfg.model.name, mode)


def fit(matched: Matched) -> Tuple[Optional[float], str]:
    """(the efficiency whose predicted step time is the measured one, "") or (None, why there is none)."""
    measured = matched.measured.step_s
    fastest = matched.predict(HIGHEST).step_s
    if fastest > measured:
        return None, (f"measured {measured:.4f} s is faster than the model predicts at {HIGHEST:.0%} of peak "
                      f"({fastest:.4f} s): its FLOPs or its other terms are too high for this row")
    if matched.predict(LOWEST).step_s < measured:
        return None, f"measured {measured:.4f} s is slower than the model predicts at {LOWEST:.1%} of peak"
    lo, hi = LOWEST, HIGHEST  # step(lo) >= measured >= step(hi)
    for _ in range(80):       # the ratio hi / lo reaches 1 to double precision long before
        mid = (lo * hi) ** 0.5
        if matched.predict(mid).step_s > measured:
            lo = mid
        else:
            hi = mid
        if hi / lo - 1 < 1e-13:
            break
    return (lo * hi) ** 0.5, ""


@dataclass
class RowResult:
    matched: Matched
    fitted: Optional[float]
    why_not: str
    before: object = None   # TimePrediction at the efficiency the planner used before this calibration
    after: object = None    # TimePrediction with the calibrated table


@dataclass
class Calibration:
    results: List[RowResult]
    table: EfficiencyTable            # the fitted entries only
    notes: List[str] = field(default_factory=list)


def _entry(key, results: List[RowResult]) -> Efficiency:
    rows = [r.matched.measured for r in results]
    dates = sorted(str(m.row.get("time", ""))[:10] for m in rows if m.row.get("time"))
    join = lambda values: ", ".join(sorted({v for v in values if v}))  # noqa: E731
    return Efficiency(card=key[0], model=key[1], checkpointing=key[2], compile=key[3],
                      efficiency=statistics.median(r.fitted for r in results),
                      device=join(m.row.get("device_name", "") for m in rows), date=dates[-1] if dates else "",
                      torch=join(str(m.row.get("torch", "")) for m in rows),
                      rows=tuple(f"{m.where}: {m.label}" for m in rows))


def calibrate(paths: Sequence[str], before: EfficiencyArg = None, root: Path = ROOT) -> Calibration:
    """Fit every key the rows of ``paths`` measure; ``before``: what the planner used until now (a number, a
    table, or None: the defaults), for the before / after comparison."""
    rows, notes = read_rows(paths)
    if not rows:
        raise CalibrationError(f"no GPU benchmark row to calibrate with in {', '.join(map(str, paths))}"
                               + (f" ({len(notes)} skipped)" if notes else ""))
    results = []
    for m in rows:
        matched = match(m, root)
        value, why = fit(matched)
        results.append(RowResult(matched, value, why, before=matched.predict(before)))
    by_key: Dict = {}
    for r in results:
        if r.fitted is not None:
            by_key.setdefault(r.matched.key, []).append(r)
    table = EfficiencyTable.of((_entry(k, rs) for k, rs in by_key.items()), origin="calibrated")
    # after: the table the next plans load, the fitted entries over the one used before (a number given before
    # is no table: the defaults then)
    after = (before if isinstance(before, EfficiencyTable) else default_table()).merged(table)
    for r in results:
        r.after = r.matched.predict(after)
    return Calibration(results, table, notes)


def _tag(source: str) -> str:
    """A prediction's efficiency source in one word, for the table's column."""
    for word in ("assumed", "given", "fallback", "measured"):  # "assumed (nothing measured ...)" is assumed
        if word in source:
            return word
    return "?"


def calibration_text(cal: Calibration, written: Optional[str] = None) -> str:
    lines = [f"Calibration of the planner's compute efficiency (of hardware FLOPs, recomputation included) from "
             f"{len(cal.results)} benchmark row(s)"]
    lines += cal.notes
    lines += ["",
              "| row | card | key (model, checkpointing, compile) | measured img/s | measured step s | before: eff "
              "| img/s | step s | predicted / measured | after: eff | img/s | step s | predicted / measured |",
              "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in cal.results:
        m, b, a = r.matched.measured, r.before, r.after
        measured_ips = m.per_rank / m.step_s
        key = f"{r.matched.model}, {r.matched.mode}, {'compiled' if m.compiled else 'eager'}"
        after = (f"{a.efficiency:.3f} | {a.images_per_s_per_gpu:.1f} | {a.step_s:.4f} | {a.step_s / m.step_s:.3f}"
                 if r.fitted is not None else f"not fitted | | | ")
        lines.append(f"| {m.where}: {m.label} | {m.card} | {key} | {measured_ips:.1f} | {m.step_s:.4f} | "
                     f"{b.efficiency:.3f} {_tag(b.efficiency_source)} | {b.images_per_s_per_gpu:.1f} | "
                     f"{b.step_s:.4f} | {b.step_s / m.step_s:.3f} | {after} |")
    lines += ["", "(predicted / measured of the step time; the measured img/s is per rank)"]
    for r in cal.results:
        if r.fitted is None:
            lines.append(f"not fitted, {r.matched.measured.where}: {r.why_not}")
    lines += ["", "Fitted terms:"]
    for e in sorted(cal.table.entries.values(), key=lambda e: e.key):
        lines.append(f"  {e.card} {e.model}, checkpointing {e.checkpointing}, {'compiled' if e.compile else 'eager'}: "
                     f"{e.efficiency:.4f} ({e.measured_on}; {len(e.rows)} row{'s' if len(e.rows) > 1 else ''})")
    if written:
        lines += ["", f"written to {written}; the next plans use it with:",
                  f"  python launch/plan.py --config CONFIG --efficiency {written}"]
    return "\n".join(lines)


def rows_as_json(cal: Calibration) -> List[Dict]:
    out = []
    for r in cal.results:
        m = r.matched.measured
        out.append({"row": m.where, "label": m.label, "card": m.card, "model": r.matched.model,
                    "checkpointing": r.matched.mode, "compile": m.compiled, "measured_step_s": m.step_s,
                    "measured_images_per_s_per_rank": m.per_rank / m.step_s, "fitted": r.fitted,
                    "why_not": r.why_not,
                    "before": {k: getattr(r.before, k) for k in ("efficiency", "efficiency_source", "step_s",
                                                                 "images_per_s_per_gpu")},
                    "after": {k: getattr(r.after, k) for k in ("efficiency", "efficiency_source", "step_s",
                                                               "images_per_s_per_gpu")}})
    return out


def write_table(cal: Calibration, path: str, keep: Iterable[Efficiency] = ()) -> EfficiencyTable:
    """The calibrated table written to ``path``: the fitted entries over ``keep`` (an earlier calibration)."""
    table = EfficiencyTable.of(keep).merged(cal.table)
    table.save(path)
    return table
