# The two commands of the README, and a few for developers. Both main targets set the machine up
# first (scripts/setup.sh is idempotent), so they work on a fresh Debian/Ubuntu machine as root.
PY := .venv/bin/python
export MESHLET_REQUIRE_KERNEL ?= 1

.PHONY: setup demo test test-unit test-kernel bench clean-lab

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m agent demo

test: setup
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q -m "not kernel" tests

test-kernel: setup
	$(PY) -m pytest -q -m kernel tests

bench: setup
	$(PY) -m bench
