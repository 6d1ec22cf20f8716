#!/usr/bin/env bash
# Every performance figure of moat in one run, each against a peer measured in the same run:
#   scripts/bench-pps.sh             packet rate (dpdk-testpmd txonly) vs DPDK's vhost PMD
#   cargo bench --bench egress_tcp   TCP through moat, and through passt when PASST=path is set
#   cargo bench --bench verdict      parse + verdict ns/frame vs etherparse's bare parse
#   cargo bench --bench footprint    RSS and idle CPU vs the issue's targets
#   cargo bench --bench many_flows   one flow's RR with thousands of other flows open vs none
#   cargo bench --bench sandbox_job  a package-manager-shaped job vs the same job from the host
# then ONE summary table (peer, figure, moat, peer value, ratio) in target/bench/summary.txt.
# Each step's full output is in target/bench/<step>.log.
#
# MOAT_BENCH_QUICK=1: a smoke run (3 s per packet-rate case, 32 MiB / 50 connections, short
# criterion runs, 3 s idle, 1000 flows, 10 moats, 3 runs of RR, connections and the job).
# MOAT_BENCH_BEFORE=/path/to/an/older/moat: run every step that drives the moat binary a
# second time with that binary (MOAT_BENCH_BIN), each right before the current one, and
# print a before/after table (ratios against each run's own peer, which absorb most of this
# machine's noise) in target/bench/before_after.txt; the older run's files are in
# target/bench/before/. verdict links moat's library, so it has no "before".
set -uo pipefail
cd "$(dirname "$0")/.."

out=target/bench
mkdir -p "$out"
quick=${MOAT_BENCH_QUICK:-0}
if [ "$quick" != 0 ] && [ -n "$quick" ]; then
  export MOAT_BENCH_QUICK=1
  export MOAT_BENCH_MB=${MOAT_BENCH_MB:-32} MOAT_BENCH_CONNS=${MOAT_BENCH_CONNS:-50}
  export MOAT_RR_RUNS=${MOAT_RR_RUNS:-3} MOAT_RR_ROUNDS=${MOAT_RR_ROUNDS:-500}
  export MOAT_CONN_RUNS=${MOAT_CONN_RUNS:-3} MOAT_JOB_RUNS=${MOAT_JOB_RUNS:-3}
fi
before=${MOAT_BENCH_BEFORE:-}
if [ -n "$before" ] && [ ! -x "$before" ]; then
  echo "bench: MOAT_BENCH_BEFORE=$before is not an executable; no before/after table" >&2
  before=""
fi
unset MOAT_BENCH_BIN

cargo build --release || {
  echo "bench: cargo build --release failed" >&2
  exit 1
}

status=()
step() { # step NAME CMD...: run, log, remember the exit status
  local name=$1
  shift
  echo "=== $name: $*" >&2
  local start=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  status+=("$name rc=$rc $((SECONDS - start))s")
  [ "$rc" = 0 ] || echo "bench: $name failed (exit $rc); see $out/$name.log" >&2
}

rm -rf "$out/before"
rm -f "$out"/{egress_tcp,verdict,footprint,many_flows,sandbox_job}.txt "$out"/pps-run.txt \
  "$out"/before_after.txt
[ -n "$before" ] && mkdir -p "$out/before"

pps() { # pps NAME DIR: one packet-rate run; its lines of pps.txt (appended to by every run)
  # go to DIR/pps-run.txt
  local mark=0
  [ -f "$out/pps.txt" ] && mark=$(wc -l <"$out/pps.txt")
  step "$1" scripts/bench-pps.sh
  if [ -f "$out/pps.txt" ]; then tail -n +"$((mark + 1))" "$out/pps.txt"; fi >"$2/pps-run.txt"
}
bench() { # bench NAME: cargo bench --bench NAME, first with the older moat if there is one
  if [ -n "$before" ]; then
    MOAT_BENCH_BIN=$before step "$1.before" cargo bench --bench "$1"
    if [ -f "$out/$1.txt" ]; then mv "$out/$1.txt" "$out/before/$1.txt"; fi
  fi
  step "$1" cargo bench --bench "$1"
}

if [ -n "$before" ]; then MOAT_BENCH_BIN=$before pps pps.before "$out/before"; fi
pps pps "$out"
bench egress_tcp
step verdict cargo bench --bench verdict
bench footprint
if [ "$quick" != 0 ] && [ -n "$quick" ]; then
  export MOAT_FLOWS=${MOAT_FLOWS:-1000} MOAT_BUSY=${MOAT_BUSY:-200} MOAT_RR=${MOAT_RR:-500}
fi
bench many_flows
bench sandbox_job

