#!/usr/bin/env bash
# Local Beamline stack without Docker: nats-server (JetStream), gateway,
# router and worker built in release mode, an OTLP span sink standing in for
# the collector + Jaeger (otlp-sink, from scripts/loadgen), Prometheus and
# Alertmanager from Debian's packages when installed (the same scrape jobs and
# rules as the compose stack), loadgen's mixed demo traffic, and one sample run
# end to end.
#
# Usage: scripts/dev-up.sh [--no-build] [--no-run] [--no-traffic] [--sample-run]
#   --no-build    start the binaries already in target/release
#   --no-run      do not submit the sample run
#   --no-traffic  do not start loadgen (continuous `mixed` traffic)
#   --sample-run  only submit the sample run to a gateway already up on
#                 localhost:3000 (demo.sh uses this for the compose stack)
# Environment overrides (defaults in brackets): GATEWAY_API_KEYS
# [demo:demo-key,slow:slow-key], DATABASE_URL [sqlite://.dev/gateway.db?mode=rwc],
# NATS_URL, DEV_NATS_PORT [4222], RUST_LOG [info], LOG_FORMAT [json],
# OTEL_EXPORTER_OTLP_ENDPOINT [http://localhost:4317] (otlp-sink listens there
# unless something already does), SPANMETRICS_PORT [8889] (otlp-sink's HTTP:
# /api/traces/{id}, /metrics), PROMETHEUS_PORT [9090], ALERTMANAGER_PORT [9093],
# the services' *_ADDR variables (README), LOADGEN_SCENARIO [mixed],
# LOADGEN_RATE [5], GATEWAY_URL [http://localhost:3000] (for --sample-run),
# DEV_PROFILE [release] (debug: use/build target/debug, e.g. in CI after the tests),
# DEV_DIR [.dev] (state, logs, pid files), DEV_READY_TIMEOUT [60] and
# DEV_RUN_TIMEOUT [30] seconds.
# Stop everything with scripts/dev-down.sh; state and logs live in .dev/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
DEV="${DEV_DIR:-.dev}"
NATS_PORT="${DEV_NATS_PORT:-4222}"
PROFILE="${DEV_PROFILE:-release}"
[[ $PROFILE == release || $PROFILE == debug ]] || { echo "dev-up: DEV_PROFILE must be release or debug" >&2; exit 2; }
SPANMETRICS_PORT="${SPANMETRICS_PORT:-8889}"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-9090}"
ALERTMANAGER_PORT="${ALERTMANAGER_PORT:-9093}"
READY_TIMEOUT="${DEV_READY_TIMEOUT:-60}"
RUN_TIMEOUT="${DEV_RUN_TIMEOUT:-30}"
export GATEWAY_API_KEYS="${GATEWAY_API_KEYS:-demo:demo-key,slow:slow-key}"

build=1 run=1 only_run=0 traffic=1
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --no-run) run=0 ;;
        --no-traffic) traffic=0 ;;
        --sample-run) only_run=1 ;;
        -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "dev-up: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

log() { printf 'dev-up: %s\n' "$*"; }
die() { printf 'dev-up: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# True when process $1 exists and is not a zombie (an exited child that its
# new parent has not reaped yet still answers kill -0).
running() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(sed -n 's/^.*) \(.\).*$/\1/p' "/proc/$1/stat" 2>/dev/null || true)"
    [[ $state != Z ]]
}

# True when .dev/$1.pid names a live process whose command is $2
# and whose working directory is this checkout (a reused pid is not ours).
pid_alive() {
    local pidfile="$DEV/$1.pid" pid comm cwd
    [[ -s $pidfile ]] || return 1
    pid="$(<"$pidfile")"
    running "$pid" || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    cwd="$(readlink "/proc/$pid/cwd" 2>/dev/null || true)"
    [[ -z $comm || $comm == "$2" ]] && [[ -z $cwd || $cwd == "$ROOT" ]]
}

# The port of an address like 0.0.0.0:3001.
port_of() { printf '%s' "${1##*:}"; }

# Print field $1 of the JSON object on stdin ("" when absent or null).
json_field() {
    python3 -c '
import json, sys
try:
    v = json.load(sys.stdin).get(sys.argv[1])
except (ValueError, AttributeError):
    v = None
print("" if v is None else v)' "$1"
}

