#!/usr/bin/env bash
# A real Prometheus on loopback scrapes deltaserve's /metrics; a PromQL query returns the generated-token
# total, compared with what the clients were told. Not run in CI.
#
# Needs: `make install` (or .venv), `prometheus` on PATH (Debian: apt-get install prometheus).
# Usage: scripts/prometheus_demo.sh [extra `deltaserve serve` flags, e.g. --model PATH]
# Env: GRPC_PORT (50061), METRICS_PORT (9461), PROM_PORT (9091), REQUESTS (4), NEW_TOKENS (16).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
GRPC_PORT=${GRPC_PORT:-50061}
METRICS_PORT=${METRICS_PORT:-9461}
PROM_PORT=${PROM_PORT:-9091}
REQUESTS=${REQUESTS:-4}
NEW_TOKENS=${NEW_TOKENS:-16}
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

command -v prometheus >/dev/null || { echo "prometheus is not on PATH (apt-get install prometheus)" >&2; exit 1; }

echo "== deltaserve on 127.0.0.1:$GRPC_PORT, metrics on :$METRICS_PORT"
"$BIN/deltaserve" serve --host 127.0.0.1 --port "$GRPC_PORT" --metrics-port "$METRICS_PORT" "$@" \
    >"$WORK/deltaserve.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do
    grep -q "SERVING" "$WORK/deltaserve.log" && break
    kill -0 "${PIDS[0]}" 2>/dev/null || { cat "$WORK/deltaserve.log" >&2; exit 1; }
    sleep 1
done

cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: deltaserve
    static_configs:
      - targets: ["127.0.0.1:$METRICS_PORT"]
EOF
echo "== prometheus on 127.0.0.1:$PROM_PORT scraping it every second"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)

expected=0
for i in $(seq "$REQUESTS"); do
    tokens=$("$BIN/deltactl" generate --target "127.0.0.1:$GRPC_PORT" --json --ignore-eos \
        --max-new-tokens "$NEW_TOKENS" "Tell me something about the number $i." \
        | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["generated_tokens"])')
    expected=$((expected + tokens))
done
echo "== $REQUESTS requests generated $expected tokens (as the server told the client)"

query() {
    curl -sf --get "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1" \
        | "$BIN/python" -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
got=""
for _ in $(seq 60); do   # the next scrapes after the last request
    got=$(query 'deltaserve_generation_tokens_total{job="deltaserve"}' || true)
    [ -n "$got" ] && [ "${got%.*}" -eq "$expected" ] && break
    sleep 1
done
echo "== PromQL deltaserve_generation_tokens_total -> ${got:-nothing}"
echo "== PromQL sum(deltaserve_requests_total{outcome=\"completed\"}) -> $(query 'sum(deltaserve_requests_total{outcome="completed"})')"
echo "== PromQL histogram_quantile(0.95, sum by (le, method) (deltaserve_time_to_first_token_seconds_bucket)) -> $(query 'histogram_quantile(0.95, sum by (le, method) (deltaserve_time_to_first_token_seconds_bucket))') s"
if [ -n "$got" ] && [ "${got%.*}" -eq "$expected" ]; then
    echo "OK: Prometheus reports the $expected generated tokens"
else
    echo "FAIL: Prometheus reports '${got}', expected $expected" >&2
    exit 1
fi