summary() { # summary DIR: one row per figure, tab-separated: peer, figure, moat, peer value, ratio
  local d=$1
  printf '%s\t%s\t%s\t%s\t%s\n' peer figure moat "peer value" ratio
  # Packet rate: this run's table at the end of pps.txt.
  if [ -s "$d/pps-run.txt" ]; then
    awk '
      /^## table/ { t = 1; next }
      /^#/ { t = 0 }
      t && $1 != "case" { mpps[$1 " " $2] = $3; percpu[$1 " " $2] = $6; peer[$1 " " $2] = $7; order[++n] = $1 " " $2 }
      END {
        for (i = 1; i <= n; i++) {
          split(order[i], k, " ")
          p = peer[order[i]]
          if (p == "-" || p == "") continue
          name = (p == "ceiling") ? "DPDK vhost PMD rxonly" : (p == "ceiling-macswap") ? "DPDK vhost PMD macswap" : "passt --vhost-user, UDP"
          c = mpps[p " " k[2]]; m = mpps[order[i]]
          r = (c + 0 > 0 && m != "-") ? sprintf("%.3f", m / c) : "-"
          printf "%s\t%s\t%s\t%s\t%s\n", name, k[1] " " k[2] "B Mpps", m, c, r
          c = percpu[p " " k[2]]; m = percpu[order[i]]
          r = (c + 0 > 0 && m != "-") ? sprintf("%.3f", m / c) : "-"
          printf "%s\t%s\t%s\t%s\t%s\n", name, k[1] " " k[2] "B Mpps per CPU-s", m, c, r
        }
      }' "$d/pps-run.txt"
  fi
  if [ -f "$d/egress_tcp.txt" ]; then
    # Rows are "{name:<W} {value:>10.3} {unit:<8} {cpu:>12.3} {path cpu:>12.3} {cost}": the
    # name may have spaces; W from where the header's right-aligned "value" ends.
    awk 'NR == 1 { w = index($0, "value") + 4 - 11; next }
      {
      name = substr($0, 1, w); sub(/ +$/, "", name)
      split(substr($0, w + 2), f, " ")
      peer = (name ~ /passt|loopback/) ? "(is the peer row)" : "egress_tcp: see passt rows"
      printf "%s\t%s\t%s\t%s\t%s\n", peer, name " " f[2], f[1], "-", "-"
      # Bulk rows: CPU-s per Gbit of the backend alone / of the whole path (moat + proxy
      # process; passt alone), from the cost column "X CPU-s/Gbit backend, Y whole path".
      if (f[6] == "CPU-s/Gbit")
        printf "%s\t%s\t%s\t%s\t%s\n", peer, name " CPU-s/Gbit backend / path", f[5] " / " f[8], "-", "-"
      # RR through moat: the added p50 over the host path, run by run, min / median / max.
      if (name ~ /moat/ && match($0, /added p50 min\/median\/max [-0-9.]+ \/ [-0-9.]+ \/ [-0-9.]+/)) {
        split(substr($0, RSTART + 25, RLENGTH - 25), a, " / ")
        t = (name ~ /busy/) ? 10 : 30
        printf "%s\t%s\t%s\t%s\t%s\n", "issue target (host path, same run)", "RR added p50 us" (name ~ /busy/ ? ", busy poll" : "") " (min/med/max)", a[1] " / " a[2] " / " a[3], "<= " t, sprintf("%.2f", a[2] / t)
      }
      # Connections: against the host loop through the same proxy, and the CPU of moat each.
      if (f[2] == "conn/s" && match($0, /host floor [0-9.]+/)) {
        floor = substr($0, RSTART + 11, RLENGTH - 11)
        r = "-"
        if (match($0, /moat\/host min\/median\/max [0-9.]+ \/ [0-9.]+ \/ [0-9.]+/)) {
          split(substr($0, RSTART + 25, RLENGTH - 25), a, " / "); r = a[2]
        }
        printf "%s\t%s\t%s\t%s\t%s\n", "host -> same proxy (floor)", "conn/s, connect+CONNECT+echo+close", f[1], floor, r
        us = f[5]
        printf "%s\t%s\t%s\t%s\t%s\n", "issue target", "moat CPU per connection, us", us, "<= 100", sprintf("%.2f", us / 100)
      }
    }' "$d/egress_tcp.txt"
  fi
  if [ -f "$d/verdict.txt" ]; then
    # Column 7 ("like"): whether moat and etherparse do the same work on that frame; the
    # rows that do not (IPv6 dropped on its ethertype, a truncated frame) are shown without a
    # ratio and left out of the headline range.
    awk 'NR > 1 {
        if ($7 == "yes") {
          printf "%s\t%s\t%s\t%s\t%s\n", "etherparse SlicedPacket", $1 " ns/frame", $3, $4, $5
          r = $5 + 0; n++; lg += log(r); if (lo == "" || r < lo) lo = r; if (hi == "" || r > hi) hi = r
        } else {
          printf "%s\t%s\t%s\t%s\t%s\n", "etherparse (not like-for-like)", $1 " ns/frame", $3, $4, "-"
        }
      }
      END { if (n) printf "%s\t%s\t%s\t%s\t%s\n", "etherparse SlicedPacket", "parse+verdict, like-for-like rows", "range " lo " - " hi, "-", sprintf("%.2f", exp(lg / n)) }' \
      "$d/verdict.txt"
  fi
  if [ -f "$d/footprint.txt" ]; then
    awk -F' *[|] *' '/^raw / || NR == 1 { next }
      {
        split($3, m, " "); split($2, t, " ")
        tv = ($2 ~ /^~0/) ? $2 : t[2] " " t[3]
        printf "%s\t%s\t%s\t%s\t%s\n", "issue target", substr($1, 1, 42), m[1] " " m[2], tv, $4
      }' "$d/footprint.txt"
  fi
  if [ -f "$d/sandbox_job.txt" ]; then
    # "figure | path | s | peer | peer s | ratio", each "min / median / max": the medians.
    awk -F' [|] ' 'NR == 1 || /^\(/ { next }
      {
        split($3, m, " / "); split($5, p, " / "); split($6, r, " / ")
        side = ($2 ~ /moat/) ? "moat" : "passt"
        if ($4 == "-") {
          printf "%s\t%s\t%s\t%s\t%s\n", "-", "job: " $1 ", s, " side, m[2], "-", "-"
        } else {
          peer = ($4 ~ /passt/) ? "passt, same simulated guest" : $4 " (host)"
          printf "%s\t%s\t%s\t%s\t%s\n", peer, "job: " $1 ", s, " side, m[2], p[2], r[2]
        }
      }' "$d/sandbox_job.txt"
  fi
  if [ -f "$d/many_flows.txt" ]; then
    # "other flows open  p50 p99 base-p50 ratio": each phase against a second moat with
    # nothing else open, measured in alternating blocks in the same run.
    # Then "# bulk upload ...": "other flows open  Gbit/s base-Gbit/s ratio", the same way.
    awk '/^# bulk/ { bulk = 1; next }
      /^#/ || /^other flows/ || /^moat CPU/ || /^\(/ || NF == 0 { next }
      bulk {
        n = NF; ratio = $n; base = $(n - 1); gbit = $(n - 2); name = $0
        sub(/ +[0-9.]+ +[0-9.]+ +[0-9.]+$/, "", name)
        printf "%s\t%s\t%s\t%s\t%s\n", "same flow, no other flow open", "bulk Gbit/s, " substr(name, 1, 30), gbit, base, ratio
        next
      }
      {
        n = NF; ratio = $n; base = $(n - 1); p50 = $(n - 3); name = $0
        sub(/ +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+$/, "", name)
        printf "%s\t%s\t%s\t%s\t%s\n", "same flow, no other flow open", "RR p50 us, " substr(name, 1, 31), p50, base, ratio
      }' "$d/many_flows.txt"
  fi
}