# Submit the sample flow, poll it to a terminal status and print the result.
sample_run() {
    local first key body response code run_id status trace_id trace_url deadline
    first="${GATEWAY_API_KEYS%%,*}"
    key="${first#*:}"
    body='{"flow_id":"hello","steps":[{"id":"a","type":"noop"},{"id":"b","type":"delay","input":{"ms":50}}]}'
    response="$(curl -sS -w '\n%{http_code}' -H "Authorization: Bearer $key" \
        -H 'content-type: application/json' -d "$body" "$GATEWAY_URL/v1/runs")" \
        || die "cannot reach the gateway at $GATEWAY_URL"
    code="${response##*$'\n'}"
    response="${response%$'\n'*}"
    [[ $code == 202 || $code == 200 ]] || die "POST /v1/runs answered $code: $response"
    run_id="$(json_field run_id <<<"$response")"
    trace_id="$(json_field trace_id <<<"$response")"
    trace_url="$(json_field trace_url <<<"$response")"
    [[ -n $run_id ]] || die "POST /v1/runs gave no run_id: $response"

    status="$(json_field status <<<"$response")"
    deadline=$((SECONDS + RUN_TIMEOUT))
    while :; do
        case "$status" in
            succeeded | failed | rejected | timed_out) break ;;
        esac
        ((SECONDS < deadline)) || { log "run still '$status' after ${RUN_TIMEOUT}s"; break; }
        sleep 0.5
        response="$(curl -sS -H "Authorization: Bearer $key" "$GATEWAY_URL/v1/runs/$run_id")" || continue
        status="$(json_field status <<<"$response")"
    done

    printf '\n  run id     %s\n  status     %s\n  trace id   %s\n  trace url  %s\n\n' \
        "$run_id" "$status" "${trace_id:-?}" "${trace_url:-?}"
    [[ $status == succeeded ]]
}

if ((only_run)); then
    GATEWAY_URL="${GATEWAY_URL:-http://localhost:3000}"
    sample_run
    exit
fi

mkdir -p "$DEV/nats"

# --- NATS -------------------------------------------------------------------
if pid_alive nats nats-server; then
    log "nats-server already running (pid $(<"$DEV/nats.pid"))"
elif port_open "$NATS_PORT"; then
    log "using the NATS server already listening on 127.0.0.1:$NATS_PORT (it needs JetStream)"
    rm -f "$DEV/nats.pid"   # not ours: dev-down must leave it alone
else
    NATS_BIN="$(command -v nats-server || true)"
    if [[ -z $NATS_BIN && -x /usr/sbin/nats-server ]]; then NATS_BIN=/usr/sbin/nats-server; fi
    if [[ -z $NATS_BIN ]]; then
        log "installing nats-server (apt-get)"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -qq update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y nats-server >/dev/null
        NATS_BIN=/usr/sbin/nats-server
    fi
    nohup "$NATS_BIN" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$DEV/nats" </dev/null >>"$DEV/nats.log" 2>&1 &
    echo $! >"$DEV/nats.pid"
    for _ in $(seq 50); do port_open "$NATS_PORT" && break; sleep 0.2; done
    port_open "$NATS_PORT" || die "nats-server did not start; see $DEV/nats.log"
    log "started nats-server (pid $(<"$DEV/nats.pid"))"
fi

# --- build ------------------------------------------------------------------
if ((build)); then
    if [[ $PROFILE == release ]]; then
        log "cargo build --release -p gateway -p router -p worker -p loadgen"
        cargo build --release -p gateway -p router -p worker -p loadgen
    else
        log "cargo build -p gateway -p router -p worker -p loadgen"
        cargo build -p gateway -p router -p worker -p loadgen
    fi
fi
TARGET_DIR="$(cargo metadata --no-deps --format-version 1 \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"

