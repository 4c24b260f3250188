# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the package (torch pinned to 2.13.0, CPU).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Downpour SGD on MNIST-1D: 1 coordinator, 2 parameter shards (Adagrad inside), 2 replicas.
demo: $(STAMP)
	$(BIN)/distbelief train --algorithm downpour --dataset mnist1d --model cnn \
		--replicas 2 --shards 2 --rule adagrad --lr 0.02 --epochs 4 --eval-every 250

# Two pytest workers, a test file each at a time: most tests wait on the processes of
# the jobs they start, so two of them share the two cores well (module fixtures that
# share one job between tests stay within their file's worker). Files are handed out in
# collection order, the longest first (tests/conftest.py), not by their number of tests.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python benchmarks/ps_bandwidth.py

# The whole suite 10 times back to back, each run from a fresh clone as CI does:
# pass/fail counts, wall time and the failing tests' ids per run, as one JSON document.
.PHONY: repeat
repeat: $(STAMP)
	$(BIN)/python benchmarks/suite_repeat.py --runs 10

clean:
	rm -rf $(VENV) runs .pytest_cache
