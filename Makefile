# Set-up and entry points. `make demo` and `make test` install everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: install data test test-fast demo probe-teacher ablation deep-teacher deep-ablation bottleneck bench bench-check clean

install: $(VENV)/.installed data

# torch and torchvision come from PyPI together (a CPU-only torch breaks PyPI's torchvision at import).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,trt-rtx]'
	touch $@

# Debian's dataset-fashion-mnist: installed when missing and we are root; otherwise say how.
data:
	@if [ -f $(FASHION_MNIST) ] || [ -n "$$QVIT_FASHION_MNIST" ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 1; fi

test: install
	$(PY) -m pytest

# The fast tier for everyday work: every test not marked slow (tests/conftest.py says which are).
test-fast: install
	$(PY) -m pytest -m "not slow"

demo: install
	$(PY) -m qvit_export.demo

# Issue 13's probe: the teacher alone, or the whole ablation (teacher included; resumable, hours on 2 cores).
probe-teacher: install
	$(PY) benchmarks/ablation_long.py --teacher-only

ablation: install
	$(PY) benchmarks/ablation_long.py

# CPU runtimes side by side (ONNX Runtime, OpenVINO): the full table, or a few minutes' re-measure of deit_small's ratios
# against benchmarks/results/runtimes_baseline.json that names every ratio now worse than its baseline; then deit_small's
# TensorRT-RTX plans rebuilt against benchmarks/results/engine_cost_baseline.json (kernels, fused attention, MB moved).
$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,trt-rtx,bench]'
	touch $@

bench: $(VENV)/.bench data
	$(PY) benchmarks/runtimes.py

bench-check: $(VENV)/.bench data
	$(PY) benchmarks/runtimes.py --check
	$(PY) benchmarks/engine_cost.py --check

# Issue 24's deep probe: its teacher alone, or the whole queue (teachers, the bottleneck runs, the ablation; one
# worker; start a second one beside it, with one thread each, to use two cores). The PTQ bottleneck tables alone.
deep-teacher: install
	$(PY) benchmarks/ablation_deep.py --teacher-only

deep-ablation: install
	$(PY) benchmarks/ablation_deep.py --worker

bottleneck: install
	$(PY) benchmarks/bottleneck.py --demo-teacher runs/demo/fp/best.pt

clean:
	rm -rf $(VENV) .cache runs *.egg-info
