#!/usr/bin/env bash
# Validate the alerting assets (seed O1-4.5):
#   * promtool check rules   every observability/prometheus/rules/*.yml
#   * promtool test rules    observability/prometheus/tests/*.yml (every alert
#                            fires on synthetic series and stays silent on
#                            healthy ones)
#   * promtool check config  observability/prometheus/prometheus.yml
#   * amtool check-config    observability/alertmanager/alertmanager.yml, and
#                            routing: critical -> pager, warning -> tickets
#   * structure              every alert has labels severity (critical|warning)
#                            and annotations summary, description, runbook_url,
#                            and the runbook file exists; every alert has a
#                            firing test case in the unit tests
# Needs promtool and amtool (apt-get install prometheus prometheus-alertmanager).
# Exit status: 0 all passed, 1 a check failed, 2 a tool is missing.
set -euo pipefail
# shellcheck source=scripts/observability/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

need_tool promtool prometheus
need_tool amtool prometheus-alertmanager
PROM_DIR=observability/prometheus
AM_CONFIG=observability/alertmanager/alertmanager.yml

say "promtool check rules"
for f in "$PROM_DIR"/rules/*.yml; do
    if out="$(promtool check rules "$f" 2>&1)"; then
        ok "$f ($(grep -o '[0-9]* rules found' <<<"$out"))"
    else
        fail "$f: $out"
    fi
done

say "promtool test rules"
for f in "$PROM_DIR"/tests/*.yml; do
    if out="$(promtool test rules "$f" 2>&1)"; then
        ok "$f"
    else
        fail "$f:"$'\n'"$out"
    fi
done

say "promtool check config"
if out="$(promtool check config --syntax-only "$PROM_DIR/prometheus.yml" 2>&1)"; then
    ok "$PROM_DIR/prometheus.yml"
else
    fail "$PROM_DIR/prometheus.yml: $out"
fi

say "amtool check-config and routes"
if out="$(amtool check-config "$AM_CONFIG" 2>&1)"; then
    ok "$AM_CONFIG"
else
    fail "$AM_CONFIG: $out"
fi
for pair in critical:pager warning:tickets; do
    got="$(amtool config routes test --config.file="$AM_CONFIG" "severity=${pair%%:*}" component=worker 2>/dev/null || true)"
    if [[ $got == "${pair#*:}" ]]; then
        ok "severity=${pair%%:*} routes to ${pair#*:}"
    else
        fail "severity=${pair%%:*} routes to '$got', expected '${pair#*:}'"
    fi
done

say "alert structure, runbooks and test coverage"
# Python reads the YAML with a tiny parser-free approach: promtool already
# validated it, so `alert:`/`severity:`/annotation keys are found per rule block.
if ! out="$(python3 - "$PROM_DIR" <<'PY'
import pathlib, re, sys
prom = pathlib.Path(sys.argv[1])
problems, alerts = [], []
for f in sorted((prom / "rules").glob("*.yml")):
    blocks = re.split(r"\n(?=\s*- (?:alert|record): )", f.read_text())
    for block in blocks:
        m = re.match(r"\s*- alert: (\S+)", block)
        if not m:
            continue
        name = m.group(1)
        alerts.append(name)
        sev = re.search(r"\n\s+severity: (\S+)", block)
        if not sev or sev.group(1) not in ("critical", "warning"):
            problems.append(f"{f.name}: {name}: label severity must be critical or warning")
        for key in ("summary", "description", "runbook_url"):
            if not re.search(rf"\n\s+{key}: \S", block):
                problems.append(f"{f.name}: {name}: annotation {key} is missing")
        url = re.search(r'\n\s+runbook_url: "?([^"\n]+)"?', block)
        if url:
            path = url.group(1)
            if path != f"docs/runbooks/{name}.md":
                problems.append(f"{f.name}: {name}: runbook_url is {path}, expected docs/runbooks/{name}.md")
            elif not (prom.parent.parent / path).is_file():
                problems.append(f"{f.name}: {name}: runbook {path} does not exist")
tests = "\n".join(p.read_text() for p in sorted((prom / "tests").glob("*.yml")))
for name in alerts:
    # A firing case: an alert_rule_test for it whose exp_alerts is not empty.
    cases = re.findall(rf"alertname: {name}\n\s+exp_alerts:(.*)", tests)
    if not any(c.strip() != "[]" for c in cases):
        problems.append(f"{name}: no unit test shows it firing")
for p in problems:
    print(p)
sys.exit(1 if problems else 0)
PY
)"; then
    while IFS= read -r line; do [[ -n $line ]] && fail "$line"; done <<<"$out"
else
    ok "every alert: severity, summary, description, runbook (docs/runbooks/<AlertName>.md), a firing unit test"
fi

finish
