# The README's commands. All (re)use .venv, installing only what changed.
.PHONY: env demo validate test

env:
	bash scripts/env.sh

demo: env
	.venv/bin/python launch/demo.py

validate: env
	.venv/bin/python launch/demo.py --validate

test: env
	.venv/bin/python -m pytest tests -q --durations=30
