#!/usr/bin/env bash
# End-to-end test of the demo (scripts/demo.sh) in real headless Chromium: log in at the IdP,
# call the API, outlive the access token (tokengate refreshes it), refresh, log out.
# Installs what is missing first: Debian's chromium (apt, needs root) and playwright-core
# (npm ci in tests/browser). Needs 127.0.0.1:8080, :9000 and :3000 free.
#
#   scripts/browser-test.sh
#
# Screenshots and logs: target/browser-artifacts/. Env: CHROMIUM (default /usr/bin/chromium),
# DEMO_PROFILE (default debug here), BROWSER_TEST_STARTUP_TIMEOUT_S (build + start bound, 900).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "browser-test: $*" >&2; exit 1; }

command -v node >/dev/null || die "node (20+) is required"
command -v npm >/dev/null || die "npm is required"

export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  if [ "$CHROMIUM" != /usr/bin/chromium ]; then
    die "CHROMIUM=$CHROMIUM is not an executable"
  fi
  if [ "$(id -u)" -ne 0 ]; then
    die "Chromium is not installed ($CHROMIUM is missing). Install it as root, then run this again:
    sudo apt-get update && sudo apt-get install -y chromium"
  fi
  echo "== apt-get install chromium"
  apt-get update
  apt-get install -y chromium
  [ -x "$CHROMIUM" ] || die "apt-get installed chromium but $CHROMIUM is still missing"
fi

if [ ! -d tests/browser/node_modules/playwright-core ] \
  || [ tests/browser/package-lock.json -nt tests/browser/node_modules ]; then
  echo "== npm ci (tests/browser: playwright-core)"
  (cd tests/browser && npm ci --no-audit --no-fund)
fi

echo "== browser test (headless $("$CHROMIUM" --version 2>/dev/null || echo Chromium))"
exec node --test --test-reporter=spec tests/browser/*.test.mjs
