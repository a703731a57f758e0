"""Preflight for a GPU machine: what is installed, what is missing, and which parts of the GPU check a missing
package disables. Run it first on any GPU box (launch/gpu_check.sh does, as its step 0).

    python3 launch/gpu_preflight.py [--json preflight.json]
    python3 launch/gpu_preflight.py --wheelhouse wheelhouse [--site /tmp/site] [--json preflight.json]

Prints one line per requirement, ``OK`` or ``MISSING`` with the version or the reason, and for a missing one what
it disables; writes the same as JSON to ``--json``. Exits 1 only when the core of the GPU check cannot run: torch
without a usable CUDA device, or no omegaconf, or no timm; 0 otherwise (optional packages only disable parts).

``--wheelhouse DIR`` (built by scripts/build_wheelhouse.sh) first installs, offline and without dependency
resolution, every wheel of DIR whose project is not importable here, plus any that an installed project is too
old for (typing-extensions for pydantic), into ``--site`` (default /tmp/site) with
``python3 -m pip install --no-index --no-deps --target SITE`` (or by unpacking the wheels when this Python has
no pip). A ``--target`` directory leaves the machine's own environment untouched (it may not be writable); it
takes effect through PYTHONPATH, which this script prints as a line to export for what runs after it.

Standard library only, plus what it checks (torch, and ``packaging`` when present); nothing of scale_refiner.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata as metadata
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# name shown, module imported, distribution names (for the version when the module has no __version__),
# core (the GPU check cannot run without it), what is lost without it
CHECKS: List[Tuple[str, str, Tuple[str, ...], bool, str]] = [
    ("deepspeed", "deepspeed", ("deepspeed",), False,
     "engine.kind=deepspeed (ZeRO-3 / ZeRO-2) and the ZeRO rows of benchmark --compare engines; "
     "no part of gpu_check.sh (its engines are single and fsdp2)"),
    ("omegaconf", "omegaconf", ("omegaconf",), True, "everything: every recipe is loaded through it"),
    ("timm", "timm", ("timm",), True, "everything: the ViT is built from timm's blocks"),
    ("webdataset", "webdataset", ("webdataset",), False,
     "data.pipeline=wds (the torch reference data pipeline); no part of gpu_check.sh"),
    ("faiss", "faiss", ("faiss-gpu", "faiss-gpu-cu12", "faiss-cpu"), False,
     "queue.search=faiss / ivf (the sharded queue then needs queue.search=torch, the default); "
     "no part of gpu_check.sh"),
    ("nvidia.dali", "nvidia.dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120"), False,
     "part 'dali' of gpu_check.sh (mixed GPU decoding) and data.pipeline=dali (auto falls back to wds)"),
    ("sklearn", "sklearn", ("scikit-learn",), False,
     "part 'dali' of gpu_check.sh (its tiny shards are sklearn's digits), k-means and low-shot evaluation"),
    ("tensorboard", "tensorboard", ("tensorboard",), False,
     "the refine / MAE jobs' tensorboard logs; no part of gpu_check.sh"),
    ("safetensors", "safetensors", ("safetensors",), False,
     "loading and exporting weights; no part of gpu_check.sh (random initialisation)"),
    ("torchao", "torchao.float8", ("torchao",), False,
     "model.float8 (FP8 matmuls of the trained blocks, refused at load without it) and part 'fp8_l16' of gpu_check.sh"),
    ("torchvision", "torchvision", ("torchvision",), False,
     "timm itself (timm.layers imports it) and the multi-crop augmentation (data.pipeline=wds, the demo)"),
]
CORE_TORCH = "everything: the GPU check needs torch with a CUDA device"


# ------------------------------------------------------------------------------------------ wheel install
def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_info(path: Path) -> Tuple[str, str, List[str]]:
    """(project, version, Requires-Dist lines) of a wheel file."""
    parts = path.name[:-len(".whl")].split("-")
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        requires = [line.split(":", 1)[1].strip() for line in z.read(meta).decode("utf-8").splitlines()
                    if line.startswith("Requires-Dist:")]
    return _canon(parts[0]), parts[1], requires


def _installed_version(project: str) -> Optional[str]:
    try:
        return metadata.version(project)
    except metadata.PackageNotFoundError:
        return None


def _compatible(path: Path) -> bool:
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:  # no packaging: trust the wheelhouse (it was built for this target)
        return True
    return bool(parse_wheel_filename(path.name)[3] & set(sys_tags()))


def plan_install(wheelhouse: Path) -> Tuple[List[Path], List[str]]:
    """Wheels of ``wheelhouse`` to install here, and one note per decision."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        Requirement = None
    wheels, notes = {}, []
    for path in sorted(wheelhouse.glob("*.whl")):
        project, version, requires = _wheel_info(path)
        if not _compatible(path):
            notes.append(f"{path.name}: not installable on this Python/platform, ignored")
            continue
        wheels[project] = (path, version, requires)
    chosen = {p for p in wheels if _installed_version(p) is None}
    for p in sorted(chosen):
        notes.append(f"{p} {wheels[p][1]}: not installed here")
    # an installed project too old for what a chosen wheel requires (typing-extensions for pydantic)
    changed = Requirement is not None
    while changed:
        changed = False
        env = {"extra": ""}
        for p in sorted(chosen):
            for line in wheels[p][2]:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate(env):
                    continue
                dep = _canon(req.name)
                have = _installed_version(dep)
                if dep in chosen or dep not in wheels or have is None:
                    continue
                if not req.specifier.contains(have, prereleases=True) and \
                        req.specifier.contains(wheels[dep][1], prereleases=True):
                    chosen.add(dep)
                    changed = True
                    notes.append(f"{dep} {wheels[dep][1]}: {p} needs {req}, this Python has {have}")
    return [wheels[p][0] for p in sorted(chosen)], notes


