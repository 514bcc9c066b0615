# defectscope: `make demo` (the main job) and `make test`; also `make serve`, `make bench`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-slow serve bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --slow

serve: $(STAMP)
	$(BIN)/defectscope serve

bench: $(STAMP)
	$(BIN)/python -m defectscope.benchmarks.bench_orthonormalise

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
