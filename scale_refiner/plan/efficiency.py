"""The compute efficiency the time model runs at: a table of measured values per (card, model, checkpointing mode,
compile), with a fallback rule for what was never measured, and its file format.

What the efficiency is: the fraction of the card's dense bf16 peak (``hardware.GPU.peak_tflops``) that the
step's *hardware* FLOPs reach in the compute part of the step -- model FLOPs plus the forward recomputed by
checkpointed blocks (``bench/flops.py``'s ``hardware``), divided by the compute time alone (the step less the
exposed communication, optimiser/EMA and data the time model puts beside it). It is not MFU: MFU counts the
model FLOPs only, over the whole step, so it is lower (the H200's ViT-L/16 row: efficiency 0.38, MFU 28 %).

A key is (card, model, mode, compile): ``card`` the planner's card name (``hardware.GPUS``), ``model`` the
recipe's ``model.name``, ``mode`` the checkpointing of the trained blocks as one of ``MODES`` (``off``; ``every``
trained block; the first N, ``blocks``; ``selective``), ``compile`` ``model.compile``. The table holds
refine-stage measurements and the planner applies the refine stage's value to the heads stage too.

The fallback for a key the table lacks, first match wins (``lookup``):
  1. the key itself;
  2. the same card, model and compile, another checkpointing mode, in the order of ``MODES``: every mode runs
     the same matmuls (recomputation is more forwards of the same blocks, counted in the hardware FLOPs), so
     their efficiency differs little; selective's extra pointwise time is a term of its own in ``timing``;
  3. compiled only: 1-2 for the same model run eager. A compiled step is at least as fast, so the eager value
     under-sells compile rather than over-selling it; an eager key never takes a compiled value;
  4. 1-3 on another card of the same architecture (``GPU.arch``, e.g. H100 and H200: the same tensor cores and
     989 TFLOP/s bf16 peak; the compute is matmul-bound, and the HBM bandwidth they differ in is a term of its
     own in ``timing``);
  5. ``ASSUMED`` (0.4), an assumption, for a model never measured on that architecture.
``Resolved.source`` says which one a prediction used.

``DEFAULT_TABLE`` is ``efficiency_defaults.json`` beside this file: the planner's measured defaults, written by
``launch/plan.py --calibrate`` from benchmark rows (docs/planner.md "Calibration").
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

from scale_refiner.plan.hardware import GPU, GPUS

# What the planner assumes where nothing was measured: a guess at what a well-fed ViT step reaches (the H200
# measured 0.38 for ViT-L/16 and 0.52 for ViT-2B/14, so it lies between them)
ASSUMED = 0.4

MODES = ("every", "blocks", "off", "selective")
FALLBACK = "; fallback: "  # in a source, what follows says which steps of the fallback rule it took, "; " apart
FORMAT = "scale_refiner planner efficiency table, version 1"
RELATIVE_TO = ("fraction of the card's dense bf16 peak reached by the step's hardware FLOPs (model FLOPs plus "
               "the recomputed forwards of checkpointed blocks) in the step's compute time (the step less exposed "
               "communication, optimiser/EMA and host-to-device data as plan/timing.py predicts them)")
DEFAULT_PATH = Path(__file__).with_name("efficiency_defaults.json")

Key = Tuple[str, str, str, bool]


def mode_of(checkpointing, trained: int) -> str:
    """``model.checkpointing`` of a model training ``trained`` blocks -> one of ``MODES``."""
    from scale_refiner.models.vit import checkpointing_plan
    policy, count = checkpointing_plan(checkpointing, trained)
    if policy == "none":
        return "off"
    if policy == "selective":
        return "selective"
    return "every" if count >= trained else "blocks"


@dataclass(frozen=True)
class Efficiency:
    """One measured entry: the value and where it was measured."""
    card: str                 # the planner's card (hardware.GPUS)
    model: str                # model.name
    checkpointing: str        # one of MODES
    compile: bool
    efficiency: float
    device: str = ""          # the measured device's name, as torch reports it
    date: str = ""            # YYYY-MM-DD of the measurement (the latest, over several rows)
    torch: str = ""
    rows: Tuple[str, ...] = ()  # the benchmark rows it was fitted from, in words

    @property
    def key(self) -> Key:
        return (self.card, self.model, self.checkpointing, self.compile)

    @property
    def measured_on(self) -> str:
        torch = f", torch {self.torch}" if self.torch else ""
        return f"measured on {self.device or self.card} {self.date or '(undated)'}{torch}"

    def as_dict(self) -> Dict:
        out = asdict(self)
        out["rows"] = list(self.rows)
        return out

    @classmethod
    def from_dict(cls, data: Dict, where: str) -> "Efficiency":
        missing = [k for k in ("card", "model", "checkpointing", "compile", "efficiency") if k not in data]
        if missing:
            raise ValueError(f"{where}: entry lacks {', '.join(missing)}")
        if data["checkpointing"] not in MODES:
            raise ValueError(f"{where}: checkpointing {data['checkpointing']!r} is not one of {', '.join(MODES)}")
        if data["card"] not in GPUS:
            raise ValueError(f"{where}: card {data['card']!r} is not one the planner knows ({', '.join(GPUS)})")
        value = float(data["efficiency"])
        if not 0 < value <= 1:
            raise ValueError(f"{where}: efficiency {value} is outside (0, 1]")
        return cls(card=data["card"], model=data["model"], checkpointing=data["checkpointing"],
                   compile=bool(data["compile"]), efficiency=value, device=data.get("device", ""),
                   date=data.get("date", ""), torch=data.get("torch", ""), rows=tuple(data.get("rows", ())))


@dataclass(frozen=True)
class Resolved:
    """The efficiency one prediction runs at, and in words where it came from."""
    value: float
    source: str
    entry: Optional[Efficiency] = None  # the table's entry used (None: assumed or given)


@dataclass
class EfficiencyTable:
    entries: Dict[Key, Efficiency] = field(default_factory=dict)
    origin: str = ""  # the file(s) it was read from

    @classmethod
    def of(cls, entries: Iterable[Efficiency], origin: str = "") -> "EfficiencyTable":
        return cls({e.key: e for e in entries}, origin)

    def merged(self, other: "EfficiencyTable") -> "EfficiencyTable":
        """This table with ``other``'s entries added, ``other`` winning where both have a key."""
        origin = " + ".join(o for o in (self.origin, other.origin) if o)
        return EfficiencyTable({**self.entries, **other.entries}, origin)

    def lookup(self, gpu: GPU, model: str, mode: str, compiled: bool) -> Resolved:
        """The efficiency of ``model`` under checkpointing ``mode`` (and compile) on ``gpu``, by the fallback rule
        of this module's docstring."""
        modes = [mode] + [m for m in MODES if m != mode]
        variants = [compiled] + ([False] if compiled else [])
        # a card of the same architecture (and a custom card has none: it takes nothing measured elsewhere)
        kin = [name for name, g in GPUS.items() if gpu.arch and g.arch == gpu.arch and name != gpu.name]
        for card in [gpu.name] + kin:
            for c in variants:
                for m in modes:
                    entry = self.entries.get((card, model, m, c))
                    if entry is None:
                        continue
                    how = []
                    if m != mode:
                        how.append(f"checkpointing {m} taken for {mode}")
                    if c != compiled:
                        how.append("eager taken for compiled")
                    if card != gpu.name:
                        how.append(f"{card} taken for {gpu.name} (the same architecture, {gpu.arch})")
                    fallback = f"{FALLBACK}{'; '.join(how)}" if how else ""
                    return Resolved(entry.efficiency, f"{entry.efficiency:.3f} {entry.measured_on} ({model}, "
                                    f"checkpointing {m}, {'compiled' if c else 'eager'}){fallback}", entry)
        return Resolved(ASSUMED, f"{ASSUMED:.3f} assumed (nothing measured for {model} on {gpu.name}"
                        f"{' or its architecture' if kin else ''})")

    def as_dict(self) -> Dict:
        return {"format": FORMAT, "efficiency": RELATIVE_TO,
                "entries": [e.as_dict() for e in sorted(self.entries.values(), key=lambda e: e.key)]}

    def save(self, path: Union[str, Path]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "EfficiencyTable":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"efficiency table {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"efficiency table {path} is not JSON: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"efficiency table {path}: key 'format' is not {FORMAT!r} (write one with "
                             f"launch/plan.py --calibrate)")
        entries = [Efficiency.from_dict(e, f"efficiency table {path}, entry {i}")
                   for i, e in enumerate(data.get("entries", []))]
        return cls.of(entries, str(path))