def _unpack(wheel: Path, site: Path) -> None:
    """Install a wheel by unpacking it (what pip --target does for a library, minus scripts)."""
    with zipfile.ZipFile(wheel) as z:
        for member in z.infolist():
            name = member.filename
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: not needed to import the library
                name = "/".join(parts[2:])
            if not name or name.endswith("/"):
                continue
            dest = site / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)


def install(wheels: List[Path], site: Path) -> str:
    """Install ``wheels`` into ``site``; returns how."""
    site.mkdir(parents=True, exist_ok=True)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--target",
               str(site), "--disable-pip-version-check", "--no-warn-script-location", "-q",
               *[str(w) for w in wheels]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return "pip install --no-index --no-deps --target"
        print(f"pip install failed (rc={proc.returncode}), unpacking instead:\n{proc.stderr[-2000:]}",
              file=sys.stderr)
    for wheel in wheels:
        _unpack(wheel, site)
    return "unpacked (no working pip)"


# ------------------------------------------------------------------------------------------------- checks
def _version(module, dists) -> str:
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    for dist in dists:
        v = _installed_version(dist)
        if v:
            return v
    return "?"


def check_torch() -> List[Dict]:
    out = []
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        return [dict(name="torch", ok=False, core=True, version=None, detail=f"{type(err).__name__}: {err}",
                     disables=CORE_TORCH)]
    out.append(dict(name="torch", ok=True, core=True, version=torch.__version__,
                    detail=f"built for CUDA {torch.version.cuda}", disables=CORE_TORCH))
    item = dict(name="cuda", ok=False, core=True, version=torch.version.cuda, disables=CORE_TORCH)
    try:
        if not torch.cuda.is_available():
            item["detail"] = "torch.cuda.is_available() is False"
        else:
            props = torch.cuda.get_device_properties(0)
            bf16 = torch.cuda.is_bf16_supported()
            x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16 if bf16 else torch.float16)
            finite = bool(torch.isfinite(x @ x).all())  # a kernel really runs
            item.update(ok=finite, device_name=props.name, device_count=torch.cuda.device_count(),
                        capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                        bf16=bf16, detail=f"{torch.cuda.device_count()} x {props.name} (sm {props.major}.{props.minor}, "
                                          f"{props.total_memory / 2**30:.0f} GiB), bf16 {'yes' if bf16 else 'NO'}, "
                                          f"matmul {'ok' if finite else 'NOT FINITE'}")
    except Exception as err:  # noqa: BLE001
        item["detail"] = f"{type(err).__name__}: {err}"
    out.append(item)
    return out


def check_fp8(items: List[Dict]) -> Dict:
    """FP8 matmuls for model.float8: a CUDA device of compute capability >= 8.9 (Ada, Hopper, Blackwell) and
    torchao's float8 training, both from the items already checked."""
    item = dict(name="fp8", ok=False, core=False, version=None,
                disables="part 'fp8_l16' of gpu_check.sh and model.float8 (refused at load)")
    cuda = next((i for i in items if i["name"] == "cuda"), {})
    torchao = next((i for i in items if i["name"] == "torchao"), {})
    capability = cuda.get("capability")
    if not cuda.get("ok"):
        item["detail"] = "no CUDA device"
    elif tuple(int(x) for x in capability.split(".")) < (8, 9):
        item["detail"] = f"{cuda.get('device_name')} is sm {capability}: FP8 matmuls need sm 8.9 or newer"
    elif not torchao.get("ok"):
        item["detail"] = "torchao does not import (carry wheelhouse/: scripts/build_wheelhouse.sh)"
    else:
        item.update(ok=True, detail=f"sm {capability} with torchao {torchao.get('version')}")
    return item


