#!/usr/bin/env python3
"""Validate the Grafana dashboards (seed O1-3.7); run by validate_dashboards.sh.

Offline (always):
  * every observability/grafana/dashboards/*.json is valid JSON in Grafana's
    dashboard model: uid, title, schemaVersion, panels with gridPos, unique
    uids and panel ids;
  * variables `component` and `tenant_id` exist on every dashboard;
  * every panel (not rows) has a unit and a datasource that is provisioned
    (observability/grafana/provisioning/datasources);
  * the dashboard links to Jaeger; the files match their generator.
Live (with --prometheus URL):
  * every variable query (label_values) returns values;
  * every Prometheus panel query, with variables set to "All" (.*) and Grafana's
    interval macros substituted, is executed and must return data, and every
    metric it names must exist. A query whose metric does not exist yet passes
    only if that metric is listed, with a reason, in
    observability/grafana/dashboards/missing-metrics.allowlist; an allowlisted
    metric that exists now is reported so the entry can go.
"""

import argparse
import json
import pathlib
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASH = ROOT / "observability" / "grafana" / "dashboards"
ALLOW = DASH / "missing-metrics.allowlist"
DATASOURCES = ROOT / "observability" / "grafana" / "provisioning" / "datasources" / "datasources.yml"

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan", "le"}
failures = 0


def ok(msg):
    print(f"  ok    {msg}")


def fail(msg):
    global failures
    failures += 1
    print(f"  FAIL  {msg}")


def note(msg):
    print(f"  skip  {msg}")


def substitute(expr):
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "15m")
    expr = re.sub(r"\$\{(\w+)(:\w+)?\}", ".*", expr)
    expr = re.sub(r"\[\[(\w+)\]\]", ".*", expr)
    return re.sub(r"\$(\w+)", ".*", expr)


