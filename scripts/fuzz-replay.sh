#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each once over its committed seed corpus
# (fuzz/corpus/<target>/), no fuzzing: a quick check that the targets build and the seeds pass.
# CI runs the same checks without cargo-fuzz as `cargo test --test fuzz_corpus`; this script is
# for humans who changed a target. Needs cargo-fuzz; stable toolchain OK (RUSTC_BOOTSTRAP=1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v cargo-fuzz >/dev/null || { echo "fuzz-replay: cargo install cargo-fuzz" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1
san="${FUZZ_SANITIZER:-address}"
cargo fuzz build -s "$san"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for t in $(cargo fuzz list); do
  if cargo fuzz run -s "$san" "$t" "fuzz/corpus/$t" -- -runs=0 >"$log" 2>&1; then
    echo "ok   $t: $(ls "fuzz/corpus/$t" | wc -l) seeds, $(grep -o 'INITED.*' "$log" | head -1)"
  else
    cat "$log" >&2
    echo "fuzz-replay: $t FAILED (see above)" >&2
    exit 1
  fi
done
echo "fuzz-replay: all targets pass their corpus"
