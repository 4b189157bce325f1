#!/usr/bin/env bash
# The Beamline demo: bring the stack up and follow one run into Jaeger.
# With a Docker engine: `docker compose up --build -d` (the whole stack of
# docker-compose.yml, with loadgen traffic), wait for the gateway, submit a
# sample run, print its trace URL and the UIs. Without one: run the local
# stack instead (scripts/dev-up.sh: services, otlp-sink, Prometheus,
# Alertmanager, loadgen; same output).
#
# Usage: scripts/demo.sh [dev-up options]
#        scripts/demo.sh --fault slow-extension|extension-errors|errors|worker-down|off
# A fault scenario is switched on in the running stack (compose or local) and
# names the alert to watch for (Prometheus /alerts, Alertmanager); `off`
# switches every fault off again.
# DEMO_READY_TIMEOUT (default 180) bounds the wait for the gateway, in seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
READY_TIMEOUT="${DEMO_READY_TIMEOUT:-180}"

engine=0
docker info >/dev/null 2>&1 && engine=1
compose=()
if ((engine)); then
    if docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    elif command -v docker-compose >/dev/null 2>&1; then
        compose=(docker-compose)
    fi
fi

# fault NAME: switch a fault scenario on (or all off) in the running stack.
fault() {
    local name="$1" dev="${DEV_DIR:-.dev}" watch
    case "$name" in
        slow-extension) watch="ExtensionLatencyHigh (5 min), RouterDecisionLatencyHigh" ;;
        extension-errors) watch="ExtensionFailureSpike (3 min), ExtensionCircuitBreakerOpen" ;;
        errors) watch="RunFailureRateHigh (2-3 min), RunSuccessBudgetBurnFast" ;;
        worker-down) watch="ComponentDown (1 min), WorkerQueueDepthHigh (5 min)" ;;
        off) watch="the alerts above resolving" ;;
        *) echo "demo: unknown fault '$name' (slow-extension, extension-errors, errors, worker-down, off)" >&2; exit 2 ;;
    esac
    if ((${#compose[@]})); then
        case "$name" in
            slow-extension) FAULT_SLOW_EXTENSION_MS=1500 "${compose[@]}" up -d worker ;;
            extension-errors) FAULT_EXTENSION_ERROR_RATE=0.6 "${compose[@]}" up -d worker ;;
            errors) "${compose[@]}" --profile fault-errors up -d loadgen-errors ;;
            worker-down) "${compose[@]}" stop worker ;;
            off)
                "${compose[@]}" --profile fault-errors rm -sf loadgen-errors
                "${compose[@]}" up -d worker
                ;;
        esac
    else
        # The local stack: the same faults on the processes dev-up started.
        local pid
        case "$name" in
            slow-extension | extension-errors | worker-down | off)
                if [[ -s $dev/worker.pid ]] && pid="$(<"$dev/worker.pid")" \
                    && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == worker ]]; then
                    kill -TERM "$pid"
                    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
                    rm -f "$dev/worker.pid"
                fi
                ;;
        esac
        case "$name" in
            slow-extension) WORKER_EXT_PRE_LATENCY_MS=1500 bash scripts/dev-up.sh --no-build --no-run --no-traffic >/dev/null ;;
            extension-errors) WORKER_EXT_VALIDATOR_ERROR_RATE=0.6 bash scripts/dev-up.sh --no-build --no-run --no-traffic >/dev/null ;;
            errors)
                local bin url
                bin="$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/loadgen"
                url="http://127.0.0.1:$(printf '%s' "${GATEWAY_LISTEN_ADDR:-0.0.0.0:3000}" | sed 's/.*://')"
                nohup "$bin" --scenario errors --rate 3 --duration 0 --url "$url" </dev/null >>"$dev/loadgen-errors.log" 2>&1 &
                echo $! >"$dev/loadgen-errors.pid"
                ;;
            worker-down) ;;
            off)
                if [[ -s $dev/loadgen-errors.pid ]]; then
                    pid="$(<"$dev/loadgen-errors.pid")"
                    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" != loadgen ]] || kill -TERM "$pid"
                    rm -f "$dev/loadgen-errors.pid"
                fi
                bash scripts/dev-up.sh --no-build --no-run --no-traffic >/dev/null
                ;;
        esac
    fi
    echo "demo: fault '$name' applied; watch for $watch"
}

if [[ ${1:-} == --fault ]]; then
    [[ -n ${2:-} ]] || { echo "demo: --fault needs a name" >&2; exit 2; }
    fault "$2"
    exit 0
fi

if ((!engine)); then
    echo "demo: no Docker engine available; running the local stack (scripts/dev-up.sh) instead"
    exec bash scripts/dev-up.sh "$@"
fi

if ((!${#compose[@]})); then
    echo "demo: Docker is running but Compose is not installed (docker compose plugin or docker-compose)" >&2
    exit 1
fi

echo "demo: ${compose[*]} up --build -d"
"${compose[@]}" up --build -d

echo "demo: waiting for the gateway (http://localhost:3001/health/ready)"
deadline=$((SECONDS + READY_TIMEOUT))
until curl -fsS -o /dev/null http://localhost:3001/health/ready 2>/dev/null; do
    if ((SECONDS >= deadline)); then
        "${compose[@]}" ps >&2 || true
        "${compose[@]}" logs --tail 30 gateway >&2 || true
        echo "demo: gateway not ready after ${READY_TIMEOUT}s" >&2
        exit 1
    fi
    sleep 1
done

# Submit the sample run and poll it to the end (shared with the local stack).
rc=0
GATEWAY_API_KEYS=demo:demo-key GATEWAY_URL=http://localhost:3000 \
    bash scripts/dev-up.sh --sample-run || rc=$?

cat <<'EOF'
Beamline compose stack is up (loadgen sends mixed traffic):
  Grafana      http://localhost:3002   (dashboards in folder Beamline; anonymous viewer)
  Jaeger       http://localhost:16686  (Search; Monitor tab from span metrics)
  Prometheus   http://localhost:9090/alerts    Alertmanager http://localhost:9093
  gateway API  http://localhost:3000   metrics :3001/metrics :9001/metrics :9092/metrics
Faults: scripts/demo.sh --fault slow-extension|extension-errors|errors|worker-down|off
Logs: docker compose logs -f   Stop: docker compose down (add -v to drop data)
EOF
exit "$rc"
