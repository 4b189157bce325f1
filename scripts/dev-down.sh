#!/usr/bin/env bash
# Stop what scripts/dev-up.sh started, and only that (each one's pid file in
# .dev/, checked against its command and working directory): loadgen (and the
# demo's loadgen-errors fault), gateway,
# router, worker, Prometheus, Alertmanager, otlp-sink and nats-server (each
# only if dev-up started it; the three nodes of `dev-up.sh --cluster` too).
# SIGTERM first, SIGKILL after a grace period.
#
# Usage: scripts/dev-down.sh [--purge]
#   --purge  also delete .dev/ (logs, SQLite run store, JetStream data, the
#            generated NATS passwords)
# DEV_STOP_TIMEOUT [10] is the grace period in seconds; DEV_DIR [.dev] as for dev-up.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
DEV="${DEV_DIR:-.dev}"
GRACE="${DEV_STOP_TIMEOUT:-10}"

purge=0
for arg in "$@"; do
    case "$arg" in
        --purge) purge=1 ;;
        -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "dev-down: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done

log() { printf 'dev-down: %s\n' "$*"; }

# True when process $1 exists and is not a zombie (an exited child that its
# new parent has not reaped yet still answers kill -0).
running() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state="$(sed -n 's/^.*) \(.\).*$/\1/p' "/proc/$1/stat" 2>/dev/null || true)"
    [[ $state != Z ]]
}

# Print the pid in .dev/$1.pid if it names a live process whose command is $2
# and whose working directory is this checkout (a reused pid is not ours).
live_pid() {
    local pidfile="$DEV/$1.pid" pid comm cwd
    [[ -s $pidfile ]] || return 1
    pid="$(<"$pidfile")"
    running "$pid" || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    cwd="$(readlink "/proc/$pid/cwd" 2>/dev/null || true)"
    [[ -z $comm || $comm == "$2" ]] || return 1
    [[ -z $cwd || $cwd == "$ROOT" ]] || return 1
    printf '%s' "$pid"
}

# The command name (/proc/<pid>/comm, at most 15 characters) of NAME.
comm_of() {
    case "$1" in
        nats | nats-[123]) echo nats-server ;;
        alertmanager)
            # Debian's binary is prometheus-alertmanager; upstream's alertmanager.
            if [[ -s $DEV/alertmanager.pid ]] \
                && [[ "$(cat "/proc/$(<"$DEV/alertmanager.pid")/comm" 2>/dev/null)" == alertmanager ]]; then
                echo alertmanager
            else
                echo prometheus-aler
            fi
            ;;
        loadgen-errors) echo loadgen ;;
        *) echo "$1" ;;
    esac
}

# stop NAME...: SIGTERM each one's process, wait up to GRACE seconds for all,
# then SIGKILL what remains.
stop() {
    local name pid deadline
    local -A pids=()
    for name in "$@"; do
        if pid="$(live_pid "$name" "$(comm_of "$name")")"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids[$name]=$pid
            log "stopping $name (pid $pid)"
        elif [[ -e $DEV/$name.pid ]]; then
            log "$name is not running"
        fi
        rm -f "$DEV/$name.pid"
    done
    deadline=$((SECONDS + GRACE))
    for name in "${!pids[@]}"; do
        pid="${pids[$name]}"
        while running "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
        if running "$pid"; then
            log "$name did not stop within ${GRACE}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

if [[ -d $DEV ]]; then
    # Traffic first, then the services, so they can drain against a live
    # broker and flush spans to a live sink; then the observability processes
    # and NATS (each pid file exists only if dev-up started that process).
    stop loadgen loadgen-errors
    stop gateway router worker
    stop prometheus alertmanager otlp-sink
    stop nats nats-1 nats-2 nats-3
fi

if ((purge)); then
    rm -rf "$DEV"
    log "removed $DEV/"
fi
log "done"
