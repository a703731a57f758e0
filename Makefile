# The README's two commands. Both (re)use .venv, installing only what changed.
.PHONY: env demo test

env:
	bash scripts/env.sh

demo: env
	.venv/bin/python launch/refine.py --config configs/demo.yaml

test: env
	.venv/bin/python -m pytest tests -q
