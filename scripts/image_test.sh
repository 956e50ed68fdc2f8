#!/usr/bin/env bash
# `make image-test`: builds the Dockerfile here and asks the container for an answer over gRPC.
#
# No image registry is reachable from these machines, so the base image is made locally: debootstrap writes a
# minimal Debian bookworm root filesystem with python3 (cached in $WORK), buildah imports it as
# localhost/deltaserve-base (from scratch plus the tarball), builds the Dockerfile on it (--isolation chroot) and runs `deltaserve serve` inside;
# deltactl outside checks health and gets an answer from an example adapter over the container's gRPC port.
# pip inside the build reaches the registry with this machine's CA bundle ($PIP_CERT) and the local wheels
# ($PIP_FIND_LINKS), both mounted read-only for the build only: nothing of them is written into the image.
# Needs root, debootstrap and buildah (apt-get install debootstrap buildah). Minutes; not part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${IMAGE_TEST_WORK:-/var/tmp/deltaserve-image-test}
BASE=localhost/deltaserve-base:bookworm
IMAGE=localhost/deltaserve:test
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CERT=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
FIND_LINKS=${PIP_FIND_LINKS:-}
DELTACTL=${DELTACTL:-.venv/bin/deltactl}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}   # works inside containers and on any filesystem

for tool in debootstrap buildah; do
    command -v "$tool" >/dev/null || { echo "image-test: $tool is missing (apt-get install $tool)" >&2; exit 2; }
done
mkdir -p "$WORK"

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    if [ ! -f "$WORK/rootfs.tar" ]; then
        rm -rf "$WORK/rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$WORK/rootfs" "$MIRROR"
        rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
        tar -C "$WORK/rootfs" -cf "$WORK/rootfs.tar" .
    fi
    # buildah 1.28 (Debian bookworm) has no `import`: an empty container, the tarball added at /, committed.
    base_container=$(buildah from scratch)
    buildah add "$base_container" "$WORK/rootfs.tar" /
    buildah commit --rm "$base_container" "$BASE"
fi

mounts=(-v "$CERT:/run/build/pip-ca.crt:ro")
build_args=(--build-arg "BASE_IMAGE=$BASE" --build-arg PIP_CERT=/run/build/pip-ca.crt)
if [ -n "$FIND_LINKS" ]; then
    mounts+=(-v "$FIND_LINKS:/run/build/wheels:ro")
    build_args+=(--build-arg PIP_FIND_LINKS=/run/build/wheels)
fi
buildah bud --isolation chroot --format docker --layers "${mounts[@]}" "${build_args[@]}" -t "$IMAGE" .

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
HTTP_PORT=$(free_port)
METRICS_PORT=$(free_port)
container=$(buildah from "$IMAGE")
server_pid=""
cleanup() {
    local status=$?
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true   # killed on purpose: its exit status is not the test's
    fi
    buildah rm "$container" >/dev/null || true
    exit "$status"
}
trap cleanup EXIT

# chroot isolation shares this machine's network: the ports below are reached from outside the container.
buildah run --isolation chroot "$container" -- deltaserve serve --host 127.0.0.1 --port "$PORT" \
    --http-port "$HTTP_PORT" --metrics-port "$METRICS_PORT" --threads 1 &
server_pid=$!

for _ in $(seq 1 240); do
    if "$DELTACTL" health --target "127.0.0.1:$PORT" --timeout 2 >/dev/null 2>&1; then
        break
    fi
    kill -0 "$server_pid" 2>/dev/null || { echo "image-test: the server exited" >&2; exit 1; }
    sleep 1
done
"$DELTACTL" health --target "127.0.0.1:$PORT"
"$DELTACTL" adapters list --target "127.0.0.1:$PORT"
answer=$("$DELTACTL" generate --target "127.0.0.1:$PORT" --adapter shout --max-new-tokens 16 "What is a cat?")
echo "shout adapter, from the container: $answer"
[ -n "$answer" ]
# the image's own HEALTHCHECK command, run inside the container
buildah run --isolation chroot --env DELTASERVE_TARGET="127.0.0.1:$PORT" "$container" -- deltactl health
# the build's CA bundle was a read-only mount: at most its empty mount point is left in the image
buildah run --isolation chroot "$container" -- sh -c '! test -s /run/build/pip-ca.crt'
echo "image-test: OK ($IMAGE answered on 127.0.0.1:$PORT)"
