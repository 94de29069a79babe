#!/usr/bin/env bash
# Command 2: runs every test. On a fresh machine it first installs what the tests need
# (redis-server and chromium from Debian, the test IdP's and the browser test's npm packages);
# everything else the tests start themselves on 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v node >/dev/null || { echo "test: node (20+) is required" >&2; exit 1; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "test: $* missing; install it (apt-get install -y $*) or run as root" >&2
    exit 1
  fi
  echo "== apt-get install $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
command -v redis-server >/dev/null || apt_install redis-server

if [ ! -d tests/idp/node_modules ] || [ tests/idp/package-lock.json -nt tests/idp/node_modules ]; then
  echo "== npm ci (tests/idp: oidc-provider)"
  (cd tests/idp && npm ci --no-audit --no-fund)
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test (unit tests, fuzz-free benches compile, integration suite on the cookie store)"
cargo test --all-targets --locked
echo "== the same integration suite on the Redis store"
TEST_SESSION_STORE=redis cargo test --locked --test api
echo "== the demo in a real browser (headless Chromium)"
bash scripts/browser-test.sh
