# Shared helpers of the validate_*.sh scripts (sourced, not run).
# shellcheck shell=bash disable=SC2034

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
: "${SCRIPT:=$(basename "$0" .sh)}"
failures=0

say() { printf '%s: %s\n' "$SCRIPT" "$*"; }
ok() { printf '  ok    %s\n' "$*"; }
fail() {
    printf '  FAIL  %s\n' "$*" >&2
    failures=$((failures + 1))
}
die() {
    printf '%s: error: %s\n' "$SCRIPT" "$*" >&2
    exit 2
}

# The path of a Prometheus tool (promtool, amtool), or die with how to get it.
need_tool() {
    local name="$1" package="$2"
    command -v "$name" >/dev/null && return 0
    die "$name not found; install it with: apt-get install $package"
}

# Exit with the verdict: 0 when nothing failed.
finish() {
    if ((failures)); then
        say "$failures check(s) failed"
        exit 1
    fi
    say "all checks passed"
}
