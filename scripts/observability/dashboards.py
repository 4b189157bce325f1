#!/usr/bin/env python3
"""Generate observability/grafana/dashboards/*.json (the Grafana dashboards).

The JSON files are committed; this script is their source, so the seven
dashboards share one layout, one set of links and the same variable rules:

* every dashboard has `component` and `tenant_id` variables plus its own
  (seed CP2.3), all multi-select with an "All" value of `.*`;
* every panel has a unit, and thresholds where a value can be bad;
* every dashboard links to Jaeger and to the other dashboards.

Usage: python3 scripts/observability/dashboards.py [--check]
  --check  exit 1 if a committed file differs from what this generates
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "observability" / "grafana" / "dashboards"
PROM = {"type": "prometheus", "uid": "prometheus"}
JAEGER = {"type": "jaeger", "uid": "jaeger"}
JAEGER_URL = "http://localhost:16686"
RI = "$__rate_interval"


def var(name, query, label=None, include_all=True):
    return {
        "name": name,
        "label": label or name,
        "type": "query",
        "datasource": PROM,
        "query": {"query": query, "refId": f"var-{name}"},
        "definition": query,
        "refresh": 2,
        "includeAll": include_all,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def thresholds(*steps):
    """steps: (value, color) after the base green."""
    return {
        "mode": "absolute",
        "steps": [{"color": "green", "value": None}]
        + [{"color": c, "value": v} for v, c in steps],
    }


class Board:
    def __init__(self, uid, title, tags, description, variables):
        self.uid, self.title, self.tags = uid, title, tags
        self.description = description
        self.variables = variables
        self.panels = []
        self.y = 0
        self.x = 0

    def row(self, title):
        if self.x:
            self.y += 8
            self.x = 0
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def panel(
        self,
        title,
        targets,
        unit,
        kind="timeseries",
        width=12,
        height=8,
        th=None,
        description="",
        legend=None,
        exemplars=False,
        links=None,
        mappings=None,
        fmt=None,
        instant=False,
        datasource=PROM,
        minimum=None,
    ):
        if self.x + width > 24:
            self.y += height
            self.x = 0
        if isinstance(targets, str):
            targets = [(targets, legend or "")]
        tlist = []
        for i, (expr, leg) in enumerate(targets):
            t = {
                "refId": chr(ord("A") + i),
                "datasource": datasource,
                "expr": expr,
                "legendFormat": leg or "__auto",
                "range": not instant,
                "instant": instant,
            }
            if exemplars:
                t["exemplar"] = True
            if fmt:
                t["format"] = fmt
            tlist.append(t)
        defaults = {"unit": unit}
        if th:
            defaults["thresholds"] = th
            defaults["color"] = {"mode": "thresholds"} if kind in ("stat", "gauge") else {"mode": "palette-classic"}
        if mappings:
            defaults["mappings"] = mappings
        if minimum is not None:
            defaults["min"] = minimum
        if kind == "timeseries" and th:
            defaults["custom"] = {"thresholdsStyle": {"mode": "line+area"}}
        p = {
            "type": kind,
            "title": title,
            "description": description,
            "datasource": datasource,
            "gridPos": {"h": height, "w": width, "x": self.x, "y": self.y},
            "targets": tlist,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {},
        }
        if kind == "timeseries":
            p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}, "tooltip": {"mode": "multi"}}
        if kind == "stat":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "background", "graphMode": "area"}
        if kind == "heatmap":
            p["options"] = {"calculate": False, "yAxis": {"unit": unit}, "color": {"scheme": "Oranges"}}
        if links:
            p["links"] = links
        self.panels.append(p)
        self.x += width
        if self.x >= 24:
            self.x = 0
            self.y += height
        return p

    def raw_panel(self, panel, width=24, height=10):
        if self.x:
            self.y += 8
            self.x = 0
        panel["gridPos"] = {"h": height, "w": width, "x": 0, "y": self.y}
        self.panels.append(panel)
        self.y += height

    def json(self):
        for i, p in enumerate(self.panels, 1):
            p["id"] = i
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["beamline", "cp2", "observability"] + self.tags,
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "10s",
            "time": {"from": "now-15m", "to": "now"},
            "timepicker": {},
            "timezone": "browser",
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "annotations": {
                "list": [
                    {
                        "builtIn": 1,
                        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                        "enable": True,
                        "hide": True,
                        "iconColor": "rgba(0, 211, 255, 1)",
                        "name": "Annotations & Alerts",
                        "type": "dashboard",
                    },
                    {
                        "datasource": PROM,
                        "enable": True,
                        "iconColor": "red",
                        "name": "Firing alerts",
                        "expr": 'ALERTS{alertstate="firing",component=~"$component"}',
                        "step": "30s",
                        "titleFormat": "{{alertname}}",
                        "textFormat": "{{severity}}: {{component}}",
                        "useValueForTime": False,
                    },
                ]
            },
            "links": [
                {"title": "Jaeger: search traces", "type": "link", "url": f"{JAEGER_URL}/search", "targetBlank": True, "icon": "external link"},
                {"title": "Jaeger: Monitor (SPM)", "type": "link", "url": f"{JAEGER_URL}/monitor", "targetBlank": True, "icon": "external link"},
                {"title": "Beamline dashboards", "type": "dashboards", "tags": ["beamline"], "asDropdown": True, "includeVars": True, "keepTime": True},
            ],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def quantiles(metric, selector, by="le", scale=1):
    s = "" if scale == 1 else f" / {scale}"
    return [
        (f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{selector}}}[{RI}]))){s}", f"p{int(q * 100)}")
        for q in (0.5, 0.95, 0.99)
    ]


def jaeger_link(service, operation=None, extra=""):
    url = f"{JAEGER_URL}/search?service={service}"
    if operation:
        url += f"&operation={operation}"
    return [{"title": f"Jaeger: {service} traces", "url": url + extra, "targetBlank": True}]


COMPONENT = var("component", 'label_values(up{job=~"gateway|router|worker"}, component)')
TENANT_ROUTER = var("tenant_id", "label_values(router_decisions_total, tenant_id)", "tenant")
TENANT_WORKER = var("tenant_id", "label_values(worker_step_executions_total, tenant_id)", "tenant")

boards = []

# --- 1. Requests (gateway) ----------------------------------------------------
b = Board(
    "beamline-requests",
    "Beamline / Requests (gateway)",
    ["gateway"],
    "HTTP traffic at the gateway: rate, latency, errors, status codes, submissions (seed O1-3.1). "
    "HTTP metrics carry no tenant label (bounded cardinality); tenant_id filters the tenant-labelled panels.",
    [
        var("component", "label_values(http_requests_total, component)"),
        TENANT_ROUTER,
        var("method", "label_values(http_requests_total, method)"),
        var("route", "label_values(http_requests_total, route)", "path"),
    ],
)
sel = 'component=~"$component",method=~"$method",route=~"$route"'
b.row("Traffic")
b.panel("Request rate by route", f"sum by (method, route) (rate(http_requests_total{{{sel}}}[{RI}]))", "reqps", legend="{{method}} {{route}}",
        links=jaeger_link("gateway"))
b.panel("Latency p50 / p95 / p99", quantiles("http_request_duration_seconds", sel), "s",
        th=thresholds((0.5, "orange"), (2.5, "red")), description="Alert GatewayHighLatencyP95 at 500 ms, P99 at 2.5 s.",
        links=jaeger_link("gateway", "POST /v1/runs", "&minDuration=500ms"))
b.panel("5xx error ratio", f'(sum(rate(http_requests_total{{{sel},status_class="5xx"}}[{RI}])) or vector(0)) / sum(rate(http_requests_total{{{sel}}}[{RI}]))',
        "percentunit", th=thresholds((0.01, "orange"), (0.05, "red")), legend="5xx ratio", description="Alert GatewayHighErrorRate above 5%.",
        links=jaeger_link("gateway", None, "&tags=%7B%22error%22%3A%22true%22%7D"))
b.panel("Status code distribution", f"sum by (status_class) (rate(http_requests_total{{{sel}}}[{RI}]))", "reqps", legend="{{status_class}}")
b.row("Runs")
b.panel("Submissions by outcome", f"sum by (outcome) (rate(gateway_runs_submitted_total{{component=~\"$component\"}}[{RI}]))", "reqps", legend="{{outcome}}",
        description="accepted (stored), invalid (4xx), broker_unavailable (503, nothing stored), store_unavailable (503, nothing stored), failed (500).")
b.panel("Worker reports applied to the store", f"sum by (status, result) (rate(gateway_run_events_total{{component=~\"$component\"}}[{RI}]))", "ops", legend="{{status}} {{result}}")
b.panel("Latency SLO: POST /v1/runs within 250 ms (5m)", "1 - slo:gateway_slow_requests:ratio_rate5m", "percentunit", kind="stat", width=8,
        th={"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "orange", "value": 0.99}, {"color": "green", "value": 0.995}]},
        description="SLO: 99% of submissions answered within 250 ms (alerts GatewayLatencyBudgetBurnFast/Slow).")
b.panel("Rate-limited requests by tenant", f"sum by (tenant_id) (rate(gateway_rate_limited_total{{component=~\"$component\",tenant_id=~\"$tenant_id\"}}[{RI}]))", "reqps",
        width=8, legend="{{tenant_id}}", description="429 answers, by tenant.")
b.panel("Idempotency keys", f"sum by (result) (rate(gateway_idempotency_total{{component=~\"$component\"}}[{RI}]))", "ops", width=8, legend="{{result}}",
        description="hit (replayed answer), miss, conflict (409/422).")
boards.append(b)

# --- 2. Routing (router) ------------------------------------------------------
b = Board(
    "beamline-routing",
    "Beamline / Routing (router)",
    ["router"],
    "Routing decisions: rate, duration, provider distribution, policy evaluation (seed O1-3.2). "
    "run_id is never a label: find a run's decision in Jaeger (router.decide, tag run.id).",
    [
        var("component", "label_values(router_decisions_total, component)"),
        TENANT_ROUTER,
        var("policy_id", "label_values(router_decisions_total, policy_id)", "policy"),
        var("provider", "label_values(router_decisions_total, provider)"),
    ],
)
sel = 'component=~"$component",policy_id=~"$policy_id",provider=~"$provider",tenant_id=~"$tenant_id"'
b.row("Decisions")
b.panel("Decision rate by provider and reason", f"sum by (provider, reason) (rate(router_decisions_total{{{sel}}}[{RI}]))", "ops", legend="{{provider}} ({{reason}})",
        links=jaeger_link("router", "router.decide"))
b.panel("Decision duration p50 / p95 / p99", quantiles("router_decision_duration_seconds", 'component=~"$component",policy_id=~"$policy_id"'), "s",
        th=thresholds((0.1, "orange"), (0.25, "red")), description="Alert RouterDecisionLatencyHigh at p95 > 250 ms.",
        links=jaeger_link("router", "router.decide", "&minDuration=250ms"))
b.panel("Provider selection (over the time range)", f"sum by (provider) (increase(router_decisions_total{{{sel}}}[$__range]))", "short", kind="piechart", width=8,
        legend="{{provider}}", instant=True)
b.panel("Decisions by tenant", f"sum by (tenant_id) (rate(router_decisions_total{{{sel}}}[{RI}]))", "ops", width=8, legend="{{tenant_id}}")
b.panel("Decisions by reason", f"sum by (reason) (rate(router_decisions_total{{{sel}}}[{RI}]))", "ops", width=8, legend="{{reason}}",
        description="weighted, fallback, sticky, explicit, rejected.")
b.row("Policy and dispatch")
b.panel("Policy evaluation p50 / p95 / p99", quantiles("router_policy_evaluation_duration_seconds", 'component=~"$component",policy_id=~"$policy_id"'), "s",
        th=thresholds((0.05, "orange"), (0.1, "red")), links=jaeger_link("router", "router.policy.apply"))
b.panel("Dispatches to work.<provider> by result", f"sum by (provider, result) (rate(router_dispatches_total{{component=~\"$component\",provider=~\"$provider\"}}[{RI}]))", "ops",
        legend="{{provider}} {{result}}")
b.panel("Policy reloads", f"sum by (result) (increase(router_policy_reloads_total{{component=~\"$component\"}}[{RI}]))", "short", legend="{{result}}",
        th=thresholds(), description="Policy file reloads, ok or rejected.")
boards.append(b)

# --- 3. Worker execution ------------------------------------------------------
b = Board(
    "beamline-worker",
    "Beamline / Worker execution",
    ["worker"],
    "Step execution: rate, duration, errors, retries; runs, queue depth (seed O1-3.3). "
    "run_id and flow_id live in traces: open Jaeger from a panel link and search by tag.",
    [
        var("component", "label_values(worker_step_executions_total, component)"),
        TENANT_WORKER,
        var("step_type", "label_values(worker_step_executions_total, step_type)", "step type"),
        var("status", "label_values(worker_step_executions_total, status)", "execution status"),
        var("provider", "label_values(worker_queue_depth, provider)"),
    ],
)
sel = 'component=~"$component",step_type=~"$step_type",status=~"$status",tenant_id=~"$tenant_id"'
b.row("Steps")
b.panel("Step executions by type and status", f"sum by (step_type, status) (rate(worker_step_executions_total{{{sel}}}[{RI}]))", "ops",
        legend="{{step_type}} {{status}}", links=jaeger_link("worker", "worker.step.execute"))
b.panel("Step duration p50 / p95 / p99", quantiles("worker_step_duration_seconds", 'component=~"$component",step_type=~"$step_type",status=~"$status"'), "s",
        th=thresholds((1, "orange"), (5, "red")))
b.panel("Step failure ratio by type",
        f'(sum by (step_type) (rate(worker_step_executions_total{{component=~"$component",step_type=~"$step_type",tenant_id=~"$tenant_id",status="failed"}}[{RI}]))'
        f' or sum by (step_type) (rate(worker_step_executions_total{{component=~"$component",step_type=~"$step_type",tenant_id=~"$tenant_id"}}[{RI}])) * 0)'
        f' / sum by (step_type) (rate(worker_step_executions_total{{component=~"$component",step_type=~"$step_type",tenant_id=~"$tenant_id"}}[{RI}]))',
        "percentunit", th=thresholds((0.05, "orange"), (0.25, "red")), legend="{{step_type}}",
        links=jaeger_link("worker", "worker.step.execute", "&tags=%7B%22error%22%3A%22true%22%7D"))
b.panel("Step retries by reason", f"sum by (step_type, reason) (rate(worker_step_retries_total{{component=~\"$component\",step_type=~\"$step_type\"}}[{RI}]))", "ops",
        legend="{{step_type}} {{reason}}")
b.row("Runs and queue")
b.panel("Runs completed by status", f"sum by (status) (rate(worker_runs_completed_total{{component=~\"$component\",provider=~\"$provider\"}}[{RI}]))", "ops",
        legend="{{status}}", width=8)
b.panel("Runs in flight", "sum by (component) (worker_runs_in_flight{component=~\"$component\"})", "short", width=8, legend="{{component}}",
        description="Capped by WORKER_CONCURRENCY per worker.")
b.panel("Queue depth (JetStream pending)", "max by (provider) (worker_queue_depth{component=~\"$component\",provider=~\"$provider\"})", "short", width=8,
        th=thresholds((50, "orange"), (100, "red")), legend="{{provider}}", description="Alert WorkerQueueDepthHigh above 100 for 5 minutes.")
b.panel("Flow execution duration p50 / p95 / p99 (process work.<provider> spans)",
        [(f'histogram_quantile({q}, sum by (le) (rate(traces_span_metrics_duration_milliseconds_bucket{{service_name="worker",span_name=~"process work\\\\..*"}}[{RI}]))) / 1000', f"p{int(q * 100)}")
         for q in (0.5, 0.95, 0.99)],
        "s", exemplars=True, description="From span metrics: one process span per run execution, start to final report.",
        links=jaeger_link("worker", "process work.default"))
b.panel("Run success SLO (5m)", "1 - slo:run_failures:ratio_rate5m", "percentunit", kind="stat", width=6,
        th={"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "orange", "value": 0.99}, {"color": "green", "value": 0.995}]},
        description="SLO: 99% of runs succeed (alerts RunSuccessBudgetBurnFast/Slow).")
b.panel("Dead-lettered messages (1h)", f"sum(increase(worker_dead_letters_total{{component=~\"$component\"}}[1h]))", "short", kind="stat", width=6,
        th=thresholds((1, "red")), description="Alert WorkerDeadLetters.")
b.row("Approvals")
b.panel("Approval wait p50 / p95", [(f"histogram_quantile({q}, sum by (le) (rate(worker_approval_wait_seconds_bucket{{component=~\"$component\"}}[{RI}])))", f"p{int(q * 100)}") for q in (0.5, 0.95)],
        "s", description="Time approval steps wait for a decision.")
b.panel("Approval decisions", f"sum by (decision) (rate(worker_approvals_total{{component=~\"$component\"}}[{RI}]))", "ops", legend="{{decision}}")
boards.append(b)

# --- 4. Extensions & circuit breakers ----------------------------------------
b = Board(
    "beamline-extensions",
    "Beamline / Extensions & circuit breakers",
    ["router", "extensions"],
    "The router's extension calls: invocations, latency, retries, circuit breakers, registry (seed CP2.5).",
    [
        var("component", "label_values(router_decisions_total, component)"),
        TENANT_ROUTER,
        var("extension_id", "label_values(router_extension_invocations_total, extension_id)", "extension"),
        var("extension_type", "label_values(router_extension_invocations_total, extension_type)", "extension type"),
    ],
)
sel = 'component=~"$component",extension_id=~"$extension_id",extension_type=~"$extension_type"'
b.row("Invocations")
b.panel("Invocations by extension and status", f"sum by (extension_id, status) (rate(router_extension_invocations_total{{{sel}}}[{RI}]))", "ops",
        legend="{{extension_id}} {{status}}", links=jaeger_link("router", "router.extension.invoke"))
b.panel("Invocation latency p95 by extension",
        f"histogram_quantile(0.95, sum by (le, extension_id) (rate(router_extension_invocation_duration_seconds_bucket{{component=~\"$component\",extension_id=~\"$extension_id\"}}[{RI}])))",
        "s", th=thresholds((0.5, "orange"), (1, "red")), legend="{{extension_id}}", description="Alert ExtensionLatencyHigh above 1 s.",
        links=jaeger_link("router", "router.extension.invoke", "&minDuration=1s"))
b.panel("Failure ratio by extension",
        f'(sum by (extension_id) (rate(router_extension_invocations_total{{{sel},status!~"success|ok"}}[{RI}])) or sum by (extension_id) (rate(router_extension_invocations_total{{{sel}}}[{RI}])) * 0)'
        f" / sum by (extension_id) (rate(router_extension_invocations_total{{{sel}}}[{RI}]))",
        "percentunit", th=thresholds((0.05, "orange"), (0.2, "red")), legend="{{extension_id}}", description="Alert ExtensionFailureSpike above 20%.")
b.panel("Retries by extension", f"sum by (extension_id) (rate(router_extension_retries_total{{component=~\"$component\",extension_id=~\"$extension_id\"}}[{RI}]))", "ops",
        legend="{{extension_id}}")
b.row("Circuit breakers")
b.panel("Breaker state (1 = current state)", "max by (extension_id, state) (router_extension_circuit_breaker_state{component=~\"$component\",extension_id=~\"$extension_id\"})", "short",
        kind="stat", legend="{{extension_id}} {{state}}", th=thresholds((1, "red")), description="Alert ExtensionCircuitBreakerOpen while state=\"open\" is 1.")
b.panel("Breaker transitions", f"sum by (extension_id, transition) (increase(router_extension_circuit_breaker_transitions_total{{component=~\"$component\",extension_id=~\"$extension_id\"}}[{RI}]))", "short",
        legend="{{extension_id}} {{transition}}")
b.row("Registry")
b.panel("Registry lookups", f"sum(rate(router_extension_registry_lookups_total{{component=~\"$component\"}}[{RI}]))", "ops", width=8, legend="lookups")
b.panel("Registry cache hit ratio",
        f"sum(rate(router_extension_registry_cache_hits_total{{component=~\"$component\"}}[{RI}])) / (sum(rate(router_extension_registry_cache_hits_total{{component=~\"$component\"}}[{RI}])) + sum(rate(router_extension_registry_cache_misses_total{{component=~\"$component\"}}[{RI}])))",
        "percentunit", width=8, kind="stat",
        th={"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "orange", "value": 0.8}, {"color": "green", "value": 0.95}]})
b.panel("Decision time (extensions included) p95", f"histogram_quantile(0.95, sum by (le) (rate(router_decision_duration_seconds_bucket{{component=~\"$component\"}}[{RI}])))", "s",
        width=8, th=thresholds((0.1, "orange"), (0.25, "red")), legend="p95")
boards.append(b)

# --- 5. Errors ----------------------------------------------------------------
b = Board(
    "beamline-errors",
    "Beamline / Errors",
    ["errors"],
    "Errors across components: by component, error code, tenant; trends (seed O1-3.4).",
    [
        var("component", "label_values(up{job=~\"gateway|router|worker\"}, component)"),
        TENANT_WORKER,
        var("error_code", "label_values(component_errors_total, error_code)", "error code"),
    ],
)
b.row("Errors")
b.panel("Errors by component", f"sum by (component) (rate(component_errors_total{{component=~\"$component\",error_code=~\"$error_code\"}}[{RI}]))", "ops",
        legend="{{component}}", th=thresholds((1, "red")), description="Alert ComponentErrorRateHigh above 1/s per code.")
b.panel("Errors by code", f"sum by (component, error_code) (rate(component_errors_total{{component=~\"$component\",error_code=~\"$error_code\"}}[{RI}]))", "ops",
        legend="{{component}} {{error_code}}")
b.panel("Failed step attempts by tenant", f'sum by (tenant_id) (rate(worker_step_executions_total{{component=~"$component",tenant_id=~"$tenant_id",status="failed"}}[{RI}]))', "ops",
        legend="{{tenant_id}}", links=jaeger_link("worker", "worker.step.execute", "&tags=%7B%22error%22%3A%22true%22%7D"))
b.panel("Client and server errors at the gateway", f'sum by (route, status_class) (rate(http_requests_total{{status_class=~"4xx|5xx"}}[{RI}]))', "reqps",
        legend="{{route}} {{status_class}}")
b.panel("Error spans by service (span metrics)", f'sum by (service_name) (rate(traces_span_metrics_calls_total{{status_code="STATUS_CODE_ERROR"}}[{RI}]))', "ops",
        legend="{{service_name}}", exemplars=True, links=[{"title": "Jaeger: error traces", "url": f"{JAEGER_URL}/search?tags=%7B%22error%22%3A%22true%22%7D", "targetBlank": True}])
b.panel("Failed or timed-out runs (1h trend)", 'sum(increase(worker_runs_completed_total{status=~"failed|timed_out"}[1h]))', "short", legend="failed runs, last hour")
boards.append(b)

# --- 6. Health ----------------------------------------------------------------
b = Board(
    "beamline-health",
    "Beamline / Health",
    ["health"],
    "Up/down, readiness checks, process resources, NATS, firing alerts (seed O1-3.5).",
    [
        COMPONENT,
        TENANT_ROUTER,
        var("check", "label_values(component_health_status, check)"),
    ],
)
UPMAP = [{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}}}]
b.row("Status")
b.panel("Up", 'up{job=~"gateway|router|worker",component=~"$component"}', "none", kind="stat", width=8, legend="{{component}}",
        th={"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]}, mappings=UPMAP,
        description="Alert ComponentDown when 0 for 1 minute.")
b.panel("Readiness checks", 'min by (component, check) (component_health_status{component=~"$component",check=~"$check"})', "none", kind="stat", width=8,
        legend="{{component}} {{check}}", th={"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]}, mappings=UPMAP,
        description="Alert ComponentUnhealthy when 0 for 1 minute.")
b.panel("Firing alerts", 'sum by (severity) (ALERTS{alertstate="firing"}) or vector(0)', "none", kind="stat", width=8, legend="{{severity}}",
        th=thresholds((1, "red")))
b.panel("Failing checks over time", 'sum by (component, check) (1 - component_health_status{component=~"$component",check=~"$check"})', "none",
        legend="{{component}} {{check}}", th=thresholds((1, "red")))
b.panel("Scrape duration (admin endpoint latency)", 'scrape_duration_seconds{job=~"gateway|router|worker",component=~"$component"}', "s",
        legend="{{component}}", th=thresholds((0.5, "orange"), (2, "red")))
b.row("Resources")
b.panel("CPU", f'sum by (component) (rate(process_cpu_seconds_total{{job=~"gateway|router|worker",component=~"$component"}}[{RI}]))', "percentunit", width=8, legend="{{component}}")
b.panel("Resident memory", 'process_resident_memory_bytes{job=~"gateway|router|worker",component=~"$component"}', "bytes", width=8, legend="{{component}}",
        th=thresholds((100 * 1024 * 1024, "orange"), (150 * 1024 * 1024, "red")), description="Alert ProcessMemoryHigh above 150 MiB (compose limit 192 MiB).")
b.panel("Open file descriptors", 'process_open_fds{job=~"gateway|router|worker",component=~"$component"}', "short", width=8, legend="{{component}}")
b.panel("Build info", 'component_build_info{component=~"$component"}', "none", kind="table", width=24, height=6, fmt="table", instant=True)
b.row("NATS (compose: prometheus-nats-exporter)")
b.panel("NATS connections", "gnatsd_varz_connections", "short", width=8, legend="connections")
b.panel("NATS messages in/out", [(f"rate(gnatsd_varz_in_msgs[{RI}])", "in"), (f"rate(gnatsd_varz_out_msgs[{RI}])", "out")], "ops", width=8)
b.panel("NATS memory", "gnatsd_varz_mem", "bytes", width=8, legend="nats-server")
boards.append(b)

# --- 7. Traces / RED (span metrics) ------------------------------------------
b = Board(
    "beamline-traces",
    "Beamline / Traces & RED (span metrics)",
    ["tracing"],
    "Rate, errors and duration of every span, from the collector's spanmetrics connector, with exemplars linking to Jaeger (seed O1-3.6).",
    [
        COMPONENT,
        var("tenant_id", "label_values(traces_span_metrics_calls_total, tenant_id)", "tenant"),
        var("service_name", "label_values(traces_span_metrics_calls_total, service_name)", "service"),
        var("span_name", 'label_values(traces_span_metrics_calls_total{service_name=~"$service_name"}, span_name)', "operation"),
        var("span_kind", "label_values(traces_span_metrics_calls_total, span_kind)", "kind"),
    ],
)
sel = 'service_name=~"$service_name",span_name=~"$span_name",span_kind=~"$span_kind"'
b.row("RED")
b.panel("Span rate by service", f"sum by (service_name) (rate(traces_span_metrics_calls_total{{{sel}}}[{RI}]))", "ops", legend="{{service_name}}",
        links=[{"title": "Jaeger: Monitor tab", "url": f"{JAEGER_URL}/monitor", "targetBlank": True}])
b.panel("Error ratio by service",
        f'(sum by (service_name) (rate(traces_span_metrics_calls_total{{{sel},status_code="STATUS_CODE_ERROR"}}[{RI}])) or sum by (service_name) (rate(traces_span_metrics_calls_total{{{sel}}}[{RI}])) * 0)'
        f" / sum by (service_name) (rate(traces_span_metrics_calls_total{{{sel}}}[{RI}]))",
        "percentunit", th=thresholds((0.01, "orange"), (0.05, "red")), legend="{{service_name}}",
        links=[{"title": "Jaeger: error traces", "url": f"{JAEGER_URL}/search?tags=%7B%22error%22%3A%22true%22%7D", "targetBlank": True}])
b.panel("Duration p95 by operation (exemplars link to traces)",
        f"histogram_quantile(0.95, sum by (le, service_name, span_name) (rate(traces_span_metrics_duration_milliseconds_bucket{{{sel}}}[{RI}])))",
        "ms", exemplars=True, legend="{{service_name}}: {{span_name}}", th=thresholds((250, "orange"), (1000, "red")))
b.panel("Trace duration distribution (gateway server spans)",
        f'sum by (le) (increase(traces_span_metrics_duration_milliseconds_bucket{{service_name="gateway",span_kind="SPAN_KIND_SERVER"}}[{RI}]))',
        "ms", kind="heatmap", legend="{{le}}", fmt="heatmap")
b.panel("Top operations", f"topk(15, sum by (service_name, span_name, span_kind) (rate(traces_span_metrics_calls_total{{{sel}}}[{RI}])))", "ops",
        kind="table", width=24, height=8, fmt="table", instant=True)
b.row("Jaeger")
b.raw_panel(
    {
        "type": "nodeGraph",
        "title": "Service dependencies (Jaeger)",
        "description": "gateway -> router -> worker over NATS, from Jaeger's dependency view.",
        "datasource": JAEGER,
        "targets": [{"refId": "A", "datasource": JAEGER, "queryType": "dependencyGraph"}],
        "fieldConfig": {"defaults": {"unit": "none"}, "overrides": []},
        "options": {},
    },
    width=12,
    height=10,
)
b.panels[-1]["gridPos"]["w"] = 12
b.raw_panel(
    {
        "type": "table",
        "title": "Recent traces (Jaeger search)",
        "description": "Click a trace id to open it; service and operation follow the variables.",
        "datasource": JAEGER,
        "targets": [{"refId": "A", "datasource": JAEGER, "queryType": "search", "service": "gateway", "operation": "POST /v1/runs", "limit": 20}],
        "fieldConfig": {"defaults": {"unit": "none"}, "overrides": []},
        "options": {},
    },
    width=24,
    height=10,
)
boards.append(b)


def render(board):
    return json.dumps(board.json(), indent=2, sort_keys=False) + "\n"


def main():
    check = "--check" in sys.argv[1:]
    OUT.mkdir(parents=True, exist_ok=True)
    names = {
        "beamline-requests": "requests.json",
        "beamline-routing": "routing.json",
        "beamline-worker": "worker-execution.json",
        "beamline-extensions": "extensions.json",
        "beamline-errors": "errors.json",
        "beamline-health": "health.json",
        "beamline-traces": "traces-red.json",
    }
    stale = []
    for board in boards:
        path = OUT / names[board.uid]
        text = render(board)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)} ({len(board.panels)} panels)")
    if stale:
        print("out of date (run python3 scripts/observability/dashboards.py): " + ", ".join(stale), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
