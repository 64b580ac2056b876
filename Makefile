# pnode_dist: `make run` (set up + main job), `make test` (set up + whole test suite).
PY      := .venv/bin/python
NP      ?= 2
RUN_ARGS ?=
STAMP   := .venv/.pnode-setup-stamp

.PHONY: setup run test bench clean

# The set-up script is idempotent; the stamp only saves its few seconds of checks when nothing
# it depends on changed.
$(STAMP): tools/setup.sh requirements.txt setup.cfg
	bash tools/setup.sh
	touch $(STAMP)

setup: $(STAMP)

run: setup
	mpiexec -n $(NP) $(PY) apps/classify.py $(RUN_ARGS)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/stiff.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/grid_scaling.py

clean:
	rm -rf .venv runs *.egg-info
