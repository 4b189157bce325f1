#!/usr/bin/env bash
# Telemetry overhead benchmark: the same traffic through the same three
# release binaries, once with metrics and tracing off
# (CP2_OBSERVABILITY_*_ENABLED=false, the baseline DESIGN §3 names) and once
# with both on (spans exported over OTLP/gRPC to a real receiver, otlp-sink).
# Logs (JSON to a file) are on in both. Prints a Markdown report on stdout.
#
# Usage: scripts/bench/overhead.sh [--rate N] [--duration D] [--max-rate N]
#   --rate N      steady phase, requests/s (default 100)
#   --duration D  length of each phase (default 30s)
#   --max-rate N  saturation phase offered rate, requests/s (default 1000)
# Everything runs on loopback, on spare ports, with its own nats-server.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
cd "$ROOT"
RATE=100 DURATION=30s MAX_RATE=1000
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rate) RATE="$2"; shift 2 ;;
        --duration) DURATION="$2"; shift 2 ;;
        --max-rate) MAX_RATE="$2"; shift 2 ;;
        -h | --help) sed -n '2,/^set -e/s/^# \{0,1\}//p' "$0" | sed '$d'; exit 0 ;;
        *) echo "overhead: unknown argument $1" >&2; exit 2 ;;
    esac
done

NATS_BIN="${NATS_SERVER_BIN:-$(command -v nats-server || echo /usr/sbin/nats-server)}"
[[ -x $NATS_BIN ]] || { echo "overhead: nats-server not found (set NATS_SERVER_BIN)" >&2; exit 1; }
WORK="$(mktemp -d /tmp/beamline-bench.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "overhead: building release binaries" >&2
cargo build --release -q -p gateway -p router -p worker -p loadgen >&2
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"

wait_http() {
    local url=$1 _
    for _ in $(seq 100); do
        curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "overhead: $url never answered" >&2
    return 1
}

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# run_mode NAME METRICS TRACING -> writes $WORK/NAME.{steady,max}.txt and NAME.rss
run_mode() {
    local name=$1 metrics=$2 tracing=$3 dir="$WORK/$1"
    mkdir -p "$dir/js"
    "$NATS_BIN" -js -a 127.0.0.1 -p 24222 -sd "$dir/js" >"$dir/nats.log" 2>&1 &
    local nats=$!
    PIDS+=("$nats")
    sleep 0.5
    local sink=""
    if [[ $tracing == true ]]; then
        "$BIN/otlp-sink" --otlp 127.0.0.1:24317 --http 127.0.0.1:28889 >"$dir/sink.log" 2>&1 &
        sink=$!
        PIDS+=("$sink")
    fi
    local common=(
        NATS_URL=nats://127.0.0.1:24222
        OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:24317
        CP2_OBSERVABILITY_METRICS_ENABLED="$metrics"
        CP2_OBSERVABILITY_TRACING_ENABLED="$tracing"
        LOG_FORMAT=json RUST_LOG=info
    )
    env "${common[@]}" GATEWAY_LISTEN_ADDR=127.0.0.1:23000 GATEWAY_ADMIN_ADDR=127.0.0.1:23001 \
        GATEWAY_API_KEYS=demo:demo-key GATEWAY_RATE_LIMIT_RPS=0 \
        DATABASE_URL="sqlite://$dir/gateway.db?mode=rwc" \
        "$BIN/gateway" >"$dir/gateway.log" 2>&1 &
    local gateway=$!
    env "${common[@]}" ROUTER_ADMIN_ADDR=127.0.0.1:29101 ROUTER_GRPC_ADDR=127.0.0.1:29100 \
        ROUTER_GRPC_TOKEN=bench-router-grpc-token \
        "$BIN/router" >"$dir/router.log" 2>&1 &
    local router=$!
    env "${common[@]}" WORKER_ADMIN_ADDR=127.0.0.1:29192 WORKER_CONCURRENCY=64 \
        WORKER_FS_ROOT="$dir/sandbox" WORKER_DATABASE_URL="sqlite://$dir/worker.db?mode=rwc" \
        "$BIN/worker" >"$dir/worker.log" 2>&1 &
    local worker=$!
    PIDS+=("$gateway" "$router" "$worker")
    wait_http http://127.0.0.1:23001/health/ready
    wait_http http://127.0.0.1:29101/health/ready
    wait_http http://127.0.0.1:29192/health/ready

    local cpu_before=$(( $(cpu_ticks "$gateway") + $(cpu_ticks "$router") + $(cpu_ticks "$worker") ))
    echo "overhead: $name: steady $RATE req/s for $DURATION" >&2
    "$BIN/loadgen" --url http://127.0.0.1:23000 --scenario steady --rate "$RATE" \
        --duration "$DURATION" --follow-every 0 --no-progress >"$dir/steady.txt" 2>&1
    local cpu_after=$(( $(cpu_ticks "$gateway") + $(cpu_ticks "$router") + $(cpu_ticks "$worker") ))
    echo "overhead: $name: saturation, offered $MAX_RATE req/s for $DURATION" >&2
    "$BIN/loadgen" --url http://127.0.0.1:23000 --scenario steady --rate "$MAX_RATE" \
        --duration "$DURATION" --follow-every 0 --concurrency 64 --no-progress >"$dir/max.txt" 2>&1
    echo "$(( cpu_after - cpu_before ))" >"$dir/cpu_ticks"
    echo "$(rss_kib "$gateway") $(rss_kib "$router") $(rss_kib "$worker")" >"$dir/rss"
    # Work left in the queue: the worker may lag the gateway at saturation.
    kill "$gateway" "$router" "$worker" ${sink:+"$sink"} "$nats" 2>/dev/null || true
    wait "$gateway" "$router" "$worker" ${sink:+"$sink"} "$nats" 2>/dev/null || true
}

run_mode off false false
run_mode on true true

# The lines of loadgen's closing table a reader compares.
summary() {
    grep -E "throughput|p50" "$1" | sed 's/^ *//'
}

tick=$(getconf CLK_TCK)
{
    echo "## Run of $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)."
    echo "Command: \`scripts/bench/overhead.sh --rate $RATE --duration $DURATION --max-rate $MAX_RATE\`"
    echo
    for mode in off on; do
        read -r g r w <"$WORK/$mode/rss"
        cpu=$(cat "$WORK/$mode/cpu_ticks")
        echo "### telemetry $mode"
        echo
        echo "Steady phase ($RATE req/s, $DURATION), POST /v1/runs latency:"
        echo '```'
        summary "$WORK/$mode/steady.txt"
        echo '```'
        echo "Saturation phase (offered $MAX_RATE req/s, 64 in flight):"
        echo '```'
        summary "$WORK/$mode/max.txt"
        echo '```'
        echo "CPU of the three services during the steady phase: $(awk -v t="$cpu" -v k="$tick" 'BEGIN {printf "%.1f", t/k}') s."
        echo "Resident memory after both phases: gateway $((g / 1024)) MiB, router $((r / 1024)) MiB, worker $((w / 1024)) MiB."
        echo
    done
}
