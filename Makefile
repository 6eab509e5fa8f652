# The two commands of the README:
#   make sample   draw a grid of samples (creates .venv and builds the ops when needed)
#   make test     run the whole test suite (likewise)
# and for CI and GPU machines: make deps | build | report | gpu-check | bench-smoke | wheels | clean.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Extra version pins for the venv (pip constraints), e.g. the oldest supported versions below.
PINS ?=
# The oldest versions this package supports, those of the GPU image (Python 3.12, torch 2.11.0,
# triton 3.6.0, huggingface_hub 1.33.0 and the carried diffusers 0.42.1): `make test-oldest`
# tests them in .venv-oldest (CI does, beside the newest versions). numpy < 2.4: Triton 3.6's
# interpreter, which runs the Triton kernels on the CPU, needs it (the GPU image's 2.5.2 is used
# only off the interpreter).
OLDEST_PINS := torch==2.11.0 triton==3.6.0 numpy<2.4 huggingface_hub==1.33.0 diffusers==0.42.1
OLDEST_PYTHON ?= $(or $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12),$(shell command -v python3.12),python3)
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ops-built
CSRC := $(shell find csrc -type f)
SAMPLE_OUT ?= samples/grid-$(METHOD).png
METHOD ?= dpm-solver++
REPORT_DIR ?=
STAGES ?=
REPORT_FLAGS ?=
# Packages the offline GPU machine's image lacks (its torch, triton and numpy are there), pinned to
# what the benchmarks were run with.
WHEELS ?= diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0

.PHONY: deps build test test-oldest sample report cpu-convs-report gpu-report gpu-check gpu-check-rehearsal bench-smoke kernel-report \
	kernel-report-oldest wheels clean

