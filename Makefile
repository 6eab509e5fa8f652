# The two commands of the README:
#   make sample   draw a grid of samples (creates .venv and builds the ops when needed)
#   make test     run the whole test suite (likewise)
# and for CI and GPU machines: make deps | build | gpu-report | clean.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ops-built
CSRC := $(shell find csrc -type f)
SAMPLE_OUT ?= samples/grid.png
REPORT_DIR ?= benchmarks/results/$(shell date +%F)-gpu

.PHONY: deps build test sample gpu-report clean

# Dependencies come from pyproject.toml alone: build-system requires + dependencies + [test].
$(DEPS_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
	print('\n'.join(p['build-system']['requires'] + p['project']['dependencies'] + \
	p['project']['optional-dependencies']['test']))" > $(VENV)/requirements.txt
	$(PY) -m pip install --progress-bar off -r $(VENV)/requirements.txt
	touch $@

deps: $(DEPS_STAMP)

# Compiles csrc/ with ninja: CPU ops always, CUDA ops too when nvcc is found.
$(BUILD_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(CSRC)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: $(BUILD_STAMP)
	$(PY) -m pytest tests

sample: $(BUILD_STAMP)
	$(VENV)/bin/ddpm-fast sample --model digits --num 64 --seed 0 --out $(SAMPLE_OUT)

# On a GPU machine with torch/triton installed and no network: uses that python, no venv.
gpu-report:
	REPORT_DIR=$(REPORT_DIR) $(PYTHON) benchmarks/gpu_report.py

clean:
	rm -rf build ddpm_fast/_C*.so ddpm_fast/_build_info.py *.egg-info $(BUILD_STAMP)