wide() { awk -F'\t' '{ printf "%-36s %-44s %24s %24s %9s\n", $1, $2, $3, $4, $5 }'; }

summary "$out" >"$out/summary.tsv"
{
  echo "# moat bench summary, $(date -u +%FT%TZ), $(nproc) CPUs$([ "$quick" != 0 ] && [ -n "$quick" ] && echo ', QUICK')"
  wide <"$out/summary.tsv"
  echo
  echo "ratio = moat / peer (packet rate: higher is better; ns/frame, RSS, CPU, times: lower is better)"
  echo "steps: ${status[*]}"
} | tee "$out/summary.txt"

if [ -n "$before" ]; then
  # The same figures with the older moat, each step run right before the current one: the
  # moat value and the ratio to that run's own peer, before and after.
  summary "$out/before" >"$out/before/summary.tsv"
  {
    echo
    echo "# before/after: before = $before, after = target/release/moat"
    awk -F'\t' '
      NR == FNR { b[$1 FS $2] = $3; br[$1 FS $2] = $5; next }
      FNR == 1 { printf "%-36s %-44s %20s %20s %10s %10s\n", "peer", "figure", "moat before", "moat after", "ratio bef.", "ratio aft."; next }
      ($1 FS $2) in b { printf "%-36s %-44s %20s %20s %10s %10s\n", $1, $2, b[$1 FS $2], $3, br[$1 FS $2], $5 }
    ' "$out/before/summary.tsv" "$out/summary.tsv"
  } | tee "$out/before_after.txt"
fi