# --- services ---------------------------------------------------------------
GATEWAY_ADMIN="$(port_of "${GATEWAY_ADMIN_ADDR:-0.0.0.0:3001}")"
ROUTER_ADMIN="$(port_of "${ROUTER_ADMIN_ADDR:-0.0.0.0:9001}")"
WORKER_ADMIN="$(port_of "${WORKER_ADMIN_ADDR:-0.0.0.0:9092}")"
GATEWAY_PORT="$(port_of "${GATEWAY_LISTEN_ADDR:-0.0.0.0:3000}")"
ROUTER_PORT="$(port_of "${ROUTER_GRPC_ADDR:-0.0.0.0:9000}")"
GATEWAY_URL="${GATEWAY_URL:-http://localhost:$GATEWAY_PORT}"

export NATS_URL="${NATS_URL:-nats://127.0.0.1:$NATS_PORT}"
export DATABASE_URL="${DATABASE_URL:-sqlite://$DEV/gateway.db?mode=rwc}"
export LOG_FORMAT="${LOG_FORMAT:-json}"
export RUST_LOG="${RUST_LOG:-info}"
export OTEL_EXPORTER_OTLP_ENDPOINT="${OTEL_EXPORTER_OTLP_ENDPOINT:-http://localhost:4317}"
# The same routing policy, extension registry and extension latency as compose.
export ROUTER_POLICY_FILE="${ROUTER_POLICY_FILE:-$ROOT/observability/stack/policy.yaml}"
export ROUTER_EXTENSIONS_FILE="${ROUTER_EXTENSIONS_FILE:-$ROOT/observability/stack/extensions.yaml}"
# gRPC Decide needs `authorization: Bearer <token>`; the router does not start without one.
export ROUTER_GRPC_TOKEN="${ROUTER_GRPC_TOKEN:-dev-router-grpc-token}"
export WORKER_EXT_PRE_LATENCY_MS="${WORKER_EXT_PRE_LATENCY_MS:-150}"
# Approval steps hold a worker slot while they wait: more slots than the default 8.
export WORKER_CONCURRENCY="${WORKER_CONCURRENCY:-32}"
OTLP_PORT="${OTEL_EXPORTER_OTLP_ENDPOINT##*:}"
OTLP_PORT="${OTLP_PORT%%/*}"

# launch NAME COMM BIN ARGS...: start BIN in the background as .dev/NAME
# (pid file, log), unless a process we started (command COMM) still runs.
launch() {
    local name="$1" comm="$2" bin="$3"
    shift 3
    if pid_alive "$name" "$comm"; then
        log "$name already running (pid $(<"$DEV/$name.pid"))"
        return 1
    fi
    nohup "$bin" "$@" </dev/null >>"$DEV/$name.log" 2>&1 &
    echo $! >"$DEV/$name.pid"
    log "started $name (pid $!, log $DEV/$name.log)"
}

# start NAME PORT... : start target/<profile>/NAME unless it already runs.
start() {
    local name="$1" bin="$TARGET_DIR/$PROFILE/$1" port
    shift
    if pid_alive "$name" "$name"; then
        log "$name already running (pid $(<"$DEV/$name.pid"))"
        return
    fi
    for port in "$@"; do
        ! port_open "$port" || die "port $port is taken by another process; cannot start $name"
    done
    [[ -x $bin ]] || die "$bin not found; run without --no-build"
    OTEL_SERVICE_NAME="$name" launch "$name" "$name" "$bin" || true
}

# --- otlp-sink: the collector + Jaeger stand-in -------------------------------
sink=0
if pid_alive otlp-sink otlp-sink; then
    log "otlp-sink already running (pid $(<"$DEV/otlp-sink.pid"))"
    sink=1
elif port_open "$OTLP_PORT"; then
    log "something already listens on $OTEL_EXPORTER_OTLP_ENDPOINT (a collector?); spans go there"
    rm -f "$DEV/otlp-sink.pid"
elif port_open "$SPANMETRICS_PORT"; then
    log "port $SPANMETRICS_PORT is taken; not starting otlp-sink (spans are dropped)"
else
    [[ -x $TARGET_DIR/$PROFILE/otlp-sink ]] || die "$TARGET_DIR/$PROFILE/otlp-sink not found; run without --no-build"
    launch otlp-sink otlp-sink "$TARGET_DIR/$PROFILE/otlp-sink" \
        --otlp "127.0.0.1:$OTLP_PORT" --http "127.0.0.1:$SPANMETRICS_PORT" || true
    sink=1
fi

