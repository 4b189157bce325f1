#!/usr/bin/env bash
# Local Beamline stack without Docker: nats-server (JetStream) + gateway,
# router and worker built in release mode, then one sample run end to end.
#
# Usage: scripts/dev-up.sh [--no-build] [--no-run] [--sample-run]
#   --no-build    start the binaries already in target/release
#   --no-run      do not submit the sample run
#   --sample-run  only submit the sample run to a gateway already up on
#                 localhost:3000 (demo.sh uses this for the compose stack)
# Environment overrides (defaults in brackets): GATEWAY_API_KEYS [demo:demo-key],
# DATABASE_URL [sqlite://.dev/gateway.db?mode=rwc], NATS_URL, RUST_LOG [info],
# LOG_FORMAT [json], OTEL_EXPORTER_OTLP_ENDPOINT [http://localhost:4317],
# GATEWAY_URL [http://localhost:3000] (for --sample-run),
# DEV_READY_TIMEOUT [60] and DEV_RUN_TIMEOUT [30] seconds.
# Stop everything with scripts/dev-down.sh; state and logs live in .dev/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
DEV=.dev
NATS_PORT=4222
READY_TIMEOUT="${DEV_READY_TIMEOUT:-60}"
RUN_TIMEOUT="${DEV_RUN_TIMEOUT:-30}"
GATEWAY_URL="${GATEWAY_URL:-http://localhost:3000}"
export GATEWAY_API_KEYS="${GATEWAY_API_KEYS:-demo:demo-key}"

build=1 run=1 only_run=0
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --no-run) run=0 ;;
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
    log "cargo build --release -p gateway -p router -p worker"
    cargo build --release -p gateway -p router -p worker
fi
TARGET_DIR="$(cargo metadata --no-deps --format-version 1 \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"

# --- services ---------------------------------------------------------------
GATEWAY_ADMIN="$(port_of "${GATEWAY_ADMIN_ADDR:-0.0.0.0:3001}")"
ROUTER_ADMIN="$(port_of "${ROUTER_ADMIN_ADDR:-0.0.0.0:9001}")"
WORKER_ADMIN="$(port_of "${WORKER_ADMIN_ADDR:-0.0.0.0:9092}")"
GATEWAY_PORT="$(port_of "${GATEWAY_LISTEN_ADDR:-0.0.0.0:3000}")"
ROUTER_PORT="$(port_of "${ROUTER_GRPC_ADDR:-0.0.0.0:9000}")"

export NATS_URL="${NATS_URL:-nats://127.0.0.1:$NATS_PORT}"
export DATABASE_URL="${DATABASE_URL:-sqlite://$DEV/gateway.db?mode=rwc}"
export LOG_FORMAT="${LOG_FORMAT:-json}"
export RUST_LOG="${RUST_LOG:-info}"
export OTEL_EXPORTER_OTLP_ENDPOINT="${OTEL_EXPORTER_OTLP_ENDPOINT:-http://localhost:4317}"

# start NAME PORT... : start target/release/NAME unless it already runs.
start() {
    local name="$1" bin="$TARGET_DIR/release/$1" port
    shift
    if pid_alive "$name" "$name"; then
        log "$name already running (pid $(<"$DEV/$name.pid"))"
        return
    fi
    for port in "$@"; do
        ! port_open "$port" || die "port $port is taken by another process; cannot start $name"
    done
    [[ -x $bin ]] || die "$bin not found; run without --no-build"
    OTEL_SERVICE_NAME="$name" nohup "$bin" </dev/null >>"$DEV/$name.log" 2>&1 &
    echo $! >"$DEV/$name.pid"
    log "started $name (pid $!, log $DEV/$name.log)"
}

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

port_open 4317 || log "note: nothing listens on localhost:4317, so spans are dropped" \
    "(docker compose up -d jaeger gives you a collector and the UI)"

rc=0
if ((run)); then
    log "submitting the sample run"
    sample_run || rc=$?
fi

echo "Beamline dev stack is up (admin ports serve /metrics and /health/ready):"
printf '  %-8s %-28s %s\n' \
    gateway "API  http://localhost:$GATEWAY_PORT" "admin http://localhost:$GATEWAY_ADMIN" \
    router "gRPC localhost:$ROUTER_PORT" "admin http://localhost:$ROUTER_ADMIN" \
    worker "" "admin http://localhost:$WORKER_ADMIN"
echo "Logs: $DEV/<name>.log   Stop: scripts/dev-down.sh"
exit "$rc"
