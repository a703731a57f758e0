from pathlib import Path

from setuptools import find_packages, setup

# requirements.txt pins the set that installs and works together on the CPU box; tests need pytest too.
requirements = [line.split("#")[0].strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()]
requirements = [r for r in requirements if r and not r.startswith("pytest")]

setup(
    name="scale_refiner",
    version="0.1.0",
    description="MIM-Refiner for ViT-L/H/2B at cluster scale: ZeRO-3/FSDP2, DALI, sharded faiss NN queue",
    packages=find_packages(include=["scale_refiner", "scale_refiner.*"]),
    # the planner's measured compute efficiencies (plan/efficiency.py)
    package_data={"scale_refiner.plan": ["efficiency_defaults.json"]},
    python_requires=">=3.10",
    install_requires=requirements,
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["scale-refiner=scale_refiner.cli.main:main"]},
)
