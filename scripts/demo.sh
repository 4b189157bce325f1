#!/usr/bin/env bash
# The Beamline demo: bring the stack up and follow one run into Jaeger.
# With a Docker engine: `docker compose up --build -d` (nats, jaeger, gateway,
# router, worker), wait for the gateway, submit a sample run, print its trace URL.
# Without one: run the local stack instead (scripts/dev-up.sh, same output).
# DEMO_READY_TIMEOUT (default 180) bounds the wait for the gateway, in seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
READY_TIMEOUT="${DEMO_READY_TIMEOUT:-180}"

if ! docker info >/dev/null 2>&1; then
    echo "demo: no Docker engine available; running the local stack (scripts/dev-up.sh) instead"
    exec bash scripts/dev-up.sh "$@"
fi

if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose)
else
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
Beamline compose stack is up:
  gateway API  http://localhost:3000     Jaeger UI  http://localhost:16686
  metrics      http://localhost:3001/metrics  :9001/metrics  :9092/metrics
Logs: docker compose logs -f   Stop: docker compose down (add -v to drop data)
EOF
exit "$rc"
