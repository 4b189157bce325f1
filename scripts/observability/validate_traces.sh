#!/usr/bin/env bash
# Validate distributed tracing end to end (seed O1-2.10): submit one run to the
# gateway, then fetch its trace from Jaeger's query API (compose) or from
# otlp-sink's copy of it (local stack) and check that
#   * the spans of gateway, router and worker all arrived (export works);
#   * they form ONE tree: a single root (the gateway's POST /v1/runs SERVER
#     span) and every other span's parent is in the trace;
#   * the hand-offs are parent/child across processes: process runs.submitted
#     (router) under send runs.submitted (gateway), process work.<provider>
#     (worker) under send work.<provider> (router), process runs.events
#     (gateway) under send runs.events (worker);
#   * the expected spans exist (router.decide, router.policy.apply,
#     router.provider.select, worker.step.execute per step) with their kinds;
#   * correlation attributes: run.id = the submitted run, tenant.id, flow.id,
#     step.id on the step spans, messaging.system = nats.
#
# Usage: scripts/observability/validate_traces.sh
# Environment: GATEWAY_URL [http://localhost:3000], API_KEY [demo-key],
#   TRACES_URL: the query API base, [http://localhost:16686] (Jaeger) when it
#   answers, else [http://localhost:8889] (otlp-sink of scripts/dev-up.sh);
#   TRACE_TIMEOUT [30] seconds to wait for the spans (batch export delay).
# Exit status: 0 passed, 1 a check failed, 2 the stack is not reachable.
set -euo pipefail
# shellcheck source=scripts/observability/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GATEWAY_URL="${GATEWAY_URL:-http://localhost:3000}"
API_KEY="${API_KEY:-demo-key}"
TIMEOUT="${TRACE_TIMEOUT:-30}"
if [[ -z ${TRACES_URL:-} ]]; then
    if curl -fsS --max-time 3 -o /dev/null http://localhost:16686/api/services 2>/dev/null; then
        TRACES_URL=http://localhost:16686
    else
        TRACES_URL=http://localhost:8889
    fi
fi
command -v python3 >/dev/null || die "python3 not found"
curl -fsS --max-time 5 -o /dev/null "$TRACES_URL/api/services" 2>/dev/null \
    || die "no trace query API at $TRACES_URL (Jaeger UI port, or otlp-sink's HTTP port); set TRACES_URL"

say "submitting a run to $GATEWAY_URL"
body='{"flow_id":"trace-check","steps":[{"id":"first","type":"noop"},{"id":"second","type":"delay","input":{"ms":20}}]}'
response="$(curl -sS --max-time 10 -w '\n%{http_code}' -H "Authorization: Bearer $API_KEY" \
    -H 'content-type: application/json' -d "$body" "$GATEWAY_URL/v1/runs")" \
    || die "cannot reach the gateway at $GATEWAY_URL"
code="${response##*$'\n'}"
response="${response%$'\n'*}"
[[ $code == 202 || $code == 200 ]] || die "POST /v1/runs answered $code: $response"
read -r run_id trace_id < <(python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("run_id",""), d.get("trace_id",""))' <<<"$response")
[[ -n $run_id && -n $trace_id ]] || die "the gateway's answer has no run_id/trace_id: $response"
ok "run $run_id accepted, trace $trace_id"

say "waiting for the run to finish"
deadline=$((SECONDS + TIMEOUT))
status=accepted
while ((SECONDS < deadline)); do
    status="$(curl -sS --max-time 5 -H "Authorization: Bearer $API_KEY" "$GATEWAY_URL/v1/runs/$run_id" \
        | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status",""))' 2>/dev/null || true)"
    case "$status" in succeeded | failed | rejected | timed_out) break ;; esac
    sleep 0.5
done
if [[ $status == succeeded ]]; then ok "run succeeded"; else fail "run is '$status' after ${TIMEOUT}s"; fi

say "fetching trace $trace_id from $TRACES_URL"
# The services export in batches: poll until the gateway's final
# `process runs.events` span is there and the span count stops growing.
trace_file="$(mktemp)"
trap 'rm -f "$trace_file"' EXIT
last=-1
while ((SECONDS < deadline + TIMEOUT)); do
    if curl -fsS --max-time 5 -o "$trace_file" "$TRACES_URL/api/traces/$trace_id" 2>/dev/null; then
        count="$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))["data"][0]
names = [s["operationName"] for s in d["spans"]]
print(len(names) if names.count("process runs.events") >= 2 else 0)' "$trace_file" 2>/dev/null || echo 0)"
        if ((count > 0 && count == last)); then break; fi
        last=$count
    fi
    sleep 1
