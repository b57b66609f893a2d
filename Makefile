# One-command set-up: every target that needs the project creates .venv and installs it first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test unit integration envoy-config clean

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

## test: unit and integration tests (real Envoy, real processor, official SDK clients)
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

## envoy-config: re-render the bundled envoy/envoy.yaml from the default config
envoy-config: $(STAMP)
	$(BIN)/extproc envoy-config --demo -o envoy/envoy.yaml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
