#!/usr/bin/env bash
# Builds wheelhouse/: the wheels an offline GPU machine that has only its own torch stack (see
# requirements-gpu.txt and docs/gpu.md) lacks, for CPython 3.12 on manylinux x86_64. Runs on any Linux box with
# Python 3 + pip and access to PyPI (the host Python's version does not matter: binary wheels are downloaded for
# the target, the two sdists build to pure-Python wheels). One version of each, pinned to the set the CPU
# .venv runs (requirements.txt and what pip resolved there).
#
#   bash scripts/build_wheelhouse.sh           # PYTHON=python3.x to choose the interpreter that drives pip
#
# Then carry wheelhouse/ to the GPU machine; launch/gpu_check.sh (step 0) and launch/gpu_preflight.py
# --wheelhouse install what is missing from it, offline, into a --target directory put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WH="${WHEELHOUSE:-wheelhouse}"
start=$(date +%s)

# Pure-Python (or abi3 / cp312 binary) wheels on PyPI, downloaded for the target interpreter.
DOWNLOAD=(
  hjson==3.1.0                   # deepspeed
  pydantic==2.14.4               # deepspeed (config models)
  pydantic-core==2.50.5          # pydantic, exact pin; the only binary wheel here (cp312 manylinux)
  annotated-types==0.8.0         # pydantic
  typing-inspection==0.4.5       # pydantic
  typing-extensions==4.16.0      # pydantic 2.14 needs >=4.16; the preflight installs it only over an older one
  omegaconf==2.3.0               # scale_refiner.config
  webdataset==1.0.2              # the reference data pipeline
  braceexpand==0.1.7             # webdataset
  torchao==0.18.0                # model.float8; one cp310-abi3 wheel (3.4 MB), no dependencies
)
# Only an sdist on PyPI: built here into pure-Python wheels.
BUILD=(
  deepspeed==0.19.8              # no ops pre-compiled (DS_BUILD_OPS=0): they JIT-compile on first use
  antlr4-python3-runtime==4.9.3  # omegaconf 2.3 needs 4.9.*
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

rm -rf "$WH"
mkdir -p "$WH"
echo "== downloading ${#DOWNLOAD[@]} wheels for cp312 manylinux x86_64"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" --platform any -d "$WH" "${DOWNLOAD[@]}"

echo "== building ${#BUILD[@]} wheels from their sdists"
# DeepSpeed pre-compiles no op unless DS_BUILD_OPS=1 or a DS_BUILD_<OP>=1 is set: clear them all. Its setup.py
# imports torch when it can; pip's isolated build environment has none, so the wheel records no torch / CUDA
# version and stays pure Python (the same wheel `pip install deepspeed` builds on any machine).
while IFS= read -r var; do unset "$var"; done < <(env | sed -n 's/^\(DS_BUILD_[A-Z0-9_]*\)=.*/\1/p')
export DS_BUILD_OPS=0
"$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$WH" "${BUILD[@]}"

echo "== checking"
"$PY" - "$WH" <<'EOF'
"""Every wheel installs on CPython 3.12 manylinux x86_64, one version per project, DeepSpeed has no compiled op,
and every requirement (markers evaluated for that target, no extras) is in the wheelhouse at a matching version
or on the GPU machine."""
import re
import sys
import zipfile
from pathlib import Path

try:
    from packaging import tags
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # a bare box: pip vendors packaging
    from pip._vendor.packaging import tags
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

# What the GPU machine has besides the Python standard library (its venv beside torch 2.11).
GPU_HAS = {canonicalize_name(n) for n in """torch timm numpy scikit-learn tensorboard matplotlib pillow einops
    msgpack psutil py-cpuinfo ninja nvidia-ml-py packaging pytest tqdm safetensors pyyaml typing-extensions
    """.split()}
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)] + ["manylinux2014_x86_64", "linux_x86_64"]
TARGET_TAGS = set(tags.cpython_tags((3, 12), abis=["cp312"], platforms=PLATFORMS)) | set(
    tags.compatible_tags((3, 12), interpreter="cp312", platforms=PLATFORMS))


wh = Path(sys.argv[1])
wheels = sorted(wh.glob("*.whl"))
problems, have, reqs = [], {}, []
for path in wheels:
    name, version, _, wheel_tags = parse_wheel_filename(path.name)
    if name in have:
        problems.append(f"two versions of {name}: {have[name]} and {version}")
    have[name] = version
    if not wheel_tags & TARGET_TAGS:
        problems.append(f"{path.name}: no tag installable on cp312 manylinux x86_64")
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                reqs.append((name, Requirement(line.split(":", 1)[1].strip())))
        if name == "deepspeed":
            if {str(t) for t in wheel_tags} != {"py3-none-any"}:
                problems.append(f"deepspeed wheel is not py3-none-any: {path.name}")
            info = z.read("deepspeed/git_version_info_installed.py").decode()
            built = re.findall(r"'(\w+)': True", info)
            if built or any(n.endswith(".so") for n in z.namelist()):
                problems.append(f"deepspeed wheel has compiled ops: {built}")
for owner, req in reqs:
    if req.marker is not None and not req.marker.evaluate(TARGET):
        continue
    name = canonicalize_name(req.name)
    if name in have:
        if not req.specifier.contains(str(have[name]), prereleases=True):
            problems.append(f"{owner} needs {req}, the wheelhouse has {name} {have[name]}")
    elif name not in GPU_HAS:
        problems.append(f"{owner} needs {req}: neither in the wheelhouse nor on the GPU machine")
total = sum(p.stat().st_size for p in wheels)
for path in wheels:
    print(f"  {path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
print(f"  {total / 2**20:7.2f} MiB  in {len(wheels)} wheels; {len(reqs)} Requires-Dist lines checked")
if total > 20 * 2**20:
    problems.append(f"wheelhouse is {total / 2**20:.1f} MiB, over the 20 MiB meant for it")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
EOF
echo "== wheelhouse ready: $(du -sh "$WH" | cut -f1) in $WH ($(( $(date +%s) - start )) s)"