start gateway "$GATEWAY_PORT" "$GATEWAY_ADMIN"
start router "$ROUTER_PORT" "$ROUTER_ADMIN"
start worker "$WORKER_ADMIN"

# wait_ready NAME ADMIN_PORT: poll /health/ready until 200, the process dies,
# or READY_TIMEOUT seconds pass.
wait_ready() {
    local name="$1" url="http://127.0.0.1:$2/health/ready" deadline=$((SECONDS + READY_TIMEOUT))
    until curl -fsS -o /dev/null "$url" 2>/dev/null; do
        if ! pid_alive "$name" "$name"; then
            tail -n 20 "$DEV/$name.log" >&2 || true
            die "$name exited; see $DEV/$name.log"
        fi
        ((SECONDS < deadline)) || die "$name not ready after ${READY_TIMEOUT}s ($url); see $DEV/$name.log"
        sleep 0.5
    done
    log "$name ready ($url)"
}

wait_ready gateway "$GATEWAY_ADMIN"
wait_ready router "$ROUTER_ADMIN"
wait_ready worker "$WORKER_ADMIN"

port_open "$OTLP_PORT" || log "note: nothing listens on localhost:$OTLP_PORT, so spans are dropped"

# --- Prometheus and Alertmanager (Debian's packages, when installed) ---------
# The configuration is observability/prometheus/prometheus.yml with the
# compose host names turned into local ports and the compose-only jobs
# (collector internals, NATS exporter) dropped; the rules are the same files.
find_bin() {
    local name
    for name in "$@"; do
        command -v "$name" 2>/dev/null && return 0
        [[ -x /usr/bin/$name ]] && { echo "/usr/bin/$name"; return 0; }
    done
    return 1
}
prometheus=0 alertmanager=0
PROM_BIN="$(find_bin prometheus || true)"
AM_BIN="$(find_bin prometheus-alertmanager alertmanager || true)"
if [[ -z $PROM_BIN || -z $AM_BIN ]]; then
    log "note: Prometheus/Alertmanager not installed; for dashboards' data and alerts:" \
        "apt-get install prometheus prometheus-alertmanager, then run dev-up again"
fi
if [[ -n $AM_BIN ]]; then
    if pid_alive alertmanager "$(basename "$AM_BIN" | cut -c1-15)"; then
        log "alertmanager already running (pid $(<"$DEV/alertmanager.pid"))"
        alertmanager=1
    elif port_open "$ALERTMANAGER_PORT"; then
        log "port $ALERTMANAGER_PORT is taken; not starting Alertmanager (set ALERTMANAGER_PORT)"
    else
        mkdir -p "$DEV/alertmanager"
        # --cluster.listen-address= : a single instance, no gossip port (9094).
        launch alertmanager "$(basename "$AM_BIN" | cut -c1-15)" "$AM_BIN" \
            --config.file="$ROOT/observability/alertmanager/alertmanager.yml" \
            --storage.path="$DEV/alertmanager" \
            --web.listen-address="127.0.0.1:$ALERTMANAGER_PORT" \
            --cluster.listen-address= || true
        alertmanager=1
    fi
fi
if [[ -n $PROM_BIN ]]; then
    if pid_alive prometheus prometheus; then
        log "prometheus already running (pid $(<"$DEV/prometheus.pid"))"
        prometheus=1
    elif port_open "$PROMETHEUS_PORT"; then
        log "port $PROMETHEUS_PORT is taken; not starting Prometheus (set PROMETHEUS_PORT)"
    else
        mkdir -p "$DEV/prometheus"
        sed -e '/^ *# compose-only:begin$/,/^ *# compose-only:end$/d' \
            -e "s#\"gateway:3001\"#\"127.0.0.1:$GATEWAY_ADMIN\"#" \
            -e "s#\"router:9001\"#\"127.0.0.1:$ROUTER_ADMIN\"#" \
            -e "s#\"worker:9092\"#\"127.0.0.1:$WORKER_ADMIN\"#" \
            -e "s#\"otel-collector:8889\"#\"127.0.0.1:$SPANMETRICS_PORT\"#" \
            -e "s#\"prometheus:9090\"#\"127.0.0.1:$PROMETHEUS_PORT\"#" \
            -e "s#\"alertmanager:9093\"#\"127.0.0.1:$ALERTMANAGER_PORT\"#" \
            -e "s#^  - rules/\*\.yml#  - $ROOT/observability/prometheus/rules/*.yml#" \
            observability/prometheus/prometheus.yml >"$DEV/prometheus/prometheus.yml"
        grep -q 'job_name: gateway' "$DEV/prometheus/prometheus.yml" \
            || die "generating $DEV/prometheus/prometheus.yml lost the scrape jobs"
        if command -v promtool >/dev/null; then
            promtool check config "$DEV/prometheus/prometheus.yml" >/dev/null \
                || die "the generated $DEV/prometheus/prometheus.yml is invalid (promtool check config)"
        fi
        launch prometheus prometheus "$PROM_BIN" \
            --config.file="$DEV/prometheus/prometheus.yml" \
            --storage.tsdb.path="$DEV/prometheus/data" \
            --storage.tsdb.retention.time=2d \
            --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
            --web.enable-lifecycle || true
        prometheus=1
    fi