done
[[ -s $trace_file ]] || { fail "trace $trace_id never appeared at $TRACES_URL/api/traces/$trace_id"; finish; }

out="$(python3 - "$trace_file" "$run_id" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))["data"][0]
run_id = sys.argv[2]
procs = {pid: p["serviceName"] for pid, p in data["processes"].items()}
spans = {}
for s in data["spans"]:
    tags = {t["key"]: t["value"] for t in s.get("tags", [])}
    parent = next((r["spanID"] for r in s.get("references", []) if r["refType"] == "CHILD_OF"), None)
    spans[s["spanID"]] = {"name": s["operationName"], "service": procs.get(s["processID"], "?"),
                          "parent": parent, "tags": tags}
results = []
def check(cond, good, bad):
    results.append(("ok" if cond else "FAIL", good if cond else bad))

services = {s["service"] for s in spans.values()}
check({"gateway", "router", "worker"} <= services, f"spans from {sorted(services)} ({len(spans)} spans)",
      f"spans only from {sorted(services)}: export from the missing service(s) does not reach the collector")
roots = [s for s in spans.values() if s["parent"] is None]
check(len(roots) == 1 and roots[0]["name"] == "POST /v1/runs" and roots[0]["service"] == "gateway",
      "one root: gateway POST /v1/runs",
      f"roots are {[(r['service'], r['name']) for r in roots]}; expected only the gateway's POST /v1/runs (context lost at a hand-off?)")
orphans = [s for s in spans.values() if s["parent"] is not None and s["parent"] not in spans]
check(not orphans, "every span's parent is in the trace (one tree)",
      f"spans whose parent is missing: {[(o['service'], o['name']) for o in orphans]}")

def find(service, pred):
    return [s for s in spans.values() if s["service"] == service and pred(s["name"])]
def parent_of(s):
    return spans.get(s["parent"]) if s["parent"] else None
for child_svc, child, parent_svc, parent in [
    ("router", "process runs.submitted", "gateway", "send runs.submitted"),
    ("worker", "process work.", "router", "send work."),
    ("gateway", "process runs.events", "worker", "send runs.events"),
]:
    kids = find(child_svc, lambda n: n.startswith(child))
    good = [k for k in kids if (p := parent_of(k)) and p["service"] == parent_svc and p["name"].startswith(parent)]
    check(kids and len(good) == len(kids), f"{child_svc} '{child}…' is a child of {parent_svc} '{parent}…'",
          f"{child_svc} '{child}…': found {len(kids)}, {len(good)} under {parent_svc} '{parent}…' (propagation broken across NATS?)")
for svc, name, kind in [("gateway", "POST /v1/runs", "server"), ("gateway", "send runs.submitted", "producer"),
                        ("router", "process runs.submitted", "consumer"), ("router", "router.decide", "internal"),
                        ("router", "router.policy.apply", "internal"), ("router", "router.provider.select", "internal"),
                        ("worker", "worker.step.execute", "internal")]:
    found = find(svc, lambda n: n == name)
    kinds = {s["tags"].get("span.kind", "internal") for s in found}
    check(found and kinds == {kind}, f"{svc} {name} ({kind})", f"{svc} {name}: found {len(found)} with kinds {sorted(kinds)}, expected {kind}")
steps = find("worker", lambda n: n == "worker.step.execute")
check({s["tags"].get("step.id") for s in steps} >= {"first", "second"}, "worker.step.execute per step with step.id",
      f"step spans carry step.id {sorted(str(s['tags'].get('step.id')) for s in steps)}, expected first and second")
decide = find("router", lambda n: n == "router.decide")
if decide:
    t = decide[0]["tags"]
    check(t.get("run.id") == run_id and t.get("tenant.id") and t.get("flow.id") == "trace-check",
          f"router.decide: run.id, tenant.id={t.get('tenant.id')}, flow.id",
          f"router.decide correlation attributes wrong: run.id={t.get('run.id')} tenant.id={t.get('tenant.id')} flow.id={t.get('flow.id')}")
root = roots[0] if roots else None
if root:
    check(root["tags"].get("run.id") == run_id, "gateway span carries run.id", f"gateway span run.id={root['tags'].get('run.id')}, expected {run_id}")
msg = [s for s in spans.values() if s["name"].startswith(("send ", "process "))]
check(msg and all(s["tags"].get("messaging.system") == "nats" for s in msg), f"{len(msg)} messaging spans with messaging.system=nats",
      "messaging spans without messaging.system=nats")
for status, text in results:
    print(f"{status}\t{text}")
PY
)"
while IFS=$'\t' read -r status text; do
    if [[ $status == ok ]]; then ok "$text"; else fail "$text"; fi
done <<<"$out"

finish
