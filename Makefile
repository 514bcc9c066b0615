# defectscope: `make demo` (the main job) and `make test`; also `make serve`, `make bench`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test test-slow serve bench install clean tango-db

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[cpu,test,train]"
	touch $@

# `make demo` needs only the serving install (no TensorFlow, finufft or Dask): on a fresh clone .venv gets
# just that; `make test` adds the rest to the same .venv.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[cpu,demo]"
	touch $@

install: $(STAMP)

# The main job: serve the bundled 3-class model, classify the bundled simulated examples of each class
# (and the measured 34-ID-C scan when ../shared/data is there) through the real client; table +
# demo_out/demo.png.
demo: $(DEMO_STAMP)
	$(BIN)/defectscope demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --slow

serve: $(STAMP)
	$(BIN)/defectscope serve

# Serving end to end vs bare inference, raw scans, throughput, CURVE, orthonormalisation ->
# benchmarks/prepare_steps.json, results.json + results.md + the tables in docs/performance.md and README.md;
# then the simulator's speed (benchmarks/simulate.json). A background relaxation (training.relax) is paused
# for the run and resumed after it, whatever happens (trap); its PIDs are recorded in the results.
bench: $(STAMP)
	@pids="$$(for p in $$(pgrep -f 'defectscope[.]training[.]relax'); do echo $$p; pgrep -P $$p; done | tr '\n' ' ')"; \
	if [ -n "$$pids" ]; then trap 'kill -CONT '"$$pids"' 2>/dev/null' EXIT INT TERM; kill -STOP $$pids; fi; \
	$(BIN)/python -m defectscope.benchmarks.report --paused "$$pids" && \
	$(BIN)/python -m defectscope.benchmarks.bench_simulate

# A local Tango database for the real-database test (root; Debian/Ubuntu). Then: export TANGO_HOST=127.0.0.1:10000
tango-db:
	deploy/tango-db-setup.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
