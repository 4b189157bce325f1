# syntax=docker/dockerfile:1
#
# One image for the three services (gateway, router, worker) and the traffic
# generator (loadgen, otlp-sink); docker-compose.yml picks the binary with `command:`. Three stages:
#   planner  - reduces the source tree to a "skeleton": every Cargo.toml, the
#              lockfile and stub target roots (src/lib.rs, src/main.rs, build.rs,
#              benches/, tests/, ...). New workspace members are picked up
#              without editing this file.
#   builder  - builds the dependencies against the skeleton (a layer that stays
#              cached until a manifest or Cargo.lock changes), then the real code.
#   runtime  - debian:bookworm-slim, non-root, binaries in /usr/local/bin.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS planner
WORKDIR /src
COPY . .
RUN <<'EOF'
set -eu
mkdir -p /skeleton
# Manifests, lockfile and toolchain/cargo config, at their own paths.
find . -path ./target -prune -o -type f \
    \( -name Cargo.toml -o -name Cargo.lock -o -name 'rust-toolchain*' -o -path './.cargo/config*' \) \
    -print | xargs -r cp --parents -t /skeleton
# A stub for every file that can be a target root, so manifests parse and
# `cargo build` compiles only the dependencies. A library root is empty;
# everything else (bins, build scripts, benches, tests, examples) gets a main.
find . -path ./target -prune -o -type f -name '*.rs' \
    \( -path '*/src/lib.rs' -o -path '*/src/main.rs' -o -name build.rs \
       -o -path '*/src/bin/*' -o -path '*/benches/*' -o -path '*/examples/*' -o -path '*/tests/*' \) \
    -print | while read -r f; do
    mkdir -p "/skeleton/$(dirname "$f")"
    case "$f" in
        */src/lib.rs) : > "/skeleton/$f" ;;
        *) echo 'fn main() {}' > "/skeleton/$f" ;;
    esac
done
EOF

# ---------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# 1. Dependencies only (cached while manifests and Cargo.lock are unchanged).
COPY --from=planner /skeleton/ ./
RUN cargo build --release --locked -p gateway -p router -p worker -p loadgen
# 2. The real sources (gateway/migrations/ is embedded at compile time).
#    COPY keeps the context's mtimes, which may be older than the stub build;
#    touching every .rs file makes cargo rebuild the workspace crates for sure.
COPY . .
RUN find . -path ./target -prune -o -type f -name '*.rs' -exec touch {} + \
    && cargo build --release --locked -p gateway -p router -p worker -p loadgen \
    && mkdir -p /out \
    && cp target/release/gateway target/release/router target/release/worker \
          target/release/loadgen target/release/otlp-sink /out/

# ---------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates for outbound TLS (http steps); curl for compose healthchecks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# Non-root user; /data is its writable working directory (SQLite run store).
RUN groupadd --system --gid 10001 beamline \
    && useradd --system --uid 10001 --gid beamline --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin beamline \
    && mkdir -p /data \
    && chown beamline:beamline /data
COPY --from=builder /out/ /usr/local/bin/
USER 10001:10001
WORKDIR /data
ENV LOG_FORMAT=json \
    RUST_LOG=info \
    DATABASE_URL=sqlite:///data/gateway.db?mode=rwc
# gateway API/admin, router gRPC/admin, worker admin
EXPOSE 3000 3001 9000 9001 9092
CMD ["gateway"]