fi
wait_http() {
    local name="$1" url="$2" deadline=$((SECONDS + READY_TIMEOUT))
    until curl -fsS -o /dev/null "$url" 2>/dev/null; do
        ((SECONDS < deadline)) || die "$name not ready after ${READY_TIMEOUT}s ($url); see $DEV/$name.log"
        sleep 0.5
    done
    log "$name ready ($url)"
}
((!alertmanager)) || wait_http alertmanager "http://127.0.0.1:$ALERTMANAGER_PORT/-/ready"
((!prometheus)) || wait_http prometheus "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"

# --- loadgen: continuous demo traffic ----------------------------------------
loadgen=0
if ((traffic)); then
    [[ -x $TARGET_DIR/$PROFILE/loadgen ]] || die "$TARGET_DIR/$PROFILE/loadgen not found; run without --no-build"
    first_key="${GATEWAY_API_KEYS%%,*}"
    slow_key="$(tr ',' '\n' <<<"$GATEWAY_API_KEYS" | sed -n 's/^slow://p' | head -n 1)"
    launch loadgen loadgen "$TARGET_DIR/$PROFILE/loadgen" \
        --scenario "${LOADGEN_SCENARIO:-mixed}" --rate "${LOADGEN_RATE:-5}" --duration 0 \
        --url "http://127.0.0.1:$GATEWAY_PORT" --api-key "${first_key#*:}" \
        --slow-api-key "${slow_key:-slow-key}" --report-every 60s || true
    loadgen=1
fi

rc=0
if ((run)); then
    log "submitting the sample run"
    sample_run || rc=$?
fi

echo "Beamline dev stack is up (admin ports serve /metrics and /health/ready):"
printf '  %-13s %-34s %s\n' \
    gateway "API  http://localhost:$GATEWAY_PORT" "admin http://localhost:$GATEWAY_ADMIN" \
    router "gRPC localhost:$ROUTER_PORT" "admin http://localhost:$ROUTER_ADMIN (gRPC: Bearer \$ROUTER_GRPC_TOKEN)" \
    worker "" "admin http://localhost:$WORKER_ADMIN" \
    nats "nats://localhost:$NATS_PORT" ""
((!sink)) || printf '  %-13s %-34s %s\n' otlp-sink "OTLP localhost:$OTLP_PORT" \
    "traces http://localhost:$SPANMETRICS_PORT/api/traces/<trace_id>, span metrics /metrics"
((!prometheus)) || printf '  %-13s %s\n' prometheus "http://localhost:$PROMETHEUS_PORT (alerts: /alerts, targets: /targets)"
((!alertmanager)) || printf '  %-13s %s\n' alertmanager "http://localhost:$ALERTMANAGER_PORT"
((!loadgen)) || printf '  %-13s %s\n' loadgen "${LOADGEN_SCENARIO:-mixed} traffic at ${LOADGEN_RATE:-5}/s (tables every minute in $DEV/loadgen.log)"
echo "No Grafana or Jaeger UI without Docker: scripts/observability/validate_dashboards.sh runs every"
echo "panel's query against this Prometheus; validate_traces.sh checks a run's trace in otlp-sink."
echo "Logs: $DEV/<name>.log   Stop: scripts/dev-down.sh"
exit "$rc"
