# The two commands of the README:
#   make sample   draw a grid of samples (creates .venv and builds the ops when needed)
#   make test     run the whole test suite (likewise)
# and for CI and GPU machines: make deps | build | report | gpu-check | bench-smoke | wheels | clean.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ops-built
CSRC := $(shell find csrc -type f)
SAMPLE_OUT ?= samples/grid.png
REPORT_DIR ?=
STAGES ?=
REPORT_FLAGS ?=
# Packages the offline GPU machine's image lacks (its torch, triton and numpy are there), pinned to
# what the benchmarks were run with.
WHEELS ?= diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0

.PHONY: deps build test sample report gpu-report gpu-check bench-smoke kernel-report wheels clean

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

# The one benchmark report (benchmarks/report/__main__.py), on this CPU or a GPU: the venv's
# python where there is one (make build first), else $(PYTHON) — a GPU machine's python3 with
# torch and triton and no network, where the report builds the ops itself. REPORT_DIR defaults
# to benchmarks/results/<date>-<machine>; STAGES=peaks,ops runs some stages only (each appends
# to the same report); REPORT_FLAGS=--quick for the reduced sizes, --budget 540 for a 10-minute lease.
REPORT_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
report:
	REPORT_DIR=$(REPORT_DIR) $(REPORT_PY) -m benchmarks.report $(if $(STAGES),--stage $(STAGES)) $(REPORT_FLAGS)

gpu-report: report

# One GPU lease's check (benchmarks/report/check.py): stages env, build, tests, ops, e2e, each
# under a hard time cap (about 8.5 minutes in all), into GPU_CHECK_DIR (default
# benchmarks/results/<date>-<gpu>). GPU_CHECK_STAGES=tests,e2e reruns some stages only (each
# resumes into the same folder); GPU_CHECK_ARCHIVE=$$OUT/gpu-check.tar.gz keeps a .tar.gz of the
# folder up to date for a machine that returns only a few files. Without a GPU: a rehearsal.
GPU_CHECK_DIR ?=
GPU_CHECK_STAGES ?=
GPU_CHECK_ARCHIVE ?=
gpu-check:
	PYTHONUNBUFFERED=1 $(REPORT_PY) -m benchmarks.report --check $(if $(GPU_CHECK_DIR),--dir $(GPU_CHECK_DIR)) \
		$(if $(GPU_CHECK_STAGES),--stage $(GPU_CHECK_STAGES)) $(if $(GPU_CHECK_ARCHIVE),--archive $(GPU_CHECK_ARCHIVE))

# Every Triton launch config and CUDA C++ kernel compiled for sm_80/86/89/90/100/120 on this machine
# (no GPU needed): registers, spills, shared memory, dot instructions, occupancy, into
# benchmarks/results/kernel-resources.md (DESIGN §8).
kernel-report: $(BUILD_STAMP)
	$(PY) -m benchmarks.kernel_resources

# CI's smoke test of the benchmarks and the report: the --quick sizes, into build/. One thread:
# its figures are not quoted anywhere, and two OpenMP threads on a machine where other jobs hold
# a core wait a scheduler quantum per parallel region (seen here: 2.5 s for a 10 ms U-Net step).
bench-smoke: $(BUILD_STAMP)
	rm -rf build/bench-smoke
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.report --quick --dir build/bench-smoke

# Wheels for an offline GPU machine (Python 3.12, x86-64): carry .whl/ along; the report's
# build stage installs them.
wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(WHEELS)

clean:
	rm -rf build ddpm_fast/_C*.so ddpm_fast/_build_info.py *.egg-info $(BUILD_STAMP)
