#!/usr/bin/env bash
# Run the workspace tests, first making sure what they need is on the machine:
#   * nats-server: the tests spawn their own on free ports; found through
#     NATS_SERVER_BIN, PATH or /usr/sbin, installed with apt-get if missing.
#   * PostgreSQL on 127.0.0.1:5432 with a `test` database (trust auth), unless
#     TEST_DATABASE_URL is already set: started, or installed and set up, if needed.
# Extra arguments go to cargo test, e.g. scripts/test.sh -p gateway -- --nocapture
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "$ROOT"
PG_ADMIN_URL=postgres://postgres@127.0.0.1:5432/postgres
PG_TEST_URL=postgres://postgres@127.0.0.1:5432/test

log() { printf 'test.sh: %s\n' "$*"; }
die() { printf 'test.sh: error: %s\n' "$*" >&2; exit 1; }

# Root commands: direct as root, else sudo (never prompting without a terminal).
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif ! command -v sudo >/dev/null; then
        die "not root and no sudo; cannot run: $*"
    elif [[ -t 0 ]]; then
        sudo "$@"
    else
        sudo -n "$@"
    fi
}

# apt-get install, quietly; the package lists are refreshed once, on first use.
apt_updated=0
apt_install() {
    log "installing $* (apt-get)"
    if ((!apt_updated)); then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -qq update >/dev/null
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get -qq install -y --no-install-recommends "$@" >/dev/null
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

wait_port() {
    local _
    for _ in $(seq 60); do
        port_open "$1" && return 0
        sleep 0.5
    done
    return 1
}

# --- nats-server --------------------------------------------------------------
ensure_nats() {
    if [[ -n ${NATS_SERVER_BIN:-} ]]; then
        [[ -x $NATS_SERVER_BIN ]] || die "NATS_SERVER_BIN=$NATS_SERVER_BIN is not an executable"
        return
    fi
    NATS_SERVER_BIN="$(command -v nats-server || true)"
    if [[ -z $NATS_SERVER_BIN && -x /usr/sbin/nats-server ]]; then
        NATS_SERVER_BIN=/usr/sbin/nats-server
    fi
    if [[ -z $NATS_SERVER_BIN ]]; then
        apt_install nats-server
        NATS_SERVER_BIN=/usr/sbin/nats-server
        [[ -x $NATS_SERVER_BIN ]] || die "nats-server installed but $NATS_SERVER_BIN is missing"
    fi
}

# --- PostgreSQL ---------------------------------------------------------------
# The version of the newest Debian cluster named `main` ("" when none).
pg_cluster_version() {
    find /etc/postgresql -mindepth 2 -maxdepth 2 -type d -name main 2>/dev/null \
        | sed 's#^/etc/postgresql/##; s#/main$##' | sort -V | tail -n 1
}

# Replace pg_hba.conf of a cluster this script created with trust for local
# connections (socket, 127.0.0.1, ::1). Only ever done on a fresh install.
trust_local_auth() {
    local hba="/etc/postgresql/$1/main/pg_hba.conf"
    log "setting trust auth for local connections in $hba"
    printf '%s\n' \
        '# Written by scripts/test.sh for a test machine: trust local connections.' \
        'local all         all                trust' \
        'host  all         all  127.0.0.1/32  trust' \
        'host  all         all  ::1/128       trust' \
        'local replication all                trust' \
        'host  replication all  127.0.0.1/32  trust' \
        'host  replication all  ::1/128       trust' \
        | as_root tee "$hba" >/dev/null
}

ensure_postgres() {
    local ver fresh=0 major
    if ! port_open 5432; then
        ver="$(pg_cluster_version)"
        if [[ -z $ver ]]; then
            command -v pg_ctlcluster >/dev/null || apt_install postgresql
            ver="$(pg_cluster_version)"
            if [[ -z $ver ]]; then
                # Server packages present but no cluster: create the default one.
                major="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null \
                    | sort -V | tail -n 1)"
                [[ -n $major ]] || die "PostgreSQL server binaries not found under /usr/lib/postgresql"
                log "creating PostgreSQL cluster $major/main"
                as_root pg_createcluster "$major" main >/dev/null
                ver="$major"
            fi
            fresh=1
            trust_local_auth "$ver"
        fi
        if port_open 5432; then
            # The package's install script may have started it already.
            as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
        else
            log "starting PostgreSQL $ver/main"
            as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start
        fi
        wait_port 5432 || die "PostgreSQL $ver/main did not come up on 127.0.0.1:5432"
    fi

    command -v psql >/dev/null || apt_install postgresql-client
    if ! psql -w "$PG_ADMIN_URL" -qtAc 'SELECT 1' >/dev/null; then
        if ((fresh)); then
            die "cannot connect to $PG_ADMIN_URL"
        fi
        die "cannot connect to $PG_ADMIN_URL without a password; allow trust auth for" \
            "127.0.0.1 in pg_hba.conf, or set TEST_DATABASE_URL"
    fi
    if [[ -z "$(psql -w "$PG_ADMIN_URL" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'test'")" ]]; then
        log "creating database test"
        psql -w "$PG_ADMIN_URL" -qc 'CREATE DATABASE test'
    fi
}

ensure_nats
export NATS_SERVER_BIN
log "nats-server: $NATS_SERVER_BIN ($("$NATS_SERVER_BIN" --version 2>&1 | head -n 1))"

if [[ -n ${TEST_DATABASE_URL:-} ]]; then
    log "PostgreSQL: TEST_DATABASE_URL from the environment"
else
    ensure_postgres
    export TEST_DATABASE_URL="$PG_TEST_URL"
    log "PostgreSQL: $TEST_DATABASE_URL"
fi

log "cargo test --workspace --all-targets${*:+ $*}"
exec cargo test --workspace --all-targets "$@"
