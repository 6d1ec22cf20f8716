#!/usr/bin/env bash
# Fuzz every cargo-fuzz target in fuzz/ for SECONDS_PER_TARGET (default 30) on a temporary
# copy of the committed seed corpus (fuzz/corpus/<target>/ is never grown here).
# Prints target | executions | result; exits non-zero if any target crashed, with the crash
# input path and the panic.
# Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z flags.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz
fi

echo "fuzz: building targets" >&2
cargo fuzz build -O

targets=$(cargo fuzz list | grep -v '^gen_corpus$')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p fuzz/artifacts

failed=0
rows=()
for t in $targets; do
  corpus="$work/corpus/$t"
  mkdir -p "$corpus" "fuzz/artifacts/$t"
  [ -d "fuzz/corpus/$t" ] && cp -r "fuzz/corpus/$t/." "$corpus/"
  log="$work/$t.log"
  echo "fuzz: $t for ${secs}s" >&2
  result=ok
  if ! cargo fuzz run -O "$t" "$corpus" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
      >"$log" 2>&1; then
    result=CRASH
    failed=1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  [ -n "$execs" ] || execs=$(grep -o 'Done [0-9]* runs' "$log" | tail -1 | awk '{print $2}')
  rows+=("$t|${execs:-?}|$result")
  if [ "$result" = CRASH ]; then
    echo "---- $t crashed ----" >&2
    grep -E "panicked at|^thread '|Test unit written to|ERROR: libFuzzer|SUMMARY" "$log" >&2 || tail -40 "$log" >&2
    sed -n '/panicked at/,+3p' "$log" >&2 || true
    cp "$log" "fuzz/artifacts/$t/fuzz.log"
    echo "full log: fuzz/artifacts/$t/fuzz.log" >&2
  fi
done

printf '\n%-14s | %12s | %s\n' target executions result
printf -- '---------------+--------------+-------\n'
for r in "${rows[@]}"; do
  IFS='|' read -r t e res <<<"$r"
  printf '%-14s | %12s | %s\n' "$t" "$e" "$res"
done
exit "$failed"
