# One-command set-up: every target that needs the project creates .venv and installs it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-long test-fleet unit integration mypy envoy-config system-deps wrk bench soak clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@# xds-protos ships an old copy of opentelemetry/proto; whichever installs last wins, so
	@# put opentelemetry-proto's own files back on top (same version, no dependency changes).
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	$(BIN)/python -c 'from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope'
	touch $(STAMP)

## run: start Envoy + the processor (demo backend when no provider keys are set)
run: $(STAMP)
	$(BIN)/extproc run $(if $(CONFIG),--config $(CONFIG))

## system-deps: redis-server, which the rate-limit tests start on a free port, and prometheus
## (with promtool), which tests/integration/test_prometheus.py runs against the gateway (Debian packages)
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; \
	  else echo "the tests need redis-server: sudo apt-get install redis-server" >&2; exit 1; fi; }
	@{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  else echo "the tests need prometheus: sudo apt-get install prometheus" >&2; exit 1; fi; }

## test: mypy on extproc/, then unit and integration tests (real Envoy, real processor,
## official SDK clients, real Redis); requests of 70 s included, the 5-minute ones left to test-long
test: $(STAMP) system-deps
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not long" tests

## mypy: type-check extproc/ ([tool.mypy] in pyproject.toml)
mypy: $(STAMP)
	$(BIN)/mypy

## test-long: the tests that last minutes each (5-minute requests and streams through real Envoy, the fleet drill)
test-long: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider -m long tests

## test-fleet: the fleet tests alone, both kill drills included, printing their numbers (~5 min)
test-fleet: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/integration/test_fleet.py

unit: $(STAMP) system-deps
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP) system-deps
	$(BIN)/python -m pytest -q tests/integration

## wrk: the load generator bench and soak drive (Debian package)
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk; \
	  else echo "the benchmark needs wrk: sudo apt-get install wrk" >&2; exit 1; fi; }

## bench: Envoy alone vs the gateway under wrk, against an Envoy direct_response upstream
bench: $(STAMP) wrk
	$(BIN)/python scripts/bench $(BENCH_ARGS)

## soak: 10 minutes of mixed JSON + SSE traffic, processor memory and errors sampled every 10 s
soak: $(STAMP) wrk
	$(BIN)/python scripts/soak --mode soak $(SOAK_ARGS)

## envoy-config: re-render the bundled envoy/envoy.yaml from the default config
envoy-config: $(STAMP)
	$(BIN)/extproc envoy-config --demo --workers 2 -o envoy/envoy.yaml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mypy_cache
