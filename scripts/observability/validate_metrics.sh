#!/usr/bin/env bash
# Validate the services' Prometheus endpoints (seed O1-1.7):
#   * each admin endpoint answers GET /metrics (gateway 3001, router 9001, worker 9092)
#   * promtool check metrics: the text format and naming conventions
#     (_total counters, base units, help text)
#   * the required series of each component are there (DESIGN §3 minimum)
#   * correlation labels: tenant_id on the tenant-scoped series, and the
#     forbidden high-cardinality labels (run_id, step_id, trace_id, span_id,
#     user_id, url, path, email) nowhere
#   * label cardinality: at most MAX_LABEL_VALUES values per label of a metric
#     and MAX_SERIES series per metric
#
# Usage: scripts/observability/validate_metrics.sh
# Environment: GATEWAY_METRICS_URL [http://localhost:3001/metrics],
#   ROUTER_METRICS_URL [http://localhost:9001/metrics],
#   WORKER_METRICS_URL [http://localhost:9092/metrics],
#   MAX_LABEL_VALUES [100], MAX_SERIES [1000].
# Needs curl, python3 and promtool (apt-get install prometheus).
# Exit status: 0 all passed, 1 a check failed, 2 a tool is missing.
set -euo pipefail
# shellcheck source=scripts/observability/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_tool promtool prometheus
command -v python3 >/dev/null || die "python3 not found"
export MAX_LABEL_VALUES="${MAX_LABEL_VALUES:-100}" MAX_SERIES="${MAX_SERIES:-1000}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

declare -A urls=(
    [gateway]="${GATEWAY_METRICS_URL:-http://localhost:3001/metrics}"
    [router]="${ROUTER_METRICS_URL:-http://localhost:9001/metrics}"
    [worker]="${WORKER_METRICS_URL:-http://localhost:9092/metrics}"
)

for component in gateway router worker; do
    url="${urls[$component]}"
    say "$component ($url)"
    if ! curl -fsS --max-time 10 -o "$tmp/$component.txt" "$url" 2>"$tmp/err"; then
        fail "$component: cannot scrape $url: $(<"$tmp/err") (is the stack up? scripts/dev-up.sh)"
        continue
    fi
    ok "scraped $(grep -vc '^#' "$tmp/$component.txt") samples"
    if out="$(promtool check metrics <"$tmp/$component.txt" 2>&1)"; then
        ok "promtool check metrics"
    else
        while IFS= read -r line; do
            [[ -n $line ]] && fail "$component: promtool check metrics: $line"
        done <<<"$out"
    fi
    if ! out="$(python3 - "$component" "$tmp/$component.txt" <<'PY'
import os, re, sys
from collections import defaultdict

component, path = sys.argv[1], sys.argv[2]
max_values, max_series = int(os.environ["MAX_LABEL_VALUES"]), int(os.environ["MAX_SERIES"])
REQUIRED = {
    "gateway": ["http_requests_total", "http_request_duration_seconds_bucket", "gateway_runs_submitted_total"],
    "router": ["router_decisions_total", "router_decision_duration_seconds_bucket",
               "router_policy_evaluation_duration_seconds_bucket", "router_dispatches_total"],
    "worker": ["worker_step_executions_total", "worker_step_duration_seconds_bucket",
               "worker_runs_in_flight", "worker_runs_completed_total", "worker_queue_depth"],
}
COMMON = ["component_health_status", "component_build_info", "process_cpu_seconds_total",
          "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"]
TENANT_SCOPED = {"router": ["router_decisions_total"], "worker": ["worker_step_executions_total"]}
FORBIDDEN = {"run_id", "step_id", "trace_id", "span_id", "user_id", "url", "path", "email", "flow_run_id"}

line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+\S+')
label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
series = defaultdict(list)
for line in open(path):
    if line.startswith("#") or not line.strip():
        continue
    m = line_re.match(line)
    if not m:
        print(f"{component}: unparsable line: {line.strip()[:120]}")
        continue
    series[m.group(1)].append(dict(label_re.findall(m.group(3) or "")))

problems = []
for name in REQUIRED[component] + COMMON:
    if name not in series:
        problems.append(f"{component}: required series {name} is missing (no traffic yet? run loadgen first)")
for name in TENANT_SCOPED.get(component, []):
    for labels in series.get(name, []):
        if "tenant_id" not in labels:
            problems.append(f"{component}: {name} has a series without the tenant_id label: {labels}")
            break
for labels in series.get("component_health_status", []) + series.get("component_build_info", []):
    if labels.get("component") != component:
        problems.append(f"{component}: component label is {labels.get('component')!r} on a component_* series")
        break
for name, rows in sorted(series.items()):
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    bad = FORBIDDEN.intersection(k for labels in rows for k in labels)
    if bad:
        problems.append(f"{component}: {name} uses forbidden high-cardinality label(s) {sorted(bad)}")
    if len(rows) > max_series:
        problems.append(f"{component}: {name} has {len(rows)} series (limit {max_series})")
    values = defaultdict(set)
    for labels in rows:
        for k, v in labels.items():
            if k != "le":
                values[k].add(v)
    for k, vs in values.items():
        if len(vs) > max_values:
            problems.append(f"{component}: {base} label {k} has {len(vs)} values (limit {max_values}); is an id or raw path used as a label?")
for p in dict.fromkeys(problems):
    print(p)
print(f"OK {len(series)} metric names, largest {max((len(r) for r in series.values()), default=0)} series")
PY
)"; then
        fail "$component: the label checks did not run: $out"
        continue
    fi
    while IFS= read -r line; do
        case "$line" in
            OK\ *) ok "required series, tenant_id, forbidden labels, cardinality (${line#OK })" ;;
            ?*) fail "$line" ;;
        esac
    done <<<"$out"
done

finish
