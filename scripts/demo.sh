#!/usr/bin/env bash
# The whole demo in one command: a real OpenID Connect provider on 127.0.0.1:9000,
# the echo API on 127.0.0.1:3000, and tokengate in front of the demo SPA on
# http://localhost:8080 (settings in config.toml). Ctrl-C stops all three.
#
#   scripts/demo.sh
#
# Needs node (20+), npm and cargo. Logs of the IdP and the API go to target/demo/.
#
# Optional environment (unset = the demo as documented; tests/browser uses these):
#   IDP_ACCESS_TOKEN_TTL=40   the IdP's access-token lifetime in seconds (default 300)
#   TOKENGATE_*               any tokengate setting, e.g. TOKENGATE_OAUTH__REFRESH_SKEW_S=30
#   DEMO_PROFILE=debug        run a debug build of tokengate (default: release)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

IDP_PORT=9000
API_PORT=3000
CONFIG=config.toml
logs=$root/target/demo
PROFILE=${DEMO_PROFILE:-release}

die() { echo "demo: $*" >&2; exit 1; }

for tool in node npm cargo; do
  command -v "$tool" >/dev/null || die "'$tool' is not installed"
done
[ -f "$CONFIG" ] || die "$CONFIG not found in $root"
case "$PROFILE" in
  release) cargo_run=(cargo run --release --) ;;
  debug) cargo_run=(cargo run --) ;;
  *) die "DEMO_PROFILE must be 'release' or 'debug', not '$PROFILE'" ;;
esac
if [ -n "${IDP_ACCESS_TOKEN_TTL:-}" ] && ! [[ "$IDP_ACCESS_TOKEN_TTL" =~ ^[0-9]+$ ]]; then
  die "IDP_ACCESS_TOKEN_TTL must be a number of seconds, not '$IDP_ACCESS_TOKEN_TTL'"
fi

if [ ! -d tests/idp/node_modules ]; then
  echo "demo: installing the test IdP's packages (npm ci in tests/idp)..."
  (cd tests/idp && npm ci --no-audit --no-fund) || die "npm ci failed"
fi

mkdir -p "$logs"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME LOGFILE CMD...: runs CMD in the background, stdout to LOGFILE.out,
# stderr to LOGFILE, then waits for the one JSON line it prints once listening
start() {
  local name=$1 log=$2; shift 2
  : > "$log.out"
  "$@" > "$log.out" 2> "$log" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 1 150); do
    if [ -s "$log.out" ] && grep -q '}' "$log.out"; then
      echo "demo: $name ready: $(head -n 1 "$log.out")"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$log" >&2
      die "$name exited during start-up (is its port already in use?)"
    fi
    sleep 0.2
  done
  die "$name did not start within 30 s (see $log)"
}

start "IdP (oidc-provider)" "$logs/idp.log" \
  env PORT=$IDP_PORT IDP_ACCESS_TOKEN_TTL="${IDP_ACCESS_TOKEN_TTL:-}" node tests/idp/idp.mjs
start "echo API" "$logs/echo-api.log" \
  env PORT=$API_PORT ISSUER=http://127.0.0.1:$IDP_PORT node tests/idp/echo-api.mjs

cat <<EOF

  ================================================================
   tokengate demo

   Open  http://localhost:8080  and click "Log in".
   At the IdP, sign in with ANY user name and ANY password,
   then click "Continue" on the consent page.

   IdP       http://127.0.0.1:$IDP_PORT   log: target/demo/idp.log
             (access tokens live ${IDP_ACCESS_TOKEN_TTL:-300} s)
   echo API  http://127.0.0.1:$API_PORT   log: target/demo/echo-api.log
   Ctrl-C stops everything.
  ================================================================

demo: building and starting tokengate ($PROFILE build; the first build takes a while)...
EOF

status=0
"${cargo_run[@]}" --config "$CONFIG" || status=$?
echo "demo: tokengate exited (status $status); stopping the IdP and the echo API"
exit "$status"
