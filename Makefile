# pnode_dist: `make run` (set up + main job), `make test` (set up + whole test suite).
PY      := .venv/bin/python
NP      ?= 2
RUN_ARGS ?=
GPU     ?= 0
STAMP   := .venv/.pnode-setup-stamp-gpu$(GPU)

.PHONY: setup run test bench clean gpu-bundle

# The set-up script is idempotent; the stamp only saves its few seconds of checks when nothing
# it depends on changed.
# GPU=1 builds PETSc with CUDA (needs nvcc; see tools/cuda_petsc.sh).
$(STAMP): tools/setup.sh tools/cuda_petsc.sh requirements.txt setup.cfg
	GPU=$(GPU) bash tools/setup.sh
	touch $(STAMP)

setup: $(STAMP)

run: setup
	mpiexec -n $(NP) $(PY) apps/classify.py --resume auto $(RUN_ARGS)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/vs_torchdiffeq.py
	$(PY) benchmarks/stiff.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/grid_scaling.py
	$(PY) benchmarks/precision.py
	$(PY) benchmarks/faults.py
	$(PY) benchmarks/multinode.py
	$(PY) benchmarks/state_fuzz.py

# A relocatable CUDA PETSc + petsc4py for GPU nodes, built here without a GPU (tools/gpu_bundle.sh).
gpu-bundle:
	bash tools/gpu_bundle.sh

clean:
	rm -rf .venv runs *.egg-info