# Dependencies come from pyproject.toml alone: build-system requires + dependencies + [test].
$(DEPS_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
	print('\n'.join(p['build-system']['requires'] + p['project']['dependencies'] + \
	p['project']['optional-dependencies']['test']))" > $(VENV)/requirements.txt
	printf '%s\n' $(foreach pin,$(PINS),'$(pin)') > $(VENV)/constraints.txt
	$(PY) -m pip install --progress-bar off -r $(VENV)/requirements.txt -c $(VENV)/constraints.txt
	touch $@

deps: $(DEPS_STAMP)

# Compiles csrc/ with ninja: CPU ops always, CUDA ops too when nvcc is found.
$(BUILD_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(CSRC)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: $(BUILD_STAMP)
	$(PY) -m pytest tests

# The same suite on the oldest supported versions (OLDEST_PINS), in its own venv and build.
test-oldest:
	$(MAKE) VENV=.venv-oldest PYTHON=$(OLDEST_PYTHON) PINS='$(OLDEST_PINS)' test

# The demo: DPM-Solver++(2M) at its default 20 steps, the fewest that match DDPM-1000 on the
# committed quality-vs-steps report in both the confident share and the copies (10 and 15 steps
# draw more copies); METHOD=ddpm runs the paper's 1000 steps.
sample: $(BUILD_STAMP)
	$(VENV)/bin/ddpm-fast sample --model digits --num 64 --seed 0 --method $(METHOD) --out $(SAMPLE_OUT)

# The one benchmark report (benchmarks/report/__main__.py), on this CPU or a GPU: the venv's
# python where there is one (make build first), else $(PYTHON) — a GPU machine's python3 with
# torch and triton and no network, where the report builds the ops itself. REPORT_DIR defaults
# to benchmarks/results/<date>-<machine>; STAGES=peaks,ops runs some stages only (each appends
# to the same report); REPORT_FLAGS=--quick for the reduced sizes, --budget 540 for a 10-minute lease.
REPORT_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
report:
	REPORT_DIR=$(REPORT_DIR) $(REPORT_PY) -m benchmarks.report $(if $(STAGES),--stage $(STAGES)) $(REPORT_FLAGS)

gpu-report: report

# The CPU convolution report (benchmarks/cpu_convs.py, DESIGN §5.8): every conv of both U-Nets against
# the single-core FMA peak, and the end-to-end goals against diffusers eager and compiled, with
# CONV_THREADS torch threads (each count in its own process), into CONV_REPORT.
CONV_REPORT ?= benchmarks/results/$(shell date -u +%F)-cpu-convs.md
CONV_THREADS ?= 1,2
cpu-convs-report:
	$(REPORT_PY) -m benchmarks.cpu_convs --out $(CONV_REPORT) --threads $(CONV_THREADS)

# One GPU lease's check (benchmarks/report/check.py): stages env, build, tests, ops, e2e, each
# under a hard time cap (about 8.5 minutes in all), into GPU_CHECK_DIR (default
# benchmarks/results/<date>-<gpu>). GPU_CHECK_STAGES=tests,e2e reruns some stages only (each
# resumes into the same folder); GPU_CHECK_ARCHIVE=$$OUT/gpu-check.tar.gz keeps a .tar.gz of the
# folder up to date for a machine that returns only a few files. Without a GPU: a rehearsal.
GPU_CHECK_DIR ?=
GPU_CHECK_STAGES ?=
GPU_CHECK_ARCHIVE ?=
# guided-diffusion's code for benchmarks/test_adm.py's baselines (not on PyPI, never committed): a
# checkout at third_party/guided-diffusion (git-ignored; carried to a GPU lease with the device
# tool's carry), unless GUIDED_DIFFUSION_PATH names one.
export GUIDED_DIFFUSION_PATH ?= $(if $(wildcard third_party/guided-diffusion/guided_diffusion),$(abspath third_party/guided-diffusion))

gpu-check:
	PYTHONUNBUFFERED=1 $(REPORT_PY) -m benchmarks.report --check $(if $(GPU_CHECK_DIR),--dir $(GPU_CHECK_DIR)) \
		$(if $(GPU_CHECK_STAGES),--stage $(GPU_CHECK_STAGES)) $(if $(GPU_CHECK_ARCHIVE),--archive $(GPU_CHECK_ARCHIVE))

# make gpu-check rehearsed on this CPU as the lease will run it (benchmarks/report/rehearse.py):
# a copy of the tree as the device tool carries it (no .git, .whl/ carried), the GPU image's
# Python and packages (GPU_IMAGE_PACKAGES, in .venv-gpu-image; diffusers comes from the carried
# wheels, installed by the check's build stage as on the lease), every stage, then the outcome checked.
GPU_IMAGE_VENV := .venv-gpu-image
GPU_IMAGE_PACKAGES := torch==2.11.0 triton==3.6.0 numpy==2.5.2 huggingface_hub==1.33.0 safetensors==0.8.0 \
	tqdm Pillow ninja pybind11 setuptools wheel pytest pytest-benchmark pytest-timeout pytest-xdist hypothesis \
	matplotlib scikit-learn regex requests
$(GPU_IMAGE_VENV)/.installed: Makefile
	test -x $(GPU_IMAGE_VENV)/bin/python || $(OLDEST_PYTHON) -m venv $(GPU_IMAGE_VENV)
	$(GPU_IMAGE_VENV)/bin/python -m pip install --progress-bar off $(foreach p,$(GPU_IMAGE_PACKAGES),'$(p)')
	touch $@

gpu-check-rehearsal: $(GPU_IMAGE_VENV)/.installed
	ls .whl/diffusers-*.whl >/dev/null 2>&1 || $(MAKE) wheels
	$(GPU_IMAGE_VENV)/bin/python -m benchmarks.report.rehearse --python $(abspath $(GPU_IMAGE_VENV))/bin/python

# Every Triton launch config and CUDA C++ kernel compiled for sm_80/86/89/90/100/120 on this machine
# (no GPU needed): registers, spills, shared memory, dot instructions, occupancy, into
# benchmarks/results/kernel-resources.md (DESIGN §8).
kernel-report: $(BUILD_STAMP)
	$(PY) -m benchmarks.kernel_resources

# The same under the oldest supported Triton, the GPU image's 3.6 (ptxas differs), in .venv-oldest.
kernel-report-oldest:
	$(MAKE) VENV=.venv-oldest PYTHON=$(OLDEST_PYTHON) PINS='$(OLDEST_PINS)' build
	.venv-oldest/bin/python -m benchmarks.kernel_resources --out benchmarks/results/kernel-resources-triton-3.6.md \
		--command "make kernel-report-oldest"

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
	rm -rf build ddpm_fast/_C*.so ddpm_fast/_build_info*.py *.egg-info $(BUILD_STAMP)
