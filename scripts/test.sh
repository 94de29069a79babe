#!/usr/bin/env bash
# Command 2: runs every test. On a fresh machine it installs what the tests need first
# (the test IdP's npm packages); everything else the tests start themselves on 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v node >/dev/null || { echo "test: node (20+) is required" >&2; exit 1; }
if [ ! -d tests/idp/node_modules ] || [ tests/idp/package-lock.json -nt tests/idp/node_modules ]; then
  echo "== npm ci (tests/idp: oidc-provider)"
  (cd tests/idp && npm ci --no-audit --no-fund)
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --all-targets --locked
