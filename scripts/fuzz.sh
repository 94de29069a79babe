#!/usr/bin/env bash
# Fuzzes one target for a while (default 600 s): scripts/fuzz.sh <target> [seconds] [libfuzzer args...]
# Targets: return_to session_cookie callback_query jwt path (fuzz/fuzz_targets/, docs/fuzzing.md).
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Works on a stable toolchain: RUSTC_BOOTSTRAP=1 lets
# stable rustc accept the nightly-only -Z flags cargo-fuzz passes (sanitizer, coverage). Set
# FUZZ_SANITIZER=none to fuzz without AddressSanitizer (faster; tokengate forbids unsafe code).
#
# New inputs go to fuzz/work/<target>/ (gitignored); the committed seeds in fuzz/corpus/<target>/
# are read, never written. A crash stops the run and leaves its reproducer in
# fuzz/artifacts/<target>/; replay it with: scripts/fuzz.sh <target> 0 fuzz/artifacts/<target>/crash-...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

targets="return_to session_cookie callback_query jwt path"
t="${1:-}"
if [ -z "$t" ] || ! [[ " $targets " == *" $t "* ]]; then
  echo "usage: scripts/fuzz.sh <target> [seconds] [libfuzzer args...]; targets: $targets" >&2
  exit 2
fi
secs="${2:-600}"
shift $(( $# >= 2 ? 2 : 1 ))
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo install cargo-fuzz" >&2; exit 1; }

export RUSTC_BOOTSTRAP=1
san="${FUZZ_SANITIZER:-address}"
if [ "$secs" = 0 ]; then
  # Reproduce: run the given inputs once each.
  [ $# -gt 0 ] || { echo "fuzz: seconds 0 means: replay the files given after it" >&2; exit 2; }
  exec cargo fuzz run -s "$san" "$t" "$@"
fi
mkdir -p "fuzz/work/$t"
exec cargo fuzz run -s "$san" "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
  -max_total_time="$secs" -print_final_stats=1 -timeout=10 "$@"