def metric_names(expr):
    """The metric names a PromQL expression selects."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)              # string literals
    e = re.sub(r"\{[^}]*\}", "", e)                            # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                           # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", e):
        word = m.group(1)
        if word.lower() in KEYWORDS or re.fullmatch(r"\d+\w*", word):
            continue
        names.add(word)
    return names


def load_allowlist():
    allow = {}
    if ALLOW.exists():
        for line in ALLOW.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) < 2:
                fail(f"{ALLOW.name}: '{line}' has no reason; write: <metric> <why it may be missing>")
                continue
            allow[parts[0]] = parts[1]
    return allow


def provisioned_uids():
    return set(re.findall(r"^\s+uid:\s*(\S+)", DATASOURCES.read_text(), re.M))


class Prom:
    def __init__(self, url):
        self.url = url.rstrip("/")
        self.exists_cache = {}

    def get(self, path, **params):
        q = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=15) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                return json.loads(body)
            except ValueError:
                return {"status": "error", "error": body[:200]}

    def query(self, expr):
        return self.get("/api/v1/query", query=expr)

    def exists(self, name):
        if name not in self.exists_cache:
            r = self.query(f'count({{__name__="{name}"}})')
            self.exists_cache[name] = bool(r.get("status") == "success" and r["data"]["result"])
        return self.exists_cache[name]


def check_offline(path, board, uids):
    name = path.name
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        if key not in board:
            fail(f"{name}: missing top-level '{key}'")
            return
    variables = {v["name"]: v for v in board["templating"]["list"]}
    for required in ("component", "tenant_id"):
        if required not in variables:
            fail(f"{name}: no '{required}' template variable")
    if not any("16686" in link.get("url", "") for link in board.get("links", [])):
        fail(f"{name}: no link to Jaeger")
    ids = [p.get("id") for p in board["panels"]]
    if len(ids) != len(set(ids)):
        fail(f"{name}: duplicate panel ids")
    problems = 0
    for p in board["panels"]:
        if p.get("type") == "row":
            continue
        title = p.get("title", "?")
        if "gridPos" not in p:
            fail(f"{name}: panel '{title}' has no gridPos"); problems += 1
        if not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            fail(f"{name}: panel '{title}' has no unit"); problems += 1
        ds = (p.get("datasource") or {}).get("uid")
        if ds not in uids:
            fail(f"{name}: panel '{title}' uses datasource uid {ds!r}, not provisioned ({sorted(uids)})"); problems += 1
        for t in p.get("targets", []):
            if (t.get("datasource") or {}).get("type", "prometheus") == "prometheus" and not t.get("expr"):
                fail(f"{name}: panel '{title}' has a Prometheus target without expr"); problems += 1
    if not problems:
        ok(f"{name}: structure, variables {sorted(variables)}, units, datasources, Jaeger link")


def check_live(path, board, prom, allow, used_allow):
    name = path.name
    for v in board["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
        if not m:
            continue
        selector, label = m.group(1), m.group(2)
        r = prom.get(f"/api/v1/label/{label}/values", **{"match[]": substitute(selector)})
        values = r.get("data") or []
        metrics = metric_names(selector)
        missing = [x for x in metrics if not prom.exists(x)]
        if values:
            ok(f"{name}: variable {v['name']} has {len(values)} value(s) ({', '.join(values[:4])}{'…' if len(values) > 4 else ''})")
        elif missing and all(x in allow for x in missing):
            used_allow.update(missing)
            note(f"{name}: variable {v['name']}: {', '.join(missing)} not exported yet (allowlisted: {allow[missing[0]]})")
        else:
            fail(f"{name}: variable {v['name']} ({v['query']['query']}) has no values")
    for p in board["panels"]:
        if p.get("type") == "row":
            continue
        title = p.get("title", "?")
        for t in p.get("targets", []):
            ds_type = (t.get("datasource") or p.get("datasource") or {}).get("type")
            if ds_type != "prometheus":
                note(f"{name}: '{title}' queries {ds_type} (not PromQL; checked by validate_traces.sh)")
                continue
            expr = substitute(t["expr"])
            r = prom.query(expr)
            if r.get("status") != "success":
                fail(f"{name}: '{title}' [{t['refId']}] is not valid PromQL: {r.get('error')}\n        {expr}")
                continue
            has_data = bool(r["data"]["result"])
            missing = sorted(x for x in metric_names(expr) if not prom.exists(x))
            unlisted = [x for x in missing if x not in allow]
            used_allow.update(x for x in missing if x in allow)
            if unlisted:
                fail(f"{name}: '{title}' [{t['refId']}] selects metric(s) that do not exist: {', '.join(unlisted)}"
                     f" (typo? or add them to {ALLOW.name} with the reason)\n        {expr}")
            elif has_data and not missing:
                ok(f"{name}: '{title}' [{t['refId']}] returns {len(r['data']['result'])} series")
            elif missing:
                note(f"{name}: '{title}' [{t['refId']}]: {', '.join(missing)} not exported yet (allowlisted: {allow[missing[0]]})")
            else:
                fail(f"{name}: '{title}' [{t['refId']}] returns no data although its metrics exist (a label filter that matches nothing?)\n        {expr}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", help="Prometheus base URL for the live check (omit: offline only)")
    args = ap.parse_args()
    uids = provisioned_uids()
    allow = load_allowlist()
    files = sorted(DASH.glob("*.json"))
    if not files:
        fail(f"no dashboards in {DASH}")
    boards = []
    print("validate_dashboards: JSON and structure")
    seen = {}
    for f in files:
        try:
            board = json.loads(f.read_text())
        except ValueError as e:
            fail(f"{f.name}: invalid JSON: {e}")
            continue
        if board.get("uid") in seen:
            fail(f"{f.name}: uid {board['uid']} also used by {seen[board['uid']]}")
        seen[board.get("uid")] = f.name
        check_offline(f, board, uids)
        boards.append((f, board))
    if args.prometheus:
        prom = Prom(args.prometheus)
        try:
            urllib.request.urlopen(f"{prom.url}/-/ready", timeout=5)
        except (urllib.error.URLError, OSError) as e:
            print(f"validate_dashboards: error: Prometheus at {prom.url} does not answer ({e}); start the stack (scripts/dev-up.sh) or pass another URL", file=sys.stderr)
            sys.exit(2)
        used_allow = set()
        print(f"validate_dashboards: every query against {prom.url}")
        for f, board in boards:
            check_live(f, board, prom, allow, used_allow)
        for metric in sorted(set(allow) - used_allow):
            if prom.exists(metric):
                print(f"  note  {metric} has data here; keep its {ALLOW.name} entry only if it can be absent elsewhere")
            else:
                print(f"  note  {metric} is allowlisted but no panel needed the exemption")
    if failures:
        print(f"validate_dashboards: {failures} check(s) failed")
        sys.exit(1)
    print("validate_dashboards: all checks passed")


if __name__ == "__main__":
    main()