_DEFAULT: List[EfficiencyTable] = []


def default_table() -> EfficiencyTable:
    """The measured defaults (read once)."""
    if not _DEFAULT:
        _DEFAULT.append(EfficiencyTable.load(DEFAULT_PATH))
    return _DEFAULT[0]


def planner_table(path: Optional[Union[str, Path]] = None) -> EfficiencyTable:
    """The defaults, with a calibrated table from ``path`` over them."""
    table = default_table()
    return table.merged(EfficiencyTable.load(path)) if path else table


EfficiencyArg = Union[float, EfficiencyTable, None]


def resolve(efficiency: EfficiencyArg, gpu: GPU, model: str, mode: str, compiled: bool) -> Resolved:
    """What a prediction runs at: a number given by the caller as it is, else the table's (None: the defaults)."""
    if isinstance(efficiency, (int, float)) and not isinstance(efficiency, bool):
        return Resolved(float(efficiency), f"{float(efficiency):.3f} given")
    table = efficiency if isinstance(efficiency, EfficiencyTable) else default_table()
    return table.lookup(gpu, model, mode, compiled)


def summarise_sources(sources: Iterable[str]) -> List[str]:
    """Distinct efficiency sources, once each: the fallbacks each value was taken by gathered under it (the modes
    a measured mode stood in for in one list), for a report's header."""
    taken: Dict[str, List[str]] = {}
    for source in sources:
        base, _, how = source.partition(FALLBACK)
        steps = taken.setdefault(base, [])
        for step in how.split("; ") if how else ():
            if step not in steps:
                steps.append(step)
    out = []
    for base, steps in taken.items():
        modes = [s for s in steps if s.startswith("checkpointing ")]
        other = [s for s in steps if not s.startswith("checkpointing ")]
        if modes:  # "checkpointing every taken for off", "... for blocks": one step, "taken for off, blocks"
            other.insert(0, modes[0].split(" taken for ")[0] + " taken for "
                         + ", ".join(s.split(" taken for ")[1] for s in modes))
        out.append(base + (FALLBACK + "; ".join(other) if other else ""))
    return out
