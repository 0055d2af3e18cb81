# acmix_mm: one entry point for install, tests and demos.
#
#   make demo       the main job (COCO-format detection demo on this CPU)
#   make test       the default test suite (quick; < ~15 min after install)
#
# Both create or refresh the project virtualenv at $(VENV) first; when it is up to
# date they go straight to work.  GPU users: see docs/install.md.

VENV            ?= .venv
PYTHON          ?= python3
TORCH           ?= torch==2.13.0
# Extra pip arguments for torch, e.g. an --index-url of a CUDA wheel index.
TORCH_PIP_ARGS  ?=
# CUDA=1 compiles mmcv's CUDA ops (needs nvcc and a CUDA torch) into a separate pip cache,
# so that a CPU-only mmcv wheel cached earlier is never reused for a GPU install.
CUDA            ?= 0
MAX_JOBS        ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS     ?=

PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
STAMP := $(VENV)/.acmix_mm-installed
DEPS  := setup.py Makefile requirements/build.txt requirements/runtime.txt requirements/tests.txt

ifeq ($(CUDA),1)
MMCV_ENV := FORCE_CUDA=1 PIP_CACHE_DIR=$(HOME)/.cache/acmix_mm-pip-cuda
else
MMCV_ENV := FORCE_CUDA=0
endif

.PHONY: venv demo demo-seg test test-all test-e2e bench clean-venv

venv: $(STAMP)

$(STAMP): $(DEPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PIP) install -r requirements/build.txt
	# mmcv 2.1.0 with its compiled ops; pip caches the built wheel, so this is slow once per machine.
	$(MMCV_ENV) MMCV_WITH_OPS=1 MAX_JOBS=$(MAX_JOBS) $(PIP) install --no-build-isolation mmcv==2.1.0
	$(PIP) install --no-deps mmdet==3.3.0 mmsegmentation==1.2.2
	$(PIP) install -r requirements/runtime.txt -r requirements/tests.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -c "import mmcv.ops, mmdet, mmseg, lightning, pycocotools, acmix_mm; print('acmix_mm environment ready:', acmix_mm.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything, including the end-to-end runs marked `slow` (minutes each).
test-all: $(STAMP)
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) tools/demo.py det

demo-seg: $(STAMP)
	$(PY) tools/demo.py seg

# The benchmark record: every ACMix-vs-baseline ratio of the README's table (the ACMix layer
# against a 3x3 conv, ResNet-ACMix-50, R50 with ACMix in c3-c5 and Swin-ACMix-T against their
# baselines; train and infer, 2 threads), each comparison in its own process (docs/benchmarks.md).
# 4-6 minutes on a 2-core CPU.  BENCH_ARGS="--retain-freed-memory" keeps freed memory in each
# process (docs/benchmarks.md#allocation); BENCH_ARGS="--device cuda" on a GPU machine.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) tools/benchmark_record.py $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
