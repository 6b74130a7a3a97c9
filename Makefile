# The two commands of the README, and a few for developers. Both main targets set the machine up
# first (scripts/setup.sh is idempotent), so they work on a fresh Debian/Ubuntu machine as root.
PY := .venv/bin/python
export MESHLET_REQUIRE_KERNEL ?= 1

.PHONY: setup demo test test-unit test-kernel bench clean-lab image

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m agent demo

# The test target also sets up the kernel-matrix VM (qemu, Debian's 6.1 kernel and headers):
# tests/vm boots it and runs the kernel tests inside, beside the run on the host kernel; and podman
# for tests/kernel/runtime/test_runtime_image.py, which builds the image and runs it as
# daemonset/daemonset.yaml says.
test:
	WITH_VM=1 WITH_IMAGE=1 bash scripts/setup.sh
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q -m "not kernel" tests

test-kernel: setup
	$(PY) -m pytest -q -m kernel tests

# The container image (podman; made from Debian's packages when no registry answers).
image:
	bash scripts/image.sh

bench: setup
	$(PY) -m bench
