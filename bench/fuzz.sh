#!/usr/bin/env bash
# Coverage-guided fuzzing of the HTTP/1 head parser, the chunked decoder, where a request ends
# (Surge against a plain reading of RFC 9112 on httparse's primitives), and the config loader.
#
#   cargo install cargo-fuzz                 # once
#   bench/fuzz.sh                            # FUZZ_SECONDS=1800 per target, TARGETS="request_head ..."
#   JOBS=4 bench/fuzz.sh                     # all targets at once, each niced, sharing the cores
#
# cargo fuzz needs nightly features; RUSTC_BOOTSTRAP=1 lets this stable toolchain use them. The
# corpus grows in fuzz/corpus/<target> (not committed), seeded from fuzz/seeds/<target>; a
# finding lands in fuzz/artifacts/<target>. Appends executions and findings to bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-1800}"
TARGETS="${TARGETS:-request_head chunked request_end config}"
JOBS="${JOBS:-1}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || { echo "bench/fuzz.sh needs cargo-fuzz: cargo install cargo-fuzz" >&2; exit 1; }
cargo fuzz build -O
# The code fuzzed is the code built now, whatever HEAD is when the report is written.
built="$(git rev-parse --short HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo ' with uncommitted changes' || true)"
mkdir -p logs
run() {
  local target="$1"
  mkdir -p "corpus/$target"
  nice -n 19 cargo fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 > "logs/$target.log" 2>&1 || true
}
running=0
for target in $TARGETS; do
  run "$target" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait
{
  echo
  echo "### fuzz, $(date -u +%Y-%m-%d), $(nproc) cores"
  echo
  echo "Code at \`$built\`. \`FUZZ_SECONDS=$SECONDS_PER_TARGET JOBS=$JOBS bench/fuzz.sh\` (libFuzzer through cargo fuzz, AddressSanitizer, optimised):"
  echo
  echo "| target | seconds | executions | corpus entries | findings |"
  echo "|---|---|---|---|---|"
  for target in $TARGETS; do
    log="logs/$target.log"
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
    corpus=$(find "corpus/$target" -type f | wc -l)
    findings=$(find "artifacts/$target" -type f 2>/dev/null | wc -l)
    echo "| $target | $SECONDS_PER_TARGET | $runs | $corpus | $findings |"
  done
} | tee -a ../bench/RESULTS.md
