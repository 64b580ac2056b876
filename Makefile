# pnode_dist: `make run` (set up + main job), `make test` (set up + the test suite, minutes),
# `make test-long` (the long end-to-end tests: SLURM clusters, learning-quality runs, 3-4 ranks;
# CI runs both).
# `make run` builds only the double-precision PETSc; `make test` (and `make setup-single`) also
# the single-precision one (PNODE_PRECISION=single) and the docs' tools; `make docs` builds the
# documentation site into docs/_build/html.
PY      := .venv/bin/python
NP      ?= 2
RUN_ARGS ?=
GPU     ?= 0
STAMP   := .venv/.pnode-setup-stamp-gpu$(GPU)
SINGLE_STAMP := .venv/.pnode-setup-single-stamp-gpu$(GPU)
DOCS_STAMP := .venv/.pnode-setup-docs-stamp

.PHONY: setup setup-single setup-docs run test test-long docs bench clean gpu-bundle

# The set-up script is idempotent; the stamp only saves its few seconds of checks when nothing
# it depends on changed.
# GPU=1 builds PETSc with CUDA (needs nvcc; see tools/cuda_petsc.sh).
$(STAMP): tools/setup.sh tools/cuda_petsc.sh requirements.txt setup.cfg
	GPU=$(GPU) bash tools/setup.sh
	touch $(STAMP)

setup: $(STAMP)

$(SINGLE_STAMP): $(STAMP)
	GPU=$(GPU) BUILD_SINGLE=1 bash tools/setup.sh
	touch $(SINGLE_STAMP)

setup-single: $(SINGLE_STAMP)

# Sphinx + MyST for `make docs`, Chromium for the docs' browser test.
$(DOCS_STAMP): $(STAMP)
	DOCS=1 bash tools/setup.sh
	touch $(DOCS_STAMP)

setup-docs: $(DOCS_STAMP)

run: setup
	mpiexec -n $(NP) $(PY) apps/classify.py --resume auto $(RUN_ARGS)

test: setup setup-single setup-docs
	$(PY) -m pytest -q -m "not long" tests

# Tests marked `long` (setup.cfg): minutes each, beyond what a quick check needs.
test-long: setup setup-single
	$(PY) -m pytest -q -m long tests

# The documentation site, warnings as errors (open docs/_build/html/index.html).
docs: setup setup-docs
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

bench: setup setup-single
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/vs_torchdiffeq.py
	$(PY) benchmarks/stiff.py
	$(PY) benchmarks/stiff_vs_scipy.py --quick
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/memory_peers.py --quick
	$(PY) benchmarks/grid_scaling.py
	$(PY) benchmarks/precision.py
	$(PY) benchmarks/faults.py
	$(PY) benchmarks/multinode.py
	$(PY) benchmarks/state_fuzz.py

# A relocatable CUDA PETSc + petsc4py for GPU nodes, built here without a GPU (tools/gpu_bundle.sh).
gpu-bundle:
	bash tools/gpu_bundle.sh

clean:
	rm -rf .venv runs *.egg-info docs/_build docs/_generated