def check_nvidia_smi() -> Dict:
    item = dict(name="nvidia-smi", ok=False, core=False, version=None,
                disables="only the GPU / driver line of the report (torch finds the GPU without it)")
    exe = shutil.which("nvidia-smi")
    if exe is None:
        item["detail"] = "not on PATH"
        return item
    try:
        proc = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        item["detail"] = "timed out after 30 s"
        return item
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode == 0 and lines:
        item.update(ok=True, version=lines[0].split(",")[-1].strip(), detail="; ".join(lines))
    else:
        item["detail"] = f"rc={proc.returncode}: {(proc.stderr or proc.stdout).strip()[:300]}"
    return item


def check_module(name, module_name, dists, core, disables) -> Dict:
    item = dict(name=name, ok=False, core=core, version=None, disables=disables)
    noise = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(noise):  # deepspeed and DALI print banners on import
            module = importlib.import_module(module_name)
        item.update(ok=True, version=_version(module, dists), detail="")
        if name == "faiss":
            gpus = getattr(module, "get_num_gpus", lambda: 0)()
            item["detail"] = f"GPU search: {'yes, ' + str(gpus) + ' GPU(s)' if gpus else 'no (faiss-cpu build)'}"
        file = getattr(module, "__file__", None)
        if file:
            item["path"] = str(Path(file).parent)
    except BaseException as err:  # noqa: BLE001 - ImportError, or a broken install raising anything
        if isinstance(err, KeyboardInterrupt):
            raise
        item["detail"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    item["import_s"] = round(time.perf_counter() - start, 2)
    return item


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--wheelhouse", default=None, help="install what is missing from this directory of wheels")
    p.add_argument("--site", default="/tmp/site", help="--target directory for --wheelhouse (default /tmp/site)")
    args = p.parse_args(argv)

    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
              "python": sys.version.split()[0], "executable": sys.executable, "install": None}

    if args.wheelhouse:
        wheelhouse, site = Path(args.wheelhouse), Path(args.site).resolve()
        if site.is_dir() and str(site) not in sys.path:
            sys.path.insert(0, str(site))  # what an earlier run installed counts as installed
        if not wheelhouse.is_dir():
            print(f"note     --wheelhouse {wheelhouse}: no such directory, nothing installed")
            result["install"] = {"wheelhouse": str(wheelhouse), "error": "no such directory"}
        else:
            wheels, notes = plan_install(wheelhouse)
            how = install(wheels, site) if wheels else "nothing to install"
            if str(site) not in sys.path:
                sys.path.insert(0, str(site))
            importlib.invalidate_caches()
            for note in notes:
                print(f"install  {note}")
            print(f"install  {len(wheels)} wheel(s) from {wheelhouse} into {site}: {how}")
            pythonpath = os.pathsep.join([str(site)] + [x for x in os.environ.get("PYTHONPATH", "").split(
                os.pathsep) if x and Path(x).resolve() != site])
            result["install"] = {"wheelhouse": str(wheelhouse), "site": str(site), "how": how,
                                 "wheels": [w.name for w in wheels], "notes": notes, "pythonpath": pythonpath}

    items = [dict(name="python", ok=sys.version_info >= (3, 10), core=True, version=result["python"],
                  detail=f"{sys.executable}, {platform.machine()}", disables="everything: the code needs >= 3.10")]
    items += check_torch()
    items.append(check_nvidia_smi())
    for check in CHECKS:
        items.append(check_module(*check))
    items.append(check_fp8(items))
    for item in items:
        text = f"{'OK' if item['ok'] else 'MISSING':8} {item['name']} {item['version'] or ''}".rstrip()
        if item.get("detail"):
            text += f" ({item['detail']})"
        if not item["ok"]:
            text += f"\n         -> {'CORE, ' if item['core'] else ''}disables: {item['disables']}"
        print(text)
    missing_core = [i["name"] for i in items if i["core"] and not i["ok"]]
    result.update(items=items, core_ok=not missing_core, missing_core=missing_core,
                  missing=[i["name"] for i in items if not i["ok"]],
                  cuda=any(i["name"] == "cuda" and i["ok"] for i in items))
    if result["install"] and result["install"].get("pythonpath"):
        print(f"export PYTHONPATH={result['install']['pythonpath']}")
    optional = [i["name"] for i in items if not i["core"] and not i["ok"]]
    print(f"core {'MISSING ' + ', '.join(missing_core) if missing_core else 'OK'}; "
          f"optional missing: {', '.join(optional) or 'none'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if missing_core else 0


if __name__ == "__main__":
    sys.exit(main())
